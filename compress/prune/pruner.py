"""``Pruner``: one model, one calibration, many strategies.

```python
from compress.prune import Pruner
p = Pruner("base/", calib="wikitext2.valid", nsamples=128, seqlen=512, device="cuda")
r = p.prune(0.5, method="wanda")                       # uniform 50%
r = p.prune(p.owl(0.7), method="sparsegpt")            # OWL allocation at 70%
r = p.prune([0.3, 0.5, 0.7, ...], method="wanda")      # one sparsity per block
p.save(r, "pruned/")                                   # a Hugging Face folder (zeros stored densely)
p.load(r); ...evaluate p.model...; p.load(None)        # in memory, back to dense
p.prune_blocks(0.5, "sparsegpt", calibration="sequential", out="pruned/")   # block by block, streamed to disk
```

Two paths. **Block by block** (``prune_blocks``; ``prune`` when the Pruner's ``calibration`` is
``sequential``): ``compress.io.blocks.BlockRunner`` reads one block's weights at a time, its statistics are
collected while it runs, its layers are pruned and, with ``out``, written at once; nothing of the model but the
embeddings and that block is in memory. ``calibration="sequential"`` calibrates each block on the outputs of the
blocks already pruned (the SparseGPT/Wanda reference code, llm-compressor's sequential pipeline);
``"shared"`` on the dense model's activations. **In memory** (``prune``/``prune_many`` when ``shared``, the
default here: one calibration, many strategies, for the evaluators of ``compress.strategy``): the model is loaded
on first use (``model``), the dense weights of the prunable layers stay on ``device``, and the dense statistics
are computed once (cached on disk only with ``cache_dir``). SparseGPT's inverse-Hessian factor depends only on
the layer, so it is computed once per layer. Both paths give the same result in shared mode.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from compress.errors import CompressError
from compress.io.files import read_model_config
from compress.prune import calib as C
from compress.prune import methods as M
from compress.prune.registry import Layer, get_prune_method
from compress.prune.strategy import Strategy, validate
from compress.sparsify.protect import Protect

if TYPE_CHECKING:
    from compress.io.sparse import SparseSummary

DEFAULT_CALIB = "wikitext2.valid"
DEFAULT_SEQLEN = 512
CALIBRATIONS = ("sequential", "shared")


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
    sparse: Optional["SparseSummary"] = None  # the sparse file ``prune_blocks`` wrote

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
                 blocksize: int = 128, percdamp: float = 0.01, quiet: bool = False, calibration: str = "shared"):
        from compress.io.blocks import empty_model
        from compress.io.reader import check_weight_files

        self.model_dir = Path(model)
        if read_model_config(self.model_dir) is None:
            raise CompressError(f"{self.model_dir}: not a Hugging Face model folder (no config.json)")
        if calibration not in CALIBRATIONS:
            raise CompressError(f"calibration '{calibration}': choose one of {', '.join(CALIBRATIONS)}")
        self.device, self.quiet, self.calibration = device, quiet, calibration
        self.nsamples, self.seed, self.batch_size = nsamples, seed, batch_size
        self.blocksize, self.percdamp = blocksize, percdamp
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.calib = calib
        check_weight_files(self.model_dir)
        self.skeleton = empty_model(self.model_dir)  # names, shapes and config; no weights
        self.modules, self.n_blocks = C.find_prunable(self.skeleton, targets, ignore)
        max_pos = getattr(self.skeleton.config, "max_position_embeddings", None)
        if seqlen is None:
            seqlen = min(DEFAULT_SEQLEN, max_pos or DEFAULT_SEQLEN)
        self.seqlen = seqlen
        if max_pos is not None and seqlen > max_pos:
            raise CompressError(f"--seqlen {seqlen} is longer than the model's max_position_embeddings {max_pos}")
        self.block_params = [sum(p.numel for p in self.modules if p.block == b) for b in range(self.n_blocks)]
        if not any(self.block_params):
            raise CompressError(f"{self.model_dir}: every selected layer lies outside the blocks; a per-block "
                                "strategy needs layers inside them (check --targets/--ignore)")
        self._model: torch.nn.Module | None = None
        self._dense_w: dict[str, torch.Tensor] | None = None
        self._stats: dict[str, C.LayerStats] | None = None
        self._has_hessian = False
        self._hinv: dict = {}  # the methods' ``Layer.cache`` (SparseGPT's inverse-Hessian factors)
        self._key: str | None = None
        self.forward_passes = 0  # calibration forward passes this Pruner ran (0 on a cache hit)
        self.calibration_seconds = 0.0

    @property
    def model(self) -> torch.nn.Module:
        """The whole model in float32 on ``device``, loaded on first use (the in-memory path only)."""
        if self._model is None:
            from compress.eval.classify import hf_quiet

            with hf_quiet():
                model = _load_model(self.model_dir, self.device)
            _check_finite_model(model, self.model_dir)
            mods = dict(model.named_modules())
            self._module = {p.name: mods[p.name] for p in self.modules}
            self._model = model
        return self._model

    @property
    def _dense(self) -> dict[str, torch.Tensor]:
        """The dense weights of the prunable layers ([out, in], float32, on ``device``; the in-memory path)."""
        if self._dense_w is None:
            self.model  # noqa: B018  (loads it)
            self._dense_w = {p.name: self._weight(p).detach().float().clone() for p in self.modules}
        return self._dense_w

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
        keep = protect.keep(self.param_name(p), stored, device=self.device)
        if keep is None or not bool(keep.any()):
            return None
        return keep.T if p.transposed else keep

    @torch.no_grad()
    def load(self, result: PruneResult | None) -> None:
        """Put ``result``'s weights into ``self.model`` (None: the dense weights back)."""
        dense = self._dense
        for p in self.modules:
            w = dense[p.name] if result is None else result.weights[p.name]
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
        got = self._cached_stats(self.modules, hessian)
        if got is not None:
            self._stats, self._has_hessian = got
            self._hinv.clear()
            return self._stats
        windows = self.windows()  # before any work: a too-short text fails here
        t0 = time.perf_counter()
        self.load(None)
        stats = C.collect_stats(self.model, self.modules, windows, hessian=hessian, batch_size=self.batch_size,
                                device=self.device, quiet=self.quiet)
        self.forward_passes += 1
        self.calibration_seconds += time.perf_counter() - t0
        if self.cache_dir is not None:
            C.save_stats(stats, self._cache_path(hessian), self._cache_meta(), self.quiet)
        self._stats, self._has_hessian = stats, hessian
        self._hinv.clear()
        return stats

    def _cache_path(self, hessian: bool) -> Path:
        return C.cache_paths(self.cache_dir, self.key())["hessian" if hessian else "norms"]

    def _cache_meta(self) -> dict:
        return {"model": str(self.model_dir), "calib": str(self.calib or DEFAULT_CALIB), "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed}

    def _cached_stats(self, modules: list[C.Prunable], hessian: bool, device: str | None = None
                      ) -> tuple[dict[str, C.LayerStats], bool] | None:
        """(statistics of ``modules`` from the disk cache, whether they hold Hessians), or None (no cache or no
        entry)."""
        if self.cache_dir is None:
            return None
        for h in (True,) if hessian else (False, True):
            got = C.load_stats(self._cache_path(h), modules, h, device or self.device)
            if got is not None:
                return got, h
        return None

    # -- strategies ----------------------------------------------------------------------------------------
    def owl(self, sparsity: float, m: float = 5.0, lam: float = 0.08) -> Strategy:
        """OWL's per-block allocation at mean ``sparsity`` (Wanda scores of the dense model): from the in-memory
        statistics when the model is loaded, else in one block-wise pass of the dense model (the same numbers)."""
        from compress.prune.owl import outlier_ratio, owl_from_ratios, owl_strategy

        if self._model is None:
            ratios = []

            def score(i, layers, weights, stats):
                ratios.append(outlier_ratio([M.wanda_scores(weights[p.name], stats[p.name].col_norm)
                                             for p in layers], m))

            self._dense_pass(score)
            return owl_from_ratios(ratios, self.block_params, sparsity, m, lam)
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
        """Prune every selected layer to its block's sparsity; the model itself is left dense. Sequential
        calibration runs block by block (``prune_blocks``), shared in memory (``prune_many``)."""
        if self.calibration == "sequential":
            return self.prune_blocks(strategy, method, pattern, protect, keep_weights=True)
        return self.prune_many([strategy], method, pattern, protect)[0]

    def _setup(self, strategies, method: str, pattern: str):
        """(method spec, validated strategies, N:M pattern or None, each strategy's mean sparsity)."""
        spec = get_prune_method(method)
        sts = [self.as_strategy(st) for st in strategies]
        nm = M.parse_pattern(pattern)
        if nm is not None:
            want = 1 - nm[0] / nm[1]
            for st in sts:
                if any(abs(x - want) > 1e-9 for x in st.layer_sparsity):
                    raise CompressError(f"pattern {pattern} prunes exactly {want:g} of every layer; the strategy "
                                        f"({st.source}) asks for other sparsities")
        return spec, sts, nm, [st.mean(self.block_params) for st in sts]

    def _budgets(self, sts, means, protected: dict[str, int], x: float) -> list[dict]:
        """Each strategy's zero budget of every layer when some entries are protected (``methods.allot_zeros``):
        protected entries take fewer zeros than their share, the free ones of the same block (then of the model)
        take the rest, so each block and the whole model still meet the requested sparsity."""
        prot = [protected[p.name] for p in self.modules]
        budgets = []
        for st, mean in zip(sts, means):
            ss = [st.layer_sparsity[p.block] if p.block is not None else mean for p in self.modules]
            got = M.allot_zeros([p.numel for p in self.modules], prot, [p.block for p in self.modules], ss, x)
            budgets.append({p.name: z for p, z in zip(self.modules, got)})
        return budgets

    def _prune_layer(self, spec, p: C.Prunable, w: torch.Tensor, stats, ss: list[float], keep, zs: list, nm,
                     x: float, cache: dict, budgeted: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One layer pruned to each sparsity of ``ss``: [(weight, keep-mask)] ([out, in], float32)."""
        if keep is None and budgeted:
            # nothing of this layer is protected, but it may take zeros that protected layers of its block could
            # not: pruned to its budget like the others
            keep = torch.zeros_like(w, dtype=torch.bool)
        if keep is None or nm is not None:
            dense = [(x_ == 0 and nm is None) or (keep is not None and bool(keep.all())) for x_ in ss]
        else:
            dense = [z == (0, 0) for z in zs]
        out: list = [(w.clone(), torch.ones_like(w, dtype=torch.bool)) if d else None for d in dense]
        todo = [b for b, d in enumerate(dense) if not d]
        layer = Layer(p.name, w, stats, nm=nm, keep=keep, protect_sparsity=x, blocksize=self.blocksize,
                      percdamp=self.percdamp, cache=cache)
        if spec.mask is not None:
            for b in todo:
                mask = spec.mask(layer, ss[b], zs[b])
                out[b] = (w * mask, mask)
        elif todo:
            new, masks = spec.update(layer, [ss[b] for b in todo], [zs[b] for b in todo])
            for j, b in enumerate(todo):
                out[b] = (new[j] * masks[j], masks[j])
        return out

    @torch.no_grad()
    def prune_many(self, strategies: Sequence[Strategy | float | Sequence[float]], method: str = "wanda",
                   pattern: str = "unstructured", protect: Protect | None = None) -> list[PruneResult]:
        """``prune`` for K strategies from the one calibration, ``method`` a name of ``compress.prune.registry``.
        Mask methods (magnitude, Wanda) are cheap per strategy; an update method solves the K problems of each
        layer at once (SparseGPT: one batched column loop, ``sparsegpt_prune_many``, bit-compatible with K calls
        of ``prune`` up to float summation order). Holds K pruned copies of the prunable weights on the device.
        Sequential calibration ties the statistics to one strategy: each is then pruned block by block."""
        if self.calibration == "sequential":
            return [self.prune(st, method, pattern, protect) for st in strategies]
        spec, sts, nm, means = self._setup(strategies, method, pattern)
        stats = self.stats(hessian=spec.hessian) if spec.calibrated else None
        keeps = {p.name: self._keep(p, protect) for p in self.modules} if protect else {}
        x = (protect.sparsity or 0.0) if protect else 0.0
        budgets: list[dict] = [{} for _ in sts]
        if keeps and nm is None:
            budgets = self._budgets(sts, means, {n: 0 if k is None else int(k.sum()) for n, k in keeps.items()}, x)
        t0 = time.perf_counter()
        weights: list[dict] = [{} for _ in sts]
        kept: list[dict] = [{} for _ in sts]
        numel: dict[str, int] = {}
        for p in self.modules:
            ss = [st.layer_sparsity[p.block] if p.block is not None else mean for st, mean in zip(sts, means)]
            w = self._dense[p.name]
            out = self._prune_layer(spec, p, w, stats[p.name] if stats is not None else None, ss, keeps.get(p.name),
                                    [bud.get(p.name) for bud in budgets], nm, x, self._hinv, bool(budgets[0]))
            for b, (new, mask) in enumerate(out):
                weights[b][p.name] = new
                kept[b][p.name] = int(torch.count_nonzero(mask))
            numel[p.name] = w.numel()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(sts)
        return [PruneResult(weights[b], st, method, pattern, kept[b], seconds, dict(numel))
                for b, st in enumerate(sts)]

    # -- block by block ------------------------------------------------------------------------------------
    def _runner(self):
        from compress.io.blocks import BlockRunner

        return BlockRunner(self.model_dir, device=self.device, dtype=torch.float32)

    def _block_layers(self, runner, i: int, block) -> tuple[list[C.Prunable], dict[str, torch.Tensor]]:
        """Block ``i``'s prunable layers and their weights as loaded ([out, in] views, float32)."""
        layers = [p for p in self.modules if p.block == i]
        head = f"{runner.prefix}.{i}."
        weights = {}
        for p in layers:
            w = block.get_submodule(p.name[len(head):]).weight
            weights[p.name] = w.T if p.transposed else w
        return layers, weights

    def _block_stats(self, runner, i, block, acts, layers, hessian: bool, outputs: bool):
        """Block ``i``'s statistics while it runs over ``acts`` (outputs handed on with ``outputs``)."""
        with C.StatsHooks(block, layers, hessian, self.device, prefix=f"{runner.prefix}.{i}.") as hooks:
            runner.run(i, block, acts, outputs=outputs)
        return hooks.stats

    @torch.no_grad()
    def _dense_pass(self, visit) -> None:
        """One block-wise pass of the dense model over the calibration windows: ``visit(i, layers, weights,
        stats)`` for every block (Wanda norms), then the block is freed."""
        windows = self.windows()
        with self._runner() as runner:
            acts = runner.start(windows.split(self.batch_size))
            for i, block in runner.blockwise():
                layers, weights = self._block_layers(runner, i, block)
                visit(i, layers, weights, self._block_stats(runner, i, block, acts, layers, False, True))
        self.forward_passes += 1

    def _outer(self, p: C.Prunable, spec) -> None:
        if spec.calibrated:
            raise CompressError(f"layer '{p.name}' lies outside the blocks: block-wise pruning calibrates the "
                                "layers inside them; leave it out (--targets/--ignore) or use --method magnitude")

    @torch.no_grad()
    def prune_blocks(self, strategy: Strategy | float | Sequence[float], method: str = "wanda",
                     pattern: str = "unstructured", protect: Protect | None = None, *,
                     calibration: str | None = None, out: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None, overwrite: bool = False, shard_size: str = "5GB",
                     keep_weights: bool | None = None, extra: dict | None = None,
                     sparse_out: str | os.PathLike | None = None, sparse_metadata: dict | None = None
                     ) -> PruneResult:
        """Prune block by block (see the module docstring): with ``out``, the Hugging Face folder is written as
        the blocks are done (what ``save`` writes), and with ``sparse_out`` too its sparse file in the same pass
        (what ``compress.io.sparse.write_sparse`` of the folder writes, ``sparse_metadata`` added; its summary in
        ``result.sparse``); ``keep_weights`` (default: without ``out``) also returns the pruned weights
        (float32, on the CPU) for ``load``/``save``. ``calibration`` defaults to the Pruner's."""
        mode = calibration or self.calibration
        if mode not in CALIBRATIONS:
            raise CompressError(f"calibration '{mode}': choose one of {', '.join(CALIBRATIONS)}")
        spec, sts, nm, means = self._setup([strategy], method, pattern)
        st, mean = sts[0], means[0]
        keep_weights = out is None if keep_weights is None else keep_weights
        x = (protect.sparsity or 0.0) if protect else 0.0
        budgets: dict = {}
        if protect and nm is None:
            counts = {}
            for p in self.modules:  # one layer's mask at a time: only the counts are kept
                k = self._keep(p, protect)
                counts[p.name] = 0 if k is None else int(k.sum())
            if any(counts.values()):
                budgets = self._budgets([st], [mean], counts, x)[0]
        windows = self.windows() if spec.calibrated else None  # before any work: a too-short text fails here
        for p in self.modules:
            if p.block is None:
                self._outer(p, spec)
        res = PruneResult({}, st, method, pattern, {}, 0.0, {})
        t0 = time.perf_counter()
        runner = self._runner()
        cache = None

        def prune_one(p, w, stats, s):
            keep = self._keep(p, protect)
            (new, mask), = self._prune_layer(spec, p, w, stats, [s], keep, [budgets.get(p.name)], nm, x, hinv,
                                             bool(budgets))
            res.kept[p.name] = int(torch.count_nonzero(mask))
            res.numel[p.name] = w.numel()
            if keep_weights:
                res.weights[p.name] = new.cpu()
            return new

        def stored(name, p, new):
            t = (new.T if p.transposed else new).to(runner.ck.info(name).dtype).cpu()
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        ck = runner.ck
        try:
            block_names = [runner.block_tensor_names(i) for i in range(self.n_blocks)]
        except BaseException:
            runner.close()
            raise
        inside = {n for names in block_names for n in names.values()}
        # the order written: embeddings, final norm and heads as stored, then block after block
        outer = [n for n in ck.names() if n not in inside]
        order = outer + [n for names in block_names for n in names.values()]
        sparse = None

        def tensors():
            nonlocal cache
            by_ck = {runner.tensor_name(f"{p.name}.weight"): p for p in self.modules}
            for name in outer:  # outer layers: magnitude only
                p = by_ck.get(name)
                t = ck.get(name)
                if p is not None:
                    w = (t.T if p.transposed else t).float().to(self.device)
                    t = stored(name, p, prune_one(p, w, None, mean))
                elif dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t
            acts, cached, computed = None, False, False
            if spec.calibrated:
                if mode == "shared" and self.cache_dir is not None:
                    cached = any(C.has_stats(self._cache_path(h), self.modules, h)
                                 for h in ((True,) if spec.hessian else (False, True)))
                    if not cached:
                        cache = C.StatsCache(self._cache_path(spec.hessian), C.stats_nbytes(self.modules, spec.hessian),
                                             self._cache_meta(), self.quiet, exact=False)
                if not cached:  # cached dense statistics need no activations
                    acts = runner.start(windows.split(self.batch_size))
            from compress.progress import track

            for i in track(range(self.n_blocks), f"pruning ({mode})", quiet=self.quiet):
                block = runner.load_block(i)
                layers, weights = self._block_layers(runner, i, block)
                stats = None
                if spec.calibrated:
                    if cached:
                        stats = self._cached_stats(layers, spec.hessian)[0]
                    else:
                        stats = self._block_stats(runner, i, block, acts, layers, spec.hessian, mode == "shared")
                        computed = True
                        if cache is not None:
                            cache.add(stats)
                hinv.clear()
                new = {p.name: prune_one(p, weights[p.name], stats[p.name] if stats else None,
                                         st.layer_sparsity[i]) for p in layers}
                del stats
                hinv.clear()
                if mode == "sequential" and acts is not None and i < self.n_blocks - 1:
                    for p in layers:  # the next block sees this one pruned
                        weights[p.name].copy_(new[p.name])
                    runner.run(i, block, acts)
                for name in block_names[i].values():
                    p = by_ck.get(name)
                    yield name, stored(name, p, new[p.name]) if p is not None else ck.get(name, dtype=dtype)
                del new, weights
                runner.free_block(i)
            if cache is not None:
                cache.close()
                cache = None
            self.forward_passes += computed

        hinv: dict = {}
        try:
            if out is None:
                for _ in tensors():
                    pass
            else:
                from contextlib import ExitStack

                from compress.io.sparse import SparseWriter, present_aux
                from compress.io.writer import atomic_file, name_written_dtype, write_folder

                info: dict = {}
                card: dict = {}
                written = [(n, ck.info(n).shape, dtype if dtype is not None and ck.info(n).dtype.is_floating_point
                            else ck.info(n).dtype) for n in order]
                aux = present_aux(self.model_dir)

                def finish(folder: Path) -> None:
                    # the summary is known once every block is done; the card is written after this
                    import json

                    res.seconds = time.perf_counter() - t0
                    info.update(self._info(res, {"calibration": mode, **(extra or {})}))
                    card.update(self._card(res, info))
                    (folder / "prune.json").write_text(json.dumps(info, indent=1) + "\n")
                    if sparse is not None:
                        # the sparse file carries the folder's files as they end up: the config naming the dtype
                        name_written_dtype(folder, {d for _, _, d in written if d.is_floating_point}, self.model_dir)
                        for a in aux:
                            sparse.add_aux(a, (folder / a).read_bytes())
                        res.sparse = sparse.close({"sparsity": f"{res.sparsity:.6f}"})

                with ExitStack() as stack:
                    if sparse_out is not None:
                        tmp = stack.enter_context(atomic_file(sparse_out, overwrite))
                        # the sparsity is known at the end; the room counts it at its length ("0.500000")
                        sparse = SparseWriter(tmp, written, aux, {"source": str(Path(out)), "method": method,
                                                                  "pattern": pattern, "sparsity": f"{0:.6f}",
                                                                  **(sparse_metadata or {})})
                    write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(ck),
                                 shard_size=shard_size, metadata={"compress": "prune"}, aux_from=self.model_dir,
                                 finish=finish, card=card, also=None if sparse is None else sparse.add)
                if res.sparse is not None:
                    res.sparse = dataclasses.replace(res.sparse, path=Path(sparse_out))
        except BaseException as e:
            if cache is not None:  # a half-written statistics cache is removed too
                cache.abort(e)
            if sparse is not None:
                sparse.abort()
            raise
        finally:
            runner.close()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        res.seconds = time.perf_counter() - t0
        self.calibration_seconds += res.seconds
        return res

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
        return _checkpoint_names(self.skeleton, self.modules, ck, self.model_dir)

    def checkpoint_weights(self, result: PruneResult) -> dict[str, torch.Tensor]:
        """{checkpoint name: pruned weight as the checkpoint lays it out (float32)} of ``result``'s weights."""
        from compress.io.reader import open_checkpoint

        with open_checkpoint(self.model_dir) as ck:
            by_ck = self.checkpoint_names(ck)
        return {name: result.weights[p.name].T if p.transposed else result.weights[p.name]
                for name, p in by_ck.items()}

    # -- output --------------------------------------------------------------------------------------------
    def _info(self, result: PruneResult, extra: dict | None = None) -> dict:
        """What ``prune.json`` holds."""
        return {**result.summary(), "layer_sparsity_measured": self.layer_sparsity(result),
                "model": str(self.model_dir), "calib": str(self.calib or DEFAULT_CALIB), "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, **(extra or {})}

    def _card(self, result: PruneResult, info: dict) -> dict:
        return {"title": f"{self.model_dir.name} pruned ({result.method}, {result.pattern})",
                "method": f"compress prune, {result.method}",
                "inputs": {"model": str(self.model_dir), "calibration": info["calib"]},
                "params": {"sparsity": f"{result.sparsity:.4f}", "strategy": result.strategy.source,
                           "nsamples": self.nsamples, "seqlen": self.seqlen}}

    def save(self, result: PruneResult, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
             overwrite: bool = False, shard_size: str = "5GB", extra: dict | None = None) -> Path:
        """A Hugging Face folder: every tensor of the source checkpoint, pruned weights replaced (streamed one
        tensor at a time from the source), config/tokenizer copied, ``prune.json`` with the strategy."""
        import json

        from compress.io.reader import open_checkpoint
        from compress.io.writer import write_folder

        ck = open_checkpoint(self.model_dir)
        by_ck = self.checkpoint_names(ck)
        info = self._info(result, extra)

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

        return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(ck), shard_size=shard_size,
                            metadata={"compress": "prune"}, aux_from=self.model_dir,
                            files={"prune.json": json.dumps(info, indent=1) + "\n"}, card=self._card(result, info))


def _check_finite_model(model: torch.nn.Module, path: Path) -> None:
    """Refuse NaN/Inf weights, as the checkpoint readers do: pruning would keep them (a mask cannot rank NaN)."""
    from compress.io.reader import all_finite

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not all_finite(t):
            raise CompressError(f"{path}: tensor '{name}' contains NaN or Inf")


def _checkpoint_names(model, modules, ck, model_dir) -> dict[str, "C.Prunable"]:
    from compress.io.blocks import checkpoint_name

    by_ck = {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for p in modules:
        name = f"{p.name}.weight"
        found = checkpoint_name(name, ck, prefix)
        if found is not None:
            by_ck[found] = p
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

