"""Walks checkpoints tensor by tensor and applies a merge method (DESIGN principle 1); knows no method's maths.

Inputs are full checkpoints or PEFT LoRA adapters (a task vector of the base). Each output tensor needs the base
tensor and one tensor per model, so peak memory is about (models + 2) × the largest tensor in float32. A global
top-k (TIES as in its paper) adds two streaming passes that keep only 65,536-bin histograms per model.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from compress.config import MergeConfig
from compress.errors import CompressError
from compress.heads.select import resolve_protect
from compress.io.prefetch import walk
from compress.io.reader import Checkpoint, all_finite, is_peft_adapter, open_checkpoint
from compress.io.writer import check_finite_output
from compress.merge.methods import (
    METHODS,
    REQUIRED,
    WEIGHT_METHODS,
    Method,
    check_config,
    method_preset,
    task_arithmetic2,
    task_vector_merge,
    weight_method,
)
from compress.merge.recipe import layer_position, resolve_setting
from compress.merge.subspace import SUBSPACE_METHODS, subspace_merge
from compress.progress import console, track
from compress.runtime import resolve_device, torch_dtype
from compress.sparsify.masks import seeded_generator
from compress.sparsify.topk import GlobalThreshold
from compress.taskvec import VOCAB_TENSOR_RE, check_same_architecture

DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "t": 0.5}


def _widens_exactly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is a ``dst`` value, so arithmetic on ``src`` promoted to ``dst`` is arithmetic on the
    converted tensor."""
    return (src, dst) in {(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                          (torch.bfloat16, torch.float64), (torch.float16, torch.float64),
                          (torch.float32, torch.float64)}


class _Input:
    """One model to merge: full tensors from a checkpoint, or base + ΔW from a LoRA adapter."""

    def __init__(self, path: Path, base: Optional[Checkpoint], opener=None):
        self.path = path
        self.adapter = None
        if opener is None and is_peft_adapter(path):
            if base is None:
                raise CompressError(f"{path} is a LoRA adapter; merging it needs --base")
            from compress.io.lora import LoraAdapter

            self.adapter = LoraAdapter(path, base)
            self.ckpt = None
        else:
            self.ckpt = (opener or open_checkpoint)(path)
            if base is not None:
                check_same_architecture(base, self.ckpt)

    def rows(self, name: str) -> Optional[int]:
        return None if self.ckpt is None else self.ckpt.info(name).shape[0]

    def delta(self, name: str, base: torch.Tensor, device) -> Optional[torch.Tensor]:
        """θ_i − θ_base over the base's rows (None: an adapter that leaves this tensor alone)."""
        if self.adapter is not None:
            return self.adapter.get(name, device=device, dtype=base.dtype) if name in self.adapter else None
        return self.full(name, device, base.dtype, like=base) - base

    def full(self, name: str, device, dtype, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full tensor; cut to ``like``'s rows when this model has a larger vocabulary."""
        return self.stored(name, device, like).to(dtype=dtype)

    def stored(self, name: str, device, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full tensor in its stored dtype, cut to ``like``'s rows."""
        # inputs are checked for NaN/Inf through the merged tensor (one check instead of one per input)
        t = self.ckpt.get(name, check_finite=False)
        if like is not None and t.dim() and t.shape[0] > like.shape[0]:
            t = t[: like.shape[0]]
        return t.to(device=device)

    def weight(self, name: str, base: torch.Tensor, device) -> torch.Tensor:
        """The full tensor over the base's rows (base + ΔW for an adapter)."""
        if self.ckpt is not None:
            return self.full(name, device, base.dtype, like=base)
        d = self.delta(name, base, device)
        return base if d is None else base + d


@dataclass
class MergeSummary:
    out: Optional[Path]
    tensors: int = 0
    params: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    dropped_rows: dict[str, int] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds else 0.0


def _check_names(ref: Checkpoint, ref_label: str, inputs: list[_Input], vocab: str) -> dict[str, int]:
    """Every full-checkpoint input has the reference's tensors with the same shapes; vocabulary tensors follow
    ``vocab``. Returns {tensor: output rows} for vocabulary tensors whose row counts differ."""
    rows: dict[str, int] = {}
    for inp in inputs:
        if inp.ckpt is None:
            continue
        missing = [n for n in ref.names() if n not in inp.ckpt]
        extra = [n for n in inp.ckpt.names() if n not in ref]
        if missing or extra:
            n, where = (missing[0], f"missing from {inp.path}") if missing else (extra[0], f"only in {inp.path}")
            raise CompressError(f"models differ in architecture: tensor '{n}' is {where} ({ref_label} is "
                                f"{ref.path}; {len(missing)} missing, {len(extra)} extra)")
        for name in ref.names():
            a, b = ref.info(name), inp.ckpt.info(name)
            if a.shape == b.shape:
                continue
            vocab_like = VOCAB_TENSOR_RE.search(name) and a.shape[1:] == b.shape[1:] and a.shape
            if not vocab_like:
                raise CompressError(f"models differ in architecture: tensor '{name}' is {list(b.shape)} in "
                                    f"{inp.path} but {list(a.shape)} in {ref_label} {ref.path}")
            if vocab == "error":
                raise CompressError(f"vocabulary sizes differ: '{name}' has {b.shape[0]} rows in {inp.path} but "
                                    f"{a.shape[0]} in {ref_label}; pass --vocab base (keep the base's rows, drop "
                                    "the others) or --vocab union (keep every row)")
            if vocab == "base" and b.shape[0] < a.shape[0]:
                raise CompressError(f"--vocab base: '{name}' has {b.shape[0]} rows in {inp.path}, fewer than the "
                                    f"{a.shape[0]} of {ref_label}")
            rows[name] = max(rows.get(name, a.shape[0]), b.shape[0])
    return rows


class Merger:
    """Plans a merge from a ``MergeConfig`` and writes it, or yields merged tensors (``tensors()``).

    ``opener`` (default ``open_checkpoint``) turns the config's paths into checkpoints: the slice planner passes
    renamed views (compress.merge.slices)."""

    def __init__(self, cfg: MergeConfig, opener=None):
        check_config(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.base = (opener or open_checkpoint)(cfg.base) if cfg.base is not None else None
        # reads of the next tensors overlap the maths of this one (``_walk``); None: the largest tensor's inputs
        self.read_ahead_bytes: Optional[int] = None
        self._stack: Optional[torch.Tensor] = None  # reused by ``_stack_buffer``
        # ``task_arithmetic2``'s threads: all of torch's (its reads are mappings, nothing for a reader thread to do)
        self.fused_threads: Optional[int] = None
        # ``write`` only: two output buffers used in turn (tensor i is written while i + 1 is merged)
        self._outputs: Optional[list[torch.Tensor]] = None
        self.inputs = [_Input(m.model, self.base, opener) for m in cfg.models]
        if self.base is None and self.inputs[0].ckpt is None:
            raise CompressError("linear merge without a base: the first model must be a full checkpoint")
        self.ref = self.base if self.base is not None else self.inputs[0].ckpt
        self.ref_label = "the base" if self.base is not None else "the first model"
        self.vocab_rows = _check_names(self.ref, self.ref_label, self.inputs, cfg.vocab)
        self.method: Optional[Method] = None
        self.weight_method = weight_method(cfg.method) if cfg.method in WEIGHT_METHODS else None
        if cfg.method in METHODS:
            normalize = cfg.parameters.get("normalize")
            if normalize is not None and not isinstance(normalize, bool):
                raise CompressError("parameter 'normalize' must be true or false")
            self.method = method_preset(cfg.method, cfg.variant, normalize=normalize, **cfg.overrides())
        config = self.ref.config or {}
        self.num_layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
        self.out_dtype = torch_dtype(cfg.dtype)
        # mergekit merges in its inputs' own dtype unless the recipe names one; the native default is float32 (and
        # the only one for the subspace merges and AdaMerging, which mergekit lacks: SVDs and gradients want it)
        mk = cfg.variant == "mergekit" and (cfg.method in METHODS or cfg.method in WEIGHT_METHODS)
        self.compute_dtype = torch_dtype(cfg.compute_dtype) or (None if mk else torch.float32)
        self._global: Optional[list[GlobalThreshold]] = None
        self._ada = None  # adamerging's learned coefficients (``prepare``)
        self.protect = resolve_protect(cfg, self.ref.root if self.ref.root is not None else self.ref.path)

    def _protected(self, name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.protect:
            return None
        keep = self.protect.keep(name, like.shape, device=like.device)
        return keep if keep is not None and bool(keep.any()) else None

    # -- parameters ------------------------------------------------------------------------------------
    def position(self, name: str) -> float:
        """mergekit's t of a tensor, for gradients."""
        return layer_position(name, self.num_layers)

    def param(self, key: str, name: str, model: Optional[int] = None) -> Optional[float]:
        v = self.setting(key, name, model, DEFAULTS.get(key))
        return None if v is None else float(v)  # None: the method's own default (compress.merge.subspace)

    def setting(self, key: str, name: str, model: Optional[int] = None, default=None):
        """The value of parameter ``key`` for tensor ``name`` (the model's own first, then the shared one)."""
        t = self.position(name)
        scopes = ([self.cfg.models[model].parameters] if model is not None else []) + [self.cfg.parameters]
        for scope in scopes:
            if key in scope:
                v = resolve_setting(scope[key], name, t)
                if v is not None:
                    return v
        return default

    def _merged_names(self) -> list[str]:
        return [n for n in self.ref.names() if self.ref.info(n).is_float]

    # -- global top-k: two streaming passes ------------------------------------------------------------
    def _uses_global_topk(self) -> bool:
        m = self.method
        return m is not None and m.sparsify == "magnitude" and m.topk == "global"

    def _global_thresholds(self, quiet) -> list[GlobalThreshold]:
        for i, mc in enumerate(self.cfg.models):
            for scope in (mc.parameters, self.cfg.parameters):
                if "density" in scope and not isinstance(scope["density"], (int, float)):
                    raise CompressError("topk: global needs one density per model (no gradients or filters); "
                                        "use topk: per_tensor for per-layer densities")
        g = [GlobalThreshold(self.param("density", "", i)) for i in range(len(self.inputs))]
        names = self._merged_names()
        from compress.merge.methods import protected_kept

        x = self.protect.sparsity if self.protect else None
        for pass_name, fn in (("global top-k 1/2", GlobalThreshold.add), ("global top-k 2/2", GlobalThreshold.refine)):
            for name in self._walk(names, pass_name, quiet):
                base = self._base_tensor(name)
                pm = self._protected(name, base)
                kp = None if pm is None else protected_kept(int(pm.sum()), x)
                for i, inp in enumerate(self.inputs):
                    d = inp.delta(name, base, self.device)
                    fn(g[i], d if d is not None else torch.zeros_like(base), pm, kp)
        return g

    # -- one tensor ------------------------------------------------------------------------------------
    def _sources(self, name: str) -> list[Checkpoint]:
        """The checkpoints ``merge_tensor`` reads ``name`` from."""
        if not self.ref.info(name).is_float:
            return [self.ref]
        return list(dict.fromkeys(c for c in [self.base] + [i.ckpt for i in self.inputs] if c is not None))

    def _walk(self, names: list[str], label: str, quiet):
        """``names`` in order (with a progress bar), the reads of the coming tensors started ahead on threads."""
        return track(walk(names, self._sources, device=self.device, max_bytes=self.read_ahead_bytes), label,
                     total=len(names), quiet=quiet)

    def _dtype(self, name: str) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        stored = [ck.info(name).dtype for ck in [self.base] + [i.ckpt for i in self.inputs]
                  if ck is not None and name in ck]
        return functools.reduce(torch.promote_types, stored)

    def _base_tensor(self, name: str) -> torch.Tensor:
        if self.base is not None:
            return self.base.get(name, check_finite=False).to(device=self.device, dtype=self._dtype(name))
        return self.inputs[0].full(name, self.device, self._dtype(name))

    def _stack_buffer(self, base: torch.Tensor) -> torch.Tensor:
        """An uninitialised [n_models, *shape] buffer, the same memory from tensor to tensor: a fresh one each time
        costs a page fault per 4 KiB, about a fifth of a task-arithmetic merge on the CPU."""
        n, numel = len(self.inputs), base.numel()
        buf = self._stack
        if buf is None or buf.numel() < n * numel or buf.dtype != base.dtype or buf.device != base.device:
            largest = max(self.ref.info(m).numel for m in self._merged_names())
            self._stack = buf = None  # the old one goes before the new one comes
            buf = self._stack = torch.empty(n * max(largest, numel), dtype=base.dtype, device=base.device)
        return buf[: n * numel].view((n,) + tuple(base.shape))

    def _stacked_deltas(self, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
        """[n_models, *shape] deltas written straight into one buffer (None: no model changes this tensor)."""
        rows: list[Optional[torch.Tensor]] = []
        stacked = None
        for i, inp in enumerate(self.inputs):
            if inp.ckpt is not None:
                if stacked is None:
                    stacked = self._stack_buffer(base)
                t = inp.stored(name, self.device, like=base)
                if t.dtype != base.dtype and not _widens_exactly(t.dtype, base.dtype):
                    t = t.to(base.dtype)
                # bf16/f16 minus f32 straight into the buffer: no converted copy of the input
                torch.sub(t, base, out=stacked[i])
                rows.append(None)
            else:
                rows.append(inp.delta(name, base, self.device))
                if rows[-1] is not None and stacked is None:
                    stacked = self._stack_buffer(base)
        if stacked is not None:
            for i, d in enumerate(rows):
                if self.inputs[i].ckpt is None and d is not None:
                    stacked[i].copy_(d)
                elif self.inputs[i].ckpt is None:
                    stacked[i].zero_()
        return stacked

    def merge_tensor(self, name: str) -> torch.Tensor:
        info = self.ref.info(name)
        if not info.is_float:
            return self.ref.get(name, device=self.device, check_finite=False)
        base = self._base_tensor(name)
        n = len(self.inputs)
        weights = [self.param("weight", name, i) for i in range(n)]
        finite = False  # known to be
        if self.weight_method is not None:
            out = self._weight_merge(name, base, weights)
        elif self.cfg.method == "adamerging":
            stacked = self._stacked_deltas(name, base)
            out = base if stacked is None or name not in self._ada.groups else task_vector_merge(
                stacked, self._ada.weights(name), METHODS["task_arithmetic"], inplace=True).add_(base)
        elif self.cfg.method in SUBSPACE_METHODS:
            stacked = self._stacked_deltas(name, base)
            out = base if stacked is None else subspace_merge(
                self.cfg.method, name, stacked, weights, lam=self.param("lambda", name),
                **{k: self.param(k, name) for k in SUBSPACE_METHODS[self.cfg.method].params}).add_(base)
        elif (fused := self._task_arithmetic2(name, base, weights)) is not None:
            out, finite = fused
        else:
            stacked = self._stacked_deltas(name, base)
            if stacked is None:
                out = base
            else:
                keep = None
                pm = self._protected(name, base)
                if self._global is not None:
                    keep = [g.mask(stacked[i], pm) for i, g in enumerate(self._global)]
                out = task_vector_merge(
                    stacked, weights, self.method,
                    density=[self.param("density", name, i) for i in range(n)],
                    gamma=[self.param("gamma", name, i) for i in range(n)],
                    epsilon=[self.param("epsilon", name, i) for i in range(n)],
                    lam=self.param("lambda", name), keep=keep,
                    generator=seeded_generator(self.cfg.seed, name), inplace=True, protect=pm,
                    protect_sparsity=self.protect.sparsity if self.protect else None).add_(base)
        if self._stack is not None and out.untyped_storage().data_ptr() == self._stack.untyped_storage().data_ptr():
            out = out.clone()  # the buffer is the next tensor's
        shape = out.shape
        out = self._extra_rows(name, out)
        if not (finite and out.shape == shape) and not all_finite(out):
            self._name_nonfinite(name)
        # mergekit writes what a method returns when its recipe names no dtype (ramplus_tl and arcee_fusion
        # return float32 from bf16 inputs); the native schema writes the stored dtype
        written = out.to(self.out_dtype or (out.dtype if self.compute_dtype is None else info.dtype))
        if written.dtype != out.dtype:
            check_finite_output(name, written)  # a finite float32 result can overflow a narrower dtype
        return written

    def _task_arithmetic2(self, name: str, base: torch.Tensor, weights: list[float]):
        """(merged, all finite) by ``task_arithmetic2``'s one fused pass, for a plain weighted sum of two full
        bf16 models on the CPU; None for everything else (the stacked-delta path then gives the same bits)."""
        m = self.method
        if (m is None or m.sparsify is not None or m.consensus is not None or m.normalize or len(self.inputs) != 2
                or self._global is not None or self.cfg.method == "adamerging"
                or any(i.ckpt is None for i in self.inputs) or self._protected(name, base) is not None):
            return None
        x0, x1 = (i.stored(name, self.device, like=base) for i in self.inputs)
        out = None
        if self._outputs is not None:  # the writer is done with the tensor before last: its buffer is free
            out = self._outputs[0]
            if out.numel() < base.numel():
                largest = max(self.ref.info(t).numel for t in self._merged_names())
                out = self._outputs[0] = torch.empty(largest, dtype=torch.bfloat16)
        fused = task_arithmetic2(base, x0, x1, weights[0], weights[1], lam=self.param("lambda", name),
                                 threads=self.fused_threads, out=out)
        if fused is not None and out is not None and fused[0].data_ptr() == out.data_ptr():
            self._outputs.reverse()  # the writer's now; the other one is free for the next tensor
        return fused

    def _weight_merge(self, name: str, base: torch.Tensor, weights: list[float]) -> torch.Tensor:
        m, dtype = self.weight_method, base.dtype
        if m.float32:
            base = base.float()
        stacked = torch.stack([inp.weight(name, base, self.device).to(base.dtype) for inp in self.inputs])
        params = {k: self.setting(k, name, None, None if v is REQUIRED else v) for k, v in m.params.items()}
        for k in m.model_params:
            params[k] = [self.setting(k, name, i) for i in range(len(self.inputs))]
        params["generator"] = seeded_generator(self.cfg.seed, name)
        out = m.merge(base if m.base in ("required", "optional") and self.base is not None else None, stacked,
                      weights, params)
        return out.to(dtype) if m.float32 else out

    def _name_nonfinite(self, name: str) -> None:
        """The merged tensor has NaN/Inf: name the input that has them, else say the merge overflowed."""
        for ck in [self.base] + [i.ckpt for i in self.inputs]:
            if ck is not None and name in ck:
                ck.get(name)  # raises "<file>: tensor '<name>' contains NaN or Inf"
        for inp in self.inputs:
            if inp.adapter is not None and name in inp.adapter and not all_finite(inp.adapter.get(name)):
                raise CompressError(f"{inp.path}: the LoRA delta of '{name}' contains NaN or Inf")
        raise CompressError(f"merging tensor '{name}' gave NaN or Inf (weights or λ too large for the dtype?)")

    def _extra_rows(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        """--vocab union: rows past the base's are the mean of the models that have them."""
        rows = self.vocab_rows.get(name)
        if rows is None or self.cfg.vocab != "union" or rows <= merged.shape[0]:
            return merged
        extra = torch.zeros((rows - merged.shape[0],) + tuple(merged.shape[1:]), device=merged.device)
        count = torch.zeros(rows - merged.shape[0], device=merged.device)
        for inp in self.inputs:
            r = inp.rows(name) or 0
            if r > merged.shape[0]:
                part = inp.full(name, self.device, torch.float32)[merged.shape[0]:]
                extra[: part.shape[0]] += part
                count[: part.shape[0]] += 1
        extra /= count.clamp(min=1).reshape((-1,) + (1,) * (extra.dim() - 1))
        return torch.cat([merged, extra.to(merged.dtype)])

    # -- the whole model -------------------------------------------------------------------------------
    def prepare(self, quiet: Optional[bool] = None) -> None:
        if self._uses_global_topk() and self._global is None:
            self._global = self._global_thresholds(quiet)
        if self.cfg.method == "adamerging" and self._ada is None:
            from compress.merge.adamerging import learn_for_merger

            self._ada = learn_for_merger(self, quiet)

    def tensors(self, quiet: Optional[bool] = None):
        """(name, merged tensor) for every tensor of the reference model, in its order."""
        self.prepare(quiet)
        threads = torch.get_num_threads()
        self.fused_threads = self.fused_threads or threads
        if self.device == "cpu" and (self.method is None or self.method.sparsify is None):
            # an I/O-bound merge (no top-k or random drops): leave a core to the reader and writer threads;
            # measured on 2 cores, task arithmetic of three 1 GB models ran ~25% faster with one torch thread
            torch.set_num_threads(1)
        try:
            for name in self._walk(self.ref.names(), f"merge ({self.cfg.method})", quiet):
                yield name, self.merge_tensor(name)
        finally:
            torch.set_num_threads(threads)

    def write(self, out: Path, quiet: Optional[bool] = None) -> MergeSummary:
        from compress.io.writer import write_folder

        start = time.perf_counter()
        self.prepare(quiet)
        summary = MergeSummary(out=Path(out))
        if self.cfg.vocab == "base":
            summary.dropped_rows = {n: r - self.ref.info(n).shape[0] for n, r in self.vocab_rows.items()
                                    if r > self.ref.info(n).shape[0]}
            for n, r in summary.dropped_rows.items():
                console.print(f"[yellow]--vocab base: dropping {r} rows of '{n}' that only some models have")

        def tensors():
            # write_folder has written tensor i - 1 before it asks for i + 1, so two buffers serve every tensor
            self._outputs = [torch.empty(0, dtype=torch.bfloat16) for _ in range(2)]
            try:
                for name, t in self.tensors(quiet):
                    summary.tensors += 1
                    summary.params += t.numel()
                    yield name, t
                    del t
            finally:
                self._outputs = None

        aux = self.ref.root
        if self.cfg.vocab == "union" and self.vocab_rows:
            # the tokenizer and config of the model with the most rows describe the union
            widest = max((i for i in self.inputs if i.ckpt is not None),
                         key=lambda i: max(i.rows(n) or 0 for n in self.vocab_rows))
            aux = widest.ckpt.root
        card = {"title": f"Merged model ({self.cfg.method})", "method": self._describe(),
                "inputs": {"base": str(self.cfg.base), **{f"model {i + 1}": str(m.model)
                                                          for i, m in enumerate(self.cfg.models)}},
                "params": self._card_params()}
        # write_folder writes tensor i in a thread while tensor i + 1 is merged
        # merge_tensor refuses a non-finite result, naming the input at fault: the writer need not check again
        write_folder(out, tensors(), overwrite=self.cfg.overwrite, expected_tensors=len(self.ref.names()),
                     checked_finite=True,
                     shard_size=self.cfg.shard_size, card=card, **aux_files(aux, self.cfg.copy_tokenizer))
        summary.seconds = time.perf_counter() - start
        summary.bytes_read = sum(i.ckpt.nbytes for i in self.inputs if i.ckpt is not None) + \
            (self.base.nbytes if self.base is not None else 0)
        return summary

    def _describe(self) -> str:
        if self.cfg.method in SUBSPACE_METHODS:
            return f"{self.cfg.method} ({SUBSPACE_METHODS[self.cfg.method].paper})"
        if self.method is None and self.weight_method is None:
            return self.cfg.method
        paper = (METHODS[self.cfg.method] if self.method is not None else self.weight_method).paper
        if self.cfg.variant == "mergekit":
            return (f"{self.cfg.method} ({paper}); mergekit 0.1.5's semantics: its variant of every switch, its "
                    "argsort order for equal magnitudes, its dtype (the inputs' unless the recipe names one), its "
                    "weight and density-rounding rules")
        return f"{self.cfg.method} ({paper}); variant {self.cfg.variant}"

    def _card_params(self) -> dict:
        p = {k: v for k, v in self.cfg.parameters.items()}
        if self.method is not None:
            p.update(topk=self.method.topk, sign_on=self.method.sign_on, disjoint=self.method.disjoint,
                     rescale=self.method.rescale, consensus=self.method.consensus, seed=self.cfg.seed)
        if self._ada is not None:  # what AdaMerging learned (the card is written after ``prepare``)
            h = self._ada.history
            p.update(granularity=self.cfg.granularity, entropy=f"{h[0]:.4f} → {h[-1]:.4f} in {len(h) - 1} steps")
            if self.cfg.granularity == "task":
                p["lambda per model"] = [round(v, 4) for v in self._ada.coefficients[:, 0].tolist()]
        for i, m in enumerate(self.cfg.models):
            if m.parameters:
                p[f"model {i + 1}"] = m.parameters
        return p


def aux_files(src, copy_tokenizer: bool = True) -> dict:
    """write_folder's arguments that copy ``src``'s config and, unless told not to, its tokenizer files."""
    if copy_tokenizer:
        return {"aux_from": src}
    from compress.io.writer import copy_aux

    return {"finish": lambda folder: copy_aux(src, folder, ("config.json", "generation_config.json"))}


def run_merge(cfg: MergeConfig, quiet: Optional[bool] = None) -> MergeSummary:
    """Write the merge that ``cfg`` describes to ``cfg.out`` (atomically); a ``SlicePlan`` (what ``load_recipe``
    gives for mergekit's slices, LoRA references and tokenizers) runs itself."""
    if hasattr(cfg, "run"):
        return cfg.run(quiet)
    if cfg.out is None:
        raise CompressError("no output folder: pass --out DIR (or set out: in the recipe)")
    from compress.io.writer import check_output, config_inputs

    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    return Merger(cfg).write(cfg.out, quiet=quiet if quiet is not None else cfg.quiet)
