"""Block-wise execution (compress.io.blocks) and block-wise pruning: the runner reproduces the whole model; shared
calibration equals the whole-model statistics; sequential calibration equals a hand-written reference loop; the
written folder round-trips; an architecture that cannot be split is refused; the opt-in statistics cache stops on
a full disk with one line and no temporary; peak memory stays below half the weights."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compress.io.blocks import BlockRunner
from compress.prune import Pruner
from compress.prune import calib as C

COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def stories(stories260k) -> Path:
    return stories260k


@pytest.fixture(scope="module")
def calib_file(calib_wikitext) -> Path:
    return calib_wikitext


def _build(arch: str):
    import transformers as T

    torch.manual_seed(0)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, tie_word_embeddings=False))
    if arch == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**COMMON, sliding_window=8))
    if arch == "qwen2":  # one sliding-window layer, one full: each block gets its own mask
        return T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                                                max_window_layers=1))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    if arch == "bert":
        return T.BertModel(T.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64))
    if arch == "llava":
        return T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8),
            text_config=T.LlamaConfig(**COMMON)))
    raise AssertionError(arch)


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories) -> dict:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("llama", "mistral", "qwen2", "gpt2", "bert", "llava"):
        path = root / arch
        _build(arch).save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(stories / f, path / f)
        out[arch] = path
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "bert", "llava"])
def test_runner_reproduces_the_whole_model(models, arch):
    from compress.io.models import load_model

    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = load_model(models[arch])(input_ids=ids)
    ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
    with BlockRunner(models[arch]) as r:
        acts = r.start(ids.split(2))
        for i, block in r.blockwise():
            r.run(i, block, acts)
            # only the block that runs holds weights
            assert all(p.device.type == "meta" for j, b in enumerate(r.blocks) if j != i for p in b.parameters())
        got = torch.cat([r.head(h) for h in acts.hidden])
        assert torch.equal(got, ref)
        assert all(p.device.type == "meta" for p in r.blocks.parameters())
        if arch == "llava":  # never called on text, never read
            assert all(p.device.type == "meta" for p in r.model.model.vision_tower.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert", "llava"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_shared_block_wise_equals_the_whole_model_statistics(models, calib_file, arch, method):
    p = Pruner(models[arch], calib_file, nsamples=4, seqlen=32, quiet=True)
    blocks = p.prune_blocks(0.6, method, calibration="shared")
    assert p._model is None  # the block-wise path never loaded the model
    whole = p.prune(0.6, method)  # in memory, dense statistics of one whole-model pass
    assert set(blocks.weights) == set(whole.weights) and blocks.kept == whole.kept
    for name, w in whole.weights.items():
        assert torch.allclose(blocks.weights[name], w.cpu(), atol=1e-6, rtol=0), name
        assert torch.equal(blocks.weights[name] == 0, w.cpu() == 0), name


def _reference_sequential_wanda(path: Path, windows: torch.Tensor, sparsity: float, batch: int) -> dict:
    """The reference code's loop, written out for a Llama: block 0's inputs from the embeddings, each block's
    Wanda norms from its inputs, the block pruned, its outputs (pruned) fed to the next block."""
    from transformers import LlamaForCausalLM

    from compress.prune.methods import wanda_mask

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inner = model.model
    pos = torch.arange(windows.shape[1])[None]
    xs = [inner.embed_tokens(b) for b in windows.split(batch)]
    pe = inner.rotary_emb(xs[0], pos)
    out = {}
    with torch.no_grad():
        for li, layer in enumerate(inner.layers):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            sq = {n: torch.zeros(m.in_features) for n, m in linears.items()}

            def hook(_m, args, _out, n):
                sq[n].add_(args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))

            hooks = [m.register_forward_hook(lambda m_, a, o, n=n: hook(m_, a, o, n)) for n, m in linears.items()]
            for x in xs:
                layer(x, attention_mask=None, position_embeddings=pe, position_ids=pos)
            for h in hooks:
                h.remove()
            for n, m in linears.items():
                m.weight.mul_(wanda_mask(m.weight, sq[n].sqrt(), sparsity))
                out[f"model.layers.{li}.{n}"] = m.weight.clone()
            xs = [layer(x, attention_mask=None, position_embeddings=pe, position_ids=pos) for x in xs]
    return out


def test_sequential_equals_a_reference_loop_and_differs_from_shared(models, calib_file):
    p = Pruner(models["llama"], calib_file, nsamples=6, seqlen=32, batch_size=4, quiet=True, calibration="sequential")
    seq = p.prune(0.8, "wanda")
    ref = _reference_sequential_wanda(models["llama"], p.windows(), 0.8, 4)
    assert set(ref) == set(seq.weights)
    for name, w in ref.items():
        assert torch.allclose(seq.weights[name], w, atol=1e-6, rtol=0), name
        assert torch.equal(seq.weights[name] == 0, w == 0), name
    shared = p.prune_blocks(0.8, "wanda", calibration="shared")
    # block 0 sees the embeddings either way; block 1 sees pruned or dense outputs
    for name in seq.weights:
        same = torch.equal(seq.weights[name] == 0, shared.weights[name] == 0)
        assert same == name.startswith("model.layers.0."), name


def test_cli_writes_a_folder_that_loads_with_zeros_where_pruned(models, calib_file, tmp_path):
    from transformers import LlamaForCausalLM

    from compress.io.reader import open_checkpoint

    out = tmp_path / "pruned"
    code, stdout, err = run_cli("prune", models["llama"], "--sparsity", "0.5", "--method", "sparsegpt", "--calib",
                                calib_file, "--nsamples", "4", "--seqlen", "32", "--out", out, "--no-sparse")
    assert code == 0, err
    assert "calibration sequential" in err + stdout
    p = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, quiet=True, calibration="sequential")
    expected = p.prune(0.5, "sparsegpt")
    model = LlamaForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    src = open_checkpoint(models["llama"])
    for name in src.names():
        layer = name.removesuffix(".weight")
        if layer in expected.weights:
            assert torch.equal(params[name].detach(), expected.weights[layer]), name
            assert float((params[name] == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
        else:
            assert torch.equal(params[name].detach(), src.get(name)), name
    assert not list(tmp_path.glob(".pruned*"))


def test_an_encoder_decoder_is_refused_with_one_line(stories, calib_file, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
                               ).save_pretrained(tmp_path / "t5")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories / f, tmp_path / "t5" / f)
    out = tmp_path / "out"
    code, _, err = run_cli("prune", tmp_path / "t5", "--sparsity", "0.5", "--calib", calib_file, "--nsamples", "2",
                           "--seqlen", "16", "--out", out)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "model type 't5'" in err, err
    assert not out.exists() and not (tmp_path / "out.sparse.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t5"]


@pytest.mark.parametrize("path", ["blocks", "memory"])
def test_a_full_disk_stops_the_statistics_cache_with_one_line(models, calib_file, tmp_path, monkeypatch, path):
    from compress.io import writer

    real = writer.SafetensorsStreamWriter._write

    def full(self, data):
        if ".hessian.safetensors" in self.path.name:  # the cache file only: the model folder is written fine
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(writer.SafetensorsStreamWriter, "_write", full)
    cache, out = tmp_path / "cache", tmp_path / "out"
    if path == "blocks":
        code, _, err = run_cli("prune", models["llama"], "--sparsity", "0.5", "--method", "sparsegpt",
                               "--calibration", "shared", "--cache-dir", cache, "--calib", calib_file,
                               "--nsamples", "4", "--seqlen", "32", "--out", out)
        assert code == 2, err
        assert not out.exists() and not (tmp_path / "out.sparse.safetensors").exists()
    else:
        from compress.errors import CompressError

        p = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, cache_dir=cache, quiet=True)
        with pytest.raises(CompressError) as e:
            p.stats(hessian=True)
        err = f"error: {e.value}\n"
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert "no space left on device" in err and ".hessian.safetensors" in err, err
    assert list(cache.iterdir()) == []  # no temporary left


def test_the_shared_cache_is_opt_in_and_serves_a_second_run(models, calib_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    p = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, quiet=True)
    a = p.prune_blocks(0.5, "sparsegpt", calibration="shared")
    assert p.cache_dir is None and not cache.exists()
    monkeypatch.delenv("COMPRESS_QUIET")
    code, _, err = run_cli("prune", models["llama"], "--sparsity", "0.5", "--method", "sparsegpt", "--calibration",
                           "shared", "--cache-dir", cache, "--calib", calib_file, "--nsamples", "4", "--seqlen", "32",
                           "--out", tmp_path / "o", "--no-sparse")
    assert code == 0, err
    files = list(cache.glob("*.hessian.safetensors"))
    assert len(files) == 1 and list(cache.iterdir()) == files
    # the size printed before writing bounds the file's data (q/k/v and gate/up then store theirs once)
    printed = int(err.split("statistics cache: writing up to ")[1].split(" bytes")[0].split("(")[1].replace(",", ""))
    data = sum(C.stats_nbytes([p], True) for p in Pruner(models["llama"], quiet=True).modules)
    assert printed == data and printed / 3 < files[0].stat().st_size < printed
    q = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, quiet=True, cache_dir=cache)
    b = q.prune_blocks(0.5, "sparsegpt", calibration="shared")
    assert q.forward_passes == 0
    r = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, quiet=True, cache_dir=cache)
    c = r.prune(0.5, "sparsegpt")  # the in-memory path reads what the block-wise one wrote
    assert r.forward_passes == 0
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
        assert torch.allclose(c.weights[name].cpu(), a.weights[name], atol=1e-6, rtol=0), name


def test_owl_block_wise_equals_in_memory(models, calib_file):
    p = Pruner(models["llama"], calib_file, nsamples=4, seqlen=32, quiet=True)
    blocks = p.owl(0.7)
    assert p._model is None
    p.model  # noqa: B018  (loaded: the in-memory statistics answer now)
    memory = p.owl(0.7)
    assert blocks.layer_sparsity == pytest.approx(memory.layer_sparsity, abs=1e-9)
    assert blocks.info["outlier_ratio"] == pytest.approx(memory.info["outlier_ratio"], abs=1e-9)


def test_peak_memory_grows_by_less_than_half_the_weights(tmp_path, monkeypatch, calib_file):
    """`compress prune` of a ~20 M-parameter float32 Llama (28 narrow blocks) in a child process: its peak RSS
    exceeds the fixed cost (the same pruning of a 2-block model of the same width: imports, tokenizer, kernels)
    by less than half the weight bytes, also with --eval-perplexity (dense and pruned, block by block); the
    whole-model path held the model and a float32 copy of its layers."""
    from compress.bench.prune_memory import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = run(params=20e6, hidden=256, workdir=tmp_path / "work", results=tmp_path / "res", nsamples=4,
                 seqlen=64, calibrations=("sequential",), calib=str(calib_file), imports=False, eval_tokens=1024,
                 sparse=False, print_table=False)
    assert (tmp_path / "res" / "prune_memory.json").is_file() and (tmp_path / "res" / "prune_memory.md").is_file()
    assert 15e6 < report["params"] < 25e6 and report["config"]["blocks"] > 20
    assert [c["also"] for c in report["cases"]] == ["", "eval perplexity"]
    for case in report["cases"]:
        assert case["peak_rss_bytes"] < report["fixed_peak_rss_bytes"] + report["weight_bytes"] // 2, case
    assert "--eval-perplexity" in report["cases"][1]["command"]
    assert not (tmp_path / "work").exists()
