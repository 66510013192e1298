"""`Pruner` and `compress prune` on real Hugging Face models: Wanda against a readable re-implementation of the
paper's formula, the shared calibration cache, protection, N:M on a whole model, the sparse file, bad input,
and the paper's ordering on the real stories260K."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_llama

from compress.data import corpus_path, read_text
from compress.prune import Pruner
from compress.sparsify.protect import Protect


@pytest.fixture(scope="module")
def stories(stories260k) -> Path:
    return stories260k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stories) -> Path:
    """A tiny random Llama (2 blocks, GQA) with stories260K's real 512-token tokenizer."""
    path = save_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0, vocab_size=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories / f, path / f)
    return path


@pytest.fixture(scope="module")
def calib_file(calib_wikitext) -> Path:
    return calib_wikitext


def _pruner(model, calib, cache, **kw):
    return Pruner(model, calib, nsamples=kw.pop("nsamples", 4), seqlen=kw.pop("seqlen", 32), cache_dir=cache,
                  quiet=True, **kw)


def test_wanda_masks_equal_the_paper_formula(tiny, calib_file, tmp_path):
    from transformers import LlamaForCausalLM

    p = _pruner(tiny, calib_file, tmp_path / "cache")
    result = p.prune(0.5, "wanda")

    # the paper, written out: inputs X of every linear layer on the calibration windows; score |W_ij|·‖X_j‖₂;
    # in every output row, the int(in·s) lowest scores are pruned
    model = LlamaForCausalLM.from_pretrained(tiny).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model(input_ids=p.windows())
    for h in hooks:
        h.remove()
    assert len(inputs) == 2 * 7 and set(inputs) == {m.name for m in p.modules}
    for name, xs in inputs.items():
        x = torch.cat(xs)
        w = dict(model.named_modules())[name].weight.detach()
        score = w.abs() * x.norm(dim=0)
        expected = torch.ones_like(w, dtype=torch.bool)
        k = int(w.shape[1] * 0.5)
        for row in range(w.shape[0]):
            expected[row, torch.argsort(score[row])[:k]] = False
        assert torch.equal(result.weights[name] != 0, expected), name
        assert torch.equal(result.weights[name][expected], w[expected])
    assert result.sparsity == pytest.approx(0.5)


def test_second_pruner_reads_the_cache_without_a_forward_pass(tiny, calib_file, tmp_path):
    cache = tmp_path / "cache"
    first = _pruner(tiny, calib_file, cache)
    a = first.prune(0.5, "wanda")
    b = first.prune([0.3, 0.7], "wanda")  # another strategy: no new pass
    assert first.forward_passes == 1 and len(list(cache.glob("*.norms.safetensors"))) == 1

    second = _pruner(tiny, calib_file, cache)
    calls = []
    second.model.register_forward_pre_hook(lambda *a: calls.append(1))
    assert all(torch.equal(a.weights[n], w) for n, w in second.prune(0.5, "wanda").weights.items())
    assert second.forward_passes == 0 and calls == []
    assert b.sparsity == pytest.approx(0.5, abs=1e-3)

    sg = second.prune(0.5, "sparsegpt")  # Hessians were not cached yet: one pass, then cached for the next
    assert second.forward_passes == 1 and len(calls) > 0
    st = second.stats(hessian=True)  # q/k/v (and gate/up) see one input tensor: one set of statistics each
    assert st["model.layers.0.self_attn.q_proj"] is st["model.layers.0.self_attn.v_proj"]
    assert st["model.layers.0.mlp.gate_proj"] is st["model.layers.0.mlp.up_proj"]
    assert st["model.layers.0.mlp.down_proj"] is not st["model.layers.0.mlp.up_proj"]
    from safetensors import safe_open
    with safe_open(str(next(cache.glob("*.hessian.safetensors"))), "pt") as f:
        assert sum(k.endswith(".hessian") for k in f.keys()) == 4 * 2  # attention in, o in, mlp in, down in
    many = second.prune_many([0.5, [0.3, 0.7], 0.6], "sparsegpt")  # K strategies, one batched solve per layer
    assert second.forward_passes == 1 and [round(r.sparsity, 3) for r in many] == [0.5, 0.5, 0.6]
    for n, w in sg.weights.items():
        torch.testing.assert_close(many[0].weights[n], w, rtol=1e-5, atol=1e-6)
    third = _pruner(tiny, calib_file, cache)
    assert all(torch.equal(sg.weights[n], w) for n, w in third.prune(0.5, "sparsegpt").weights.items())
    third.prune(0.5, "wanda")  # the Hessian file serves norms too
    assert third.forward_passes == 0
    other = _pruner(tiny, calib_file, cache, seed=1)  # another calibration sample: another key
    other.prune(0.5, "wanda")
    assert other.forward_passes == 1


def test_protected_rows_and_nm_on_a_whole_model(tiny, calib_file, tmp_path):
    p = _pruner(tiny, calib_file, tmp_path / "cache")
    q = "model.layers.0.self_attn.q_proj"
    protect = Protect(tensors=(r"layers\.1\.mlp\.down_proj",), rows={f"{q}.weight": [(0, 8)]},
                      cols={"model.layers.0.self_attn.o_proj.weight": [(4, 12)]})
    dense = {m.name: p._dense[m.name] for m in p.modules}
    for method in ("magnitude", "wanda", "sparsegpt"):
        r = p.prune(0.5, method, protect=protect)
        assert torch.equal(r.weights[q][:8], dense[q][:8]), method
        assert bool((r.weights[q][8:] == 0).any())
        assert bool((r.weights["model.layers.0.self_attn.o_proj"][:, 4:12] != 0).all())
        assert torch.equal(r.weights["model.layers.1.mlp.down_proj"], dense["model.layers.1.mlp.down_proj"])
        nm = p.prune(0.5, method, "2:4")
        for name, w in nm.weights.items():
            zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert bool((zeros == 2).all()), (method, name)


