"""Data-free merges in the singular-vector subspaces of each layer: TSV-M, Iso-C, Iso-CTS and WUDI-merging.

Each method is a pure function of the stacked task-vector tensors of one 2-D weight ``[n_models, out, in]`` and
returns the merged delta ``[out, in]``; ``subspace_merge`` applies it to any tensor the executor hands over
(``compress.merge.executor``), so these merges stream tensor by tensor like task arithmetic. Tensors that are not
matrices (biases, LayerNorm) are averaged, as all four papers' code does. Switches the papers leave open:

- ``embeddings``: ``mean`` (default) or ``matrix``. The papers merge vision transformers, whose patch embedding
  is a convolution; a word/position embedding is a lookup table, not a linear layer whose inputs span the task
  vector's rows, so by default it is averaged like the other non-matrix tensors. ``matrix`` treats it as one
  more 2-D weight (what FusionBench's code does with every 2-D tensor).
- ``lam`` (α): one scale of the merged delta; TSV-M's paper uses 1, Iso-C/Iso-CTS choose it on validation data,
  WUDI uses 1.
- weights ``w_i`` (``subspace_merge``): each task vector is scaled by its weight before the method sees it
  (1 by default, as in the papers).

Everything is computed in the stacked tensor's dtype on its device (the executor's float32 by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from compress.errors import CompressError

# lookup tables (word, position, token-type embeddings): see ``embeddings`` in the module docstring
LOOKUP_RE = re.compile(r"(embeddings|embed_tokens|embed_positions|wte|wpe)\.weight$")


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of ``x`` (x = P Σ Qᵀ gives P Qᵀ): the nearest matrix with orthonormal columns (or
    rows, when x is wide), which is how TSV-M and Iso-CTS decorrelate concatenated bases."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_m(deltas: torch.Tensor, rank: Optional[float] = None) -> torch.Tensor:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Each task matrix τ_i = U_i S_i V_iᵀ keeps its top k = ⌊rank · min(out, in)⌋ singular triplets (at least one;
    ``rank`` defaults to 1/T, the paper's share); the kept U's and V's are concatenated, decorrelated by their
    polar factors (U⊥ = polar([U_1 … U_T]), V⊥ likewise) and recombined with the concatenated singular values:
    U⊥ diag(S_1 … S_T) V⊥ᵀ. Task matrices with orthogonal row and column spaces come back as their sum.
    """
    n, m, k_in = deltas.shape
    r = min(m, k_in)
    share = (1.0 / n) if rank is None else float(rank)
    if not 0.0 < share <= 1.0:
        raise CompressError(f"tsv: rank must be a fraction in (0, 1], got {rank}")
    k = max(1, int(r * share))
    u, s, vh = torch.linalg.svd(deltas, full_matrices=False)  # batched over the tasks
    u_cat = u[:, :, :k].permute(1, 0, 2).reshape(m, n * k)
    v_cat = vh[:, :k, :].reshape(n * k, k_in)
    s_cat = s[:, :k].reshape(n * k)
    return (polar(u_cat) * s_cat) @ polar(v_cat)


def iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025): the task-arithmetic sum Σ τ_i = U S Vᵀ with its spectrum made isotropic,
    U (mean(S)·I) Vᵀ."""
    u, s, vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts(deltas: torch.Tensor, common: float = 0.8) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): the top directions of Σ τ_i (the common subspace, a fraction
    ``common`` of the rank; the paper's 0.8) plus, per task, the top directions of τ_i with the common left
    subspace projected out (τ_i − U_c U_cᵀ τ_i); the bases are decorrelated by their polar factors and the
    spectrum of all kept singular values made isotropic (their mean).

    Switch the paper leaves open: the task-specific share (r − ⌊common·r⌋) is rounded down to a multiple of T
    and the common subspace takes the rest (the reference code rounds to the nearest multiple). ``common = 1``
    is Iso-C.
    """
    n, m, k_in = deltas.shape
    if not 0.0 < common <= 1.0:
        raise CompressError(f"iso_cts: common must be a fraction in (0, 1], got {common}")
    r = min(m, k_in)
    per_task = (r - int(r * common)) // n
    kc = r - per_task * n
    u, s, vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc]
    if per_task == 0:
        return (uc * sc.mean()) @ vc
    resid = deltas - uc @ (uc.T @ deltas)  # each task's part outside the common column space
    ut, st, vt = torch.linalg.svd(resid, full_matrices=False)
    u_all = torch.cat([uc, ut[:, :, :per_task].permute(1, 0, 2).reshape(m, n * per_task)], 1)
    v_all = torch.cat([vc, vt[:, :per_task, :].reshape(n * per_task, k_in)], 0)
    s_mean = torch.cat([sc, st[:, :per_task].reshape(-1)]).mean()
    return (polar(u_all) * s_mean) @ polar(v_all)


