"""Running a model on probes and collecting what the scorers need (``methods.py`` does the maths).

- Per-head outputs: a forward pre-hook on each layer's output projection (``o_proj``, GPT-2 ``c_proj``, BERT
  ``attention.output.dense``) sees its input [B, T, H·d], the concatenated head outputs; reshaped to [H, d] at
  the predicting position.
- Attention maps: the model is switched to eager attention (``set_attn_implementation("eager")``; SDPA and flash
  kernels never form the [T, T] map) and run with ``output_attentions=True``; SEEKR keeps their gradient
  (``retain_grad``) through one backward pass of the probe's answer loss.
- Logit lens (NHAR): ``output_hidden_states``: layer l's input is ``hidden_states[l]``, decoded by the model's
  final norm and output embedding.

A probe (``Probe``) is already tokenized: ``input_ids`` [T], ``span`` [T] bool (image tokens or the context),
``without_ids`` (the prompt without the span), optional ``pixel_values`` (LLaVA) and ``labels`` [T] (−100 except
the answer tokens, for SEEKR). Probes run one at a time (batch 1), so no padding enters any score.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from compress.errors import CompressError
from compress.heads.layout import AttentionLayout


@dataclass
class Probe:
    input_ids: torch.Tensor
    span: Optional[torch.Tensor] = None
    without_ids: Optional[torch.Tensor] = None
    pixel_values: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None


def _forward(model, ids: torch.Tensor, pixel_values=None, **kw):
    device = next(model.parameters()).device
    args = {"input_ids": ids.reshape(1, -1).to(device)}
    if pixel_values is not None:
        args["pixel_values"] = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
    try:
        return model(**args, **kw)
    except ValueError as e:
        if pixel_values is None or "image" not in str(e).lower():
            raise
        # LLaVA checks that the prompt's image tokens match the vision tower's features; a processor saved with
        # another patch_size / num_additional_image_tokens / feature selection than the model gets here
        raise CompressError(f"{type(model).__name__}: {str(e).splitlines()[0]}; the processor's patch_size, "
                            "num_additional_image_tokens and vision_feature_select_strategy must match the "
                            "model's config") from None


@contextlib.contextmanager
def eager_attention(model):
    """The model with eager attention (attention maps are materialized), restored afterwards."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "eager":
        if not hasattr(model, "set_attn_implementation"):
            raise CompressError(f"{type(model).__name__}: cannot switch to eager attention for attention maps")
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


@contextlib.contextmanager
def head_output_hooks(model, layout: AttentionLayout, store: list):
    """While active, each forward appends [L, H, d] head outputs of the last position of row 0 to ``store``."""
    current: dict[int, torch.Tensor] = {}
    handles = []
    for i, names in enumerate(layout.layers):
        mod = model.get_submodule(names.o)

        def hook(module, args, i=i):
            x = args[0]
            current[i] = x[0, -1].detach().float().reshape(layout.n_heads, layout.head_dim)
            if i == layout.n_layers - 1:
                store.append(torch.stack([current[j] for j in range(layout.n_layers)]).cpu())
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def head_outputs_pair(model, layout: AttentionLayout, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, H, d] with the span, [L, H, d] without it) at the predicting (last) position."""
    if probe.without_ids is None:
        raise CompressError("a divergence score needs each probe with and without its context/image")
    store: list = []
    with head_output_hooks(model, layout, store):
        _forward(model, probe.input_ids, probe.pixel_values)
        _forward(model, probe.without_ids)
    return store[0], store[1]


@torch.no_grad()
def attention_maps(model, probe: Probe, hidden: bool = False):
    """[L, H, T, T] attention of the probe (and the hidden states tuple when ``hidden``)."""
    with eager_attention(model):
        out = _forward(model, probe.input_ids, probe.pixel_values, output_attentions=True,
                       output_hidden_states=hidden)
    attn = _stack_attn(out.attentions)
    return (attn, out.hidden_states) if hidden else attn


def _stack_attn(attentions) -> torch.Tensor:
    if not attentions or attentions[0] is None:
        raise CompressError("the model returned no attention maps (eager attention is needed)")
    return torch.stack([a[0] for a in attentions]).float()


def attention_and_grad(model, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, H, T, T] attention, ∂L/∂attention) for the probe's answer loss (``labels``)."""
    if probe.labels is None:
        raise CompressError("seekr needs probes with an 'answer' (the loss is taken on it)")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with eager_attention(model), torch.enable_grad():
        kw = {"labels": probe.labels.reshape(1, -1).to(device)}
        out = _forward(model, probe.input_ids, probe.pixel_values, output_attentions=True, **kw)
        for a in out.attentions:
            a.retain_grad()
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in out.attentions]
        attn = torch.stack([a[0].detach() for a in out.attentions]).float()
        grad = torch.stack([g[0] for g in grads]).float()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return attn, grad


def _final_norm_and_head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise CompressError(f"{type(model).__name__}: no output embedding for the logit lens (nhar needs an LM head)")
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", inner)
    norm = None
    for cand in (lm, getattr(model, "transformer", None)):
        if cand is not None:
            norm = getattr(cand, "norm", None) or getattr(cand, "ln_f", None)
            if norm is not None:
                break
    return norm, head


@torch.no_grad()
def logit_lens(model, hidden_states, positions: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[L, n] top-1 token of each position's layer-l input (``hidden_states[l]``) through final norm and head."""
    norm, head = _final_norm_and_head(model)
    out = []
    for layer in range(n_layers):
        h = hidden_states[layer][0, positions.to(hidden_states[layer].device)]
        if norm is not None:
            h = norm(h)
        out.append(head(h).argmax(-1).cpu())
    return torch.stack(out)
