"""Exact k-th largest magnitude by radix histograms, per tensor or streamed over a whole model.

Non-negative IEEE floats order like their bit patterns read as integers. A float32's 32 bits are split into a high
and a low 16-bit half: a 65,536-bin histogram of the high halves finds the bin that holds the k-th largest value,
and a second histogram of the low halves of the entries in that bin finds the value itself. Two ``bincount``
passes, a few hundred KB of state, the same answer as ``torch.topk`` on every device.

For a global top-k over a model (TIES' trim step as the paper's code does it, one threshold for the whole task
vector) the two histograms are filled tensor by tensor (``GlobalThreshold``), so the model is never held whole.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError

_BINS = 1 << 16
# Below this many entries a selection (kthvalue) beats two 65,536-bin histograms.
SMALL = 1 << 18


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as int32 bit patterns (float32 view), flattened: integer order equals magnitude order."""
    # float64 magnitudes are ranked after rounding to float32 (distinct values may then tie)
    a = t.detach().reshape(-1).abs()
    return (a if a.dtype == torch.float32 else a.float()).view(torch.int32)


def _largest_bin_reaching(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(b, above): the largest bin b with count(bin >= b) >= k, and count(bin > b)."""
    from_top = hist.flip(0).cumsum(0)  # from_top[j] = count(bin >= last - j)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[j - 1]) if j > 0 else 0
    return hist.numel() - 1 - j, above


def kth_largest_bits(bits: torch.Tensor, k: int) -> int:
    """Bit pattern of the k-th largest entry of non-negative int32 ``bits`` (1 <= k <= numel)."""
    if not 1 <= k <= bits.numel():
        raise CompressError(f"k={k} outside 1..{bits.numel()}")
    if bits.numel() < SMALL:
        return int(torch.kthvalue(bits.cpu(), bits.numel() - k + 1).values)
    hi = bits >> 16
    b, above = _largest_bin_reaching(torch.bincount(hi, minlength=_BINS), k)
    lo = torch.bincount(bits[hi == b] & 0xFFFF, minlength=_BINS)
    low, _ = _largest_bin_reaching(lo, k - above)
    return (b << 16) | low


def topk_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k entries of largest |t|; ties at the threshold go to the lowest flat indices."""
    n = t.numel()
    if k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    bits = magnitude_bits(t)
    thr = kth_largest_bits(bits, k)
    mask = bits > thr
    missing = k - int(torch.count_nonzero(mask))  # bool.sum() would first cast to int64
    if missing:
        ties = torch.nonzero(bits == thr).reshape(-1)[:missing]
        mask[ties] = True
    return mask.reshape(t.shape)


class GlobalThreshold:
    """The k-th largest |τ| over many tensors, in two streaming passes.

    ``add(t)`` for every tensor (pass 1), then ``refine(t)`` for every tensor (pass 2), then ``threshold``;
    keep ``magnitude_bits(t) >= threshold`` (ties all kept, as the TIES reference code's ``>= kthvalue``).
    At density 1 the second pass can be skipped.

    Protection (``protected``: a bool mask of entries kept regardless, ``protected_kept`` of them counted as kept):
    the k of the request is over every entry, the protected ones take ``protected_kept`` of it, and the threshold
    is the (k − protected_kept)-th largest among the free entries alone.
    """

    def __init__(self, density: float):
        if not 0.0 < density <= 1.0:
            raise CompressError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.numel = 0
        self._hi = torch.zeros(_BINS, dtype=torch.int64)
        self._lo = torch.zeros(_BINS, dtype=torch.int64)
        self._bin: int | None = None
        self._above = 0
        self.reserved = 0  # protected entries counted as kept

    @property
    def k(self) -> int:
        """Free entries to keep: the request over every entry, less what protected entries take."""
        return max(1, int(self.density * self.numel)) - self.reserved if self.numel else 0

    def add(self, t: torch.Tensor, protected: torch.Tensor | None = None, protected_kept: int | None = None) -> None:
        self.numel += t.numel()
        if protected is not None:
            self.reserved += int(protected.sum()) if protected_kept is None else protected_kept
            t = t[~protected]
        self._hi += torch.bincount(magnitude_bits(t) >> 16, minlength=_BINS).cpu()

    def _boundary(self) -> tuple[int, int]:
        if self._bin is None:
            if not self.numel:
                raise CompressError("global top-k over no tensors")
            self._bin, self._above = _largest_bin_reaching(self._hi, self.k)
        return self._bin, self._above

    def refine(self, t: torch.Tensor, protected: torch.Tensor | None = None, protected_kept: int | None = None) -> None:
        if self.k <= 0 or self.density >= 1.0:
            return
        b, _ = self._boundary()
        bits = magnitude_bits(t if protected is None else t[~protected])
        self._lo += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=_BINS).cpu()

    @property
    def threshold(self) -> int:
        if self.density >= 1.0:
            return 0
        if self.k <= 0:
            return (1 << 31) - 1  # protected entries take the whole budget: no free entry is kept
        b, above = self._boundary()
        low, _ = _largest_bin_reaching(self._lo, self.k - above)
        return (b << 16) | low

    def mask(self, t: torch.Tensor, protected: torch.Tensor | None = None) -> torch.Tensor:
        """Kept free entries (protected entries are False here: the caller keeps them by its own rule)."""
        m = (magnitude_bits(t) >= self.threshold).reshape(t.shape)
        return m if protected is None else m & ~protected


