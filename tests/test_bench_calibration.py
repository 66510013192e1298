"""`compress bench calibration`: the quick run on the real stories260K, and its refusals."""

import json
import math

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def quick(stories260k, tmp_path_factory):
    """The quick bench at 80% for both methods, 2 seeds, in memory; then one seed block by block."""
    out = tmp_path_factory.mktemp("calib")
    args = ["bench", "calibration", "stories260k", "--zoo-root", stories260k.parent, "--quick", "--seeds", "2",
            "--sparsities", "80%", "--quiet"]
    code, _, err = run_cli(*args, "--results", out / "mem", "--in-memory")
    assert code == 0, err
    code, _, err = run_cli(*args, "--results", out / "blocks", "--blockwise", "--methods", "wanda", "--seeds", "1")
    assert code == 0, err
    return out


def _report(folder):
    return json.loads((folder / "calibration_stories260k.json").read_text())


def test_quick_numbers_hold_together(quick):
    r = _report(quick / "mem")
    assert not r["blockwise"] and r["calib"] == "wikitext2.valid" and r["dev"] == "ptb.valid"
    rows = r["rows"]
    assert len(rows) == 2 * 2 * 2  # seeds × methods × modes
    for row in rows:
        assert row["dev"] > r["dense"]["dev"] and row["test"] > r["dense"]["test"]
        assert abs(row["measured_sparsity"] - 0.8) < 0.005
    # the seed draws the windows: the same row differs between seeds
    for method in ("wanda", "sparsegpt"):
        for mode in ("sequential", "shared"):
            a, b = (x["dev"] for x in rows if (x["method"], x["mode"]) == (method, mode))
            assert a != b
    # block 0 sees the dense inputs in both modes: the same masks there (two code paths: in-memory shared,
    # block-wise sequential), then the sequential masks drift away
    agree = [x["agreement_with_shared"] for x in rows if x["mode"] == "sequential"]
    assert len(agree) == 4 and all(a[0] == 1.0 for a in agree)
    assert all(a[-1] < 0.999 for a in agree)
    # the summary is the mean and sd of the rows, and the verdict picks the lower dev mean
    for s in r["summary"]:
        vals = [x["dev"] for x in rows if (x["method"], x["sparsity"], x["mode"]) == (s["method"], "80%", s["mode"])]
        assert s["dev"]["mean"] == pytest.approx(sum(vals) / 2)
        assert s["dev"]["sd"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    md = (quick / "mem" / "calibration_stories260k.md").read_text()
    for v in r["verdicts"]:
        means = {s["mode"]: s["dev"]["mean"] for s in r["summary"] if s["method"] == v["method"]}
        assert v["winner"] == min(means, key=means.get)
        assert f"- {v['method']} 80%: **{v['winner']}**" in md
    assert (quick / "mem" / "calibration_stories260k.png").stat().st_size > 0
    assert "wikitext2.test" in md and "never used to choose" in md


def test_blockwise_scores_equal_in_memory(quick):
    """Pruned to a folder and scored block by block: the in-memory numbers (shared: the old whole-model path)."""
    mem, blocks = _report(quick / "mem"), _report(quick / "blocks")
    assert blocks["blockwise"] and "agreement_with_shared" not in blocks["rows"][0]
    assert blocks["dense"]["dev"] == pytest.approx(mem["dense"]["dev"], rel=1e-5)
    for b in blocks["rows"]:
        m, = (x for x in mem["rows"] if (x["seed"], x["method"], x["mode"]) == (b["seed"], b["method"], b["mode"]))
        assert b["dev"] == pytest.approx(m["dev"], rel=1e-4) and b["test"] == pytest.approx(m["test"], rel=1e-4)


@pytest.mark.parametrize("args, culprit", [
    (["lm-zoo"], "compress zoo build lm-zoo"),
    (["minilm-8task"], "minilm-8task"),
    (["stories260k", "--seeds", "0"], "--seeds 0"),
    (["stories260k", "--sparsities", "60%"], "60%"),
])
def test_bad_input_one_line(tmp_path, args, culprit):
    code, _, err = run_cli("bench", "calibration", *args, "--zoo-root", tmp_path / "zoo", "--results",
                           tmp_path / "out", "--quick")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and culprit in err
    assert not (tmp_path / "out").exists()


def test_keep_first_encodes_as_the_whole_text(stories260k):
    from compress.bench.calibration import EncodeOnce
    from compress.data import corpus_path, read_text
    from compress.io.models import load_tokenizer

    tok = load_tokenizer(stories260k)
    text = read_text(corpus_path("ptb.valid"))
    whole = tok(text, verbose=False)["input_ids"]
    for n in (7, 4096, len(whole) + 10):
        enc = EncodeOnce(tok)
        enc.keep_first(text, n)
        assert enc(text, verbose=False)["input_ids"] == whole[:n]


def test_model_without_lm_head_refused(stories260k, tmp_path):
    """A config.json naming no causal-LM class (lm-zoo folders written through save_module) loads without the
    LM head: refused before any work, naming the file."""
    import shutil

    folder = tmp_path / "zoo" / "stories260k"
    shutil.copytree(stories260k, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("bench", "calibration", "stories260k", "--zoo-root", tmp_path / "zoo", "--results",
                           tmp_path / "out", "--quick")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(folder / "config.json") in err and "architectures" in err
    assert not (tmp_path / "out").exists()
