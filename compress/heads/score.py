"""``score_heads``: run a scorer over tokenized probes (model walking here, maths in ``methods.py``)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from compress.errors import CompressError
from compress.heads import methods as S
from compress.heads.capture import Probe, attention_and_grad, attention_maps, head_outputs_pair, logit_lens
from compress.heads.layout import AttentionLayout, attention_layout
from compress.progress import track

METHODS = ("vhd", "chd", "nhar", "seekr", "sink")


def score_heads(model, probes: Sequence[Probe], method: str, *, layout: Optional[AttentionLayout] = None,
                base_model=None, epsilon: float = 0.3, n_anchors: int = 3,
                anchors: Optional[torch.Tensor] = None, quiet: Optional[bool] = None) -> tuple[torch.Tensor, dict]:
    """([L, H] scores, metadata) of ``method`` on ``probes``. ``base_model``: seekr's model before fine-tuning.
    ``model`` (and ``base_model``) may be a ``heads.blockwise.BlockCapture``: the same scores, block by block."""
    from compress.heads.blockwise import BlockCapture

    if method not in METHODS:
        raise CompressError(f"unknown head score '{method}' (choose {', '.join(METHODS)})")
    if not probes:
        raise CompressError("no probes to score heads on")
    blocks = isinstance(model, BlockCapture)
    layout = layout or (model.layout if blocks else attention_layout(model))
    if not blocks:
        model.eval()
    meta: dict = {"method": method, "n_probes": len(probes)}
    if method in ("vhd", "chd"):
        pairs = model.head_output_pairs(probes) if blocks else [
            head_outputs_pair(model, layout, p) for p in track(probes, f"heads {method}", quiet=quiet)]
        scores = S.head_divergence(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    elif method == "sink":
        per = model.sink_ratios(probes) if blocks else [
            S.sink_ratio(attention_maps(model, p)) for p in track(probes, "heads sink", quiet=quiet)]
        scores = S.mean_over(per)
        meta.update(epsilon=epsilon, sink_rate=S.sink_rate(scores, epsilon))
    elif method == "nhar":
        if any(p.span is None or not bool(p.span.any()) for p in probes):
            raise CompressError("nhar needs probes with a span (image tokens or a context)")
        positions = [torch.nonzero(p.span).reshape(-1) for p in probes]
        if blocks:
            runs = [(last, p.span, lens, pos)
                    for (last, lens), p, pos in zip(model.last_attention_and_lens(probes), probes, positions)]
        else:
            runs = []
            for p, pos in zip(track(probes, "heads nhar", quiet=quiet), positions):
                attn, hidden = attention_maps(model, p, hidden=True)
                runs.append((attn[:, :, -1, :], p.span, logit_lens(model, hidden, pos, layout.n_layers), pos))
        anchor = anchors if anchors is not None else S.anchor_words([r[2] for r in runs], n_anchors)
        anchor = anchor.reshape(layout.n_layers, -1) if anchor.dim() > 1 else anchor.expand(layout.n_layers, -1)
        per = []
        for last, span, lens, pos in runs:
            inert = torch.zeros(layout.n_layers, span.numel(), dtype=torch.bool)
            inert[:, pos] = (lens.unsqueeze(-1) == anchor.unsqueeze(1)).any(-1)
            per.append(S.nhar(last.cpu(), span.cpu(), inert))
        scores = S.mean_over(per)
        meta.update(anchors=anchor.tolist(), inert_share=float(torch.cat(
            [(r[2].unsqueeze(-1) == anchor.unsqueeze(1)).any(-1).float().reshape(-1) for r in runs]).mean()))
    else:  # seekr
        if base_model is None:
            raise CompressError("seekr needs the model before fine-tuning (--base) for its forgettability")
        if blocks:
            sens, forg = model.seekr(probes, base_model)
        else:
            base_model.eval()
            sens, forg = [], []
            for p in track(probes, "heads seekr", quiet=quiet):
                attn, grad = attention_and_grad(model, p)
                sens.append(S.attention_sensitivity(grad))
                forg.append(S.attention_change(attn, attention_maps(base_model, p)))
        s, f = S.mean_over(sens), S.mean_over(forg)
        scores = S.seekr(s, f)
        meta.update(sensitivity=s.tolist(), forgettability=f.tolist())
    if tuple(scores.shape) != (layout.n_layers, layout.n_heads):
        raise CompressError(f"scores came out {list(scores.shape)}, expected [{layout.n_layers}, {layout.n_heads}] "
                            "(does the model's attention match its config?)")
    return S.check_scores(scores), meta
