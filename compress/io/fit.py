"""Whether a model is run whole or block by block (``compress.io.blocks``) on a device.

The rule every pass that runs a model uses when not told (``compress eval``, the UniCuCo evaluator, head scores):
block by block when the weights (in the dtype they run in) take more than ``STREAM_SHARE`` of the device's free
memory (free GPU memory; the RAM the kernel reports available on the CPU). The rest is left to the activations,
a batch's logits and the allocator's slack, which a whole-model forward needs beside its weights.
"""

from __future__ import annotations

import os

import torch

# weights above this share of the free device memory are run block by block (see the module docstring)
STREAM_SHARE = 0.5


def weight_bytes(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the floating-point weights of a checkpoint take in ``dtype`` (headers only: nothing is read)."""
    from compress.io.reader import open_checkpoint

    with open_checkpoint(path) as ck:
        infos = [ck.info(n) for n in ck.names()]
    return sum(t.numel * dtype.itemsize if t.is_float else t.nbytes for t in infos)


def should_stream(nbytes: int, device: str | torch.device) -> bool:
    """Whether weights of ``nbytes`` are better run block by block on ``device`` (``STREAM_SHARE``)."""
    from compress.runtime import free_bytes

    return nbytes > STREAM_SHARE * free_bytes(device)
