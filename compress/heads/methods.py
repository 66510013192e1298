"""Head-importance scores as small pure functions on captured tensors (``capture.py`` walks the model).

Shapes: L layers, H query heads, d head size, T tokens, N probes. Every score is [L, H], higher = more important
to keep.

- ``head_divergence`` (**vhd**, **chd**): VHR's Vision-aware Head Divergence (He et al. 2025, "Cracking the Code of
  Hallucination in LVLMs with Vision-aware Head Divergence", Eq. 3): VHD_{l,h} = ‖A_{l,h}(x, image) −
  A_{l,h}(x)‖₂, the L2 distance between the head's output (its slice of the output projection's input) at the
  predicting position with and without the image, averaged over probes. **chd** is the same formula with a text
  context span in place of the image (with and without the context).
- ``above_layer_median``: VHR's vision-aware heads, those whose divergence exceeds their layer's median.
- ``sink_ratio`` (**sink**): the attention-sink score of Gu et al. 2025 ("When Attention Sink Emerges in Language
  Models", §3): α^{l,h} = (1/T) Σ_t A^{l,h}_{t,0}, the mean attention the queries put on the first token; a
  head is a sink head when α > ε (ε = 0.3 in the paper; ``sink_rate`` is the paper's model-level share of such
  heads).
- ``nhar`` (**nhar**): HAVAE's Non-Hijacked Attention Ratio: the share of the predicting position's attention
  that lands on span tokens (visual tokens for LLaVA, the context for text) which are not *inert*; a token is
  inert at layer l when the logit lens (final norm + LM head on its layer-l input) decodes it to one of the
  layer's anchor words, the few tokens that visual tokens' decodings collapse onto (``anchor_words``: the most
  frequent decodings over all probes, unless given).
- ``seekr`` (**seekr**): SEEKR (He et al. 2024, "SEEKR: Selective Attention-Guided Knowledge Retention for
  Continual Learning of LLMs", §3.2) ranks heads by task sensitivity × forgettability: sensitivity = the mean
  over probes of Σ_{t,s} (∂L/∂A^{l,h}_{t,s})² (a first-order Taylor/Fisher estimate of how much the loss
  depends on the head's attention), forgettability = the mean over probes of ‖A^{l,h}_{ft} − A^{l,h}_{base}‖_F,
  how far fine-tuning moved the head's attention map. Each factor is divided by its maximum over heads before
  the product (the scale of either must not decide the ranking).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compress.errors import CompressError


def head_divergence(with_span: torch.Tensor, without_span: torch.Tensor) -> torch.Tensor:
    """[N, L, H, d] head outputs at the predicting position with and without the image/context → [L, H]: the
    mean over probes of their L2 distance (VHD; chd for text)."""
    if with_span.shape != without_span.shape or with_span.dim() != 4:
        raise CompressError(f"head outputs must both be [probes, layers, heads, head_dim], got "
                            f"{list(with_span.shape)} and {list(without_span.shape)}")
    return torch.linalg.vector_norm(with_span.double() - without_span.double(), dim=-1).mean(0).float()


def above_layer_median(scores: torch.Tensor) -> torch.Tensor:
    """[L, H] bool: heads scoring above their layer's median (VHR's vision-aware heads)."""
    return scores > scores.median(dim=1, keepdim=True).values


def sink_ratio(attn: torch.Tensor) -> torch.Tensor:
    """[L, H, T, T] attention (rows: queries, summing to 1) → [L, H]: mean attention on the first token."""
    if attn.dim() != 4:
        raise CompressError(f"attention must be [layers, heads, T, T], got {list(attn.shape)}")
    return attn[..., :, 0].double().mean(-1).float()


def sink_rate(scores: torch.Tensor, epsilon: float = 0.3) -> float:
    """Share of heads whose first-token attention exceeds ε (Gu et al.'s Sink^ε metric)."""
    return float((scores > epsilon).double().mean())


def anchor_words(lens_ids: Sequence[torch.Tensor], n_anchors: int = 3) -> torch.Tensor:
    """[L, n_anchors] token ids: per layer, the most frequent logit-lens decodings of span tokens over all
    probes (``lens_ids``: one [L, n_span] tensor per probe). Ties go to the lower token id."""
    ids = torch.cat([t.reshape(t.shape[0], -1) for t in lens_ids], dim=1)
    out = []
    for row in ids:
        vals, counts = torch.unique(row, return_counts=True)  # sorted by id: a stable sort keeps lower ids first
        order = torch.sort(-counts, stable=True).indices[:n_anchors]
        pick = vals[order]
        if pick.numel() < n_anchors:
            pick = torch.cat([pick, pick[-1:].repeat(n_anchors - pick.numel())])
        out.append(pick)
    return torch.stack(out)


def nhar(attn_last: torch.Tensor, span: torch.Tensor, inert: torch.Tensor) -> torch.Tensor:
    """HAVAE's Non-Hijacked Attention Ratio of one probe: ``attn_last`` [L, H, T] the predicting position's
    attention, ``span`` [T] bool the visual (or context) tokens, ``inert`` [L, T] bool the inert tokens per layer
    → [L, H] the attention share on span tokens that are not inert."""
    live = (span.reshape(1, -1) & ~inert).to(attn_last.dtype)  # [L, T]
    return (attn_last * live[:, None, :]).sum(-1)


def attention_change(attn_ft: torch.Tensor, attn_base: torch.Tensor) -> torch.Tensor:
    """[L, H, T, T] twice → [L, H]: ‖A_ft − A_base‖_F per head (SEEKR's forgettability of one probe)."""
    return torch.linalg.vector_norm((attn_ft.double() - attn_base.double()).flatten(2), dim=-1).float()


def attention_sensitivity(grad: torch.Tensor) -> torch.Tensor:
    """[L, H, T, T] ∂L/∂A → [L, H]: Σ (∂L/∂A)² per head (SEEKR's task sensitivity of one probe)."""
    return grad.double().pow(2).flatten(2).sum(-1).float()


def seekr(sensitivity: torch.Tensor, forgettability: torch.Tensor) -> torch.Tensor:
    """[L, H] mean sensitivity and mean forgettability → [L, H]: their product, each divided by its maximum."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        m = x.max()
        return x / m if m > 0 else x
    return unit(sensitivity.double()).mul(unit(forgettability.double())).float()


def kv_mean(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    L, H = scores.shape
    return scores.reshape(L, n_kv, H // n_kv).mean(-1)


def mean_over(per_probe: Sequence[torch.Tensor]) -> torch.Tensor:
    if not per_probe:
        raise CompressError("no probes to score heads on")
    return torch.stack([p.double() for p in per_probe]).mean(0).float()


def check_scores(scores: torch.Tensor, where: Optional[str] = None) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise CompressError(f"{where or 'head scores'}: NaN or Inf in the scores (check the probes and model)")
    return scores