# -- torch.argsort's order, without the sort -------------------------------------------------------------------
# torch's CPU sort (``stable=False``, the default that mergekit's TIES and Breadcrumbs call) is libstdc++'s
# ``std::sort``: an introsort of (value, index) pairs — median-of-three pivot moved to the front, Hoare partition,
# segments of at most 16 left to one final insertion sort. Equal values end wherever the partitions put them, so
# no index rule predicts them. But partitions never move an entry across a cut, so which entries land in the
# first k places depends only on the partitions of the segments that hold place k: replaying those, one segment
# per level, is a quickselect with introsort's exact moves, O(n) instead of O(n log n) (measured on 16.8 M
# bf16-valued magnitudes, 2 busy cores: 1.2 s against torch.argsort's 5.6 s). A segment that would reach
# introsort's heapsort fallback (depth 2·⌊log2 n⌋, never seen on real deltas) goes to torch.sort itself. The
# replay is a few lines of C compiled on first use; without a compiler torch.sort runs (same answer, slower).

_REPLAY_C = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
/* libstdc++'s std::sort on (value, index) pairs with torch's comparators, replayed on the segment holding place k
   only. A pair is one 64-bit word, the float's bits above its 32-bit index, so a swap moves one word; comparisons
   look at the value alone, so equal values stay equal whatever their indices. Non-negative floats without NaN
   order like their bits, so magnitudes compare as integers; otherwise as floats with torch's NaN rule. */
static inline float val(uint64_t p) { uint32_t b = (uint32_t)(p >> 32); float f; memcpy(&f, &b, 4); return f; }
#define F_DESC(a, b) ((isnan(val(a)) && !isnan(val(b))) || val(a) > val(b))
#define F_ASC(a, b) ((!isnan(val(a)) && isnan(val(b))) || val(a) < val(b))
#define I_DESC(a, b) (((a) >> 32) > ((b) >> 32))
#define I_ASC(a, b) (((a) >> 32) < ((b) >> 32))
/* Returns 0 when introsort would fall back to heapsort (the caller then sorts). */
#define REPLAY(NAME, BEFORE)                                                                           \
  static int NAME(uint64_t *p, int64_t n, int64_t k) {                                               \
    int64_t lo = 0, hi = n; int depth = 0;                                                            \
    for (int64_t m = n; m > 1; m >>= 1) depth += 2;                                                   \
    while (hi - lo > 16) {                                                                            \
      if (depth-- == 0) return 0;                                                                     \
      int64_t a = lo + 1, b = lo + (hi - lo) / 2, c = hi - 1, m;                                      \
      if (BEFORE(p[a], p[b])) m = BEFORE(p[b], p[c]) ? b : (BEFORE(p[a], p[c]) ? c : a);              \
      else m = BEFORE(p[a], p[c]) ? a : (BEFORE(p[b], p[c]) ? c : b);                                 \
      uint64_t t = p[lo]; p[lo] = p[m]; p[m] = t;                                                     \
      uint64_t pivot = p[lo];                                                                         \
      int64_t f = lo + 1, l = hi;                                                                     \
      for (;;) {                                                                                      \
        while (BEFORE(p[f], pivot)) f++;                                                              \
        l--;                                                                                          \
        while (BEFORE(pivot, p[l])) l--;                                                              \
        if (!(f < l)) break;                                                                          \
        t = p[f]; p[f] = p[l]; p[l] = t; f++;                                                         \
      }                                                                                               \
      if (f == k) return 1;                                                                           \
      if (k < f) hi = f; else lo = f;                                                                 \
    }                                                                                                 \
    for (int64_t i = lo + 1; i < hi; i++) { /* the final insertion sort: stable */                    \
      uint64_t x = p[i]; int64_t j = i;                                                               \
      while (j > lo && BEFORE(x, p[j - 1])) { p[j] = p[j - 1]; j--; }                                 \
      p[j] = x;                                                                                       \
    }                                                                                                 \
    return 1;                                                                                         \
  }
