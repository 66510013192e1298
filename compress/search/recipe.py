"""Which runs are NPS, and their ``NpsConfig`` from a command's options over a recipe with ``method: nps``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from compress.errors import CompressError

SEARCH_FIELDS = ("partition", "parts", "edges", "span", "grouping", "topk", "values", "rescale", "select",
                 "task_weights", "combine", "optimizer", "budget", "popsize", "sigma0", "objective", "dev_limit",
                 "batch_size", "seed", "anchor", "regularize")


def recipe_method(recipe: Path) -> Optional[str]:
    """The ``method`` key of a YAML recipe (an unreadable recipe is the loader's one-line error)."""
    from compress.io.files import read_mapping

    return read_mapping(recipe).get("method")


def wants_nps(method: Optional[str], recipe: Optional[Path], *, recipe_decides: bool = True) -> bool:
    """``--method nps``, or (where the recipe may choose the method) a recipe that says ``method: nps``."""
    return method == "nps" or (recipe_decides and recipe is not None and recipe_method(recipe) == "nps")


def nps_config(mode: str, recipe: Optional[Path], options: dict):
    """An ``NpsConfig``: the options given (None: not given) over the recipe's fields; search fields go under
    ``search``."""
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
