"""The feasible set of strategies, and a size budget in bytes as a sparsity.

**Exact budget projection.** A strategy is one sparsity s_l per transformer block; the request fixes its mean
weighted by each block's prunable parameters P_l (the sparsity over pruned parameters). StratNet and the
per-request searches produce an unconstrained vector z ∈ Rⁿ; ``project`` maps it onto

    s_l = lo_l + (hi_l − lo_l) · σ(z_l + c),      Σ_l P_l s_l / Σ_l P_l = t,

with one common offset c. The mean is strictly increasing in c, so c is unique; it is found by safeguarded Newton
steps (bisection when a step leaves the bracket) in float64 (to machine precision, so the mean equals t within
~1e-12 and every s_l lies strictly inside [lo_l, hi_l]). The bounds are a band around the target, lo = max(0, t −
spread), hi = min(max_block, t + spread) (as OWL keeps every block within s ± λ). The projection is differentiable:
c(z, t) is an implicit function of g(z, c) = t, so after the solve one Newton step c = c* − (g(z, c*) − t)/∂_c g,
with c* and ∂_c g detached, leaves the value at c* and gives autograd exactly the implicit-function gradient dc/dz =
−∂_z g / ∂_c g (and dc/dt = 1/∂_c g). z = 0 gives the uniform strategy.

**Size budget → sparsity.** A pruned model's sparse weight file (``compress.io.sparse``) stores each pruned
tensor as its kept values plus a packed bitmask (numel/8 bytes), every other tensor dense, the config and
tokenizer files, and a JSON header. The kept values of all pruned tensors total (1 − t)·P entries for *any*
strategy of mean t, so the file size is affine in t alone:

    bytes(t) = fixed + Σ_pruned ⌈numel/8⌉ + itemsize · (1 − t) · P,

fixed = dense tensors + auxiliary files + the header room the sparse writer reserves (``header_room``, an upper
bound computed from the names, shapes and dtypes alone) + ``HEADER_BASE`` for its metadata.
``sparsity_for_size`` solves it for t; the written file is at most the budget
(the bitmask is the encoding ``encode_sparse`` picks for 1/(8·itemsize) < s_l < 7/8; a block sparser than 7/8 may
switch to varint gaps, which only makes the file smaller).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from compress.errors import CompressError

HEADER_BASE = 2048


def band(target: torch.Tensor, spread: float, max_block: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request bounds (lo, hi) of every block's sparsity: target ± spread within [0, max_block]."""
    return (target - spread).clamp_min(0.0), (target + spread).clamp_max(max_block)


