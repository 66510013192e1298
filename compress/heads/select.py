"""Which heads to protect or reinforce, from a [layers, heads] score tensor.

- ``top_heads(scores, top, per_layer)``: the highest-scoring heads: round(top·L·H) of all heads (at least
  one), or round(top·H) of each layer's (at least one per layer) with ``per_layer``; ties go to the lower
  (layer, head) index, so a selection is deterministic.
- ``random_heads(n_layers, n_heads, like, seed)``: as many heads as ``like`` holds, uniformly at random (the
  baseline a scored selection is compared with; per layer when ``per_layer``), from a seeded generator.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Sequence

import torch

from compress.errors import CompressError
from compress.sparsify.protect import Protect

Heads = list[tuple[int, int]]


def _count(top: float, n: int) -> int:
    if not 0.0 < top <= 1.0:
        raise CompressError(f"--protect-top {top}: a fraction of the heads in (0, 1]")
    return max(1, min(n, int(round(top * n))))


def top_heads(scores: torch.Tensor, top: float, per_layer: bool = False) -> Heads:
    """The highest-scoring heads (a fraction ``top`` of all, or of each layer's), sorted by (layer, head)."""
    if scores.dim() != 2:
        raise CompressError(f"head scores must be [layers, heads], got shape {list(scores.shape)}")
    s = scores.detach().double().cpu()
    if torch.isnan(s).any():
        raise CompressError("head scores contain NaN")
    L, H = s.shape
    if per_layer:
        k = _count(top, H)
        out = [(l, int(h)) for l in range(L) for h in torch.sort(-s[l], stable=True).indices[:k]]
    else:
        k = _count(top, L * H)
        flat = torch.sort(-s.reshape(-1), stable=True).indices[:k]
        out = [(int(i) // H, int(i) % H) for i in flat]
    return sorted(out)


def random_heads(n_layers: int, n_heads: int, like: Sequence[tuple[int, int]], seed: int,
                 per_layer: bool = False) -> Heads:
    """``len(like)`` heads drawn without replacement (per layer: as many per layer as ``like`` has there)."""
    g = torch.Generator().manual_seed(int(seed))
    if per_layer:
        out = []
        for l in range(n_layers):
            k = sum(1 for a, _ in like if a == l)
            out += [(l, int(h)) for h in torch.randperm(n_heads, generator=g)[:k]]
        return sorted(out)
    idx = torch.randperm(n_layers * n_heads, generator=g)[:len(like)]
    return sorted((int(i) // n_heads, int(i) % n_heads) for i in idx)


def protect_from_scores(path: str | os.PathLike, model, top: float = 0.1, per_layer: bool = False,
                        sparsity: Optional[float] = None):
    """``head_protect`` of the top heads of a scores file (``compress heads score``) for ``model``."""
    from compress.heads.layout import attention_layout, head_protect
    from compress.heads.scorefile import load_scores

    sf = load_scores(path)
    layout = attention_layout(model)
    if tuple(sf.scores.shape) != (layout.n_layers, layout.n_heads):
        raise CompressError(f"{path}: scores are {list(sf.scores.shape)} [layers, heads] but the model has "
                            f"{layout.n_layers} layers of {layout.n_heads} heads")
    return head_protect(layout, top_heads(sf.scores, top, per_layer), sparsity=sparsity)


def resolve_protect(opts, model) -> Optional[Protect]:
    """The ``Protect`` that ``opts`` (a ``config.ProtectOptions``: a prune, merge or NPS config) describe for
    ``model`` (a folder, checkpoint or module); None if none."""
    p = Protect.load(opts.protect) if opts.protect is not None else None
    if opts.protect_heads is not None:
        hp = protect_from_scores(opts.protect_heads, model, top=opts.protect_top, per_layer=opts.protect_per_layer,
                                 sparsity=opts.protect_sparsity)
        p = hp if p is None else replace(p, sparsity=opts.protect_sparsity).union(hp)
    elif p is not None and opts.protect_sparsity is not None:
        p = replace(p, sparsity=opts.protect_sparsity)
    return p
