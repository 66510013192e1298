"""A pruning strategy: one sparsity per transformer block (the granularity of OWL's allocation and of the
strategy predictor that consumes it).

Its mean weighted by each block's prunable parameters is the model's sparsity over pruned parameters; every
layer of block l is pruned to s_l. Layers selected outside the blocks (``--targets`` reaching e.g. lm_head) are
pruned to that mean. Sources: uniform, ``--layer-sparsity 0.3,0.5,…``, a JSON file
(``{"layer_sparsity": [...]}`` or a bare list), or OWL (``compress.prune.owl``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from compress.errors import CompressError

TOL = 1e-6


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    return float(sum(v * w for v, w in zip(values, weights)) / sum(weights))


@dataclass(frozen=True)
class Strategy:
    layer_sparsity: tuple[float, ...]
    source: str = "uniform"
    info: dict = field(default_factory=dict, compare=False)

    def mean(self, block_params: Sequence[int]) -> float:
        return weighted_mean(self.layer_sparsity, block_params)

    @classmethod
    def uniform(cls, sparsity: float, n_blocks: int) -> "Strategy":
        return cls(tuple([float(sparsity)] * n_blocks), "uniform")

    def to_dict(self) -> dict:
        return {"layer_sparsity": list(self.layer_sparsity), "source": self.source, **self.info}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        from compress.io.files import read_json

        data = read_json(path, "strategy")
        values = data.get("layer_sparsity") if isinstance(data, dict) else data
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise CompressError(f"strategy file '{path}' must hold a list of numbers or "
                                '{"layer_sparsity": [numbers]}')
        info = ({k: v for k, v in data.items() if k not in ("layer_sparsity", "source")}
                if isinstance(data, dict) else {})
        return cls(tuple(float(v) for v in values), f"file {path}", info)


def validate(strategy: Strategy, block_params: Sequence[int], target: float | None = None) -> Strategy:
    """Length = number of blocks, every value in [0, 1), and (when a target is given) the parameter-weighted
    mean equal to it within 1e-6; a one-line error otherwise."""
    n = len(block_params)
    s = strategy.layer_sparsity
    if len(s) != n:
        raise CompressError(f"strategy ({strategy.source}) has {len(s)} values but the model has {n} blocks; "
                            f"give one sparsity per block")
    bad = [(i, v) for i, v in enumerate(s) if not 0.0 <= v < 1.0]
    if bad:
        i, v = bad[0]
        raise CompressError(f"strategy ({strategy.source}): block {i} sparsity {v} is outside [0, 1)")
    if target is not None:
        mean = weighted_mean(s, block_params)
        if abs(mean - target) > TOL:
            raise CompressError(f"strategy ({strategy.source}): mean sparsity over pruned parameters is "
                                f"{mean:.6f}, not the requested {target}; rescale it or drop --sparsity")
    return strategy


def recenter(values: Sequence[float], weights: Sequence[int], target: float, lo: float, hi: float) -> list[float]:
    """clip(v + c, lo, hi) with the offset c chosen so that the weighted mean is ``target`` (bisection; the
    mean is monotone in c)."""
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")

    def at(c: float) -> list[float]:
        return [min(max(v + c, lo), hi) for v in values]

    a, b = lo - max(values), hi - min(values)
    for _ in range(200):
        c = (a + b) / 2
        if weighted_mean(at(c), weights) < target:
            a = c
        else:
            b = c
    return at((a + b) / 2)


def random_strategies(k: int, target: float, block_params: Sequence[int], spread: float = 0.1,
                      seed: int = 0) -> list[Strategy]:
    """``k`` random per-block vectors with parameter-weighted mean exactly ``target`` (deviations drawn in
    [−spread, spread], centred, clipped to [0, 0.99] and re-centred by bisection)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        dev = (torch.rand(len(block_params), generator=g, dtype=torch.float64) * 2 - 1) * spread
        vals = recenter([target + float(d) for d in dev], block_params, target, 0.0, 0.99)
        out.append(Strategy(tuple(vals), f"random #{i}"))
    return out
