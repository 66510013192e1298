"""PEFT LoRA adapters in and out (compress.io.lora), checked against PEFT itself on tiny random models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.io.lora import UNSUPPORTED_OPTIONS, LoraAdapter, svd_lora, write_lora_adapter
from compress.io.reader import open_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "llama"
    LlamaForCausalLM(_llama_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2)).save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def peft_merged(base_path, adapter_path):
    """PEFT's own answer: the adapter loaded from disk onto the base, then merge_and_unload()."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load(base_path), adapter_path).merge_and_unload()
    return {k: v.clone() for k, v in merged.state_dict().items()}


def make_adapter(base_path, out, save_kw=None, **lora_kw):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved to ``out``; returns PEFT's merged state dict.

    The reference is the merge of the adapter reloaded from disk, not of the in-memory model: PEFT writes
    adapter_config.json with sort_keys=True, which reorders rank_pattern/alpha_pattern and so can change which
    pattern matches first."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_load(base_path), LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():  # modules_to_save copies start equal to the base: move them
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, **(save_kw or {}))
    return peft_merged(base_path, out)


def assert_matches_merge(adapter_path, base_path, merged, min_changed=1):
    base = open_checkpoint(base_path)
    with LoraAdapter(adapter_path, base) as ad:
        assert len(ad.names()) >= min_changed
        for name in base.names():
            got = base.get(name, dtype=torch.float32)
            if name in ad:
                assert ad.info(name).shape == got.shape
                got = got + ad.get(name)
            torch.testing.assert_close(got, merged[name], atol=1e-6, rtol=0, msg=name)
            if name not in ad:  # everything the adapter leaves out is unchanged by PEFT too
                assert torch.equal(got, merged[name]), name
    base.close()


LLAMA_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    # PEFT semantics: keys are regexes matched as (.*\.)?(key)$ and the first matching key in the saved (sorted)
    # order wins: layer 0's k_proj gets alpha 32 from 'k_proj', which sorts before 'layers\.0\...'
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={r"layers\.0\.self_attn\.k_proj": 5, "k_proj": 32, "down_proj": 3}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_lora_in_equals_peft_merge(case, llama_base, tmp_path):
    merged = make_adapter(llama_base, tmp_path / "ad", **LLAMA_CASES[case])
    assert_matches_merge(tmp_path / "ad", llama_base, merged)
    if case == "embedding":
        base = open_checkpoint(llama_base)
        assert LoraAdapter(tmp_path / "ad", base).get("model.embed_tokens.weight").abs().sum() > 0
    if case == "modules_to_save":
        assert "lm_head.weight" in LoraAdapter(tmp_path / "ad", open_checkpoint(llama_base))


