"""Block-wise evaluation (issue 19 B): perplexity, KL, the UniCuCo evaluator and head scores run block by block
give the whole-model numbers, and hold one block of the model at a time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, save_llama, tiny_stories_llama

from compress.eval import kl_divergence, perplexity
from compress.eval.blockwise import blockwise_kl, blockwise_perplexity
from compress.io.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_stories_llama(tmp_path_factory.mktemp("evalblocks"))


def _save(model, path, tokenizer_from):
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, path / f)
    return path


@pytest.fixture(scope="module")
def family(lm, tmp_path_factory):
    """Tiny random GPT-2 (Conv1D, tied head) and Qwen2 (q/k/v biases) with the stories tokenizer; and a second
    Llama of the same shape as ``lm``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=1,
                                      eos_token_id=2))
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    other = save_llama(root / "llama2", seed=5, vocab_size=512, num_hidden_layers=4, hidden_size=48,
                       intermediate_size=96)
    return {"llama": lm, "gpt2": _save(gpt2, root / "gpt2", lm), "qwen2": _save(qwen, root / "qwen2", lm),
            "llama2": _save_tok(other, lm)}


def _save_tok(path, tokenizer_from):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, path / f)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_blockwise_perplexity_equals_whole_model(family, arch, calib_wikitext):
    path = family[arch]
    tok = load_tokenizer(path)
    kw = dict(seqlen=64, max_tokens=1500, batch_size=4)
    whole = perplexity(load_model(path), tok, calib_wikitext, **kw)
    blocks = blockwise_perplexity(path, tok, calib_wikitext, **kw)
    assert blocks == pytest.approx(whole, rel=1e-6)
    assert 50 < whole  # a random model: near the vocabulary size, far from 1


def test_blockwise_kl_equals_whole_model(family, calib_wikitext):
    a, b = family["llama"], family["llama2"]
    tok = load_tokenizer(a)
    kw = dict(seqlen=64, max_tokens=1500, batch_size=4)
    whole = kl_divergence(load_model(a), load_model(b), tok, calib_wikitext, **kw)
    blocks = blockwise_kl(a, b, tok, calib_wikitext, **kw)
    assert whole > 1e-3
    assert blocks == pytest.approx(whole, rel=1e-5)
    assert blockwise_kl(a, a, tok, calib_wikitext, **kw) == pytest.approx(0.0, abs=1e-9)


def test_eval_cli_blockwise_flag_and_auto(family, monkeypatch, calib_wikitext):
    a, b = family["llama"], family["llama2"]
    args = ["eval", a, "--kl-to", b, "--calib", calib_wikitext, "--seqlen", "64", "--max-tokens", "1000", "--json"]
    code, out_w, err = run_cli(*args, "--whole-model")
    assert code == 0, err
    code, out_b, err = run_cli(*args, "--blockwise")
    assert code == 0, err
    w, bl = json.loads(out_w), json.loads(out_b)
    assert (w["blockwise"], bl["blockwise"]) == (False, True)
    assert bl["kl_nats_per_token"] == pytest.approx(w["kl_nats_per_token"], rel=1e-5)
    # automatic: a tiny model runs whole; with no share of the device left for weights it runs block by block
    ppl = ["eval", a, "--perplexity", calib_wikitext, "--seqlen", "64", "--max-tokens", "1000", "--json"]
    code, out, err = run_cli(*ppl)
    assert code == 0 and json.loads(out)["blockwise"] is False, err
    monkeypatch.setattr("compress.io.fit.STREAM_SHARE", 0.0)
    code, out2, err = run_cli(*ppl)
    assert code == 0 and json.loads(out2)["blockwise"] is True, err
    assert json.loads(out2)["perplexity"] == pytest.approx(json.loads(out)["perplexity"], rel=1e-6)


def test_blockwise_refuses_an_encoder_decoder_with_one_line(lm, tmp_path, calib_wikitext):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    t5 = _save(T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                   num_heads=2)), tmp_path / "t5", lm)
    code, out, err = run_cli("eval", t5, "--perplexity", calib_wikitext, "--max-tokens", "200", "--blockwise")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "encoder-decoder" in err and "t5" in err
    bert = _save(BertModel(BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)), tmp_path / "bert", lm)
    code, out, err = run_cli("eval", bert, "--perplexity", calib_wikitext, "--max-tokens", "200", "--blockwise")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no LM head" in err and "bert" in err


