"""Evaluation of compressed models: perplexity on text (``perplexity``), KL divergence to a reference model on
text (``kl_divergence``), context-recall accuracy / hallucination rate on a jsonl of prompts (``recall_eval``) and
classification accuracy with a task head (``compress.eval.classify``: ``accuracy``, ``evaluate``,
``TaskEvaluator``)."""

from compress.eval.kl import kl_divergence  # noqa: F401
from compress.eval.perplexity import load_causal_lm, perplexity  # noqa: F401
from compress.eval.recall import recall_eval  # noqa: F401
