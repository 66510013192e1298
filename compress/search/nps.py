"""NPS-Pruning (Du et al. 2025, "Neural Parameter Search for Slimmer Fine-Tuned Models and Better Transfer"):
search how much each subspace of a task vector counts, then prune the reweighted vector.

For K task vectors τ_k (K = 1: compression or interpolation; K > 1: merging), each split into parts
τ_k = Σ_m q_{k,m} (``compress.search.partition``), a point x of the search space gives

    r_k(x)   = Σ_m w_{g,m} q_{k,m}            w = exp(x_parts), one set of M weights per group g of tensors
    mask_k   = top-k of |r_k| at ``density``   (``topk: global``: one threshold over all tensors, so the weights also
                                             move the budget between tensors; ``per_tensor``: each tensor keeps
                                             its own share), OR the protected entries (``compress.sparsify.protect``)
    kept_k   = mask_k ⊙ r_k                  (``values: weighted``, the paper's: kept entries carry their part's
                                             weight) or mask_k ⊙ τ_k (``values: plain``)
    θ(x)     = θ_base + Σ_k λ_k · rescale(kept_k)    λ = exp(x_scale), one per task vector

``rescale``: ``none``; ``inverse_keep`` (÷ density, DARE's); ``l1`` (each tensor's Σ|τ| / Σ|kept|, mergekit's
norm matching). The weights live in log space, so "weights > 1" and "drop this part" (w → e⁻⁴) are both in
reach, and λ is the global scale a rescale would set: with K = 1 the search contains every uniform rescale of the
plain magnitude top-k. The search starts from the best of a few unweighted points (λ = 1, the L1-matching scale
and its square root for K = 1; a λ grid for K > 1), each evaluated and logged, then runs the optimizer
(``compress.search.optimize``) on the dev objective (``compress.search.objective``). The test split is never
seen by the search.

Everything is flat: the participating tensors of τ_k sit in one float32 vector on the device, with a per-entry
index into the weight table (magnitude bins) or a stack of M part vectors (SVD bands), so one evaluation is a
gather, a multiply, one radix top-k and one forward pass over the dev rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from compress.config import NpsSearch
from compress.errors import CompressError
from compress.heads.select import resolve_protect
from compress.search import partition as P
from compress.sparsify.masks import keep_count
from compress.sparsify.protect import Protect
from compress.sparsify.topk import topk_mask

WEIGHT_BOUNDS = (-4.0, 2.5)  # log w of a part
RATE_BOUNDS = (-3.0, 3.0)  # log ρ, the relative keep rate of a part (select: random)


@dataclass
class Layout:
    """Where each tensor sits in the flat vector."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    offsets: list[int]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def slices(self) -> Iterator[tuple[int, str, slice, tuple[int, ...]]]:
        for i, (n, s) in enumerate(zip(self.names, self.shapes)):
            yield i, n, slice(self.offsets[i], self.offsets[i + 1]), s

    def segment_ids(self, device) -> torch.Tensor:
        sizes = torch.tensor([self.offsets[i + 1] - self.offsets[i] for i in range(len(self.names))], device=device)
        return torch.repeat_interleave(torch.arange(len(self.names), device=device, dtype=torch.int32), sizes)


def make_layout(names, shapes, dtypes) -> Layout:
    offsets = [0]
    for s in shapes:
        offsets.append(offsets[-1] + math.prod(s))
    return Layout(list(names), [tuple(s) for s in shapes], list(dtypes), offsets)


def _point_key(x) -> tuple[float, ...]:
    return tuple(float(v) for v in x)


