"""Merges on the sphere and by angle: NuSLERP, Multi-SLERP, the Karcher mean and Model Stock.

Pure functions: whole tensors in (``tensors``: ``[n_models, *shape]``), the merged tensor out, in the dtype the
tensors come in (mergekit's rule: a merge computes in the dtype of its inputs unless a recipe names one). Each
follows mergekit 0.1.5's arithmetic step for step (the same operations in the same order), so that in float32 and
in bf16 the output is mergekit's bit for bit; the docstrings say where that departs from the paper.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compress.errors import CompressError


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True,
                 eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors as whole vectors (``flatten``), row by row (``row_wise``: along
    dim 0) or along the last dim; rows that are (anti)collinear fall back to linear interpolation."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    cos = torch.sum(_unit_rows(a) * _unit_rows(b), dim=-1, keepdim=True).clamp(-1, 1)
    linear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(linear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(linear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(base: Optional[torch.Tensor], tensors: torch.Tensor, weights: Sequence[float], *,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """NuSLERP (mergekit ``nuslerp``, Goddard 2024): SLERP between two models at t = w₂/(w₁ + w₂) (0.5 when the
    weights sum to ~0). With a base, the two task vectors are interpolated and added to it (a SLERP of deltas,
    which plain ``slerp`` cannot do); without one, the weights themselves."""
    if tensors.shape[0] != 2:
        raise CompressError(f"nuslerp merges exactly two models, got {tensors.shape[0]}")
    w0, w1 = (float(w) for w in weights)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], row_wise=row_wise, flatten=flatten)
    return base + nuslerp_pair(t, tensors[0] - base, tensors[1] - base, row_wise=row_wise, flatten=flatten)


def multislerp(base: Optional[torch.Tensor], tensors: torch.Tensor, weights: Sequence[float], *,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP (Goddard 2024, "multislerp"; mergekit ``multislerp``): barycentric interpolation on the
    hypersphere. Each (task) vector is projected to the unit sphere, mapped to the tangent space at the weighted
    mean direction, averaged there, mapped back by the exponential map, and scaled by the weighted mean norm."""
    if tensors.shape[0] == 1:
        return tensors[0]
    x = tensors - base if base is not None else tensors.clone()
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor([float(v) for v in weights], dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise CompressError("multislerp: the weighted mean direction is zero (antipodal models with balancing "
                                "weights); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out + base if base is not None else out


def karcher(tensors: torch.Tensor, alphas: Optional[Sequence[float]] = None, *, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher (Riemannian, Fréchet) mean on the unit hypersphere (Karcher 1977; mergekit
    ``karcher``): directions averaged by fixed-point iterations of the log/exp maps, scaled by the weighted mean
    norm. Equal weights by default, as mergekit, which averages every input, the base included. Norms and the
    stopping tests are taken in float32 (float64 inputs: float64); the directions stay in the input dtype."""
    xs = list(tensors.unbind(0))
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs) if alphas is None else [float(a) for a in alphas]
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in xs]
    units = [torch.zeros_like(x) if float(nrm) == 0.0 else (x / nrm).to(x.dtype) for x, nrm in zip(xs, norms)]
    live = [i for i, nrm in enumerate(norms) if float(nrm) > tol]
    if not live:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in live)
    a = [alphas[i] / total for i in live]
    u = [units[i] for i in live]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mn = torch.linalg.vector_norm(mean.to(acc))
    mean = u[0].clone() if float(mn) < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = torch.linalg.vector_norm(tangent.to(acc))
        if float(tn) < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = torch.linalg.vector_norm(mean.to(acc))
        if float(un) > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(ai * nrm for ai, nrm in zip(alphas, norms)) * mean


def model_stock(base: torch.Tensor, tensors: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"; mergekit
    ``model_stock``): the fine-tuned average pulled towards the base by t = N·cos θ / (1 + (N − 1)·cos θ), θ the
    mean pairwise angle between the task vectors, over the whole tensor or per row (``filter_wise``). Where the
    denominator vanishes the base is kept."""
    n = tensors.shape[0]
    if n < 2:
        raise CompressError(f"model_stock needs at least two fine-tuned models besides the base, got {n}")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if base.dim() == 1 else x for x in tensors.unbind(0)]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors.unbind(0)]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
