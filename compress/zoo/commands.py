"""`compress zoo build|list`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from compress.config import ZooBuildConfig, build
from compress.options import DEVICE, OVERWRITE, QUIET, ZOO_ROOT_DIR, out
from compress.runtime import resolve_device

zoo_app = typer.Typer(no_args_is_help=True, help="The benchmark zoo: real models built by recipe (recipes/zoo).")


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="Zoo model to build (see `compress zoo list`)."),
    out_root: Path = typer.Option(ZOO_ROOT_DIR, help="The model goes to OUT_ROOT/NAME."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe YAML (default: recipes/zoo/<recipe of NAME>.yml)."),
    quick: bool = typer.Option(False, help="Merge the recipe's quick: section over it: a small CPU build."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated subset of the recipe's parts "
                                                   "(minilm-8task: tasks, e.g. sst2,trec)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Build a zoo model from its recipe, atomically, with build.json (accuracy or checks, seconds, device)."""
    from compress import zoo

    only = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    cfg = build(ZooBuildConfig, name=name, out_root=out_root, recipe=recipe, quick=quick, only=only,
                device=device, overwrite=overwrite, quiet=quiet)
    zoo.entry(cfg.name)
    from compress.io.writer import check_output

    check_output(cfg.out_root / cfg.name, cfg.overwrite, [cfg.recipe])
    summary = zoo.build(cfg.name, device=resolve_device(cfg.device), quick=cfg.quick, out_root=cfg.out_root,
                        recipe=cfg.recipe, overwrite=cfg.overwrite, quiet=cfg.quiet, only=cfg.only)
    if summary.get("table"):
        print(summary["table"])
    seconds = f" in {summary['seconds']} s" if "seconds" in summary else ""
    out.print(f"wrote {cfg.out_root / cfg.name}{seconds}")


@zoo_app.command("list")
def zoo_list(
    out_root: Path = typer.Option(ZOO_ROOT_DIR, help="Where built models are looked for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Zoo models: what each is, its recipe, and whether it is built under OUT_ROOT."""
    from compress import zoo

    rows = []
    for e in zoo.ZOO.values():
        folder = out_root / e.name
        built = None
        if (folder / "build.json").is_file():
            try:
                built = "quick" if json.loads((folder / "build.json").read_text()).get("quick") else "full"
            except (OSError, ValueError):
                built = "unreadable build.json"
        rows.append({"name": e.name, "description": e.description, "recipe": str(zoo.recipes_dir() / e.recipe),
                     "recipe_exists": (zoo.recipes_dir() / e.recipe).is_file(), "path": str(folder), "built": built})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"zoo (built under {out_root})")
    for col in ("name", "what", "recipe", "built"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["description"], Path(r["recipe"]).name + ("" if r["recipe_exists"] else " (missing)"),
                  r["built"] or "no")
    out.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
