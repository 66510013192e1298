"""Merging and interpolation: pure per-tensor methods (``methods``), recipes (``recipe``), the executor that walks
checkpoints (``executor``) and interpolation (``interpolate``)."""

from compress.merge.executor import Merger, MergeSummary, run_merge
from compress.merge.methods import METHODS, combine, linear, method_preset, slerp, sparsify_delta, task_vector_merge
from compress.merge.recipe import load_recipe, resolve_setting

__all__ = ["METHODS", "MergeSummary", "Merger", "combine", "linear", "load_recipe", "method_preset",
           "resolve_setting", "run_merge", "slerp", "sparsify_delta", "task_vector_merge"]
