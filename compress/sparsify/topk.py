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
# first k places depends only on the partitions of the segments that hold position k: replaying those (one
# segment per level, each partition vectorized) is a quickselect with introsort's exact moves, O(n) instead of
# O(n log n). A segment that would reach introsort's heapsort fallback (depth 2·⌊log2 n⌋, never seen on real
# deltas) is handed to torch.argsort itself.

_INSERTION = 16


class _Fallback(Exception):
    pass


def _partition(v: torch.Tensor, desc: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One introsort step on the segment ``v`` as libstdc++ takes it: (cut, left places, right places) of the
    swaps, after moving the median of three to the front (done here, in place, on ``v`` only)."""
    def before(a, b):  # the sort's comparator on two places
        return bool(v[a] > v[b]) if desc else bool(v[a] < v[b])

    s = v.numel()
    a, b, c = 1, s // 2, s - 1
    if before(a, b):
        m = b if before(b, c) else (c if before(a, c) else a)
    else:
        m = a if before(a, c) else (c if before(b, c) else b)
    p = v[m].clone()
    seg = v[1:]
    # the left scan stops at entries not before the pivot, the right scan at those the pivot is not before; the
    # i-th stops of the two scans swap while the left one lies below the right one. For the i-th left stop at q
    # (the (i+1)-th, counted in ``ca``) that holds when more than i right stops lie above q.
    lstop = seg <= p if desc else seg >= p
    rstop = seg >= p if desc else seg <= p
    if m != 0:  # the median's place holds the old front entry after the swap
        old = v[0]
        lstop[m - 1] = bool(old <= p) if desc else bool(old >= p)
        rstop[m - 1] = bool(old >= p) if desc else bool(old <= p)
    ca = lstop.cumsum(0, dtype=torch.int32)
    rb = rstop.flip(0).cumsum(0, dtype=torch.int32).flip(0)  # right stops at or above each place
    above = rb - rstop.to(torch.int32)
    swap_l = lstop & (above >= ca)
    left = torch.nonzero(swap_l).reshape(-1)
    n = left.numel()
    right = torch.nonzero(rstop & (rb <= n)).reshape(-1).flip(0)
    if not lstop.any():
        raise _Fallback
    nxt = int(torch.searchsorted(ca, torch.tensor([n + 1], dtype=torch.int32))) if n < int(ca[-1]) else s - 1
    cut = min(nxt, int(right[-1]) if n else s - 1) + 1
    return cut, left + 1, right + 1, m


def sort_order_first(values: torch.Tensor, k: int, descending: bool = True) -> torch.Tensor:
    """Flat indices of the entries that ``torch.sort(values.reshape(-1), descending=…)`` (unstable, CPU) puts in
    its first k places, found without sorting (see above). ``values``: a float32 CPU tensor."""
    flat = values.reshape(-1)
    n = flat.numel()
    k = max(0, min(k, n))
    if k in (0, n):
        return torch.arange(k)
    v, ix = flat.clone(), torch.arange(n, dtype=torch.int32 if n < 2 ** 31 else torch.int64)
    taken, depth = [], 2 * (n.bit_length() - 1)
    try:
        while v.numel() > _INSERTION:
            if depth == 0:
                raise _Fallback
            depth -= 1
            cut, left, right, m = _partition(v, descending)
            for t in (v, ix):
                t[0], t[m] = t[m].clone(), t[0].clone()
            if k >= cut:  # the left part is in whole: its entries after the swaps
                taken.append(ix[:cut].clone().index_copy_(0, left, ix.index_select(0, right)))
                k -= cut
                if not k:
                    return torch.cat(taken).long()
                src, dst, keep = left, right - cut, slice(cut, None)
            else:
                src, dst, keep = right, left, slice(0, cut)
            v, ix = (t[keep].clone().index_copy_(0, dst, t.index_select(0, src)) for t in (v, ix))
    except _Fallback:
        return torch.sort(flat, descending=descending).indices[:k]
    # the final insertion sort is stable within the last segment
    order = torch.sort(v, descending=descending, stable=True).indices
    return torch.cat(taken + [ix[order[:k]]]).long()
