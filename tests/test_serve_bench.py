"""`compress bench serve` end to end on the real stories260K, small: a server subprocess under 3 clients, the batch
baseline, and the kill -9 fault test; the fault test's claims are re-checked here from the job database itself."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

from conftest import run_cli


def test_bench_serve_small(tmp_path):
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    zoo = tmp_path / "zoo"
    convert_llama2c(*stories260k_files(), zoo / "stories260k")
    sn, cache, results = tmp_path / "sn.pt", tmp_path / "cache", tmp_path / "bench"
    code, out, err = run_cli("strategy", "train", zoo / "stories260k", "--calib", "shakespeare", "--budget", "16",
                             "--steps", "40", "--rounds", "1", "--nsamples", "8", "--seqlen", "32",
                             "--eval-windows", "6", "--out", sn, "--cache-dir", cache)
    assert code == 0, err
    n, nf = 12, 10
    code, out, err = run_cli("bench", "serve", "stories260k", "--zoo-root", zoo, "--stratnet", sn, "--requests", n,
                             "--clients", 3, "--fault-requests", nf, "--fault-batch", 3, "--cache-dir", cache,
                             "--results", results, "--timeout", 240, "--keep")
    assert code == 0, err
    r = json.loads((results / "serve-stories260k.json").read_text())
    assert (results / "serve-stories260k.md").read_text() in out
    assert (results / "serve-stories260k.png").stat().st_size > 0

    # load test: everything answered, every artifact loads at its target, the same tensors as compress batch
    assert r["all_complete"] is True
    assert r["load"]["completed"] == n and r["batch"]["completed"] == n
    a = r["artifacts"]
    assert a["downloaded"] == n and a["load_within_tol"] == n and a["identical_to_batch"] == n
    assert a["size_budget_requests"] >= 1 and a["size_budget_met"] == a["size_budget_requests"]
    assert sum(r["load"]["server"]["group_sizes"]) == n
    lat = r["load"]["latency"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] <= r["load"]["seconds"] + 1e-6
    assert r["ratios"]["throughput_server_over_batch_wall"] == r["load"]["throughput"] / r["batch"]["throughput_wall"]

    # fault test, as the bench reports it ...
    f = r["fault"]
    assert f["passed"] is True and f["accepted"] == nf
    k = f["states_at_kill"]
    assert k["done"] >= 1 and k["running"] >= 1 and k["queued"] >= 1 and sum(k.values()) == nf
    # ... and recounted from the kept database: all done, one done event each, the killed ones ran twice
    (work,) = results.glob(".serve-stories260k-*")
    db = sqlite3.connect(work / "fault" / "serve.db")
    states = Counter(s for (s,) in db.execute("SELECT state FROM jobs"))
    assert states == {"done": nf}
    done_events = Counter(j for (j,) in db.execute("SELECT job FROM events WHERE state = 'done'"))
    assert len(done_events) == nf and set(done_events.values()) == {1}
    attempts = Counter(a for (a,) in db.execute("SELECT attempts FROM jobs"))
    assert attempts[2] == k["running"] and attempts[1] == nf - k["running"]
    resumed = db.execute("SELECT COUNT(*) FROM events WHERE detail LIKE 'resumed%'").fetchone()[0]
    assert resumed == k["running"]
    for name, sha in db.execute("SELECT artifact, artifact_sha256 FROM jobs"):
        import hashlib

        path = work / "fault" / "serve.db.artifacts" / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    db.close()