class NpsProblem:
    """K flat task vectors with their partitions; ``delta(x)`` is the flat Σ_k λ_k kept_k for a point x."""

    def __init__(self, layout: Layout, taus: list[torch.Tensor], density: float, space: NpsSearch = NpsSearch(),
                 protect: Optional[Protect] = None):
        if not taus:
            raise CompressError("nps: no task vectors")
        if not 0.0 < density <= 1.0:
            raise CompressError(f"nps: density must be in (0, 1], got {density}")
        self.layout, self.taus, self.density, self.space = layout, taus, density, space
        device = taus[0].device
        self.device = device
        self.M = space.parts
        self.group_names, tensor_group = P.groups(layout.names, space.grouping)
        self.G = len(self.group_names)
        seg = layout.segment_ids(device)
        self.entry_group = torch.tensor(tensor_group, device=device, dtype=torch.int32)[seg]
        self.seg = seg
        self.protect = None
        if protect:
            pm = torch.zeros(layout.numel, dtype=torch.bool, device=device)
            for _, name, sl, shape in layout.slices():
                keep = protect.keep(name, shape, device=device)
                if keep is not None:
                    pm[sl] = keep.reshape(-1)
            self.protect = pm if bool(pm.any()) else None
        # top-k only ever draws from the largest few percent, random keep from everywhere
        span = min(1.0, space.span * density) if space.select == "topk" else 1.0
        self.index: list[torch.Tensor] = []  # magnitude: per task, flat index into the [G, M] weight table
        self.stacks: list[torch.Tensor] = []  # svd: per task, [M, n] parts
        for tau in taus:
            if space.partition == "magnitude":
                edges = P.bin_edges(tau, self.M, space.edges, span)
                labels = P.magnitude_bins(tau, edges).to(torch.int32)
                self.index.append(self.entry_group * self.M + labels)
            else:
                stack = torch.zeros(self.M, layout.numel, dtype=torch.float32, device=device)
                for _, name, sl, shape in layout.slices():
                    for m, q in enumerate(P.svd_bands(tau[sl].reshape(shape), self.M)):
                        stack[m, sl] = q.reshape(-1)
                self.stacks.append(stack)
        self.draws: list[torch.Tensor] = []
        self.bin_counts: list[torch.Tensor] = []
        if space.select == "random":
            if space.partition != "magnitude":
                raise CompressError("nps: select random needs the magnitude partition (keep rates per bin)")
            from compress.sparsify.masks import seeded_generator

            for k, idx in enumerate(self.index):
                u = torch.empty(layout.numel, dtype=torch.float32, device=device)
                for _, name, sl, shape in layout.slices():
                    # the draws of `compress extract --method random` (DARE), so the unweighted start IS DARE
                    g = seeded_generator(space.seed, name if k == 0 else f"{name}#{k}")
                    u[sl] = torch.rand(shape, generator=g, device="cpu").reshape(-1).to(device)
                self.draws.append(u)
                self.bin_counts.append(torch.bincount(idx, minlength=self.G * self.M).to(torch.float32))
        self.tau_l1 = [torch.zeros(len(layout.names), device=device).index_add_(0, seg, t.abs()) for t in taus]

    # -- the search space ------------------------------------------------------------------------------------
    @property
    def K(self) -> int:
        return len(self.taus)

    @property
    def random(self) -> bool:
        return self.space.select == "random"

    @property
    def T(self) -> int:
        """How many [G, M] weight tables: one per task vector (``per_task``, the paper's per-vector search) or
        one shared by all."""
        return self.K if self.space.task_weights == "per_task" else 1

    @property
    def dim(self) -> int:
        return self.K + self.T * self.G * self.M * (2 if self.random else 1)

    def bounds(self) -> tuple[list[float], list[float]]:
        hi_scale = math.log(max(4.0, 2.0 / self.density))
        n = self.T * self.G * self.M
        lo = [math.log(0.02)] * self.K + [WEIGHT_BOUNDS[0]] * n + ([RATE_BOUNDS[0]] * n if self.random else [])
        hi = [hi_scale] * self.K + [WEIGHT_BOUNDS[1]] * n + ([RATE_BOUNDS[1]] * n if self.random else [])
        return lo, hi

    def point(self, lambdas: list[float], weights: Optional[torch.Tensor] = None) -> list[float]:
        w = torch.ones(self.T, self.G, self.M) if weights is None else weights
        lo, hi = self.bounds()
        x = [math.log(v) for v in lambdas] + torch.log(w).reshape(-1).tolist()
        if self.random:
            x += [0.0] * (self.G * self.M)
        return [min(max(v, a), b) for v, a, b in zip(x, lo, hi)]

    def decode(self, x: list[float]) -> tuple[list[float], torch.Tensor]:
        """(λ per task vector, weights [G, M], or [K, G, M] with ``per_task``); with ``select: random`` the
        weights tensor is [2, G, M]: value weights, then keep-rate multipliers."""
        if len(x) != self.dim:
            raise CompressError(f"nps: a point has {self.dim} coordinates, got {len(x)}")
        lambdas = [math.exp(v) for v in x[: self.K]]
        w = torch.exp(torch.tensor(x[self.K:], dtype=torch.float32))
        if self.random:
            return lambdas, w.reshape(2, self.G, self.M)
        return lambdas, (w.reshape(self.K, self.G, self.M) if self.T > 1 else w.reshape(self.G, self.M))

    def keep_rates(self, k: int, rho: torch.Tensor) -> torch.Tensor:
        """Per-bin keep probabilities ∝ ρ, scaled so the expected kept count is density × entries (then ≤ 1)."""
        rho = rho.to(self.device).reshape(-1)
        n = self.bin_counts[k]
        p = rho * (self.density * n.sum() / (n * rho).sum().clamp(min=1e-30))
        return p.clamp(max=1.0)

    # -- from a point to the kept entries ----------------------------------------------------------------------
    def reweighted(self, k: int, w: torch.Tensor) -> torch.Tensor:
        """r_k = Σ_m w_{g,m} q_{k,m}, flat."""
        w = w.to(self.device)
        if self.space.partition == "magnitude":
            return self.taus[k] * w.reshape(-1)[self.index[k]]
        stack = self.stacks[k]
        r = torch.zeros_like(self.taus[k])
        for m in range(self.M):
            r.addcmul_(stack[m], w[:, m][self.entry_group])
        return r

    def mask(self, r: torch.Tensor) -> torch.Tensor:
        sel = r.abs()
        if self.protect is not None:
            sel = torch.where(self.protect, torch.full_like(sel, float("inf")), sel)
        if self.space.topk == "global":
            mask = topk_mask(sel, keep_count(sel.numel(), self.density))
        else:
            mask = torch.empty(sel.shape, dtype=torch.bool, device=sel.device)
            for _, _, sl, _ in self.layout.slices():
                mask[sl] = topk_mask(sel[sl], keep_count(sl.stop - sl.start, self.density))
        if self.protect is not None:
            mask |= self.protect
        return mask

    def kept_random(self, k: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``select: random``: keep each entry of bin (g, m) with probability p_{g,m} (fixed draws, so a point
        always gives the same mask) and divide kept entries by it, DARE's unbiased rescale per bin; the value
        weights multiply as in the top-k case. ρ = 1, w = 1 is DARE exactly."""
        weights, rho = w[0], w[1]
        p = self.keep_rates(k, rho)[self.index[k]]
        if self.protect is not None:
            p = torch.where(self.protect, torch.ones_like(p), p)
        mask = self.draws[k] < p
        r = self.reweighted(k, weights) if self.space.values == "weighted" else self.taus[k]
        return torch.where(mask, r / p.clamp(min=1e-30), torch.zeros_like(r)), mask

    def kept(self, k: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rescale(kept_k) before λ, mask_k), flat."""
        if self.random:
            return self.kept_random(k, w)
        r = self.reweighted(k, w[k] if self.T > 1 else w)
        mask = self.mask(r)
        kept = (r if self.space.values == "weighted" else self.taus[k]) * mask
        if self.space.rescale == "inverse_keep":
            kept = kept / self.density
        elif self.space.rescale == "l1":
            after = torch.zeros_like(self.tau_l1[k]).index_add_(0, self.seg, kept.abs())
            factor = torch.where(after > 0, self.tau_l1[k] / after.clamp(min=1e-30), torch.ones_like(after))
            kept = kept * factor[self.seg]
        return kept, mask

    def keep_delta(self, x, delta: torch.Tensor) -> None:
        """Remember ``delta`` as the delta of point ``x``: ``delta(x)`` then returns it (the same tensor, which no
        caller modifies) instead of computing it again. ``search`` keeps its best points' deltas this way, which
        the merge protocol's validation and the final answer ask for again."""
        self.__dict__.setdefault("_kept", {})[_point_key(x)] = delta

    def forget_deltas(self, keep=()) -> None:
        """Drop the remembered deltas but those of the points ``keep``."""
        kept = self.__dict__.get("_kept", {})
        wanted = {_point_key(x) for x in keep}
        for k in [k for k in kept if k not in wanted]:
            del kept[k]

    def delta(self, x: list[float]) -> torch.Tensor:
        """Flat Σ_k λ_k kept_k at point x."""
        hit = self.__dict__.get("_kept", {}).get(_point_key(x))
        if hit is not None:
            return hit
        lambdas, w = self.decode(x)
        if self.space.combine == "ties" and self.K > 1:
            from compress.merge.methods import combine

            # TIES' steps 2-3 on the searched vectors: the sign of Σ_k λ_k kept_k is elected per entry, and
            # each entry is the mean of the weighted values that agree with it
            stack = torch.stack([self.kept(k, w)[0] for k in range(self.K)])
            return combine(stack, lambdas, consensus="mass", sign_on="weighted", disjoint="mean", inplace=True)
        out = torch.zeros_like(self.taus[0])
        for k, lam in enumerate(lambdas):
            out.add_(self.kept(k, w)[0], alpha=lam)
        return out

    def starts(self) -> list[list[float]]:
        """Unweighted starting points (all part weights 1)."""
        if self.K == 1 and self.random:
            return [self.point([1.0])]
        if self.K == 1:
            kept, _ = self.kept(0, self.decode(self.point([1.0]))[1])
            l1 = float(self.taus[0].abs().sum() / kept.abs().sum().clamp(min=1e-30))
            scales = sorted({1.0, math.sqrt(l1), l1})
            return [self.point([s]) for s in scales]
        if self.space.combine == "ties":  # a disjoint mean wants larger λ than a sum (TIES' best λ is about 1)
            return [self.point([lam] * self.K) for lam in (0.5, 0.8, 1.0, 1.2, 1.5, 2.0)]
        return [self.point([lam] * self.K) for lam in (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]


# -- running a search against a model in memory --------------------------------------------------------------

class ModelSetter:
    """Writes θ_base + flat delta into a module's tensors in place (names as in the layout)."""

    def __init__(self, module: torch.nn.Module, layout: Layout, base: torch.Tensor):
        state = module.state_dict()
        missing = [n for n in layout.names if n not in state]
        if missing:
            raise CompressError(f"nps: task-vector tensor '{missing[0]}' is not in the model "
                                f"({len(missing)} missing)")
        self.params = [state[n] for n in layout.names]
        self.module, self.layout, self.base = module, layout, base

    @torch.no_grad()
    def __call__(self, delta: Optional[torch.Tensor]) -> None:
        for i, _, sl, shape in self.layout.slices():
            p = self.params[i]
            v = self.base[sl] if delta is None else self.base[sl] + delta[sl]
            p.copy_(v.reshape(shape))


@dataclass
class NpsResult:
    x: list[float]
    lambdas: list[float]
    weights: list[list[float]]
    groups: list[str]
    value: float
    start_value: float
    dev: dict
    evaluations: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    best_at: dict[int, list[float]] = field(default_factory=dict)  # the best point after n evaluations

    def as_dict(self, with_history: bool = True) -> dict:
        d = {k: getattr(self, k) for k in ("lambdas", "weights", "groups", "value", "start_value", "dev",
                                           "evaluations", "seconds")}
        if with_history:
            d["history"] = self.history
        return d


def search(problem: NpsProblem, setter: ModelSetter, objective: Callable, *, optimizer: str = "cma",
           budget: int = 100, sigma0: float = 0.5, popsize: Optional[int] = None, seed: int = 0,
           log: Optional[Callable[[dict], None]] = None, starts: Optional[list[list[float]]] = None,
           penalty: Optional[Callable[[torch.Tensor], float]] = None, checkpoints: tuple[int, ...] = ()
           ) -> NpsResult:
    """Evaluate the starts (default: the unweighted ones, ``NpsProblem.starts``), then run ``optimizer`` from the
    best of them; ``budget`` counts every evaluation (starts included). ``penalty(delta)`` is added to the
    objective's value (logged as ``penalty``). ``checkpoints``: numbers of evaluations after which the best point
    so far is kept in ``best_at`` (what a smaller budget would have returned). The model is left at the best point
    found."""
    from compress.search.optimize import minimize

    t0 = time.perf_counter()
    history: list[dict] = []
    best_at: dict[int, list[float]] = {}
    seen = {"n": 0, "best": math.inf, "x": None}
    problem.forget_deltas()  # an earlier search's best points: its caller has had them

    def f(x):
        delta = problem.delta(x)
        setter(delta)
        v, m = objective(setter.module)
        if penalty is not None:
            p = penalty(delta)
            v, m = v + p, {**m, "penalty": p}
        seen["n"] += 1
        if v < seen["best"]:
            seen["best"], seen["x"] = v, list(x)
            # the deltas of the best point and of the checkpoints' bests are asked for again (the answer, the
            # protocol's validation): kept, the others dropped, so at most len(checkpoints) + 1 are held
            problem.forget_deltas([seen["x"], *best_at.values()])
            problem.keep_delta(seen["x"], delta)
        if seen["n"] in checkpoints:
            best_at[seen["n"]] = seen["x"]
        return v, m

    starts = starts or problem.starts()
    if budget < len(starts) + 1:
        raise CompressError(f"nps: budget {budget} is below the {len(starts) + 1} evaluations the starts need")
    best_x, best_v = None, math.inf
    for x in starts:
        t = time.perf_counter()
        v, m = f(x)
        rec = {"i": len(history), "phase": "start", "x": [round(a, 6) for a in x], "value": float(v),
               "seconds": time.perf_counter() - t, **m}
        history.append(rec)
        if log:
            log(rec)
        if v < best_v:
            best_x, best_v = x, v
    start_value = best_v
    opts = {"seed": seed}
    if optimizer == "cma":
        opts.update(sigma0=sigma0, popsize=popsize)
    lo, hi = problem.bounds()

    def logged(rec):
        rec = {**rec, "i": len(history), "phase": optimizer}
        history.append(rec)
        if log:
            log(rec)

    res = minimize(optimizer, f, best_x, lo, hi, budget - len(starts), log=logged, **opts)
    x = res.x if res.value < best_v else best_x
    value = min(res.value, best_v)
    setter(problem.delta(x))
    _, dev = objective(setter.module)
    lambdas, w = problem.decode(x)
    best_at.update({n: x for n in checkpoints if n >= len(history)})  # the run stopped before them
    return NpsResult(x, lambdas, w.tolist(), problem.group_names, value, start_value, dev, len(history),
                     time.perf_counter() - t0, history, best_at)



# -- from checkpoints: load, search on the dev splits, write --------------------------------------------------

def load_flat(base, models: list, device: str, names: Optional[list[str]] = None
              ) -> tuple[Layout, torch.Tensor, list[torch.Tensor]]:
    """(layout, flat base, flat τ per model) over the float tensors of the task vectors (float32, on ``device``).
    ``names`` restricts the tensors (e.g. to those an encoder has)."""
    from compress.taskvec import TaskVector

    tvs = [TaskVector.from_paths(base, m) for m in models]
    use = [n for n in tvs[0].names() if (names is None or n in names) and tvs[0].info(n).dtype.is_floating_point]
    if not use:
        raise CompressError(f"nps: no float tensors shared by {base.path} and {models[0]}")
    for m, tv in zip(models[1:], tvs[1:]):
        missing = [n for n in use if n not in set(tv.names())]
        if missing:
            raise CompressError(f"nps: tensor '{missing[0]}' is in {models[0]} but not in {m}")
    layout = make_layout(use, [tuple(base.info(n).shape) for n in use], [base.info(n).dtype for n in use])
    base_flat = torch.empty(layout.numel, dtype=torch.float32, device=device)
    taus = [torch.empty(layout.numel, dtype=torch.float32, device=device) for _ in models]
    for _, name, sl, _ in layout.slices():
        base_flat[sl] = base.get(name, device=device, dtype=torch.float32).reshape(-1)
        for tau, tv in zip(taus, tvs):
            tau[sl] = tv.get(name, device=device).to(torch.float32).reshape(-1)
    return layout, base_flat, taus


def build_objectives(cfg, encoder, tokenizer, setter: ModelSetter, taus: list[torch.Tensor], halves: bool = False):
    """One ``TaskObjective`` per model's task (its head; KL reference = that fine-tuned model) and per keep task.
    ``halves``: (whole dev, search half, validation half) instead, the halves split by (seed, task)."""
    from compress.eval.classify import Head, TaskEvaluator
    from compress.search.objective import MeanObjective, TaskObjective
    from compress.search.protocol import split_halves

    s = cfg.search
    objs, parts = [], ([], [])
    heads = cfg.heads or cfg.models
    for task, head_dir, tau in zip(cfg.tasks, heads, taus):
        head = Head.load(head_dir)
        ev = TaskEvaluator(task, "dev", tokenizer=tokenizer, limit=s.dev_limit, max_length=head.max_length)
        setter(tau)
        rows = [None] + (list(split_halves(len(ev.data), s.seed, ev.task)) if halves else [])
        for r, where in zip(rows, (objs, *parts)):
            o = TaskObjective(ev, head, encoder, s.objective, s.batch_size, rows=r)
            o.set_reference(encoder)
            where.append(o)
    if halves:
        setter(None)
        return tuple(MeanObjective(o) for o in (objs, *parts))
    for task, head_dir in zip(cfg.keep, cfg.keep_heads):
        head = Head.load(head_dir)
        ev = TaskEvaluator(task, "dev", tokenizer=tokenizer, limit=s.dev_limit, max_length=head.max_length)
        objs.append(TaskObjective(ev, head, encoder, s.objective, s.batch_size))
    setter(None)
    return objs[0] if len(objs) == 1 else MeanObjective(objs)


def write_model(out, base, layout: Layout, delta: torch.Tensor, *, shard_size="5GB", overwrite=False,
                aux_from=None, head_from=None, card: Optional[dict] = None) -> None:
    """θ_base + delta as a Hugging Face folder (tensors outside the layout copied from the base); the tensors are
    ``compress.delta.reconstruct(base, delta, base dtype)``, the same that ``compress apply`` rebuilds."""
    from compress.io.deltafile import reconstruct
    from compress.io.writer import write_folder

    where = {n: sl for _, n, sl, _ in layout.slices()}

    def tensors():
        for name in base.names():
            b = base.get(name, device=delta.device)
            if name in where:
                b = reconstruct(b, delta[where[name]].reshape(b.shape), b.dtype)
            yield name, b

    files = {}
    if head_from is not None:
        from compress.eval.classify import HEAD_CONFIG, HEAD_WEIGHTS

        files = {f: (head_from / f).read_bytes() for f in (HEAD_WEIGHTS, HEAD_CONFIG) if (head_from / f).is_file()}
    card = card or {}
    write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(base.names()), shard_size=shard_size,
                 aux_from=aux_from if aux_from is not None else base.root, files=files,
                 card={"title": card.get("title", "NPS-pruned model"), "method": "compress nps",
                       "inputs": card.get("inputs", {}), "params": card.get("params", {})})


def write_nps_delta(out, base, layout: Layout, delta: torch.Tensor, mask: torch.Tensor, *, metadata: dict,
                    overwrite=False):
    """The searched model as a compact delta file: the kept entries of ``delta`` under ``mask``; ``compress apply``
    rebuilds exactly the tensors of ``write_model``."""
    from compress.delta import SparseDelta, write_delta

    def item(name, sl, shape) -> SparseDelta:  # locals die on return: write_delta holds the only reference
        b = base.get(name, device=delta.device)
        return SparseDelta(name, b, delta[sl].reshape(shape), mask[sl].reshape(shape), b.dtype)

    def items():
        for _, name, sl, shape in layout.slices():
            yield item(name, sl, shape)

    plan = [(name, tuple(shape), False) for _, name, _, shape in layout.slices()]
    return write_delta(out, items(), metadata=metadata, overwrite=overwrite, plan=plan)


def run_nps(cfg) -> dict:
    """Search (``cfg``: ``compress.config.NpsConfig``), write ``cfg.out`` when given, and return a summary."""
    import json

    from compress.eval.classify import load_encoder
    from compress.io.reader import open_checkpoint
    from compress.io.writer import check_output, config_inputs
    from compress.progress import console
    from compress.runtime import resolve_device

    device = resolve_device(cfg.device)
    if cfg.out is not None:
        check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    protect = resolve_protect(cfg, cfg.base)
    if protect is not None and protect.sparsity:
        raise CompressError("nps: --protect-sparsity is not supported; protected entries stay dense (counted in "
                            "the density)")
    base = open_checkpoint(cfg.base)
    encoder, tok = load_encoder(cfg.base, device=device)
    if tok is None:
        raise CompressError(f"{cfg.base}: no tokenizer files; NPS scores the dev split of each task with it")
    layout, base_flat, taus = load_flat(base, cfg.models, device, names=set(encoder.state_dict()))
    setter = ModelSetter(encoder, layout, base_flat)
    s = cfg.search
    protocol = cfg.mode == "merge" and s.anchor == "ties"
    objective = build_objectives(cfg, encoder, tok, setter, taus, halves=protocol)
    problem = NpsProblem(layout, taus, cfg.density, s, protect)
    log_file = open(cfg.log, "w") if cfg.log is not None else None
    try:
        def log(rec):
            if log_file is not None:
                log_file.write(json.dumps(rec) + "\n")
            if not cfg.quiet:
                console.print(f"[nps] {rec['i']:4d} {rec.get('phase', '')} value {rec['value']:.5f}", highlight=False)

        if protocol:
            from compress.search.protocol import merge_protocol

            dev, search_half, validation_half = objective
            proto = merge_protocol(problem, setter, search_half, validation_half, dev, run_search=search,
                                   strength=s.regularize,
                                   budget=s.budget, checkpoints=(s.budget // 4, s.budget // 2),
                                   optimizer=s.optimizer, sigma0=s.sigma0, popsize=s.popsize, seed=s.seed, log=log)
            res = proto.search
            res.x, res.lambdas = proto.x, problem.decode(proto.x)[0]
            res.weights = problem.decode(proto.x)[1].tolist()
            _, res.dev = dev(encoder)
        else:
            res = search(problem, setter, objective, optimizer=s.optimizer, budget=s.budget, sigma0=s.sigma0,
                         popsize=s.popsize, seed=s.seed, log=log)
    finally:
        if log_file is not None:
            log_file.close()
    delta = problem.delta(res.x)
    summary = {"mode": cfg.mode, "density": cfg.density, **res.as_dict(with_history=False),
               "kept": int(torch.count_nonzero(delta)), "params": layout.numel}
    if protocol:
        summary["protocol"] = proto.as_dict()
    if cfg.out is not None:
        meta = {"base": str(cfg.base), "finetuned": ",".join(map(str, cfg.models)), "method": "nps",
                "density": repr(cfg.density), "seed": str(s.seed),
                "nps": json.dumps({"lambdas": res.lambdas, "weights": res.weights, "groups": res.groups,
                                   "search": s.model_dump()})}
        if cfg.mode == "prune" and cfg.out.suffix == ".safetensors":
            _, mask = problem.kept(0, problem.decode(res.x)[1])
            d = write_nps_delta(cfg.out, base, layout, delta, mask, metadata=meta, overwrite=cfg.overwrite)
            summary.update(out=str(cfg.out), file_bytes=d.file_bytes, stored=d.kept)
        else:
            card = {"title": f"NPS {cfg.mode} (density {cfg.density:g})",
                    "inputs": {"base": str(cfg.base), **{f"model {i}": str(m) for i, m in enumerate(cfg.models)}},
                    "params": {"lambdas": res.lambdas, "parts": s.parts, "partition": s.partition}}
            write_model(cfg.out, base, layout, delta, shard_size=cfg.shard_size, overwrite=cfg.overwrite,
                        head_from=(cfg.heads or cfg.models)[0] if cfg.mode != "merge" else None, card=card)
            summary["out"] = str(cfg.out)
    return summary
