"""The pruning-method registry (issue 18): a method defined and registered here, in the test, prunes through
``Pruner``, the strategy evaluator's fast path, `compress prune` and its help, with no other file touched; an
unknown name is the same single line from every entry point, before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_stories_llama

from compress.data import corpus_path, read_text
from compress.errors import CompressError
from compress.prune import PruneMethod, Pruner, register
from compress.prune import methods as M
from compress.prune.registry import METHODS, Layer, get_prune_method, unregister

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown pruning method 'bogus' (choose one of magnitude, wanda, sparsegpt)"


# -- the toy method: what a new method's file holds ------------------------------------------------------------

def random_scores(layer: Layer) -> torch.Tensor:
    """Uniform scores from a generator seeded by the layer's name (independent of order and device)."""
    g = torch.Generator().manual_seed(zlib.crc32(layer.name.encode()))
    return torch.rand(layer.weight.shape, generator=g).to(layer.weight.device)


def random_mask(layer: Layer, sparsity: float, zeros) -> torch.Tensor:
    s = random_scores(layer)
    return M.nm_mask(s, layer.nm, layer.keep) if layer.nm else M.tensor_mask(s, sparsity, layer.keep, zeros)


RANDOM = PruneMethod("random", "uniformly random weights per layer (a toy for the registry's test)", "none", "layer",
                     mask=random_mask, scores=random_scores)


@pytest.fixture
def random_method():
    register(RANDOM)
    yield RANDOM
    unregister("random")


