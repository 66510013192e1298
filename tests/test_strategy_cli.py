"""UniCuCo end to end on a tiny Llama with a real tokenizer: the evaluator's fast masks against ``Pruner.prune``,
`compress strategy train` + `compress batch` (measured sparsity and file size per request), the per-request
search, and bad input (a bad requests line, a StratNet for another model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_llama, tiny_stories_llama

from compress.data import corpus_path, read_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_stories_llama(tmp_path_factory.mktemp("unicuco"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(read_text(corpus_path("wikitext2.valid"))[:30000])
    return path


COMMON = ["--nsamples", "8", "--seqlen", "32", "--eval-windows", "6"]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_fast_masks_equal_pruner(tiny, calib, tmp_path, method):
    from compress.prune import Pruner
    from compress.strategy.evaluate import Evaluator, RankedWeights

    p = Pruner(tiny, calib, nsamples=8, seqlen=32, cache_dir=tmp_path, quiet=True)
    ev = Evaluator(p, method, eval_windows=4, eval_seqlen=32)
    assert isinstance(ev.ranked, RankedWeights)
    for strategy in ([0.3, 0.55, 0.71, 0.42], [0.0, 0.5, 0.9, 0.333]):
        fast = ev.evaluate(strategy)
        fast_w = {m.name: p._weight(m).detach().clone() for m in p.modules}
        ranked, ev.ranked = ev.ranked, None  # the slow path: Pruner.prune + load
        slow = ev.evaluate(strategy)
        ev.ranked = ranked
        ref = p.prune(strategy, method)
        for m in p.modules:
            assert torch.equal(fast_w[m.name], ref.weights[m.name]), m.name
        assert fast["sparsity"] == pytest.approx(ref.sparsity, abs=1e-12)
        assert fast["kl"] == pytest.approx(slow["kl"], rel=1e-6)
    p.load(None)
    assert ev.kl() == pytest.approx(0.0, abs=1e-9)


def test_heldout_windows_avoid_the_calibration_windows():
    from compress.strategy.evaluate import heldout_windows

    ids = torch.arange(1000)
    starts = torch.tensor([100, 130, 600])
    w = heldout_windows(ids, starts, 50, 40, 100)
    used = set(range(100, 180)) | set(range(600, 650))
    assert all(not (set(row.tolist()) & used) for row in w)
    assert w.shape[1] == 40 and w.shape[0] == (100 // 40) + (420 // 40) + (350 // 40)


def test_train_then_batch_meets_every_request(tiny, calib, tmp_path):
    sn = tmp_path / "sn.pt"
    code, out, err = run_cli("strategy", "train", tiny, "--calib", calib, "--budget", "16", "--steps", "40",
                             "--rounds", "1", "--kappa", "0.5", "--out", sn, "--cache-dir", tmp_path / "cache",
                             "--log", tmp_path / "evals.jsonl", *COMMON)
    assert code == 0, err
    assert "trained StratNet on 16 evaluations" in out + err
    assert torch.load(sn, weights_only=True)["meta"]["training"]["kappa"] == 0.5
    log = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert len(log) == 16 and all(r["kl"] > 0 for r in log)

    from compress.prune import Pruner
    from compress.strategy.project import size_model

    p = Pruner(tiny, calib, nsamples=8, seqlen=32, cache_dir=tmp_path / "cache", quiet=True)
    budget = size_model(tiny, {n: m.numel for n, m in p.checkpoint_names().items()}).bytes(0.5)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "low", "sparsity": 0.35}, {"id": "high", "sparsity": 0.62}, {"id": "bytes", "size_bytes": budget},
        {"id": "pref", "preference": 0.5}, {"id": "prot", "sparsity": 0.5, "protect_heads": [[1, 0], [3, 1]]}])
        + "\n")
    out_dir = tmp_path / "served"
    code, out, err = run_cli("batch", tiny, "--stratnet", sn, "--requests", reqs, "--out", out_dir,
                             "--cache-dir", tmp_path / "cache", "--format", "both")
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (out_dir / "summary.md").is_file()
    rows = {r["id"]: r for r in summary["rows"]}
    assert set(rows) == {"low", "high", "bytes", "pref", "prot"}

    from compress.io.deltafile import DeltaFile
    from compress.io.reader import open_checkpoint

    pruned_names = set(p.checkpoint_names())
    for rid, r in rows.items():
        # measured from the written sparse file itself: zeros over the pruned tensors
        f = DeltaFile(out_dir / f"{rid}.sparse.safetensors")
        zeros = total = 0
        for name in pruned_names:
            t = f.get(name)
            zeros += int((t == 0).sum())
            total += t.numel()
        measured = zeros / total
        assert abs(measured - r["sparsity_target"]) < 0.005, (rid, measured, r["sparsity_target"])
        assert abs(measured - r["sparsity"]) < 1e-9
        folder = open_checkpoint(out_dir / rid)
        assert torch.equal(folder.get(next(iter(pruned_names))), f.get(next(iter(pruned_names))))
    assert rows["low"]["sparsity_target"] == 0.35 and rows["high"]["sparsity_target"] == 0.62
    size = (out_dir / "bytes.sparse.safetensors").stat().st_size
    assert size <= budget and size > 0.99 * budget, (size, budget)
    assert 0.3 <= rows["pref"]["sparsity_target"] <= 0.7
    # protected heads: their q/k/v rows and o_proj columns are the dense weights, bit for bit
    from compress.heads.layout import attention_layout

    dense, prot = open_checkpoint(tiny), DeltaFile(out_dir / "prot.sparse.safetensors")
    layout = attention_layout(tiny)
    for layer, head in [(1, 0), (3, 1)]:
        for name, axis, a, b in layout.slices(layer, head):
            if name.endswith(".weight"):
                assert torch.equal(prot.get(name).narrow(axis, a, b - a), dense.get(name).narrow(axis, a, b - a))
                assert bool((prot.get(name).narrow(axis, a, b - a) != 0).all()), name

    # --format folder: Hugging Face folders only, each loadable, its pruned linear layers at the request
    from transformers import AutoModelForCausalLM

    reqs.write_text('{"id": "a", "sparsity": 0.4}\n{"id": "b", "preference": 0.8}\n')
    code, out, err = run_cli("batch", tiny, "--stratnet", sn, "--requests", reqs, "--out", tmp_path / "folders",
                             "--cache-dir", tmp_path / "cache", "--format", "folder")
    assert code == 0, err
    rows = {r["id"]: r for r in json.loads((tmp_path / "folders" / "summary.json").read_text())["rows"]}
    assert sorted(x.name for x in (tmp_path / "folders").iterdir()) == ["a", "b", "summary.json", "summary.md"]
    for rid, r in rows.items():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "folders" / rid)
        params = dict(model.named_parameters())
        zeros = sum(int((params[n] == 0).sum()) for n in pruned_names)
        measured = zeros / sum(params[n].numel() for n in pruned_names)
        assert abs(measured - r["sparsity_target"]) < 0.005, (rid, measured, r["sparsity_target"])
        assert "file" not in r and r["folder"] == rid
        # the rest of the model is the dense one
        assert torch.equal(params["model.embed_tokens.weight"], dense.get("model.embed_tokens.weight"))
    assert rows["a"]["sparsity_target"] == 0.4 and 0.3 <= rows["b"]["sparsity_target"] <= 0.7

    # bad input: exit 2, one line naming the file (and line) and what is wrong, nothing written
    def bad(model, text, *needles):
        reqs.write_text(text)
        code, out, err = run_cli("batch", model, "--stratnet", sn, "--requests", reqs, "--out", tmp_path / "bad")
        assert code == 2, (code, out, err)
        assert len(err.strip().splitlines()) == 1, err
        assert all(x in err for x in needles), err
        assert not (tmp_path / "bad").exists()

    bad(tiny, '{"sparsity": 0.4}\n{"id": "x"}\n', "r.jsonl:2: no target")
    bad(tiny, '{"sparsity": 0.4}\n{"sparsity": 1.4}\n', "r.jsonl:2: sparsity must be in (0, 1), got 1.4")
    bad(tiny, '{"sparsity": 0.4}\n{"preference": -0.2}\n', "r.jsonl:2: preference must be in [0, 1]")
    bad(tiny, '{"sparsity": 0.4, "size_bytes": 1000}\n', "r.jsonl:1: give exactly one target")
    bad(tiny, '{"sparsity": 0.9}\n', "outside the range this StratNet was trained for")
    # a StratNet for another model: both named
    other = save_llama(tmp_path / "other", seed=5, vocab_size=512, num_hidden_layers=4, hidden_size=48,
                       intermediate_size=96)
    bad(other, '{"sparsity": 0.5}\n', str(tiny), str(other))


def test_search_never_worse_than_uniform(tiny, calib, tmp_path):
    out = tmp_path / "st.json"
    code, o, err = run_cli("strategy", "search", tiny, "--sparsity", "0.6", "--budget", "12", "--calib", calib,
                           "--nsamples", "8", "--seqlen", "32", "--eval-windows", "6", "--out", out, "--cache-dir",
                           tmp_path)
    assert code == 0, err
    st = json.loads(out.read_text())
    from compress.prune import Pruner

    p = Pruner(tiny, calib, nsamples=8, seqlen=32, cache_dir=tmp_path, quiet=True)
    mean = sum(v * n for v, n in zip(st["layer_sparsity"], p.block_params)) / sum(p.block_params)
    assert mean == pytest.approx(0.6, abs=1e-6)
    assert st["kl"] <= st["uniform_kl"] and st["evaluations"] == 12
    code, o, err = run_cli("strategy", "search", tiny, "--budget", "12", "--calib", calib, "--cache-dir", tmp_path)
    assert code == 2 and "no target" in err and len(err.strip().splitlines()) == 1
    code, o, err = run_cli("strategy", "search", tiny, "--sparsity", "1.2", "--calib", calib, "--cache-dir", tmp_path)
    assert code == 2 and "sparsity must be in (0, 1), got 1.2" in err and len(err.strip().splitlines()) == 1
    # the searched strategy is a strategy file `compress prune` takes
    code, o, err = run_cli("prune", tiny, "--strategy", out, "--sparsity", "0.6", "--calib", calib, "--nsamples",
                           "8", "--seqlen", "32", "--out", tmp_path / "pruned", "--no-sparse",
                           "--cache-dir", tmp_path)
    assert code == 0, err


def _search(tiny, calib, tmp_path, name, *args):
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    code, o, err = run_cli("strategy", "search", tiny, *args, "--calib", calib, *COMMON, "--cache-dir",
                           tmp_path / "cache", "--out", out, "--log", log)
    assert code == 0, err
    return json.loads(out.read_text()), [json.loads(x) for x in log.read_text().splitlines()]


def _mean(strategy, block_params):
    return sum(v * n for v, n in zip(strategy, block_params)) / sum(block_params)


def test_search_bayes(tiny, calib, tmp_path):
    """`--optimizer bayes` (botorch through ``compress.search.optimize.minimize``): the budget spent exactly, the
    target met exactly, never worse than uniform, and the written strategy is the one whose KL it reports."""
    from compress.prune import Pruner
    from compress.strategy.evaluate import Evaluator

    st, log = _search(tiny, calib, tmp_path, "bo", "--sparsity", "0.6", "--budget", "10", "--optimizer", "bayes")
    p = Pruner(tiny, calib, nsamples=8, seqlen=32, cache_dir=tmp_path / "cache", batch_size=16, quiet=True)
    assert st["optimizer"] == "bayes" and st["evaluations"] == 10 and len(log) == 10
    assert _mean(st["layer_sparsity"], p.block_params) == pytest.approx(0.6, abs=1e-6)
    assert st["kl"] <= st["uniform_kl"]
    assert st["uniform_kl"] == log[0]["kl"] and st["kl"] == min(r["kl"] for r in log)
    # every point BO tried meets the target too, and they are not all the uniform start
    assert all(_mean(r["strategy"], p.block_params) == pytest.approx(0.6, abs=1e-6) for r in log)
    assert len({tuple(round(v, 6) for v in r["strategy"]) for r in log}) == 10
    ev = Evaluator(p, "wanda", eval_windows=6)
    assert ev.evaluate(st["layer_sparsity"])["kl"] == pytest.approx(st["kl"], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["cma", "bayes"])
def test_search_preference(tiny, calib, tmp_path, optimizer):
    """A preference request: the searched mean sparsity lies in the range (default 0.3–0.7) and is the strategy's
    parameter-weighted mean; more weight on size (λ = 0.9) gives a sparser model than more weight on quality
    (λ = 0.1), which also pays with a larger KL."""
    from compress.prune import Pruner

    p = Pruner(tiny, calib, nsamples=8, seqlen=32, cache_dir=tmp_path / "cache", quiet=True)
    got = {}
    for lam in (0.1, 0.9):
        st, log = _search(tiny, calib, tmp_path, f"pref{lam}", "--preference", str(lam), "--budget", "12",
                          "--optimizer", optimizer)
        assert st["evaluations"] == 12 and len(log) == 12 and st["preference"] == lam
        assert 0.3 <= st["mean"] <= 0.7
        assert _mean(st["layer_sparsity"], p.block_params) == pytest.approx(st["mean"], abs=1e-6)
        # the two normalizing evaluations are the uniform strategies at both ends of the range
        assert [round(_mean(r["strategy"], p.block_params), 9) for r in log[:2]] == [0.3, 0.7]
        got[lam] = st
    assert got[0.9]["mean"] > got[0.1]["mean"], (got[0.1]["mean"], got[0.9]["mean"])
    assert got[0.9]["kl"] > got[0.1]["kl"]
