"""`compress bench io-memory`: per-process peak RSS, and streaming extract staying below the naive load."""

from __future__ import annotations

import json
import os
import sys

import pytest

from compress.bench.io_memory import GNU_TIME, measure, model_spec, run

MB = 10**6


@pytest.mark.parametrize("use_gnu_time", [False, True])
def test_measure_is_per_child(use_gnu_time):
    """A child that touches 200 MB reports it; a small child run after it reports its own, smaller peak
    (getrusage(RUSAGE_CHILDREN) would still say 200 MB)."""
    if use_gnu_time and not os.access(GNU_TIME, os.X_OK):
        pytest.skip(f"{GNU_TIME} not installed")
    big = measure([sys.executable, "-c", "b = b'x' * 200_000_000"], use_gnu_time=use_gnu_time)
    small = measure([sys.executable, "-c", "pass"], use_gnu_time=use_gnu_time)
    assert big["peak_rss_bytes"] >= 200 * MB
    assert small["peak_rss_bytes"] < 100 * MB
    assert big["rss_method"] == ("gnu-time" if use_gnu_time else "wait4-runner")


def test_measure_reports_a_failing_case():
    with pytest.raises(RuntimeError, match="exit 3"):
        measure([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_model_spec_fills_but_never_exceeds_the_size():
    spec = model_spec(10**9)
    assert spec["hidden_size"] == 2048 and spec["largest_shape"] == [8192, 2048]
    assert 0.9 * 10**9 <= spec["total_bytes"] <= 10**9
    small = model_spec(5 * 10**7)
    assert small["total_bytes"] <= 5 * 10**7 and small["total_bytes"] >= 10 * small["largest_bytes"]


def test_run_small(tmp_path, monkeypatch):
    # one intra-op thread in the cases: on a busy 2-core machine, OpenMP teams waiting for a descheduled thread
    # make small-tensor passes many times slower (peak RSS does not depend on it)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work, res = tmp_path / "work", tmp_path / "results"
    # h capped at 256 (largest tensor 1 MB): extract's cost is a handful of largest tensors, the naive one holds
    # both 45 MB checkpoints and their difference, so the gap is wide whatever the machine's import overhead.
    report = run(size_gb=0.05, workdir=work, results=res, max_hidden=256, print_table=False)

    data = json.loads((res / "io_memory.json").read_text())
    assert data == json.loads(json.dumps(report))
    cases = {c["key"]: c for c in data["cases"]}
    assert set(cases) == {"extract_d1", "extract_d0.1", "apply", "naive"}
    size = data["checkpoint_bytes"]
    assert 0.8 * 0.05e9 <= size <= 0.05e9 and data["shards_per_checkpoint"] >= 2
    for c in [data["baseline"], *data["cases"]]:
        assert c["peak_rss_bytes"] > 0 and c["seconds"] > 0
        assert c["ratio_rss_to_checkpoint"] == pytest.approx(c["peak_rss_bytes"] / size)
    # outputs were really written: a dense delta is about the checkpoint, a 10% one much smaller
    assert cases["extract_d1"]["output_bytes"] >= size
    assert cases["extract_d0.1"]["output_bytes"] < 0.5 * size
    assert cases["apply"]["output_bytes"] >= size

    # the naive reference holds both checkpoints at once; streaming extract does not
    assert cases["naive"]["peak_rss_bytes"] >= data["baseline"]["peak_rss_bytes"] + 1.5 * size
    assert cases["extract_d1"]["peak_rss_bytes"] < cases["naive"]["peak_rss_bytes"]
    assert cases["extract_d0.1"]["peak_rss_bytes"] < cases["naive"]["peak_rss_bytes"]

    md = (res / "io_memory.md").read_text()
    assert "| case | peak RSS MB | checkpoint size MB | ratio RSS/size | seconds |" in md
    assert md.count("\n| ") == 6  # header + baseline + 4 cases
    assert not work.exists()  # scratch removed, results kept


def test_bench_devices_runs_are_reproducible_across_processes(tmp_path):
    """`bench devices` with the CPU on both sides: every command must give the same output twice."""
    from compress.bench.devices import run as run_devices

    report = run_devices(size_gb=0.003, results=tmp_path / "res", device="cpu", rounds=1)  # the outputs, not speed
    assert [r["case"] for r in report["rows"]] == ["extract d=1.0", "extract d=0.1", "extract d=0.1 random",
                                                   "apply d=0.1", "extract-lora r=16"]
    assert all(r["same_output"] for r in report["rows"]), report["rows"]
    assert (tmp_path / "res" / "devices.md").read_text().count("| True |") == 5
