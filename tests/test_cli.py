"""The CLI end to end on real assets: convert stories260K, inspect, extract-lora into PEFT, and the demo."""

from __future__ import annotations

import json

import pytest
import torch

from compress.io.reader import open_checkpoint
from conftest import run_cli


def test_extract_lora_cli_loads_in_peft(llama_pair, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, ft = llama_pair
    code, out, err = run_cli("extract-lora", "--base", base, "--finetuned", ft, "--out", tmp_path / "lora",
                             "--rank", "64")
    assert code == 0, err
    assert "worst relative error" in out and "skipped" in out
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora").merge_and_unload()
    b, f = open_checkpoint(base), open_checkpoint(ft)
    sd = merged.state_dict()
    # full rank (64 >= every matrix side): every linear weight is the fine-tuned one; the rest stays at base
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"],
                               f.get("model.layers.0.self_attn.q_proj.weight"), rtol=1e-5, atol=1e-6)
    assert torch.equal(sd["model.layers.0.input_layernorm.weight"], b.get("model.layers.0.input_layernorm.weight"))
    code, out, _ = run_cli("inspect", tmp_path / "lora", "--json")
    info = json.loads(out)
    # r is capped at the largest rank any matrix can hold (hidden size 32)
    assert info["kind"] == "adapter" and info["r"] == 32 and info["peft_type"] == "LORA"


def test_inspect_checkpoint_counts_zeros(llama_pair):
    base, _ = llama_pair
    code, out, _ = run_cli("inspect", base, "--json", "--count-zeros")
    info = json.loads(out)
    ck = open_checkpoint(base)
    assert info["params"] == ck.numel and info["dense_bytes"] == ck.nbytes
    assert info["density"] == pytest.approx(sum(int(ck.get(n).count_nonzero()) for n in ck.names()) / ck.numel)


def test_convert_llama2c_cli_and_demo(tmp_path):
    from compress.demo import run_demo

    code, _, err = run_cli("convert-llama2c", "--out", tmp_path / "demo" / "stories260K")
    assert code == 0, err
    assert open_checkpoint(tmp_path / "demo" / "stories260K").numel > 250_000
    result = run_demo(tmp_path / "demo", steps=40, density=0.2, quiet=True)
    rows = {r["model"]: r["ppl"] for r in result["rows"]}
    base = rows["base"]
    # a fine-tune beats the base on its own held-out text; the dense merge beats the base on both
    assert rows["ft-shakespeare"]["shakespeare"] < base["shakespeare"]
    assert rows["ft-ptb"]["ptb"] < base["ptb"]
    merged = rows["merge dense λ=0.5"]
    assert merged["shakespeare"] < base["shakespeare"] and merged["ptb"] < base["ptb"]
    assert (tmp_path / "demo" / "results.md").read_text().count("\n") == len(rows) + 2
    assert (tmp_path / "demo" / "merge-dense" / "README.md").exists()
