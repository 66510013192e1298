"""Merging and interpolation: pure per-tensor methods (``methods``), recipes (``recipe``), the executor that walks
checkpoints (``executor``) and interpolation (``interpolate``)."""

_EXPORTS = {
    "Merger": "compress.merge.executor",
    "MergeSummary": "compress.merge.executor",
    "run_merge": "compress.merge.executor",
    "METHODS": "compress.merge.methods",
    "combine": "compress.merge.methods",
    "linear": "compress.merge.methods",
    "method_preset": "compress.merge.methods",
    "slerp": "compress.merge.methods",
    "sparsify_delta": "compress.merge.methods",
    "task_vector_merge": "compress.merge.methods",
    "load_recipe": "compress.merge.recipe",
    "resolve_setting": "compress.merge.recipe",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # imported on first use, so that importing the stage's commands module (`compress --help`, the torch-free
    # `compress request`) does not import torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