def wudi_objective(merged: torch.Tensor, deltas: torch.Tensor, grams: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WUDI's interference Σ_i ||(τ_m − τ_i) τ_iᵀ||²_F / ||τ_i||²_F (tasks with τ_i = 0 add nothing).

    With ``grams`` (τ_iᵀ τ_i, ``[n, in, in]``) the same value is Σ ⟨D_i G_i, D_i⟩, cheaper when out > in."""
    d = merged.unsqueeze(0) - deltas
    norms = deltas.flatten(1).pow(2).sum(1)
    if grams is not None:
        per_task = (torch.bmm(d, grams) * d).flatten(1).sum(1)
    else:
        per_task = torch.bmm(d, deltas.transpose(1, 2)).pow(2).flatten(1).sum(1)
    return torch.where(norms > 0, per_task / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0).sum()


def wudi(deltas: torch.Tensor, steps: int = 300, lr: float = 1e-5, init: Optional[torch.Tensor] = None,
         history: Optional[list] = None) -> torch.Tensor:
    """WUDI-merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging
    via Task Vectors", ICML 2025): per linear layer, the merged delta minimising ``wudi_objective`` by Adam (the
    paper's ``steps`` = 300, ``lr`` = 1e-5) from the task-arithmetic sum (or ``init``), data-free, on the device
    the deltas are on. With one task the sum is already the minimiser (the objective is 0 there).
    ``history``: a list that receives the objective before each step and after the last.

    The objective is quadratic, Σ_i tr(D_i G_i D_iᵀ)/‖τ_i‖² with D_i = τ_m − τ_i and G_i = τ_iᵀ τ_i, so its
    gradient is 2 (τ_m A − B) with A = Σ_i G_i/‖τ_i‖² and B = Σ_i τ_i G_i/‖τ_i‖², formed once: a step costs one
    matrix product instead of one per task, and Adam sees the same gradients as through autograd.
    """
    steps = int(steps)
    if steps < 0 or not lr > 0:
        raise CompressError(f"wudi: steps must be >= 0 and lr > 0 (got steps {steps}, lr {lr})")
    deltas = deltas.detach()
    a = deltas.new_zeros((deltas.shape[2], deltas.shape[2]))
    b = torch.zeros_like(deltas[0])
    for t in deltas:
        norm = t.pow(2).sum()
        if norm > 0:
            g = (t.T @ t) / norm
            a += g
            b += t @ g
    merged = (deltas.sum(0) if init is None else init.to(deltas)).clone().requires_grad_(True)
    opt = torch.optim.Adam([merged], lr=lr)
    for _ in range(steps):
        if history is not None:
            history.append(float(wudi_objective(merged.detach(), deltas)))
        merged.grad = 2 * (merged.detach() @ a - b)
        opt.step()
    if history is not None:
        history.append(float(wudi_objective(merged.detach(), deltas)))
    return merged.detach()


# -- the registry the executor reads -------------------------------------------------------------------------

@dataclass(frozen=True)
class SubspaceMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]  # recipe parameters passed to ``fn`` (None: the function's default)
    paper: str


SUBSPACE_METHODS: dict[str, SubspaceMethod] = {m.name: m for m in (
    SubspaceMethod("tsv", tsv_m, ("rank",), "Gargiulo et al. 2025, Task Singular Vectors (TSV-M)"),
    SubspaceMethod("iso_c", iso_c, (), "Marczak et al. 2025, Iso-C (isotropic spectrum of the sum)"),
    SubspaceMethod("iso_cts", iso_cts, ("common",), "Marczak et al. 2025, Iso-CTS (common + task subspaces)"),
    SubspaceMethod("wudi", wudi, ("steps", "lr"), "Cheng et al. 2025, WUDI-merging (data-free, Adam per layer)"),
)}


def subspace_merge(method: str, name: str, deltas: torch.Tensor, weights=None, *, lam: float = 1.0,
                   embeddings: Literal["mean", "matrix"] = "mean", **params) -> torch.Tensor:
    """The merged delta of tensor ``name`` from stacked deltas ``[n, *shape]`` under a ``SUBSPACE_METHODS``
    entry: 2-D weights through the method, everything else (and lookups unless ``embeddings='matrix'``)
    averaged; then scaled by ``lam``. ``params``: the method's parameters (None values take its defaults)."""
    spec = SUBSPACE_METHODS.get(method)
    if spec is None:
        raise CompressError(f"unknown subspace merge '{method}' (choose {', '.join(SUBSPACE_METHODS)})")
    if embeddings not in ("mean", "matrix"):
        raise CompressError(f"embeddings must be mean or matrix, got {embeddings!r}")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device).reshape(-1)
        if w.numel() != deltas.shape[0]:
            raise CompressError(f"{w.numel()} weights for {deltas.shape[0]} models")
        if not bool((w == 1).all()):
            deltas = deltas * w.reshape((-1,) + (1,) * (deltas.dim() - 1))
    if deltas.dim() != 3 or (embeddings == "mean" and LOOKUP_RE.search(name)):
        merged = deltas.mean(0)
    else:
        merged = spec.fn(deltas, **{k: v for k, v in params.items() if k in spec.params and v is not None})
    return merged * lam if lam != 1.0 else merged
