"""Merge methods as pure per-tensor functions (DESIGN principles 2 and 5).

Every task-vector method is one generalized procedure (as mergekit's generalized task arithmetic):

    1. sparsify each τ_i                ``sparsify``: none | magnitude | random (DARE) | outliers (Breadcrumbs) |
                                        della (MAGPRUNE), with ``rescale``: none | inverse_keep | l1
    2. elect a sign per entry           ``consensus``: none | mass | count, over ``sign_on``: unweighted | weighted
    3. combine                          ``disjoint``: mean | weighted_mean | sum (with a consensus), else
                                        Σ w_i τ_i, divided by Σ w_i when ``normalize``
    4. scale by λ                       merged delta = λ · combined

Named methods are presets of those switches (``METHODS``), defaulting to the paper. Where the papers, PEFT
(``peft.utils.merge_utils``) and mergekit differ, the switch says which is which:

===============  ======================  ======================  =========================================
switch           paper (default)         PEFT                    mergekit
===============  ======================  ======================  =========================================
topk (TIES)      global (TIES code)      per_tensor              per_tensor
sign_on          unweighted              unweighted              weighted (elects on w_i·τ_i)
sign_method      mass (Σ τ)              mass ("total")          mass ("sum")
disjoint         mean (÷ #agreeing)      mean                    weighted_mean (normalize: true) or sum
rescale (DARE)   inverse_keep (1/p)      inverse_keep            l1 (norm matching)
rescale (DELLA)  inverse_keep (1/p_i)    n/a                     l1
===============  ======================  ======================  =========================================

**Protection** (``protect``: a bool mask per tensor, ``compress.sparsify.protect``, e.g. the q/k/v rows and
o_proj columns of chosen heads): protected entries of every task vector skip step 1. They are neither trimmed,
dropped nor rescaled, so each protected entry of the merged tensor is exactly (bit for bit) what the same merge
gives at density 1: steps 2–4 (sign election, disjoint mean, weights, λ) still apply to them as to every entry,
since a merge of several models has no single "original" value to keep. The protected entries count towards the
kept total: magnitude top-k keeps ⌊density·n⌋ − P of the free entries (the global top-k likewise over the
model), DARE keeps each free entry with p' = (density·n − P)/(n − P) and rescales by 1/p', an l1 rescale
matches the free entries' norm; Breadcrumbs and DELLA apply their own rule to the free entries only. With a
protect ``sparsity`` x the protected entries are sparsified too, by the same rule at density 1 − x, separately
from the free ones.

Top-k keeps ⌊density·n⌋ entries (at least one), as PEFT and mergekit do; equal magnitudes at the threshold are
kept lowest index first unless ``tie_break: argsort`` asks for mergekit's (sort-order) choice. Functions take
stacked deltas ``[n_models, *shape]`` in a float dtype and return the merged delta; nothing here reads a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch

from compress.errors import CompressError
from compress.merge.subspace import SUBSPACE_METHODS
from compress.sparsify.masks import keep_count
from compress.sparsify.topk import magnitude_bits, topk_mask

Sparsify = Literal["magnitude", "random", "outliers", "della"]
Rescale = Literal["none", "inverse_keep", "l1"]
Consensus = Literal["mass", "count"]


# -- step 1: sparsify one task vector tensor -------------------------------------------------------------------

def _l1_rescale(kept: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``RescaleNorm.l1``: scale the kept entries so the tensor's L1 norm is unchanged."""
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude_keep(delta: torch.Tensor, density: float, tie_break: str = "index") -> torch.Tensor:
    """Boolean keep-mask of the ⌊density·n⌋ largest |δ| (TIES' trim, PEFT ``magnitude_based_pruning``).

    Equal magnitudes at the threshold (common in bf16 deltas) are kept lowest index first ("index": exact
    radix selection, the same on every device), or in the order of ``torch.argsort(descending=True)``
    ("argsort": mergekit's order, bit-exact with it on the same torch build, several times slower).
    """
    k = keep_count(delta.numel(), density, "floor")  # PEFT and mergekit truncate
    if tie_break == "index":
        return topk_mask(delta, k)
    return _argsort_keep(delta, k)


