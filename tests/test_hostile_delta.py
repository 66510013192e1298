"""Hostile delta files, dtype tables and pickles through the CLI (issue 17, items 9, 10 and 11): each is one line on
stderr naming the file and the tensor or field, exit code 2, nothing at the output and no temporary beside it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.delta import extract_delta
from compress.errors import CompressError
from compress.io.deltafile import DeltaFile, decode_gaps, encode_gaps
from compress.io.reader import open_checkpoint
from compress.io.sparse import write_sparse
from compress.taskvec import TaskVector
from tests.conftest import run_cli

T = "lm_head.weight"  # [96, 32]: 3072 entries in every delta built here
NUMEL = 96 * 32


@pytest.fixture(scope="module")
def files(tmp_path_factory, llama_pair):
    """Valid files to spoil: task-vector deltas in each encoding, a 2:4 sparse weight file, a base with an int
    tensor."""
    base, ft = llama_pair
    root = tmp_path_factory.mktemp("hostile_delta")
    out = {"base": base}
    with open_checkpoint(base) as base_ck:
        tv = TaskVector.from_paths(base_ck, ft)
        for enc, density in (("gaps", 0.05), ("mask", 0.5), ("dense", 1.0)):
            out[enc] = extract_delta(base_ck, tv, root / f"{enc}.safetensors", density=density, quiet=True).path
    pruned = root / "pruned"
    pruned.mkdir()
    w = torch.randn(8, 8) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(16).reshape(8, 8)
    save_file({"w": w, "v": torch.randn(4)}, str(pruned / "model.safetensors"))
    out["nm24"] = write_sparse(pruned, root / "nm24.safetensors", quiet=True).path
    int_base = root / "int_base"
    shutil.copytree(base, int_base)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**sd, "buf.ids": torch.arange(8)}, str(int_base / "model.safetensors"))
    out["int_base"] = int_base
    return out


def _spoil(src, dst, edit):
    """``src`` rewritten after ``edit(meta, table, tensors)`` changed them in place: a stranger's edited file, still
    valid safetensors. The table is written back unless the edit replaced the ``tensors`` metadata itself."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    original = meta["tensors"]
    table = json.loads(original)
    edit(meta, table, tensors)
    if meta.get("tensors") == original:
        meta["tensors"] = json.dumps(table)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _entries(fn):
    return lambda meta, table, tensors: fn(table, tensors)


