"""Where and in what precision work runs: dtype names to torch dtypes, and devices checked against this machine.

The layer just above ``config`` (whose schemas carry dtype and device names as plain strings, so that the schemas
import no torch); progress bars and quiet mode are in ``compress.progress``.
"""

from __future__ import annotations

from typing import Optional

import torch

from compress.config import DTYPE_NAMES
from compress.errors import CompressError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else DTYPES[name.lower()]


def resolve_device(device: str) -> str:
    """The device string, after checking it exists here (a one-line error otherwise)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device '{device}' asked for, but CUDA is not available on this machine")
    return device
