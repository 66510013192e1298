"""mergekit's planned forms through `compress merge`: frankenmerge slices, slerp by slices, per-slice sources and
parameters, modules, model+lora references and LoRA bases (against PEFT), tokenizer sections, chat templates,
mergekit's CLI flags, and hostile slice configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import finetune_like, run_cli, save_llama, tiny_stories_llama
from safetensors.torch import load_file

L = "model.layers.{}.{}"
LAYER_TENSORS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("slices")
    a = save_llama(root / "a", seed=0, num_hidden_layers=4)
    return a, finetune_like(a, root / "b", scale=0.05, seed=3)


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(tmp_path: Path, data: dict, name: str = "r.yml") -> Path:
    (tmp_path / name).write_text(yaml.safe_dump(data))
    return tmp_path / name


def _src(model, a, b, **kw) -> dict:
    return {"model": str(model), "layer_range": [a, b], **kw}


def test_frankenmerge_stacks_source_layers_exactly(pair, tmp_path):
    a, b = pair
    r = _recipe(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [_src(a, 0, 3)]}, {"sources": [_src(b, 1, 4)]}, {"sources": [_src(a, 3, 4)]}]})
    code, out, err = run_cli("merge", r, tmp_path / "f")  # mergekit's positional OUT
    assert code == 0, err
    o, A, B = _sd(tmp_path / "f"), _sd(a), _sd(b)
    plan = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (a, 3)]  # output layer k ← (model, source layer j)
    for k, (m, j) in enumerate(plan):
        src = A if m == a else B
        for t in LAYER_TENSORS:
            assert torch.equal(o[L.format(k, t)], src[L.format(j, t)]), (k, t)
    assert torch.equal(o["model.embed_tokens.weight"], A["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(o["model.norm.weight"], A["model.norm.weight"])  # the last slice's
    assert len(o) == 7 * len(LAYER_TENSORS) + 3
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(tmp_path / "f").config.num_hidden_layers == 7


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP by hand in float64 (Shoemake's formula on the normalised directions, as mergekit)."""
    v0, v1 = v0.double(), v1.double()
    dot = float((v0 / v0.norm() * (v1 / v1.norm())).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    th = math.acos(dot)
    return math.sin(th * (1 - t)) / math.sin(th) * v0 + math.sin(th * t) / math.sin(th) * v1


def test_slerp_by_slices_follows_each_slices_gradient(pair, tmp_path):
    a, b = pair
    r = _recipe(tmp_path, {"merge_method": "slerp", "base_model": str(a), "dtype": "float32",
                           "parameters": {"t": 0.5}, "slices": [
        {"sources": [_src(a, 0, 2), _src(b, 0, 2)], "parameters": {"t": [0.0, 1.0]}},
        {"sources": [_src(a, 2, 4), _src(b, 2, 4)],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.6]}, {"value": 0.9}]}}]})
    code, _, err = run_cli("merge", r, "--out", tmp_path / "s")
    assert code == 0, err
    o, A, B = _sd(tmp_path / "s"), _sd(a), _sd(b)
    # t runs 0 → 1 across each slice's own layers: slice 1 starts again at its first value
    expected_t = {0: (0.0, 0.0), 1: (1.0, 1.0), 2: (0.2, 0.9), 3: (0.6, 0.9)}
    for k, (t_attn, t_other) in expected_t.items():
        for name in LAYER_TENSORS:
            n = L.format(k, name)
            t = t_attn if "self_attn" in name else t_other
            assert torch.allclose(o[n].double(), _slerp(t, A[n], B[n]), atol=1e-6), (n, t)
    # outside the layers t = 0, with the first slice's settings before the layers and the last's after
    assert torch.equal(o["model.embed_tokens.weight"], A["model.embed_tokens.weight"])
    for n in ("model.norm.weight", "lm_head.weight"):
        assert torch.allclose(o[n].double(), _slerp(0.9, A[n], B[n]), atol=1e-6), n


def test_per_slice_sources_and_parameters_and_modules(pair, tmp_path):
    a, b = pair
    slices = [{"sources": [_src(a, 0, 2), _src(b, 0, 2, parameters={"weight": 0.5})]},
              {"sources": [_src(a, 2, 4), _src(b, 2, 4)], "parameters": {"weight": 2.0}}]
    data = {"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "float32",
            "parameters": {"weight": 1.0}}
    assert run_cli("merge", _recipe(tmp_path, {**data, "slices": slices}), tmp_path / "t")[0] == 0
    o, A, B = _sd(tmp_path / "t"), _sd(a), _sd(b)
    for k, w in ((0, 0.5), (1, 0.5), (2, 2.0), (3, 2.0)):
        n = L.format(k, "mlp.up_proj.weight")
        assert torch.allclose(o[n], A[n] + w * (B[n] - A[n]), atol=1e-6), (k, w)
    # the first slice's parameters govern the weights before the layers, the last's those after
    n = "model.embed_tokens.weight"
    assert torch.allclose(o[n], A[n] + 0.5 * (B[n] - A[n]), atol=1e-6)
    n = "lm_head.weight"
    assert torch.allclose(o[n], A[n] + 2.0 * (B[n] - A[n]), atol=1e-6)
    r = _recipe(tmp_path, {**data, "modules": {"default": {"slices": slices}}}, "m.yml")
    assert run_cli("merge", r, tmp_path / "m")[0] == 0
    m = _sd(tmp_path / "m")
    assert all(torch.equal(m[n], o[n]) for n in o)


