"""``compress.io.models.load_model``, the one model loader (issue 18): the class from the config, weight files
checked before transformers reads them, one-line errors, and transformers' progress bars kept off stderr."""

import json

import pytest
import torch

from compress.errors import CompressError
from compress.io.models import hf_quiet, load_model, load_tokenizer, model_class
from tests.conftest import save_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_llama(tmp_path_factory.mktemp("models") / "llama", seed=0)


def test_kind_from_the_config_dtype_and_eval_mode(llama, capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    model = load_model(llama)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert capfd.readouterr().err == ""  # no loading bar, no info log
    assert hf_logging.is_progress_bar_enabled()  # and the caller's setting is back
    assert type(load_model(llama, kind="encoder")).__name__ == "LlamaModel"
    assert next(load_model(llama, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert model_class(llama)[2] == "causal"


def test_bad_inputs_are_one_line(tmp_path, llama):
    with pytest.raises(CompressError, match="not a Hugging Face model folder"):
        load_model(tmp_path)
    with pytest.raises(CompressError, match="dtype 'fp7' is not a torch dtype"):
        load_model(llama, dtype="fp7")
    with pytest.raises(CompressError, match="model kind 'vision' is not one of auto, causal, encoder, llava"):
        load_model(llama, kind="vision")
    # a truncated weights file is named by the checker, before transformers reads it
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((llama / "config.json").read_bytes())
    data = (llama / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="model.safetensors") as e:
        load_model(cut)
    assert "\n" not in str(e.value)
    # weights whose shapes the config does not describe
    wide = tmp_path / "wide"
    wide.mkdir()
    cfg = json.loads((llama / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2 * cfg["intermediate_size"]}))
    (wide / "model.safetensors").write_bytes(data)
    with pytest.raises(CompressError, match=rf"{wide}: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape "
                                            r"\[\d+, \d+\] but config.json describes") as e:
        load_model(wide)
    assert "\n" not in str(e.value)
    with pytest.raises(CompressError, match=f"{llama}: no tokenizer to encode the probes"):
        load_tokenizer(llama, why="no tokenizer to encode the probes")


def test_hf_quiet_restores_the_verbosity_after_an_error():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with pytest.raises(ValueError):
        with hf_quiet():
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            raise ValueError("inside")
    assert hf_logging.get_verbosity() == level


def test_save_module_writes_what_save_pretrained_writes(tmp_path):
    """The one folder writer, given an in-memory model, gives save_pretrained's tensors (tied copies dropped),
    a config naming the dtype written, and a folder that loads back to the same weights."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from compress.io.models import save_module

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    save_module(model, tmp_path / "ours", dtype=torch.bfloat16)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    ours = safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt")
    hf = safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt")
    assert sorted(ours.keys()) == sorted(hf.keys())
    assert "lm_head.weight" not in ours.keys()
    assert all(torch.equal(ours.get_tensor(k), hf.get_tensor(k)) for k in hf.keys())
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["dtype"] == "bfloat16"
    # the field a loader picks the class from (with the LM head): save_pretrained's value
    assert written["architectures"] == json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    from compress.io.models import load_model

    assert type(load_model(tmp_path / "ours")).__name__ == "LlamaForCausalLM"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, back.model.embed_tokens.weight)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
