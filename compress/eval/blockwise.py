"""Perplexity and KL of models too big for the device: run block by block (``compress.io.blocks.BlockRunner``).

Only the embeddings and one decoder block are on the device at a time; every window's hidden states pass from
block to block (on the device, or in pinned host memory when they do not fit); the final norm and the LM head
run at the end, one batch at a time. The windows, positions and formulas are those of ``perplexity`` and
``kl_divergence`` (the same ``window_nll`` and ``token_kl``), so the numbers equal the whole-model ones up to
float summation order.

**When.** ``compress eval`` goes block by block when ``--blockwise`` says so, or, by default, when the weights
(in the evaluation dtype, both models for KL) do not fit (``compress.io.fit.should_stream``).
"""

from __future__ import annotations

import math
import os

import torch

from compress.errors import CompressError


@torch.no_grad()
def final_hidden(runner, windows: torch.Tensor, batch_size: int):
    """Every block run over ``windows`` in batches of ``batch_size``: the ``Activations`` leaving the last block."""
    acts = runner.start(windows.split(batch_size))
    for i, block in runner.blockwise():
        runner.run(i, block, acts)
    return acts


class _Overlay:
    """A checkpoint with some tensors replaced by ``weights`` ({checkpoint name: tensor}, e.g. pruned weights
    held in memory): what a ``BlockRunner`` reads block by block."""

    def __init__(self, ck, weights: dict[str, torch.Tensor]):
        self._ck, self._weights = ck, weights

    def __contains__(self, name: str) -> bool:
        return name in self._ck

    def __getattr__(self, attr: str):
        return getattr(self._ck, attr)

    def get(self, name: str, *, device=None, dtype=None, **kw) -> torch.Tensor:
        t = self._weights.get(name)
        if t is None:
            return self._ck.get(name, device=device, dtype=dtype, **kw)
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def causal_runner(path, device, dtype, weights: dict[str, torch.Tensor] | None = None):
    """A ``BlockRunner`` of a causal LM (one line for a model without an LM head, or that cannot be split), its
    tensors from ``path`` except those ``weights`` replaces."""
    from compress.io.blocks import BlockRunner

    runner = BlockRunner(path, device=device, dtype=dtype)
    if weights:
        runner.ck = _Overlay(runner.ck, weights)
    if runner.model.get_output_embeddings() is None:
        runner.close()
        raise CompressError(f"{path}: model type '{runner.model_type}' has no LM head; perplexity and KL need a "
                            "causal LM")
    return runner


@torch.no_grad()
def blockwise_perplexity(path: str | os.PathLike, tokenizer, text_or_path, seqlen: int = 256,
                         max_tokens: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, weights: dict[str, torch.Tensor] | None = None) -> float:
    """``perplexity`` of the causal LM in folder ``path``, run block by block; ``weights`` ({checkpoint name:
    tensor}) replace the folder's tensors of those names."""
    from compress.eval.perplexity import text_windows, window_nll

    windows = text_windows(tokenizer, text_or_path, seqlen, max_tokens, batch_size)
    nll, count = 0.0, 0
    with causal_runner(path, device, dtype, weights) as runner:
        acts = final_hidden(runner, windows, batch_size)
        for batch, h in zip(windows.split(batch_size), acts.hidden):
            s, n = window_nll(runner.head(h), batch.to(runner.device))
            nll, count = nll + s, count + n
    return math.exp(nll / count)


@torch.no_grad()
def blockwise_kl(path: str | os.PathLike, ref_path: str | os.PathLike, tokenizer, text, seqlen: int = 256,
                 max_tokens: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> float:
    """``kl_divergence`` of the model in ``path`` to the one in ``ref_path``, each run block by block (the
    reference first: its last hidden states wait while the model runs)."""
    from compress.eval.kl import kl_sum, logprobs
    from compress.eval.perplexity import text_windows

    windows = text_windows(tokenizer, text, seqlen, max_tokens, batch_size)
    total, count = 0.0, 0
    with causal_runner(ref_path, device, dtype) as ref, causal_runner(path, device, dtype) as model:
        ref_h = final_hidden(ref, windows, batch_size).hidden
        model_h = final_hidden(model, windows, batch_size).hidden
        for hq, hp in zip(ref_h, model_h):
            s, n = kl_sum(logprobs(model.head(hp)), logprobs(ref.head(hq)))
            total, count = total + s, count + n
    return total / count
