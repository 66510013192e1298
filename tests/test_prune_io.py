"""`compress prune` with nothing of the model held whole (issue 19): the sparse file is written in the block-wise
pass, byte for byte what ``write_sparse`` of the written folder gives, each byte once, the folder never read back,
and atomically; ``--eval-perplexity`` runs block by block and equals the whole-model perplexity."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_llama
from safetensors.torch import load_file, save_file

from compress.io.reader import open_checkpoint
from compress.io.sparse import header_room, present_aux, write_sparse

MAX_TOKENS = 1024
TOL = 1e-6  # float32, summed in another order


def _with_tokenizer(path: Path, stories: Path) -> Path:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories / f, path / f)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories260k) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    llama = save_llama(root / "llama", seed=0, hidden_size=128, intermediate_size=256, vocab_size=512)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        root / "gpt2")
    return {"llama": _with_tokenizer(llama, stories260k), "gpt2": _with_tokenizer(root / "gpt2", stories260k)}


def _prune(model, calib, out, *extra):
    return run_cli("prune", model, "--sparsity", "0.5", "--calib", calib, "--nsamples", "4", "--seqlen", "32",
                   "--out", out, "--quiet", *extra)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_the_sparse_file_of_the_pass_is_what_write_sparse_of_the_folder_writes(models, calib_wikitext, tmp_path,
                                                                             dtype):
    out = tmp_path / "p"
    code, stdout, err = _prune(models["llama"], calib_wikitext, out, *(["--dtype", dtype] if dtype else []))
    assert code == 0, err
    sparse = tmp_path / "p.sparse.safetensors"
    info = json.loads((out / "prune.json").read_text())
    ref = write_sparse(out, tmp_path / "ref.safetensors", quiet=True,
                       metadata={"method": "wanda", "pattern": "unstructured", "sparsity": f"{info['sparsity']:.6f}",
                                 "model": str(models["llama"])})
    assert sparse.read_bytes() == ref.path.read_bytes()
    assert f"and {sparse} ({ref.ratio:.1%} of the dense size" in stdout
    # the room was sized before any tensor came: the header fills exactly the bound of the plan
    n, header = _header(sparse)
    meta = header["__metadata__"]
    with open_checkpoint(out) as ck:
        plan = [(name, ck.info(name).shape, ck.info(name).dtype) for name in ck.names()]
    room = header_room(plan, present_aux(out), {k: v for k, v in meta.items() if k != "tensors"})
    assert n == -(-room // 8) * 8
    if dtype:  # the config it carries is the folder's, naming the dtype written
        assert json.loads(bytes(load_file(str(sparse))["__aux__::config.json"].tolist()))["dtype"] == "bfloat16"


def test_the_sparse_file_of_a_sharded_folder_and_2_4_codes_is_what_write_sparse_writes(models, calib_wikitext,
                                                                                        tmp_path):
    from compress.config import PruneConfig, build
    from compress.prune import run_prune

    out = tmp_path / "p"
    rep = run_prune(build(PruneConfig, model=models["llama"], method="sparsegpt", pattern="2:4", dtype="float16",
                          shard_size="300KB", calib=str(calib_wikitext), nsamples=4, seqlen=32, out=out, quiet=True))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    ref = write_sparse(out, tmp_path / "ref.safetensors", quiet=True,
                       metadata={"method": "sparsegpt", "pattern": "2:4", "sparsity": f"{rep['sparsity']:.6f}",
                                 "model": str(models["llama"])})
    assert (tmp_path / "p.sparse.safetensors").read_bytes() == ref.path.read_bytes()
    assert rep["sparse"]["file_bytes"] == ref.file_bytes
    rows = json.loads(_header(ref.path)[1]["__metadata__"]["tensors"]).values()
    assert sum(r["encoding"] == "nm24" for r in rows) == 14  # every linear layer in 2:4 codes


def test_prune_writes_each_byte_once_and_never_reads_the_folder_back(models, calib_wikitext, tmp_path):
    _prune(models["llama"], calib_wikitext, tmp_path / "warm")  # first-use caches read and write files of their own
    start = _io()
    code, _, err = _prune(models["llama"], calib_wikitext, tmp_path / "p")
    end = _io()
    assert code == 0, err
    folder, sparse = _size(tmp_path / "p"), _size(tmp_path / "p.sparse.safetensors")
    wrote, read = end["wchar"] - start["wchar"], end["rchar"] - start["rchar"]
    assert folder + sparse <= wrote <= folder + sparse + 4096, (wrote, folder, sparse)
    # the input once, the tokenizer and the text; reading the folder back for the sparse file adds its size
    weights = _size(models["llama"] / "model.safetensors")
    assert read < weights + folder // 2, (read, weights, folder)


def test_a_failure_late_in_the_pass_leaves_neither_output_nor_temporary(models, calib_wikitext, tmp_path):
    src = tmp_path / "in" / "m"
    shutil.copytree(models["llama"], src)
    sd = load_file(str(src / "model.safetensors"))
    culprit = "model.layers.1.post_attention_layernorm.weight"
    sd[culprit][3] = 1e6  # finite in float32, beyond float16: the last block's writes fail
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    root = tmp_path / "outs"
    root.mkdir()
    code, _, err = _prune(src, calib_wikitext, root / "p", "--dtype", "float16")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"tensor '{culprit}' overflows float16" in err
    assert list(root.iterdir()) == []  # no folder, no sparse file, no temporary of either


def test_a_sparse_file_inside_the_folder_is_refused_with_one_line(models, calib_wikitext, tmp_path):
    out = tmp_path / "p"
    code, _, err = _prune(models["llama"], calib_wikitext, out, "--sparse-out", out / "s.safetensors")
    assert code == 2 and err.count("\n") == 1 and "lies inside --out" in err, err
    assert not out.exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eval_perplexity_block_by_block_equals_the_whole_model(models, calib_wikitext, tmp_path, arch):
    from compress.config import PruneConfig, build
    from compress.eval.perplexity import perplexity
    from compress.io.models import load_model, load_tokenizer
    from compress.prune import run_prune

    model = models[arch]
    kw = dict(model=model, sparsity=0.5, calib=str(calib_wikitext), nsamples=4, seqlen=32, quiet=True,
              eval_perplexity=str(calib_wikitext), eval_seqlen=32, eval_max_tokens=MAX_TOKENS)
    written = run_prune(build(PruneConfig, out=tmp_path / "p", **kw))["perplexity"]
    held = run_prune(build(PruneConfig, **kw))["perplexity"]  # no folder: the pruned weights from memory
    tok = load_tokenizer(model)

    def whole(path):
        return perplexity(load_model(path, dtype=torch.float32), tok, calib_wikitext, seqlen=32,
                          max_tokens=MAX_TOKENS)

    dense, pruned = whole(model), whole(tmp_path / "p")
    assert abs(pruned / dense - 1) > 100 * TOL  # the two models differ far more than the tolerance
    for got in (written, held):
        assert math.isclose(got["dense"], dense, rel_tol=TOL), (got, dense)
        assert math.isclose(got["pruned"], pruned, rel_tol=TOL), (got, pruned)


def test_eval_perplexity_of_an_encoder_is_refused_before_anything_is_written(stories260k, calib_wikitext, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    _with_tokenizer(tmp_path / "bert", stories260k)
    code, _, err = _prune(tmp_path / "bert", calib_wikitext, tmp_path / "p", "--eval-perplexity", calib_wikitext)
    assert code == 2 and err.count("\n") == 1 and "model type 'bert') has no LM head" in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.sparse.safetensors").exists()
