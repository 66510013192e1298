"""NaN and Inf never reach an output (issue 17, item 4): α is validated as a finite number by the schema, the
perplexity selection skips non-finite scores, and every tensor written is checked finite in the writer, with
an overflow named as such."""

import json
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compress.config import InterpolateConfig
from compress.io.writer import ShardedWriter, atomic_dir
from compress.merge.interpolate import best_alpha
from compress.taskvec import TaskVector
from tests.conftest import finetune_like, run_cli, save_llama, tiny_stories_llama


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _nothing_at(out) -> None:
    """No output and no temporary of it beside it."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def _edit(src, dst, fn) -> None:
    """A copy of the safetensors file ``src`` with its tensors passed through ``fn`` (a stranger's edited file)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), str(dst), metadata=meta)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    base = save_llama(root / "base", seed=0)
    return base, finetune_like(base, root / "ft")


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory, pair):
    """A fine-tuned model one of whose weights holds 1e5: finite in float32, beyond float16's 65504."""
    root = tmp_path_factory.mktemp("big")
    base, ft = pair
    big = root / "ft"
    big.mkdir()
    for f in ft.iterdir():
        (big / f.name).write_bytes(f.read_bytes())

    def grow(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = 1e5
        return t
    _edit(ft / "model.safetensors", big / "model.safetensors", grow)
    return base, big


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_non_finite_alpha_is_refused_by_the_schema(tmp_path, pair, alpha):
    base, ft = pair
    out = tmp_path / "o"
    code, _, err = run_cli("interpolate", "--base", base, "--finetuned", ft, "--alpha", "0.5", alpha, "--out", out)
    line = _one_line(err)
    assert code == 2 and "alphas.1" in line and "finite" in line
    _nothing_at(out)
    with pytest.raises(ValidationError, match="finite"):  # the API (and any recipe) validates the same way
        InterpolateConfig(base=base, finetuned=ft, alphas=[float(alpha)])


def test_alpha_that_overflows_float32_is_refused_before_the_rename(tmp_path, pair):
    base, ft = pair
    out = tmp_path / "o"
    code, _, err = run_cli("interpolate", "--base", base, "--finetuned", ft, "--alpha", "1e39", "--out", out)
    line = _one_line(err)
    assert code == 2 and "overflows float32" in line and "tensor '" in line
    _nothing_at(out)


def test_the_writer_refuses_nan_whoever_calls_it(tmp_path, pair):
    base, ft = pair
    out = tmp_path / "o"
    with pytest.raises(Exception, match=r"tensor '[^']+' came out with \d+ NaN"):
        TaskVector.from_paths(base, ft).apply(base, out, scale=float("nan"), quiet=True)
    _nothing_at(out)
    with pytest.raises(Exception, match="tensor 'w' came out with 1 NaN of 4"):
        with atomic_dir(out) as tmp:
            w = ShardedWriter(tmp)
            w.add("ok", torch.ones(3))
            w.add("w", torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    _nothing_at(out)


def test_perplexity_selection_never_chooses_a_non_finite_score(tmp_path):
    from compress.data import corpus_path, read_text

    base = tiny_stories_llama(tmp_path)
    ft = finetune_like(base, tmp_path / "ft")
    text = tmp_path / "text.txt"
    text.write_text(read_text(corpus_path("wikitext2.valid"))[:4000])
    out = tmp_path / "o"
    # α = 1e39 makes every weight Inf: its perplexity is NaN, and NaN listed first used to win min()
    code, stdout, err = run_cli("interpolate", "--base", base, "--finetuned", ft, "--alpha", "1e39", "0.5",
                                "--eval-perplexity", text, "--seqlen", "64", "--max-tokens", "256", "--out", out)
    assert code == 0, err
    assert "nan" in stdout and "best α = 0.5" in stdout
    card = (out / "README.md").read_text()
    assert "alpha: `0.5`" in card
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    out2 = tmp_path / "o2"
    code, _, err = run_cli("interpolate", "--base", base, "--finetuned", ft, "--alpha", "1e39",
                           "--eval-perplexity", text, "--seqlen", "64", "--max-tokens", "256", "--out", out2)
    line = err.strip().splitlines()[-1]  # transformers' loading bar may precede it
    assert code == 2 and line.startswith("error: no α gave a finite score") and "1e+39" in line
    assert not [ln for ln in err.strip().splitlines() if ln.startswith(("error", "Traceback"))][:-1]
    _nothing_at(out2)
    assert best_alpha([1.0, 2.0, 3.0], [math.nan, 5.0, math.inf]) == 2.0


@pytest.mark.parametrize("command", ["extract", "apply", "merge"])
def test_fp16_overflow_is_named_and_nothing_written(tmp_path, big_pair, command):
    base, ft = big_pair
    if command == "extract":
        out = tmp_path / "d.safetensors"
        args = ["extract", "--base", base, "--finetuned", ft, "--dtype", "fp16", "--out", out]
    elif command == "apply":
        delta = tmp_path / "d32.safetensors"
        code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", delta)
        assert code == 0, err
        out = tmp_path / "o"
        args = ["apply", "--base", base, "--delta", delta, "--dtype", "fp16", "--out", out]
    else:
        out = tmp_path / "o"
        args = ["merge", "--base", base, "--models", ft, "--method", "task_arithmetic", "--dtype", "fp16",
                "--out", out]
    code, _, err = run_cli(*args)
    line = _one_line(err)
    assert code == 2, err
    assert "tensor 'model.layers.1.mlp.down_proj.weight' overflows float16" in line and "1 of 2048" in line
    _nothing_at(out)


def test_bf16_overflow_from_apply(tmp_path, pair):
    base, ft = pair
    huge = tmp_path / "ft"
    huge.mkdir()
    for f in ft.iterdir():
        (huge / f.name).write_bytes(f.read_bytes())

    def grow(t):
        t["model.norm.weight"][0] = 3.4e38  # float32 holds it; bfloat16's largest is 3.39e38
        return t
    _edit(ft / "model.safetensors", huge / "model.safetensors", grow)
    out = tmp_path / "o"
    code, _, err = run_cli("interpolate", "--base", base, "--finetuned", huge, "--alpha", "1", "--dtype", "bf16",
                           "--out", out)
    line = _one_line(err)
    assert code == 2 and "tensor 'model.norm.weight' overflows bfloat16" in line
    _nothing_at(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_apply_of_a_delta_holding_nan_or_inf(tmp_path, pair, bad):
    base, ft = pair
    delta = tmp_path / "d.safetensors"
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", delta)[0] == 0
    poisoned = tmp_path / "bad.safetensors"
    key = "model.layers.0.self_attn.v_proj.weight::values"

    def poison(t):
        t[key][7] = bad
        return t
    _edit(delta, poisoned, poison)
    out = tmp_path / "o"
    code, _, err = run_cli("apply", "--base", base, "--delta", poisoned, "--out", out)
    line = _one_line(err)
    assert code == 2 and "model.layers.0.self_attn.v_proj.weight" in line
    assert ("NaN" in line) if bad != bad else ("Inf" in line or "overflows" in line)
    _nothing_at(out)


def test_prune_refuses_nan_weights(tmp_path, pair):
    base, _ = pair
    model = tmp_path / "m"
    model.mkdir()
    for f in base.iterdir():
        (model / f.name).write_bytes(f.read_bytes())

    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
        return t
    _edit(base / "model.safetensors", model / "model.safetensors", poison)
    out = tmp_path / "o"
    code, _, err = run_cli("prune", model, "--method", "magnitude", "--sparsity", "0.5", "--out", out)
    line = _one_line(err)
    # block by block, the weight file holding the tensor is named
    want = f"{model / 'model.safetensors'}: tensor 'model.layers.0.mlp.up_proj.weight' contains NaN or Inf"
    assert code == 2 and want in line
    _nothing_at(out)
    assert not (tmp_path / "o.sparse.safetensors").exists()
    json.loads((model / "config.json").read_text())  # the input is untouched
