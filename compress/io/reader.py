"""Lazy checkpoint reading: list names, shapes and dtypes without touching data; read one tensor at a time.

Accepted inputs (the layouts Hugging Face writes):
  * a folder with ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or a
    sharded ``pytorch_model.bin.index.json`` (or any single ``*.safetensors`` file);
  * a single ``.safetensors`` file, an ``*.index.json`` file, or a ``.bin`` file.

safetensors files are read with our own header parser rather than ``safe_open``: ``safe_open`` memory-maps the
whole file, and every page a pass touches stays resident (and counted in RSS) until the file is closed, so walking
a 1 GB checkpoint would look like holding 1 GB. Here each tensor is its own copy-on-write mapping, unmapped when
the tensor is freed (``compress.io.mapped``; positioned reads where mapping is not available), so the footprint
stays at the tensors a pass holds and no byte is copied out of the page cache. ``.bin`` files are loaded with
``weights_only=True`` (never arbitrary pickles) and ``mmap=True`` where the file format allows it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.io.mapped import map_range

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def quote_name(name: str) -> str:
    """A name read from a file, quoted for a one-line message (control characters escaped)."""
    return f"'{name}'" if name.isprintable() else repr(name)


# The rules of the safetensors library (its Rust ``Metadata::validate`` and serde_json parser), so that every file
# it refuses is refused here too, with the file and tensor named.
MAX_HEADER_BYTES = 100_000_000
_MAX_JSON_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays/objects are refused
_USIZE_MAX = 2**64 - 1
# dtypes the safetensors format defines that torch cannot hold
_FOREIGN_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", "U16", "U32", "U64"}


class _DuplicateKey(ValueError):
    def __str__(self) -> str:
        return f"duplicate key {quote_name(self.args[0])}"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_int(text: str):
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float, which no shape or offset accepts
    v = int(text)
    try:
        float(v)
    except OverflowError:  # past f64's range, which serde_json refuses ("number out of range")
        raise ValueError(f"number out of range: {text[:20]}...") from None
    return v


def _json_float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:20]}")
    return v


def _refuse_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _check_json_tree(tree) -> None:
    """serde_json's nesting limit, and strings that are valid UTF-8 (Python's parser lets lone surrogates pass)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > _MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {_MAX_JSON_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else ((None, v) for v in node)
            for k, v in items:
                if k is not None:
                    k.encode("utf-8")
                stack.append((v, depth + 1))
        elif isinstance(node, str):
            node.encode("utf-8")


def strict_json(raw: bytes):
    """JSON as strictly as serde_json parses a safetensors header (no NaN, no duplicate keys, no lone
    surrogates, nesting and number limits); raises ValueError or UnicodeError."""
    tree = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_json_int,
                      parse_float=_json_float, parse_constant=_refuse_constant)
    _check_json_tree(tree)
    return tree


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _usize(v) -> bool:
    return type(v) is int and 0 <= v <= _USIZE_MAX


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated once, tensors read with positioned reads.

    Validation follows the safetensors library: the offsets, sorted, must tile the data buffer from 0 to the end
    of the file with no gap or overlap, each span exactly shape × dtype size. Reads therefore never allocate more
    than the file holds nor return bytes from outside a tensor's own span.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) != 8:
                    raise self._bad("shorter than 8 bytes")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise self._bad(f"header length {n} is over the {MAX_HEADER_BYTES:,}-byte limit")
                if 8 + n > size:
                    raise self._bad(f"header length {n} runs past the end of the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CompressError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if len(raw) != n:
            raise self._bad("file shrank while its header was read")
        try:
            header = strict_json(raw)
        except _DuplicateKey as e:
            raise self._bad(f"header names {quote_name(e.args[0])} twice") from None
        except (ValueError, UnicodeError, RecursionError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise self._bad(f"header is not valid JSON ({reason})") from None
        if not isinstance(header, dict):
            raise self._bad(f"header is a JSON {_json_type(header)}, not an object")
        self.metadata: dict[str, str] = self._metadata(header.pop("__metadata__", None))
        self._data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, h in header.items():
            self.infos[name], self._offsets[name] = self._entry(name, h)
        self._check_layout(size - self._data_start)
        self._fd: int | None = None
        self._open_lock = threading.Lock()

    def _bad(self, why: str, name: str | None = None) -> CompressError:
        where = f"tensor {quote_name(name)}: " if name is not None else ""
        return CompressError(f"{self.path}: not a valid safetensors file: {where}{why}")

    def _metadata(self, meta) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise self._bad(f"__metadata__ is a JSON {_json_type(meta)}, not an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise self._bad(f"__metadata__ field {quote_name(k)} is a JSON {_json_type(v)}, not a string")
        return meta

    def _entry(self, name: str, h) -> tuple[TensorInfo, tuple[int, int]]:
        if not isinstance(h, dict):
            raise self._bad(f"entry is a JSON {_json_type(h)}, not an object", name)
        for field in ("dtype", "shape", "data_offsets"):
            if field not in h:
                raise self._bad(f"no '{field}' field", name)
        code, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
        if not isinstance(code, str):
            raise self._bad(f"dtype is a JSON {_json_type(code)}, not a string", name)
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            kind = "unsupported" if code in _FOREIGN_DTYPES else "unknown"
            raise self._bad(f"{kind} dtype {quote_name(code)}", name)
        if not isinstance(shape, list) or not all(_usize(s) for s in shape):
            raise self._bad(f"shape {json.dumps(shape)[:80]} is not a list of non-negative integers", name)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_usize(o) for o in offsets):
            raise self._bad(f"data_offsets {json.dumps(offsets)[:80]} is not a pair of non-negative integers",
                            name)
        numel = 1
        for s in shape:
            numel *= s
            if numel > _USIZE_MAX:
                raise self._bad(f"shape {shape} overflows a 64-bit size", name)
        if numel * dtype.itemsize > _USIZE_MAX:
            raise self._bad(f"shape {shape} overflows a 64-bit size", name)
        return TensorInfo(name, tuple(shape), dtype, self.path), (offsets[0], offsets[1])

    def _check_layout(self, data_bytes: int) -> None:
        start = 0
        for name, (begin, end) in sorted(self._offsets.items(), key=lambda kv: kv[1]):
            if begin != start or end < begin:
                what = "overlaps the previous tensor" if begin < start else (
                    "leaves a gap after the previous tensor" if begin > start else "ends before it begins")
                raise self._bad(f"data_offsets [{begin}, {end}] {what} (the data so far ends at {start})", name)
            info = self.infos[name]
            if end > data_bytes:
                raise self._bad(f"data_offsets [{begin}, {end}] run past the end of the file, which holds "
                                f"{data_bytes} bytes of data (truncated, or a header that lies)", name)
            if end - begin != info.nbytes:
                raise self._bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                                f"{list(info.shape)} of {DTYPE_CODES[info.dtype]} needs {info.nbytes}", name)
            start = end
        if start != data_bytes:
            raise self._bad(f"the tensors cover {start} bytes of data but the file holds {data_bytes} after the "
                            "header (bytes no tensor owns)")

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """``name`` as stored: a copy-on-write mapping of its bytes (``compress.io.mapped``), or a positioned read
        where mapping is unavailable or the bytes are not aligned for the dtype; ``out`` (uint8, the tensor's byte
        size, e.g. a pinned staging buffer) receives a positioned read."""
        info = self.infos[name]
        begin, end = self._offsets[name]
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            with self._open_lock:  # reader threads may race to open it
                if self._fd is None:
                    self._fd, fd = fd, None
            if fd is not None:
                os.close(fd)
        pos = self._data_start + begin
        if out is None and pos % info.dtype.itemsize == 0:
            mapped = map_range(self._fd, pos, end - begin)
            if mapped is not None:
                return mapped.view(info.dtype).reshape(info.shape)
        buf = torch.empty(end - begin, dtype=torch.uint8) if out is None else out
        if buf.dtype != torch.uint8 or buf.numel() != end - begin:
            raise ValueError(f"read({name!r}): out must be {end - begin} uint8 bytes")
        view = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
        got = 0
        while got < len(view):
            k = os.preadv(self._fd, [view[got:]], pos + got)
            if k <= 0:
                raise CompressError(f"{self.path}: file is truncated while reading tensor {quote_name(name)}")
            got += k
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TorchBinFile:
    """One ``pytorch_model.bin``: loaded with ``weights_only=True``; memory-mapped when the zip format allows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": a second stderr line
                try:
                    sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    # legacy (pre-zip) torch.save files cannot be memory-mapped
                    sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own message suggests unpickling without the safety check: never pass that on
            m = re.search(r"GLOBAL (\S+)", str(e))
            named = f" (it names {quote_name(m.group(1)[:80])})" if m else ""
            raise CompressError(f"{self.path}: holds objects other than tensors{named}; refused, since loading it "
                                "could run code from the file") from None
        except Exception:  # truncated zips, foreign formats: torch's messages vary and some suggest unsafe loading
            raise CompressError(f"{self.path}: not a torch checkpoint (unreadable or corrupt)") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise CompressError(f"{self.path}: expected a state dict of tensors")
        self._sd = sd
        self.metadata: dict[str, str] = {}
        self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, self.path) for k, v in sd.items()}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._sd[name]
        if out is None:
            return t.clone()
        return out.view(t.dtype).reshape(t.shape).copy_(t)

    def close(self) -> None:
        self._sd = {}


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return TorchBinFile(path)


class Checkpoint:
    """A lazily opened checkpoint: many files, one namespace of tensors.

    ``names()``, ``info(name)`` and ``config`` never read tensor data; ``get(name)`` reads exactly one tensor.
    """

    def __init__(self, path: str | os.PathLike, files: list[Path], root: Path | None):
        self.path = Path(path)
        self.root = root  # the folder holding config.json / tokenizer files, if any
        self._files = [_open_file(f) for f in files]
        self._where: dict[str, object] = {}
        self.read_ahead = None  # a ``compress.io.prefetch.ReadAhead`` serving ``get`` while a pass walks
        for f in self._files:
            for name in f.infos:
                if name in self._where:
                    raise CompressError(f"{self.path}: tensor '{name}' appears in two files")
                self._where[name] = f

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._where)} tensors)"

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._where[name].infos[name]
        except KeyError:
            raise CompressError(f"{self.path}: no tensor named '{name}'") from None

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (safetensors only)."""
        return dict(self._files[0].metadata) if self._files else {}

    @property
    def nbytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._where)

    @property
    def numel(self) -> int:
        return sum(self.info(n).numel for n in self._where)

    @property
    def config(self) -> dict | None:
        from compress.io.files import read_model_config

        return None if self.root is None else read_model_config(self.root)

    def get(self, name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
            check_finite: bool = True) -> torch.Tensor:
        """Read one tensor; float tensors are checked for NaN/Inf (bad input everywhere in this toolkit)."""
        f = self._where.get(name)
        if f is None:
            raise CompressError(f"{self.path}: no tensor named '{name}'")
        t = self.read_ahead.take((id(self), name)) if self.read_ahead is not None else None
        if t is None:
            t = f.read(name)
        if device is not None:
            t = t.to(device)
        if check_finite and t.is_floating_point() and not all_finite(t):
            raise CompressError(f"{f.path}: tensor '{name}' contains NaN or Inf")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    def read_job(self, name: str, staging=None):
        """A function that reads ``name`` as stored, unchecked (inputs are checked through what they make), for a
        ``ReadAhead``; with ``staging`` (``compress.io.prefetch.Staging``) through a pinned buffer onto its device."""
        f = self._where.get(name)
        if f is None:
            raise CompressError(f"{self.path}: no tensor named '{name}'")
        if staging is None:
            return lambda: f.read(name)
        info = f.infos[name]

        def read_into(buf: torch.Tensor) -> torch.Tensor:
            return f.read(name, out=buf).view(info.dtype).reshape(info.shape)

        return lambda: staging.load(info.nbytes, read_into)

    def close(self) -> None:
        for f in self._files:
            f.close()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A sum is NaN or Inf whenever an entry is, and costs a fraction of ``isfinite``; only
    a sum that overflows (huge but finite entries) falls back to the entry-by-entry check."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CompressError(f"{index}: not a valid shard index ({e})") from None
    files = []
    for fname in dict.fromkeys(weight_map.values()):
        f = index.parent / fname
        if not f.is_file():
            raise CompressError(f"{index}: shard '{fname}' listed in the index is missing")
        files.append(f)
    return files


