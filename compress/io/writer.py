"""Streaming, atomic output: sharded safetensors written tensor by tensor, folders renamed into place at the end.

Memory: a tensor's bytes go to the shard's data file as soon as it is added; the header (which safetensors puts
first) is written when the shard closes and the data is copied behind it in chunks. Nothing holds a whole shard.

Atomicity (DESIGN principle 6): everything is written into a hidden temporary folder (or file) beside the target
and renamed into place only when complete; on any error the temporary is removed, so a crash never leaves half a
model where a model is expected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Iterator

import torch

from compress.errors import CompressError
from compress.io.reader import DTYPE_CODES

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


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out`` cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CompressError(f"{out}: already exists; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CompressError(f"{out}: cannot write here ({parent} is not a writable folder)")
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


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
            self._data.write(b"\0" * (8 + self.reserve))
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise CompressError(f"tensor '{name}' written twice to {self.path.name}")
        code = DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise CompressError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        data = _tensor_bytes(tensor)
        self._data.write(data)
        self._header[name] = {"dtype": code, "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + len(data)]}
        self.nbytes += len(data)

    def close(self) -> None:
        self._data.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
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
        self._data.close()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` when the block ends without error."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise CompressError(f"{out}: cannot write here ({e.strerror})") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; move it to ``out`` when the block ends without error."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise CompressError(f"{out}: cannot write here ({e.strerror})") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        for p in (tmp, tmp.with_name(tmp.name + ".data")):
            if p.exists():
                p.unlink()
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

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._current is None or (self._current.nbytes and self._current.nbytes + size > self.shard_size):
            self._roll()
        self._current.add(name, tensor)
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
