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

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

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


def write_sparse(model_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 metadata: dict | None = None, quiet: bool | None = None) -> SparseSummary:
    """Read a (pruned) Hugging Face folder tensor by tensor and write its sparse file to ``out``, atomically."""
    from compress.io.writer import SafetensorsStreamWriter, atomic_file
    from compress.progress import track

    model_dir = Path(model_dir)
    folder = model_dir if model_dir.is_dir() else model_dir.parent
    table: dict[str, dict] = {}
    params = nonzero = sp_params = sp_file = sp_dense = 0
    meta = {"compress.format": FORMAT, "compress.kind": KIND, "source": str(model_dir),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    with open_checkpoint(model_dir) as ck, atomic_file(out, overwrite) as tmp:
        aux = [a for a in AUX_FILES if (folder / a).is_file()]
        writer = SafetensorsStreamWriter(tmp, reserve=_header_size(ck, folder, aux, meta, quiet))
        try:
            for name in track(ck.names(), "sparse file", quiet=quiet):
                t = ck.get(name)  # an Inf read here is the input's: named as such, not as an overflow
                entries, row = encode_sparse(name, t)
                for k, v in entries.items():
                    writer.add(k, v)
                table[name] = row
                numel = t.numel()
                params += numel
                nonzero += row.get("nnz", numel)
                if row["encoding"] not in ("dense", "full"):
                    sp_params += numel
                    sp_dense += numel * t.element_size()
                    sp_file += sum(v.numel() * v.element_size() for v in entries.values())
            for a in aux:
                writer.add(AUX_PREFIX + a, torch.frombuffer(bytearray((folder / a).read_bytes()), dtype=torch.uint8))
            writer.metadata.update(meta)
            writer.metadata["tensors"] = json.dumps(table, separators=(",", ":"))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        dense = sum(math.prod(r["shape"]) * SAFETENSORS_DTYPES[r["dtype"]].itemsize for r in table.values())
        size = tmp.stat().st_size
    return SparseSummary(Path(out), len(table), params, nonzero, size, dense, sp_params, sp_file, sp_dense)


def _header_size(ck, folder: Path, aux: list[str], meta: dict[str, str], quiet) -> int:
    """The exact header of the sparse file: a first pass encodes every tensor and keeps only the sizes. Encoding
    twice costs less than writing twice, and leaves the file as small as the size budgets of
    ``compress.strategy.project`` count on (a reserve with room to spare would pad it)."""
    from compress.io.writer import HeaderSizer
    from compress.progress import track

    sizer, table = HeaderSizer("sparse file"), {}
    for name in track(ck.names(), "sparse file (sizes)", quiet=quiet):
        entries, table[name] = encode_sparse(name, ck.get(name))
        for k, v in entries.items():
            sizer.add(k, v.to("meta"))
        del entries
    for a in aux:
        sizer.add(AUX_PREFIX + a, torch.empty((folder / a).stat().st_size, dtype=torch.uint8, device="meta"))
    sizer.metadata.update(meta)
    sizer.metadata["tensors"] = json.dumps(table, separators=(",", ":"))
    return sizer.size()


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
