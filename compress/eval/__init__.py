"""Evaluation of compressed models: perplexity on text (``perplexity``), KL divergence to a reference model on
text (``kl_divergence``) and context-recall accuracy / hallucination rate on a jsonl of prompts (``recall_eval``)."""

from compress.eval.kl import kl_divergence  # noqa: F401
from compress.eval.perplexity import load_causal_lm, perplexity  # noqa: F401
from compress.eval.recall import recall_eval  # noqa: F401
