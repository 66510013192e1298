"""Hostile safetensors headers (issue 17, item 3): every file the safetensors library refuses is refused by our
reader too, as one CompressError naming the file and, where there is one, the tensor; checked side by side with
the library's own ``safe_open``."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from compress.errors import CompressError
from compress.io.reader import SafetensorsFile
from tests.conftest import run_cli


def _f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


VALID = {"a": _f32([2], [0, 8]), "b": _f32([2, 2], [8, 24])}


def _with(**entries):
    return {**VALID, **entries}


def _deep(levels: int) -> bytes:
    return (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * levels + b"]" * levels
            + b'},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}')


# (case, header as a dict or raw JSON bytes, bytes of data, tensors the message may name (None: the file only),
#  header length to write instead of the real one)
CASES = [
    ("overlapping offsets", _with(b=_f32([2, 2], [4, 20])), 24, ("b",), None),
    ("gap between tensors", _with(b=_f32([2, 2], [12, 28])), 28, ("b",), None),
    ("shifted start", {"a": _f32([2], [4, 12]), "b": _f32([2, 2], [12, 28])}, 28, ("a",), None),
    ("duplicated offsets", {"a": _f32([2], [0, 8]), "b": _f32([2], [0, 8])}, 8, ("a", "b"), None),
    ("negative offset", {"a": _f32([2], [-8, 0]), "b": _f32([2, 2], [0, 16])}, 16, ("a",), None),
    ("end before begin", {"a": _f32([0], [8, 0]), "b": _f32([2], [0, 8])}, 8, ("a",), None),
    ("duplicate tensor key", b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                             b'"a":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}', 24, ("a",), None),
    ("duplicate __metadata__", b'{"__metadata__":{"k":"1"},"__metadata__":{"k":"2"}}', 0, None, None),
    ("256 GiB claimed by a 2 KB file", {"a": _f32([2**36], [0, 2**38])}, 2048, ("a",), None),
    ("truncated data", VALID, 20, ("b",), None),
    ("trailing bytes no tensor owns", VALID, 32, None, None),
    ("size not shape x dtype", _with(b=_f32([3, 2], [8, 24])), 24, ("b",), None),
    ("shape overflows 64 bits", _with(b=_f32([2**32, 2**32], [8, 24])), 24, ("b",), None),
    ("missing shape", _with(b={"dtype": "F32", "data_offsets": [8, 24]}), 24, ("b",), None),
    ("missing data_offsets", _with(b={"dtype": "F32", "shape": [2, 2]}), 24, ("b",), None),
    ("missing dtype", _with(b={"shape": [2, 2], "data_offsets": [8, 24]}), 24, ("b",), None),
    ("shape a string", _with(b=_f32("2,2", [8, 24])), 24, ("b",), None),
    ("shape of floats", _with(b=_f32([2.0, 2], [8, 24])), 24, ("b",), None),
    ("negative shape", _with(b=_f32([-2, -2], [8, 24])), 24, ("b",), None),
    ("shape of booleans", _with(b=_f32([True, 4], [8, 24])), 24, ("b",), None),
    ("shape of -0", b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]},'
                    b'"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, ("a",), None),
    ("data_offsets of one", _with(b=_f32([2, 2], [8])), 24, ("b",), None),
    ("data_offsets of three", _with(b=_f32([2, 2], [8, 24, 24])), 24, ("b",), None),
    ("data_offsets an object", _with(b=_f32([2, 2], {"begin": 8})), 24, ("b",), None),
    ("unknown dtype", _with(b={**_f32([2, 2], [8, 24]), "dtype": "F33"}), 24, ("b",), None),
    ("dtype a number", _with(b={**_f32([2, 2], [8, 24]), "dtype": 4}), 24, ("b",), None),
    ("entry null", _with(b=None), 24, ("b",), None),
    ("entry a list", _with(b=[1, 2]), 24, ("b",), None),
    ("header a list", b"[1, 2]", 0, None, None),
    ("header a string", b'"weights"', 0, None, None),
    ("metadata a list", _with(__metadata__=["x"]), 24, None, None),
    ("metadata value a number", _with(__metadata__={"format": 1}), 24, None, None),
    ("metadata value null", _with(__metadata__={"format": None}), 24, None, None),
    ("header over 100 MB", VALID, 24, None, 100_000_001),
    ("header past the end", VALID, 24, None, 10_000),
    ("not UTF-8", b'{"a\xff":1}', 0, None, None),
    ("not JSON", b"{not json}", 0, None, None),
    ("NaN", b'{"__metadata__":{"k":"v"},"x":NaN}', 0, None, None),
    ("trailing garbage", json.dumps(VALID).encode() + b" x", 24, None, None),
    ("NUL padding", json.dumps(VALID).encode() + b"\0\0", 24, None, None),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps(VALID).encode(), 24, None, None),
    ("lone surrogate", b'{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, None, None),
    ("nested deeper than serde allows", _deep(126), 24, None, None),
    ("number out of range", b'{"__metadata__":{"k":"v"},"x":{"y":1e400}}', 0, None, None),
    ("empty header", b"", 0, None, None),
]


def _write(path, header, data_bytes: int, n: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n))
        f.write(raw)
        f.write(bytes(range(256)) * (data_bytes // 256) + bytes(range(data_bytes % 256)))
    return path


@pytest.mark.parametrize("case,header,data_bytes,tensors,n", CASES, ids=[c[0] for c in CASES])
def test_malformed_header_is_refused_as_the_library_refuses_it(tmp_path, case, header, data_bytes, tensors, n):
    path = _write(tmp_path / "model.safetensors", header, data_bytes, n)
    with pytest.raises(Exception):  # the reference: safetensors' own reader refuses the file
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    with pytest.raises(CompressError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if tensors is not None:
        assert any(f"tensor '{t}'" in msg or f"names '{t}' twice" in msg for t in tensors), msg
    code, _, err = run_cli("inspect", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err


def test_stricter_than_the_library_where_it_guesses(tmp_path):
    """Identical duplicate keys and tensor entries as arrays pass the library (the last one silently wins) but
    are refused here; the message names the duplicated key."""
    dup = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = _write(tmp_path / "dup.safetensors", dup, 8)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["a"]
    with pytest.raises(CompressError, match="header names 'a' twice"):
        SafetensorsFile(path)
    path = _write(tmp_path / "seq.safetensors", b'{"a":["F32",[2],[0,8]]}', 8)
    with pytest.raises(CompressError, match="tensor 'a': entry is a JSON array"):
        SafetensorsFile(path)


def test_tensor_name_with_a_newline_stays_on_one_line(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"evil\nname": _f32([2], [4, 12])}, 12)
    code, _, err = run_cli("inspect", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "evil\\nname" in err


VALID_ODDITIES = [
    ("offsets listed out of order", {"b": _f32([2, 2], [8, 24]), "a": _f32([2], [0, 8])}, 24),
    ("zero-size tensors sharing an offset", {"z": _f32([0], [0, 0]), "y": _f32([3, 0], [0, 0]),
                                             "a": _f32([2], [0, 8])}, 8),
    ("scalar", {"s": _f32([], [0, 4])}, 4),
    ("unknown extra fields", {"a": {**_f32([2], [0, 8]), "note": {"x": [1, 2.5, None]}}}, 8),
    ("null metadata", {"__metadata__": None, "a": _f32([2], [0, 8])}, 8),
    ("no tensors", {"__metadata__": {"k": "v"}}, 0),
    ("nested to the limit", _deep(125), 24),
]


@pytest.mark.parametrize("case,header,data_bytes", VALID_ODDITIES, ids=[c[0] for c in VALID_ODDITIES])
def test_valid_oddities_read_exactly_as_the_library_reads_them(tmp_path, case, header, data_bytes):
    path = _write(tmp_path / "m.safetensors", header, data_bytes)
    for pad in (b"", b"   "):  # JSON allows trailing spaces (writers pad headers to 8 bytes)
        if pad:
            raw = path.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            path.write_bytes(struct.pack("<Q", n + len(pad)) + raw[8:8 + n] + pad + raw[8 + n:])
        with safe_open(str(path), "pt") as f:
            ref = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        ours = SafetensorsFile(path)
        assert sorted(ours.infos) == sorted(ref) and ours.metadata == meta
        for k, t in ref.items():
            got = ours.read(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        ours.close()