REPLAY(replay_f_desc, F_DESC)
REPLAY(replay_f_asc, F_ASC)
REPLAY(replay_i_desc, I_DESC)
REPLAY(replay_i_asc, I_ASC)
/* src: n float32 (kind 0) or bfloat16 (kind 1) values, |x| taken when absolute; p: n words of scratch; mask: n
   zeroed bytes, set for the entries sort puts in its first k places. */
int replay_mask(const void *src, int kind, int absolute, uint64_t *p, uint8_t *mask, int64_t n, int64_t k,
                int desc) {
  uint32_t clear = absolute ? 0x7fffffffu : 0xffffffffu, worst = 0;
  if (kind == 1) {
    const uint16_t *h = (const uint16_t *)src;
    for (int64_t i = 0; i < n; i++) {
      uint32_t b = ((uint32_t)h[i] << 16) & clear; worst = b > worst ? b : worst;
      p[i] = ((uint64_t)b << 32) | (uint64_t)i;
    }
  } else {
    const uint32_t *w = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++) {
      uint32_t b = w[i] & clear; worst = b > worst ? b : worst;
      p[i] = ((uint64_t)b << 32) | (uint64_t)i;
    }
  }
  int ints = absolute && worst <= 0x7f800000u; /* no NaN, no sign bit: bit order is value order */
  int ok = ints ? (desc ? replay_i_desc(p, n, k) : replay_i_asc(p, n, k))
                : (desc ? replay_f_desc(p, n, k) : replay_f_asc(p, n, k));
  if (!ok) return 0;
  for (int64_t i = 0; i < k; i++) mask[(uint32_t)p[i]] = 1;
  return 1;
}
"""
def _replay_lib():
    """The replay above, compiled (``compress.native``), else None."""
    import ctypes

    from compress.native import load

    v, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return load("sort_replay", _REPLAY_C, {"replay_mask": (i, [v, i, i, v, v, i64, i64, i])})


def sort_first_mask(values: torch.Tensor, k: int, descending: bool = True, absolute: bool = False,
                    native: bool = True) -> torch.Tensor:
    """Bool mask (``values``' shape) of the entries that ``torch.sort(x.reshape(-1), descending=…)`` (unstable,
    CPU) puts in its first k places, x = ``values`` as float32 (|values| when ``absolute``), found without
    sorting (see above). ``values``: a CPU tensor; float32 and bfloat16 are read in place, other dtypes
    converted first. ``native``: use the compiled replay when a C compiler is at hand (``False``: torch.sort)."""
    flat = values.reshape(-1)
    n = flat.numel()
    k = max(0, min(k, n))
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0 or k == n:
        mask[:k] = True
        return mask.reshape(values.shape)
    lib = _replay_lib() if native and n < (1 << 32) else None
    if lib is not None:
        src = flat.contiguous()
        if src.dtype not in (torch.float32, torch.bfloat16):
            src = src.float()
        work = torch.empty(n, dtype=torch.int64)
        if lib.replay_mask(src.data_ptr(), int(src.dtype == torch.bfloat16), int(absolute), work.data_ptr(),
                           mask.data_ptr(), n, k, int(descending)):
            return mask.reshape(values.shape)
        mask.zero_()
    x = flat.float().abs() if absolute else flat.float()
    mask[torch.sort(x, descending=descending).indices[:k]] = True
    return mask.reshape(values.shape)


def sort_order_first(values: torch.Tensor, k: int, descending: bool = True, native: bool = True) -> torch.Tensor:
    """Flat indices, ascending, of the entries ``sort_first_mask`` marks: the first k places of
    ``torch.sort(values.reshape(-1), descending=…)`` as a set."""
    return torch.nonzero(sort_first_mask(values, k, descending, native=native).reshape(-1)).reshape(-1)
