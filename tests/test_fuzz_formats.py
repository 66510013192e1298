"""Property-based fuzzing of the file formats (issue 17): random safetensors headers and byte flips of valid small
safetensors and delta files. Whatever the bytes, the readers raise nothing but CompressError, allocate no more
than the file holds, return only a tensor's own bytes (checked against the safetensors library), and the delta
decoder gives tensors of exactly the size and dtype the table says."""

from __future__ import annotations

import json
import math
import re
import struct
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from compress.delta import SparseDelta, write_delta
from compress.errors import CompressError
from compress.io.deltafile import DeltaFile
from compress.io.reader import SafetensorsFile
from compress.io.sparse import write_sparse

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _library_reads(path) -> dict[str, bytes] | None:
    """What safetensors itself reads from the file (name → raw bytes), or None when it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: _raw(f.get_tensor(k)) for k in f.keys()}
    except Exception:
        return None


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Each tensor's byte span in the file, read from the header with a plain JSON parser."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _check_reader(path) -> None:
    data = path.read_bytes()
    with mock.patch.object(torch, "empty", wraps=torch.empty) as spy:  # records the sizes the reader asks for
        try:
            f = SafetensorsFile(path)
            ours = {k: _raw(f.read(k)) for k in f.infos}
            f.close()
        except CompressError:
            ours = None
    requested = [c.args[0] for c in spy.call_args_list]
    assert sum(requested) <= len(data), requested
    if ours is None:
        return
    reference = _library_reads(path)
    assert reference is not None, "accepted a file the safetensors library refuses"
    assert ours == reference
    spans = _spans(data)
    assert all(ours[k] == data[b:e] for k, (b, e) in spans.items())  # each tensor's own bytes, nothing else


# -- random headers -----------------------------------------------------------------------------------------
DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}
odd_values = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(max_size=3), st.lists(st.integers(-2, 3), max_size=3))


@st.composite
def headers(draw):
    """A header that is mostly right, then spoiled a little: tensors laid out back to back, each field
    sometimes replaced, an offset nudged, an entry dropped or duplicated, the data cut or padded."""
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=0, max_size=4, unique=True))
    header, pos = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES) + ["F33", "F4", "C64"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPES.get(dtype, 1)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
        if draw(st.integers(0, 5)) == 0:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            if draw(st.booleans()):
                del entry[field]
            else:
                entry[field] = draw(odd_values)
        offsets = entry.get("data_offsets")
        if draw(st.integers(0, 3)) == 0 and isinstance(offsets, list) and len(offsets) == 2:
            offsets[draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                                                odd_values))
    data_len = max(0, pos + draw(st.sampled_from([0, 0, 0, -1, 1, -8, 8])))
    return header, data_len, draw(st.sampled_from([0, 0, 0, -1, 1, 50]))


@FUZZ
@given(headers())
def test_random_headers(workdir, case):
    header, data_len, n_delta = case
    raw = json.dumps(header).encode()
    path = workdir / "random.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + n_delta)) + raw + bytes((7 * i + 3) % 256
                                                                                   for i in range(data_len)))
    _check_reader(path)


# -- byte flips of a valid file -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_file(workdir):
    g = torch.Generator().manual_seed(0)
    path = workdir / "valid.safetensors"
    save_file({"w": torch.randn(2, 3, generator=g), "ids": torch.arange(4), "h": torch.randn(3).bfloat16(),
               "z": torch.zeros(0, dtype=torch.uint8), "s": torch.tensor(1.5)}, str(path), metadata={"k": "v"})
    return path.read_bytes()


@st.composite
def flips(draw, data: bytes):
    """A few bytes changed: anywhere, in the tensor data, in a delta file's position entries, or digits swapped for
    other digits in the header or in a delta file's table (offsets, shapes and counts that still parse but lie);
    the file sometimes cut or padded."""
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n]
    table = re.search(rb'"tensors":"((?:[^"\\]|\\.)*)"', header)
    pools = {"header digit": [m.start() + 8 for m in re.finditer(rb"\d", header)],
             "table digit": [table.start(1) + 8 + m.start() for m in re.finditer(rb"\d", table.group(1))]
             if table else [], "data": range(8 + n, len(data)), "anywhere": range(len(data)),
             "positions": [i for k, (b, e) in _spans(data).items() if k.endswith(("mask", "gaps", "nm24", "fix_idx"))
                           for i in range(b, e)]}
    pools = {k: v for k, v in pools.items() if len(v)}
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pool = draw(st.sampled_from(sorted(pools)))
        at = draw(st.sampled_from(pools[pool]))
        if pool.endswith("digit"):
            out[at] = ord(str(draw(st.integers(0, 9))))
        else:
            out[at] ^= draw(st.integers(1, 255))
    cut = draw(st.sampled_from([0, 0, 0, -1, -4, 3]))
    return bytes(out[:cut] if cut < 0 else out + b"\0" * cut)


@FUZZ
@given(st.data())
def test_byte_flips_of_a_valid_file(workdir, valid_file, data):
    path = workdir / "flipped.safetensors"
    path.write_bytes(data.draw(flips(valid_file)))
    _check_reader(path)


# -- the delta decoder --------------------------------------------------------------------------------------
def _delta_file(path) -> dict[str, torch.Tensor]:
    """A small delta file with every encoding the writer picks (mask, gaps, dense with a fix-up, a carried int
    tensor); returns the base tensors."""
    g = torch.Generator().manual_seed(1)
    base = {"m": torch.randn(16, 16, generator=g), "g": torch.randn(40, 40, generator=g),
            "d": torch.randn(4, 4, generator=g)}
    base["d"][0, 0] = 1e8  # the fine-tuned 1e-3 there cannot come back as base + a float32 delta: a fix-up
    items = []
    for name, density in (("m", 0.5), ("g", 0.05), ("d", 1.0)):
        b = base[name]
        target = b + 0.01 * torch.randn(b.shape, generator=g)
        if name == "d":
            target[0, 0] = 1e-3
        delta = target - b
        mask = torch.rand(b.shape, generator=g) < density if density < 1 else torch.ones_like(b, dtype=torch.bool)
        items.append(SparseDelta(name, b, delta, mask, torch.float32, target))
    items.append(("ids", torch.arange(6)))
    summary = write_delta(path, items, metadata={})
    assert summary.fixups >= 1
    with safe_open(str(path), "pt") as f:
        encodings = {r["encoding"] for r in json.loads(f.metadata()["tensors"]).values()}
    assert encodings == {"mask", "gaps", "dense", "full"}
    return base


def _sparse_file(folder, path) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g) * torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(16).reshape(8, 8)
    save_file({"w": w, "v": torch.randn(5, generator=g)}, str(folder / "model.safetensors"))
    write_sparse(folder, path, quiet=True)


@pytest.fixture(scope="module")
def delta_files(workdir):
    d, s = workdir / "valid.delta.safetensors", workdir / "valid.sparse.safetensors"
    base = _delta_file(d)
    _sparse_file(workdir / "pruned", s)
    with safe_open(str(s), "pt") as f:
        assert json.loads(f.metadata()["tensors"])["w"]["encoding"] == "nm24"
    return {"delta": (d.read_bytes(), base), "sparse": (s.read_bytes(), None)}


def _check_delta(path, base: dict[str, torch.Tensor] | None) -> None:
    try:
        delta = DeltaFile(path)
    except CompressError:
        return
    for name, row in delta.table.items():
        shape, numel = tuple(row["shape"]), math.prod(row["shape"])
        try:
            if row["encoding"] == "full":
                t = delta.full(name)
                assert t.shape == shape
                continue
            if base is not None and name in base and base[name].shape == shape:
                t = delta.rebuild(name, base[name])  # what `compress apply` writes
                assert t.dtype == delta.info(name).dtype
            else:
                t = delta.decode(name, dtype=delta.info(name).dtype)  # a sparse file's tensor, or a task vector's
            assert t.shape == shape and t.numel() == numel
        except CompressError:
            pass
    delta.close()


@FUZZ
@given(st.sampled_from(["delta", "sparse"]), st.data())
def test_byte_flips_of_delta_files(workdir, delta_files, kind, data):
    raw, base = delta_files[kind]
    path = workdir / f"flipped.{kind}.safetensors"
    path.write_bytes(data.draw(flips(raw)))
    _check_reader(path)
    _check_delta(path, base)


def test_unflipped_delta_files_decode_exactly(workdir, delta_files):
    """The fuzzed files' starting point decodes to what was written (so the flips, not the files, are what the
    decoder refuses)."""
    raw, base = delta_files["delta"]
    path = workdir / "plain.delta.safetensors"
    path.write_bytes(raw)
    delta = DeltaFile(path)
    assert torch.equal(delta.full("ids"), torch.arange(6))
    d = delta.rebuild("d", base["d"])
    assert float(d[0, 0]) == pytest.approx(1e-3)
    for name in ("m", "g"):
        assert delta.rebuild(name, base[name]).shape == base[name].shape
    delta.close()
