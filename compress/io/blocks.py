"""Block-wise execution of a Hugging Face model: the embeddings and one transformer block on the device at a time,
each block's weights read from the safetensors files when it runs, activations handed from block to block.

This is how every pass that runs a big model works here (pruning calibration, Wanda, SparseGPT, OWL; perplexity,
KL and head scores build on it): device memory is about one block, its statistics and the activations, and host
memory the same, never the model.

```python
from compress.io.blocks import BlockRunner

runner = BlockRunner("model/", device="cuda")          # the skeleton only: parameters on meta, buffers real
acts = runner.start(windows.split(8))                  # embeddings loaded; block 0's inputs for every batch
for i in range(runner.n_blocks):
    block = runner.load_block(i)                       # reads only block i's tensors
    runner.run(i, block, acts)                         # acts.hidden[b] <- block i's outputs, batch by batch
    runner.free_block(i)                               # its weights back to meta
logits = runner.head(acts.hidden[0])                   # final norm + LM head (loaded on first use)
```

- ``run(i, block, acts, outputs=False)`` runs the block without keeping its outputs (a statistics pass with hooks
  on the block's layers); change the loaded block's weights in place (``module.weight.copy_``) and run it again
  to hand on the outputs of the changed block (sequential calibration).
- ``start`` records, for every batch, the arguments each block is called with (attention mask, position ids,
  rotary ``position_embeddings``, …) by running the model's own forward with stand-ins for the blocks, so
  per-block masks (sliding-window layers) are right. Windows are plain token ids of one length, no padding.
- Activations stay on the device when two copies of them fit in half its free memory, else in pinned host memory
  (plain CPU tensors when the device is the CPU), each batch moved to the device while its block runs.
- Modules outside the blocks (embeddings, rotary tables, final norm, LM head) are loaded the first time they are
  called and kept; a LLaVA's vision tower, never called on text, is never read.

Works for the causal LMs (Llama/GQA, Mistral, Qwen2, GPT-2 ``Conv1D``), encoders (BERT) and LLaVA's language
model. A model whose blocks are not one stack called in order (an encoder-decoder) is refused with one line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from compress.errors import CompressError
from compress.runtime import half_attention, tf32

# attributes, on the module that holds the blocks, naming the norm that follows the last block
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def find_blocks(model: nn.Module, within: str = "") -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (``model.layers``, ``transformer.h``, ``encoder.layer``, …): the
    ModuleList holding the most linear-layer parameters (under the module named ``within``, if given)."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if within and not name.startswith(within + "."):
            continue
        if isinstance(m, nn.ModuleList) and len(m):
            n = sum(sub.weight.numel() for sub in m.modules() if is_linear(sub))
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise CompressError(f"{type(model).__name__}: no linear layers found inside a list of blocks; "
                            "whole-weight pruning needs nn.Linear (or GPT-2 Conv1D) layers")
    return best


def language_model_prefix(model: nn.Module) -> str:
    """The module name of a LLaVA's language model ('' for a plain text model): where its blocks are found."""
    if getattr(model.config, "model_type", None) != "llava":
        return ""
    for name, m in model.named_modules():
        if name.endswith("language_model"):
            return name
    raise CompressError(f"{type(model).__name__}: a LLaVA without a language_model module")


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init work) and their buffers
    real, on the CPU: buffers such as rotary ``inv_freq`` are computed in ``__init__`` and are in no checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, kind: str = "auto") -> nn.Module:
    """The model of a Hugging Face folder with no weights (meta parameters, real buffers), in eval mode, no cache."""
    from compress.io.models import hf_quiet, model_class

    cfg, cls, _ = model_class(path, kind)
    with hf_quiet(), parameters_on_meta():
        build = getattr(cls, "from_config", None) or cls._from_config  # Auto classes, or a model class (LLaVA)
        model = build(cfg, dtype=dtype)
    for c in (model.config, getattr(model.config, "text_config", None)):
        if c is not None and hasattr(c, "use_cache"):
            c.use_cache = False
    return model.eval()


# (model's prefix, checkpoint's): transformers 5 names LLaVA's modules model.language_model.* and so on, but
# writes the layout older versions used (and most published LLaVA checkpoints have)
LEGACY_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def checkpoint_name(name: str, ck, prefix: str) -> str | None:
    """The checkpoint's name for the model's tensor ``name`` (the loaded model may add or drop ``prefix``, or name
    a LLaVA's parts as the legacy layout does not)."""
    cands = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
    cands += [old + name[len(new):] for new, old in LEGACY_PREFIXES if name.startswith(new)]
    for cand in cands:
        if cand in ck:
            return cand
    return None


