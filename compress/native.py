"""Small C kernels compiled on first use, for the few loops torch has no fast op for (the sort replay of
``compress.sparsify.topk``, TIES' fused combine in ``compress.merge.methods``).

A source compiles once per machine with ``$CC``, ``cc`` or ``gcc`` into ``~/.cache/compress`` (``XDG_CACHE_HOME``
if set), named by its hash, and is loaded with ctypes, which releases the GIL during a call. Without a compiler
``load`` gives None and the callers use their torch path (the same answer, slower). ``-ffp-contract=off``: a
kernel that reproduces torch's float32 roundings must not have a multiply and an add fused.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

_loaded: dict[str, Optional[ctypes.CDLL]] = {}


def load(name: str, source: str, signatures: dict[str, tuple], opt: str = "-O2") -> Optional[ctypes.CDLL]:
    """The compiled ``source`` with ``signatures`` ({function: (restype, [argtypes])}) set, or None. ``opt``:
    the optimization flags (``-O3 -fno-trapping-math`` let gcc vectorize a branch-free loop of float selects)."""
    tag = f"{name}-{hashlib.sha256((opt + source).encode()).hexdigest()[:16]}"
    if tag in _loaded:
        return _loaded[tag]
    lib = None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress"
        so = cache / f"{tag}.so"
        try:
            if not so.exists():
                cache.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    src = Path(tmp) / f"{name}.c"
                    src.write_text(source)
                    subprocess.run([cc, *opt.split(), "-ffp-contract=off", "-shared", "-fPIC", "-o",
                                    str(Path(tmp) / "k.so"), str(src)], check=True, capture_output=True, timeout=120)
                    os.replace(Path(tmp) / "k.so", so)  # atomic: a parallel process sees all or nothing
            lib = ctypes.CDLL(str(so))
            for fn, (restype, argtypes) in signatures.items():
                getattr(lib, fn).restype = restype
                getattr(lib, fn).argtypes = argtypes
        except (OSError, subprocess.SubprocessError, AttributeError):
            lib = None
    _loaded[tag] = lib
    return lib
