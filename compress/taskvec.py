"""Task vectors τ = θ_ft − θ_base (Ilharco et al. 2023), lazy and per tensor.

A ``TaskVector`` is a linear combination Σ c_i·source_i of sources that each give one tensor's delta on demand:
a pair of checkpoints (``CheckpointDelta``), a PEFT LoRA adapter (``compress.io.lora.LoraAdapter``) or a compact
delta file. ``+``, ``-`` and scalar ``*`` build new combinations without reading anything; ``get(name)`` reads
only the tensors that one name needs. Deltas are computed in float32 (float64 when an input is float64), so
bf16/fp16 inputs lose nothing when subtracted.

Which tensors take part is decided in one place, ``tensor_rule``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Protocol

import torch

from compress.errors import CompressError
from compress.io.reader import Checkpoint, TensorInfo, is_peft_adapter, open_checkpoint, quote_name
from compress.runtime import compute_dtype

# Rows of these tensors are vocabulary entries; a fine-tune that added tokens changes only their first dim.
VOCAB_TENSOR_RE = re.compile(r"(embed_tokens|word_embeddings|wte|lm_head|embed_out|shared|output)\.weight$")

Rule = Literal["delta", "carry"]


def tensor_rule(name: str, base: TensorInfo | None, ft: TensorInfo | None, *, base_path: object = "base",
                ft_path: object = "finetuned", extra: str = "error", vocab: str = "carry") -> Rule:
    """How a tensor takes part in a task vector. The one place where tensors are skipped:

    ======================================  ==============================================================
    case                                    rule
    ======================================  ==============================================================
    float tensor, same shape on both sides  ``delta``: τ = θ_ft − θ_base
    non-float tensor (int/bool buffers)     ``carry``: not a parameter; taken whole from the fine-tuned side
    vocab tensor whose first dim differs    ``carry`` when ``vocab='carry'`` (fine-tune added tokens),
    (embeddings, lm_head)                   else an error naming the tensor
    any other shape mismatch                error naming the tensor and both shapes
    only in the fine-tuned checkpoint       ``carry`` when ``extra='carry'`` (e.g. a new task head), else error
    only in the base checkpoint             error: the fine-tuned model would lose it
    ======================================  ==============================================================
    """
    if ft is None:
        raise CompressError(f"tensor '{name}' is in the base ({base_path}) but missing from {ft_path}")
    if base is None:
        if extra == "carry":
            return "carry"
        raise CompressError(f"tensor '{name}' is in {ft_path} but missing from the base ({base_path}); "
                            "pass --extra carry to copy such tensors (e.g. a new task head) whole")
    if not (base.is_float and ft.is_float):
        if base.shape != ft.shape:
            raise CompressError(f"tensor '{name}' has shape {list(ft.shape)} in {ft_path} "
                                f"but {list(base.shape)} in the base ({base_path})")
        return "carry"
    if base.shape != ft.shape:
        vocab_like = (VOCAB_TENSOR_RE.search(name) and len(base.shape) == len(ft.shape)
                      and base.shape[1:] == ft.shape[1:])
        if vocab_like and vocab == "carry":
            return "carry"
        hint = " (vocabulary sizes differ; pass --vocab carry to take it whole from the fine-tuned model)" \
            if vocab_like else ""
        raise CompressError(f"tensor '{name}' has shape {list(ft.shape)} in {ft_path} "
                            f"but {list(base.shape)} in the base ({base_path}){hint}")
    return "delta"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_same_architecture(base: Checkpoint, ft: Checkpoint) -> None:
    a, b = base.config or {}, ft.config or {}
    if a.get("model_type") and b.get("model_type") and a["model_type"] != b["model_type"]:
        raise CompressError(f"architectures differ: base {base.path} is '{a['model_type']}', "
                            f"{ft.path} is '{b['model_type']}'")


class DeltaSource(Protocol):
    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def get(self, name: str, *, device=None, dtype=None) -> torch.Tensor: ...


class CheckpointDelta:
    """θ_ft − θ_base over two lazily opened checkpoints; every tensor checked by ``tensor_rule`` up front."""

    def __init__(self, base: Checkpoint, ft: Checkpoint, *, extra: str = "error", vocab: str = "carry"):
        check_same_architecture(base, ft)
        self.base, self.ft = base, ft
        self._delta: list[str] = []
        self._carry: list[str] = []
        names = ft.names() + [n for n in base.names() if n not in ft]
        for name in names:
            rule = tensor_rule(name, base.info(name) if name in base else None,
                               ft.info(name) if name in ft else None,
                               base_path=base.path, ft_path=ft.path, extra=extra, vocab=vocab)
            (self._delta if rule == "delta" else self._carry).append(name)

    def names(self) -> list[str]:
        return list(self._delta)

    def carried(self) -> list[str]:
        return list(self._carry)

    def info(self, name: str) -> TensorInfo:
        return self.ft.info(name)

    def get(self, name: str, *, device=None, dtype=None) -> torch.Tensor:
        ct = dtype or compute_dtype(self.base.info(name).dtype, self.ft.info(name).dtype)
        return self.ft.get(name, device=device, dtype=ct) - self.base.get(name, device=device, dtype=ct)

    def full(self, name: str, *, device=None) -> torch.Tensor:
        return self.ft.get(name, device=device)


class TaskVector:
    """Σ c_i · source_i, evaluated one tensor at a time."""

    def __init__(self, terms: list[tuple[float, DeltaSource]]):
        self.terms = list(terms)
        self._name_sets: list[frozenset[str]] | None = None

    def _has(self) -> list[frozenset[str]]:
        if self._name_sets is None:
            self._name_sets = [frozenset(s.names()) for _, s in self.terms]
        return self._name_sets

    @classmethod
    def from_paths(cls, base: str | os.PathLike | Checkpoint, finetuned: str | os.PathLike, *,
                   extra: str = "error", vocab: str = "carry") -> "TaskVector":
        """τ from a base and a fine-tuned checkpoint, or from a base and a PEFT LoRA adapter folder."""
        base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        if is_peft_adapter(finetuned):
            from compress.io.lora import LoraAdapter

            return cls([(1.0, LoraAdapter(Path(finetuned), base_ckpt))])
        return cls([(1.0, CheckpointDelta(base_ckpt, open_checkpoint(finetuned), extra=extra, vocab=vocab))])

    # -- algebra (nothing is read) -------------------------------------------------------------------
    def __add__(self, other: "TaskVector") -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        return TaskVector(self.terms + other.terms)

    def __mul__(self, c: float) -> "TaskVector":
        if not isinstance(c, (int, float)):
            return NotImplemented
        return TaskVector([(float(c) * w, s) for w, s in self.terms])

    __rmul__ = __mul__

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    # -- reading -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensors with a delta, in the order of the first source that names them."""
        return list(dict.fromkeys(n for _, s in self.terms for n in s.names()))

    def carried(self) -> dict[str, DeltaSource]:
        """Tensors taken whole from a fine-tuned side (see ``tensor_rule``); the first source wins."""
        out: dict[str, DeltaSource] = {}
        for _, s in self.terms:
            for n in getattr(s, "carried", lambda: [])():
                out.setdefault(n, s)
        return out

    def info(self, name: str) -> TensorInfo:
        for (_, s), names in zip(self.terms, self._has()):
            if name in names:
                return s.info(name)
        raise CompressError(f"task vector has no tensor '{name}'")

    def get(self, name: str, *, device=None) -> torch.Tensor:
        total = None
        for (c, s), names in zip(self.terms, self._has()):
            if name not in names:
                continue
            d = s.get(name, device=device)
            total = c * d if total is None else total + c * d
        if total is None:
            raise CompressError(f"task vector has no tensor '{name}'")
        return total

    # -- writing -------------------------------------------------------------------------------------
    def apply(self, base: str | os.PathLike | Checkpoint, out: str | os.PathLike, *, scale: float = 1.0,
              device: str = "cpu", dtype: torch.dtype | None = None, shard_size: int | str = "5GB",
              overwrite: bool = False, aux_from: str | os.PathLike | None = None, quiet: bool | None = None,
              card: dict | None = None) -> Path:
        """Write θ_base + scale·τ as a Hugging Face folder (carried tensors taken whole from their source)."""
        from compress.io.writer import write_folder
        from compress.progress import track

        base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        delta_names, carried = set(self.names()), self.carried()
        order = base_ckpt.names() + [n for n in carried if n not in base_ckpt]
        for name in order:
            if name in carried or name not in delta_names:
                continue
            ours, theirs = self.info(name).dtype, base_ckpt.info(name).dtype
            if ours.is_floating_point != theirs.is_floating_point:
                # a delta file's table is the stranger's word: an int buffer must not take a float delta
                raise CompressError(f"tensor {quote_name(name)} is {_dtype_name(ours)} in the task vector but "
                                    f"{_dtype_name(theirs)} in the base {base_ckpt.path}; a delta only applies "
                                    "between float tensors")

        def tensors():
            for name in track(order, "apply", quiet=quiet):
                if name in carried:
                    t = carried[name].full(name, device=device)
                elif name in delta_names:
                    b = base_ckpt.get(name, device=device)
                    t = (b.to(compute_dtype(b.dtype)) + scale * self.get(name, device=device)).to(b.dtype)
                else:
                    t = base_ckpt.get(name, device=device)
                yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

        if card is None:
            # a checkpoint pair names its fine-tuned side; adapters and delta files name themselves
            sources = {f"task vector {i + 1} (×{c:g})": str(getattr(getattr(s, "ft", s), "path", "?"))
                       for i, (c, s) in enumerate(self.terms)}
            card = {"title": "Task-vector model", "method": "task arithmetic, θ_base + scale·Σ c_i τ_i",
                    "inputs": {"base": str(base_ckpt.path), **sources}, "params": {"scale": scale}}
        return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(order), shard_size=shard_size,
                            aux_from=aux_from if aux_from is not None else base_ckpt.root, card=card)
