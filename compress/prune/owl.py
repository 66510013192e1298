"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Per block l, the layerwise outlier distribution D_l is the fraction of Wanda scores |W_ij|·‖X_j‖₂ over all the
block's prunable layers (concatenated) that exceed M times their mean (``check_outlier_mean`` in the OWL code).
Blocks with more outliers are pruned less: with D normalized to [0, 1] (min-max, as the code),
s_l = s − 2λ·(D̂_l − mean D̂), clipped to [s − λ, s + λ] (and [0, 1)). The mean is weighted by each block's
prunable parameters and restored exactly after clipping (a bisection on a common offset), so the sparsity over
pruned parameters equals s. Paper defaults: M = 5, λ = 0.08.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from compress.prune.strategy import Strategy, recenter


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of the concatenated ``scores`` above ``m`` × their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_allocation(ratios: Sequence[float], block_params: Sequence[int], sparsity: float, lam: float = 0.08
                   ) -> list[float]:
    """Per-block sparsities from outlier ratios D_l (see the module docstring)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min())
    norm = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    raw = [sparsity - 2 * lam * float(x) for x in norm]
    lo, hi = max(sparsity - lam, 0.0), min(sparsity + lam, 1.0 - 1e-6)
    return recenter(raw, block_params, sparsity, lo, hi)


def owl_strategy(block_scores: Mapping[int, list[torch.Tensor]], block_params: Sequence[int], sparsity: float,
                 m: float = 5.0, lam: float = 0.08) -> Strategy:
    """OWL's strategy from each block's Wanda score matrices."""
    ratios = [outlier_ratio(block_scores[b], m) for b in range(len(block_params))]
    return owl_from_ratios(ratios, block_params, sparsity, m, lam)


def owl_from_ratios(ratios: Sequence[float], block_params: Sequence[int], sparsity: float, m: float = 5.0,
                    lam: float = 0.08) -> Strategy:
    """OWL's strategy from each block's outlier ratio D_l (a block-wise pass computes one block at a time)."""
    values = owl_allocation(ratios, block_params, sparsity, lam)
    return Strategy(tuple(values), "owl", {"owl_m": m, "owl_lambda": lam, "outlier_ratio": list(ratios)})
