"""Evaluation of compressed models: perplexity on text (``perplexity``) and classification accuracy with a task
head (``classify``: ``accuracy``, ``evaluate``, ``TaskEvaluator``, imported from ``compress.eval.classify``)."""

from compress.eval.perplexity import load_causal_lm, perplexity  # noqa: F401
