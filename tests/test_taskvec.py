"""TaskVector algebra and apply, checked against hand-computed state-dict arithmetic."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import finetune_like

from compress.io.reader import open_checkpoint
from compress.taskvec import TaskVector


def _sd(path):
    ck = open_checkpoint(path)
    return {n: ck.get(n) for n in ck.names()}


def test_algebra_matches_state_dict_arithmetic(llama_pair, tmp_path):
    base, ft1 = llama_pair
    ft2 = finetune_like(base, tmp_path / "ft2", seed=7)
    b, f1, f2 = _sd(base), _sd(ft1), _sd(ft2)
    t1, t2 = TaskVector.from_paths(base, ft1), TaskVector.from_paths(base, ft2)
    combo = 0.5 * t1 + t2 * 0.25 - (-t1) * 0.1
    for n in b:
        want = 0.5 * (f1[n] - b[n]) + 0.25 * (f2[n] - b[n]) + 0.1 * (f1[n] - b[n])
        torch.testing.assert_close(combo.get(n), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((t1 - t1).get("lm_head.weight"), torch.zeros_like(b["lm_head.weight"]))


def test_apply_with_scale(llama_pair, tmp_path):
    base, ft = llama_pair
    b, f = _sd(base), _sd(ft)
    out = TaskVector.from_paths(base, ft).apply(base, tmp_path / "half", scale=0.5)
    got = _sd(out)
    for n in b:
        torch.testing.assert_close(got[n], b[n] + 0.5 * (f[n] - b[n]), rtol=1e-6, atol=1e-7)
    assert (out / "config.json").exists()


def test_vocab_resize_is_carried_from_the_finetuned_side(tmp_path):
    from conftest import save_llama

    base = save_llama(tmp_path / "base", seed=0)
    grown = save_llama(tmp_path / "grown", seed=1, vocab_size=100)
    tv = TaskVector.from_paths(base, grown)
    assert set(tv.carried()) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" not in tv.names()
    out = tv.apply(base, tmp_path / "out")
    assert open_checkpoint(out).info("lm_head.weight").shape == (100, 32)


def test_console_script_exits_2_on_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "compress.cli", "extract", "--base", str(tmp_path / "x"),
                        "--finetuned", str(tmp_path / "y"), "--out", str(tmp_path / "d.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'x'}: no such file or folder"


def test_apply_config_from_and_shards(llama_pair, tmp_path):
    import json as _json

    base, ft = llama_pair
    from conftest import run_cli

    run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "d.safetensors")
    other = tmp_path / "cfg"
    other.mkdir()
    cfg = _json.loads((ft / "config.json").read_text())
    cfg["marker"] = "from-finetuned"
    (other / "config.json").write_text(_json.dumps(cfg))
    code, _, err = run_cli("apply", "--base", base, "--delta", tmp_path / "d.safetensors", "--out", tmp_path / "rec",
                           "--config-from", other, "--shard-size", "40KB")
    assert code == 0, err
    assert _json.loads((tmp_path / "rec" / "config.json").read_text())["marker"] == "from-finetuned"
    index = _json.loads((tmp_path / "rec" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "compress apply" in (tmp_path / "rec" / "README.md").read_text()
