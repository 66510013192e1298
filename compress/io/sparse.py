"""Sparse weight files: a pruned model stored as its nonzero values plus where they sit, in one file.

A pruned Hugging Face folder is as large as the dense model; this file is what makes pruning save space. It is a
compact delta file (``compress.delta``, format ``delta/1``) against an all-zero base, marked
``compress.kind = sparse``, so the same encoders, readers and ``compress inspect`` serve both:

* each tensor is stored in the smallest of: dense values; values + packed bitmask (1 bit per parameter);
  values + varint gaps (very sparse tensors); values + 2:4 pair codes (0.67 bits per parameter, for 2:4 patterns);
* the folder's config, generation config and tokenizer files ride along as ``__aux__::<file>`` uint8 tensors, so
  ``compress apply --delta FILE --out DIR`` rebuilds a loadable folder from the file alone.

Values are the weights themselves, so the rebuild is bit-exact (every zero, including -0.0, comes back as +0.0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from compress.errors import CompressError
from compress.io.deltafile import FORMAT, DeltaFile, encode_gaps, encode_nm24, nm24_fill, pack_mask
from compress.io.reader import DTYPE_CODES, SAFETENSORS_DTYPES, open_checkpoint
from compress.io.writer import AUX_FILES, AUX_PREFIX, aux_entry_name

KIND = "sparse"


def encode_sparse(name: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """One weight's entries (values + the cheapest position encoding) and its table row. Pure; no file access."""
    flat = t.reshape(-1)
    numel, itemsize = flat.numel(), flat.element_size()
    row = {"shape": list(t.shape), "dtype": DTYPE_CODES[t.dtype], "fixups": 0}
    if not t.is_floating_point():
        return {f"{name}::full": t.cpu()}, {**row, "encoding": "full"}
    mask = flat != 0
    nnz = int(mask.count_nonzero())
    options = {"dense": numel * itemsize}
    if nnz < numel:
        options["mask"] = nnz * itemsize + math.ceil(numel / 8)
        if numel % 4 == 0:
            nm = nm24_fill(mask)
            if nm is not None:
                options["nm24"] = numel // 2 * itemsize + math.ceil(numel / 12)
        if 8 * nnz < numel:  # varints take ≥ 1 byte per kept entry: only worth encoding when the bitmask is larger
            gaps = encode_gaps(torch.nonzero(mask).reshape(-1).cpu())
            options["gaps"] = nnz * itemsize + gaps.numel()
    encoding = min(options, key=options.get)
    if encoding == "dense":
        return {f"{name}::values": flat.cpu()}, {**row, "encoding": "dense", "nnz": numel}
    if encoding == "nm24":
        mask = nm
        pos = encode_nm24(mask)
    elif encoding == "mask":
        pos = pack_mask(mask.cpu())
    else:
        pos = gaps
    values = flat[mask].cpu()
    return {f"{name}::values": values, f"{name}::{encoding}": pos}, {**row, "encoding": encoding,
                                                                       "nnz": values.numel()}


@dataclass
class SparseSummary:
    path: Path
    tensors: int
    params: int
    nonzero: int
    file_bytes: int
    dense_bytes: int          # the same tensors stored dense (what model.safetensors holds, header aside)
    sparse_params: int        # parameters of tensors that have zeros (the pruned ones)
    sparse_file_bytes: int    # bytes the file spends on those tensors
    sparse_dense_bytes: int   # their dense bytes

    @property
    def ratio(self) -> float:
        return self.file_bytes / max(self.dense_bytes, 1)

    @property
    def pruned_ratio(self) -> float:
        return self.sparse_file_bytes / max(self.sparse_dense_bytes, 1)


# what an auxiliary file is taken to weigh at most when the header room is sized before it is read (a config
# rewritten to name the dtype written is only known at the end); one larger only costs a copy at ``close``
AUX_ROOM = 10**10


