"""Sparse weight files (compress.io.sparse): exact round trips and the sizes the pruning issue asks for."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from compress.io.deltafile import decode_nm24, encode_nm24, nm24_fill
from compress.io.sparse import encode_sparse, write_sparse
from tests.conftest import run_cli, save_llama


def _prune_rows(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(t.shape[1] * sparsity)
    idx = t.abs().argsort(dim=1)[:, :k]
    return t.scatter(1, idx, 0)


def _prune_24(t: torch.Tensor) -> torch.Tensor:
    g = t.reshape(-1, 4)
    idx = g.abs().argsort(dim=1)[:, :2]
    return g.scatter(1, idx, 0).reshape(t.shape)


def test_nm24_codes_roundtrip_every_pattern():
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    mask = torch.zeros(len(pairs) * 5 * 4, dtype=torch.bool).reshape(-1, 4)
    for i in range(mask.shape[0]):
        mask[i, list(pairs[i % 6])] = True
    flat = mask.reshape(-1)
    packed = encode_nm24(flat)
    assert packed.numel() == math.ceil(mask.shape[0] / 3)
    assert torch.equal(decode_nm24(packed, flat.numel()), flat)
    # a group with one kept entry is widened to its lowest free slot; one with three cannot be 2:4
    assert nm24_fill(torch.tensor([False, False, True, False])).tolist() == [True, False, True, False]
    assert nm24_fill(torch.tensor([True, True, True, False])) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_sparse_exact_and_chooses_cheapest(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128).to(dtype)
    cases = {"dense": w, "mask": _prune_rows(w, 0.5), "nm24": _prune_24(w), "gaps": _prune_rows(w, 0.97)}
    for want, t in cases.items():
        entries, row = encode_sparse("w", t)
        assert row["encoding"] == want
        from compress.io.deltafile import decode_delta
        back = decode_delta(row, {k.split("::")[1]: v for k, v in entries.items()}, "cpu", dtype).reshape(t.shape)
        assert torch.equal(back, t)


def test_sparse_file_rebuilds_folder_and_meets_size_targets(tmp_path):
    model = save_llama(tmp_path / "dense", seed=1, dtype=torch.bfloat16, hidden_size=64, intermediate_size=128)
    from safetensors.torch import save_file
    sd = load_file(model / "model.safetensors")
    linear = [n for n in sd if n.endswith("proj.weight")]
    for pattern, prune, limit in (("50", lambda t: _prune_rows(t, 0.5), 0.60), ("24", _prune_24, 0.57)):
        pruned = {n: (prune(t) if n in linear else t) for n, t in sd.items()}
        folder = tmp_path / f"pruned{pattern}"
        folder.mkdir()
        save_file(pruned, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text((model / "config.json").read_text())
        s = write_sparse(folder, tmp_path / f"p{pattern}.safetensors")
        assert s.pruned_ratio <= limit, (pattern, s.pruned_ratio)
        assert s.sparse_params == sum(sd[n].numel() for n in linear)
        code, _, err = run_cli("apply", "--delta", s.path, "--out", tmp_path / f"back{pattern}")
        assert code == 0, err
        back = load_file(tmp_path / f"back{pattern}" / "model.safetensors")
        assert back.keys() == pruned.keys() and all(torch.equal(back[n], pruned[n]) for n in pruned)
        assert json.loads((tmp_path / f"back{pattern}" / "config.json").read_text())["hidden_size"] == 64
    code, out, _ = run_cli("inspect", tmp_path / "p24.safetensors", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "sparse" and info["pruned_tensors"] == len(linear)
    assert info["pruned_file_vs_dense"] == pytest.approx(s.pruned_ratio) and info["file_bytes"] == s.file_bytes


def test_apply_errors_name_the_missing_or_extra_base(tmp_path, capsys):
    model = save_llama(tmp_path / "m", seed=2)
    write_sparse(model, tmp_path / "s.safetensors")
    code, _, err = run_cli("apply", "--base", model, "--delta", tmp_path / "s.safetensors", "--out", tmp_path / "o")
    assert code == 2 and "drop --base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_apply_task_vector_delta_without_base_is_an_error(tmp_path, llama_pair):
    base, ft = llama_pair
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
    assert code == 0, err
    code, _, err = run_cli("apply", "--delta", tmp_path / "d.safetensors", "--out", tmp_path / "o")
    assert code == 2 and "give --base" in err and not (tmp_path / "o").exists()
