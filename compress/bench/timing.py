"""Speed comparisons that survive a noisy machine: the two sides alternate A B A B, and the answer is the median
of the per-pair ratios with their min and max (a load spike hits one pair, not every run of one side)."""

from __future__ import annotations

import statistics
from typing import Any, Callable


def _seconds(result: Any) -> float:
    return float(result["seconds"] if isinstance(result, dict) else result)


def ratio_summary(ratios: list[float]) -> dict:
    """median / min / max of per-pair ratios (None for an empty list)."""
    if not ratios:
        return {"median": None, "min": None, "max": None, "pairs": 0}
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": len(ratios)}


def paired(run_a: Callable[[], Any], run_b: Callable[[], Any], pairs: int = 3) -> dict:
    """Run A then B ``pairs`` times. Each run returns seconds, or a dict with "seconds" (kept in "a" / "b").

    Returns per-pair seconds ``[[a, b], ...]`` and the median, min and max of the ratios a ÷ b."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    a_runs, b_runs = [], []
    for _ in range(pairs):
        a_runs.append(run_a())
        b_runs.append(run_b())
    seconds = [[_seconds(a), _seconds(b)] for a, b in zip(a_runs, b_runs)]
    return {"seconds": seconds, "a": a_runs, "b": b_runs, "ratio": ratio_summary([a / b for a, b in seconds])}
