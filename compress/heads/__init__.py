"""Attention-head importance and protection (``compress heads``).

Modules: ``layout`` (where each head sits in a checkpoint; ``head_protect`` → ``Protect``), ``capture`` (forward
hooks that collect per-head outputs, attention maps and their gradients), ``methods`` (pure tensor scorers: vhd,
chd, nhar, seekr, sink; ``score`` runs them over probes), ``select`` (top fraction overall or per layer, random
baselines), ``reinforce`` (VHR head scaling baked into the output projection), ``probes`` (the probe jsonl
format), ``scorefile`` (the scores.safetensors file and its heatmap).
"""

from compress.lazy import lazy_exports

_EXPORTS = {
    "AttentionLayout": "compress.heads.layout",
    "attention_layout": "compress.heads.layout",
    "head_protect": "compress.heads.layout",
}
__all__ = ["AttentionLayout", "attention_layout", "head_protect"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