def test_lora_in_bin_file_and_bare_base(llama_base, tmp_path):
    """adapter_model.bin reads like safetensors; a base saved from the bare LlamaModel ('layers.0...' without the
    'model.' prefix) resolves the same keys."""
    merged = make_adapter(llama_base, tmp_path / "ad", save_kw={"safe_serialization": False}, **LLAMA_CASES["plain"])
    assert (tmp_path / "ad" / "adapter_model.bin").is_file()
    assert_matches_merge(tmp_path / "ad", llama_base, merged)
    _load(llama_base).model.save_pretrained(tmp_path / "bare")
    bare = open_checkpoint(tmp_path / "bare")
    ad = LoraAdapter(tmp_path / "ad", bare)
    assert set(ad.names()) == {f"layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    for name in ad.names():
        torch.testing.assert_close(bare.get(name) + ad.get(name), merged["model." + name], atol=1e-6, rtol=0)


def test_lora_in_gpt2_fan_in_fan_out(gpt2_base, tmp_path):
    # c_attn (24 → 72) is a non-square Conv1D, attn.c_proj a square one; bias='all' saves the (moved) biases in
    # full and lora_bias=True adds scale · lora_B.bias on top
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_load(gpt2_base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        fan_in_fan_out=True, bias="all", lora_bias=True,
                                                        target_modules=["c_attn", "c_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ad")
    merged = peft_merged(gpt2_base, tmp_path / "ad")
    assert_matches_merge(tmp_path / "ad", gpt2_base, merged, min_changed=8)


def test_svd_lora_full_rank_and_eckart_young():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(24, 16, generator=g, dtype=torch.float64)
    A, B = svd_lora(d, 100)
    assert A.shape == (16, 16) and B.shape == (24, 16)
    torch.testing.assert_close(B @ A, d, atol=1e-10, rtol=0)
    S = torch.linalg.svdvals(d)
    for r in (1, 5, 12):
        A, B = svd_lora(d, r)
        assert A.shape == (r, 16) and B.shape == (24, r)
        err2 = float(torch.linalg.norm(d - B @ A) ** 2)
        assert err2 == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-9)
    A, B = svd_lora(d.float(), 16)  # float32 input: float tolerance
    assert A.dtype == torch.float32
    torch.testing.assert_close(B @ A, d.float(), atol=1e-5, rtol=0)


def _deltas(base, ft):
    for name in base.names():
        yield name, ft.get(name) - base.get(name)


@pytest.fixture(scope="module")
def llama_ft(llama_base, tmp_path_factory):
    model = _load(llama_base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("lora") / "llama_ft"
    model.save_pretrained(path)
    return path


def test_write_full_rank_loads_in_peft(llama_base, llama_ft, tmp_path):
    from peft import PeftModel

    base, ft = open_checkpoint(llama_base), open_checkpoint(llama_ft)
    summary = write_lora_adapter(_deltas(base, ft), tmp_path / "out", rank=64,
                                 base_model_name_or_path=str(llama_base), progress=False)
    # default targets: 2-D linear weights only
    assert set(summary["covered"]) == {n for n in base.names() if n.endswith("proj.weight")}
    assert summary["skipped"]["model.embed_tokens.weight"]["params"] == 64 * 32
    assert summary["skipped"]["model.norm.weight"] == {"params": 32, "reason": "1-D"}
    assert "lm_head.weight" in summary["skipped"]
    assert summary["skipped_params"] == sum(base.info(n).numel for n in summary["skipped"])
    assert max(c["rel_error"] for c in summary["covered"].values()) < 1e-5
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and cfg["lora_alpha"] == 32 and cfg["peft_type"] == "LORA"
    # k_proj/v_proj are 16 × 32: rank capped at 16, so they need rank_pattern and alpha_pattern (scale 1)
    assert cfg["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert "model.layers.1.mlp.down_proj" in cfg["target_modules"]

    merged = PeftModel.from_pretrained(_load(llama_base), tmp_path / "out").merge_and_unload().state_dict()
    for name in base.names():
        want = ft.get(name) if name in summary["covered"] else base.get(name)
        torch.testing.assert_close(merged[name], want, atol=2e-6, rtol=0, msg=name)
    ad = LoraAdapter(tmp_path / "out", base)  # round trip through the reader
    assert set(ad.names()) == set(summary["covered"])
    for name in ad.names():
        torch.testing.assert_close(ad.get(name), ft.get(name) - base.get(name), atol=2e-6, rtol=0)
    with pytest.raises(CompressError, match="already exists"):
        write_lora_adapter(iter([]), tmp_path / "out", rank=4, base_model_name_or_path="x", progress=False)


def test_write_low_rank_with_embeddings_matches_peft(llama_base, llama_ft, tmp_path):
    """Low rank, every 2-D weight (embed_tokens in PEFT's lora_embedding layout, lm_head as Linear): PEFT's merge
    equals base + the reader's ΔW, and each error is the SVD tail."""
    from peft import PeftModel

    base, ft = open_checkpoint(llama_base), open_checkpoint(llama_ft)
    summary = write_lora_adapter(_deltas(base, ft), tmp_path / "out", rank=6, base_model_name_or_path=str(llama_base),
                                 targets_regex=".", dtype=torch.float32, progress=False)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(summary["covered"])
    for name, c in summary["covered"].items():
        d = ft.get(name) - base.get(name)
        S = torch.linalg.svdvals(d.double())
        assert c["rank"] == 6
        assert c["rel_error"] == pytest.approx(float((S[6:] ** 2).sum().sqrt() / S.norm()), rel=1e-3)
    merged = PeftModel.from_pretrained(_load(llama_base), tmp_path / "out").merge_and_unload().state_dict()
    ad = LoraAdapter(tmp_path / "out", base)
    for name in base.names():
        want = base.get(name) + (ad.get(name) if name in ad else 0)
        torch.testing.assert_close(merged[name], want, atol=2e-6, rtol=0, msg=name)


def test_write_gpt2_conv1d_full_rank(gpt2_base, tmp_path):
    from peft import PeftModel

    base = open_checkpoint(gpt2_base)
    g = torch.Generator().manual_seed(5)
    deltas = {n: 0.05 * torch.randn(base.info(n).shape, generator=g) for n in base.names() if "c_attn" in n}
    summary = write_lora_adapter(deltas.items(), tmp_path / "out", rank=24, base_model_name_or_path=str(gpt2_base),
                                 fan_in_fan_out=True, progress=False)
    assert set(summary["covered"]) == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    merged = PeftModel.from_pretrained(_load(gpt2_base), tmp_path / "out").merge_and_unload().state_dict()
    for name in summary["covered"]:
        torch.testing.assert_close(merged[name], base.get(name) + deltas[name], atol=2e-6, rtol=0)


def test_dora_is_refused(llama_base, tmp_path):
    make_adapter(llama_base, tmp_path / "ad", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CompressError, match="use_dora"):
        LoraAdapter(tmp_path / "ad", open_checkpoint(llama_base))


def test_key_without_base_tensor_is_named(llama_base, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                        "target_modules": ["nope_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight"
    save_file({key: torch.zeros(2, 32), key.replace("lora_A", "lora_B"): torch.zeros(32, 2)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(CompressError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.nope_proj\.lora_"):
        LoraAdapter(ad, open_checkpoint(llama_base))


def test_unsupported_options_cover_peft_variants():
    """Every LoraConfig field PEFT tags as a LoRA variant is refused (fails when PEFT adds a new one)."""
    from peft import LoraConfig

    variants = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert variants <= set(UNSUPPORTED_OPTIONS)
