"""Zero-copy reads: a byte range of a file mapped copy-on-write and viewed as a tensor, unmapped when it is freed.

Reading a tensor with ``preadv`` copies it out of the page cache into fresh memory: on the 2-core benchmark
machine 2.7 GB/s into a reused buffer and 1.8 GB/s into new ones, the copy and the new pages' faults being most
of a task-arithmetic merge's system time. A mapping costs neither: the tensor *is* the page cache, and a read
fault maps 64 KiB of it at a time (the kernel's fault-around).

Unlike ``safetensors.safe_open``, which maps a whole file for as long as it is open (every page a pass touched
stays resident and counted in RSS), each tensor gets its own mapping, released by ``munmap`` when the last view
of it is garbage: resident memory stays what the pass holds. ``MAP_PRIVATE`` with write permission makes the
tensor an ordinary writable one whose in-place updates copy the touched pages and never reach the file. Python's
``mmap`` is not used because before 3.13 every ``mmap`` object keeps a duplicate of the file descriptor open, one
per live tensor. A file truncated by another process while mapped raises SIGBUS on access, as with
``safe_open``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import sys
import threading
import weakref
from typing import Optional

import torch

_MADV_WILLNEED = 3
_libc = None


def _lib():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int64 if sys.maxsize > 2**32 else ctypes.c_long]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc = lib
        except (OSError, AttributeError):  # no libc symbols (Windows): positioned reads instead
            _libc = False
    return _libc or None


_unmaps: Optional[queue.SimpleQueue] = None
_unmaps_lock = threading.Lock()


def _unmapper(q: queue.SimpleQueue) -> None:
    while True:
        addr, size = q.get()
        _libc.munmap(addr, size)


def _unmap(addr: int, size: int) -> None:
    """``munmap`` on a daemon thread: it costs about 0.5 µs a mapped page (0.36 s for the three 1 GB inputs of
    a merge), which the thread that freed the tensor, the one doing the maths, need not wait for."""
    global _unmaps
    if _unmaps is None:
        with _unmaps_lock:
            if _unmaps is None:
                q: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=_unmapper, args=(q,), name="compress-unmap", daemon=True).start()
                _unmaps = q
    _unmaps.put((addr, size))


def _forget_unmapper() -> None:
    global _unmaps
    _unmaps = None  # a forked child has no copy of the thread: it starts its own when it first frees a mapping


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_unmapper)


# off by COMPRESS_MMAP=0, for comparing against positioned reads (``compress bench merge-speed`` does)
ENABLED = os.environ.get("COMPRESS_MMAP", "1") != "0" and os.name == "posix"


def map_range(fd: int, offset: int, length: int, advise: bool = True) -> Optional[torch.Tensor]:
    """``length`` bytes of the file ``fd`` from ``offset``, as a writable uint8 tensor backed by the page cache;
    None when mapping is not available here (the caller reads instead). ``advise``: ask the kernel to start
    reading the range now (``MADV_WILLNEED``), so a read-ahead thread overlaps disk reads with the maths."""
    lib = _lib() if ENABLED else None
    if lib is None or length <= 0:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = offset + length - start
    addr = lib.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    if advise:
        lib.madvise(addr, size, _MADV_WILLNEED)
    window = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(window, _unmap, addr, size)
    # the tensor holds ``window`` through its storage; when both are gone the finalizer unmaps
    return torch.frombuffer(window, dtype=torch.uint8)[offset - start:]