def test_filters_match_source_names_per_model_and_output_names_shared(pair, tmp_path):
    a, b = pair
    per_model = [{"filter": "layers.3.", "value": 2.0}, {"value": 0.5}]  # the source's layer 3 = output layer 1
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "float32",
                           "parameters": {"lambda": [{"filter": "layers.0.", "value": 3.0}, {"value": 1.0}]},
                           "slices": [{"sources": [_src(a, 2, 4), _src(b, 2, 4, parameters={"weight": per_model})]}]})
    assert run_cli("merge", r, tmp_path / "o")[0] == 0
    o, A, B = _sd(tmp_path / "o"), _sd(a), _sd(b)
    for k, j, w, lam in ((0, 2, 0.5, 3.0), (1, 3, 2.0, 1.0)):
        n, src = L.format(k, "mlp.up_proj.weight"), L.format(j, "mlp.up_proj.weight")
        assert torch.allclose(o[n], A[src] + lam * w * (B[src] - A[src]), atol=1e-6), (k, w, lam)


def _lora(base: Path, out: Path, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path, dtype=None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_plus_lora_equals_peft_merge_and_unload(tmp_path, dtype):
    a = save_llama(tmp_path / "a", seed=0, dtype=dtype)
    adapter = _lora(a, tmp_path / "lora")
    ref = _peft_merged(a, adapter, dtype)
    r = _recipe(tmp_path, {"merge_method": "passthrough",
                           "slices": [{"sources": [_src(f"{a}+{adapter}", 0, 2)]}]})
    code, _, err = run_cli("merge", r, tmp_path / "o")
    assert code == 0, err
    o = _sd(tmp_path / "o")
    assert set(o) == set(ref)
    changed = [n for n in o if not torch.equal(ref[n], _sd(a)[n])]
    assert len(changed) == 6 and all("q_proj" in n or "v_proj" in n or "down_proj" in n for n in changed)
    for n in o:
        assert o[n].dtype == dtype and torch.equal(o[n], ref[n]), n  # bit for bit


def test_lora_as_base_model(pair, tmp_path):
    a, b = pair
    adapter = _lora(a, tmp_path / "lora")
    merged = _peft_merged(a, adapter)
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": f"{a}+{adapter}", "dtype": "float32",
                           "models": [{"model": str(b), "parameters": {"weight": 0.5}}]})
    code, _, err = run_cli("merge", r, tmp_path / "o")
    assert code == 0, err
    o, B = _sd(tmp_path / "o"), _sd(b)
    for n in o:
        assert torch.allclose(o[n], merged[n] + 0.5 * (B[n] - merged[n]), atol=1e-6), n