STRATEGIES = ([0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.7, 0.2], [0.0, 0.9, 0.5, 0.5])


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_streaming_evaluator_equals_in_memory(lm, method, calib_wikitext):
    from compress.prune import Pruner
    from compress.strategy.evaluate import Evaluator

    def pruner():  # its own, with no cache: each streaming evaluator calibrates block by block
        return Pruner(lm, calib_wikitext, nsamples=8, seqlen=64)

    kw = dict(eval_windows=6, eval_seqlen=64, batch_size=4)
    mem = Evaluator(pruner(), method, streaming=False, **kw)
    stream = Evaluator(pruner(), method, streaming=True, **kw)
    cached = Evaluator(pruner(), method, streaming=True, host_cache=True, **kw)  # blocks from a host copy, once read
    assert (mem.stream, stream.ranked) == (None, None)
    for st in STRATEGIES:
        a, b, c = mem.evaluate(st), stream.evaluate(st), cached.evaluate(st)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-5) and a["kl"] > 1e-5
        assert c["kl"] == b["kl"]  # the masks never reach the host copy
        assert b["sparsity"] == pytest.approx(a["sparsity"], abs=1e-12)
    # only the embeddings, the LM head and the running block are on the device: never a second block
    model = stream.stream.runner.model
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert len(stream.stream.resident) == 4
    assert max(stream.stream.resident) == total - 3 * per_block
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())


def test_streaming_evaluator_refuses_update_methods_and_protection(lm, tmp_path, calib_wikitext):
    from compress.errors import CompressError
    from compress.prune import Pruner
    from compress.strategy.evaluate import Evaluator

    pruner = Pruner(lm, calib_wikitext, nsamples=8, seqlen=64, cache_dir=tmp_path / "cache")
    with pytest.raises(CompressError, match="sparsegpt.*mask methods"):
        Evaluator(pruner, "sparsegpt", eval_windows=2, eval_seqlen=64, streaming=True)
    with pytest.raises(CompressError, match="protected heads"):
        Evaluator(pruner, "wanda", eval_windows=2, eval_seqlen=64, streaming=True, protect=object())


def _head_probes(vocab: int):
    from compress.heads.capture import Probe

    g = torch.Generator().manual_seed(0)
    out = []
    for t in (9, 12, 7):
        ids = torch.randint(0, vocab, (t,), generator=g)
        span = torch.zeros(t, dtype=torch.bool)
        span[1:4] = True
        labels = torch.full((t,), -100)
        labels[-2:] = ids[-2:]
        out.append(Probe(ids, span, torch.cat([ids[:1], ids[4:]]), None, labels))
    return out


@pytest.fixture(scope="module")
def head_models(tmp_path_factory):
    from conftest import finetune_like

    root = tmp_path_factory.mktemp("heads")
    base = save_llama(root / "base", seed=0, num_hidden_layers=3)
    return base, finetune_like(base, root / "ft", scale=0.05)


@pytest.mark.parametrize("method", ["chd", "sink", "nhar", "seekr"])
def test_blockwise_head_scores_equal_whole_model(head_models, method):
    from compress.heads.blockwise import BlockCapture
    from compress.heads.score import score_heads

    base, ft = head_models
    probes = _head_probes(96)
    whole, meta_w = score_heads(load_model(ft), probes, method, base_model=load_model(base), quiet=True)
    with BlockCapture(ft) as cap, BlockCapture(base) as base_cap:
        seen = []  # parameters of the blocks on the device each time a block starts
        layers = cap.runner.model.model.layers
        hooks = [b.register_forward_pre_hook(lambda *_: seen.append(
            sum(p.numel() for p in layers.parameters() if p.device.type != "meta"))) for b in layers]
        blocks, meta_b = score_heads(cap, probes, method, base_model=base_cap, quiet=True)
        for h in hooks:
            h.remove()
    assert whole.abs().max() > 0
    assert torch.allclose(blocks, whole, rtol=1e-5, atol=1e-7)
    per_block = sum(p.numel() for p in layers[0].parameters())
    assert seen and max(seen) == per_block  # one block of the stack at a time, never two
    if method == "sink":
        assert meta_b["sink_rate"] == meta_w["sink_rate"]


def test_blockwise_head_scores_gpt2_and_the_cli(family, tmp_path):
    from compress.heads.blockwise import BlockCapture
    from compress.heads.score import score_heads
    from compress.heads.scorefile import load_scores

    probes = _head_probes(512)
    whole, _ = score_heads(load_model(family["gpt2"]), probes, "sink", quiet=True)
    with BlockCapture(family["gpt2"]) as cap:
        blocks, _ = score_heads(cap, probes, "sink", quiet=True)
    assert torch.allclose(blocks, whole, rtol=1e-5, atol=1e-7)
    lines = [json.dumps({"prompt": "The cat sat on the mat. Where is the cat?", "context": "The cat sat on the mat.",
                         "answer": "mat"}),
             json.dumps({"prompt": "The dog ate a bone. What did the dog eat?", "context": "The dog ate a bone.",
                         "answer": "bone"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    outs = {}
    for flag in ("--blockwise", "--whole-model"):
        out = tmp_path / f"s{flag}.safetensors"
        code, _, err = run_cli("heads", "score", family["llama"], "--method", "chd", "--probes", tmp_path / "p.jsonl",
                               "--out", out, flag, "-q")
        assert code == 0, err
        outs[flag] = load_scores(out).scores
    assert torch.allclose(outs["--blockwise"], outs["--whole-model"], rtol=1e-5, atol=1e-7)