def _refused(tmp_path, args, *needles):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out = work / "out"
    code, _, err = run_cli(*args, "--out", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and sorted(os.listdir(work)) == []  # nothing written, no temporary left
    return lines[0]


def _set(row_key, value, name=T):
    return lambda meta, table, tensors: table[name].__setitem__(row_key, value)


def _flip_mask_bit(table, tensors):
    m = tensors[f"{T}::mask"].clone()
    i = int(torch.nonzero(m)[0])
    m[i] = int(m[i]) & (int(m[i]) - 1)  # one set bit cleared: the mask keeps one entry fewer than 'values' holds
    tensors[f"{T}::mask"] = m


def _gaps_past_end(table, tensors):
    idx = decode_gaps(tensors[f"{T}::gaps"])
    idx[-1] = NUMEL + 5
    tensors[f"{T}::gaps"] = encode_gaps(idx)


def _gaps_merged(table, tensors):
    g = tensors[f"{T}::gaps"].clone()
    g[0] |= 0x80  # two varints become one: fewer positions than values, or one past the end
    tensors[f"{T}::gaps"] = g


def _gaps_truncated(table, tensors):
    g = tensors[f"{T}::gaps"].clone()
    g[-1] |= 0x80
    tensors[f"{T}::gaps"] = g


def _fixups(idx, val):
    def fn(table, tensors):
        table[T]["fixups"] = val.numel()
        tensors[f"{T}::fix_idx"] = encode_gaps(torch.tensor(idx))
        tensors[f"{T}::fix_val"] = val
    return fn


def _add(key, value):
    return lambda meta, table, tensors: tensors.__setitem__(key, value)


def _retype_values(table, tensors):
    tensors[f"{T}::values"] = tensors[f"{T}::values"].to(torch.int32)


def _int_row(table, tensors):
    table[T]["dtype"] = "I32"
    tensors[f"{T}::values"] = tensors[f"{T}::values"].to(torch.int32)


def _float_row_for_int_base(table, tensors):
    table["buf.ids"] = {"shape": [8], "dtype": "F32", "encoding": "dense", "nnz": 8, "fixups": 0}
    tensors["buf.ids::values"] = torch.ones(8)


TN = f"tensor '{T}'"
# (case, source file, edit, what the one line must say, refused at open (so `inspect` refuses it too))
CASES = [
    ("no tensors metadata", "dense", lambda m, t, e: m.pop("tensors"), ["no 'tensors' metadata"], True),
    ("tensors not JSON", "dense", lambda m, t, e: m.__setitem__("tensors", "{oops"), ["not valid JSON"], True),
    ("tensors a list", "dense", lambda m, t, e: m.__setitem__("tensors", "[1]"), ["a JSON object"], True),
    ("tensors with NaN", "dense", lambda m, t, e: m.__setitem__("tensors", '{"x": NaN}'), ["not valid JSON"], True),
    ("row not an object", "dense", lambda m, t, e: t.__setitem__(T, 5), [TN, "table row"], True),
    ("unknown dtype code", "dense", _set("dtype", "F33"), [TN, "'dtype'"], True),
    ("dtype code a list", "dense", _set("dtype", ["F32"]), [TN, "'dtype'"], True),
    ("unknown encoding", "dense", _set("encoding", "zip"), [TN, "'encoding'"], True),
    ("shape not a list", "dense", _set("shape", "96x32"), [TN, "'shape'"], True),
    ("shape of negatives", "dense", _set("shape", [-96, -32]), [TN, "'shape'"], True),
    ("shape of floats", "dense", _set("shape", [96.0, 32]), [TN, "'shape'"], True),
    ("nnz over numel", "gaps", _set("nnz", NUMEL + 1), [TN, "'nnz'"], True),
    ("nnz negative", "gaps", _set("nnz", -1), [TN, "'nnz'"], True),
    ("nnz a string", "gaps", _set("nnz", "154"), [TN, "'nnz'"], True),
    ("nnz not numel for dense", "dense", _set("nnz", 5), [TN, "'nnz'"], True),
    ("fixups negative", "dense", _set("fixups", -2), [TN, "'fixups'"], True),
    ("mask too short", "mask", _entries(lambda t, e: e.__setitem__(f"{T}::mask", e[f"{T}::mask"][:-1])),
     [TN, "entry 'mask'"], True),
    ("values too long", "mask", _entries(lambda t, e: e.__setitem__(f"{T}::values", torch.cat(
        [e[f"{T}::values"], torch.zeros(1)]))), [TN, "entry 'values'"], True),
    ("values too short", "dense", _entries(lambda t, e: e.__setitem__(f"{T}::values", e[f"{T}::values"][:-3])),
     [TN, "entry 'values'"], True),
    ("gaps shorter than nnz", "gaps", _entries(lambda t, e: e.__setitem__(f"{T}::gaps", e[f"{T}::gaps"][:10])),
     [TN, "entry 'gaps'"], True),
    ("values entry missing", "mask", _entries(lambda t, e: e.pop(f"{T}::values")), [TN, "'values' is missing"],
     True),
    ("fix_idx without fix_val", "dense", _entries(lambda t, e: (t[T].__setitem__("fixups", 1), e.__setitem__(
        f"{T}::fix_idx", encode_gaps(torch.tensor([3]))))), [TN, "'fix_val' is missing"], True),
    ("entry foreign to the encoding", "dense", _add(f"{T}::mask", torch.zeros(384, dtype=torch.uint8)),
     [TN, "entry 'mask' has no place in a 'dense' row"], True),
    ("values int, table float", "dense", _entries(_retype_values), [TN, "entry 'values' is I32"], True),
    ("mask keeps fewer than values", "mask", _entries(_flip_mask_bit), [TN, "'values' holds 1536", "give 1535"],
     False),
    ("gaps decode past numel", "gaps", _entries(_gaps_past_end), [TN, "'gaps'", f"past the tensor's {NUMEL}"],
     False),
    ("gaps decode to other than nnz", "gaps", _entries(_gaps_merged), [TN], False),
    ("gaps end inside a varint", "gaps", _entries(_gaps_truncated), [TN, "'gaps' ends inside a varint"], False),
    ("fix_idx and fix_val mismatched", "dense", _entries(_fixups([0, 1], torch.zeros(1))),
     [TN, "'fix_idx' gives 2 positions"], False),
    ("fix_idx past numel", "dense", _entries(_fixups([NUMEL + 1], torch.zeros(1))),
     [TN, "'fix_idx' decodes to positions past"], False),
    ("fix_val of another dtype", "dense", _entries(_fixups([0], torch.zeros(1, dtype=torch.float64))),
     [TN, "entry 'fix_val' is F64"], True),
]


@pytest.mark.parametrize("case,src,edit,needles,at_open", CASES, ids=[c[0] for c in CASES])
def test_malformed_delta_is_one_line_and_writes_nothing(tmp_path, files, case, src, edit, needles, at_open):
    bad = _spoil(files[src], tmp_path / "bad.safetensors", edit)
    _refused(tmp_path, ("apply", "--base", files["base"], "--delta", bad), str(bad), *needles)
    code, _, err = run_cli("inspect", bad)
    if at_open:  # the table and entry sizes are checked when the file opens, wherever it is opened
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err
    else:  # only decoding reads the entries' content: inspect reads the table alone
        assert code == 0, err


NM = "tensor 'w'"
SPARSE_CASES = [
    ("nm24 wrong length", _entries(lambda t, e: e.__setitem__("w::nm24", e["w::nm24"][:-1])), [NM, "entry 'nm24'"]),
    ("nm24 byte over 215", _entries(lambda t, e: e["w::nm24"].__setitem__(0, 250)), [NM, "over 215"]),
    ("nm24 nnz not half", _set("nnz", 31, name="w"), [NM, "'nnz'"]),
    ("nm24 on a size not a multiple of 4", _set("shape", [63], name="w"), [NM, "'nnz'"]),
]


@pytest.mark.parametrize("case,edit,needles", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_malformed_sparse_file_is_one_line_and_writes_nothing(tmp_path, files, case, edit, needles):
    with safe_open(str(files["nm24"]), "pt") as f:
        assert json.loads(f.metadata()["tensors"])["w"]["encoding"] == "nm24"
    bad = _spoil(files["nm24"], tmp_path / "bad.safetensors", edit)
    _refused(tmp_path, ("apply", "--delta", bad), str(bad), *needles)


def test_float_delta_for_an_int_base_tensor_is_a_mismatch(tmp_path, files):
    bad = _spoil(files["dense"], tmp_path / "bad.safetensors", _entries(_float_row_for_int_base))
    _refused(tmp_path, ("apply", "--base", files["int_base"], "--delta", bad), str(bad),
             "tensor 'buf.ids' is F32 in the delta but I64 in the base")
    # the same table read as a task vector (the Python API, `TaskVector([...]).apply`) refuses it too
    with pytest.raises(CompressError, match="tensor 'buf.ids' is float32 in the task vector but int64 in the base"):
        TaskVector([(1.0, DeltaFile(bad))]).apply(files["int_base"], tmp_path / "tv_out", quiet=True)
    assert not (tmp_path / "tv_out").exists()


def test_int_delta_for_a_float_base_tensor_is_a_mismatch(tmp_path, files):
    bad = _spoil(files["dense"], tmp_path / "bad.safetensors", _entries(_int_row))
    _refused(tmp_path, ("apply", "--base", files["base"], "--delta", bad), str(bad),
             f"{TN} is I32 in the delta but F32 in the base")


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_pickle_with_code_is_refused_in_one_line_and_never_runs(tmp_path, files, zipfile):
    marker = tmp_path / "PWNED"
    model = tmp_path / "evil"
    model.mkdir()
    shutil.copy(files["base"] / "config.json", model / "config.json")
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, model / "pytorch_model.bin",
               _use_new_zipfile_serialization=zipfile)
    text = tmp_path / "text.txt"
    text.write_text("once upon a time " * 50)
    for args in (("inspect", model), ("apply", "--base", model, "--delta", files["dense"], "--out",
                                      tmp_path / "out"), ("eval", model, "--perplexity", text)):
        code, _, err = run_cli(*args)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert "pytorch_model.bin: holds objects other than tensors" in err and "posix.system" in err
        assert "weights_only" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])


