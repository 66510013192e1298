"""Perplexity of a causal LM on a text, with the usual non-overlapping-window protocol.

Protocol (the one GPTQ, SparseGPT and Wanda use for WikiText-2/PTB/C4): tokenize the whole text once (the
tokenizer's own special tokens, so one BOS at the very start for Llama), cut the ids into consecutive windows of
``seqlen`` tokens, drop the incomplete tail, run each window with no context from the previous one, and report
exp(mean next-token NLL over every predicted token). With equal windows this equals GPTQ's
exp(sum of window losses / number of windows). A text shorter than one window is scored as a single window.
"""

from __future__ import annotations

import math
import os

import torch

from compress.data import read_text
from compress.errors import CompressError
from compress.io.models import load_model, load_tokenizer


def _as_text(text_or_path: str | os.PathLike) -> str:
    # A Path is always a file; a short single-line str naming an existing file is treated as one too.
    if isinstance(text_or_path, os.PathLike):
        return read_text(text_or_path)
    if len(text_or_path) < 4096 and "\n" not in text_or_path and os.path.isfile(text_or_path):
        return read_text(text_or_path)
    return text_or_path


def token_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(n_windows, seqlen) consecutive non-overlapping windows; the incomplete tail is dropped."""
    if ids.numel() < 2:
        raise CompressError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    if ids.numel() < seqlen:
        return ids[None, :]
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def text_windows(tokenizer, text_or_path: str | os.PathLike, seqlen: int, max_tokens: int | None,
                 batch_size: int = 1) -> torch.Tensor:
    """The evaluation windows of a text: tokenized once, its first ``max_tokens`` tokens, ``token_windows``."""
    if seqlen < 2 or batch_size < 1:
        raise CompressError(f"seqlen must be >= 2 and batch_size >= 1 (got {seqlen}, {batch_size})")
    # verbose=False: a corpus is longer than model_max_length by design; the windows keep each forward in range
    ids = torch.tensor(tokenizer(_as_text(text_or_path), verbose=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return token_windows(ids, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(Σ next-token NLL over a batch of windows, float64; the number of predicted tokens) from [B, T, V] logits."""
    targets = batch[:, 1:]
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="sum")
    return nll.double().item(), targets.numel()


@torch.no_grad()
def perplexity(model, tokenizer, text_or_path: str | os.PathLike, seqlen: int = 256, max_tokens: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """exp(mean NLL) of ``model`` on a text (or a .txt/.txt.gz file) over non-overlapping ``seqlen`` windows of
    its first ``max_tokens`` tokens (all when None). Deterministic: no sampling, no dropout (eval mode)."""
    return windows_perplexity(model, text_windows(tokenizer, text_or_path, seqlen, max_tokens, batch_size),
                              batch_size, device)


@torch.no_grad()
def windows_perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """``perplexity`` over windows already tokenized (``text_windows``): a caller scoring one text many times
    tokenizes it once."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            s, n = window_nll(model(input_ids=batch, use_cache=False).logits, batch)
            nll, count = nll + s, count + n
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def load_causal_lm(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) from a local Hugging Face folder, the model in eval mode on ``device``."""
    model = load_model(path, device=device, dtype=dtype, kind="causal")
    return model, load_tokenizer(path)
