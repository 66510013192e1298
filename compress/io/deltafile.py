"""Compact delta files: only the kept entries of a task vector, plus where they sit.

Format (a plain safetensors file, readable by any safetensors reader):

* ``<name>::values`` — kept entries in index order, in the value dtype (by default the fine-tuned dtype);
* where the entries sit, whichever is smaller for that tensor:
  ``<name>::mask`` — a packed bitmask (1 bit per parameter, little bit order, as ``numpy.packbits(...,
  bitorder='little')``), or ``<name>::gaps`` — LEB128 varints of the gaps between kept flat indices (about
  8–12 bits per *kept* entry, so it wins below roughly 10% density), or ``<name>::nm24`` — for 2:4 sparse
  weights, the kept pair of each group of 4 as one of 6 codes, three codes a byte (0.67 bits per parameter; written
  by ``compress.io.sparse``); no index tensor when every entry is kept;
* ``<name>::fix_idx`` / ``<name>::fix_val`` — the rare kept entries where no stored value makes ``base + value``
  round back to the fine-tuned value in its own dtype (|τ| much larger than the weight), as varint gaps and exact
  values; with the one-step nudge of ``_exact_values`` this makes density 1.0 bit-for-bit lossless;
* ``<name>::full`` — tensors carried whole (non-float buffers, resized vocab, new heads; see ``tensor_rule``).

``__metadata__`` holds ``compress.format = delta/1``, the base and fine-tuned paths, method, density, seed and a
JSON table of every tensor's shape, output dtype and encoding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.io.reader import DTYPE_CODES, SAFETENSORS_DTYPES, SafetensorsFile, TensorInfo, quote_name, strict_json
from compress.runtime import compute_dtype

FORMAT = "delta/1"
# the entries one tensor may have in a delta file (``<name>::<part>``)
ENTRY_PARTS = ("values", "mask", "gaps", "nm24", "fix_idx", "fix_val", "full")
# the entries each encoding needs (fix-ups, ``fix_idx`` and ``fix_val``, come on top where the row counts any)
ENCODINGS = {"dense": ("values",), "mask": ("values", "mask"), "gaps": ("values", "gaps"),
             "nm24": ("values", "nm24"), "full": ("full",)}
VARINT_MAX_BYTES = 9  # 63 bits: more than any flat index


class EntryError(CompressError):
    """An entry's content contradicts the table; ``DeltaFile`` adds the file and tensor to the message."""


