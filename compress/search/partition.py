"""Subspace partitions of a task vector for NPS (Du et al. 2025, "Neural Parameter Search for Slimmer Fine-Tuned
Models and Better Transfer"): τ = Σ_m q_m, and the searched vector is Σ_m w_m q_m.

Pure functions on tensors, two kinds:

* ``magnitude_bins``: the paper's split of |τ| into M magnitude intervals. Each entry gets a label m; q_m is τ
  where the label is m and 0 elsewhere, so the parts sum back to τ *exactly* (each entry lives in one part).
  ``bin_edges`` places the edges: ``quantile`` (equal counts, the default), ``linear`` (equal widths of |τ|, the
  paper's figure) or ``log``. ``span`` restricts the M − 1 finest bins to the largest ``span`` fraction of |τ|
  (the rest is the last bin): at density 1 % the top-k of the reweighted vector only ever draws from the largest
  few percent, so the search should be able to tell those bands apart. ``span = 1`` is the paper's whole range.
* ``svd_bands``: a low-rank split of a matrix's τ by singular-value bands, τ = Σ_m U_m S_m V_mᵀ, the M bands
  holding equal shares of the rank (largest singular values first); the last band is the remainder τ − Σ_{m<M}
  q_m, so the parts add up to τ up to float rounding. 1-D tensors (biases, norms) are one band: they have no
  singular values to split.

``group_of`` names the group a tensor's weights belong to (``none``: one set of M weights for the whole model;
``layer``: one set per transformer layer, embeddings and other tensors in their own group; ``module``: one set per
module kind, e.g. attention.self.query, intermediate.dense, embeddings, LayerNorm).
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import torch

from compress.errors import CompressError
from compress.sparsify.topk import kth_largest_bits, magnitude_bits

Edges = Literal["quantile", "linear", "log"]
Grouping = Literal["none", "layer", "module"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def bin_edges(magnitudes: torch.Tensor, m: int, scheme: Edges = "quantile", span: float = 1.0) -> torch.Tensor:
    """M − 1 descending magnitude edges e_1 > … > e_{M−1}: part 0 holds |τ| ≥ e_1, part m holds e_{m+1} ≤ |τ| < e_m,
    part M − 1 everything below e_{M−1}. ``magnitudes`` may be the whole model's |τ| (global edges) or one tensor's.

    ``quantile``: with ``span = 1`` M equal counts; with ``span < 1`` the top ``span`` fraction split into M − 1
    equal counts and the remainder the last part. ``linear``/``log``: the range [smallest magnitude of the span,
    max] split evenly (in |τ| or in log |τ|), the same way.
    """
    if m < 1:
        raise CompressError(f"partition: M must be >= 1 (got {m})")
    if not 0.0 < span <= 1.0:
        raise CompressError(f"partition: span must be in (0, 1] (got {span})")
    if m == 1:
        return torch.empty(0, dtype=torch.float32)
    bits = magnitude_bits(magnitudes)
    n = bits.numel()
    top = max(1, int(round(span * n)))
    cuts = m - 1 if span < 1.0 else m
    if scheme == "quantile":
        ks = [max(1, min(n, round(top * j / cuts))) for j in range(1, m)]
        return torch.tensor([kth_largest_bits(bits, k) for k in ks], dtype=torch.int32).view(torch.float32)
    hi = torch.tensor([kth_largest_bits(bits, 1)], dtype=torch.int32).view(torch.float32)[0].item()
    lo = torch.tensor([kth_largest_bits(bits, top)], dtype=torch.int32).view(torch.float32)[0].item()
    j = torch.arange(1, m, dtype=torch.float64) / cuts
    if scheme == "linear":
        edges = hi - j * (hi - lo)
    elif scheme == "log":
        tiny = max(lo, hi * 1e-12, 1e-30)
        edges = torch.exp(torch.log(torch.tensor(hi, dtype=torch.float64)) * (1 - j) +
                          torch.log(torch.tensor(tiny, dtype=torch.float64)) * j)
    else:
        raise CompressError(f"partition: unknown edge scheme '{scheme}' (choose quantile, linear or log)")
    return edges.to(torch.float32)


def magnitude_bins(tau: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Label (uint8, 0 = largest magnitudes) of every entry of ``tau`` given descending ``edges``."""
    if edges.numel() >= 255:
        raise CompressError(f"partition: at most 255 magnitude bins (got {edges.numel() + 1})")
    a = tau.detach().abs().float()
    # label = number of edges strictly above |τ|: searchsorted over the ascending edges, counted from the top
    asc = edges.to(a.device).flip(0).contiguous()
    below_or_equal = torch.searchsorted(asc, a.reshape(-1), right=True)  # edges <= |τ|
    return (edges.numel() - below_or_equal).to(torch.uint8).reshape(tau.shape)


def bin_parts(tau: torch.Tensor, labels: torch.Tensor, m: int) -> list[torch.Tensor]:
    """The parts q_0 … q_{M−1} of a magnitude-bin split (dense tensors; their sum is ``tau`` exactly)."""
    return [torch.where(labels == j, tau, torch.zeros_like(tau)) for j in range(m)]


def svd_bands(tau: torch.Tensor, m: int) -> list[torch.Tensor]:
    """τ = Σ_m U_m S_m V_mᵀ: M parts of a 2-D ``tau`` by singular-value bands (equal shares of the rank, largest
    first); the last part is the remainder, so the sum is ``tau`` up to float rounding. Other shapes: [tau] and
    M − 1 zero parts."""
    if m < 1:
        raise CompressError(f"partition: M must be >= 1 (got {m})")
    if tau.ndim != 2 or m == 1:
        return [tau.clone()] + [torch.zeros_like(tau) for _ in range(m - 1)]
    work = tau.double() if tau.device.type == "cpu" else tau.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = s.numel()
    bounds = [round(r * j / m) for j in range(m + 1)]
    parts, acc = [], torch.zeros_like(work)
    for j in range(m - 1):
        a, b = bounds[j], bounds[j + 1]
        q = (u[:, a:b] * s[a:b]) @ vh[a:b] if b > a else torch.zeros_like(work)
        acc += q
        parts.append(q.to(tau.dtype))
    parts.append((work - acc).to(tau.dtype))
    return parts


def group_of(name: str, grouping: Grouping) -> str:
    """The group a tensor's part weights belong to."""
    if grouping == "none":
        return "all"
    if grouping == "layer":
        hit = _LAYER.search(name)
        return f"layer.{hit.group(1)}" if hit else "other"
    if grouping == "module":
        stem = _LAYER.sub(".", name).strip(".")
        stem = re.sub(r"\.(weight|bias)$", "", stem)
        return re.sub(r"^(?:[a-z_]+\.)?(embeddings)\..*$", r"\1", stem) or name
    raise CompressError(f"partition: unknown grouping '{grouping}' (choose none, layer or module)")


def groups(names: list[str], grouping: Grouping) -> tuple[list[str], list[int]]:
    """(group names in first-seen order, the group index of each tensor)."""
    order: dict[str, int] = {}
    idx = [order.setdefault(group_of(n, grouping), len(order)) for n in names]
    return list(order), idx


def combine_parts(parts: list[torch.Tensor], weights: torch.Tensor | list[float],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_m w_m q_m."""
    res = out if out is not None else torch.zeros_like(parts[0])
    res.zero_()
    for q, w in zip(parts, weights):
        res.add_(q, alpha=float(w))
    return res
