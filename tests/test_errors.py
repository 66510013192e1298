"""Bad input: one line on stderr naming the problem, exit code 2, and nothing left where the output would go."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, save_llama

from compress.io.reader import open_checkpoint


def _copy_with(src, dst, drop=(), change=None):
    from safetensors.torch import save_file

    # safetensors' own writer: ours refuses the NaN/Inf that a hostile copy needs
    ck = open_checkpoint(src)
    tensors = {n: change(n, ck.get(n)) if change else ck.get(n) for n in ck.names() if n not in drop}
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _expect_error(tmp_path, out, *args, match):
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert match in lines[0], lines[0]
    assert not out.exists(), "output written despite the error"
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, f"leftovers: {after - before}"
    return lines[0]


def test_missing_path(llama_pair, tmp_path):
    base, _ = llama_pair
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", tmp_path / "nope", "--out", out,
                  match=f"{tmp_path / 'nope'}: no such file or folder")


def test_folder_with_no_weights(llama_pair, tmp_path):
    base, _ = llama_pair
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", tmp_path / "empty", "--out", out,
                  match="holds no model weights")


def test_different_architecture(llama_pair, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base, _ = llama_pair
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", tmp_path / "gpt2", "--out", out,
                  match="architectures differ")


def test_shape_mismatch_names_the_tensor(llama_pair, tmp_path):
    base, _ = llama_pair
    other = save_llama(tmp_path / "wide", seed=0, intermediate_size=48)
    out = tmp_path / "d.safetensors"
    line = _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", other, "--out", out,
                         match="model.layers.0.mlp")
    assert "[48, 32]" in line or "[32, 48]" in line


def test_tensor_missing_from_one_side(llama_pair, tmp_path):
    base, ft = llama_pair
    cut = _copy_with(ft, tmp_path / "cut", drop={"model.layers.1.mlp.up_proj.weight"})
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", cut, "--out", out,
                  match="'model.layers.1.mlp.up_proj.weight' is in the base")


def test_extra_tensor_is_an_error_unless_carried(llama_pair, tmp_path):
    base, ft = llama_pair
    cut = _copy_with(ft, tmp_path / "cut", drop={"lm_head.weight"})
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", cut, "--finetuned", ft, "--out", out,
                  match="--extra carry")
    code, _, err = run_cli("extract", "--base", cut, "--finetuned", ft, "--out", out, "--extra", "carry")
    assert code == 0, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_input(llama_pair, tmp_path, bad):
    base, ft = llama_pair
    last = open_checkpoint(ft).names()[-1]

    def poison(n, t):
        if n == last:
            t = t.clone()
            t.view(-1)[3] = bad
        return t

    sick = _copy_with(ft, tmp_path / "sick", change=poison)
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", sick, "--out", out,
                  match=f"tensor '{last}' contains NaN or Inf")


@pytest.mark.parametrize("density", ["0", "-0.1", "1.5", "nan"])
def test_density_outside_range(llama_pair, tmp_path, density):
    base, ft = llama_pair
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", ft, "--out", out, "--density", density,
                  match="density: must be in (0, 1]")


def test_unwritable_output(llama_pair, tmp_path):
    base, ft = llama_pair
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "d.safetensors"
    code, _, stderr = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out)
    assert code == 2 and stderr.startswith("error: ") and "cannot write here" in stderr
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_existing_output_is_kept_without_overwrite(llama_pair, tmp_path):
    base, ft = llama_pair
    out = tmp_path / "d.safetensors"
    out.write_text("keep me")
    code, _, stderr = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out)
    assert code == 2 and "--overwrite" in stderr and out.read_text() == "keep me"


def test_apply_with_the_wrong_base(llama_pair, tmp_path):
    base, ft = llama_pair
    run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
    other = save_llama(tmp_path / "other", seed=0, intermediate_size=48)
    out = tmp_path / "rec"
    _expect_error(tmp_path, out, "apply", "--base", other, "--delta", tmp_path / "d.safetensors", "--out", out,
                  match="model.layers.0.mlp")


def test_apply_with_a_file_that_is_not_a_delta(llama_pair, tmp_path):
    base, _ = llama_pair
    out = tmp_path / "rec"
    _expect_error(tmp_path, out, "apply", "--base", base, "--delta", base / "model.safetensors", "--out", out,
                  match="not a compress delta file")


def test_bad_dtype_and_device(llama_pair, tmp_path):
    base, ft = llama_pair
    out = tmp_path / "d.safetensors"
    _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", ft, "--out", out, "--dtype", "int3",
                  match="unknown dtype 'int3'")
    if not torch.cuda.is_available():
        _expect_error(tmp_path, out, "extract", "--base", base, "--finetuned", ft, "--out", out, "--device", "cuda",
                      match="CUDA is not available")


def test_unknown_option_is_a_usage_error_not_a_traceback():
    code, _out, err = run_cli("zoo", "build", "lm-zoo", "--no-such-flag")
    assert code == 2
    assert "No such option: --no-such-flag" in err and "Traceback" not in err
