"""Gradient-free minimizers with one interface: ``minimize(f, x0, lower, upper, budget, ...) -> SearchResult``.

``f`` maps a point (a list of floats) to a value to minimize; every call is logged in ``SearchResult.history``
(point, value and whatever extra metrics ``f`` returns as ``(value, metrics)``). Both optimizers spend exactly
``budget`` evaluations at most, counting the starting point, which is always evaluated first, so the best point
found is never worse than the start.

* ``cma_es``: CMA-ES (Hansen's ``cma`` package, the optimizer of the NPS paper): ``popsize`` (default cma's
  4 + ⌊3 ln D⌋), ``sigma0`` in the units of the search space, box bounds handled by ``cma``'s ``BoundTransform``.
* ``bayes``: Bayesian optimization with ``botorch``: a ``SingleTaskGP`` on inputs scaled to the unit box and
  standardized outcomes, ``LogExpectedImprovement`` maximized by ``optimize_acqf``; ``init`` Sobol points around
  the start (inside the box) before the first fit; the whole run is a function of ``seed`` (botorch's draws from
  the global RNG are seeded inside, the caller's RNG left as it was).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from compress.errors import CompressError

Objective = Callable[[list[float]], "float | tuple[float, dict]"]


@dataclass
class SearchResult:
    x: list[float]
    value: float
    start_value: float
    evaluations: int
    seconds: float
    optimizer: str
    history: list[dict] = field(default_factory=list)

    def as_dict(self, with_history: bool = True) -> dict:
        d = {"x": self.x, "value": self.value, "start_value": self.start_value, "evaluations": self.evaluations,
             "seconds": self.seconds, "optimizer": self.optimizer}
        if with_history:
            d["history"] = self.history
        return d


class _Log:
    """Wraps ``f``: counts, times and records every evaluation; remembers the best."""

    def __init__(self, f: Objective, budget: int, log: Optional[Callable[[dict], None]]):
        self.f, self.budget, self.log = f, budget, log
        self.history: list[dict] = []
        self.best_x: Optional[list[float]] = None
        self.best = math.inf
        self.t0 = time.perf_counter()

    @property
    def left(self) -> int:
        return self.budget - len(self.history)

    def __call__(self, x: Sequence[float]) -> float:
        x = [float(v) for v in x]
        t = time.perf_counter()
        out = self.f(x)
        value, metrics = (out if isinstance(out, tuple) else (out, {}))
        value = float(value)
        if not math.isfinite(value):
            value = 1e30  # a diverged candidate is the worst, not an error
        rec = {"i": len(self.history), "x": [round(v, 6) for v in x], "value": value,
               "seconds": time.perf_counter() - t, **metrics}
        self.history.append(rec)
        if self.log is not None:
            self.log(rec)
        if value < self.best:
            self.best, self.best_x = value, x
        return value

    def result(self, name: str) -> SearchResult:
        return SearchResult(self.best_x, self.best, self.history[0]["value"], len(self.history),
                            time.perf_counter() - self.t0, name, self.history)


def _check(x0, lower, upper, budget):
    if budget < 1:
        raise CompressError(f"search: budget must be >= 1 evaluation (got {budget})")
    if not (len(x0) == len(lower) == len(upper)):
        raise CompressError("search: x0, lower and upper differ in length")
    for i, (a, v, b) in enumerate(zip(lower, x0, upper)):
        if not a <= v <= b:
            raise CompressError(f"search: start coordinate {i} = {v} is outside its bounds [{a}, {b}]")


def cma_es(f: Objective, x0: Sequence[float], lower: Sequence[float], upper: Sequence[float], budget: int, *,
           sigma0: float = 0.3, popsize: Optional[int] = None, seed: int = 0,
           log: Optional[Callable[[dict], None]] = None) -> SearchResult:
    """CMA-ES from ``x0`` (evaluated first) within the box, ``budget`` evaluations in all."""
    import cma

    _check(x0, lower, upper, budget)
    ev = _Log(f, budget, log)
    ev(list(x0))
    opts = {"bounds": [list(lower), list(upper)], "seed": seed + 1, "verbose": -9, "maxfevals": budget,
            "tolfun": 0, "tolx": 1e-8, "tolflatfitness": 1e9}
    if popsize:
        opts["popsize"] = popsize
    if len(x0) == 1:
        # cma refuses one-dimensional problems; a constant second coordinate leaves the search unchanged
        es = cma.CMAEvolutionStrategy([x0[0], 0.0], sigma0, {**opts, "bounds": [[lower[0], -1], [upper[0], 1]],
                                                                 "fixed_variables": {1: 0.0}})
    else:
        es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
    while ev.left > 0 and not es.stop():
        pop = es.ask()
        pop = pop[:ev.left]
        vals = [ev(p[: len(x0)]) for p in pop]
        if len(pop) < es.popsize:
            break
        es.tell(pop, vals)
    return ev.result("cma-es")


def bayes(f: Objective, x0: Sequence[float], lower: Sequence[float], upper: Sequence[float], budget: int, *,
          init: Optional[int] = None, seed: int = 0, radius: float = 0.25,
          log: Optional[Callable[[dict], None]] = None) -> SearchResult:
    """Bayesian optimization from ``x0`` (evaluated first): ``init`` Sobol points in a box of ``radius`` (a
    fraction of each bound's width) around ``x0``, then one LogEI point per step over the whole box."""
    import torch

    _check(x0, lower, upper, budget)
    ev = _Log(f, budget, log)
    d = len(x0)
    lo = torch.tensor(list(lower), dtype=torch.float64)
    hi = torch.tensor(list(upper), dtype=torch.float64)
    start = torch.tensor(list(x0), dtype=torch.float64)
    xs = [start]
    ys = [ev(list(x0))]
    n_init = min(ev.left, init if init is not None else max(2, d + 1))
    if n_init:
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n_init).to(torch.float64)
        width = (hi - lo) * radius
        pts = torch.maximum(torch.minimum(start + (2 * sobol - 1) * width, hi), lo)
        for p in pts:
            xs.append(p)
            ys.append(ev(p.tolist()))
    bounds = torch.stack([lo, hi])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        # botorch's acquisition restarts and the fit's retries draw from the global RNG: seeded here (and the
        # caller's RNG left as it was) so that one seed gives one run
        torch.manual_seed(seed)
        _bayes_steps(ev, xs, ys, lo, hi, bounds, g)
    return ev.result("bayes")


def _bayes_steps(ev, xs, ys, lo, hi, bounds, g):
    import torch
    from botorch.acquisition import LogExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    d = len(lo)
    while ev.left > 0:
        X = torch.stack(xs)
        Y = -torch.tensor(ys, dtype=torch.float64).unsqueeze(-1)  # botorch maximizes
        gp = SingleTaskGP(X, Y, input_transform=Normalize(d, bounds=bounds), outcome_transform=Standardize(1))
        try:
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
            acq = LogExpectedImprovement(gp, best_f=Y.max())
            cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=4, raw_samples=64)
            p = cand[0].detach()
        except Exception:  # a degenerate fit (all values equal) falls back to a random point in the box
            p = lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64)
        xs.append(p)
        ys.append(ev(p.tolist()))


OPTIMIZERS = {"cma": cma_es, "bayes": bayes}


def minimize(optimizer: str, f: Objective, x0, lower, upper, budget: int, **opts) -> SearchResult:
    if optimizer not in OPTIMIZERS:
        raise CompressError(f"search: unknown optimizer '{optimizer}' (choose {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[optimizer](f, x0, lower, upper, budget, **opts)
