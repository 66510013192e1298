"""Evaluation of compressed models: perplexity on text (``perplexity``)."""

from compress.eval.perplexity import load_causal_lm, perplexity  # noqa: F401