def header_room(plan: Sequence[tuple[str, Sequence[int], torch.dtype]], aux: Sequence[str],
                metadata: Mapping[str, str]) -> int:
    """An upper bound on the header of the sparse file of ``plan`` ((name, shape, dtype) of each tensor, in the
    order written), the auxiliary files ``aux`` and ``metadata``, from those alone: every float tensor counted in
    its widest form (values of all its entries, a position code of ⌈numel/8⌉ bytes, which no encoding
    ``encode_sparse`` picks exceeds, and a table row "dense" with nnz = numel). Each real entry's name, shape and
    offsets are then no longer than their stand-ins'. Depending on nothing but its arguments, the bound is the
    same whether the tensors come from a folder or from ``compress prune`` as each block is done."""
    from compress.io.writer import HeaderSizer

    sizer, table = HeaderSizer("sparse file"), {}
    for name, shape, dtype in plan:
        numel = math.prod(shape)
        row = {"shape": list(shape), "dtype": DTYPE_CODES[dtype], "fixups": 0}
        if dtype.is_floating_point:
            sizer.add(f"{name}::values", torch.empty(numel, dtype=dtype, device="meta"))
            sizer.add(f"{name}::mask", torch.empty(math.ceil(numel / 8), dtype=torch.uint8, device="meta"))
            table[name] = {**row, "encoding": "dense", "nnz": numel}
        else:
            sizer.add(f"{name}::full", torch.empty(tuple(shape), dtype=dtype, device="meta"))
            table[name] = {**row, "encoding": "full"}
    for a in aux:
        sizer.add(AUX_PREFIX + a, torch.empty(AUX_ROOM, dtype=torch.uint8, device="meta"))
    sizer.metadata.update(metadata)
    sizer.metadata["tensors"] = json.dumps(table, separators=(",", ":"))
    return sizer.size()


