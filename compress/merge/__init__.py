"""Merging and interpolation: pure per-tensor methods (``methods``), recipes (``recipe``), the executor that walks
checkpoints (``executor``), mergekit's slices, LoRA references and tokenizers (``slices``, ``tokenizer``) and
interpolation (``interpolate``)."""

from compress.lazy import lazy_exports

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
    "load_recipe": "compress.merge.slices",
    "SlicePlan": "compress.merge.slices",
    "resolve_setting": "compress.merge.recipe",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
