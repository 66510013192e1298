"""Lazy checkpoint reading: list names, shapes and dtypes without touching data; read one tensor at a time.

Accepted inputs (the layouts Hugging Face writes):
  * a folder with ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or a
    sharded ``pytorch_model.bin.index.json`` (or any single ``*.safetensors`` file);
  * a single ``.safetensors`` file, an ``*.index.json`` file, or a ``.bin`` file.

safetensors files are read with our own header parser and positioned reads rather than ``safe_open``:
``safe_open`` memory-maps the whole file, and every page a pass touches stays resident (and counted in RSS) until
the file is closed, so walking a 1 GB checkpoint would look like holding 1 GB. Positioned reads keep the
footprint at the tensor being read. ``.bin`` files are loaded with ``weights_only=True`` (never arbitrary
pickles) and ``mmap=True`` where the file format allows it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError

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


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed once, tensors read with positioned reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CompressError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > 100 * 2**20 or n > os.path.getsize(self.path):
                    raise CompressError(f"{self.path}: not a safetensors file (bad header length {n})")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CompressError(f"{self.path}: cannot read safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, h in header.items():
            dtype = SAFETENSORS_DTYPES.get(h["dtype"])
            if dtype is None:
                raise CompressError(f"{self.path}: tensor '{name}' has unsupported dtype {h['dtype']}")
            self.infos[name] = TensorInfo(name, tuple(h["shape"]), dtype, self.path)
            self._offsets[name] = tuple(h["data_offsets"])
        self._fd: int | None = None

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        begin, end = self._offsets[name]
        if end - begin != info.nbytes:
            raise CompressError(f"{self.path}: tensor '{name}' has {end - begin} bytes, expected {info.nbytes}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
        got, pos = 0, self._data_start + begin
        while got < len(view):
            k = os.preadv(self._fd, [view[got:]], pos + got)
            if k <= 0:
                raise CompressError(f"{self.path}: file is truncated while reading tensor '{name}'")
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
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # legacy (pre-zip) torch.save files cannot be memory-mapped
                sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; all mean the same to the user
            raise CompressError(f"{self.path}: cannot load as a weights-only torch checkpoint ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CompressError(f"{self.path}: expected a state dict of tensors")
        self._sd = sd
        self.metadata: dict[str, str] = {}
        self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, self.path) for k, v in sd.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._sd[name].clone()

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
        from compress.config import read_model_config

        return None if self.root is None else read_model_config(self.root)

    def get(self, name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
            check_finite: bool = True) -> torch.Tensor:
        """Read one tensor; float tensors are checked for NaN/Inf (bad input everywhere in this toolkit)."""
        f = self._where.get(name)
        if f is None:
            raise CompressError(f"{self.path}: no tensor named '{name}'")
        t = f.read(name)
        if device is not None:
            t = t.to(device)
        if check_finite and t.is_floating_point() and not all_finite(t):
            raise CompressError(f"{f.path}: tensor '{name}' contains NaN or Inf")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

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


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily: nothing but headers is read until ``get``."""
    files, root = resolve_weight_files(path)
    return Checkpoint(path, files, root)
