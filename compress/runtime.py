"""Where and in what precision work runs: dtype names to torch dtypes, and devices checked against this machine.

The layer just above ``config`` (whose schemas carry dtype and device names as plain strings). torch is imported
when a function here is called, not when the module is: the client commands (``compress request``) import the CLI
and must not pay torch's import. Progress bars and quiet mode are in ``compress.progress``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

from compress.config import DTYPE_NAMES
from compress.errors import CompressError


def torch_dtype(name: Optional[str]):
    """The ``torch.dtype`` a schema's dtype name stands for (None for None)."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPE_NAMES[name.lower()])


def resolve_device(device: str) -> str:
    """The device string, after checking it exists here (a one-line error otherwise)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CompressError(f"device '{device}' asked for, but CUDA is not available on this machine")
    return device


def compute_dtype(*dtypes):
    """float64 if any input is float64, else float32: exact for differences of half-precision inputs."""
    import torch

    return torch.float64 if torch.float64 in dtypes else torch.float32


@contextmanager
def tf32(enabled: bool):
    """CUDA float32 matmuls in TF32 (``enabled``) or full float32 for the duration. Block forwards of a
    calibration pass run in TF32 (about 8× the float32 rate on Hopper; activations need no more); the SparseGPT
    Hessian sums run in full float32, as the reference code keeps them, since its Cholesky factor amplifies
    rounding. No effect on the CPU."""
    import torch

    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = enabled
    try:
        yield
    finally:
        m.allow_tf32 = old


def free_bytes(device) -> int:
    """Memory free for new tensors on ``device``: free GPU memory, or the RAM the kernel reports available."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
