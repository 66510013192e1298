"""An NPS merge that generalizes: every setting chosen on dev data, and TIES whenever the search does not help.

The first NPS merge fitted 500 dev rows per task with dozens of free weights and 1800 evaluations, its defaults
picked on a test split: on tasks it had never seen it scored below TIES. The protocol here (``merge_protocol``):

1. each task's dev rows are split into a search half and a validation half (``split_halves``: seeded by
   (seed, task), disjoint, deterministic);
2. TIES' λ is tuned on the search half (the grid ``TIES_LAMBDAS``, best mean accuracy, ties to the smaller λ);
   that TIES merge is the search's only start, and its anchor;
3. the search minimizes the search-half objective plus ``strength`` · ‖δ(x) − δ_TIES‖² / ‖δ_TIES‖² (the squared
   distance from the TIES weights, relative to the TIES task vector's norm: ``anchor_penalty``), so a strength of
   0 is the free search and a large one stays at TIES;
4. the budget is chosen too: the best point after each of ``checkpoints`` evaluations is scored on the
   validation half, and the best of those (ties to the smaller budget) is the search's answer;
5. it is kept only if it beats TIES (the start) on the validation half by more than ``margin``; otherwise the
   answer is TIES with λ tuned on the whole dev split. ``ProtocolResult.chosen`` says which.

The search space must contain TIES: ``combine: ties``, ``select: topk`` and ``rescale: none`` (at all part
weights 1 and one λ for every task vector, the problem's point *is* TIES at that λ; ``topk: global`` is the
paper's trim, ``per_tensor`` PEFT's and mergekit's). The test split is never seen.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from compress.errors import CompressError

TIES_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0)


def split_halves(n: int, seed: int, key: str = "", fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(search rows, validation rows): a permutation of range(n) drawn from (seed, key), cut at ``fraction``;
    both halves sorted, disjoint, together all rows, neither empty."""
    if n < 2:
        raise CompressError(f"split: {n} dev row(s) for '{key}'; a search half and a validation half need 2")
    if not 0.0 < fraction < 1.0:
        raise CompressError(f"split: the search fraction must be in (0, 1), got {fraction}")
    digest = hashlib.sha256(f"{seed}:nps-split:{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    perm = torch.randperm(n, generator=g)
    cut = min(n - 1, max(1, round(n * fraction)))
    return perm[:cut].sort().values, perm[cut:].sort().values


def anchor_penalty(anchor: torch.Tensor, strength: float) -> Optional[Callable[[torch.Tensor], float]]:
    """``strength`` · ‖δ − anchor‖² / ‖anchor‖², or None for strength 0."""
    if strength < 0 or not math.isfinite(strength):
        raise CompressError(f"protocol: the regularization strength must be a finite number >= 0, got {strength}")
    if strength == 0:
        return None
    norm = float(anchor.double().pow(2).sum())
    if norm == 0:
        raise CompressError("protocol: the TIES merge is all zeros; there is nothing to regularize toward")

    def penalty(delta: torch.Tensor) -> float:
        return strength * float((delta - anchor).double().pow(2).sum()) / norm

    return penalty


def mean_accuracy(metrics: dict) -> float:
    """Mean accuracy over tasks (``MeanObjective``) or one task's (``TaskObjective``)."""
    return metrics["mean_acc"] if "mean_acc" in metrics else metrics["acc"]


def check_ties_space(space) -> None:
    """The search space must hold TIES (see the module's docstring)."""
    wrong = [f"{k}: {want}" for k, want in (("combine", "ties"), ("select", "topk"), ("rescale", "none"))
             if getattr(space, k) != want]
    if wrong:
        raise CompressError(f"protocol: the search starts from TIES, so its space needs {', '.join(wrong)}")


def tune_ties(problem, setter, objective, lambdas=TIES_LAMBDAS) -> tuple[float, dict[float, float]]:
    """TIES' λ with the best mean accuracy of ``objective`` over the grid (ties to the smaller λ), and every
    score seen."""
    # one λ for all vectors: the elected signs do not depend on it and the disjoint mean scales with it, so TIES at
    # λ is λ times TIES at 1 (one top-k pass for the whole grid)
    unit = problem.delta(problem.point([1.0] * problem.K))
    seen = {}
    for lam in lambdas:
        setter(unit * lam)
        seen[lam] = mean_accuracy(objective(setter.module)[1])
    return max(seen, key=lambda lam: (seen[lam], -lam)), seen


@dataclass
class ProtocolResult:
    chosen: str  # "nps" or "ties"
    x: list[float]  # the answer's point
    delta: torch.Tensor = field(repr=False)  # the answer's flat merged task vector
    ties_lambda_search: float  # TIES' λ on the search half: the start and anchor
    ties_lambda_dev: float  # TIES' λ on the whole dev split: the fallback
    validation: dict  # mean validation accuracy: "ties" (the start), "nps" (the kept search point), by budget
    budget: int  # the chosen budget
    search: object = field(repr=False)  # the NpsResult
    strength: float = 0.0
    ties_search_by_lambda: dict = field(default_factory=dict)
    ties_dev_by_lambda: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "ties_lambda_search": self.ties_lambda_search,
                "ties_lambda_dev": self.ties_lambda_dev, "validation": self.validation, "budget": self.budget,
                "strength": self.strength, "lambdas": self.search.lambdas, "evaluations": self.search.evaluations,
                "seconds": self.search.seconds, "start_value": self.search.start_value,
                "value": self.search.value,
                "ties_search_by_lambda": {str(k): v for k, v in self.ties_search_by_lambda.items()},
                "ties_dev_by_lambda": {str(k): v for k, v in self.ties_dev_by_lambda.items()}}


