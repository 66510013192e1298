"""``write_folder``, the one way a command writes a model (issue 18): round trip, sharding, aux files, the config
naming the dtype written (issue 20), atomicity, and each byte written once (measured from /proc/self/io)."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from compress.errors import CompressError
from compress.io.writer import ShardedWriter, atomic_dir, write_folder
from tests.conftest import run_cli


def _tensors(n: int = 6, numel: int = 1000, dtype=torch.float32, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [(f"model.layers.{i}.w", torch.randn(numel, generator=g).to(dtype).reshape(10, -1)) for i in range(n)]
    return out + [("model.position_ids", torch.arange(7, dtype=torch.int64))]  # an int buffer: no dtype vote


def _read(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _source(tmp_path, dtype_key="torch_dtype"):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", dtype_key: "float32",
                                                 "text_config": {"dtype": "float32", "hidden_size": 8}}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "stray.txt").write_text("not an aux file")
    return src


def test_also_sees_every_tensor_written_in_order_on_the_writing_thread(tmp_path):
    import threading

    seen = []
    write_folder(tmp_path / "out", _tensors(), also=lambda n, t: seen.append((n, t, threading.current_thread())))
    assert [n for n, _, _ in seen] == [n for n, _ in _tensors()]
    assert all(torch.equal(t, ref) for (_, t, _), (_, ref) in zip(seen, _tensors()))
    assert all(th is not threading.main_thread() for _, _, th in seen)
    assert {n: torch.equal(t, _read(tmp_path / "out")[n]) for n, t, _ in seen} == {n: True for n, _ in _tensors()}


def test_round_trip_sharded_with_aux_card_files_and_written_dtype(tmp_path):
    src = _source(tmp_path)
    tensors = _tensors(dtype=torch.bfloat16)
    seen = []
    out = write_folder(tmp_path / "out", iter(tensors), expected_tensors=len(tensors), shard_size=4500,
                       metadata={"compress": "test"}, aux_from=src, files={"prune.json": '{"a": 1}\n'},
                       finish=lambda d: seen.append(sorted(p.name for p in d.iterdir())),
                       card={"title": "T", "method": "m", "inputs": {"base": "b"}})
    assert out == tmp_path / "out"
    back = _read(out)
    assert set(back) == {n for n, _ in tensors}
    for name, t in tensors:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in tensors)
    with safe_open(str(out / shards[0]), "pt") as s:
        assert s.metadata() == {"format": "pt", "compress": "test"}
    cfg = json.loads((out / "config.json").read_text())
    # the config names what was written, in both spellings transformers reads, sub-configs included
    assert cfg["dtype"] == cfg["torch_dtype"] == cfg["text_config"]["dtype"] == "bfloat16"
    assert cfg["model_type"] == "llama" and cfg["text_config"]["hidden_size"] == 8
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and not (out / "stray.txt").exists()
    assert (out / "prune.json").read_text() == '{"a": 1}\n' and "# T" in (out / "README.md").read_text()
    # finish ran in the temporary folder, after the shards, aux files and files, before the config and card
    assert "config.json" in seen[0] and "prune.json" in seen[0] and "README.md" not in seen[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left


def test_config_left_byte_for_byte_when_it_names_the_dtype_or_dtypes_are_mixed(tmp_path):
    src = _source(tmp_path, dtype_key="dtype")
    before = (src / "config.json").read_bytes()
    write_folder(tmp_path / "same", _tensors(dtype=torch.float32), aux_from=src)
    assert (tmp_path / "same" / "config.json").read_bytes() == before
    mixed = _tensors(dtype=torch.bfloat16) + [("model.norm.weight", torch.ones(4))]
    write_folder(tmp_path / "mixed", mixed, aux_from=src)
    assert (tmp_path / "mixed" / "config.json").read_bytes() == before
    assert len(list((tmp_path / "mixed").glob("*.safetensors"))) == 1  # one shard: no index
    assert not (tmp_path / "mixed" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("failure", ["generator", "nan", "config", "also"])
def test_a_failure_mid_stream_leaves_nothing(tmp_path, failure):
    src = _source(tmp_path)
    if failure == "config":
        (src / "config.json").write_text("{not json")

    def tensors():
        for i, (name, t) in enumerate(_tensors()):
            if i == 3 and failure == "generator":
                raise RuntimeError("boom in the caller")
            if i == 3 and failure == "nan":
                t = t.clone()
                t[0, 0] = float("nan")
            yield name, t

    seen = []

    def also(name, t):  # a second output of the pass, on the writing thread: its error stops the folder too
        if failure == "also" and len(seen) == 3:
            raise CompressError(f"second output refused '{name}'")
        seen.append((name, t))

    out = tmp_path / "deep" / "out"
    expected = {"generator": (RuntimeError, "boom"), "nan": (CompressError, "'model.layers.3.w' came out with 1 NaN"),
                "config": (CompressError, re.escape(f"{src / 'config.json'}: not valid JSON")),
                "also": (CompressError, "second output refused 'model.layers.3.w'")}[failure]
    with pytest.raises(expected[0], match=expected[1]):
        write_folder(out, tensors(), expected_tensors=7, shard_size=4500, aux_from=src, also=also)
    assert not out.exists() and not out.parent.exists()  # nor the folder made for it, nor any temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_each_byte_is_written_once_and_the_reserveless_path_twice(tmp_path):
    """wchar counts every byte this process passes to write(2) (all threads, any filesystem); the folder is
    ~20 MB, so the few KB of other writes do not matter. The reserve-less writer, which copies each shard behind
    its header at close, is measured the same way: the measurement tells the two apart."""
    tensors = _tensors(n=20, numel=250_000)  # 20 MB of float32 in 4 shards
    start = _wchar()
    write_folder(tmp_path / "once", tensors, shard_size=6 * 10**6)
    once = _wchar() - start
    size = _folder_bytes(tmp_path / "once")
    assert size > 20 * 10**6 and len(list((tmp_path / "once").glob("*.safetensors"))) == 4
    assert once < 1.2 * size, (once, size)

    start = _wchar()
    with atomic_dir(tmp_path / "twice") as tmp:
        w = ShardedWriter(tmp, 6 * 10**6)  # no expected_tensors: no header room reserved
        for name, t in tensors:
            w.add(name, t)
        w.close()
    twice = _wchar() - start
    assert abs(_folder_bytes(tmp_path / "twice") - size) < 0.01 * size  # the same data, headers unpadded
    assert twice > 1.8 * size, (twice, size)


def test_apply_with_dtype_writes_a_config_naming_it(tmp_path, llama_pair):
    """Issue 20: `compress apply --dtype bf16` writes bf16 weights and a config that says so, so that
    from_pretrained(dtype="auto") loads them as bf16 (the base's config says float32)."""
    from transformers import AutoModelForCausalLM

    base, ft = llama_pair
    assert json.loads((base / "config.json").read_text()).get("dtype") == "float32"
    delta = tmp_path / "d.safetensors"
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--density", "1.0", "--out", delta)
    assert code == 0, err
    code, _, err = run_cli("apply", "--base", base, "--delta", delta, "--out", tmp_path / "rec", "--dtype", "bf16")
    assert code == 0, err
    assert json.loads((tmp_path / "rec" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in _read(tmp_path / "rec").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rec", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    # without --dtype the config is the base's, byte for byte
    code, _, err = run_cli("apply", "--base", base, "--delta", delta, "--out", tmp_path / "f32")
    assert code == 0, err
    assert (tmp_path / "f32" / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_apply_with_a_broken_config_is_one_line_and_writes_nothing(tmp_path, llama_pair):
    base, ft = llama_pair
    delta = tmp_path / "d.safetensors"
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", delta)[0] == 0
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "config.json").write_text("[1, 2]")
    out = tmp_path / "work" / "rec"
    out.parent.mkdir()
    code, _, err = run_cli("apply", "--base", base, "--delta", delta, "--out", out, "--dtype", "bf16",
                           "--config-from", other)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(other / "config.json") in err
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_device_chunks_give_the_tensors_bytes_across_chunk_edges(dtype):
    """The staged path a CUDA tensor leaves by (run here on the CPU with a 96-byte stage): the chunks joined are the
    tensor's bytes, for sizes below, at and across a chunk edge, and for a non-contiguous view."""
    from compress.io.writer import _device_chunks, _tensor_bytes

    g = torch.Generator().manual_seed(0)
    for shape in [(5,), (48,), (96,), (7, 29)]:
        t = (torch.randn(shape, generator=g) * 50).to(dtype)
        for view in (t, t.t() if t.dim() == 2 else t.flip(0)):
            joined = b"".join(bytes(c) for c in _device_chunks(view, size=96))
            assert joined == bytes(_tensor_bytes(view)), (shape, dtype)
            assert len(joined) == view.numel() * view.element_size()