def is_peft_adapter(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file()


def resolve_weight_files(path: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The weight files a path stands for, and the folder holding its config (None for a bare file)."""
    p = Path(path)
    if not p.exists():
        raise CompressError(f"{p}: no such file or folder")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _files_from_index(p), p.parent
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            root = p.parent if (p.parent / "config.json").is_file() else None
            return [p], root
        raise CompressError(f"{p}: not a checkpoint file (expected .safetensors, .bin or .index.json)")
    if is_peft_adapter(p):
        raise CompressError(
            f"{p}: is a PEFT adapter folder, not a full checkpoint; pass it where a fine-tuned model or adapter "
            "is expected, together with its base model")
    for fname in WEIGHT_FILES:
        f = p / fname
        if f.is_file():
            files = _files_from_index(f) if fname.endswith(".index.json") else [f]
            return files, p
    loose = sorted(p.glob("*.safetensors"))
    if len(loose) == 1:
        return loose, p
    if len(loose) > 1:
        raise CompressError(f"{p}: {len(loose)} safetensors files but no model.safetensors.index.json to join them")
    raise CompressError(f"{p}: folder holds no model weights (no *.safetensors or pytorch_model.bin)")


def check_weight_files(path: str | os.PathLike) -> None:
    """Validate a model folder's weight files (headers only) before a loader that trusts them, such as
    ``from_pretrained``, which answers a truncated or overlapping file with a traceback."""
    open_checkpoint(path).close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily: nothing but headers is read until ``get``."""
    files, root = resolve_weight_files(path)
    return Checkpoint(path, files, root)