def _overlap(path):
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    second = sorted((k for k in keys), key=lambda k: header[k]["data_offsets"])[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 4, end - 4]  # reads 4 bytes of the previous tensor
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return second


@pytest.mark.parametrize("spoil", [_truncate, _overlap], ids=["truncated", "overlapping"])
def test_eval_on_a_malformed_safetensors_file_is_one_line(tmp_path, files, spoil):
    model = tmp_path / "model"
    shutil.copytree(files["base"], model)
    named = spoil(model / "model.safetensors")
    text = tmp_path / "text.txt"
    text.write_text("once upon a time " * 50)
    code, out, err = run_cli("eval", model, "--perplexity", text)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and str(model / "model.safetensors") in err
    if named:
        assert f"tensor '{named}'" in err


def test_sparse_file_claiming_a_huge_dense_shape_is_refused_before_allocating(tmp_path):
    """A decompression bomb: a few kept entries (gaps encoding) under a table shape of 10¹³ entries. The dense size
    is checked against the free space where the output goes, before any tensor is allocated."""
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    w = torch.zeros(64, 64)
    w[0, :3] = 1.0
    save_file({"w": w}, str(pruned / "model.safetensors"))
    src = write_sparse(pruned, tmp_path / "s.safetensors", quiet=True).path

    def bomb(meta, table, tensors):
        assert table["w"]["encoding"] == "gaps"
        table["w"]["shape"] = [10**7, 10**6]

    bad = _spoil(src, tmp_path / "bomb.safetensors", bomb)
    line = _refused(tmp_path, ("apply", "--delta", bad), "bomb.safetensors", "rebuild to 40,000.0 GB", "free")
    assert "nothing was written" in line
