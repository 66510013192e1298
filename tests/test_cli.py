"""The CLI end to end on real assets: convert stories260K, inspect, extract-lora into PEFT, and the demo (its three
jobs: prune, requests, merge)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import run_cli

from compress.io.reader import open_checkpoint


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
    from compress.demo import REQUESTS, run_demo

    work = tmp_path / "demo"
    code, _, err = run_cli("convert-llama2c", "--out", work / "stories260K")
    assert code == 0, err
    base_ck = open_checkpoint(work / "stories260K")
    assert base_ck.numel > 250_000
    # fewer steps and evaluations than the defaults: this checks what the demo does, not how well
    result = run_demo(work, steps=10, density=0.2, stratnet_budget=16, stratnet_steps=50, search_budget=4,
                      eval_tokens=2048, quiet=True)
    saved = json.loads((work / "results.json").read_text())
    assert {"prune", "requests", "merge"} <= saved.keys()

    # 1. Wanda 50%: counted in the written model, every linear weight of the blocks at half zeros, nothing else
    prune = saved["prune"]
    pruned = open_checkpoint(prune["out"])
    zeros = total = 0
    for name in pruned.names():
        t = pruned.get(name)
        if ".layers." in name and name.endswith("proj.weight"):
            zeros += int((t == 0).sum())
            total += t.numel()
        else:
            assert torch.equal(t, base_ck.get(name)), name
    assert total == prune["params_pruned_over"] and abs(zeros / total - 0.5) < 0.005
    sparse_bytes = (work / "wanda-50.sparse.safetensors").stat().st_size
    assert sparse_bytes == prune["sparse_bytes"] < 0.7 * (work / "stories260K" / "model.safetensors").stat().st_size

    # 2. every request answered: its sparsity when asked for one, its byte budget met, a preference in range
    req = saved["requests"]
    rows = {r["id"]: r for r in req["rows"]}
    assert list(rows) == [r["id"] for r in REQUESTS]
    assert {r["target"] for r in rows.values()} == {"sparsity", "size_bytes", "preference"}
    lo, hi = req["stratnet"]["sparsity_range"]
    for r in rows.values():
        size = (work / "requests" / r["file"]).stat().st_size
        assert size == r["file_bytes"] and r["kl"] > 0
        if r["target"] == "sparsity":
            assert abs(r["sparsity"] - r["requested"]) < 1e-3, r
        elif r["target"] == "size_bytes":
            assert size <= r["requested"] and abs(r["sparsity"] - r["sparsity_target"]) < 1e-3, r
        else:
            # the answer's mean lies in the StratNet's range; measured, a row's rounding adds ~1e-5
            assert lo - 1e-3 <= r["sparsity"] <= hi + 1e-3 and abs(r["sparsity"] - r["sparsity_target"]) < 1e-3, r
    t = req["timing"]
    assert t["search_evaluations"] == 4 and t["search_all_estimate_seconds"] > t["search_seconds"]

    # 3. a fine-tune beats the base on its own held-out text; the dense merge beats the base on both
    ppl = {r["model"]: r["ppl"] for r in saved["merge"]["rows"]}
    base = ppl["base"]
    assert ppl["ft-shakespeare"]["shakespeare"] < base["shakespeare"]
    assert ppl["ft-wikitext2"]["wikitext2"] < base["wikitext2"]
    merged = ppl["merge dense λ=0.5"]
    assert merged["shakespeare"] < base["shakespeare"] and merged["wikitext2"] < base["wikitext2"]
    assert (work / "merge-dense" / "README.md").exists()

    md = (work / "results.md").read_text()
    assert md.count("\n## ") == 3 and all(r["id"] in md for r in REQUESTS) and "merge dense λ=0.5" in md
    png = work / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(png)
    # every model the demo made is on the plot: base, the pruned one, each request, 2 fine-tunes, 2 rebuilds, 2 merges
    assert len(saved["models"]) == 2 + len(REQUESTS) + 6
    assert not list(work.glob(".*tmp-*"))


def test_a_command_line_builds_only_its_stage_and_every_name_is_placed():
    """`compress merge …` imports the merge stage's commands only; SECTIONS names every command of the full app."""
    import subprocess
    import sys

    import typer

    from compress.cli import SECTION_OF, build_app

    full = typer.main.get_command(build_app())
    assert set(full.commands) == set(SECTION_OF)
    for name, section in SECTION_OF.items():
        assert name in typer.main.get_command(build_app(name)).commands, (name, section)
    code = ("import sys\nfrom compress.cli import main\ntry:\n    main(['merge', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in sys.modules if m.endswith('.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['compress.merge.commands']"


def test_the_program_exits_with_the_status_and_output_main_gives(tmp_path):
    """``python -m compress.cli`` (and the ``compress`` script, the same ``entry``) skips the interpreter's
    teardown with ``os._exit``: the exit status, the one-line error and piped stdout must still be exactly what
    ``main()`` gives in-process, including a long help text through a pipe."""
    import subprocess

    def program(*args):
        return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, "COLUMNS": "100"})

    ok = program("merge", "--help")
    code, _, _ = run_cli("merge", "--help")
    assert ok.returncode == 0 == code and len(ok.stdout) > 1000 and "--out" in ok.stdout
    bad = program("merge", "missing.yml")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: missing.yml: recipe not found"]
    unknown = program("no-such-command")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error:")
    # a host program that runs the module as __main__ in-process and goes on (bench scale's jobs)
    host = subprocess.run([sys.executable, "-c", "import os, runpy, sys\nos.environ['COMPRESS_FAST_EXIT'] = '0'\n"
                           "sys.argv = ['compress', 'merge', '--help']\ntry:\n"
                           "    runpy.run_module('compress.cli', run_name='__main__')\nexcept SystemExit:\n"
                           "    pass\nprint('still here')"], capture_output=True, text=True, cwd=tmp_path)
    assert host.returncode == 0 and host.stdout.rstrip().endswith("still here")