# -- pure encoders ------------------------------------------------------------------------------------
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask → uint8, 8 entries a byte, little bit order."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy(), bitorder="little"))


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    want = -(-numel // 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise EntryError(f"'mask' must be {want} uint8 bytes for {numel} entries (got {_describe(packed)})")
    bits = np.unpackbits(packed.cpu().numpy(), bitorder="little")
    if bits[numel:].any():
        raise EntryError(f"'mask' sets bits past the tensor's {numel} entries")
    return torch.from_numpy(bits[:numel].astype(bool))


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def encode_gaps(idx: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices → LEB128 varints of (gap − 1), so runs of consecutive entries cost one zero byte each."""
    gaps = np.diff(idx.cpu().numpy().astype(np.int64), prepend=-1) - 1
    gaps = gaps.astype(np.uint64)
    nbytes = np.ones(gaps.shape, dtype=np.int64)
    for k in range(1, 10):
        nbytes += gaps >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max(initial=0))):
        sel = nbytes > k
        byte = (gaps[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (byte | more).astype(np.uint8)
    return torch.from_numpy(out)


def decode_gaps(buf: torch.Tensor, numel: int | None = None, part: str = "gaps") -> torch.Tensor:
    """Inverse of ``encode_gaps``; with ``numel``, every index must fall inside a tensor of that many entries."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise EntryError(f"'{part}' must be a 1-D uint8 tensor (got {_describe(buf)})")
    b = buf.cpu().numpy().astype(np.uint64)
    if b.size == 0:
        return torch.zeros(0, dtype=torch.int64)
    last = (b & np.uint64(0x80)) == 0
    if not last[-1]:
        raise EntryError(f"'{part}' ends inside a varint (truncated)")
    ends = np.flatnonzero(last)
    if int(np.diff(ends, prepend=-1).max()) > VARINT_MAX_BYTES:
        raise EntryError(f"'{part}' holds a varint longer than {VARINT_MAX_BYTES} bytes")
    element = np.concatenate([[0], np.cumsum(last)[:-1]]).astype(np.int64)
    first_of = np.concatenate([[0], ends[:-1] + 1])
    shift = (np.arange(b.size) - first_of[element]).astype(np.uint64) * np.uint64(7)
    gaps = np.zeros(ends.size, dtype=np.uint64)
    np.add.at(gaps, element, (b & np.uint64(0x7F)) << shift)
    if numel is not None and bool((gaps >= np.uint64(numel)).any()):
        raise EntryError(f"'{part}' decodes to positions past the tensor's {numel} entries")
    idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
    # int64 wrap-around shows up as a step down, so strictly increasing and below numel means in range
    if numel is not None and (idx[-1] >= numel or bool((np.diff(idx) <= 0).any())):
        raise EntryError(f"'{part}' decodes to positions past the tensor's {numel} entries")
    return torch.from_numpy(idx.astype(np.int64))


# 2:4 positions: each group of 4 keeps one of C(4,2) = 6 pairs; three groups' codes share a byte (6³ = 216 ≤ 256),
# 0.67 bits per parameter against the bitmask's 1 (what makes a 2:4 bf16 file ≤ 57% of dense).
_NM24_PAIRS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                           dtype=torch.bool)
_NM24_CODE = torch.full((16,), -1, dtype=torch.int64)
_NM24_CODE[(_NM24_PAIRS.long() * torch.tensor([1, 2, 4, 8])).sum(1)] = torch.arange(6)


def nm24_fill(mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (flat, length a multiple of 4) widened to exactly 2 kept per group of 4, or None if a group keeps
    more. Groups keeping fewer (a pruned weight that happened to be kept at 0.0) take their lowest free slots."""
    g = mask.reshape(-1, 4)
    need = 2 - g.sum(1, keepdim=True)
    if bool((need < 0).any()):
        return None
    free_rank = torch.cumsum(~g, dim=1) - 1
    return (g | (~g & (free_rank < need))).reshape(-1)


def encode_nm24(mask: torch.Tensor) -> torch.Tensor:
    """A 2-of-4 flat mask → uint8, three groups a byte (codes c0 + 6·c1 + 36·c2)."""
    bits = (mask.reshape(-1, 4).long() * torch.tensor([1, 2, 4, 8], device=mask.device)).sum(1)
    codes = _NM24_CODE.to(mask.device)[bits]
    codes = torch.cat([codes, codes.new_zeros((-codes.numel()) % 3)]).reshape(-1, 3)
    return (codes[:, 0] + 6 * codes[:, 1] + 36 * codes[:, 2]).to(torch.uint8).cpu()


def decode_nm24(packed: torch.Tensor, numel: int) -> torch.Tensor:
    want = -(-(numel // 4) // 3)
    if numel % 4:
        raise EntryError(f"'nm24' needs a multiple of 4 entries, the tensor has {numel}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise EntryError(f"'nm24' must be {want} uint8 bytes for {numel} entries (got {_describe(packed)})")
    if packed.numel() and int(packed.max()) >= 216:
        raise EntryError("'nm24' holds a byte over 215, which codes no three groups")
    b = packed.long()
    codes = torch.stack([b % 6, (b // 6) % 6, b // 36], dim=1).reshape(-1)[: numel // 4]
    return _NM24_PAIRS[codes].reshape(-1)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so -0.0 vs 0.0 counts as a difference)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.view(ints) == b.view(ints)


def _exact_values(base: torch.Tensor, values: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nudge each rounded value by at most one step of its dtype so that ``reconstruct`` hits ``want`` bit for bit.

    Rounding τ to the value dtype can move base + τ across a rounding boundary of the output dtype; whenever
    |τ| is not much larger than the weight itself, one of the rounded value's two neighbours lands exactly.
    Returns the values and the mask of entries no neighbour fixes (stored as exact fix-ups).
    """
    bad = ~_bits_equal(reconstruct(base, values, want.dtype), want)
    if not bool(bad.any()):
        return values, bad
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    for step in (1, -1):
        cand = (values[bad].view(ints) + step).view(values.dtype)
        ok = _bits_equal(reconstruct(base[bad], cand, want.dtype), want[bad]) & torch.isfinite(cand)
        where = torch.nonzero(bad).reshape(-1)[ok]
        values[where] = cand[ok]
        bad[where] = False
    return values, bad


def reconstruct(base: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """base + delta computed in float32 (float64 for float64 outputs), rounded to ``out_dtype``."""
    ct = compute_dtype(out_dtype, base.dtype)
    return (base.to(ct) + delta.to(ct)).to(out_dtype)


def gather_kept(delta: torch.Tensor, mask: torch.Tensor, base: torch.Tensor, target: torch.Tensor,
                value_dtype: torch.dtype):
    """(flat kept indices or None when all are kept, values, base and target at those entries).

    Split from ``encode_tensor`` so the caller can drop the full tensors before encoding (peak memory).
    """
    flat_mask = mask.reshape(-1)
    if bool(flat_mask.all()):
        # no index tensor and no gathered copies; ``values`` may alias ``delta``, which is not used afterwards
        return None, delta.reshape(-1).to(value_dtype), base.reshape(-1), target.reshape(-1)
    idx = torch.nonzero(flat_mask).reshape(-1)
    return idx, delta.reshape(-1)[idx].to(value_dtype), base.reshape(-1)[idx], target.reshape(-1)[idx]


def encode_tensor(name: str, shape: tuple[int, ...], idx: torch.Tensor | None, values: torch.Tensor,
                  base: torch.Tensor, target: torch.Tensor, exact: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """One tensor's entries for the file, and its row in the metadata table, from ``gather_kept``'s output.

    ``target`` is what ``apply`` must give at kept positions (the fine-tuned values); kept entries where
    ``reconstruct`` would miss it by rounding are nudged or stored exactly as fix-ups. ``exact=False`` (values
    stored at a lower precision than the output, on request) skips that: the user asked for a lossy file.
    """
    numel = math.prod(shape)
    out: dict[str, torch.Tensor] = {}
    if idx is None:
        encoding = "dense"
    else:
        gaps = encode_gaps(idx)
        if gaps.numel() < math.ceil(numel / 8):
            encoding, out[f"{name}::gaps"] = "gaps", gaps
        else:
            del gaps
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[idx.cpu()] = True
            encoding, out[f"{name}::mask"] = "mask", pack_mask(mask)
    if exact:
        values, bad = _exact_values(base, values, target)
    else:
        bad = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    out = {f"{name}::values": values.cpu(), **out}
    nfix = int(torch.count_nonzero(bad))  # bool.sum() would first cast to int64
    if nfix:
        where = torch.nonzero(bad).reshape(-1)
        out[f"{name}::fix_idx"] = encode_gaps(where if idx is None else idx[where])
        out[f"{name}::fix_val"] = target[bad].cpu()
    row = {"shape": list(shape), "dtype": DTYPE_CODES[target.dtype], "encoding": encoding,
           "nnz": numel if idx is None else int(idx.numel()), "fixups": nfix}
    return out, row


def decode_delta(row: dict, entries: dict[str, torch.Tensor], device, dtype: torch.dtype) -> torch.Tensor:
    """The dense, flat delta of one stored tensor (zeros where dropped); fix-ups are not deltas and stay out."""
    numel = math.prod(row["shape"])
    values = entries["values"]
    if row["encoding"] == "dense":
        idx = None
    elif row["encoding"] == "mask":
        idx = torch.nonzero(unpack_mask(entries["mask"], numel)).reshape(-1)
    elif row["encoding"] == "nm24":
        idx = torch.nonzero(decode_nm24(entries["nm24"], numel)).reshape(-1)
    else:
        idx = decode_gaps(entries["gaps"], numel)
    kept = numel if idx is None else idx.numel()
    if values.dim() != 1 or values.numel() != kept:
        raise EntryError(f"'values' holds {values.numel()} entries ({_describe(values)}) but its positions "
                         f"give {kept}")
    values = values.to(device=device, dtype=dtype)
    if idx is None:
        return values
    dense = torch.zeros(numel, dtype=dtype, device=device)
    dense[idx.to(device)] = values
    return dense


def decode_tensor(row: dict, entries: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_tensor``: the tensor ``apply`` writes, exact at every kept entry."""
    shape, out_dtype = tuple(row["shape"]), SAFETENSORS_DTYPES[row["dtype"]]
    numel = math.prod(shape)
    if row["encoding"] == "full":
        full = entries["full"]
        if tuple(full.shape) != shape or full.dtype != out_dtype:
            raise EntryError(f"'full' is {_describe(full)}, the table says {row['dtype']} {list(shape)}")
        return full
    if base.numel() != numel:
        raise EntryError(f"the base has {base.numel()} entries, the table's shape {list(shape)} {numel}")
    if base.is_floating_point() != out_dtype.is_floating_point:
        raise EntryError(f"the table says {row['dtype']} but the base holds {DTYPE_CODES.get(base.dtype, base.dtype)}")
    delta = decode_delta(row, entries, base.device, compute_dtype(out_dtype, base.dtype))
    out = reconstruct(base.reshape(-1), delta, out_dtype)
    if "fix_idx" in entries:
        idx, val = decode_gaps(entries["fix_idx"], numel, "fix_idx"), entries["fix_val"]
        if val.dim() != 1 or val.numel() != idx.numel() or val.dtype != out_dtype:
            raise EntryError(f"'fix_val' is {_describe(val)} but 'fix_idx' gives {idx.numel()} positions of "
                             f"{row['dtype']}")
        out[idx.to(base.device)] = val.to(base.device)
    return out.reshape(shape)


# -- header room: what a writer reserves so that it writes each byte once ---------------------------
def entry_bounds(name: str, shape: tuple[int, ...], carried: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """The entries ``name`` may take in a delta or sparse file, each dimension at its largest."""
    if carried:
        return [(f"{name}::full", tuple(shape))]
    n = math.prod(shape)
    return [(f"{name}::values", (n,)), (f"{name}::mask", (VARINT_MAX_BYTES * n,)),
            (f"{name}::fix_idx", (VARINT_MAX_BYTES * n,)), (f"{name}::fix_val", (n,))]


def table_room(tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Bytes the ``tensors`` metadata field (the JSON table, quoted as a JSON string) takes at most."""
    total = len('"tensors":"{}",')
    for name, shape in tensors:
        n = math.prod(shape)
        row = {"shape": list(shape), "dtype": "F8_E4M3", "encoding": "dense", "nnz": n, "fixups": n}
        total += len(json.dumps(json.dumps({name: row}, separators=(",", ":")) + ",")) - 2
    return total


def header_reserve(plan: list[tuple[str, tuple[int, ...], bool]], metadata: dict[str, str],
                   aux: list[tuple[str, tuple[int, ...]]] = ()) -> int:
    """The header room of a delta or sparse file holding ``plan`` ((name, shape, carried whole)), ``metadata`` and
    ``aux`` entries, with its table."""
    from compress.io.writer import header_room

    entries = [e for name, shape, carried in plan for e in entry_bounds(name, shape, carried)] + list(aux)
    return header_room(entries, metadata, table_room([(name, shape) for name, shape, _ in plan]))


class DeltaFile:
    """A compact delta file opened lazily; also a task-vector source (``names``/``info``/``get``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CompressError(f"{self.path}: no such delta file")
        self._file = SafetensorsFile(self.path)
        self.metadata = self._file.metadata
        if self.metadata.get("compress.format") != FORMAT:
            raise CompressError(f"{self.path}: not a compress delta file (no compress.format={FORMAT} metadata)")
        self.table: dict[str, dict] = self._load_table()
        self._check_entries()
        parts: dict[str, dict[str, TensorInfo]] = {}
        for key, info in self._file.infos.items():
            name, _, part = key.rpartition("::")
            parts.setdefault(name, {})[part] = info
        for name, row in self.table.items():
            self._check_row_entries(name, row, parts.get(name, {}))

    def _bad(self, name: str, why: str) -> CompressError:
        return CompressError(f"{self.path}: tensor {quote_name(name)}: {why}")

    def _load_table(self) -> dict[str, dict]:
        """The ``tensors`` metadata, every row's fields checked (cheap: nothing is read)."""
        text = self.metadata.get("tensors")
        if text is None:
            raise CompressError(f"{self.path}: no 'tensors' metadata (the table of stored tensors)")
        try:
            table = strict_json(text.encode("utf-8"))
        except (ValueError, UnicodeError, RecursionError) as e:
            raise CompressError(f"{self.path}: 'tensors' metadata is not valid JSON ({str(e).splitlines()[0][:200]})"
                                ) from None
        if not isinstance(table, dict):
            raise CompressError(f"{self.path}: 'tensors' metadata must be a JSON object of tensor rows")
        for name, row in table.items():
            self._check_row(name, row)
        return table

    def _check_row(self, name: str, row) -> None:
        if not isinstance(row, dict):
            raise self._bad(name, "table row must be a JSON object")
        shape = row.get("shape")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise self._bad(name, f"table field 'shape' must be a list of non-negative integers (got "
                                  f"{json.dumps(shape)[:80]})")
        if not isinstance(row.get("dtype"), str) or row["dtype"] not in SAFETENSORS_DTYPES:
            raise self._bad(name, f"table field 'dtype' {json.dumps(row.get('dtype'))[:40]} is not a dtype code "
                                  f"({', '.join(SAFETENSORS_DTYPES)})")
        enc = row.get("encoding")
        if not isinstance(enc, str) or enc not in ENCODINGS:
            raise self._bad(name, f"table field 'encoding' {json.dumps(enc)[:40]} is not one of "
                                  f"{', '.join(ENCODINGS)}")
        fixups = row.setdefault("fixups", 0)
        if type(fixups) is not int or fixups < 0 or (enc == "full" and fixups):
            raise self._bad(name, "table field 'fixups' must be a non-negative integer (0 for a 'full' row; got "
                                  f"{json.dumps(fixups)[:40]})")
        if enc == "full":
            return
        numel, nnz = math.prod(shape), row.get("nnz")
        if type(nnz) is not int or not 0 <= nnz <= numel:
            raise self._bad(name, f"table field 'nnz' must be an integer in [0, {numel}] (got {json.dumps(nnz)[:40]})")
        want = {"dense": numel, "nm24": numel // 2}.get(enc, nnz)
        if nnz != want or (enc == "nm24" and numel % 4):
            raise self._bad(name, f"table field 'nnz' is {nnz}, but a '{enc}' tensor of {numel} entries keeps {want}")
        if fixups > nnz:
            raise self._bad(name, f"table field 'fixups' is {fixups}, more than the {nnz} kept entries")

    def _check_row_entries(self, name: str, row: dict, parts: dict[str, TensorInfo]) -> None:
        """The row's entries (``parts``): exactly those its encoding uses, each of the size and dtype the row
        implies, so that decoding can check content alone."""
        need = set(ENCODINGS[row["encoding"]]) | ({"fix_idx", "fix_val"} if row["fixups"] else set())
        missing, extra = sorted(need - set(parts)), sorted(set(parts) - need)
        if missing:
            raise self._bad(name, f"entry '{missing[0]}' is missing (a '{row['encoding']}' row with "
                                  f"{row['fixups']} fix-ups needs it)")
        if extra:
            raise self._bad(name, f"entry '{extra[0]}' has no place in a '{row['encoding']}' row")
        shape, dtype = tuple(row["shape"]), SAFETENSORS_DTYPES[row["dtype"]]
        numel, nnz, nfix = math.prod(shape), row.get("nnz", 0), row["fixups"]
        if row["encoding"] == "full":
            want = {"full": (dtype, shape)}
        else:
            values = parts["values"].dtype
            if values.is_floating_point != dtype.is_floating_point or (not dtype.is_floating_point and values != dtype):
                raise self._bad(name, f"entry 'values' is {DTYPE_CODES[values]} but the table says {row['dtype']}")
            want = {"values": (values, (nnz,)), "mask": (torch.uint8, (-(-numel // 8),)),
                    "nm24": (torch.uint8, (-(-(numel // 4) // 3),)), "fix_val": (dtype, (nfix,))}
        for part, info in parts.items():
            if part in ("gaps", "fix_idx"):
                count = nnz if part == "gaps" else nfix
                ok = info.dtype == torch.uint8 and len(info.shape) == 1 and \
                    count <= info.numel <= VARINT_MAX_BYTES * count
                expect = f"1-D uint8 of {count} to {VARINT_MAX_BYTES * count} bytes"
            else:
                ok = (info.dtype, info.shape) == want[part]
                expect = f"{DTYPE_CODES[want[part][0]]} {list(want[part][1])}"
            if not ok:
                raise self._bad(name, f"entry '{part}' is {DTYPE_CODES[info.dtype]} {list(info.shape)}, "
                                      f"expected {expect}")

    def _decode(self, name: str, fn, *args):
        try:
            return fn(*args)
        except EntryError as e:
            raise self._bad(name, str(e)) from None

    def _check_entries(self) -> None:
        """Every entry in the file belongs to a table row or is an allowed auxiliary file (a 1-D uint8 tensor);
        anything else is refused, since an entry's name may be written back as a file name."""
        from compress.io.writer import AUX_PREFIX, aux_entry_name

        for key, info in self._file.infos.items():
            if key.startswith(AUX_PREFIX):
                aux_entry_name(key, self.path)
                if info.dtype != torch.uint8 or len(info.shape) != 1:
                    raise CompressError(f"{self.path}: auxiliary entry {quote_name(key)} must be a 1-D uint8 tensor "
                                        f"(got {str(info.dtype).removeprefix('torch.')} {list(info.shape)})")
                continue
            name, sep, part = key.rpartition("::")
            if not sep or name not in self.table or part not in ENTRY_PARTS:
                raise CompressError(f"{self.path}: entry {quote_name(key)} belongs to no tensor in the file's table; "
                                    "not a delta file this tool wrote")

    def aux_entries(self) -> list[str]:
        """The ``__aux__::<file>`` entries (config and tokenizer files carried by a sparse weight file)."""
        from compress.io.writer import AUX_PREFIX

        return [k for k in self._file.infos if k.startswith(AUX_PREFIX)]

    def aux_bytes(self, key: str) -> int:
        return self._file.infos[key].nbytes

    def _entries(self, name: str) -> dict[str, torch.Tensor]:
        return {k: self._file.read(f"{name}::{k}") for k in ENTRY_PARTS if f"{name}::{k}" in self._file.infos}

    def names(self) -> list[str]:
        return [n for n, r in self.table.items() if r["encoding"] != "full"]

    def carried(self) -> list[str]:
        return [n for n, r in self.table.items() if r["encoding"] == "full"]

    def info(self, name: str) -> TensorInfo:
        r = self.table[name]
        return TensorInfo(name, tuple(r["shape"]), SAFETENSORS_DTYPES[r["dtype"]], self.path)

    def full(self, name: str, *, device=None) -> torch.Tensor:
        return self._file.read(f"{name}::full").to(device or "cpu")

    def get(self, name: str, *, device=None, dtype=None) -> torch.Tensor:
        """The dense delta (zeros where dropped), in float32 unless ``dtype`` says otherwise."""
        return self.decode(name, device=device, dtype=dtype or torch.float32)

    def decode(self, name: str, *, device=None, dtype: torch.dtype) -> torch.Tensor:
        """``name``'s stored entries in place (zeros where dropped), shaped, in ``dtype``; no fix-ups."""
        r = self.table[name]
        flat = self._decode(name, decode_delta, r, self._entries(name), device or "cpu", dtype)
        return flat.reshape(r["shape"])

    def stored_bytes(self, name: str) -> int:
        """Bytes the file spends on ``name`` (values, positions, fix-ups or the whole tensor)."""
        return sum(info.nbytes for k, info in self._file.infos.items() if k.startswith(name + "::"))

    def rebuild(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The tensor ``apply`` writes for ``name`` given the base tensor (exact at kept entries)."""
        return self._decode(name, decode_tensor, self.table[name], self._entries(name), base)

    def close(self) -> None:
        self._file.close()
