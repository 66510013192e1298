"""Speed comparisons that survive a noisy machine: the contenders run in turn (A B A B ...), and what is reported
is the median of the per-round ratios, with their min and max.

On a shared machine the load drifts over minutes; two runs back to back see about the same load, so the ratio of
one round is steadier than either time, and the median of a few rounds drops the round that an outside burst hit.
"""

from __future__ import annotations

import statistics
from typing import Callable, Mapping

MIN_ROUNDS = 3


def alternate(runs: Mapping[str, Callable[[int], dict]], rounds: int = MIN_ROUNDS,
              before: Callable[[str, int], None] | None = None) -> dict[str, list[dict]]:
    """Call every ``runs[key](round)`` in turn, ``rounds`` times (A B A B ...); each returns a dict holding at
    least ``seconds``. ``before(key, round)`` runs ahead of each call, untimed (e.g. removing the last output).
    Returns {key: [result of each round]}."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    out: dict[str, list[dict]] = {k: [] for k in runs}
    for i in range(rounds):
        for key, run in runs.items():
            if before is not None:
                before(key, i)
            out[key].append(run(i))
    return out


def spread(values: list[float]) -> dict:
    """Median, min and max of ``values`` (and the values, in order)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def ratios(num: list[dict], den: list[dict], key: str = "seconds") -> dict:
    """Round by round ``num[i][key] / den[i][key]``, summarised by ``spread``."""
    if len(num) != len(den) or not num:
        raise ValueError(f"ratios need rounds paired one to one (got {len(num)} and {len(den)})")
    return {**spread([a[key] / b[key] for a, b in zip(num, den)]), "rounds": len(num)}


def summary(results: list[dict]) -> dict:
    """One contender over its rounds: seconds (median, min, max) and the highest peak RSS where measured."""
    out = {"seconds": spread([r["seconds"] for r in results])}
    rss = [r["peak_rss_bytes"] for r in results if r.get("peak_rss_bytes") is not None]
    if rss:
        out["peak_rss_bytes"] = max(rss)
    return out


def describe(r: dict, digits: int = 3) -> str:
    """``0.231 (0.220–0.250, 3 rounds)`` for a ``ratios`` result."""
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}–{r['max']:.{digits}f}, {r['rounds']} rounds)"