def _mean(z: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    s = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * torch.sigmoid(z + c.unsqueeze(-1))
    return (s * w).sum(-1) / w.sum()


def project(z: torch.Tensor, target: torch.Tensor | float, block_params: Sequence[int] | torch.Tensor, *,
            spread: float = 0.2, max_block: float = 0.95, iters: int = 200) -> torch.Tensor:
    """Per-block sparsities [..., n] from raw values ``z`` [..., n]: the parameter-weighted mean is ``target``
    [...] exactly, every value in [max(0, t − spread), min(max_block, t + spread)]; differentiable in z and t.
    Computed in float64."""
    z = z.to(torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64, device=z.device).expand(z.shape[:-1])
    w = torch.as_tensor(block_params, dtype=torch.float64, device=z.device)
    if w.shape[-1] != z.shape[-1]:
        raise CompressError(f"strategy has {z.shape[-1]} values but the model has {w.shape[-1]} blocks")
    if bool(((t <= 0) | (t >= max_block)).any()):
        bad = t[(t <= 0) | (t >= max_block)].reshape(-1)[0].item()
        raise CompressError(f"sparsity {bad:g} is outside (0, {max_block:g}), the range a strategy can reach")
    lo, hi = band(t, spread, max_block)
    with torch.no_grad():
        zd, td, lod, hid = z.detach(), t.detach(), lo.detach(), hi.detach()
        a = -zd.amax(-1) - 40.0
        b = -zd.amin(-1) + 40.0
        # safeguarded Newton from the offset that is exact for z = const: a bisection step whenever Newton leaves
        # the bracket; the mean is smooth and monotone in c, so this takes a handful of steps (StratNet calls
        # the projection twice per training step, the bisection alone took ~25)
        u = ((td - lod) / (hid - lod)).clamp(1e-12, 1 - 1e-12)
        c_star = (torch.log(u) - torch.log1p(-u) - (zd * w).sum(-1) / w.sum()).clamp(a, b)
        for _ in range(iters):
            sig = torch.sigmoid(zd + c_star.unsqueeze(-1))
            err = _mean(zd, c_star, lod, hid, w) - td
            if bool((err.abs() < 1e-13).all()):
                break
            a = torch.where(err < 0, c_star, a)
            b = torch.where(err < 0, b, c_star)
            slope = ((hid - lod).unsqueeze(-1) * sig * (1 - sig) * w).sum(-1) / w.sum()
            step = c_star - err / slope.clamp_min(1e-300)
            c_star = torch.where((step > a) & (step < b), step, (a + b) / 2)
        sig = torch.sigmoid(zd + c_star.unsqueeze(-1))
        slope = ((hid - lod).unsqueeze(-1) * sig * (1 - sig) * w).sum(-1) / w.sum()
    # one Newton step with c*, slope detached: value c*, gradient the implicit-function one
    c = c_star - (_mean(z, c_star, lo, hi, w) - t) / slope.clamp_min(1e-300)
    return lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * torch.sigmoid(z + c.unsqueeze(-1))


def weighted_mean(s: torch.Tensor, block_params: Sequence[int] | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(block_params, dtype=s.dtype, device=s.device)
    return (s * w).sum(-1) / w.sum()


# -- size budget ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SizeModel:
    """bytes(t) = fixed_bytes + itemsize · (1 − t) · pruned_params (see the module docstring)."""

    fixed_bytes: int
    pruned_params: int
    itemsize: int

    def bytes(self, sparsity: float) -> int:
        return int(self.fixed_bytes + math.ceil(self.itemsize * (1 - sparsity) * self.pruned_params))

    def sparsity(self, size_bytes: int) -> float:
        return 1 - (size_bytes - self.fixed_bytes) / (self.itemsize * self.pruned_params)

    def budgets(self, lo: float, hi: float) -> tuple[int, int]:
        """The smallest and the largest ``size_bytes`` whose sparsity lies in [lo, hi]."""
        small = self.fixed_bytes + math.ceil(self.itemsize * (1 - hi) * self.pruned_params)
        big = self.fixed_bytes + math.floor(self.itemsize * (1 - lo) * self.pruned_params)
        while self.sparsity(small) > hi:  # float rounding at the edges: as sparsity_for_size will see them
            small += 1
        while self.sparsity(big) < lo:
            big -= 1
        return small, big


def size_model(model_dir: str | os.PathLike, pruned: dict[str, int], dtype: torch.dtype | None = None) -> SizeModel:
    """The sparse-file size model of ``model_dir`` when the tensors ``pruned`` ({checkpoint name: numel}) are
    pruned and every tensor is stored in ``dtype`` (None: as stored)."""
    from compress.io.reader import open_checkpoint
    from compress.io.sparse import header_room
    from compress.io.writer import AUX_FILES

    folder = Path(model_dir)
    aux = [a for a in AUX_FILES if (folder / a).is_file()]
    # the header the writer reserves (``header_room``), and HEADER_BASE for the metadata it adds (method, model)
    fixed = HEADER_BASE + sum((folder / a).stat().st_size for a in aux)
    plan = []
    itemsizes = set()
    n_pruned = 0
    with open_checkpoint(folder) as ck:
        names = list(ck.names())
        for name in names:
            info = ck.info(name)
            written = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            size = written.itemsize
            plan.append((name, tuple(info.shape), written))
            if name in pruned:
                fixed += math.ceil(info.numel / 8)
                itemsizes.add(size)
                n_pruned += info.numel
            else:
                fixed += info.numel * size
    fixed += header_room(plan, aux, {})
    missing = set(pruned) - set(names)
    if missing:
        raise CompressError(f"{folder}: pruned weight '{sorted(missing)[0]}' is not in the checkpoint")
    if len(itemsizes) != 1:
        raise CompressError(f"{folder}: pruned weights of mixed dtypes; give --dtype to size the sparse file")
    return SizeModel(fixed, n_pruned, itemsizes.pop())


def sparsity_for_size(size_bytes: int, model: SizeModel, lo: float, hi: float) -> float:
    """The sparsity whose sparse file meets ``size_bytes``; a one-line error when it falls outside [lo, hi]."""
    try:
        t = model.sparsity(size_bytes)
    except OverflowError:  # a budget beyond any float: more than any file needs
        t = -math.inf
    if not lo <= t <= hi:
        given = f"{size_bytes:,}" if size_bytes < 10 ** 18 else f"of {len(str(size_bytes))} digits"
        raise CompressError(f"size_bytes {given} needs sparsity {t:.4f}, outside the range [{lo:g}, {hi:g}]: "
                            "reachable sizes are {:,} to {:,} bytes".format(*model.budgets(lo, hi)))
    return t
