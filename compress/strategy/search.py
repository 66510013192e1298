"""The per-request baseline: search one request's strategy with CMA-ES or Bayesian optimization
(``compress.search.optimize``) over the same evaluator and the same feasible set as StratNet.

The search variable is the raw vector z ∈ [−4, 4]ⁿ of the exact projection (``project.project``), so every point
it tries meets the request's sparsity exactly; it starts at z = 0, the uniform strategy, which is evaluated first,
so the result is never worse than uniform on the evaluator's windows. A preference request adds one coordinate,
the mean sparsity's logit over the range, and minimizes the same Tchebycheff scalarization as StratNet, with the
quality term normalized by the true log KL of the uniform strategies at both ends of the range (two more
evaluations, counted in the budget).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from compress.strategy.project import project

Z_BOUND = 4.0


def search_sparsity(evaluator, target: float, block_params: Sequence[int], *, spread: float, max_block: float,
                    optimizer: str = "cma", budget: int = 100, seed: int = 0, sigma0: float = 1.0) -> dict:
    """Best strategy at mean ``target`` within ``budget`` evaluations: {strategy, kl, uniform_kl, evaluations,
    seconds, optimizer}."""
    from compress.search.optimize import minimize

    n = len(block_params)

    def strategy(z):
        return project(torch.tensor(z, dtype=torch.float64), target, block_params, spread=spread,
                       max_block=max_block).tolist()

    def f(z):
        rec = evaluator.evaluate(strategy(z), phase="search", target=target)
        return rec["kl"]

    opts = {"seed": seed, **({"sigma0": sigma0} if optimizer == "cma" else {})}
    t0 = time.perf_counter()
    res = minimize(optimizer, f, [0.0] * n, [-Z_BOUND] * n, [Z_BOUND] * n, budget, **opts)
    return {"target": target, "strategy": strategy(res.x), "kl": res.value, "uniform_kl": res.start_value,
            "evaluations": res.evaluations, "seconds": time.perf_counter() - t0, "optimizer": res.optimizer}


def search_preference(evaluator, lam: float, block_params: Sequence[int], sparsity_range: tuple[float, float], *,
                      spread: float, max_block: float, optimizer: str = "cma", budget: int = 100, seed: int = 0,
                      sigma0: float = 1.0) -> dict:
    """Best Tchebycheff trade-off for preference λ (see the module docstring): minimizes
    max(λ·(hi − t)/(hi − lo), (1 − λ)·normalized log KL) over the mean sparsity t ∈ ``sparsity_range`` and the
    strategy at t, so a larger λ (more weight on size) gives a sparser answer, λ = 1 the top of the range."""
    from compress.search.optimize import minimize

    lo, hi = sparsity_range
    n = len(block_params)
    t0 = time.perf_counter()
    ends = [math.log(max(evaluator.evaluate([v] * n, phase="search-normalize")["kl"], 1e-12)) for v in (lo, hi)]
    scale = ends[1] - ends[0] if ends[1] - ends[0] > 1e-9 else 1.0

    def point(x):
        t = lo + (hi - lo) / (1 + math.exp(-x[-1]))
        s = project(torch.tensor(x[:-1], dtype=torch.float64), t, block_params, spread=spread, max_block=max_block)
        return s.tolist(), t

    def f(x):
        s, t = point(x)
        rec = evaluator.evaluate(s, phase="search", preference=lam)
        value = max(lam * (hi - t) / (hi - lo), (1 - lam) * (math.log(max(rec["kl"], 1e-12)) - ends[0]) / scale)
        return value, {"kl": rec["kl"], "mean": t}

    opts = {"seed": seed, **({"sigma0": sigma0} if optimizer == "cma" else {})}
    res = minimize(optimizer, f, [0.0] * (n + 1), [-Z_BOUND] * (n + 1), [Z_BOUND] * (n + 1), max(2, budget - 2),
                   **opts)
    s, t = point(res.x)
    best = min(res.history, key=lambda r: r["value"])
    return {"preference": lam, "strategy": s, "mean": t, "kl": best["kl"], "value": res.value,
            "evaluations": res.evaluations + 2, "seconds": time.perf_counter() - t0, "optimizer": res.optimizer}
