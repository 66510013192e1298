"""``Pruner``: one model, one calibration, many strategies.

```python
from compress.prune import Pruner
p = Pruner("base/", calib="wikitext2.valid", nsamples=128, seqlen=512, device="cuda")
r = p.prune(0.5, method="wanda")                       # uniform 50%
r = p.prune(p.owl(0.7), method="sparsegpt")            # OWL allocation at 70%
r = p.prune([0.3, 0.5, 0.7, ...], method="wanda")      # one sparsity per block
p.save(r, "pruned/")                                   # a Hugging Face folder (zeros stored densely)
p.load(r); ...evaluate p.model...; p.load(None)        # in memory, back to dense
```

The dense weights of the prunable layers stay on ``device``; the calibration statistics (``calib.py``) are
computed on first use and cached on disk, so a second Pruner of the same model and calibration set does no
forward pass. SparseGPT's inverse-Hessian factor depends only on the layer, so it is computed once per layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from compress.errors import CompressError
from compress.io.files import read_model_config
from compress.prune import calib as C
from compress.prune import methods as M
from compress.prune.registry import Layer, get_prune_method
from compress.prune.strategy import Strategy, validate
from compress.sparsify.protect import Protect

DEFAULT_CALIB = "wikitext2.valid"
DEFAULT_SEQLEN = 512


def resolve_text(calib: str | os.PathLike | None) -> tuple[str, str]:
    """(text, label) of a calibration source: a .txt/.txt.gz file or a bundled corpus name."""
    from compress.data import corpus_names, corpus_path, read_text

    calib = DEFAULT_CALIB if calib is None else calib
    path = Path(calib)
    if not path.is_file():
        if str(calib) not in corpus_names():
            raise CompressError(f"--calib {calib}: neither a file nor a bundled corpus "
                                f"(corpora: {', '.join(corpus_names())})")
        path = corpus_path(str(calib))
    return read_text(path), str(path)


@dataclass
class PruneResult:
    """Pruned weights of the prunable layers ([out, in], float32, on the pruner's device) and what was done."""

    weights: dict[str, torch.Tensor]
    strategy: Strategy
    method: str
    pattern: str
    kept: dict[str, int]
    seconds: float
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Zeros over pruned parameters (protected entries count as kept)."""
        total = sum(self.numel.values())
        return 1.0 - sum(self.kept.values()) / total if total else 0.0

    def summary(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity,
                "strategy": self.strategy.to_dict(), "seconds": self.seconds,
                "params_pruned_over": sum(self.numel.values())}


class Pruner:
    def __init__(self, model: str | os.PathLike, calib: str | os.PathLike | None = None, *, nsamples: int = 128,
                 seqlen: int | None = None, seed: int = 0, targets: str | None = None,
                 ignore: str | None = C.DEFAULT_IGNORE,
                 device: str = "cpu", cache_dir: str | os.PathLike | None = None, batch_size: int = 8,
                 blocksize: int = 128, percdamp: float = 0.01, quiet: bool = False):
        from compress.eval.classify import hf_quiet

        self.model_dir = Path(model)
        if read_model_config(self.model_dir) is None:
            raise CompressError(f"{self.model_dir}: not a Hugging Face model folder (no config.json)")
        self.device, self.quiet = device, quiet
        self.nsamples, self.seed, self.batch_size = nsamples, seed, batch_size
        self.blocksize, self.percdamp = blocksize, percdamp
        self.cache_dir = Path(cache_dir) if cache_dir is not None else C.default_cache_dir()
        self.calib = calib
        with hf_quiet():
            self.model = _load_model(self.model_dir, device)
        _check_finite_model(self.model, self.model_dir)
        self.modules, self.n_blocks = C.find_prunable(self.model, targets, ignore)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if seqlen is None:
            seqlen = min(DEFAULT_SEQLEN, max_pos or DEFAULT_SEQLEN)
        self.seqlen = seqlen
        if max_pos is not None and seqlen > max_pos:
            raise CompressError(f"--seqlen {seqlen} is longer than the model's max_position_embeddings {max_pos}")
        mods = dict(self.model.named_modules())
        self._module = {p.name: mods[p.name] for p in self.modules}
        self.block_params = [sum(p.numel for p in self.modules if p.block == b) for b in range(self.n_blocks)]
        if not any(self.block_params):
            raise CompressError(f"{self.model_dir}: every selected layer lies outside the blocks; a per-block "
                                "strategy needs layers inside them (check --targets/--ignore)")
        self._dense = {p.name: self._weight(p).detach().float().clone() for p in self.modules}
        self._stats: dict[str, C.LayerStats] | None = None
        self._has_hessian = False
        self._hinv: dict = {}  # the methods' ``Layer.cache`` (SparseGPT's inverse-Hessian factors)
        self._key: str | None = None
        self.forward_passes = 0  # calibration forward passes this Pruner ran (0 on a cache hit)
        self.calibration_seconds = 0.0

    # -- weights -------------------------------------------------------------------------------------------
    def _weight(self, p: C.Prunable) -> torch.Tensor:
        w = self._module[p.name].weight
        return w.T if p.transposed else w

    def param_name(self, p: C.Prunable) -> str:
        return f"{p.name}.weight"

    def _keep(self, p: C.Prunable, protect: Protect | None) -> torch.Tensor | None:
        """The protection mask of a layer in [out, in] layout (None: nothing of it protected)."""
        if not protect:
            return None
        stored = (p.in_features, p.out_features) if p.transposed else (p.out_features, p.in_features)
        keep = protect.keep(self.param_name(p), stored, device=self._dense[p.name].device)
        if keep is None or not bool(keep.any()):
            return None
        return keep.T if p.transposed else keep

    @torch.no_grad()
    def load(self, result: PruneResult | None) -> None:
        """Put ``result``'s weights into ``self.model`` (None: the dense weights back)."""
        for p in self.modules:
            w = self._dense[p.name] if result is None else result.weights[p.name]
            self._weight(p).copy_(w)

    # -- calibration ---------------------------------------------------------------------------------------
    def key(self) -> str:
        if self._key is None:
            text, _ = resolve_text(self.calib)
            self._key = C.cache_key(C.model_fingerprint(self.model_dir), C.text_sha256(text), self.nsamples,
                                    self.seqlen, self.seed, self.modules)
        return self._key

    def tokenizer(self):
        from transformers import AutoTokenizer

        if getattr(self, "_tok", None) is None:
            try:
                self._tok = AutoTokenizer.from_pretrained(self.model_dir)
            except (OSError, ValueError) as e:
                raise CompressError(f"{self.model_dir}: no tokenizer to encode the calibration text "
                                    f"({str(e).splitlines()[0]})") from None
        return self._tok

    def windows(self) -> torch.Tensor:
        """The calibration windows [nsamples, seqlen] (deterministic in the seed)."""
        text, label = resolve_text(self.calib)
        return C.calibration_windows(self.tokenizer(), text, self.nsamples, self.seqlen, self.seed, label)

    def stats(self, hessian: bool = False) -> dict[str, C.LayerStats]:
        """Per-layer statistics of the dense model: from memory, the disk cache, or one forward pass."""
        if self._stats is not None and (self._has_hessian or not hessian):
            return self._stats
        paths = C.cache_paths(self.cache_dir, self.key())
        order = ("hessian",) if hessian else ("norms", "hessian")
        for kind in order:
            got = C.load_stats(paths[kind], self.modules, kind == "hessian", self.device)
            if got is not None:
                self._stats, self._has_hessian = got, kind == "hessian"
                self._hinv.clear()
                return got
        windows = self.windows()  # before any work: a too-short text fails here
        t0 = time.perf_counter()
        self.load(None)
        stats = C.collect_stats(self.model, self.modules, windows, hessian=hessian, batch_size=self.batch_size,
                                device=self.device, quiet=self.quiet)
        self.forward_passes += 1
        self.calibration_seconds += time.perf_counter() - t0
        meta = {"model": str(self.model_dir), "calib": str(self.calib or DEFAULT_CALIB), "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed}
        C.save_stats(stats, paths["hessian" if hessian else "norms"], meta)
        self._stats, self._has_hessian = stats, hessian
        self._hinv.clear()
        return stats

    # -- strategies ----------------------------------------------------------------------------------------
    def owl(self, sparsity: float, m: float = 5.0, lam: float = 0.08) -> Strategy:
        """OWL's per-block allocation at mean ``sparsity`` (Wanda scores of the dense model)."""
        from compress.prune.owl import owl_strategy

        stats = self.stats()
        scores: dict[int, list[torch.Tensor]] = {b: [] for b in range(self.n_blocks)}
        for p in self.modules:
            if p.block is not None:
                scores[p.block].append(M.wanda_scores(self._dense[p.name], stats[p.name].col_norm))
        return owl_strategy(scores, self.block_params, sparsity, m, lam)

    def strategy(self, sparsity: float | None = None, layer_sparsity: Sequence[float] | None = None,
                 file: str | os.PathLike | None = None, owl: bool = False, owl_m: float = 5.0,
                 owl_lambda: float = 0.08) -> Strategy:
        """The strategy from exactly one source (uniform ``sparsity``, a vector, a JSON file, OWL), validated."""
        if layer_sparsity is not None:
            st = Strategy(tuple(float(v) for v in layer_sparsity), "--layer-sparsity")
        elif file is not None:
            st = Strategy.load(file)
        elif owl:
            if sparsity is None:
                raise CompressError("OWL allocation needs a target --sparsity")
            return validate(self.owl(sparsity, owl_m, owl_lambda), self.block_params, sparsity)
        elif sparsity is not None:
            st = Strategy.uniform(sparsity, self.n_blocks)
        else:
            raise CompressError("no sparsity: give --sparsity, --layer-sparsity or --strategy")
        return validate(st, self.block_params, sparsity)

    def as_strategy(self, strategy: Strategy | float | Sequence[float]) -> Strategy:
        if isinstance(strategy, Strategy):
            return validate(strategy, self.block_params)
        if isinstance(strategy, (int, float)):
            return self.strategy(sparsity=float(strategy))
        return self.strategy(layer_sparsity=strategy)

    # -- pruning -------------------------------------------------------------------------------------------
    def prune(self, strategy: Strategy | float | Sequence[float], method: str = "wanda",
              pattern: str = "unstructured", protect: Protect | None = None) -> PruneResult:
        """Prune every selected layer to its block's sparsity; the model itself is left dense."""
        return self.prune_many([strategy], method, pattern, protect)[0]

    @torch.no_grad()
    def prune_many(self, strategies: Sequence[Strategy | float | Sequence[float]], method: str = "wanda",
                   pattern: str = "unstructured", protect: Protect | None = None) -> list[PruneResult]:
        """``prune`` for K strategies from the one calibration, ``method`` a name of ``compress.prune.registry``.
        Mask methods (magnitude, Wanda) are cheap per strategy; an update method solves the K problems of each
        layer at once (SparseGPT: one batched column loop, ``sparsegpt_prune_many``, bit-compatible with K calls
        of ``prune`` up to float summation order). Holds K pruned copies of the prunable weights on the device."""
        spec = get_prune_method(method)
        sts = [self.as_strategy(st) for st in strategies]
        nm = M.parse_pattern(pattern)
        if nm is not None:
            want = 1 - nm[0] / nm[1]
            for st in sts:
                if any(abs(x - want) > 1e-9 for x in st.layer_sparsity):
                    raise CompressError(f"pattern {pattern} prunes exactly {want:g} of every layer; the strategy "
                                        f"({st.source}) asks for other sparsities")
        stats = self.stats(hessian=spec.hessian) if spec.calibrated else None
        means = [st.mean(self.block_params) for st in sts]
        keeps = {p.name: self._keep(p, protect) for p in self.modules} if protect else {}
        x = (protect.sparsity or 0.0) if protect else 0.0
        budgets: list[dict] = [{} for _ in sts]
        if keeps and nm is None:
            # protected entries take fewer zeros than their share: the free ones of the same block (then of the
            # model) take the rest, so each block and the whole model still meet the requested sparsity
            prot = [0 if keeps[p.name] is None else int(keeps[p.name].sum()) for p in self.modules]
            for b, (st, mean) in enumerate(zip(sts, means)):
                ss = [st.layer_sparsity[p.block] if p.block is not None else mean for p in self.modules]
                got = M.allot_zeros([p.numel for p in self.modules], prot, [p.block for p in self.modules], ss, x)
                budgets[b] = {p.name: z for p, z in zip(self.modules, got)}
        t0 = time.perf_counter()
        weights: list[dict] = [{} for _ in sts]
        kept: list[dict] = [{} for _ in sts]
        numel: dict[str, int] = {}
        for p in self.modules:
            ss = [st.layer_sparsity[p.block] if p.block is not None else mean for st, mean in zip(sts, means)]
            w = self._dense[p.name]
            keep = keeps.get(p.name)
            zs = [bud.get(p.name) for bud in budgets]
            if keep is None and budgets[0]:
                # nothing of this layer is protected, but it may take zeros that protected layers of its block
                # could not: pruned to its budget like the others
                keep = torch.zeros_like(w, dtype=torch.bool)
            if keep is None or nm is not None:
                dense = [(x_ == 0 and nm is None) or (keep is not None and bool(keep.all())) for x_ in ss]
            else:
                dense = [z == (0, 0) for z in zs]
            out: list = [(w.clone(), torch.ones_like(w, dtype=torch.bool)) if d else None for d in dense]
            todo = [b for b, d in enumerate(dense) if not d]
            layer = Layer(p.name, w, stats[p.name] if stats is not None else None, nm=nm, keep=keep,
                          protect_sparsity=x, blocksize=self.blocksize, percdamp=self.percdamp, cache=self._hinv)
            if spec.mask is not None:
                for b in todo:
                    mask = spec.mask(layer, ss[b], zs[b])
                    out[b] = (w * mask, mask)
            elif todo:
                new, masks = spec.update(layer, [ss[b] for b in todo], [zs[b] for b in todo])
                for j, b in enumerate(todo):
                    out[b] = (new[j] * masks[j], masks[j])
            for b, (new, mask) in enumerate(out):
                weights[b][p.name] = new
                kept[b][p.name] = int(torch.count_nonzero(mask))
            numel[p.name] = w.numel()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(sts)
        return [PruneResult(weights[b], st, method, pattern, kept[b], seconds, dict(numel))
                for b, st in enumerate(sts)]

    def layer_sparsity(self, result: PruneResult) -> list[float]:
        """Measured sparsity of each block (zeros over the block's pruned parameters)."""
        out = []
        for b in range(self.n_blocks):
            names = [p.name for p in self.modules if p.block == b]
            n = sum(result.numel[x] for x in names)
            out.append(1 - sum(result.kept[x] for x in names) / n if n else 0.0)
        return out

    def checkpoint_names(self, ck=None) -> dict[str, "C.Prunable"]:
        """{tensor name in the checkpoint: prunable layer} (the loaded model may add or drop a prefix)."""
        from compress.io.reader import open_checkpoint

        ck = ck if ck is not None else open_checkpoint(self.model_dir)
        return _checkpoint_names(self.model, self.modules, ck, self.model_dir)

    # -- output --------------------------------------------------------------------------------------------
    def save(self, result: PruneResult, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
             overwrite: bool = False, shard_size: str = "5GB", extra: dict | None = None) -> Path:
        """A Hugging Face folder: every tensor of the source checkpoint, pruned weights replaced (streamed one
        tensor at a time from the source), config/tokenizer copied, ``prune.json`` with the strategy."""
        import json

        from compress.io.reader import open_checkpoint
        from compress.io.writer import write_folder

        ck = open_checkpoint(self.model_dir)
        by_ck = self.checkpoint_names(ck)
        info = {**result.summary(), "layer_sparsity_measured": self.layer_sparsity(result),
                "model": str(self.model_dir), "calib": str(self.calib or DEFAULT_CALIB), "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, **(extra or {})}

        def tensors():
            for name in ck.names():
                p = by_ck.get(name)
                if p is None:
                    t = ck.get(name)
                else:
                    t = result.weights[p.name]
                    t = (t.T if p.transposed else t).to(ck.info(name).dtype).cpu()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t.contiguous()

        card = {"title": f"{self.model_dir.name} pruned ({result.method}, {result.pattern})",
                "method": f"compress prune, {result.method}",
                "inputs": {"model": str(self.model_dir), "calibration": info["calib"]},
                "params": {"sparsity": f"{result.sparsity:.4f}", "strategy": result.strategy.source,
                           "nsamples": self.nsamples, "seqlen": self.seqlen}}
        return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(ck), shard_size=shard_size,
                            metadata={"compress": "prune"}, aux_from=self.model_dir,
                            files={"prune.json": json.dumps(info, indent=1) + "\n"}, card=card)


def _check_finite_model(model: torch.nn.Module, path: Path) -> None:
    """Refuse NaN/Inf weights, as the checkpoint readers do: pruning would keep them (a mask cannot rank NaN)."""
    from compress.io.reader import all_finite

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not all_finite(t):
            raise CompressError(f"{path}: tensor '{name}' contains NaN or Inf")


def _checkpoint_names(model, modules, ck, model_dir) -> dict[str, "C.Prunable"]:
    by_ck = {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for p in modules:
        name = f"{p.name}.weight"
        for cand in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if cand in ck:
                by_ck[cand] = p
                break
        else:
            raise CompressError(f"{model_dir}: weight '{name}' of the loaded model is not in the checkpoint")
    return by_ck


def prunable_numels(path: str | os.PathLike, targets: str | None = None, ignore: str | None = C.DEFAULT_IGNORE
                    ) -> dict[str, int]:
    """{checkpoint name: numel} of the weights a ``Pruner`` of ``path`` prunes, without reading any weight (the
    model is built on the meta device only to list its layers)."""
    from compress.eval.classify import hf_quiet
    from compress.io.reader import open_checkpoint

    path = Path(path)
    cfg, cls = _model_class(path)
    with hf_quiet(), torch.device("meta"):
        model = cls.from_config(cfg)
    modules, _ = C.find_prunable(model, targets, ignore)
    with open_checkpoint(path) as ck:
        return {n: p.numel for n, p in _checkpoint_names(model, modules, ck, path).items()}


def _model_class(path: Path):
    """(config, the Auto class to load it with): a causal LM head when the config names one, else the encoder."""
    from compress.io.models import model_class

    cfg, cls, _ = model_class(path)
    return cfg, cls


def _load_model(path: Path, device: str):
    """The model in float32, eval mode, no KV cache: a causal LM head when the config names one, else the bare
    encoder."""
    from compress.io.models import load_model

    model = load_model(path, device=device, dtype=torch.float32)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model