def expected(name: str, w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The toy's pruned weight, computed here without the package: the round(numel·s) lowest draws are zero."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    order = torch.sort(torch.rand(w.shape, generator=g).reshape(-1), stable=True).indices
    keep = torch.ones(w.numel(), dtype=torch.bool)
    keep[order[: int(round(w.numel() * sparsity))]] = False
    return w * keep.reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_stories_llama(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(read_text(corpus_path("wikitext2.valid"))[:30000])
    return path


def test_a_method_registered_from_outside_prunes_end_to_end(tiny, calib, tmp_path, random_method):
    from compress.strategy.evaluate import Evaluator, RankedWeights

    cache = tmp_path / "cache"
    p = Pruner(tiny, calib, nsamples=4, seqlen=32, cache_dir=cache, quiet=True)
    strategy = [0.3, 0.55, 0.71, 0.42]
    r = p.prune(strategy, "random")
    assert r.method == "random" and len(r.weights) == len(p.modules) == 28
    for m in p.modules:
        assert torch.equal(r.weights[m.name], expected(m.name, p._dense[m.name], strategy[m.block])), m.name
    assert p.layer_sparsity(r) == pytest.approx(strategy, abs=1e-3)
    assert p.forward_passes == 0 and not cache.exists()  # stats "none": no calibration pass, nothing cached

    nm = p.prune(0.5, "random", pattern="2:4")
    w = nm.weights[p.modules[0].name]
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()

    # the evaluator's fast path reads the entry's scores and group: the very weights Pruner.prune gives
    ev = Evaluator(p, "random", eval_windows=4, eval_seqlen=32)
    assert isinstance(ev.ranked, RankedWeights)
    rec = ev.evaluate(strategy)
    for m in p.modules:
        assert torch.equal(p._weight(m), r.weights[m.name]), m.name
    assert rec["sparsity"] == pytest.approx(r.sparsity, abs=1e-12) and rec["kl"] > 0


def test_a_registered_method_runs_from_the_cli(tiny, tmp_path, random_method):
    from safetensors.torch import load_file

    out, cache = tmp_path / "out", tmp_path / "cache"
    code, stdout, err = run_cli("prune", tiny, "--method", "random", "--sparsity", "0.5", "--out", out,
                                "--cache-dir", cache, "--nsamples", "2", "--seqlen", "32")
    assert code == 0, err
    assert f"wrote {out}" in stdout
    info = json.loads((out / "prune.json").read_text())
    assert info["method"] == "random" and info["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "out.sparse.safetensors").is_file() and not cache.exists()
    name = "model.layers.1.mlp.down_proj"
    dense = load_file(tiny / "model.safetensors")[f"{name}.weight"]
    assert torch.equal(load_file(out / "model.safetensors")[f"{name}.weight"], expected(name, dense, 0.5))


def test_the_cli_help_lists_the_registry():
    code = ("from compress.prune import PruneMethod, register\n"
            "register(PruneMethod('random', 'toy', 'none', 'layer', mask=lambda layer, s, zeros: None))\n"
            "from compress.cli import main\n"
            "main(['prune', '--help'])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "magnitude, wanda (default), sparsegpt or random; nps: task-vector pruning" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("entry", ["prune", "recipe", "strategy train", "strategy search"])
def test_an_unknown_method_is_one_line_from_every_entry_point(tiny, tmp_path, entry):
    out, cache = tmp_path / "out", tmp_path / "cache"
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"model: {tiny}\nmethod: bogus\nsparsity: 0.5\ncache_dir: {cache}\n")
    args = {"prune": ["prune", tiny, "--method", "bogus", "--sparsity", "0.5", "--cache-dir", cache],
            "recipe": ["prune", recipe],
            "strategy train": ["strategy", "train", tiny, "--method", "bogus", "--cache-dir", cache],
            "strategy search": ["strategy", "search", tiny, "--method", "bogus", "--sparsity", "0.5",
                                "--cache-dir", cache]}[entry]
    code, stdout, err = run_cli(*args, "--out", out)
    assert code == 2 and err.strip() == f"error: {UNKNOWN}", err
    assert stdout == "" and not out.exists() and not cache.exists()
    assert not list(tmp_path.glob(".*")), list(tmp_path.glob(".*"))  # no temporary left beside the output


def test_an_unknown_method_from_the_api(tiny, calib, tmp_path):
    from compress.strategy.evaluate import Evaluator

    p = Pruner(tiny, calib, nsamples=4, seqlen=32, cache_dir=tmp_path / "cache", quiet=True)
    with pytest.raises(CompressError) as e:
        p.prune(0.5, "bogus")
    assert str(e.value) == UNKNOWN
    with pytest.raises(CompressError) as e:
        Evaluator(p, "bogus")
    assert str(e.value) == UNKNOWN and p.forward_passes == 0


def test_the_registry_refuses_bad_entries():
    before = dict(METHODS)
    with pytest.raises(CompressError, match="^pruning method 'wanda' is already registered$"):
        register(PruneMethod("wanda", "again", "norms", "row", mask=random_mask))
    with pytest.raises(CompressError, match="give exactly one of mask and update"):
        PruneMethod("both", "x", "none", "layer", mask=random_mask, update=lambda layer, s, z: None)
    with pytest.raises(CompressError, match="give exactly one of mask and update"):
        PruneMethod("neither", "x", "none", "layer")
    with pytest.raises(CompressError, match=r"stats 'grads' \(choose one of none, norms, hessian\)"):
        PruneMethod("grad", "x", "grads", "layer", mask=random_mask)
    with pytest.raises(CompressError, match="ranked scores need a layer or row comparison group"):
        PruneMethod("blocky", "x", "none", "block", mask=random_mask, scores=random_scores)
    with pytest.raises(CompressError, match="a name is letters, digits"):
        PruneMethod("two words", "x", "none", "layer", mask=random_mask)
    with pytest.raises(CompressError, match="^unknown pruning method 'random'"):
        unregister("random")
    assert METHODS == before
    assert [(m.name, m.stats, m.group, m.scores is not None) for m in METHODS.values()] == [
        ("magnitude", "none", "layer", True), ("wanda", "norms", "row", True), ("sparsegpt", "hessian", "block", False)]
    assert get_prune_method("sparsegpt").update is not None
