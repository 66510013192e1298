"""Evaluation of compressed models: perplexity on text (``perplexity``), KL divergence to a reference model on
text (``kl_divergence``), context-recall accuracy / hallucination rate on a jsonl of prompts (``recall_eval``) and
classification accuracy with a task head (``compress.eval.classify``: ``accuracy``, ``evaluate``,
``TaskEvaluator``)."""

import importlib
import sys
import types

_EXPORTS = {
    "kl_divergence": "compress.eval.kl",
    "load_causal_lm": "compress.eval.perplexity",
    "perplexity": "compress.eval.perplexity",
    "recall_eval": "compress.eval.recall",
}
__all__ = ["kl_divergence", "load_causal_lm", "perplexity", "recall_eval"]


class _Package(types.ModuleType):
    # imported on first use, so that importing `compress.eval.commands` (`compress --help`, the torch-free
    # `compress request`) does not import torch. Looked up on every access, not through a module __getattr__:
    # importing the submodule `perplexity` binds that name to the module, over the function of the same name.
    def __getattribute__(self, name):
        if name in _EXPORTS:
            return getattr(importlib.import_module(_EXPORTS[name]), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
