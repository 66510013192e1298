"""Read-ahead for passes that walk checkpoints: the next tensors are read on threads while the current one computes.

A pass knows the order of its reads (tensor names × inputs), so it hands them to ``ReadAhead`` as jobs up front;
threads run them in that order, and at most ``max_bytes`` of tensors read but not yet taken are held, so host
memory stays about one set of inputs ahead whatever the model's size. On a CUDA device a job reads into a pinned
staging buffer and copies it to the device on a side stream (``Staging``), so the host-to-device copy overlaps
the reads and the maths too.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Iterable, Optional

import torch

# threads that read ahead: reads are positioned, GIL-free system calls, so a few run in parallel even on few cores
DEFAULT_THREADS = max(2, min(8, os.cpu_count() or 2))


class ReadAhead:
    """Runs read jobs ``(key, group, nbytes, read)`` ahead of a consumer that takes them by key.

    Jobs start in the order given while the bytes the reader has handed out stay within ``max_bytes``: jobs started
    and not yet taken (``in_flight``) plus those taken for a group the consumer has not finished (``held``: the
    tensor being computed), so reading ahead never adds more than the budget to what the consumer holds anyway.
    When nothing is in flight one job is let through, so a tensor larger than the budget still streams.
    ``take(key)`` waits for its job and returns the result, or None for a key that is not queued (the caller then
    reads directly). ``finish(group)`` releases the group's bytes and drops its jobs the consumer did not take.
    One consumer thread calls ``take``/``finish``.
    """

    def __init__(self, jobs: Iterable[tuple[Hashable, Hashable, int, Callable[[], object]]], max_bytes: int,
                 threads: int = DEFAULT_THREADS):
        self.max_bytes = max(int(max_bytes), 0)
        self._jobs = iter(jobs)
        self._peeked: Optional[tuple] = None
        self._pending: dict[Hashable, tuple[Future, int, Hashable]] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="compress-read")
        self.in_flight = 0  # bytes of jobs started and not yet taken or dropped
        self.held: dict[Hashable, int] = {}  # bytes taken, by group not yet finished
        self.peak_in_flight = 0  # the most of in_flight + held at once
        self._fill()

    def _fill(self) -> None:
        while True:
            if self._peeked is None:
                self._peeked = next(self._jobs, None)
                if self._peeked is None:
                    return
            key, group, nbytes, read = self._peeked
            if self._pending and self.in_flight + sum(self.held.values()) + nbytes > self.max_bytes:
                return
            self._pending[key] = (self._pool.submit(read), nbytes, group)
            self.in_flight += nbytes
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight + sum(self.held.values()))
            self._peeked = None

    def take(self, key: Hashable):
        item = self._pending.pop(key, None)
        if item is None:
            return None
        fut, nbytes, group = item
        self.in_flight -= nbytes
        self.held[group] = self.held.get(group, 0) + nbytes
        return fut.result()

    def finish(self, group: Hashable) -> None:
        for k in [k for k, (_, _, g) in self._pending.items() if g == group]:
            fut, nbytes, _ = self._pending.pop(k)
            fut.cancel()
            self.in_flight -= nbytes
        self.held.pop(group, None)
        self._fill()

    def close(self) -> None:
        for fut, _, _ in self._pending.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self.in_flight = 0
        self.held.clear()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Staging:
    """Pinned host buffers for reads bound for a CUDA device, reused (pinning memory is slow): a read lands in one,
    is copied to the device on a side stream, and the buffer goes back to the pool once the copy is done."""

    def __init__(self, device: torch.device | str, limit: int = DEFAULT_THREADS):
        self.device = torch.device(device)
        self.limit = max(1, limit)
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._streams = threading.local()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._free if b.numel() >= nbytes]
            if fits:
                buf = min(fits, key=torch.Tensor.numel)
                # by identity: list.remove compares tensors with ==, elementwise
                self._free = [b for b in self._free if b is not buf]
                return buf
        return torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)

    def _stream(self):
        s = getattr(self._streams, "s", None)
        if s is None:
            s = self._streams.s = torch.cuda.Stream(self.device)
        return s

    def load(self, nbytes: int, read_into: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``read_into(buffer)`` fills a pinned buffer of ``nbytes`` and returns it viewed as the tensor; the
        tensor comes back on the device, its copy finished."""
        buf = self._buffer(nbytes)
        try:
            host = read_into(buf[:nbytes])
            stream = self._stream()
            with torch.cuda.stream(stream):
                dev = host.to(self.device, non_blocking=True)
            stream.synchronize()  # the buffer can be reused, and the consumer's stream sees finished data
        finally:
            with self._lock:
                # at most one buffer a reader thread: the smallest goes when another joins a full pool
                self._free = sorted(self._free + [buf], key=torch.Tensor.numel)[-self.limit:]
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev


def walk(names: list[str], sources: Callable[[str], list], *, device=None, max_bytes: Optional[int] = None,
         floor: int = 64 * 2**20):
    """Yield ``names`` in order while the reads of the coming ones run ahead: ``sources(name)`` lists the
    checkpoints (``compress.io.reader.Checkpoint``) the caller reads ``name`` from with ``get``, and those reads are
    served from the read-ahead. ``max_bytes`` (default: the largest name's reads, at least ``floor``) bounds what
    is read and not yet done with, the name being computed included. Onto a CUDA ``device`` reads go through
    pinned staging buffers and come back on the device."""
    plan = [(n, sources(n)) for n in names]
    if max_bytes is None:
        max_bytes = max([sum(c.info(n).nbytes for c in cks) for n, cks in plan] + [floor])
    staging = Staging(device) if device is not None and torch.device(device).type == "cuda" else None
    served = {id(c): c for _, cks in plan for c in cks}
    jobs = (((id(c), n), n, c.info(n).nbytes, c.read_job(n, staging)) for n, cks in plan for c in cks)
    with ReadAhead(jobs, max_bytes) as ahead:
        for c in served.values():
            c.read_ahead = ahead
        try:
            for n in names:
                yield n
                ahead.finish(n)
        finally:
            for c in served.values():
                c.read_ahead = None
            walk.last_peak = ahead.peak_in_flight  # what the tests check against the budget


walk.last_peak = 0
