"""Checkpoint reading in every layout HF writes, and the streaming, atomic, sharded writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.io.reader import open_checkpoint
from compress.io.writer import ShardedWriter, atomic_dir, copy_aux, parse_size, write_model_card


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(16, 8, generator=g), "b.bias": torch.randn(8, generator=g).to(torch.bfloat16),
            "c.ids": torch.arange(5), "d.flag": torch.tensor([True, False])}


def _check_same(ck, sd):
    assert sorted(ck.names()) == sorted(sd)
    for k, v in sd.items():
        assert ck.info(k).shape == tuple(v.shape) and ck.info(k).dtype == v.dtype
        assert torch.equal(ck.get(k), v)


def test_reads_single_safetensors_file_and_folder(tmp_path):
    sd = _state()
    save_file(sd, tmp_path / "model.safetensors")
    _check_same(open_checkpoint(tmp_path / "model.safetensors"), sd)
    _check_same(open_checkpoint(tmp_path), sd)


def test_reads_bin_with_weights_only(tmp_path):
    sd = _state()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    _check_same(open_checkpoint(tmp_path), sd)


def test_bin_with_pickled_code_is_refused(tmp_path):
    import argparse

    # any global that is not on torch's weights-only allow-list stands for arbitrary pickled code
    torch.save({"w": torch.zeros(1), "x": argparse.Namespace(cmd="rm -rf /")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CompressError, match="objects other than tensors .*argparse.Namespace"):
        open_checkpoint(tmp_path)


def test_sharded_writer_round_trips_and_matches_hf_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"layer.{i}.weight": torch.randn(64, 64, generator=g) for i in range(6)}  # 16 KiB each
    with atomic_dir(tmp_path / "out") as tmp:
        w = ShardedWriter(tmp, shard_size="40KB", metadata={"k": "v"})
        for k, v in sd.items():
            w.add(k, v)
        w.close()
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 6 * 64 * 64 * 4
    assert set(index["weight_map"]) == set(sd)
    # the reference reader (safetensors itself) agrees with what we wrote, shard by shard
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    assert all(torch.equal(merged[k], v) for k, v in sd.items())
    _check_same(open_checkpoint(out), sd)
    _check_same(open_checkpoint(out / "model.safetensors.index.json"), sd)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_writer_output_loads_in_transformers(tmp_path, llama_pair):
    from transformers import LlamaForCausalLM

    base, _ = llama_pair
    ck = open_checkpoint(base)
    with atomic_dir(tmp_path / "copy") as tmp:
        w = ShardedWriter(tmp, shard_size="30KB")
        for n in ck.names():
            w.add(n, ck.get(n))
        w.close()
        assert copy_aux(base, tmp) == ["config.json", "generation_config.json"]
        write_model_card(tmp, "t", "copy", {"base": str(base)})
    assert (tmp_path / "copy" / "model.safetensors.index.json").exists()
    a = LlamaForCausalLM.from_pretrained(base).state_dict()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "copy").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "base" in (tmp_path / "copy" / "README.md").read_text()


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_output_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CompressError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(CompressError, match="not a size"):
        parse_size("lots")


def test_listing_reads_no_tensor_data(tmp_path, monkeypatch):
    save_file(_state(), tmp_path / "model.safetensors")
    ck = open_checkpoint(tmp_path)
    import compress.io.reader as reader

    def boom(*a, **k):
        raise AssertionError("data was read")

    monkeypatch.setattr(reader.os, "preadv", boom)
    monkeypatch.setattr(reader, "map_range", boom)  # the two ways tensor bytes are read
    assert ck.info("a.weight").shape == (16, 8) and ck.numel == 16 * 8 + 8 + 5 + 2
    with pytest.raises(AssertionError, match="data was read"):
        ck.get("a.weight")


def test_all_finite_by_sum_with_overflow_fallback():
    import torch

    from compress.io.reader import all_finite

    x = torch.randn(1000).to(torch.bfloat16)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[7] = bad
        assert not all_finite(y)
    assert all_finite(torch.full((10,), 3e38, dtype=torch.bfloat16))  # the sum overflows, the entries do not


def test_reserved_header_in_place_and_when_it_overflows(tmp_path):
    import torch
    from safetensors.torch import load_file

    from compress.io.writer import ShardedWriter

    tensors = {f"layer.{i}.a_rather_long_tensor_name_to_fill_the_header.weight": torch.randn(3, 2)
               for i in range(40)}
    for expected in (40, 1):  # enough room; far too little room (falls back to moving the data)
        folder = tmp_path / f"e{expected}"
        folder.mkdir()
        w = ShardedWriter(folder, "5GB", expected_tensors=expected)
        for n, t in tensors.items():
            w.add(n, t)
        w.close()
        back = load_file(folder / "model.safetensors")
        assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
        assert not list(folder.glob("*.data"))