@pytest.fixture(scope="module")
def tok_pair(tmp_path_factory):
    """A Llama with stories260K's 512-token tokenizer, and a fine-tune whose tokenizer adds two tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tok")
    a = tiny_stories_llama(root)
    b = root / "b"
    model = LlamaForCausalLM.from_pretrained(finetune_like(a, root / "b0", scale=0.05, seed=5))
    tok = AutoTokenizer.from_pretrained(a)
    tok.add_tokens(["<tool>", "<done>"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[512:] = torch.arange(2 * 48, dtype=torch.float32).reshape(2, 48)
        model.lm_head.weight[512:] = -1.0
    model.save_pretrained(b)
    tok.save_pretrained(b)
    return a, b


def test_tokenizer_union_model_and_token_overrides(tok_pair, tmp_path):
    from transformers import AutoTokenizer

    a, b = tok_pair
    A, B = _sd(a), _sd(b)
    base = {"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "float32",
            "models": [{"model": str(b), "parameters": {"weight": 1.0}}]}
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    r = _recipe(tmp_path, {**base, "chat_template": template, "tokenizer": {
        "source": "union", "tokens": {"<done>": {"source": {"kind": "zero"}, "force": True},
                                      "<new>": {"source": {"kind": "model_token", "model": str(a), "token_id": 7}}}}})
    code, _, err = run_cli("merge", r, tmp_path / "u")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(tmp_path / "u")
    o = _sd(tmp_path / "u")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<tool>", "<done>", "<new>")}
    assert ids == {"<tool>": 512, "<done>": 513, "<new>": 514} and len(tok) == 515
    assert tok.chat_template == template
    assert json.loads((tmp_path / "u" / "config.json").read_text())["vocab_size"] == 515
    e = o["model.embed_tokens.weight"]
    assert e.shape == (515, 48)
    # a token only b has: a's row is b's (so b's delta there is 0) → b's row
    assert torch.equal(e[512], B["model.embed_tokens.weight"][512])
    assert torch.equal(e[513], torch.zeros(48))  # forced zero in every model
    assert torch.equal(e[514], A["model.embed_tokens.weight"][7])  # a's token 7 in both models: delta 0
    n = "model.embed_tokens.weight"
    assert torch.allclose(e[:512], B[n][:512], atol=1e-6)  # the shared rows: a + 1·(b − a)
    # the round trip: the output loads, and its tokenizer maps the new tokens onto those rows
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "u")
    assert torch.equal(model.get_input_embeddings().weight[tok.encode("<tool>", add_special_tokens=False)[0]],
                       B[n][512])

    # tokenizer_source: <model> takes that model's tokenizer; source: base keeps the base's 512 ids
    assert run_cli("merge", _recipe(tmp_path, {**base, "tokenizer_source": str(b)}, "m.yml"), tmp_path / "m")[0] == 0
    assert _sd(tmp_path / "m")[n].shape == (514, 48) and len(AutoTokenizer.from_pretrained(tmp_path / "m")) == 514
    r = _recipe(tmp_path, {**base, "tokenizer": {"source": "base", "pad_to_multiple_of": 64}}, "b.yml")
    assert run_cli("merge", r, tmp_path / "b")[0] == 0
    bb = _sd(tmp_path / "b")[n]
    assert bb.shape == (512, 48) and torch.allclose(bb, B[n][:512], atol=1e-6)


def test_tokenizer_union_of_two_new_vocabularies(tok_pair, tmp_path):
    # c adds <x> and the <tool> of b at another id: the union takes b's new tokens, then c's, in the recipe's order
    # (mergekit's order there follows a Python set, so it changes with PYTHONHASHSEED); rows go token by token
    from transformers import AutoTokenizer, LlamaForCausalLM

    a, b = tok_pair
    c = tmp_path / "c"
    model = LlamaForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    tok.add_tokens(["<x>", "<tool>"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[512:] = torch.tensor([[3.0], [5.0]]).expand(2, 48)
    model.save_pretrained(c)
    tok.save_pretrained(c)
    r = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "float32",
                           "tokenizer_source": "union", "models": [{"model": str(b), "parameters": {"weight": 0.5}},
                                                                   {"model": str(c), "parameters": {"weight": 0.5}}]})
    code, _, err = run_cli("merge", r, tmp_path / "u")
    assert code == 0, err
    out = AutoTokenizer.from_pretrained(tmp_path / "u")
    assert {t: out.convert_tokens_to_ids(t) for t in ("<tool>", "<done>", "<x>")} == {"<tool>": 512, "<done>": 513,
                                                                                    "<x>": 514}
    e, B, n = _sd(tmp_path / "u")["model.embed_tokens.weight"], _sd(b), "model.embed_tokens.weight"
    assert e.shape == (515, 48)
    # <tool>: the base lacks it, b and c have it: the base's row is their mean, each model keeps its own
    mean = (B[n][512] + 5.0) / 2
    assert torch.allclose(e[512], mean + 0.5 * (B[n][512] - mean) + 0.5 * (5.0 - mean), atol=1e-6)
    assert torch.equal(e[513], B[n][513]) and torch.equal(e[514], torch.full((48,), 3.0))  # one donor each


def test_named_chat_templates_render_as_mergekit_s(tok_pair, tmp_path):
    from transformers import AutoTokenizer

    from compress.bench.mergekit_cases import render_all
    from compress.merge.chat_templates import NAMED

    a, _ = tok_pair
    reference = json.loads((Path(__file__).parent / "data" / "mergekit_reference.json").read_text())["chat_templates"]
    tok = AutoTokenizer.from_pretrained(a)
    assert set(NAMED) == set(reference)  # every template mergekit 0.1.5 ships, under its name
    for name, renders in reference.items():
        assert render_all(NAMED[name], tok) == renders, name
    r = _recipe(tmp_path, {"merge_method": "linear", "dtype": "float32", "chat_template": "llama3",
                           "models": [{"model": str(a), "parameters": {"weight": 1.0}}]})
    code, _, err = run_cli("merge", r, tmp_path / "o")
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "o").chat_template == NAMED["llama3"]


def test_copy_tokenizer_flag(tok_pair, tmp_path):
    a, _ = tok_pair
    r = _recipe(tmp_path, {"merge_method": "linear", "dtype": "float32",
                           "models": [{"model": str(a), "parameters": {"weight": 1.0}}]})
    assert run_cli("merge", r, tmp_path / "with")[0] == 0
    assert run_cli("merge", r, tmp_path / "without", "--no-copy-tokenizer")[0] == 0
    assert (tmp_path / "with" / "tokenizer.json").is_file() and (tmp_path / "with" / "config.json").is_file()
    assert not (tmp_path / "without" / "tokenizer.json").exists() and (tmp_path / "without" / "config.json").is_file()


def test_mergekit_cli_forms_map_to_native_options(pair, tmp_path):
    from compress.merge.commands import mergekit_forms

    assert mergekit_forms(None, Path("o"), None, True, None, 5) == (Path("o"), "cuda", 5)
    assert mergekit_forms(Path("o"), Path("o"), "cuda:1", True, 5, 5) == (Path("o"), "cuda:1", 5)
    a, b = pair
    r = _recipe(tmp_path, {"merge_method": "dare_ties", "base_model": str(a), "dtype": "float32",
                           "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}]})
    code, _, err = run_cli("merge", r, tmp_path / "o", "--random-seed", "7", "--out-shard-size", "2K",
                           "--no-copy-tokenizer", "--lazy-unpickle")
    assert code == 0, err
    shards = sorted((tmp_path / "o").glob("*.safetensors"))
    sizes = [[t.numel() * 4 for t in load_file(s).values()] for s in shards]
    assert len(shards) > 20 and all(len(z) == 1 or sum(z) <= 2000 for z in sizes)  # 2K bytes, as mergekit's writer
    assert run_cli("merge", r, "--out", tmp_path / "n", "--seed", "7")[0] == 0
    assert run_cli("merge", r, "--out", tmp_path / "n8", "--seed", "8")[0] == 0
    o, n, n8 = _sd(tmp_path / "o"), _sd(tmp_path / "n"), _sd(tmp_path / "n8")
    assert all(torch.equal(o[k], n[k]) for k in n)  # --random-seed 7 is --seed 7
    assert any(not torch.equal(n8[k], n[k]) for k in n)
    for cmd, line in (((r, tmp_path / "x", "--out", tmp_path / "y"), "two output folders"),
                      ((r, tmp_path / "x", "--random-seed", "1", "--seed", "2"), "disagree"),
                      ((r, tmp_path / "x", "--cuda", "--device", "cpu"), "disagree"),
                      ((r, tmp_path / "x", "--out-shard-size", "lots"), "--out-shard-size"),
                      ((r, tmp_path / "x", "--allow-crimes"), "No such option: --allow-crimes")):
        code, _, err = run_cli("merge", *cmd)
        assert code == 2 and line in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("change,message", [
    ({"slices": [{"sources": [_src("A", 0, 9)]}]}, "layer_range [0, 9] is outside the 4 layers"),
    ({"slices": [{"sources": [_src("A", 0, 2), _src("B", 0, 3)]}]}, "same number of layers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [_src("A", 0, 2), _src("B", 0, 2)]}]},
     "passthrough takes exactly one source"),
    ({"slices": [{"sources": [_src("B", 0, 2)]}]}, "must be one of the slice's sources"),
    ({"slices": [{"sources": [{"model": "A", "layer_range": [0, "2"]}]}]}, "two integers"),
    ({"slices": [{"sources": [_src("A", 0, 2)], "colour": 1}]}, "unknown field 'colour'"),
    ({"modules": {"vision": {"slices": [{"sources": [_src("A", 0, 2)]}]}}}, "only 'default'"),
    ({"models": [{"model": "A+B+C"}]}, "is not 'MODEL' or 'MODEL+LORA'"),
    ({"models": [{"model": "A+B"}]}, "not a PEFT LoRA adapter folder"),
    ({"slices": [{"sources": [_src("A", 0, 2)]}], "models": [{"model": "A"}]}, "exactly one of"),
    ({"chat_template": "vicuna"}, "chat_template 'vicuna' is neither 'auto', a template name (alpaca, chatml"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
])
def test_hostile_slice_configs_one_line(pair, tmp_path, change, message):
    a, b = pair
    data = {"merge_method": "task_arithmetic", "base_model": str(a), **change}
    if not {"slices", "modules", "models"} & set(change):
        data["models"] = [{"model": str(b)}]
    text = yaml.safe_dump(data).replace("A+B+C", f"{a}+{b}+{b}").replace("A+B", f"{a}+{b}")
    text = text.replace("model: A", f"model: {a}").replace("model: B", f"model: {b}")
    (tmp_path / "r.yml").write_text(text)
    code, _, err = run_cli("merge", tmp_path / "r.yml", tmp_path / "o")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "r.yml" in err and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
