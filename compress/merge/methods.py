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

Top-k keeps ⌊density·n⌋ entries (none when that rounds to 0, as PEFT), equal magnitudes at the threshold kept
lowest index first; ``tie_break: argsort`` (the mergekit variant's default) takes mergekit's selection instead:
max(1, ⌊density·n⌋) entries in ``torch.argsort``'s order, and Breadcrumbs in its unstable ``torch.sort``'s
order (``magnitude_keep``, ``outlier_keep``). Functions take
stacked deltas ``[n_models, *shape]`` in a float dtype and return the merged delta; nothing here reads a checkpoint.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

import torch

from compress.config import WEIGHT_METHOD_PARAMS
from compress.errors import CompressError
from compress.merge import elementwise as e
from compress.merge import geometric as g
from compress.merge.subspace import SUBSPACE_METHODS
from compress.sparsify.masks import keep_count
from compress.sparsify.topk import magnitude_bits, sort_first_mask, topk_mask

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
    """Boolean keep-mask of the largest |δ| (TIES' trim, PEFT ``magnitude_based_pruning``).

    "index": ⌊density·n⌋ entries (none when that rounds to 0, as PEFT), equal magnitudes at the threshold kept
    lowest index first (exact radix selection, the same on every device). "argsort": mergekit's ``magnitude``:
    max(1, ⌊density·n⌋) entries (none at density 0), the first places of ``torch.argsort(descending=True)``: on
    the CPU found without sorting (``sort_first_mask`` replays the sort's partitions), bit-exact with it; on
    other devices the device's own argsort, as mergekit runs there.
    """
    if tie_break == "index":
        return topk_mask(delta, keep_count(delta.numel(), density, "floor"))
    k = 0 if density <= 0 else max(1, int(density * delta.numel()))
    return _argsort_keep(delta, k)


def outlier_keep(delta: torch.Tensor, density: float, gamma: float, tie_break: str = "index") -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the ⌊gamma·n⌋ largest |δ| (outliers) and keep the next
    ⌊density·n⌋; everything smaller is dropped. Same counts as mergekit's ``magnitude_outliers``; equal
    magnitudes ordered by index ("index") or as mergekit's unstable ``torch.sort`` orders them ("argsort")."""
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if tie_break == "index":
        order = torch.argsort(magnitude_bits(delta), stable=True)  # ascending |δ|, ties by index
        mask[order[bottom: bottom + keep]] = True
    elif delta.device.type == "cpu":
        mask = sort_first_mask(delta, bottom + keep, descending=False, absolute=True).reshape(-1)
        mask &= ~sort_first_mask(delta, bottom, descending=False, absolute=True).reshape(-1)
    else:
        mask[torch.sort(delta.abs().reshape(-1), descending=False).indices[bottom: bottom + keep]] = True
    return mask.reshape(delta.shape)


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE (Deep et al. 2024): keep probabilities rise linearly with the magnitude rank along dim 1
    from density−ε (smallest) to density+ε (largest); a 1-D tensor is one row. Ranking along dim 1 for 3-D and
    larger tensors too is mergekit's axis (the paper only speaks of matrices).

    As mergekit's ``della_magprune`` on the CPU: ranks from ``torch.argsort`` (its order for equal magnitudes),
    and the ranks and probabilities in bf16 for bf16 deltas, else float32, so that the same draws give its mask
    bit for bit (on a GPU mergekit would also keep fp16 ranks in fp16; this keeps float32 on every device)."""
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise CompressError(f"della: density ± epsilon must lie in (0, 1) (density {density}, epsilon {epsilon})")
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(work) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    span = torch.where(hi > lo, hi - lo, 1)  # a one-column row: every entry at density − ε
    rank_norm = ((ranks - lo) / span).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


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
            mask[free] = outlier_keep(delta[free], density, gamma, tie_break)
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
    if delta.device.type == "cpu":  # mergekit sorts float32 magnitudes on the CPU
        return sort_first_mask(delta, k, absolute=True)
    w = delta.abs().reshape(-1)
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
    if method is None or (density >= 1.0 and keep is None):
        return delta  # DELLA too: at density 1 mergekit passes the deltas through
    if density <= 0.0 and keep is None:
        return torch.zeros_like(delta)  # mergekit's density 0: nothing kept (and no 0/0 from an inverse rescale)
    if method == "magnitude":
        mask = keep if keep is not None else magnitude_keep(delta, density, tie_break)
        kept = delta * mask
        return _l1_rescale(kept, delta) if rescale == "l1" else kept
    if method == "outliers":
        kept = delta * outlier_keep(delta, density, gamma, tie_break)
        return _l1_rescale(kept, delta) if rescale == "l1" else kept
    # mergekit's dtypes for the draws: probabilities in bf16 for bf16 deltas, fp16 deltas masked and rescaled in
    # float32 (torch has no fp16 bernoulli on the CPU), so that one seed gives its masks bit for bit
    if method == "random":
        p = torch.full(delta.shape, float(density),
                       dtype=torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32)
    elif method == "della":
        p = della_keep_prob(delta.cpu(), density, epsilon)
    else:
        raise CompressError(f"unknown sparsification '{method}' (choose magnitude, random, outliers, della)")
    work = torch.float32 if delta.dtype == torch.float16 else delta.dtype
    x = delta.to(work)
    kept = x * torch.bernoulli(p, generator=generator).to(delta.device, work)
    if rescale == "inverse_keep":
        kept = kept / p.to(delta.device, work)
    elif rescale == "l1":
        kept = _l1_rescale(kept, x)
    return kept.to(delta.dtype)


# -- steps 2–4: combine --------------------------------------------------------------------------------------

def _weights(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != n:
        raise CompressError(f"{w.numel()} weights for {n} models")
    return w.reshape((n,) + (1,) * (like.dim() - 1))


def sum_models(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(0)`` over the models' axis, bit for bit. Two models are added directly: the same one rounding of the
    exact sum, and on a CPU about twice as fast as torch's reduction over a leading axis of length 2."""
    return t[0] + t[1] if t.shape[0] == 2 else t.sum(0)


def majority_sign(deltas: torch.Tensor, method: Consensus = "mass") -> torch.Tensor:
    """+1/−1 per entry: the sign of Σ_i δ_i ("mass", TIES) or of Σ_i sign(δ_i) ("count"); a zero sum elects +1
    (PEFT's and mergekit's ``>= 0``)."""
    score = sum_models(deltas) if method == "mass" else sum_models(deltas.sign())
    return torch.where(score >= 0, 1.0, -1.0).to(deltas.dtype)


# TIES' steps 2-3 for two bf16 task vectors with the sign elected on the weighted values (mergekit's ``ties``), in
# one pass instead of torch's ten: every step rounds to bf16 as torch's bf16 ops do (the float32 result of the one
# operation, rounded to nearest even), so the output is the torch path's bit for bit (tested on hostile values).
_TIES2_C = r"""
#include <stdint.h>
#include <string.h>
static inline float f(uint16_t h) { uint32_t b = (uint32_t)h << 16; float x; memcpy(&x, &b, 4); return x; }
static inline float r(float x) {  /* float32 -> bf16 -> float32, nearest even; NaN stays NaN */
  uint32_t b; memcpy(&b, &x, 4);
  uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
  b = (b & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;
  memcpy(&x, &b, 4); return x;
}
static inline uint16_t h(float x) { uint32_t b; memcpy(&b, &x, 4); return (uint16_t)(b >> 16); }
/* one build for every x86-64 CPU, with AVX-512 and AVX2 copies chosen when the library loads (3.6x faster than
   the SSE2 baseline on the benchmark machine): no -march=native, so no build that a cache shared between
   machines could hand to a CPU without those instructions */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
CLONES void wsum2_bf16(const uint16_t *d0, const uint16_t *d1, float w0, float w1, uint16_t *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = h(r(r(f(d0[i]) * w0) + r(f(d1[i]) * w1)));
}
/* task arithmetic of two bf16 models, whole: base + lam * (w0 (x0 - base) + w1 (x1 - base)), one rounding a
   torch op; returns how many results are NaN or Inf */
CLONES int64_t ta2_bf16(const uint16_t *base, const uint16_t *x0, const uint16_t *x1, float w0, float w1, float lam,
                 int scale, uint16_t *out, int64_t n) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    float b = f(base[i]);
    float d = r(r(r(f(x0[i]) - b) * w0) + r(r(f(x1[i]) - b) * w1));
    d = scale ? r(d * lam) : d;
    uint16_t o = h(r(b + d));
    out[i] = o;
    bad += (o & 0x7f80u) == 0x7f80u;
  }
  return bad;
}
CLONES void ties2_bf16(const uint16_t *d0, const uint16_t *d1, float w0, float w1, int mean, uint16_t *out, int64_t n) {
  /* branch-free, so that gcc vectorizes it; the disjoint mean is computed always and kept when asked */
  float keep_mean = mean ? 1.0f : 0.0f;
  for (int64_t i = 0; i < n; i++) {
    float a = r(f(d0[i]) * w0), b = r(f(d1[i]) * w1);
    float g = r(a + b) >= 0.0f ? 1.0f : -1.0f;
    float sa = a > 0.0f ? 1.0f : (a < 0.0f ? -1.0f : 0.0f), sb = b > 0.0f ? 1.0f : (b < 0.0f ? -1.0f : 0.0f);
    float ka = sa == g ? 1.0f : 0.0f, kb = sb == g ? 1.0f : 0.0f;
    float m = r(a * ka + b * kb);  /* each product is exact: a value, +0 or -0 */
    float div = r(w0 * ka + w1 * kb);
    float q = r(m / (div == 0.0f ? 1.0f : div));
    out[i] = h(keep_mean != 0.0f ? q : m);
  }
}
"""


def _ties2_lib():
    import ctypes

    from compress.native import load

    v, fl, i = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    return load("ties2", _TIES2_C, {"ties2_bf16": (None, [v, v, fl, fl, i, v, ctypes.c_int64]),
                                    "wsum2_bf16": (None, [v, v, fl, fl, v, ctypes.c_int64]),
                                    "ta2_bf16": (ctypes.c_int64, [v, v, v, fl, fl, fl, i, v, ctypes.c_int64])},
                opt="-O3 -fno-trapping-math")


def _ties2_native(deltas: torch.Tensor, w: torch.Tensor, disjoint: Optional[str]) -> Optional[torch.Tensor]:
    """The fused pass above for ``deltas`` [2, ...] bf16 on the CPU, split over torch's threads (``disjoint``
    None: the weighted sum alone, task arithmetic's); None when it does not apply or no compiler is at hand."""
    if not (deltas.device.type == "cpu" and deltas.dtype == torch.bfloat16 and deltas.shape[0] == 2
            and disjoint in ("weighted_mean", "sum", None) and deltas.is_contiguous()
            and deltas[0].numel() >= 4096):
        return None
    lib = _ties2_lib()
    if lib is None:
        return None
    flat = deltas.reshape(2, -1)
    n = flat.shape[1]
    out = torch.empty(n, dtype=torch.bfloat16)
    w0, w1 = (float(x) for x in w.reshape(-1))
    mean = int(disjoint == "weighted_mean")
    cuts = _split(n, torch.get_num_threads())
    item = flat.element_size()

    def run(j):
        lo, hi = cuts[j], cuts[j + 1]
        d0, d1, o = (t.data_ptr() + lo * item for t in (flat[0], flat[1], out))
        if disjoint is None:
            lib.wsum2_bf16(d0, d1, w0, w1, o, hi - lo)
        else:
            lib.ties2_bf16(d0, d1, w0, w1, mean, o, hi - lo)

    _run_parts(run, cuts)
    return out.reshape(deltas.shape[1:])


def _split(n: int, threads: int) -> list[int]:
    """Cut points splitting ``n`` entries over at most ``threads`` threads, none with fewer than 2^20."""
    parts = max(1, min(threads, n // (1 << 20)))
    return [n * j // parts for j in range(parts + 1)]


def _run_parts(run, cuts: list[int]) -> list:
    """``run(j)`` for every part, the first on this thread."""
    if len(cuts) == 2:
        return [run(0)]
    with ThreadPoolExecutor(max_workers=len(cuts) - 2) as pool:
        rest = [pool.submit(run, j) for j in range(1, len(cuts) - 1)]
        return [run(0)] + [f.result() for f in rest]


def task_arithmetic2(base: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: float, w1: float,
                     lam: float = 1.0, threads: Optional[int] = None, out: Optional[torch.Tensor] = None
                     ) -> Optional[tuple[torch.Tensor, bool]]:
    """Task arithmetic of two bf16 models on the CPU in one pass over the three tensors: ``base + λ·(w0·(x0 −
    base) + w1·(x1 − base))`` with every step rounded to bf16 as torch's bf16 ops round it, so bit for bit
    ``combine(stack([x0 − base, x1 − base]), [w0, w1], lam=λ) + base``: mergekit's ``task_arithmetic`` in
    ``dtype: bfloat16`` (its ``(deltas * weights).sum(0) * λ + base``). Returns (merged, all finite), or None
    where it does not apply (other dtypes or devices, shapes that differ, no compiler); the torch path then runs.
    The torch path makes five passes and four temporaries; this one reads each input once. ``out``: a bf16 buffer
    of at least ``base.numel()`` entries to write into (a reused one spares the page faults of a new one)."""
    tensors = (base, x0, x1)
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.shape == base.shape
               and t.is_contiguous() for t in tensors) or base.numel() == 0:
        return None
    lib = _ties2_lib()
    if lib is None:
        return None
    n = base.numel()
    if out is None or out.dtype != torch.bfloat16 or out.device.type != "cpu" or out.numel() < n:
        out = torch.empty(base.shape, dtype=torch.bfloat16)
    else:
        out = out.reshape(-1)[:n].view(base.shape)
    cuts = _split(n, threads or torch.get_num_threads())
    # the torch path's weights are a bf16 tensor (``_weights``); λ multiplies as a Python scalar, unrounded
    w0, w1 = (float(w) for w in torch.tensor([float(w0), float(w1)], dtype=torch.bfloat16))
    lam = float(lam)

    def run(j):
        lo, hi = cuts[j], cuts[j + 1]
        ptrs = (t.data_ptr() + 2 * lo for t in tensors)
        return lib.ta2_bf16(*ptrs, w0, w1, lam, int(lam != 1.0), out.data_ptr() + 2 * lo, hi - lo)

    return out, not any(_run_parts(run, cuts))


def combine(deltas: torch.Tensor, weights, *, consensus: Optional[Consensus] = None,
            sign_on: Literal["unweighted", "weighted"] = "unweighted",
            disjoint: Literal["mean", "weighted_mean", "sum"] = "mean", normalize: bool = False,
            lam: float = 1.0, inplace: bool = False, native: bool = True) -> torch.Tensor:
    """Steps 2–4 on already-sparsified stacked deltas ``[n, *shape]``: λ · (disjoint merge or weighted sum).
    ``inplace``: ``deltas`` may be overwritten (saves a copy of the stack). ``native``: two bf16 models on the CPU
    with mergekit's weighted sign election, or summed without one, take a fused C pass (``False``: the torch ops
    it equals)."""
    n = deltas.shape[0]
    w = _weights(weights, n, deltas)
    if native and ((consensus == "mass" and sign_on == "weighted") or (consensus is None and not normalize)):
        fused = _ties2_native(deltas, w, disjoint if consensus else None)
        if fused is not None:
            return fused.mul_(lam) if lam != 1.0 else fused
    if inplace and (consensus is None or sign_on == "weighted"):
        weighted = deltas.mul_(w)
        deltas = weighted  # only the weighted values are needed from here on
    else:
        weighted = deltas * w
    if consensus is None:
        merged = sum_models(weighted)
        if normalize:
            total = w.sum()
            merged = merged / (total if total.abs() > 1e-8 else 1.0)
    else:
        voters = weighted if sign_on == "weighted" else deltas
        agree = (voters.sign() == majority_sign(voters, consensus)).to(deltas.dtype)  # zeros never agree
        merged = sum_models(weighted * agree)
        if disjoint == "mean":
            merged = merged / sum_models(agree).clamp(min=1.0)
        elif disjoint == "weighted_mean":
            div = sum_models(w * agree)
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

@dataclass(frozen=True)
class WeightMethod:
    """A method on whole tensors (no task-vector preset): ``merge(base, tensors, weights, params)`` returns the
    merged tensor from the base (None where the method takes none), the stacked model tensors, one weight per
    model and the method's parameters resolved for this tensor (a dict with every name of ``params``).

    ``base``: required | optional | none | input (an input like the others: mergekit's karcher and linear average
    the base with the models, so a recipe lists it among them). ``models``: (least, most) models besides the base.
    ``params``: name → default (``REQUIRED``: none) of the shared parameters; ``weighted``: it reads a weight per
    model, which mergekit requires of every model; ``model_params``: other per-model parameters. ``float32``: it
    computes in float32 whatever the merge dtype and returns the inputs' dtype (mergekit's linear and slerp)."""

    name: str
    merge: Callable[..., torch.Tensor]
    base: Literal["required", "optional", "none", "input"] = "required"
    models: tuple[int, Optional[int]] = (1, None)
    params: dict = field(default_factory=dict)
    weighted: bool = False
    model_params: tuple[str, ...] = ()
    float32: bool = False
    paper: str = ""


REQUIRED = object()


def _linear(base, x, w, p):
    return linear(x, w, normalize=p["normalize"])


def _slerp(base, x, w, p):
    return slerp(p["t"], base, x[0])


WEIGHT_METHODS: dict[str, WeightMethod] = {m.name: m for m in (
    WeightMethod("linear", _linear, base="input", params={"normalize": True}, weighted=True, float32=True,
                 paper="Wortsman et al. 2022, model soups (weighted average of full weights)"),
    WeightMethod("slerp", _slerp, models=(1, 1), params={"t": 0.5}, float32=True,
                 paper="Shoemake 1985, spherical interpolation of the base and one model (mergekit slerp)"),
    WeightMethod("nuslerp", lambda b, x, w, p: g.nuslerp(b, x, w, row_wise=p["nuslerp_row_wise"],
                                                        flatten=p["nuslerp_flatten"]),
                 base="optional", models=(2, 2), weighted=True,
                 params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
                 paper="NuSLERP (Goddard 2024, mergekit nuslerp): SLERP of two models or of their task vectors"),
    WeightMethod("multislerp", lambda b, x, w, p: g.multislerp(b, x, w, normalize_weights=p["normalize_weights"],
                                                              eps=p["eps"]),
                 base="optional", weighted=True, params={"normalize_weights": True, "eps": 1e-8},
                 paper="Multi-SLERP (Goddard 2024): barycentric interpolation on the hypersphere"),
    WeightMethod("karcher", lambda b, x, w, p: g.karcher(x, max_iter=int(p["max_iter"]), tol=p["tol"]),
                 base="input", params={"max_iter": 10, "tol": 1e-5},
                 paper="Karcher 1977, the Riemannian (Karcher) mean on the hypersphere (mergekit karcher)"),
    WeightMethod("model_stock", lambda b, x, w, p: g.model_stock(b, x, filter_wise=p["filter_wise"]),
                 models=(2, None), params={"filter_wise": False},
                 paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models"),
    WeightMethod("sce", lambda b, x, w, p: e.sce(b, x, select_topk=p["select_topk"]),
                 params={"select_topk": 1.0, "int8_mask": False},
                 paper="Wan et al. 2024, FuseChat 2.0: SCE (select by variance, calculate weights, erase signs)"),
    WeightMethod("ram", lambda b, x, w, p: e.ram(b, x, epsilon=p["epsilon"]), params={"epsilon": 1e-5},
                 paper="RAM, Reinforced Agent Merging (arXiv 2601.13572): unique changes kept, shared averaged"),
    WeightMethod("ramplus_tl", lambda b, x, w, p: e.ramplus_tl(b, x, r=p["r"], alpha=p["alpha"],
                                                              epsilon=p["epsilon"]),
                 params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
                 paper="RAM+ (arXiv 2601.13572), tensor-local: RAM with unique changes rescaled by overlap"),
    WeightMethod("nearswap", lambda b, x, w, p: e.nearswap(b, x, t=p["t"]), models=(1, 1),
                 params={"t": REQUIRED},
                 paper="NearSwap (alchemonaut 2024): take the model's value where it is within t of the base"),
    WeightMethod("arcee_fusion", lambda b, x, w, p: e.arcee_fusion(b, x, generator=p.get("generator")),
                 models=(1, 1), paper="Arcee Fusion (Arcee AI 2025): keep changes of outlying KL importance"),
    WeightMethod("passthrough", lambda b, x, w, p: e.passthrough(x, scale=p["scale"][0]), base="none",
                 models=(1, 1), model_params=("scale",),
                 paper="passthrough (mergekit): the one input's tensors, optionally scaled"),
)}
FULL_WEIGHT_METHODS = tuple(WEIGHT_METHODS)
ALL_METHODS = tuple(METHODS) + FULL_WEIGHT_METHODS
ALL_METHODS += tuple(SUBSPACE_METHODS) + ("adamerging",)  # compress.merge.subspace, compress.merge.adamerging


def weight_method(name: str) -> WeightMethod:
    """The registry entry of a whole-tensor method."""
    check_method(name)
    if name not in WEIGHT_METHODS:
        raise CompressError(f"merge method '{name}' is a task-vector preset, not a whole-tensor method")
    return WEIGHT_METHODS[name]


def check_method(name: str) -> str:
    """``name`` if the registry has it, else the one-line error every entry point gives."""
    if name not in ALL_METHODS:
        raise CompressError(f"unknown merge method '{name}' (choose one of {', '.join(ALL_METHODS)})")
    return name


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_weight_method(cfg) -> None:
    """Inputs and parameters of a whole-tensor method, each problem one line naming the field."""
    m = weight_method(cfg.method)
    n = len(cfg.models)
    if m.base == "required" and cfg.base is None:
        raise CompressError(f"method '{m.name}' needs a base model")
    if m.base == "none" and cfg.base is not None:
        raise CompressError(f"method '{m.name}' takes no base model (give the one model under models)")
    least, most = m.models
    if n < least or (most is not None and n > most):
        want = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least}–{most}"
        raise CompressError(f"method '{m.name}' merges {want} model(s) besides the base, got {n}")
    allowed = set(m.params) | {"weight"} if m.weighted else set(m.params)
    for key, setting in cfg.parameters.items():
        if key not in allowed:
            raise CompressError(f"parameters.{key}: method '{m.name}' has no parameter '{key}' "
                                f"(its parameters: {', '.join(sorted(allowed)) or 'none'})")
        _check_value(m, f"parameters.{key}", key, setting)
    per_model = set(m.model_params) | ({"weight"} if m.weighted else set())
    for i, mm in enumerate(cfg.models):
        for key, setting in mm.parameters.items():
            if key not in per_model:
                raise CompressError(f"models.{i}.parameters.{key}: method '{m.name}' takes no per-model '{key}'"
                                    f" (per model: {', '.join(sorted(per_model)) or 'nothing'})")
            _check_value(m, f"models.{i}.parameters.{key}", key, setting)
    for key, default in m.params.items():
        if default is REQUIRED and key not in cfg.parameters:
            raise CompressError(f"parameters.{key}: method '{m.name}' needs '{key}'")


def _leaves(setting) -> list:
    from compress.config import Conditional

    if isinstance(setting, Conditional):
        return _leaves(setting.value)
    if isinstance(setting, list):
        return [x for s in setting for x in _leaves(s)]
    return [setting]


def _check_value(m: WeightMethod, where: str, key: str, setting) -> None:
    default = m.params.get(key, 1.0 if key in ("weight", "scale") else None)
    for v in _leaves(setting):
        if isinstance(default, bool) and not isinstance(v, bool):
            raise CompressError(f"{where} must be true or false, got {v!r}")
        if not isinstance(default, bool) and not _is_number(v):
            raise CompressError(f"{where} must be a number, got {v!r}")
        if key == "select_topk" and not 0.0 <= v <= 1.0:
            raise CompressError(f"{where} must be in [0, 1], got {v!r}")
        if key in ("max_iter",) and (v < 1 or v != int(v)):
            raise CompressError(f"{where} must be a whole number ≥ 1, got {v!r}")
        if key in ("tol", "eps", "epsilon") and v < 0:
            raise CompressError(f"{where} must be ≥ 0, got {v!r}")


def check_config(cfg) -> None:
    """What the schema cannot know without the registry: ``cfg`` (a ``config.MergeConfig``) names a method here,
    and a method whose top-k is global gets one density per model (not a gradient or filters)."""
    check_method(cfg.method)
    if cfg.method in WEIGHT_METHODS:
        _check_weight_method(cfg)
        return
    if cfg.base is None:
        raise CompressError(f"method '{cfg.method}' needs a base model")
    for where, scope in [("parameters", cfg.parameters)] + [(f"models.{i}.parameters", mm.parameters)
                                                            for i, mm in enumerate(cfg.models)]:
        foreign = sorted(set(scope) & (set(WEIGHT_METHOD_PARAMS) - {"int8_mask"} | {"scale"}))
        if foreign:
            raise CompressError(f"{where}.{foreign[0]}: method '{cfg.method}' has no parameter '{foreign[0]}'")
    if cfg.method not in METHODS:  # compress.merge.subspace and adamerging: no top-k preset to check
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
        m = replace(m, topk="per_tensor", sign_on="weighted", normalize=normalize, tie_break="argsort",
                    disjoint="weighted_mean" if normalize else "sum",
                    rescale="l1" if m.rescale != "none" else "none")
    elif variant != "paper":
        raise CompressError(f"unknown variant '{variant}' (choose paper, peft or mergekit)")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "normalize" in overrides and m.consensus is not None and variant == "mergekit" and "disjoint" not in overrides:
        overrides["disjoint"] = "weighted_mean" if overrides["normalize"] else "sum"
    return replace(m, **overrides)


PARALLEL_REPLAY_MAX = 1 << 24


def _replays_in_parallel(deltas: torch.Tensor, method: Method, keep) -> bool:
    """mergekit's tie order on the CPU is one single-threaded sort replay per model (``sort_first_mask``, which
    releases the GIL): the models' replays then run side by side, one thread each. They draw no random numbers,
    so the order they run in changes nothing. Each replay holds 8 bytes an entry, so tensors above
    ``PARALLEL_REPLAY_MAX`` entries (an embedding) replay one model at a time: the merge's peak memory stays that
    of a single replay of the largest tensor."""
    return (deltas.shape[0] > 1 and deltas.device.type == "cpu" and method.tie_break == "argsort" and keep is None
            and deltas[0].numel() <= PARALLEL_REPLAY_MAX
            and method.sparsify in ("magnitude", "outliers") and torch.get_num_threads() > 1)


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
        def one(i):
            return sparsify_delta(deltas[i], method.sparsify, dens[i], rescale=method.rescale, gamma=gams[i],
                                  epsilon=epss[i], generator=generator, keep=None if keep is None else keep[i],
                                  tie_break=method.tie_break, protect=protect, protect_sparsity=protect_sparsity)

        if _replays_in_parallel(deltas, method, keep):
            with ThreadPoolExecutor(max_workers=min(n, torch.get_num_threads())) as pool:
                deltas = torch.stack(list(pool.map(one, range(n))))
        else:
            deltas = torch.stack([one(i) for i in range(n)])
        inplace = True  # the stack is a new tensor now
    return combine(deltas, weights, consensus=method.consensus, sign_on=method.sign_on, disjoint=method.disjoint,
                   normalize=method.normalize, lam=lam, inplace=inplace)


# -- full-weight methods ---------------------------------------------------------------------------------------

def linear(tensors: torch.Tensor, weights, normalize: bool = True) -> torch.Tensor:
    """Weighted average of full weights (Wortsman et al. 2022, model soups; mergekit ``linear``):
    Σ w_i θ_i, divided by Σ w_i when ``normalize``."""
    w = torch.as_tensor(weights, dtype=tensors.dtype, device=tensors.device).reshape(-1)
    out = torch.zeros_like(tensors[0])
    for x, wi in zip(tensors, w):  # one model at a time, in order (mergekit's sum, so the same roundings)
        out.addcmul_(x, wi)
    return out.div_(w.sum()) if normalize else out


SLERP_CHUNK = 1024 * 1024  # mergekit's chunk of elements per pass: sums over a chunk, then over the chunks


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (Shoemake 1985; mergekit ``slerp``): the angle comes from the
    flattened, normalized tensors and the coefficients apply to the originals; nearly collinear (|cos| above
    ``dot_threshold``) falls back to linear interpolation. t=0 gives v0, t=1 gives v1.

    Follows mergekit 0.1.5's torch arithmetic op for op so that the output is its bit for bit: float32 (float64
    inputs: float64) with t a tensor of that dtype, norms per chunk of ``SLERP_CHUNK`` elements and then the norm
    of those norms, the dot of the normalized chunks summed chunk by chunk; returned in the inputs' dtype."""
    acc = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[float(t)]], dtype=acc, device=v0.device)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunks = range(0, a.shape[1], SLERP_CHUNK)

    def piece(x: torch.Tensor, i: int) -> torch.Tensor:  # one chunk at a time: bounded float32 scratch
        return x[:, i:i + SLERP_CHUNK].to(acc)

    def norm(x: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(piece(x, i), dim=1, keepdim=True)
                                                  for i in chunks]), dim=0)
        return torch.where(n > eps, n, 1)

    na, nb = norm(a), norm(b)
    dot = torch.stack([(piece(a, i) / na * (piece(b, i) / nb)).sum(dim=1, keepdim=True)
                       for i in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for i in chunks:
        out[:, i:i + SLERP_CHUNK] = ca * piece(a, i) + cb * piece(b, i)
    return out.reshape(v0.shape)
