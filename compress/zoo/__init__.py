"""The benchmark zoo: models the benchmarks build themselves from real assets (no hub is reachable).

Each zoo model is a recipe in ``recipes/zoo/<recipe>.yml`` and a builder module. ``build(name, ...)`` dispatches
on the name, importing the builder lazily (a builder may pull in heavy dependencies, and one may not be in every
checkout). A builder module exposes::

    build(out_dir: Path, *, recipe: Path, device: str, quick: bool, overwrite: bool, quiet: bool,
          only: list[str] | None = None) -> dict

writes ``out_dir`` atomically (``compress.io.writer.atomic_dir``: never a half-written model folder), and returns
a JSON-able summary; the summary's ``table`` (markdown), when present, is what ``compress zoo build`` prints.
``only`` selects a subset of the recipe's parts (tasks, domains); a builder without parts rejects it.
A builder may also expose ``carry(out, overwrite) -> dict``: prepare under ``out`` (git-ignored ``.carry``) what a
bare GPU machine needs to build it, within the device tool's 64 MiB-a-call limit
(``python3 -m compress.bench.carry NAME``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from compress.errors import CompressError

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class ZooEntry:
    name: str
    module: str
    recipe: str
    description: str


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("minilm-8task", "compress.zoo.minilm", "minilm-8task.yml",
             "all-MiniLM-L6-v2 fully fine-tuned on 8 classification tasks, one head each (merging benchmark)"),
    ZooEntry("stories260k", "compress.zoo.stories260k", "stories260k.yml",
             "the real pretrained llama2.c stories260K as a Hugging Face Llama (tests, demos)"),
    ZooEntry("lm-zoo", "compress.zoo.lm", "lm-zoo.yml",
             "a small Llama pretrained on the bundled corpora, fine-tuned per domain (pruning benchmarks)"),
)}


def recipes_dir() -> Path:
    """``recipes/zoo`` of this checkout (beside the package), else of the working directory."""
    for folder in (_REPO_ROOT / "recipes" / "zoo", Path.cwd() / "recipes" / "zoo"):
        if folder.is_dir():
            return folder
    return _REPO_ROOT / "recipes" / "zoo"


def entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise CompressError(f"unknown zoo model '{name}' (choose one of {', '.join(ZOO)})")
    return ZOO[name]


def default_recipe(name: str) -> Path:
    return recipes_dir() / entry(name).recipe


def builder(name: str):
    """The builder module of a zoo model, imported now."""
    e = entry(name)
    try:
        return importlib.import_module(e.module)
    except ModuleNotFoundError as err:
        if err.name == e.module:
            raise CompressError(f"zoo model '{name}': its builder {e.module} is not in this checkout") from None
        raise


def build(name: str, device: str = "cpu", quick: bool = False, out_root: str | Path = "checkpoints/zoo", *,
          recipe: str | Path | None = None, overwrite: bool = False, quiet: bool = False,
          only: Optional[list[str]] = None) -> dict:
    """Build zoo model ``name`` into ``out_root/name`` from its recipe (default ``recipes/zoo/<recipe>.yml``);
    ``quick`` uses the recipe's ``quick:`` section. Returns the builder's summary (also in ``build.json``)."""
    module = builder(name)
    kwargs = dict(recipe=Path(recipe) if recipe is not None else default_recipe(name), device=device, quick=quick,
                  overwrite=overwrite, quiet=quiet)
    if only:
        kwargs["only"] = list(only)
    return module.build(Path(out_root) / name, **kwargs)


def carry(name: str, out: str | Path = ".carry", overwrite: bool = False) -> dict:
    """Prepare under ``out`` what a bare GPU machine needs to build ``name`` (the builder's ``carry``)."""
    module = builder(name)
    if not hasattr(module, "carry"):
        raise CompressError(f"zoo model '{name}' needs nothing prepared: carry the data folder (COMPRESS_DATA)")
    return module.carry(Path(out), overwrite=overwrite)
