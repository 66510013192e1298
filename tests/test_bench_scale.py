"""`compress bench scale` on the tiny size: every job measured, the table lists them, the estimate is labelled."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from compress.bench.scale import JOBS, SIZES, run


def test_tiny_every_job_has_numbers_and_the_estimate_is_labelled(tmp_path):
    out, work = tmp_path / "res", tmp_path / "work"
    run(["tiny"], jobs=list(JOBS), out=out, workdir=work, compare=False, isolate=False)
    report = json.loads((out / "scale.json").read_text())
    rows = {r["job"]: r for r in report["rows"]}
    assert set(rows) == {*JOBS, "strategy_train"}
    for job, r in rows.items():
        assert r["status"] == "ok", (job, r.get("error"))
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0 and r["input_bytes"] > 0, job
        assert r["gb_per_s"] > 0 and r["output_bytes"] > 0, job
    assert rows["batch"]["requests"] == 16
    # the prune output is the folder and its sparse file
    assert rows["prune_wanda"]["output_bytes"] > (work / "tiny" / "base" / "model.safetensors").stat().st_size
    md = (out / "scale.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| tiny |")]
    assert {ln.split(" | ")[1] for ln in table} == {*JOBS, "strategy_train"}
    assert "ESTIMATE, not measured: 70B-class" in md
    assert report["estimate"] and all(e["estimate"] and e["size"] == "70b" for e in report["estimate"])
    assert {e["job"] for e in report["estimate"]} == {*JOBS, "strategy_train"}
    assert (out / "scale.png").stat().st_size > 0
    # outputs are removed after each job; the checkpoints stay for the next run
    assert not any(p.name.startswith("out-") for p in (work / "tiny").iterdir())
    cfg = json.loads((work / "tiny" / "base" / "config.json").read_text())
    assert cfg["vocab_size"] == SIZES["tiny"].vocab and (work / "tiny" / "base" / "tokenizer.json").is_file()

    # the CLI runs a job in a process of its own and keeps the rows of the jobs it did not run
    code, _, err = run_cli("bench", "scale", "--sizes", "tiny", "--jobs", "extract", "--no-compare", "--out", out,
                           "--workdir", work)
    assert code == 0, err
    again = json.loads((out / "scale.json").read_text())
    extract = [r for r in again["rows"] if r["job"] == "extract"]
    assert len(extract) == 1 and extract[0]["runs"][0]["rss_method"] in ("gnu-time", "wait4-runner")
    assert extract[0]["wall_seconds"] > extract[0]["seconds"] > 0
    assert {r["job"] for r in again["rows"]} == {*JOBS, "strategy_train"}


def test_bad_jobs_is_one_line_and_writes_nothing(tmp_path):
    code, _, err = run_cli("bench", "scale", "--sizes", "tiny", "--jobs", "merge,bogus", "--out", tmp_path / "r",
                           "--workdir", tmp_path / "w")
    assert code == 2
    assert err.strip().count("\n") == 0 and "--jobs bogus" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
    code, _, err = run_cli("bench", "scale", "--sizes", "13b", "--out", tmp_path / "r")
    assert code == 2 and "--sizes 13b" in err and not (tmp_path / "r").exists()


def test_rows_from_separate_calls_get_an_unpaired_ratio_and_paired_rows_keep_theirs():
    from compress.bench.scale import unpaired

    def row(job, tool, mode, seconds, **kw):
        return {"size": "7b", "job": job, "tool": tool, "mode": mode, "status": "ok", "seconds": seconds, **kw}

    rows = unpaired([row("prune_wanda", "compress", "sequential", 30.0), row("prune_wanda", "compress", "shared", 20.0),
                     row("prune_wanda", "llmcompressor", "sequential", 60.0),
                     row("merge_ties", "compress", None, 5.0, vs={"tool": "mergekit", "ratio": {"median": 0.3}}),
                     row("merge_ties", "mergekit", None, 10.0)])
    assert rows[0]["vs_unpaired"] == {"tool": "llmcompressor", "ratio": 0.5}
    assert "vs_unpaired" not in rows[1] and "vs_unpaired" not in rows[3]


def test_the_70b_estimate_scales_a_block_wise_prune_per_block_and_a_resident_batch_with_the_model():
    from compress.bench.scale import ESTIMATED, SIZES, estimate

    s = SIZES["7b"]
    common = {"size": "7b", "tool": "compress", "status": "ok", "seconds": 100.0, "input_bytes": 2 * s.params()}
    # 11 GB of GPU at 7B: more than half the model's bytes, but SparseGPT's Hessians of one block, not the model
    rows = [{**common, "job": "prune_sparsegpt", "mode": "sequential", "gpu_peak_bytes": 11e9,
             "peak_rss_bytes": 3e9},
            {**common, "job": "batch", "mode": None, "gpu_peak_bytes": 11e9, "peak_rss_bytes": 3e9}]
    est = {e["job"]: e for e in estimate(rows)}
    big = est["prune_sparsegpt"]
    assert not big["gpu_scaled_with_model"]
    assert big["gpu_peak_bytes"] == pytest.approx(11e9 * ESTIMATED[1].block_params() / s.block_params())
    assert big["gpu_peak_bytes"] < 0.5 * 2 * big["params"]  # far below the 70B model's 138 GB
    assert est["batch"]["gpu_scaled_with_model"]
