"""Head scorers on constructed tiny models with known answers, on a tiny random LLaVA (CPU), and the baked VHR
reinforcement against runtime scaling."""

from __future__ import annotations

import pytest
import torch

from compress.heads import attention_layout, head_protect
from compress.heads import methods as S
from compress.heads.capture import Probe
from compress.heads.score import score_heads

BOS, CTX, QRY = 1, [2, 3, 4], [8, 9, 10]


def constructed_llama():
    """One working layer of 4 heads (and a zero second layer), wired by hand. RoPE's lowest-frequency pair
    (dims 3 and 7 of each head) carries the q/k signal with rope_theta = 1e12, so positions do not matter.
    Embedding dims: 0 = 1 for every token, 1 = BOS marker, 2 = context marker, 8..15 = content.
    - head 0 (sink): keys read the BOS marker, so every query attends only to token 0;
    - head 1 (copy): keys read the context marker, so the last query attends to the context tokens only;
    - head 2: q = k = 0, uniform attention over all earlier tokens;
    - head 3: like head 2, with v = 0 (its output is always 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, rope_theta=1e12, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.model.layers.parameters():
            p.zero_()
        for n in m.model.layers[0].modules():
            if hasattr(n, "variance_epsilon"):
                n.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
        emb = torch.zeros(16, 32)
        emb[:, 0] = 1.0
        emb[BOS, 1] = 1.0
        emb[CTX, 2] = 1.0
        emb[:, 8:16] = torch.randn(16, 8) * 0.1
        c = torch.randn(3, 8)
        emb[CTX, 8:16] = 2 * c / c.norm(dim=1, keepdim=True)  # equal norms: RMSNorm scales them alike
        m.model.embed_tokens.weight.copy_(emb)
        a = m.model.layers[0].self_attn
        a.q_proj.weight[0 * 8 + 3, 0] = 1000.0
        a.k_proj.weight[0 * 8 + 3, 1] = 1.0
        a.q_proj.weight[1 * 8 + 3, 0] = 1000.0
        a.k_proj.weight[1 * 8 + 3, 2] = 1.0
        for h in range(3):
            a.v_proj.weight[h * 8:(h + 1) * 8, 8:16] = torch.eye(8)
        a.o_proj.weight.copy_(torch.eye(32))
    return m


def _probe(answer: bool = False):
    ids = torch.tensor([BOS, *CTX, *QRY])
    span = torch.tensor([False, True, True, True, False, False, False])
    labels = None
    if answer:
        ids = torch.cat([ids, torch.tensor([5])])
        span = torch.cat([span, torch.tensor([False])])
        labels = torch.full_like(ids, -100)
        labels[-1] = 5
    return Probe(ids, span, torch.tensor([BOS, *QRY]), None, labels)


def test_chd_copy_head_scores_highest_with_the_exact_ratio():
    m = constructed_llama()
    s, _ = score_heads(m, [_probe()], "chd", quiet=True)
    assert int(s[0].argmax()) == 1
    # head 1 averages the 3 context values or the 4 others; uniform head 2 moves by 3/7 of that
    assert s[0, 1] / s[0, 2] == pytest.approx(7 / 3, rel=1e-4)
    assert s[0, 0] < 1e-6 and s[0, 3] == 0 and torch.all(s[1] == 0)


def test_sink_ratio_known_answers():
    m = constructed_llama()
    s, meta = score_heads(m, [_probe()], "sink", quiet=True)
    T = 7
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6)  # head 0 attends only to token 0
    assert s[0, 1] == pytest.approx(1 / T, abs=1e-6)  # only the first query (itself token 0) sits there
    assert s[0, 2] == pytest.approx(sum(1 / (t + 1) for t in range(T)) / T, abs=1e-6)  # uniform causal rows
    assert meta["sink_rate"] == pytest.approx(float((s > 0.3).float().mean()))


def test_nhar_known_answers_and_inert_tokens():
    m = constructed_llama()
    no_anchor = torch.full((2, 1), -1)
    s, _ = score_heads(m, [_probe()], "nhar", anchors=no_anchor, quiet=True)
    assert s[0, 1] == pytest.approx(1.0, abs=1e-6) and s[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert s[0, 2] == pytest.approx(3 / 7, abs=1e-6)
    # every context token inert (anchors = whatever the lens decodes them to): nothing is left
    s2, meta = score_heads(m, [_probe()], "nhar", n_anchors=16, quiet=True)
    assert torch.all(s2 == 0) and meta["inert_share"] == 1.0
    # the pure function by hand
    attn = torch.tensor([[[0.5, 0.3, 0.2]]])
    assert S.nhar(attn, torch.tensor([False, True, True]), torch.tensor([[False, False, True]])).item() == \
        pytest.approx(0.3)


def test_seekr_only_the_head_that_moved_and_matters():
    m = constructed_llama()
    base = constructed_llama()
    with torch.no_grad():
        base.model.layers[0].self_attn.k_proj.weight[1 * 8 + 3, 2] = 0.0  # head 1 uniform before fine-tuning
    s, meta = score_heads(m, [_probe(answer=True)], "seekr", base_model=base, quiet=True)
    assert int(s.flatten().argmax()) == 1 and s[0, 1] > 0
    assert torch.all(s.flatten()[[0, 2, 3, 4, 5, 6, 7]] == 0)
    assert meta["sensitivity"][0][3] == 0  # v = 0: the loss does not depend on head 3's attention
    # the formula by hand: each factor divided by its maximum
    sens, forg = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 4.0]])
    assert S.seekr(sens, forg).tolist() == [[0.25, 0.5]]


def test_divergence_and_median_by_hand():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.zeros(2, 1, 2, 2)
    b[0, 0, 1] = torch.tensor([3.0, 4.0])
    b[1, 0, 1] = torch.tensor([0.0, 1.0])
    assert S.head_divergence(a, b).tolist() == [[0.0, 3.0]]
    assert S.above_layer_median(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[False, False, True]]


@pytest.fixture(scope="module")
def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, projection_dim=32)
    t = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_index=127)).eval()


def _llava_probes(n=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.tensor([1] + [127] * 16 + torch.randint(3, 120, (5,), generator=g).tolist())
        span = ids == 127
        out.append(Probe(ids, span, ids[~span], torch.randn(1, 3, 32, 32, generator=g)))
    return out


def test_llava_layout_and_scorers_on_cpu(tiny_llava, tmp_path):
    layout = attention_layout(tiny_llava)
    assert layout.n_layers == 2 and layout.n_kv_heads == 2
    assert layout.layers[0].q == "model.language_model.layers.0.self_attn.q_proj"  # not the vision tower's
    tiny_llava.save_pretrained(tmp_path / "llava")
    saved = attention_layout(tmp_path / "llava")  # names as the checkpoint stores them (transformers' legacy
    assert saved.layers[1].o.endswith("model.layers.1.self_attn.o_proj")  # LLaVA prefix), geometry the same
    assert "vision" not in saved.layers[1].o and (saved.n_heads, saved.n_kv_heads) == (4, 2)
    probes = _llava_probes()
    vhd, _ = score_heads(tiny_llava, probes, "vhd", quiet=True)
    # VHD re-implemented: o_proj inputs at the last position with and without the image, by our own hook
    grabbed = []
    hooks = [tiny_llava.get_submodule(n.o).register_forward_pre_hook(
        lambda mod, args: grabbed.append(args[0][0, -1].reshape(4, 8).clone())) for n in layout.layers]
    ref = torch.zeros(2, 4)
    with torch.no_grad():
        for p in probes:
            grabbed.clear()
            tiny_llava(input_ids=p.input_ids[None], pixel_values=p.pixel_values)
            tiny_llava(input_ids=p.without_ids[None])
            for layer in range(2):
                ref[layer] += (grabbed[layer] - grabbed[2 + layer]).norm(dim=-1) / len(probes)
    for h in hooks:
        h.remove()
    assert torch.allclose(vhd, ref, atol=1e-5) and bool((vhd > 0).all())
    nh, meta = score_heads(tiny_llava, probes, "nhar", quiet=True)
    sink, _ = score_heads(tiny_llava, probes, "sink", quiet=True)
    for s in (nh, sink):
        assert s.shape == (2, 4) and bool(((s >= 0) & (s <= 1 + 1e-6)).all())
    assert 0 < meta["inert_share"] < 1 and len(meta["anchors"]) == 2
    # protection of a LLaVA head: the language model's q rows, KV-group k/v rows and o_proj columns
    p = head_protect(tiny_llava, [(1, 3)])
    assert p.rows["model.language_model.layers.1.self_attn.k_proj.weight"] == [(8, 16)]
    assert p.cols["model.language_model.layers.1.self_attn.o_proj.weight"] == [(24, 32)]


def test_gpt2_and_bert_layouts():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    g = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    p = head_protect(g, [(1, 2)])
    # Conv1D c_attn [in, 3·hidden]: q, k, v columns of head 2 at offsets 0, 32, 64; c_proj rows of head 2
    assert p.cols["transformer.h.1.attn.c_attn.weight"] == [(16, 24), (48, 56), (80, 88)]
    assert p.rows["transformer.h.1.attn.c_attn.bias"] == [(16, 24), (48, 56), (80, 88)]
    assert p.rows["transformer.h.1.attn.c_proj.weight"] == [(16, 24)]
    b = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             vocab_size=64))
    p = head_protect(b, [(0, 0)])
    assert p.rows["encoder.layer.0.attention.self.value.weight"] == [(0, 8)]
    assert p.cols["encoder.layer.0.attention.output.dense.weight"] == [(0, 8)]
    assert p.keep("encoder.layer.0.attention.self.value.bias", (32,)).sum() == 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_baked_reinforcement_equals_runtime_scaling(tmp_path, arch):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    from compress.heads.reinforce import reinforce, runtime_scaling

    torch.manual_seed(0)
    if arch == "llama":
        from conftest import tiny_llama_config

        m = LlamaForCausalLM(tiny_llama_config()).eval()
    else:
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32)).eval()
    m.save_pretrained(tmp_path / "m")
    layout = attention_layout(m)
    heads = [(0, 1), (1, 2), (1, 3)]
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = m(ids).logits
        handles = runtime_scaling(m, layout, heads, 2.0)
        runtime = m(ids).logits
        for h in handles:
            h.remove()
    reinforce(tmp_path / "m", heads, 2.0, tmp_path / "r", quiet=True)
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    with torch.no_grad():
        got = baked(ids).logits
    assert not torch.allclose(plain, runtime, atol=1e-3)
    assert torch.allclose(got, runtime, atol=1e-5, rtol=1e-5)


def test_cli_probes_score_reinforce(tmp_path):
    import json
    import shutil

    from conftest import run_cli, save_llama

    from compress.data import stories260k_files
    from compress.heads.scorefile import load_scores
    from compress.io.llama2c import convert_llama2c
    from compress.zoo.lm import load_recipe
    from compress.zoo.recall_task import RecallTask

    code, out, err = run_cli("heads", "probes", "lm-zoo", "--quick", "--n", "6", "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    items = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    rec = load_recipe(quick=True)
    evals = {it["prompt"] for it in RecallTask(rec.recall.spec(rec.seed)).items(
        rec.recall.eval_size, seed=rec.recall.eval_seed, mix=rec.recall.eval_mix)}
    assert len(items) == 6 and all(it["context"] in it["prompt"] and it["prompt"] not in evals for it in items)
    assert run_cli("heads", "probes", "lm-zoo", "--quick", "--seed", "2", "--out", tmp_path / "q.jsonl")[0] == 2

    convert_llama2c(*stories260k_files(), tmp_path / "stories")
    model = save_llama(tmp_path / "m", seed=0, vocab_size=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "stories" / f, model / f)
    code, out, err = run_cli("heads", "score", model, "--method", "chd", "--probes", tmp_path / "p.jsonl",
                             "--out", tmp_path / "s.safetensors", "--quiet")
    assert code == 0, err
    sf = load_scores(tmp_path / "s.safetensors")
    assert sf.scores.shape == (2, 4) and sf.kv_scores.shape == (2, 2) and sf.metadata["method"] == "chd"
    assert torch.allclose(sf.kv_scores, sf.scores.reshape(2, 2, 2).mean(-1))
    assert (tmp_path / "s.png").stat().st_size > 1000
    code, out, err = run_cli("heads", "reinforce", model, "--scores", tmp_path / "s.safetensors", "--alpha", "2",
                             "--top-per-layer", "0.5", "--layers", "1", "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    assert "2 heads scaled" in out
    # errors: one line, exit 2
    code, _, err = run_cli("heads", "score", model, "--method", "seekr", "--probes", tmp_path / "p.jsonl",
                           "--out", tmp_path / "x.safetensors")
    assert code == 2 and "--base" in err
    code, _, err = run_cli("prune", model, "--sparsity", "0.5", "--protect-top", "0.2", "--out", tmp_path / "y")
    assert code == 2 and "--protect-heads" in err