def test_owl_strategy_keeps_the_mean_over_parameters(tiny, calib_file, tmp_path):
    p = _pruner(tiny, calib_file, tmp_path / "cache")
    st = p.owl(0.7, m=3, lam=0.1)
    assert st.mean(p.block_params) == pytest.approx(0.7, abs=1e-9)
    assert st.layer_sparsity[0] != st.layer_sparsity[1]
    r = p.prune(st, "wanda")
    assert r.sparsity == pytest.approx(0.7, abs=1e-3)
    assert p.layer_sparsity(r) == pytest.approx(list(st.layer_sparsity), abs=1e-3)


def test_cli_writes_a_model_and_a_sparse_file_that_apply_restores(tiny, calib_file, tmp_path):
    from compress.io.reader import open_checkpoint

    out = tmp_path / "pruned"
    code, stdout, err = run_cli("prune", tiny, "--sparsity", "0.5", "--method", "sparsegpt", "--pattern", "2:4",
                                "--calib", calib_file, "--nsamples", "4", "--seqlen", "32", "--out", out,
                                "--cache-dir", tmp_path / "cache", "--dtype", "bf16")
    assert code == 0, err
    sparse = tmp_path / "pruned.sparse.safetensors"
    assert sparse.is_file() and (out / "prune.json").is_file()
    code, _, err = run_cli("apply", "--delta", sparse, "--out", tmp_path / "restored")
    assert code == 0, err
    a, b = open_checkpoint(out), open_checkpoint(tmp_path / "restored")
    assert a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    q = a.get("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16 and float((q == 0).float().mean()) == 0.5


def test_recipe_and_layer_sparsity(tiny, calib_file, tmp_path):
    import json

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"model: {tiny}\nmethod: wanda\nlayer_sparsity: [0.4, 0.6]\ncalib: {calib_file}\n"
                      f"nsamples: 4\nseqlen: 32\ncache_dir: {tmp_path / 'cache'}\nno_sparse: true\n")
    code, _, err = run_cli("prune", recipe, "--out", tmp_path / "o")
    assert code == 0, err
    info = json.loads((tmp_path / "o" / "prune.json").read_text())
    assert info["layer_sparsity_measured"] == pytest.approx([0.4, 0.6], abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "sparsity: must be in [0, 1)"),
    (["--sparsity", "0.3", "--pattern", "2:4"], "sparsity must be 0.5"),
    (["--layer-sparsity", "0.5,0.5,0.5"], "has 3 values but the model has 2 blocks"),
    (["--sparsity", "0.5", "--seqlen", "64", "--calib", "SHORT"], "fewer than one calibration sample"),
    (["--sparsity", "0.5", "--targets", "no_such_layer"], "no linear layers found"),
    (["--sparsity", "0.5", "--method", "wandaa"], "unknown pruning method 'wandaa' (choose one of magnitude, wanda, "
                                                  "sparsegpt)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    args = [str(short) if a == "SHORT" else a for a in args]
    out, cache = tmp_path / "out", tmp_path / "cache"
    code, stdout, err = run_cli("prune", tiny, *args, "--out", out, "--cache-dir", cache, "--nsamples", "2")
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err
    assert not out.exists() and not (tmp_path / "out.sparse.safetensors").exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_a_model_without_linear_layers_is_refused(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    from compress.errors import CompressError

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path / "r")
    with pytest.raises(CompressError, match="no linear layers found"):
        Pruner(tmp_path / "r", cache_dir=tmp_path / "cache")


def test_stories260k_magnitude_is_worse_than_wanda(stories, tmp_path):
    """The papers' ordering on a real pretrained model: at 50% magnitude pruning loses more than Wanda."""
    from compress.eval.perplexity import perplexity

    p = Pruner(stories, "wikitext2.valid", nsamples=16, seqlen=128, cache_dir=tmp_path, quiet=True)
    text = read_text(corpus_path("shakespeare"))[:40000]
    ppl = {}
    for method in ("magnitude", "wanda"):
        p.load(p.prune(0.5, method))
        ppl[method] = perplexity(p.model, p.tokenizer(), text, seqlen=256, max_tokens=8192)
    p.load(None)
    dense = perplexity(p.model, p.tokenizer(), text, seqlen=256, max_tokens=8192)
    assert dense < ppl["wanda"] < ppl["magnitude"], (dense, ppl)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_gpt2_conv1d_and_bert_encoder(arch, stories, calib_file, tmp_path):
    """GPT-2's Conv1D weights are [in, out]: Wanda's comparison group (an output row) is a stored column."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = BertModel(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(tmp_path / arch)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories / f, tmp_path / arch / f)
    p = _pruner(tmp_path / arch, calib_file, tmp_path / "cache")
    assert p.n_blocks == 2 and len(p.modules) == (8 if arch == "gpt2" else 12)
    for method in ("wanda", "sparsegpt"):
        p.save(p.prune(0.5, method), tmp_path / f"{arch}-{method}")
        sd = load_file(tmp_path / f"{arch}-{method}" / "model.safetensors")
        for m in p.modules:
            w = sd[f"{m.name}.weight"]
            rows = w.T if m.transposed else w
            assert rows.shape == (m.out_features, m.in_features)
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), m.name
            if method == "wanda":
                assert bool(((rows == 0).sum(1) == m.in_features // 2).all()), m.name
