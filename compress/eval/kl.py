"""KL divergence of a causal LM to a reference model (usually the dense model it was compressed from).

Protocol: the same windows as ``compress.eval.perplexity`` (tokenize the whole text once, consecutive
non-overlapping windows of ``seqlen`` tokens, incomplete tail dropped, each window scored with no context from
the previous one). At every position that perplexity scores (the first ``seqlen - 1`` of each window, the ones
with a next token inside the window) both models give a next-token distribution; the result is the mean over
those positions of

    KL(p_ref ‖ p_model) = Σ_v p_ref(v) · (log p_ref(v) − log p_model(v))      (nats)

computed from float32 log-softmaxes and summed in float64. It is 0 exactly when the two models agree at every
position, and it is what llama.cpp's ``--kl-divergence`` and quantization/pruning papers report as "KL to the
dense model" (those average over all positions of a window or its second half; here the positions match the
perplexity protocol so that the two numbers describe the same predictions).
"""

from __future__ import annotations

import os

import torch

from compress.errors import CompressError
from compress.eval.perplexity import text_windows


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """[B, T−1, V] float32 next-token log-probabilities from a window's [B, T, V] logits."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def next_token_logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    """[B, T−1, V] float32 log-probabilities of each next token of ``batch``."""
    return logprobs(model(input_ids=batch, use_cache=False).logits)


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """[B, T] KL(q ‖ p) per position from log-probabilities (q: the reference)."""
    # kl_div(input=log p_model, target=log p_ref, log_target=True) = Σ p_ref (log p_ref − log p_model)
    return torch.nn.functional.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)


def kl_sum(logp: torch.Tensor, logq: torch.Tensor) -> tuple[float, int]:
    """(Σ KL(q ‖ p) over the positions of a batch, float64; their number); one line when the vocabularies differ."""
    if logp.shape[-1] != logq.shape[-1]:
        raise CompressError(f"model and reference have different vocabulary sizes ({logp.shape[-1]} vs "
                            f"{logq.shape[-1]}); KL needs the same tokenizer")
    kl = token_kl(logp, logq)
    return kl.double().sum().item(), kl.numel()


@torch.no_grad()
def kl_divergence(model, ref_model, tokenizer, text: str | os.PathLike, seqlen: int = 256,
                  max_tokens: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """Mean per-token KL(ref_model ‖ model) in nats over non-overlapping ``seqlen`` windows of the first
    ``max_tokens`` tokens (all when None) of ``text`` (a string or a .txt/.txt.gz file). Both models must share
    ``tokenizer``'s vocabulary; both run in eval mode on ``device`` (their training flags are restored)."""
    windows = text_windows(tokenizer, text, seqlen, max_tokens, batch_size)
    flags = (model.training, ref_model.training)
    model.eval()
    ref_model.eval()
    total, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            s, n = kl_sum(next_token_logprobs(model, batch), next_token_logprobs(ref_model, batch))
            total, count = total + s, count + n
    finally:
        model.train(flags[0])
        ref_model.train(flags[1])
    return total / count
