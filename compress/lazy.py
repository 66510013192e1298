"""Package exports imported on first use: importing a stage's commands module (`compress --help`, the torch-free
`compress request`) must not import torch through the stage package's ``__init__``."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a module path) when ``name`` is
    first asked for."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
