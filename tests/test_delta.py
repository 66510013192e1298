"""Compact delta files: exact round trips, the sizes the issue promises, and the pure encoders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from compress.io.deltafile import DeltaFile, decode_gaps, encode_gaps, pack_mask, unpack_mask
from compress.io.reader import open_checkpoint
from compress.io.writer import ShardedWriter, atomic_dir


def _assert_bit_equal(a_path, b_path):
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        x, y = a.get(n), b.get(n)
        assert x.dtype == y.dtype and x.shape == y.shape, n
        if x.is_floating_point():
            ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
            assert torch.equal(x.view(ints), y.view(ints)), f"{n} differs bitwise"
        else:
            assert torch.equal(x, y), n


@pytest.mark.parametrize("pair", ["llama_pair", "llama_pair_bf16"])
def test_density_one_round_trip_is_bit_exact(pair, tmp_path, request):
    base, ft = request.getfixturevalue(pair)
    code, out, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
    assert code == 0, err
    code, _, err = run_cli("apply", "--base", base, "--delta", tmp_path / "d.safetensors", "--out", tmp_path / "rec")
    assert code == 0, err
    _assert_bit_equal(ft, tmp_path / "rec")
    assert (tmp_path / "rec" / "config.json").exists()


def test_sparse_round_trip_keeps_exact_values_and_reverts_the_rest(llama_pair_bf16, tmp_path):
    base, ft = llama_pair_bf16
    run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors", "--density", "0.2")
    run_cli("apply", "--base", base, "--delta", tmp_path / "d.safetensors", "--out", tmp_path / "rec")
    b, f, r = open_checkpoint(base), open_checkpoint(ft), open_checkpoint(tmp_path / "rec")
    total = kept = 0
    for n in f.names():
        bt, ftt, rt = b.get(n), f.get(n), r.get(n)
        tau = ftt.float() - bt.float()
        k = max(1, round(0.2 * tau.numel()))
        top = torch.zeros(tau.numel(), dtype=torch.bool)
        # reference top-k: largest |τ| first, ties to the lowest flat index (a stable sort)
        top[torch.sort(-tau.abs().reshape(-1), stable=True).indices[:k]] = True
        top = top.reshape(tau.shape)
        # kept entries are the fine-tuned weights exactly, dropped ones are the base weights exactly
        assert torch.equal(rt[top], ftt[top]), n
        assert torch.equal(rt[~top], bt[~top]), n
        total += tau.numel()
        kept += int(top.sum())
    assert kept / total == pytest.approx(0.2, abs=0.01)


def _big_pair(root, n_tensors=4, rows=1024, cols=1024):
    """A bf16 'model' of 4M parameters with fine-tuning-sized deltas, large enough that the header is noise."""
    g = torch.Generator().manual_seed(0)
    for name, noise in (("base", 0.0), ("ft", 1.0)):
        with atomic_dir(root / name) as tmp:
            w = ShardedWriter(tmp)
            for i in range(n_tensors):
                gi = torch.Generator().manual_seed(i)
                base = 0.02 * torch.randn(rows, cols, generator=gi)
                t = base + noise * 1e-3 * torch.randn(rows, cols, generator=g)
                w.add(f"layers.{i}.weight", t.to(torch.bfloat16))
            w.close()
    return root / "base", root / "ft"


@pytest.mark.parametrize("density,limit", [(0.1, 2.8), (0.01, 0.5)])
def test_bits_per_parameter_targets(tmp_path, density, limit):
    base, ft = _big_pair(tmp_path)
    d = tmp_path / "d.safetensors"
    code, out, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", d, "--density", str(density))
    assert code == 0, err
    code, out, _ = run_cli("inspect", d, "--json")
    info = json.loads(out)
    assert info["params"] == 4 * 1024 * 1024
    assert info["density"] == pytest.approx(density, rel=1e-3)
    assert info["bits_per_param"] == pytest.approx(8 * d.stat().st_size / info["params"])
    assert info["bits_per_param"] <= limit, info["bits_per_param"]
    code, table, _ = run_cli("inspect", d)
    assert f"{info['bits_per_param']:.3f}" in table and "dense size" in table
    # and the small file still rebuilds the kept entries exactly
    run_cli("apply", "--base", base, "--delta", d, "--out", tmp_path / "rec")
    f, r = open_checkpoint(ft), open_checkpoint(tmp_path / "rec")
    for n in f.names():
        same = (f.get(n) == r.get(n)).float().mean().item()
        assert same >= density  # kept entries match exactly; dropped ones match only by chance


def test_random_method_is_seeded_by_tensor_name(llama_pair, tmp_path):
    base, ft = llama_pair
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / f"{name}.safetensors",
                "--density", "0.3", "--method", "random", "--seed", str(seed))
    a, b, c = (DeltaFile(tmp_path / f"{x}.safetensors") for x in "abc")
    n = a.names()[0]
    assert torch.equal(a.get(n), b.get(n))
    assert not torch.equal(a.get(n), c.get(n))
    kept = sum(a.table[k]["nnz"] for k in a.names()) / sum(torch.Size(a.table[k]["shape"]).numel() for k in a.names())
    assert kept == pytest.approx(0.3, abs=0.02)


def test_delta_file_is_a_task_vector_source(llama_pair, tmp_path):
    base, ft = llama_pair
    run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
    d = DeltaFile(tmp_path / "d.safetensors")
    b, f = open_checkpoint(base), open_checkpoint(ft)
    for n in d.names():
        torch.testing.assert_close(d.get(n), f.get(n) - b.get(n), rtol=0, atol=1e-7)


def test_gap_and_mask_encoders_invert():
    for idx in ([], [0], [5], [0, 1, 2, 3], [127, 128, 16383, 16384, 2**21, 2**35]):
        t = torch.tensor(idx, dtype=torch.int64)
        assert torch.equal(decode_gaps(encode_gaps(t)), t)
    # consecutive runs cost one byte each; a gap of 128 needs two
    assert encode_gaps(torch.arange(10)).numel() == 10
    assert encode_gaps(torch.tensor([128])).tolist() == [0x80 | 0, 1]
    m = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_mask(m)
    assert packed.numel() == 126 and torch.equal(unpack_mask(packed, 1001), m)
