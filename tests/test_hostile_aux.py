"""Hostile sparse weight files: an ``__aux__::`` entry may only be written back as an allowlisted plain file name
inside the output folder (issue 17, item 1), and ``inspect`` lists every entry."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.io.sparse import write_sparse
from tests.conftest import run_cli, save_llama


def _rewrite(src, dst, extra: dict[str, torch.Tensor]):
    """The same file with extra entries: what a stranger's edited file would look like."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update(extra)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _payload(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    model = save_llama(root / "m", seed=3)
    return write_sparse(model, root / "m.sparse.safetensors", quiet=True).path


@pytest.mark.parametrize("target", ["ABS", "../escape.txt", "sub/dir.txt", "config.json/../../x", "evil.py"])
def test_aux_entry_naming_a_path_is_refused_and_nothing_is_written(tmp_path, sparse_file, target):
    victim = tmp_path / "victim.txt"
    key = "__aux__::" + (str(victim) if target == "ABS" else target)
    bad = _rewrite(sparse_file, tmp_path / "bad.safetensors", {key: _payload("pwned")})
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, _, err = run_cli("apply", "--delta", bad, "--out", out)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and key in err and "not an auxiliary file" in err
    assert not out.exists() and not victim.exists() and not (tmp_path / "escape.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no temporary left either
    code, _, err = run_cli("inspect", bad)  # the file is refused wherever it is opened
    assert code == 2 and key in err


def test_aux_entry_of_wrong_type_and_stray_entries_are_refused(tmp_path, sparse_file):
    bad = _rewrite(sparse_file, tmp_path / "bad.safetensors", {"__aux__::config.json": torch.zeros(3, 2)})
    code, _, err = run_cli("apply", "--delta", bad, "--out", tmp_path / "o")
    assert code == 2 and "1-D uint8" in err and not (tmp_path / "o").exists()
    stray = _rewrite(sparse_file, tmp_path / "stray.safetensors", {"hidden::values": torch.zeros(4)})
    code, _, err = run_cli("apply", "--delta", stray, "--out", tmp_path / "o")
    assert code == 2 and "'hidden::values' belongs to no tensor" in err and not (tmp_path / "o").exists()


def test_allowed_aux_files_round_trip_and_inspect_lists_them(tmp_path, sparse_file):
    code, out, err = run_cli("inspect", sparse_file, "--json")
    assert code == 0, err
    info = json.loads(out)
    with safe_open(str(sparse_file), "pt") as f:
        aux_keys = sorted(k for k in f.keys() if k.startswith("__aux__::"))
    assert aux_keys and sorted(r["name"] for r in info["aux"]) == aux_keys
    code, text, _ = run_cli("inspect", sparse_file)
    assert code == 0 and "auxiliary files" in text and "config.json" in text
    code, _, err = run_cli("apply", "--delta", sparse_file, "--out", tmp_path / "o")
    assert code == 0, err
    for key in aux_keys:
        name = key.removeprefix("__aux__::")
        assert (tmp_path / "o" / name).read_bytes() == (sparse_file.parent / "m" / name).read_bytes()
