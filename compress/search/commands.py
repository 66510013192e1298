"""The NPS side of `compress prune|merge|interpolate --method nps`: a config from the command's options (or a
recipe with ``method: nps``), ``compress.search.nps.run_nps``, and one summary line."""

from __future__ import annotations

from compress.search.recipe import nps_config


def _report(summary: dict) -> None:
    from compress.progress import console

    dev = summary.get("dev", {})
    acc = dev.get("acc", dev.get("mean_acc"))
    console.print(f"nps {summary['mode']}: density {summary['density']:g}, {summary['evaluations']} evaluations in "
                  f"{summary['seconds']:.1f} s, objective {summary['start_value']:.5f} → {summary['value']:.5f}"
                  + (f", dev accuracy {acc:.4f}" if acc is not None else "")
                  + (_protocol_line(summary["protocol"]) if "protocol" in summary else "")
                  + (f"; wrote {summary['out']}" if summary.get("out") else ""), highlight=False)


def _protocol_line(p: dict) -> str:
    v = p["validation"]
    return (f"; kept {'NPS' if p['chosen'] == 'nps' else 'TIES at λ ' + format(p['ties_lambda_dev'], 'g')} "
            f"(validation half: TIES {v['ties']:.4f}, NPS {v['nps']:.4f} at budget {p['budget']})")


def nps_prune_command(*, base=None, finetuned=None, density=None, task=None, out=None, device=None, recipe=None,
                      head=None, protect=None, overwrite=False, quiet=False, log=None, **search) -> dict:
    """`compress prune --method nps`: OUT ending in .safetensors is a compact delta file, else a model folder."""
    from compress.search.nps import run_nps

    cfg = nps_config("prune", recipe, dict(base=base, models=[finetuned] if finetuned else None, tasks=[task] if task
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

    cfg = nps_config("merge", recipe, dict(base=base, models=models, tasks=tasks, heads=heads, density=density,
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

    cfg = nps_config("interpolate", recipe, dict(base=base, models=[finetuned] if finetuned else None,
                                                  tasks=[task] if task else None, heads=[head] if head else None,
                                                  keep=keep, keep_heads=keep_heads, density=density, out=out,
                                                  device=device, protect=protect, overwrite=overwrite or None,
                                                  quiet=quiet or None, log=log, **search))
    summary = run_nps(cfg)
    _report(summary)
    return summary