def outlier_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the ⌊gamma·n⌋ largest |δ| (outliers) and keep the next
    ⌊density·n⌋; everything smaller is dropped. Same counts and order as mergekit's ``magnitude_outliers``."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.argsort(magnitude_bits(delta), stable=True)  # ascending |δ|, ties by index
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom: bottom + keep]] = True
    return mask.reshape(delta.shape)


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE (Deep et al. 2024): per row, keep probabilities rise linearly with the magnitude rank
    from density−ε (smallest) to density+ε (largest). 1-D tensors are one row (as mergekit)."""
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise CompressError(f"della: density ± epsilon must lie in (0, 1) (density {density}, epsilon {epsilon})")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    span = max(rows.shape[1] - 1, 1)
    return ((density - epsilon) + ranks / span * 2 * epsilon).reshape(delta.shape)


def protected_kept(n_protected: int, protect_sparsity: Optional[float]) -> int:
    """Protected entries a task vector keeps: all, or all but round(P·x) with a protect sparsity x."""
    return n_protected - int(round(n_protected * (protect_sparsity or 0.0)))


def _sparsify_protected(delta: torch.Tensor, method: Sparsify, density: float, rescale: Rescale, gamma: float,
                        epsilon: float, generator: Optional[torch.Generator], keep: Optional[torch.Tensor],
                        tie_break: str, protect: torch.Tensor, x: Optional[float]) -> torch.Tensor:
    free = ~protect
    n, P = delta.numel(), int(protect.sum())
    kp = protected_kept(P, x)
    if method in ("magnitude", "outliers"):
        mask = torch.zeros_like(protect)
        if keep is not None:  # a global threshold, already over the free entries
            mask |= keep & free
        elif method == "magnitude":
            k = max(0, min(n - P, keep_count(n, density, "floor") - kp))
            mask[free] = topk_mask(delta[free], k) if tie_break == "index" else _argsort_keep(delta[free], k)
        else:
            mask[free] = outlier_keep(delta[free], density, gamma)
        if kp == P:
            mask |= protect
        elif kp:
            mask[protect] = topk_mask(delta[protect], kp)
        kept = delta * mask
        if rescale == "l1":
            kept = torch.where(free, _l1_rescale(kept * free, delta * free), kept)
        return kept
    if method == "random":
        pf = (density * n - kp) / (n - P) if n > P else 0.0
        p = torch.full(delta.shape, float(min(max(pf, 0.0), 1.0)), dtype=torch.float32)
    else:
        p = della_keep_prob(delta.cpu(), density, epsilon)
    p[protect.cpu()] = 1.0 - (x or 0.0)
    mask = torch.bernoulli(p, generator=generator).to(delta.device, delta.dtype)
    kept = delta * mask
    if rescale == "inverse_keep":
        return kept / p.to(delta.device, delta.dtype).clamp(min=torch.finfo(torch.float32).tiny)
    if rescale == "l1":
        fm = free.to(delta.dtype)
        return torch.where(free, _l1_rescale(kept * fm, delta * fm), kept)
    return kept


def _argsort_keep(delta: torch.Tensor, k: int) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.argsort(w, descending=True)[:k]] = True
    return mask.reshape(delta.shape)


def sparsify_delta(delta: torch.Tensor, method: Optional[Sparsify], density: float, *, rescale: Rescale = "none",
                   gamma: float = 0.01, epsilon: float = 0.15, generator: Optional[torch.Generator] = None,
                   keep: Optional[torch.Tensor] = None, tie_break: str = "index",
                   protect: Optional[torch.Tensor] = None, protect_sparsity: Optional[float] = None) -> torch.Tensor:
    """One task-vector tensor after step 1. ``keep`` overrides the magnitude mask (a global top-k threshold).
    ``protect``: entries that skip step 1 (see the module docstring; ``protect_sparsity`` sparsifies them too).

    Random draws (DARE, DELLA) come from ``generator`` on the CPU, so they do not depend on the device; a
    ``torch.bernoulli`` per tensor, the same call PEFT makes, so a generator seeded like PEFT's global RNG
    reproduces PEFT's masks.
    """
    if method is not None and protect is not None and bool(protect.any()):
        if method not in ("magnitude", "outliers", "random", "della"):
            raise CompressError(f"unknown sparsification '{method}' (choose magnitude, random, outliers, della)")
        return _sparsify_protected(delta, method, density, rescale, gamma, epsilon, generator, keep, tie_break,
                                   protect, protect_sparsity)
    if method is None or (density >= 1.0 and method != "della" and keep is None):
        return delta
    if method == "magnitude":
        mask = keep if keep is not None else magnitude_keep(delta, density, tie_break)
        kept = delta * mask
        return _l1_rescale(kept, delta) if rescale == "l1" else kept
    if method == "outliers":
        kept = delta * outlier_keep(delta, density, gamma)
        return _l1_rescale(kept, delta) if rescale == "l1" else kept
    if method == "random":
        p = torch.full(delta.shape, float(density), dtype=torch.float32)
    elif method == "della":
        p = della_keep_prob(delta.cpu(), density, epsilon)
    else:
        raise CompressError(f"unknown sparsification '{method}' (choose magnitude, random, outliers, della)")
    mask = torch.bernoulli(p, generator=generator).to(delta.device, delta.dtype)
    kept = delta * mask
    if rescale == "inverse_keep":
        return kept / p.to(delta.device, delta.dtype)
    if rescale == "l1":
        return _l1_rescale(kept, delta)
    return kept


# -- steps 2–4: combine --------------------------------------------------------------------------------------

def _weights(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != n:
        raise CompressError(f"{w.numel()} weights for {n} models")
    return w.reshape((n,) + (1,) * (like.dim() - 1))


def majority_sign(deltas: torch.Tensor, method: Consensus = "mass") -> torch.Tensor:
    """+1/−1 per entry: the sign of Σ_i δ_i ("mass", TIES) or of Σ_i sign(δ_i) ("count"); a zero sum elects +1
    (PEFT's and mergekit's ``>= 0``)."""
    score = deltas.sum(0) if method == "mass" else deltas.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(deltas.dtype)


def combine(deltas: torch.Tensor, weights, *, consensus: Optional[Consensus] = None,
            sign_on: Literal["unweighted", "weighted"] = "unweighted",
            disjoint: Literal["mean", "weighted_mean", "sum"] = "mean", normalize: bool = False,
            lam: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """Steps 2–4 on already-sparsified stacked deltas ``[n, *shape]``: λ · (disjoint merge or weighted sum).
    ``inplace``: ``deltas`` may be overwritten (saves a copy of the stack)."""
    n = deltas.shape[0]
    w = _weights(weights, n, deltas)
    if inplace and (consensus is None or sign_on == "weighted"):
        weighted = deltas.mul_(w)
        deltas = weighted  # only the weighted values are needed from here on
    else:
        weighted = deltas * w
    if consensus is None:
        merged = weighted.sum(0)
        if normalize:
            total = w.sum()
            merged = merged / (total if total.abs() > 1e-8 else 1.0)
    else:
        voters = weighted if sign_on == "weighted" else deltas
        agree = (voters.sign() == majority_sign(voters, consensus)).to(deltas.dtype)  # zeros never agree
        merged = (weighted * agree).sum(0)
        if disjoint == "mean":
            merged = merged / agree.sum(0).clamp(min=1.0)
        elif disjoint == "weighted_mean":
            div = (w * agree).sum(0)
            merged = merged / torch.where(div == 0, torch.ones_like(div), div)
        elif disjoint != "sum":
            raise CompressError(f"unknown disjoint rule '{disjoint}' (choose mean, weighted_mean, sum)")
    return merged.mul_(lam) if lam != 1.0 else merged


# -- the named methods -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A generalized task-arithmetic preset; every field is a switch a recipe may override."""

    name: str
    sparsify: Optional[Sparsify] = None
    consensus: Optional[Consensus] = None
    rescale: Rescale = "none"
    topk: Literal["per_tensor", "global"] = "per_tensor"
    sign_on: Literal["unweighted", "weighted"] = "unweighted"
    disjoint: Literal["mean", "weighted_mean", "sum"] = "mean"
    normalize: bool = False
    tie_break: Literal["index", "argsort"] = "index"
    paper: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("task_arithmetic", paper="Ilharco et al. 2023, Editing models with task arithmetic"),
    Method("magnitude_prune", sparsify="magnitude",
           paper="per-tensor magnitude-pruned task arithmetic (PEFT magnitude_prune)"),
    Method("ties", sparsify="magnitude", consensus="mass", topk="global",
           paper="Yadav et al. 2023, TIES-Merging (trim by a global top-k, elect by mass, disjoint mean)"),
    Method("dare_linear", sparsify="random", rescale="inverse_keep",
           paper="Yu et al. 2024, DARE (drop with p = 1 − density, rescale by 1/(1 − p)), then task arithmetic"),
    Method("dare_ties", sparsify="random", rescale="inverse_keep", consensus="mass",
           paper="Yu et al. 2024, DARE, then TIES' sign election and disjoint mean"),
    Method("breadcrumbs", sparsify="outliers",
           paper="Davari & Belilovsky 2023, Model Breadcrumbs (drop outliers and the small tail per tensor)"),
    Method("breadcrumbs_ties", sparsify="outliers", consensus="mass",
           paper="Model Breadcrumbs masks with TIES' sign election (mergekit breadcrumbs_ties)"),
    Method("della", sparsify="della", rescale="inverse_keep", consensus="mass",
           paper="Deep et al. 2024, DELLA-Merging (MAGPRUNE, rescale by 1/p_i, elect, disjoint mean)"),
    Method("della_linear", sparsify="della", rescale="inverse_keep",
           paper="DELLA's MAGPRUNE followed by task arithmetic (mergekit della_linear)"),
)}

