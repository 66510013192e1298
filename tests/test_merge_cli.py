"""`compress merge` / `compress interpolate` end to end on tiny Llamas: against PEFT on the state dicts, with
LoRA adapters and mergekit recipes as inputs, vocabulary rules and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import finetune_like, run_cli, save_llama
from peft.utils import merge_utils as peft
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = save_llama(root / "base", seed=0)
    return base, finetune_like(base, root / "a", seed=1), finetune_like(base, root / "b", seed=2)


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_ties_merge_equals_peft_ties_on_every_tensor(trio, tmp_path):
    base, a, b = trio
    code, _, err = run_cli("merge", "--base", base, "--models", a, b, "--method", "ties", "--variant", "peft",
                           "--density", "0.3", "--weights", "1.0", "0.5", "--lambda", "0.8", "--out", tmp_path / "m")
    assert code == 0, err
    out, B, A, Bm = _sd(tmp_path / "m"), _sd(base), _sd(a), _sd(b)
    for name, t in out.items():
        ref = B[name] + 0.8 * peft.ties([A[name] - B[name], Bm[name] - B[name]], torch.tensor([1.0, 0.5]), 0.3)
        assert torch.allclose(t, ref, atol=1e-6), name
    card = (tmp_path / "m" / "README.md").read_text()
    assert "ties" in card and "per_tensor" in card


def test_global_topk_keeps_the_density_over_the_whole_model(trio, tmp_path):
    base, a, _ = trio
    assert run_cli("merge", "--base", base, "--models", a, "--method", "ties", "--density", "0.1",
                   "--out", tmp_path / "g")[0] == 0
    out, B = _sd(tmp_path / "g"), _sd(base)
    changed = sum(int((out[n] != B[n]).sum()) for n in out)
    total = sum(B[n].numel() for n in out)
    assert changed == int(0.1 * total)  # one threshold for all tensors (no exact ties in float32 noise)
    per_layer = [(out[n] != B[n]).float().mean().item() for n in out if B[n].numel() > 100]
    assert max(per_layer) - min(per_layer) > 0.01  # unlike per-tensor top-k, tensors keep different shares


def test_lora_adapter_and_checkpoint_inputs_mix(trio, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base, a, _ = trio
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "adapter_full")
    args = ["--base", base, "--method", "task_arithmetic", "--weights", "0.7", "0.4"]
    assert run_cli("merge", *args, "--models", a, tmp_path / "adapter", "--out", tmp_path / "m1")[0] == 0
    assert run_cli("merge", *args, "--models", a, tmp_path / "adapter_full", "--out", tmp_path / "m2")[0] == 0
    m1, m2 = _sd(tmp_path / "m1"), _sd(tmp_path / "m2")
    assert all(torch.allclose(m1[n], m2[n], atol=1e-6) for n in m1)


def test_mergekit_recipe_with_gradients_and_filters(trio, tmp_path):
    base, a, b = trio
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"lambda": 0.9},
              "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                         {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 0.3},
                                                                      {"value": 0.6}], "density": 0.5}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", tmp_path / "r.yml", "--out", tmp_path / "m")
    assert code == 0, err
    out, B, A, Bm = _sd(tmp_path / "m"), _sd(base), _sd(a), _sd(b)
    from compress.merge.methods import combine, magnitude_keep

    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        t = 1.0 if ".1." in name else 0.0  # 2 layers: layer 0 → t=0, layer 1 → t=1
        dens_a, w_b = 0.2 + 0.6 * t, (0.3 if "mlp" in name else 0.6)
        da, db = A[name] - B[name], Bm[name] - B[name]
        da, db = da * magnitude_keep(da, dens_a), db * magnitude_keep(db, 0.5)
        # mergekit's ties: election on weighted deltas, divided by the agreeing weights
        ref = B[name] + 0.9 * combine(torch.stack([da, db]), [1.0, w_b], consensus="mass", sign_on="weighted",
                                      disjoint="weighted_mean")
        assert torch.allclose(out[name], ref, atol=1e-6), name


def test_own_recipe_and_flags_override(trio, tmp_path):
    base, a, b = trio
    recipe = {"method": "dare_ties", "base": str(base), "seed": 3,
              "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "parameters": {"density": 0.4}}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert run_cli("merge", tmp_path / "r.yml", "--out", tmp_path / "m1")[0] == 0
    assert run_cli("merge", tmp_path / "r.yml", "--out", tmp_path / "m2")[0] == 0
    assert run_cli("merge", tmp_path / "r.yml", "--seed", "4", "--out", tmp_path / "m3")[0] == 0
    m1, m2, m3 = _sd(tmp_path / "m1"), _sd(tmp_path / "m2"), _sd(tmp_path / "m3")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(m1[name], m2[name]) and not torch.equal(m1[name], m3[name])


def test_linear_and_slerp(trio, tmp_path):
    base, a, b = trio
    assert run_cli("merge", "--models", a, b, "--method", "linear", "--weights", "1", "3",
                   "--out", tmp_path / "lin")[0] == 0
    lin, A, Bm = _sd(tmp_path / "lin"), _sd(a), _sd(b)
    assert all(torch.allclose(lin[n], (A[n] + 3 * Bm[n]) / 4, atol=1e-6) for n in lin)
    assert run_cli("merge", "--base", base, "--models", a, "--method", "slerp", "--t", "1.0",
                   "--out", tmp_path / "s1")[0] == 0
    assert all(torch.allclose(v, A[n], atol=1e-5) for n, v in _sd(tmp_path / "s1").items())


def test_vocabulary_rules(tmp_path):
    base = save_llama(tmp_path / "base", seed=0)
    big = save_llama(tmp_path / "big", seed=1, vocab_size=100)  # 4 more rows than the base's 96
    code, _, err = run_cli("merge", "--base", base, "--models", big, "--method", "task_arithmetic",
                           "--out", tmp_path / "m")
    assert code == 2 and "vocabulary sizes differ" in err and "lm_head" in err
    assert not (tmp_path / "m").exists()
    assert run_cli("merge", "--base", base, "--models", big, "--method", "task_arithmetic", "--vocab", "base",
                   "--out", tmp_path / "mb")[0] == 0
    mb, G = _sd(tmp_path / "mb"), _sd(big)
    assert mb["model.embed_tokens.weight"].shape[0] == 96
    assert torch.allclose(mb["model.embed_tokens.weight"], G["model.embed_tokens.weight"][:96])
    assert run_cli("merge", "--base", base, "--models", big, "--method", "task_arithmetic", "--vocab", "union",
                   "--out", tmp_path / "mu")[0] == 0
    mu = _sd(tmp_path / "mu")
    assert mu["lm_head.weight"].shape[0] == 100
    assert torch.allclose(mu["lm_head.weight"][96:], G["lm_head.weight"][96:])
    import json
    assert json.loads((tmp_path / "mu" / "config.json").read_text())["vocab_size"] == 100


@pytest.mark.parametrize("case,args,message", [
    ("empty", ["--method", "ties"], "no models to merge"),
    ("weights", ["--method", "ties", "--weights", "1", "2", "3"], "3 weights given for 2 models"),
    ("method", ["--method", "tie"], "unknown merge method 'tie'"),
    ("density", ["--method", "ties", "--density", "1.5"], "density"),
])
def test_bad_flags_exit_2_and_write_nothing(trio, tmp_path, case, args, message):
    base, a, b = trio
    models = [] if case == "empty" else ["--models", a, b]
    code, _, err = run_cli("merge", "--base", base, *models, *args, "--out", tmp_path / "m")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_different_architectures_are_refused(trio, tmp_path):
    base, a, _ = trio
    other = save_llama(tmp_path / "deeper", seed=1, num_hidden_layers=3)
    code, _, err = run_cli("merge", "--base", base, "--models", a, other, "--method", "ties", "--out", tmp_path / "m")
    assert code == 2 and "differ in architecture" in err and "layers.2" in err
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli("merge", "--base", base, "--models", tmp_path / "gpt2", "--method", "ties",
                           "--out", tmp_path / "m")
    assert code == 2 and "architectures differ" in err and "gpt2" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("recipe,message", [
    ({"merge_method": "frankenmerge", "base_model": "x", "models": [{"model": "y"}]}, "merge_method 'frankenmerge'"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "parameters": {"dens": 0.2}},
     "unknown parameter 'dens'"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}], "colour": "red"},
     "unknown field 'colour'"),
    ({"method": "ties", "base": "x", "models": [{"model": "y"}], "densty": 0.2}, "densty"),
    ({"method": "ties", "base": "x", "models": []}, "models"),
])
def test_bad_recipes_name_the_field(tmp_path, recipe, message):
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("merge", tmp_path / "r.yml", "--out", tmp_path / "m")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_interpolate_writes_each_alpha_and_evaluates(trio, tmp_path):
    base, a, _ = trio
    code, out, err = run_cli("interpolate", "--base", base, "--finetuned", a, "--alpha", "0", "0.5", "1",
                             "--out", tmp_path / "i")
    assert code == 0, err
    A, B = _sd(a), _sd(base)
    one, half = _sd(tmp_path / "i" / "alpha-1"), _sd(tmp_path / "i" / "alpha-0.5")
    assert all(torch.allclose(one[n], A[n], atol=1e-6) for n in one)
    assert all(torch.allclose(half[n], (A[n] + B[n]) / 2, atol=1e-6) for n in half)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate("the quick brown fox jumps over lazy dog [UNK]"
                                                                   .split())}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    import shutil

    base = shutil.copytree(base, tmp_path / "base_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base)
    code, out, err = run_cli("interpolate", "--base", base, "--finetuned", a, "--alpha", "0", "1",
                             "--eval-perplexity", text, "--seqlen", "32")
    assert code == 0, err
    assert "alpha" in out and len([l for l in out.splitlines() if l.strip().startswith(("│ 0", "│ 1"))]) == 2


def test_example_recipes_parse():
    from compress.merge import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes" / "merge"
    ours = load_recipe(root / "ties.yml")
    assert ours.method == "ties" and ours.variant == "paper" and ours.parameters["density"] == 0.2
    mk = load_recipe(root / "mergekit-ties.yml")
    assert mk.variant == "mergekit" and mk.compute_dtype == "bfloat16" and len(mk.models) == 2
    assert mk.models[0].parameters["density"] == [0.2, 0.5]
    ms = load_recipe(root / "mergekit-model-stock.yml")
    assert ms.method == "model_stock" and ms.compute_dtype is None and ms.parameters == {"filter_wise": False}
