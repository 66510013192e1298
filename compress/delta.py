"""Task vectors stored small: ``extract_delta`` writes a compact delta file (the kept entries of τ = θ_ft − θ_base
at a density, exact at every kept entry) and ``apply_delta`` rebuilds the fine-tuned folder from the base and one.

The file format, its pure encoders and decoders and the lazy reader (``DeltaFile``) live in
``compress.io.deltafile``; this module is the stage that walks checkpoints to write and apply them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.io.deltafile import FORMAT, DeltaFile, encode_tensor, gather_kept, header_reserve, reconstruct
from compress.io.prefetch import walk
from compress.io.reader import DTYPE_CODES, SAFETENSORS_DTYPES, Checkpoint, quote_name
from compress.runtime import compute_dtype
from compress.sparsify import sparsify
from compress.taskvec import CheckpointDelta, TaskVector


# -- files --------------------------------------------------------------------------------------------
@dataclass
class DeltaSummary:
    path: Path
    tensors: int
    params: int
    kept: int
    fixups: int
    carried: int
    file_bytes: int
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / max(self.params, 1)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds else 0.0


@dataclass
class SparseDelta:
    """One tensor for ``write_delta``: the dense delta (only entries under ``mask`` are stored), the base tensor,
    and what ``apply`` must give at kept entries (``target``; default ``reconstruct(base, delta, out_dtype)``)."""

    name: str
    base: torch.Tensor
    delta: torch.Tensor
    mask: torch.Tensor
    out_dtype: torch.dtype
    target: torch.Tensor | None = None


def write_delta(out: str | os.PathLike, items, *, metadata: dict[str, str], value_dtype: torch.dtype | None = None,
                overwrite: bool = False, plan: list[tuple[str, tuple[int, ...], bool]] | None = None) -> DeltaSummary:
    """Write a delta file (atomically) from a stream of ``SparseDelta`` or ``(name, tensor)`` pairs (tensors stored
    whole). The one writer loop behind ``extract_delta`` and NPS (``compress.search``). ``plan`` ((name, shape,
    carried whole) of every item to come) reserves the header's room, so that each byte is written once."""
    from compress.io.writer import SafetensorsStreamWriter, atomic_file

    table: dict[str, dict] = {}
    kept = params = fixups = carried = 0
    meta = {"compress.format": FORMAT, **metadata}
    reserve = header_reserve(plan, meta) if plan is not None else 0
    with atomic_file(out, overwrite) as tmp:
        writer = SafetensorsStreamWriter(tmp, reserve=reserve)
        try:
            for item in items:
                if not isinstance(item, SparseDelta):
                    name, full = item
                    writer.add(f"{name}::full", full)
                    table[name] = {"shape": list(full.shape), "dtype": DTYPE_CODES[full.dtype], "encoding": "full"}
                    carried += 1
                    continue
                target = item.target if item.target is not None else reconstruct(item.base, item.delta,
                                                                                  item.out_dtype)
                vdt = value_dtype or item.out_dtype
                name, shape = item.name, tuple(item.delta.shape)
                idx, values, bk, tk = gather_kept(item.delta, item.mask, item.base, target, vdt)
                del item, target  # only kept entries live on while encoding
                entries, row = encode_tensor(name, shape, idx, values, bk, tk, exact=vdt == tk.dtype)
                del idx, values, bk, tk
                for k, v in entries.items():
                    writer.add(k, v)
                table[name] = row
                kept += row["nnz"]
                params += math.prod(row["shape"])
                fixups += row["fixups"]
            writer.metadata.update(meta)
            writer.metadata["tensors"] = json.dumps(table, separators=(",", ":"))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return DeltaSummary(Path(out), len(table), params, kept, fixups, carried, os.path.getsize(out))