def merge_protocol(problem, setter, search_objective, validation_objective, dev_objective, *, run_search: Callable,
                   strength: float,
                   budget: int, checkpoints: tuple[int, ...] = (), optimizer: str = "cma", sigma0: float = 0.5,
                   popsize: Optional[int] = None, seed: int = 0, margin: float = 0.0, lambdas=TIES_LAMBDAS,
                   log: Optional[Callable[[dict], None]] = None, tuned: Optional[dict] = None) -> ProtocolResult:
    """Steps 2–5 of the module's docstring, on objectives built from the search half, the validation half and the
    whole dev split; ``run_search`` is ``compress.search.nps.search`` (passed in: nps runs this protocol, so
    this module does not import it). ``tuned``: a dict that keeps the TIES tunings (``tune_ties``) for the next
    call on the same objectives (several candidate settings of one split). The model is left at the answer."""
    check_ties_space(problem.space)
    if problem.K < 2:
        raise CompressError("protocol: merging needs two task vectors or more")
    checkpoints = tuple(sorted({b for b in (*checkpoints, budget) if 2 <= b <= budget}))
    tuned = {} if tuned is None else tuned
    if "search" not in tuned:
        tuned["search"] = tune_ties(problem, setter, search_objective, lambdas)
    lam_s, by_lam_s = tuned["search"]
    x0 = problem.point([lam_s] * problem.K)
    anchor = problem.delta(x0)
    res = run_search(problem, setter, search_objective, optimizer=optimizer, budget=budget, sigma0=sigma0,
                 popsize=popsize, seed=seed, log=log, starts=[x0], penalty=anchor_penalty(anchor, strength),
                 checkpoints=checkpoints)

    def validate(x, delta=None) -> float:
        setter(problem.delta(x) if delta is None else delta)
        return mean_accuracy(validation_objective(setter.module)[1])

    ties_val = validate(x0, anchor)
    by_budget = {b: validate(res.best_at[b]) for b in checkpoints}
    best_b = max(by_budget, key=lambda b: (by_budget[b], -b))
    validation = {"ties": ties_val, "nps": by_budget[best_b], "by_budget": {str(b): v for b, v in by_budget.items()}}
    if "dev" not in tuned:
        tuned["dev"] = tune_ties(problem, setter, dev_objective, lambdas)
    lam_d, by_lam_d = tuned["dev"]
    if by_budget[best_b] > ties_val + margin:
        chosen, x = "nps", res.best_at[best_b]
    else:
        chosen, x = "ties", problem.point([lam_d] * problem.K)
    delta = problem.delta(x)
    setter(delta)
    return ProtocolResult(chosen, x, delta, lam_s, lam_d, validation, best_b, res, strength, by_lam_s, by_lam_d)
