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


# float16's largest finite value is 65504: attention inputs below this bound keep clear of it, their products
# and sums being taken in float32 inside the kernels
HALF_ATTENTION_BOUND = 2.0**14


def _half_attention_mode(devices: tuple[str, ...]):
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class HalfAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention or len(args) < 3:
                return func(*args, **kwargs)
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if not (q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type in devices):
                return func(*args, **kwargs)
            peak = torch.stack([t.detach().abs().amax() for t in (q, k, v)]).max()
            if not bool(peak < HALF_ATTENTION_BOUND):  # NaN too: the float32 kernel says what it says
                return func(*args, **kwargs)
            half = [t.half() for t in (q, k, v)]
            if isinstance(mask, torch.Tensor) and mask.is_floating_point():
                # float32 masks use finfo(float32).min for "masked": float16's own lowest keeps exp() at 0. A row
                # with every key masked (padding) comes out uniform in float32 only: it keeps that kernel
                low = torch.finfo(torch.float16).min
                if not bool((mask > low).any(-1).all()):
                    return func(*args, **kwargs)
                mask = mask.clamp(min=low).half()
            if len(args) > 3:
                return func(*half, mask, *args[4:], **kwargs).to(q.dtype)
            if "attn_mask" in kwargs:
                kwargs = {**kwargs, "attn_mask": mask}
            return func(*half, **kwargs).to(q.dtype)

    return HalfAttention()


@contextmanager
def half_attention(devices: tuple[str, ...] = ("cuda",)):
    """Scaled dot-product attention on float32 inputs computed in float16 on ``devices`` for the duration: the
    flash kernel takes half precision only, and in float32 attention took 10.1 of the 25.9 s of a 1B Llama's
    calibration forwards on an H200. float16 keeps 10 mantissa bits, as the TF32 matmuls around it do, and the
    SparseGPT and Wanda reference code run the whole model in float16. Inputs whose magnitude reaches
    ``HALF_ATTENTION_BOUND`` or that hold NaN, and float masks with a fully masked row, keep the float32 kernel."""
    with _half_attention_mode(tuple(devices)):
        yield


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