def extract_delta(base: Checkpoint, tv: TaskVector, out: str | os.PathLike, *, density: float = 1.0,
                  method: str = "magnitude", seed: int = 0, value_dtype: torch.dtype | None = None,
                  device: str = "cpu", overwrite: bool = False, quiet: bool | None = None,
                  extra_metadata: dict[str, str] | None = None) -> DeltaSummary:
    """Sparsify ``tv`` tensor by tensor and write the kept entries to ``out`` (atomically)."""
    from compress.progress import track

    single = tv.terms[0][1] if len(tv.terms) == 1 else None
    exact_ft = single.ft if isinstance(single, CheckpointDelta) and tv.terms[0][0] == 1.0 else None
    carried = tv.carried()
    meta = {"base": str(base.path), "method": method, "density": repr(density), "seed": str(seed),
            **(extra_metadata or {})}

    def item(name: str) -> SparseDelta:
        # a function, not the generator's body: its locals die on return, so while write_delta encodes the kept
        # entries it holds the only reference to the full tensors and can drop them
        b = base.get(name, device=device)
        out_dtype = tv.info(name).dtype
        if exact_ft is not None:
            # read each input once: τ from the same tensors the exactness check compares against
            target = exact_ft.get(name, device=device)
            ct = compute_dtype(b.dtype, target.dtype)
            d = target.to(ct) - b.to(ct)
        else:
            d = tv.get(name, device=device)
            target = reconstruct(b, d, out_dtype)
        return SparseDelta(name, b, d, sparsify(d, density, method, seed=seed, name=name), out_dtype, target)

    names = tv.names() + list(carried)

    def sources(name: str) -> list[Checkpoint]:  # what ``item`` reads with ``get``, read ahead
        return [] if name in carried else [base] + ([exact_ft] if exact_ft is not None else [])

    def items():
        for name in track(walk(names, sources, device=device), "extract", total=len(names), quiet=quiet):
            yield (name, carried[name].full(name)) if name in carried else item(name)

    plan = [(n, tuple((carried[n] if n in carried else tv).info(n).shape), n in carried) for n in names]
    start = time.perf_counter()
    s = write_delta(out, items(), metadata=meta, value_dtype=value_dtype, overwrite=overwrite, plan=plan)
    s.seconds = time.perf_counter() - start
    ft_bytes = sum((carried[n] if n in carried else tv).info(n).nbytes for n in names)
    s.bytes_read = ft_bytes + sum(base.info(n).nbytes for n in tv.names() if n in base)
    return s


def apply_delta(base: Checkpoint, delta: DeltaFile, out: str | os.PathLike, *, device: str = "cpu",
                dtype: torch.dtype | None = None, shard_size: int | str = "5GB", overwrite: bool = False,
                aux_from: str | os.PathLike | None = None, quiet: bool | None = None) -> Path:
    """Rebuild the fine-tuned model from ``base`` and a delta file as a Hugging Face folder."""
    from compress.io.writer import write_folder
    from compress.progress import track

    for name, row in delta.table.items():
        if row["encoding"] != "full":
            if name not in base:
                raise CompressError(f"{delta.path}: tensor {quote_name(name)} is not in the base {base.path}; "
                                    "is this the base the delta was extracted from?")
            info = base.info(name)
            if tuple(info.shape) != tuple(row["shape"]):
                raise CompressError(f"{delta.path}: tensor {quote_name(name)} has shape {row['shape']} but "
                                    f"{list(info.shape)} in the base {base.path}")
            if info.is_float != SAFETENSORS_DTYPES[row["dtype"]].is_floating_point:
                raise CompressError(f"{delta.path}: tensor {quote_name(name)} is {row['dtype']} in the delta but "
                                    f"{DTYPE_CODES.get(info.dtype, info.dtype)} in the base {base.path}; a delta "
                                    "only applies between float tensors")
    order = [n for n in delta.table] + [n for n in base.names() if n not in delta.table]

    def sources(name: str) -> list[Checkpoint]:  # the base tensors ``tensors`` reads, read ahead
        return [] if delta.table.get(name, {}).get("encoding") == "full" else [base]

    def tensors():
        for name in track(walk(order, sources, device=device), "apply", total=len(order), quiet=quiet):
            if name not in delta.table:
                # in the base only: extract refuses that case, but a delta written by another tool may omit it
                t = base.get(name, device=device)
            elif delta.table[name]["encoding"] == "full":
                t = delta.full(name, device=device)
            else:
                t = delta.rebuild(name, base.get(name, device=device))
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    card = {"title": "Model rebuilt from a compact delta", "method": "compress apply",
            "inputs": {"base": str(base.path), "delta": str(delta.path)},
            "params": {k: delta.metadata.get(k) for k in ("finetuned", "method", "density", "seed")}}
    return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(order), shard_size=shard_size,
                        aux_from=aux_from if aux_from is not None else base.root, card=card)
