"""Command-line glue for NPS: `compress prune|merge|interpolate --method nps` build an ``NpsConfig`` from their
options (or a recipe with ``method: nps``) and run ``compress.search.nps.run_nps``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compress.errors import CompressError

SEARCH_FIELDS = ("partition", "parts", "edges", "span", "grouping", "topk", "values", "rescale", "select", "task_weights", "combine",
                 "optimizer", "budget", "popsize", "sigma0", "objective", "dev_limit", "batch_size", "seed")


def _config(mode: str, recipe: Optional[Path], options: dict):
    from compress.config import NpsConfig, build

    search = {k: options.pop(k) for k in SEARCH_FIELDS if options.get(k) is not None}
    for k in SEARCH_FIELDS:
        options.pop(k, None)
    given = {k: v for k, v in options.items() if v is not None and v != []}
    if recipe is not None:
        base = _read(recipe)
        base.pop("method", None)
        merged = {**base, **given, "mode": mode}
        merged["search"] = {**base.get("search", {}), **search}
        return build(NpsConfig, **merged)
    return build(NpsConfig, mode=mode, search=search, **given)


def _read(recipe: Path) -> dict:
    from compress.io.files import read_mapping

    raw = read_mapping(recipe)
    if raw.get("method", "nps") != "nps":
        raise CompressError(f"{recipe}: method '{raw['method']}' is not nps")
    return raw


def _report(summary: dict) -> None:
    from compress.progress import console

    dev = summary.get("dev", {})
    acc = dev.get("acc", dev.get("mean_acc"))
    console.print(f"nps {summary['mode']}: density {summary['density']:g}, {summary['evaluations']} evaluations in "
                  f"{summary['seconds']:.1f} s, objective {summary['start_value']:.5f} → {summary['value']:.5f}"
                  + (f", dev accuracy {acc:.4f}" if acc is not None else "")
                  + (f"; wrote {summary['out']}" if summary.get("out") else ""), highlight=False)


def nps_prune_command(*, base=None, finetuned=None, density=None, task=None, out=None, device=None, recipe=None,
                      head=None, protect=None, overwrite=False, quiet=False, log=None, **search) -> dict:
    """`compress prune --method nps`: OUT ending in .safetensors is a compact delta file, else a model folder."""
    from compress.search.nps import run_nps

    cfg = _config("prune", recipe, dict(base=base, models=[finetuned] if finetuned else None, tasks=[task] if task
                                        else None, heads=[head] if head else None, density=density, out=out,
                                        device=device, protect=protect, overwrite=overwrite or None,
                                        quiet=quiet or None, log=log, **search))
    summary = run_nps(cfg)
    _report(summary)
    return summary


def nps_merge_command(*, base=None, models=None, tasks=None, density=None, out=None, device=None, recipe=None,
                      heads=None, protect=None, overwrite=False, quiet=False, log=None, **search) -> dict:
    """`compress merge --method nps`: θ_base + Σ_i λ_i m_i ⊙ r_i, λ_i and the part weights searched on the mean
    dev objective of the tasks (one per model)."""
    from compress.search.nps import run_nps

    cfg = _config("merge", recipe, dict(base=base, models=models, tasks=tasks, heads=heads, density=density,
                                        out=out, device=device, protect=protect, overwrite=overwrite or None,
                                        quiet=quiet or None, log=log, **search))
    summary = run_nps(cfg)
    _report(summary)
    return summary


def nps_interpolate_command(*, base=None, finetuned=None, task=None, density=None, out=None, device=None,
                            recipe=None, head=None, keep=None, keep_heads=None, protect=None, overwrite=False,
                            quiet=False, log=None, **search) -> dict:
    """`compress interpolate --method nps`: θ_base + λ·m ⊙ r, λ and the part weights searched on the task's dev
    objective, averaged with the ``keep`` tasks' (what the base already does and should not forget)."""
    from compress.search.nps import run_nps

    cfg = _config("interpolate", recipe, dict(base=base, models=[finetuned] if finetuned else None,
                                              tasks=[task] if task else None, heads=[head] if head else None,
                                              keep=keep, keep_heads=keep_heads, density=density, out=out,
                                              device=device, protect=protect, overwrite=overwrite or None,
                                              quiet=quiet or None, log=log, **search))
    summary = run_nps(cfg)
    _report(summary)
    return summary
