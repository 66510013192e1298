"""What a file holds: tensors, parameter count, density, bits per parameter and size against dense.

Works on compact delta files, checkpoints (folder, safetensors, index, .bin) and PEFT adapter folders.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from compress.errors import CompressError
from compress.io.files import read_model_config
from compress.io.reader import SAFETENSORS_DTYPES, is_peft_adapter, open_checkpoint, resolve_weight_files


def _file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    files, _ = resolve_weight_files(path)
    return sum(f.stat().st_size for f in files)


def inspect_delta(path: Path) -> dict:
    from compress.io.deltafile import DeltaFile

    d = DeltaFile(path)
    rows, params, kept, dense_bytes, stored = [], 0, 0, 0, 0
    for name, r in d.table.items():
        numel = math.prod(r["shape"])
        nbytes = d.stored_bytes(name)
        itemsize = SAFETENSORS_DTYPES[r["dtype"]].itemsize
        if r["encoding"] != "full":
            params += numel
            kept += r["nnz"]
            dense_bytes += numel * itemsize
            stored += nbytes
        rows.append({"name": name, "shape": r["shape"], "dtype": r["dtype"], "encoding": r["encoding"],
                     "density": (r["nnz"] / numel if numel else 1.0) if r["encoding"] != "full" else 1.0,
                     "bytes": nbytes, "bits_per_param": 8 * nbytes / max(numel, 1)})
    aux = [{"name": k, "shape": [d.aux_bytes(k)], "dtype": "U8", "encoding": "aux", "density": 1.0,
            "bytes": d.aux_bytes(k), "bits_per_param": 8.0} for k in d.aux_entries()]
    size = path.stat().st_size
    d.close()
    if d.metadata.get("compress.kind") == "sparse":
        return _sparse_summary(path, d, rows, aux, size)
    return {"kind": "delta", "path": str(path), "metadata": {k: v for k, v in d.metadata.items() if k != "tensors"},
            "tensors": rows, "aux": aux, "params": params, "kept": kept, "density": kept / max(params, 1),
            "file_bytes": size, "dense_bytes": dense_bytes, "delta_bytes": stored,
            "bits_per_param": 8 * size / max(params, 1), "compression": dense_bytes / max(size, 1)}


def _sparse_summary(path: Path, d, rows: list[dict], aux: list[dict], size: int) -> dict:
    """A sparse weight file: every tensor counts; pruned tensors (those stored with positions) also on their own."""
    params = sum(math.prod(r["shape"]) for r in rows)
    dense = sum(math.prod(r["shape"]) * SAFETENSORS_DTYPES[r["dtype"]].itemsize for r in rows)
    pruned = [r for r in rows if r["encoding"] in ("mask", "gaps", "nm24")]
    p_dense = sum(math.prod(r["shape"]) * SAFETENSORS_DTYPES[r["dtype"]].itemsize for r in pruned)
    p_bytes = sum(r["bytes"] for r in pruned)
    nonzero = sum(round(r["density"] * math.prod(r["shape"])) for r in rows)
    return {"kind": "sparse", "path": str(path),
            "metadata": {k: v for k, v in d.metadata.items() if k != "tensors"}, "tensors": rows, "aux": aux,
            "params": params, "kept": nonzero, "density": nonzero / max(params, 1), "file_bytes": size,
            "dense_bytes": dense, "bits_per_param": 8 * size / max(params, 1), "compression": dense / max(size, 1),
            "file_vs_dense": size / max(dense, 1), "pruned_tensors": len(pruned),
            "pruned_file_bytes": p_bytes, "pruned_dense_bytes": p_dense,
            "pruned_file_vs_dense": p_bytes / max(p_dense, 1)}


def inspect_checkpoint(path: Path, count_zeros: bool = False) -> dict:
    rows, params, nonzero = [], 0, 0
    with open_checkpoint(path) as ck:
        for name in ck.names():
            info = ck.info(name)
            row = {"name": name, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."),
                   "bytes": info.nbytes}
            if count_zeros:
                nz = int(ck.get(name, check_finite=False).count_nonzero())
                row["density"] = nz / max(info.numel, 1)
                nonzero += nz
            rows.append(row)
            params += info.numel
        dense = ck.nbytes
    out = {"kind": "checkpoint", "path": str(path), "tensors": rows, "params": params, "dense_bytes": dense,
           "file_bytes": _file_bytes(path), "bits_per_param": 8 * _file_bytes(path) / max(params, 1)}
    if count_zeros:
        out["density"] = nonzero / max(params, 1)
    return out


def inspect_adapter(path: Path) -> dict:
    cfg = read_model_config(path, "adapter_config.json")
    weights = next((path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).is_file()),
                   None)
    if weights is None:
        raise CompressError(f"{path}: adapter folder has no adapter_model.safetensors or adapter_model.bin")
    with open_checkpoint(weights) as ck:
        rows = [{"name": n, "shape": list(ck.info(n).shape), "dtype": str(ck.info(n).dtype).removeprefix("torch."),
                 "bytes": ck.info(n).nbytes} for n in ck.names()]
        params = ck.numel
    return {"kind": "adapter", "path": str(path), "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
            "base_model": cfg.get("base_model_name_or_path"), "tensors": rows, "params": params,
            "file_bytes": weights.stat().st_size}


def inspect_path(path: str | os.PathLike, count_zeros: bool = False) -> dict:
    p = Path(path)
    if not p.exists():
        raise CompressError(f"{p}: no such file or folder")
    if is_peft_adapter(p):
        return inspect_adapter(p)
    if p.is_file() and p.suffix == ".safetensors":
        from compress.io.reader import SafetensorsFile

        if SafetensorsFile(p).metadata.get("compress.format"):
            return inspect_delta(p)
    return inspect_checkpoint(p, count_zeros)