class SparseWriter:
    """A sparse weight file written tensor by tensor, holding none: each tensor is encoded once and written at
    once behind a header room sized from the plan (``header_room``), so each byte is written once. The tensors
    must come in the plan's order, then the auxiliary files; writers given the same plan and metadata write the
    same bytes. Use inside ``atomic_file``; ``close``, or ``abort`` on any error."""

    def __init__(self, path: str | os.PathLike, plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 aux: Sequence[str] = (), metadata: Mapping[str, object] | None = None):
        """``metadata``: values ``close`` may still replace must be given here at their final length (the room
        counts them)."""
        from compress.io.writer import SafetensorsStreamWriter

        self.metadata = {"compress.format": FORMAT, "compress.kind": KIND,
                         **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self._writer = SafetensorsStreamWriter(path, reserve=header_room(plan, aux, self.metadata))
        self.table: dict[str, dict] = {}
        self.params = self.nonzero = self.sparse_params = self.sparse_file_bytes = self.sparse_dense_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        entries, row = encode_sparse(name, t)
        for k, v in entries.items():
            self._writer.add(k, v)
        self.table[name] = row
        numel = t.numel()
        self.params += numel
        self.nonzero += row.get("nnz", numel)
        if row["encoding"] not in ("dense", "full"):
            self.sparse_params += numel
            self.sparse_dense_bytes += numel * t.element_size()
            self.sparse_file_bytes += sum(v.numel() * v.element_size() for v in entries.values())

    def add_aux(self, name: str, data: bytes) -> None:
        """An auxiliary file (``AUX_FILES``) as its ``__aux__::`` entry."""
        self._writer.add(AUX_PREFIX + name, torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def close(self, metadata: Mapping[str, object] | None = None) -> SparseSummary:
        """Write the header (``metadata`` updates the one given at the start); the summary names the file
        written (the temporary, inside ``atomic_file``)."""
        w = self._writer
        w.metadata.update(self.metadata)
        w.metadata.update({str(k): str(v) for k, v in (metadata or {}).items()})
        w.metadata["tensors"] = json.dumps(self.table, separators=(",", ":"))
        w.close()
        dense = sum(math.prod(r["shape"]) * SAFETENSORS_DTYPES[r["dtype"]].itemsize for r in self.table.values())
        return SparseSummary(w.path, len(self.table), self.params, self.nonzero, w.path.stat().st_size, dense,
                             self.sparse_params, self.sparse_file_bytes, self.sparse_dense_bytes)

    def abort(self) -> None:
        self._writer.abort()


def present_aux(folder: Path) -> list[str]:
    """The ``AUX_FILES`` present in ``folder``, in the order a sparse file carries them."""
    return [a for a in AUX_FILES if (folder / a).is_file()]


def write_sparse(model_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 metadata: dict | None = None, quiet: bool | None = None) -> SparseSummary:
    """Read a (pruned) Hugging Face folder tensor by tensor and write its sparse file to ``out``, atomically."""
    from compress.io.writer import atomic_file
    from compress.progress import track

    model_dir = Path(model_dir)
    folder = model_dir if model_dir.is_dir() else model_dir.parent
    with open_checkpoint(model_dir) as ck, atomic_file(out, overwrite) as tmp:
        aux = present_aux(folder)
        plan = [(n, ck.info(n).shape, ck.info(n).dtype) for n in ck.names()]
        writer = SparseWriter(tmp, plan, aux, {"source": str(model_dir), **(metadata or {})})
        try:
            for name in track(ck.names(), "sparse file", quiet=quiet):
                writer.add(name, ck.get(name))  # an Inf read here is the input's: named as such, not as an overflow
            for a in aux:
                writer.add_aux(a, (folder / a).read_bytes())
        except BaseException:
            writer.abort()
            raise
        s = writer.close()
    return dataclasses.replace(s, path=Path(out))


def is_sparse_file(delta: DeltaFile) -> bool:
    return delta.metadata.get("compress.kind") == KIND


def _check_room(delta: DeltaFile, rows: list, out: str | os.PathLike, dtype: torch.dtype | None) -> None:
    """A sparse file's table names the dense shapes, which a small hostile file can make enormous (a decompression
    bomb): the dense size is checked against the free space where the output goes before anything is allocated."""
    import shutil

    def itemsize(code: str) -> int:
        stored = SAFETENSORS_DTYPES[code]
        return (dtype or stored).itemsize if stored.is_floating_point else stored.itemsize

    dense = sum(math.prod(r["shape"]) * itemsize(r["dtype"]) for _, r in rows)
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if dense > free:
        raise CompressError(f"{delta.path}: its tensors rebuild to {dense / 1e9:,.1f} GB but {parent} has "
                            f"{free / 1e9:,.1f} GB free; nothing was written")


def apply_sparse(delta: DeltaFile, out: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 shard_size: int | str = "5GB", overwrite: bool = False, aux_from: str | os.PathLike | None = None,
                 quiet: bool | None = None) -> Path:
    """Rebuild the dense Hugging Face folder a sparse file was written from (no base needed)."""
    from compress.io.writer import write_folder
    from compress.progress import track

    if not is_sparse_file(delta):
        raise CompressError(f"{delta.path}: a task-vector delta file needs --base (only sparse weight files, "
                            "written by `compress prune`, rebuild on their own)")
    rows = list(delta.table.items())
    _check_room(delta, rows, out, dtype)
    # the names are checked before any tensor is written: a hostile entry leaves nothing behind, not even work
    files = {} if aux_from is not None else {aux_entry_name(key, delta.path): delta._file.read(key).numpy().tobytes()
                                             for key in delta.aux_entries()}

    def tensors():
        for name, row in track(rows, "apply", quiet=quiet):
            if row["encoding"] == "full":
                t = delta.full(name, device=device)
            else:
                t = delta.decode(name, device=device, dtype=SAFETENSORS_DTYPES[row["dtype"]])
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(rows), shard_size=shard_size,
                        aux_from=aux_from, files=files, card={"title": "Model rebuilt from a sparse weight file",
                                                              "method": "compress apply",
                                                              "inputs": {"sparse file": str(delta.path)}})