class _Stop(Exception):
    """Raised by the last block's stand-in: the forward has recorded all it needs."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` during ``start``: records its call's arguments, passes the hidden states on."""

    def __init__(self, index: int, last: bool, calls: dict, block: nn.Module):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls
        if hasattr(block, "attention_type"):  # what some models' loops read off each block
            self.attention_type = block.attention_type

    def forward(self, hidden, *args, **kwargs):
        self.calls[self.index] = (hidden if self.index == 0 else None, args, kwargs)
        if self.last:
            raise _Stop
        return hidden


@dataclass
class Activations:
    """The hidden states entering the next block, one tensor per batch (on the device or in host memory), and
    the arguments each block takes with each batch (``calls[b][i] = (args, kwargs)``)."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    on_device: bool
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


class BlockRunner:
    """One model, run block by block from its checkpoint files (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, kind: str = "auto", model: nn.Module | None = None):
        from compress.io.reader import open_checkpoint

        self.path = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        self.model = model if model is not None else empty_model(self.path, dtype, kind)
        cfg = self.model.config
        self.model_type = getattr(cfg, "model_type", type(self.model).__name__)
        if getattr(cfg, "is_encoder_decoder", False):
            raise CompressError(f"{self.path}: model type '{self.model_type}' is an encoder-decoder; block-wise "
                                "execution runs one stack of blocks (decoder-only LMs, encoders, LLaVA's language "
                                "model)")
        self.prefix, self.blocks = find_blocks(self.model, language_model_prefix(self.model))
        self.n_blocks = len(self.blocks)
        self.ck = open_checkpoint(self.path)
        self.base_prefix = getattr(self.model, "base_model_prefix", "") or ""
        # tied parameters (lm_head / embeddings) are one object under several names: any name found in the file
        self._names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        self._owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for mod in self.model.modules():
            for pname, p in mod._parameters.items():
                if p is not None:
                    self._owners.setdefault(id(p), []).append((mod, pname))
        inside = {id(m) for m in self.blocks.modules()}
        self._hooks = [m.register_forward_pre_hook(self._onload) for m in self.model.modules()
                       if id(m) not in inside and (m._parameters or m._buffers)]
        self._qualified = {id(m): n for n, m in self.model.named_modules()}
        self._loaded: set[int] = set()

    # -- tensors -----------------------------------------------------------------------------------------------
    def tensor_name(self, name: str) -> str:
        """The checkpoint's name for the model's parameter ``name`` (or a tied alias); one line when missing."""
        p = self.model.get_parameter(name)
        for alias in [name, *self._names.get(id(p), [])]:
            found = checkpoint_name(alias, self.ck, self.base_prefix)
            if found is not None:
                return found
        raise CompressError(f"{self.path}: weight '{name}' of the model is not in the checkpoint")

    def block_tensor_names(self, i: int) -> dict[str, str]:
        """{model parameter name: checkpoint name} of block ``i``."""
        head = f"{self.prefix}.{i}."
        return {head + n: self.tensor_name(head + n) for n, _ in self.blocks[i].named_parameters()}

    def _set(self, p: nn.Parameter, t: torch.Tensor) -> None:
        new = nn.Parameter(t, requires_grad=False)
        for mod, pname in self._owners.get(id(p), []):
            mod._parameters[pname] = new
        self._owners[id(new)] = self._owners.pop(id(p), [])
        self._names[id(new)] = self._names.pop(id(p), [])

    def _materialize(self, module: nn.Module, qualified: str) -> None:
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                name = f"{qualified}.{pname}" if qualified else pname
                self._set(p, self.ck.get(self.tensor_name(name), device=self.device, dtype=self.dtype))
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != self.device:
                module._buffers[bname] = b.to(self.device)

    def _onload(self, module: nn.Module, _args) -> None:
        if id(module) not in self._loaded:
            self._materialize(module, self._qualified[id(module)])
            self._loaded.add(id(module))

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its weights read from the checkpoint onto the device (``self.dtype``)."""
        block = self.blocks[i]
        for name, mod in block.named_modules():
            self._materialize(mod, f"{self.prefix}.{i}" + (f".{name}" if name else ""))
        return block

    def free_block(self, i: int) -> None:
        """Block ``i``'s weights back to the meta device (their memory freed)."""
        for mod in self.blocks[i].modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    self._set(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        release_host_memory()

    # -- running -----------------------------------------------------------------------------------------------
    def _placement(self, batches: list[torch.Tensor]) -> bool:
        """Whether the activations stay on the device (two copies of them in half its free memory)."""
        hidden = getattr(self.model.config, "hidden_size", None) or getattr(
            getattr(self.model.config, "text_config", None), "hidden_size", 0)
        need = 2 * sum(b.numel() for b in batches) * hidden * self.dtype.itemsize
        free = _free_bytes(self.device)
        return free is None or need <= free // 2

    @torch.no_grad()
    def start(self, batches: Iterable[torch.Tensor]) -> Activations:
        """Embed each batch of token ids ([b, T]) and record every block's call arguments (see the docstring)."""
        batches = list(batches)
        on_device = self._placement(batches)
        hidden: list[torch.Tensor] = []
        calls: list[list[tuple[tuple, dict]]] = []
        by_shape: dict[tuple, list] = {}
        real = list(self.blocks)
        rec: dict[int, tuple] = {}
        for i, block in enumerate(real):
            self.blocks[i] = _Recorder(i, i == self.n_blocks - 1, rec, block)
        try:
            for batch in batches:
                rec.clear()
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _Stop:
                    pass
                except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
                    raise CompressError(f"{self.path}: model type '{self.model_type}' cannot be run block by block "
                                        f"({(str(e).splitlines() or [type(e).__name__])[0][:160]})") from None
                if sorted(rec) != list(range(self.n_blocks)):
                    raise CompressError(f"{self.path}: model type '{self.model_type}' does not call its "
                                        f"{self.n_blocks} blocks ('{self.prefix}') one after the other; it cannot "
                                        "be run block by block")
                x = rec[0][0]
                hidden.append(x if on_device else _to_host(x))
                # masks and positions depend on the batch's shape only (plain windows, no padding): shared
                key = tuple(batch.shape)
                if key not in by_shape:
                    by_shape[key] = [(rec[i][1], rec[i][2]) for i in range(self.n_blocks)]
                calls.append(by_shape[key])
        finally:
            for i, block in enumerate(real):
                self.blocks[i] = block
        return Activations(hidden, calls, on_device)

    @torch.no_grad()
    def run(self, i: int, block: nn.Module, acts: Activations, outputs: bool = True) -> None:
        """Run block ``i`` (loaded) over every batch; with ``outputs``, its outputs replace ``acts.hidden``."""
        for b, x in enumerate(acts.hidden):
            args, kwargs = acts.calls[b][i]
            with tf32(True), half_attention():
                out = block(x.to(self.device, non_blocking=True), *args, **kwargs)
            if isinstance(out, tuple):
                out = out[0]
            if outputs:
                acts.hidden[b] = out if acts.on_device else _to_host(out)

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the output embeddings (LM head) applied to the last block's ``hidden`` states; an
        encoder without either returns them unchanged."""
        parent = self.model.get_submodule(self.prefix.rpartition(".")[0]) if "." in self.prefix else self.model
        x = hidden.to(self.device)
        for attr in FINAL_NORMS:
            norm = getattr(parent, attr, None)
            if isinstance(norm, nn.Module):
                x = norm(x)
                break
        lm_head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return lm_head(x) if lm_head is not None else x

    def blockwise(self):
        """Yield ``(i, block)`` for every block, loaded; the block is freed when the caller asks for the next."""
        for i in range(self.n_blocks):
            block = self.load_block(i)
            try:
                yield i, block
            finally:
                self.free_block(i)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.ck.close()

    def __enter__(self) -> "BlockRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def release_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). A block's
    tensors of many sizes, freed, otherwise stay in the heap as holes the next block's sizes do not fit: measured
    on a 1024-wide Llama, RSS grew by ~30 MB per block without it and stayed flat with it."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=False)


def load_block_from(runner: BlockRunner, i: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Block ``i`` of ``runner`` with its weights from ``tensors`` ({parameter name inside the block: tensor}, such
    as a host copy kept from an earlier ``load_block``) moved to the device in the runner's dtype, not read from
    the checkpoint; ``free_block`` frees it as usual."""
    block = runner.blocks[i]
    for name, t in tensors.items():
        runner._set(block.get_parameter(name), t.to(runner.device, runner.dtype, non_blocking=True, copy=True))
    return block