FULL_WEIGHT_METHODS = ("linear", "slerp")
ALL_METHODS = tuple(METHODS) + FULL_WEIGHT_METHODS
ALL_METHODS += tuple(SUBSPACE_METHODS) + ("adamerging",)  # compress.merge.subspace, compress.merge.adamerging


def check_method(name: str) -> str:
    """``name`` if the registry has it, else the one-line error every entry point gives."""
    if name not in ALL_METHODS:
        raise CompressError(f"unknown merge method '{name}' (choose one of {', '.join(ALL_METHODS)})")
    return name


def check_config(cfg) -> None:
    """What the schema cannot know without the registry: ``cfg`` (a ``config.MergeConfig``) names a method here,
    and a method whose top-k is global gets one density per model (not a gradient or filters)."""
    check_method(cfg.method)
    if cfg.method not in METHODS:
        return
    m = method_preset(cfg.method, cfg.variant, **cfg.overrides())
    if m.sparsify == "magnitude" and m.topk == "global":
        scopes = [("parameters", cfg.parameters)] + [(f"models.{i}.parameters", mm.parameters)
                                                     for i, mm in enumerate(cfg.models)]
        for where, scope in scopes:
            d = scope.get("density")
            if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float))):
                raise CompressError(f"{where}.density: a global top-k ({cfg.method}, variant {cfg.variant}) takes "
                                    f"one density per model, got {d!r}; give a number or set topk: per_tensor")


