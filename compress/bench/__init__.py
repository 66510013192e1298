"""Benchmarks that print what they measure and save it as JSON and markdown (``compress bench ...``)."""

import json
from pathlib import Path
from typing import Callable, Optional


def save_results(results: Path, stem: str, report: dict, md: str,
                 plot: Optional[Callable[[dict, Path], Optional[Path]]] = None) -> list[Path]:
    """RESULTS/STEM.json, .md and (when ``plot`` draws one) .png; the paths written."""
    results.mkdir(parents=True, exist_ok=True)
    paths = [results / f"{stem}.json", results / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(md)
    png = plot(report, results / f"{stem}.png") if plot else None
    return paths + ([png] if png else [])


def publish(results: Path, stem: str, report: dict, md: str, plot=None, label: str = "bench") -> list[Path]:
    """Print the markdown table, save it with the JSON (and plot), and say where they went."""
    from compress.progress import console

    paths = save_results(results, stem, report, md, plot)
    print(md)
    console.print(f"[{label}] wrote {', '.join(str(p) for p in paths)}")
    return paths


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), or None with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from compress.progress import console

        console.print("[yellow]matplotlib is not installed; no plot (pip install 'compress[bench]')")
        return None
    return plt
