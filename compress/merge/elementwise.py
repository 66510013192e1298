"""Merges that choose entry by entry: SCE, RAM and RAM+, NearSwap, Arcee Fusion, passthrough.

Pure functions on a base tensor and stacked model tensors ``[n_models, *shape]``, in the dtype they come in. Each
follows mergekit 0.1.5's arithmetic in order, so the output is mergekit's bit for bit in float32 and bf16.
"""

from __future__ import annotations

from typing import Optional

import torch


def sce(base: torch.Tensor, tensors: torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat 2.0, "Select, Calculate, Erase"; mergekit ``sce``): keep the
    ``select_topk`` fraction of entries where the task vectors vary most across models (of the entries that vary
    at all; ``torch.topk`` picks among equal variances, as mergekit), weight each model by its mean squared
    task vector, erase entries whose sign disagrees with the elected (mass) sign, and take the weighted mean."""
    tv = tensors - base
    if select_topk < 1:
        keep = torch.zeros_like(tv[0])
        if select_topk > 0:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            if k:
                keep.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tv = tv * keep.unsqueeze(0)
    agree = tv.sign() == torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)  # TIES' mass election
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(torch.sum(w))
    w = torch.ones_like(w) / w.shape[0] if abs(total) < 1e-6 else w / total
    w = w.reshape((-1,) + (1,) * (tv.dim() - 1)) * agree
    return base + (tv * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)


def _ram_parts(base: torch.Tensor, tensors: torch.Tensor, epsilon: float):
    tv = (tensors - base).reshape(tensors.shape[0], -1)
    live = tv.abs() > epsilon
    count = live.sum(dim=0, keepdim=True)
    return tv * live, live, count, count > 1, count == 1


def ram(base: torch.Tensor, tensors: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM, Reinforced Agent Merging (arXiv 2601.13572; mergekit ``ram``): an entry that only one model changes
    (|τ| > ``epsilon``) takes that model's change; one that several change takes their mean."""
    tv, _, count, shared, unique = _ram_parts(base, tensors, epsilon)
    merged = ((tv * unique) + (tv * shared / count.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(base: torch.Tensor, tensors: torch.Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+, tensor-local (arXiv 2601.13572; mergekit ``ramplus_tl``): RAM, with each model's unique entries
    scaled by 1 + r·clamp(ρ, 0, alpha), ρ = its shared / unique entry counts in this tensor. The scale is a
    float32 tensor, so (as in mergekit) a bf16 merge comes out in float32."""
    tv, live, count, shared, unique = _ram_parts(base, tensors, epsilon)
    rho = (live & shared).sum(dim=1) / (live & unique).sum(dim=1).clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    merged = ((tv * unique * lam.unsqueeze(-1)) + (tv * shared / count.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def nearswap(base: torch.Tensor, tensors: torch.Tensor, *, t: float) -> torch.Tensor:
    """NearSwap (alchemonaut 2024, QuartetAnemoi; mergekit ``nearswap``): interpolate towards the model with
    weight clamp(t / |θ − θ_base|, 0, 1) per entry, so entries where the two are close take the model's value
    and distant ones stay near the base."""
    other = tensors[0]
    w = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base


def arcee_fusion(base: torch.Tensor, tensors: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
    """Arcee Fusion (Arcee AI 2025; mergekit ``arcee_fusion``): importance = |θ − θ_base| · KL(softmax θ ‖
    softmax θ_base) per row; the model's change is kept where importance ≥ median + 1.5·IQR (quantiles read off
    the sorted scores, or from a sample of 10⁶ drawn with ``generator`` on larger tensors, as mergekit samples)."""
    other = tensors[0]
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:
        pick = torch.randint(flat.numel(), (1_000_000,), generator=generator, device="cpu").to(flat.device)
        flat = flat[pick]
    ranked = torch.sort(flat).values
    q1, median, q3 = ranked[(torch.tensor([0.25, 0.5, 0.75]) * (ranked.numel() - 1)).long().to(ranked.device)]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def passthrough(tensors: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """Passthrough (mergekit ``passthrough``): the single input's tensor, times ``scale`` when given (the building
    block of frankenmerges, where slices pick which layers pass)."""
    return tensors[0] if scale is None else tensors[0] * scale