def method_preset(name: str, variant: str = "paper", **overrides) -> Method:
    """The preset for ``name`` in a ``variant`` (paper | peft | mergekit), with explicit overrides on top."""
    if name not in METHODS:
        check_method(name)
        raise CompressError(f"merge method '{name}' averages full weights; it has no task-vector preset")
    m = METHODS[name]
    if variant == "peft":
        m = replace(m, topk="per_tensor")
    elif variant == "mergekit":
        normalize = name in ("ties", "della")  # mergekit's per-method `normalize` defaults
        m = replace(m, topk="per_tensor", sign_on="weighted", normalize=normalize,
                    disjoint="weighted_mean" if normalize else "sum",
                    rescale="l1" if m.rescale != "none" else "none")
    elif variant != "paper":
        raise CompressError(f"unknown variant '{variant}' (choose paper, peft or mergekit)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "normalize" in overrides and m.consensus is not None and variant == "mergekit" and "disjoint" not in overrides:
        overrides["disjoint"] = "weighted_mean" if overrides["normalize"] else "sum"
    return replace(m, **overrides)


def task_vector_merge(deltas: torch.Tensor, weights, method: Method, *, density=1.0, lam: float = 1.0,
                      gamma=0.01, epsilon=0.15, generator: Optional[torch.Generator] = None,
                      keep: Optional[list[Optional[torch.Tensor]]] = None, inplace: bool = False,
                      protect: Optional[torch.Tensor] = None, protect_sparsity: Optional[float] = None
                      ) -> torch.Tensor:
    """The merged delta of stacked task-vector tensors ``[n, *shape]`` under a ``Method`` preset.

    ``density``, ``gamma`` and ``epsilon`` may be one value or one per model; ``keep`` gives per-model
    precomputed masks (global top-k). Random draws consume ``generator`` model by model, in order. ``inplace``:
    ``deltas`` may be overwritten. ``protect``: a bool mask of the tensor's protected entries (skip step 1).
    """
    n = deltas.shape[0]

    def per_model(v):
        v = list(v) if isinstance(v, (list, tuple)) else [v] * n
        if len(v) != n:
            raise CompressError(f"{len(v)} values for {n} models")
        return v

    dens, gams, epss = per_model(density), per_model(gamma), per_model(epsilon)
    if method.sparsify is not None:
        deltas = torch.stack([
            sparsify_delta(deltas[i], method.sparsify, dens[i], rescale=method.rescale, gamma=gams[i],
                           epsilon=epss[i], generator=generator, keep=None if keep is None else keep[i],
                           tie_break=method.tie_break, protect=protect, protect_sparsity=protect_sparsity)
            for i in range(n)])
        inplace = True  # the stack is a new tensor now
    return combine(deltas, weights, consensus=method.consensus, sign_on=method.sign_on, disjoint=method.disjoint,
                   normalize=method.normalize, lam=lam, inplace=inplace)


# -- full-weight methods ---------------------------------------------------------------------------------------

def linear(tensors: torch.Tensor, weights, normalize: bool = True) -> torch.Tensor:
    """Weighted average of full weights (Wortsman et al. 2022, model soups; mergekit ``linear``):
    Σ w_i θ_i, divided by Σ w_i when ``normalize``."""
    w = _weights(weights, tensors.shape[0], tensors)
    out = (tensors * w).sum(0)
    return out / w.sum() if normalize else out


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (Shoemake 1985; mergekit ``slerp``): the angle comes from the
    flattened, normalized tensors and the coefficients apply to the originals; nearly collinear (|cos| above
    ``dot_threshold``) falls back to linear interpolation. t=0 gives v0, t=1 gives v1."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1
