"""Streaming, atomic output: sharded safetensors written tensor by tensor, folders renamed into place at the end.

``write_folder`` is the one way a command writes a model: (name, tensor) pairs in, a Hugging Face folder out.

Memory: a tensor's bytes go to the shard file as soon as it is added. Safetensors puts the header first, so a
shard reserves room for it when the number of tensors is known (``expected_tensors``) and every byte is written
once; otherwise the data goes to a side file that is copied behind the header when the shard closes (written
twice). Nothing holds a whole shard.

Atomicity (DESIGN principle 6): everything is written into a hidden temporary folder (or file) beside the target
and renamed into place only when complete; on any error the temporary is removed, so a crash never leaves half a
model where a model is expected. A temporary's name carries the host and pid of its writer
(``.NAME.tmp-HOST-PID-XXXX``, ``.NAME.old-HOST-PID``), so that a later run for the same target removes those a
killed process left (pid no longer alive on this host) and leaves a live concurrent writer's alone.

Every float tensor is checked finite before it is written, and an OSError while writing (a full disk) is one line
naming the output; an output that is, holds or lies inside one of the inputs is refused (``check_output``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from compress.errors import CompressError
from compress.io.reader import DTYPE_CODES, all_finite

DEFAULT_SHARD_SIZE = 5 * 10**9

# What `copy_aux` takes from the source folder: config, generation config and every tokenizer format HF writes.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
)

# Sparse weight files carry these files as ``__aux__::<name>`` entries. Only names in AUX_FILES are ever written
# back, as plain names inside the output folder: an entry's name comes from a file that may be hostile.
AUX_PREFIX = "__aux__::"


def aux_entry_name(key: str, source: str | os.PathLike) -> str:
    """The file name an ``__aux__::`` entry may be written as, or a one-line error naming the entry."""
    name = key[len(AUX_PREFIX):]
    if name not in AUX_FILES:
        raise CompressError(f"{source}: entry '{key}' is not an auxiliary file this tool writes (allowed: "
                            f"{', '.join(AUX_FILES)}); refusing a file that names another path")
    return name


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, 1234 -> 1234."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = (m.group(2) or "").upper() if m else None
        if not m or unit not in _UNITS:
            raise CompressError(f"shard size '{text}' is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise CompressError(f"shard size must be positive, got {text}")
    return value


def check_output(out: str | os.PathLike, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) if ``out`` cannot be written, or writing it could destroy the working folder or
    one of ``inputs`` (with or without ``overwrite``)."""
    out = Path(out)
    real = out.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working folder was deleted: nothing of it to protect
        cwd = None
    if out.name in ("", ".", "..") or (cwd is not None and cwd.is_relative_to(real)):
        raise CompressError(f"{out}: is the working folder or holds it; name a new folder or file to write")
    for inp in inputs:
        if inp is not None:
            _check_not_input(out, real, Path(inp))
    if out.exists() and not overwrite:
        raise CompressError(f"{out}: already exists; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CompressError(f"{out}: cannot write here ({parent} is not a writable folder)")
    return out


def _check_not_input(out: Path, real: Path, inp: Path) -> None:
    """Refuse an output that is, holds or lies inside ``inp`` (paths compared with symlinks resolved)."""
    guarded = inp.resolve()
    if inp.is_file() and not inp.name.endswith(".index.json"):
        # a weights file alone: the folder it sits in may hold outputs; a shard index stands for its folder
        same = real == guarded or (out.exists() and os.path.samefile(out, inp))
        if same or guarded.is_relative_to(real):
            raise CompressError(f"{out}: {'is' if same else 'holds'} the input {inp}; writing it would destroy "
                                "the input, so choose another output")
        return
    if inp.is_file():
        guarded = guarded.parent
    if real == guarded or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
        raise CompressError(f"{out}: is the input {inp}; writing it would destroy the input, so choose another "
                            "output")
    if guarded.is_relative_to(real):
        raise CompressError(f"{out}: holds the input {inp}; writing it would destroy the input, so choose another "
                            "output")
    if real.is_relative_to(guarded):
        raise CompressError(f"{out}: lies inside the input {inp}; choose an output outside it")


# Fields of a configuration that name something written, not read (everything else that is a path is an input).
OUTPUT_FIELDS = frozenset({"out", "sparse_out", "log", "cache_dir", "out_root", "results", "artifacts", "db",
                           "workdir"})
# Text fields that name a file to read, or a bundled corpus (then no path of the user's)
TEXT_INPUT_FIELDS = frozenset({"calib", "eval_perplexity", "perplexity"})


def config_inputs(cfg) -> list[Path]:
    """Every path a configuration (a pydantic model from ``compress.config``) reads: its path fields, nested
    models' included, except those in ``OUTPUT_FIELDS``."""
    found: list[Path] = []

    def walk(value) -> None:
        if isinstance(value, Path):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif hasattr(type(value), "model_fields"):
            for name in type(value).model_fields:
                v = getattr(value, name)
                if name in TEXT_INPUT_FIELDS and isinstance(v, str) and os.path.exists(v):
                    found.append(Path(v))
                elif name not in OUTPUT_FIELDS:
                    walk(v)

    walk(cfg)
    return found


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


# A device tensor leaves through a pinned buffer of this size, one per writing thread: a copy into pageable memory
# ran at 2.8 GB/s on the H200 host (0.8 s of a 1.1B merge's 2.2 GB output), a pinned one at many times that.
STAGE_BYTES = 64 * 2**20
_stage = threading.local()


def _device_chunks(t: torch.Tensor, size: int = STAGE_BYTES) -> Iterator[memoryview]:
    """The bytes of device tensor ``t`` in chunks of at most ``size``, each valid until the next is asked for
    (they share the thread's staging buffer, pinned for a CUDA tensor)."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    buf = getattr(_stage, "buf", None) if size == STAGE_BYTES else None
    if buf is None:
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=t.is_cuda)
        if size == STAGE_BYTES:
            _stage.buf = buf
    for start in range(0, flat.numel(), size):
        chunk = flat[start:start + size]
        host = buf[:chunk.numel()]
        host.copy_(chunk, non_blocking=t.is_cuda)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
        yield memoryview(host.numpy())


def check_finite_output(name: str, t: torch.Tensor) -> None:
    """A one-line error naming ``name`` when the float tensor ``t`` holds NaN or Inf (checked on its device)."""
    if not t.is_floating_point() or all_finite(t):
        return
    name = name.split("::")[0]  # a delta or sparse file's entry: name the model's tensor
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    dtype = str(t.dtype).removeprefix("torch.")
    if nan:
        what = f"{nan} NaN" + (f" and {inf} Inf" if inf else "")
        raise CompressError(f"tensor '{name}' came out with {what} of {t.numel()} values; refusing to write a "
                            "non-finite model (check scales such as α, λ and weights)")
    # the readers refuse non-finite inputs, so an Inf here is a finite result too large for the dtype
    raise CompressError(f"tensor '{name}' overflows {dtype}: {inf} of {t.numel()} values exceed its largest "
                        f"finite value {torch.finfo(t.dtype).max:.4g}; choose a wider --dtype or smaller scales")


_ENTRY_SKELETON = len(':{"dtype":"F8_E4M3","shape":[],"data_offsets":[,]},')


def header_room(entries: Iterable[tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None,
                more_metadata: int = 0) -> int:
    """An upper bound on the header of a safetensors file that holds some of ``entries`` ((name, an upper bound of
    each dimension)), ``metadata`` and fields of ``more_metadata`` bytes added later: the ``reserve`` that lets
    ``SafetensorsStreamWriter`` write each byte once when the entries are only known as they come."""
    entries = list(entries)
    data = sum(8 * math.prod(dims) for _, dims in entries) + 8  # 8 bytes a value is the widest dtype
    offset = 2 * len(str(data))
    total = 2 + sum(len(json.dumps(name)) + _ENTRY_SKELETON + offset + sum(len(str(d)) + 1 for d in dims)
                    for name, dims in entries)
    fields = {"format": "pt", **(metadata or {})}
    total += len('"__metadata__":{},') + more_metadata + sum(len(json.dumps(str(k))) + len(json.dumps(str(v))) + 2
                                                              for k, v in fields.items())
    return total


def _entry(writer, name: str, tensor: torch.Tensor) -> None:
    """Record ``tensor``'s header entry at ``writer.nbytes`` (a stream writer or a ``HeaderSizer``)."""
    if name in writer._header:
        raise CompressError(f"tensor '{name}' written twice to {writer.path.name}")
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise CompressError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
    size = tensor.numel() * tensor.element_size()
    writer._header[name] = {"dtype": code, "shape": list(tensor.shape),
                            "data_offsets": [writer.nbytes, writer.nbytes + size]}


def _header_blob(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    header = dict(entries)
    if metadata:
        header["__metadata__"] = metadata
    return json.dumps(header, separators=(",", ":")).encode()


class HeaderSizer:
    """The header a ``SafetensorsStreamWriter`` writes for the same ``add`` calls and metadata, without writing
    anything: a first pass over tensors whose sizes are known only once encoded gives the exact ``reserve``, so
    the file is written once and is byte for byte the one an unreserved writer makes. Tensors may be on the
    ``meta`` device."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        _entry(self, name, tensor)
        self.nbytes += tensor.numel() * tensor.element_size()

    def size(self) -> int:
        return len(_header_blob(self._header, self.metadata))


# Past the first DIRECT_AFTER bytes of a shard, its data may bypass the page cache (O_DIRECT) through an aligned
# staging buffer: each byte reaches the disk once, by DMA, instead of being copied into new page-cache pages and
# written back later. Which is faster depends on the machine and on the moment, so the writer measures and keeps
# measuring: the first DIRECT_AFTER bytes go through the page cache, the next DIRECT_STAGE bytes direct, then the
# faster way runs, and every so often (PROBE_FIRST stages, doubling up to PROBE_MOST) one stage goes the other way
# to measure it again. The latest rate of each way is kept for the rest of the process (``_rates``). Measured: on
# the 2-core benchmark VM a buffered 1 GB write into pages not touched recently took 1.5-3.0 s (each new page is a
# fault in the hypervisor) and O_DIRECT 0.8 s, while into pages just freed it took 0.27 s; the first 16 MiB alone
# could not tell the two cases apart (it chose buffered, then ran 2.3 s). On the H200 host buffered 2 GB took
# 0.64 s and O_DIRECT 1.21 s. COMPRESS_DIRECT_WRITES=1 or 0 decides without measuring; a file system that refuses
# O_DIRECT (tmpfs) gets buffered writes. Small files never reach the threshold, so what a later step reads back
# at once (a test's tiny model) stays in the page cache.
DIRECT_AFTER = 16 * 2**20
DIRECT_ALIGN = 4096  # the largest logical block size in use: O_DIRECT offsets, lengths and addresses are multiples
DIRECT_STAGE = 8 * 2**20
PROBE_FIRST, PROBE_MOST = 8, 128  # stages of the faster way between two measurements of the other
_direct_stages: list = []  # staging buffers of closed sinks, reused: a new mapping costs page faults each time
_direct_lock = threading.Lock()
_rates: dict[bool, float] = {}  # bytes/s last measured, direct (True) and buffered (False), in this process
_direct_choice: Optional[bool] = None  # the faster of the two by ``_rates`` (None: not both measured yet)


def _direct_mode() -> Optional[bool]:
    """True: write direct; False: buffered; None: measure."""
    if not hasattr(os, "O_DIRECT"):
        return False
    env = os.environ.get("COMPRESS_DIRECT_WRITES")
    if env in ("0", "1"):
        return env == "1"
    return None


def _prefer_direct(direct_bytes_per_s: float, buffered_bytes_per_s: float) -> bool:
    return direct_bytes_per_s > buffered_bytes_per_s


def _measured(direct: bool, nbytes: int, seconds: float) -> Optional[bool]:
    """Record a rate of one way; returns the faster way once both are known."""
    global _direct_choice
    with _direct_lock:
        _rates[direct] = nbytes / max(seconds, 1e-9)
        if len(_rates) == 2:
            _direct_choice = _prefer_direct(_rates[True], _rates[False])
        return _direct_choice


class _DirectSink:
    """The part of a file from the first ``DIRECT_ALIGN`` boundary at or past ``start``, written with O_DIRECT in
    staged, aligned chunks; ``close`` hands back the unaligned tail for a buffered write."""

    def __init__(self, fd: int, start: int, buffered):
        self.fd: Optional[int] = fd
        self.pos, self.buffered = start, buffered  # ``buffered``: the file object, should O_DIRECT be refused
        with _direct_lock:
            fits = [b for b in _direct_stages if len(b) == DIRECT_STAGE]
            self._buf = fits[0] if fits else None
            _direct_stages[:] = [b for b in _direct_stages if b is not self._buf]
        if self._buf is None:  # page aligned: an anonymous mapping
            import mmap

            self._buf = mmap.mmap(-1, DIRECT_STAGE)
        self.view = memoryview(self._buf)
        self.fill = 0
        self.direct_bytes = 0
        self.seconds = 0.0  # spent in ``write``: staging copies and direct writes

    def write(self, data: memoryview) -> None:
        start = time.perf_counter()
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        try:
            self._write(data)
        finally:
            self.seconds += time.perf_counter() - start

    def _write(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            k = min(len(data) - done, len(self.view) - self.fill)
            self.view[self.fill:self.fill + k] = data[done:done + k]
            self.fill += k
            done += k
            if self.fill == len(self.view):
                self._flush(self.fill)

    def _flush(self, n: int) -> None:
        written = 0
        while self.fd is not None and written < n:
            try:
                k = os.pwrite(self.fd, self.view[written:n], self.pos + written)
            except OSError as e:
                # EINVAL on the first write: the file system took the O_DIRECT open but not the write (some FUSE
                # and network file systems); everything goes through the page cache instead
                if e.errno != errno.EINVAL or self.direct_bytes or written:
                    raise
                os.close(self.fd)
                self.fd = None
                break
            if k <= 0 or k % DIRECT_ALIGN and written + k < n:
                raise OSError(f"short O_DIRECT write ({k} of {n - written} bytes)")
            written += k
        if self.fd is None:
            self.buffered.seek(self.pos)
            self.buffered.write(self.view[:n])
        self.direct_bytes += written
        self.pos += n
        self.fill = 0

    def close(self) -> tuple[int, bytes]:
        """Write the aligned part of what is staged; returns (offset, bytes) of the rest."""
        try:
            aligned = self.fill - self.fill % DIRECT_ALIGN
            tail = bytes(self.view[aligned:self.fill])
            if aligned:
                self._flush(aligned)
            return self.pos, tail
        finally:
            self.release()

    def release(self) -> None:
        self.view.release()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        with _direct_lock:
            if len(_direct_stages) < 2:
                _direct_stages.append(self._buf)


class SafetensorsStreamWriter:
    """Writes one safetensors file from tensors added one at a time, holding none of them."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None, reserve: int = 0):
        """``reserve``: bytes of header space to leave before the data, so that ``close`` writes the header in
        place (padded with spaces, which JSON allows) instead of copying the data behind it; when the header
        turns out larger, ``close`` falls back to the copy."""
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.reserve = -(-reserve // 8) * 8
        self._data_path = self.path if self.reserve else self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        if self.reserve:
            self._data.seek(8 + self.reserve)  # left as a hole for ``close``: the header is written once too
        self._header: dict[str, dict] = {}
        self.nbytes = 0
        self._direct: Optional[_DirectSink] = None
        self._pos = 8 + self.reserve  # the file offset of the next byte of data
        mode = _direct_mode() if self.reserve else False
        self._measure = mode is None
        # where the way of writing changes next (None: never): first from buffered to direct at the first aligned
        # offset past DIRECT_AFTER bytes of data; every later change falls on an aligned offset too (runs are whole
        # stages)
        self._switch_at = self._pos + DIRECT_AFTER + (-(self._pos + DIRECT_AFTER)) % DIRECT_ALIGN \
            if mode is not False else None
        self._run_start, self._run_seconds = self._pos, 0.0  # the current buffered run, timed
        self._probe = True  # the current run measures its way (the head measures buffered writes)
        self._winner: Optional[bool] = None
        self._stages = PROBE_FIRST  # of the faster way before the other is measured again

    def _write(self, data) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        try:
            while len(data):
                k = len(data) if self._switch_at is None else min(len(data), self._switch_at - self._pos)
                if self._direct is not None:
                    self._direct.write(data[:k])
                else:
                    start = time.perf_counter()
                    self._data.write(data[:k])
                    self._run_seconds += time.perf_counter() - start
                self._pos += k
                data = data[k:]
                if self._pos == self._switch_at:
                    self._switch()
        except OSError:
            self._close_quietly()
            raise

    def _switch(self) -> None:
        """At the end of a run: measure it, choose the next run's way and length, and start it."""
        was_direct = self._direct is not None
        if was_direct:
            sink = self._direct
            nbytes, seconds = sink.direct_bytes - self._run_start, sink.seconds - self._run_seconds
            usable = sink.fd is not None
        else:
            nbytes, seconds, usable = self._pos - self._run_start, self._run_seconds, True
        if not self._measure or not usable:  # the head of a forced direct file, or O_DIRECT refused: no more changes
            self._switch_at = None
            if was_direct:
                self._finish_direct()
            else:  # a buffered run is always usable: this is a forced direct file's head
                self._start_direct()
            return
        best = _measured(was_direct, nbytes, seconds)
        if best is None:  # the other way is not measured yet: it is next, for one stage
            way, probe = not was_direct, True
        elif self._probe:  # the faster way runs next
            way, probe = best, False
            if best != self._winner:
                self._winner, self._stages = best, PROBE_FIRST
        else:  # after a run of the faster way, the other is measured again; the runs grow while the winner holds
            way, probe = not was_direct, True
            if best == self._winner:
                self._stages = min(2 * self._stages, PROBE_MOST)
        self._probe = probe
        self._switch_at = self._pos + (1 if probe else self._stages) * DIRECT_STAGE
        if was_direct and not way:
            self._finish_direct()
        elif way and not was_direct:
            self._start_direct()
        self._mark_run()

    def _mark_run(self) -> None:
        # a direct run is measured by its sink's counters, a buffered one by the writes timed in ``_write``
        sink = self._direct
        self._run_start, self._run_seconds = (sink.direct_bytes, sink.seconds) if sink else (self._pos, 0.0)

    def _start_direct(self) -> None:
        self._data.flush()
        try:
            fd = os.open(self._data_path, os.O_WRONLY | os.O_DIRECT)
        except OSError:  # EINVAL: this file system has no direct I/O
            self._measure, self._switch_at = False, None
            return
        self._direct = _DirectSink(fd, self._pos, self._data)
        self._mark_run()

    def _finish_direct(self) -> None:
        if self._direct is None:
            return
        sink, self._direct = self._direct, None
        pos, tail = sink.close()
        self._data.seek(pos)
        self._data.write(tail)

    def _close_quietly(self) -> None:
        # a failed flush must not be retried when the file object is collected (a second error on stderr)
        if self._direct is not None:
            self._direct.release()
            self._direct = None
        try:
            self._data.close()
        except OSError:
            pass

    def add(self, name: str, tensor: torch.Tensor, check_finite: bool = True) -> None:
        """Append ``tensor``; ``check_finite=False``: the caller has already refused NaN/Inf in it."""
        _entry(self, name, tensor)
        if check_finite:
            check_finite_output(name, tensor)
        if tensor.is_cuda and tensor.numel():
            for data in _device_chunks(tensor):
                self._write(data)
                self.nbytes += len(data)
            return
        data = _tensor_bytes(tensor)
        self._write(data)
        self.nbytes += len(data)

    def close(self) -> None:
        try:
            self._finish_direct()
            self._data.close()
        except OSError:
            self._close_quietly()
            raise
        blob = _header_blob(self._header, self.metadata)
        if self.reserve and len(blob) <= self.reserve:
            with open(self.path, "r+b") as out:
                out.write(struct.pack("<Q", self.reserve) + blob + b" " * (self.reserve - len(blob)))
            return
        blob += b" " * (-len(blob) % 8)
        if self.reserve:  # the header outgrew its room: move the data behind a header of the right size
            moved = self.path.with_name(self.path.name + ".data")
            with open(self.path, "rb") as src, open(moved, "wb") as dst:
                src.seek(8 + self.reserve)
                shutil.copyfileobj(src, dst, 16 * 2**20)
            self._data_path = moved
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 * 2**20)
        os.remove(self._data_path)

    def abort(self) -> None:
        self._close_quietly()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# .NAME.tmp-HOST-PID-XXXX (mkdtemp/mkstemp's suffix: letters, digits, '_'), maybe + '.data'; .NAME.old-HOST-PID
_TEMP_RE = re.compile(r"(?:tmp-(?P<host>\w+)-(?P<pid>\d+)-\w+(?:\.data)?|old-(?P<ohost>\w+)-(?P<opid>\d+))")


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_orphans(out: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writers of ``out`` on this host left when they died (kill -9, power loss);
    those of live processes (a concurrent run) and of other hosts are kept. Returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    head = f".{out.name}."
    for p in out.parent.iterdir():
        if not p.name.startswith(head):
            continue
        m = _TEMP_RE.fullmatch(p.name[len(head):])
        if m is None:
            continue
        host, pid = (m["host"], m["pid"]) if m["host"] else (m["ohost"], m["opid"])
        if host != _HOST or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except FileNotFoundError:  # another run cleaned it first
            continue
        removed.append(p)
    return removed


def _write_error(e: OSError, out: Path, tmp: Path) -> CompressError | None:
    """The one-line error for an OSError met while writing ``out`` (None: it names another path, e.g. an input)."""
    absolute = lambda p: Path(os.path.abspath(os.fsdecode(p)))  # noqa: E731  (symlinks as written)
    names = [absolute(n) for n in (e.filename, getattr(e, "filename2", None)) if n is not None]
    target, tmp = absolute(out), absolute(tmp)
    ours = lambda p: p == target or p.is_relative_to(tmp) or (p.parent == target.parent and  # noqa: E731
                                                             p.name.startswith(f".{target.name}."))
    if names and not any(ours(n) for n in names):
        return None
    reason = (e.strerror or str(e)).lower()
    return CompressError(f"{out}: cannot write the output ({reason}); nothing was written")


def _prepare(out: str | os.PathLike, overwrite: bool) -> tuple[Path, list[Path]]:
    """``out`` checked, its folder made (returned: the folders made, deepest first) and dead writers' orphans
    removed."""
    out = check_output(out, overwrite)
    made, p = [], out.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"{out}: cannot write here ({(e.strerror or str(e)).lower()})") from None
    remove_orphans(out)
    return out, made


def _unmake(folders: list[Path]) -> None:
    """Remove the folders ``_prepare`` made for an output that failed, where still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` when the block ends without error."""
    out, made = _prepare(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    except OSError as e:
        _unmake(made)
        raise CompressError(f"{out}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        _rename_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _unmake(made)
        err = _write_error(e, out, tmp) if isinstance(e, OSError) else None
        if err is not None:
            raise err from None
        raise


def _umask() -> int:
    # read, not set-and-restore: os.umask(0) would open a window in which other threads create world-writable files
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _public_modes(tmp: Path) -> None:
    """mkstemp and mkdtemp create private (0600 / 0700) temporaries; a finished output gets the modes any file
    this user creates would get (0644 / 0755 under the usual umask 022)."""
    mask = _umask()
    if tmp.is_dir():
        os.chmod(tmp, 0o777 & ~mask)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)


def _rename_into_place(tmp: Path, out: Path) -> None:
    _public_modes(tmp)
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{_HOST}-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # the previous output stays where it was
        raise
    _remove(old)


@contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; move it to ``out`` when the block ends without error."""
    out, made = _prepare(out, overwrite)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
        os.close(fd)
    except OSError as e:
        _unmake(made)
        raise CompressError(f"{out}: cannot write here ({e.strerror})") from None
    tmp = Path(name)
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            _rename_into_place(tmp, out)  # a file replacing a folder (--overwrite)
        else:
            _public_modes(tmp)
            os.replace(tmp, out)
    except BaseException as e:
        for p in (tmp, tmp.with_name(tmp.name + ".data")):
            if p.exists():
                p.unlink()
        _unmake(made)
        err = _write_error(e, out, tmp) if isinstance(e, OSError) else None
        if err is not None:
            raise err from None
        raise


class ShardedWriter:
    """Writes a Hugging Face weights folder: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards
    plus ``model.safetensors.index.json``, the same layout ``save_pretrained`` produces.

    Use inside ``atomic_dir``; call ``close()`` once every tensor is added.
    """

    def __init__(self, folder: Path, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, expected_tensors: Optional[int] = None):
        """``expected_tensors``: how many tensors the model has, when known; each shard then reserves header room
        for that many and is written once, instead of being copied behind its header at the end."""
        self.folder = Path(folder)
        self.shard_size = parse_size(shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.reserve = 1024 + 256 * expected_tensors + len(json.dumps(self.metadata)) if expected_tensors else 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._current: SafetensorsStreamWriter | None = None
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor, check_finite: bool = True) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._current is None or (self._current.nbytes and self._current.nbytes + size > self.shard_size):
            self._roll()
        self._current.add(name, tensor, check_finite)
        self._shards[-1][1].append(name)
        self.total_size += size

    def _roll(self) -> None:
        if self._current is not None:
            self._current.close()
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        self._current = SafetensorsStreamWriter(path, self.metadata, reserve=self.reserve)
        self._shards.append((path, []))

    def close(self) -> list[Path]:
        if self._current is None:
            self._roll()
        self._current.close()
        n = len(self._shards)
        if n == 1:
            final = self.folder / "model.safetensors"
            os.rename(self._shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return finals


def copy_aux(src: str | os.PathLike | None, folder: Path, files: tuple[str, ...] = AUX_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files from ``src`` (a folder) into ``folder``."""
    if src is None:
        return []
    src = Path(src)
    if src.is_file():
        src = src.parent
    copied = []
    for name in files:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            copied.append(name)
    return copied


def write_model_card(folder: Path, title: str, method: str, inputs: dict[str, str],
                     params: dict[str, object] | None = None) -> None:
    """A short README.md naming the inputs and the method, as mergekit and PEFT write."""
    lines = ["---", "library_name: transformers", "tags: [compress]", "---", "", f"# {title}", "",
             f"Produced by `compress` ({method}).", "", "## Inputs", ""]
    lines += [f"- {role}: `{path}`" for role, path in inputs.items()]
    if params:
        lines += ["", "## Parameters", ""] + [f"- {k}: `{v}`" for k, v in params.items()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _write_one(writer: "ShardedWriter", also, name: str, t: torch.Tensor, check_finite: bool = True) -> None:
    writer.add(name, t, check_finite)
    if also is not None:
        also(name, t)


def write_folder(out: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], *, overwrite: bool = False,
                 expected_tensors: Optional[int] = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, aux_from: str | os.PathLike | None = None,
                 files: Mapping[str, bytes | str] | None = None, finish: Callable[[Path], None] | None = None,
                 card: dict | None = None, also: Callable[[str, torch.Tensor], None] | None = None,
                 checked_finite: bool = False) -> Path:
    """Write the (name, tensor) pairs of ``tensors`` as a Hugging Face folder ``out``, atomically; returns ``out``.

    ``expected_tensors`` (default: ``len(tensors)`` when it has one) reserves each shard's header room, so each
    byte is written once. Tensor i is written by a thread while the caller's generator computes tensor i + 1;
    ``also(name, tensor)``, a second output of the same pass (a sparse file), runs on that thread after the write.
    Then, in the temporary folder: ``aux_from``'s config and tokenizer files, ``files`` ({name: content}),
    ``finish(folder)``, config.json set to name the dtype written, and the model card (``card``: the keyword
    arguments of ``write_model_card``). ``checked_finite``: the producer has already refused NaN/Inf in every
    tensor (a merge checks each one to name the input at fault), so the writer does not read them all again."""
    from concurrent.futures import ThreadPoolExecutor

    if expected_tensors is None and hasattr(tensors, "__len__"):
        expected_tensors = len(tensors)
    floats: set[torch.dtype] = set()
    it = iter(tensors)
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, shard_size, metadata, expected_tensors=expected_tensors)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="compress-write") as pool:
                pending = None
                for name, t in it:
                    if t.is_floating_point():
                        floats.add(t.dtype)
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(_write_one, writer, also, name, t, not checked_finite)
                    del t  # not held here while the next tensor is computed: written, it can be freed
                if pending is not None:
                    pending.result()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        writer.close()
        copy_aux(aux_from, tmp)
        for fname, content in (files or {}).items():
            (tmp / fname).write_bytes(content.encode() if isinstance(content, str) else content)
        if finish is not None:
            finish(tmp)
        name_written_dtype(tmp, floats, aux_from)
        if card is not None:
            write_model_card(tmp, **card)
    return Path(out)


def name_written_dtype(folder: Path, dtypes: set[torch.dtype], source: str | os.PathLike | None = None) -> None:
    """Make ``folder/config.json`` name the dtype of the weights written when the float tensors share one:
    ``dtype`` (what transformers 5 reads) and ``torch_dtype`` where present (what older versions read), in the
    config and in the sub-configs that name one (LLaVA's text and vision configs). A copied config names the
    input's dtype, so ``from_pretrained(dtype="auto")`` would load a ``--dtype bf16`` output as float32."""
    path = folder / "config.json"
    if len(dtypes) != 1 or not path.is_file():
        return
    name = str(next(iter(dtypes))).removeprefix("torch.")
    src = None if source is None else Path(source)
    origin = path.name if src is None else (src.parent if src.is_file() else src) / path.name
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CompressError(f"{origin}: not valid JSON ({str(e).splitlines()[0]}); the output's config must name "
                            f"the dtype written ({name})") from None
    if not isinstance(cfg, dict):
        raise CompressError(f"{origin}: not a JSON object; the output's config must name the dtype written ({name})")
    changed = False
    for c in [cfg, *(v for v in cfg.values() if isinstance(v, dict) and ("dtype" in v or "torch_dtype" in v))]:
        for key in ("dtype", "torch_dtype"):
            if (key in c or (key == "dtype" and c is cfg)) and c.get(key) != name:
                c[key] = name
                changed = True
    if changed:  # an untouched config stays byte for byte the input's
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
