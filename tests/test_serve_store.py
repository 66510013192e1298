"""The job store's promises, without a server: groups by model in arrival order, an outcome only from the attempt
that holds the job (so a result after a restart or a DELETE changes nothing), resume after a crash, idempotency,
the queue bound, one server per database."""

from __future__ import annotations

import sqlite3

import pytest

from compress.errors import CompressError
from compress.serve.store import IdempotencyConflict, QueueFull, Store


def test_groups_by_model_in_arrival_order(tmp_path):
    s = Store(tmp_path / "s.db")
    ids = [s.submit(m, "sparse", {"sparsity": 0.1 * (i + 1)})[0]["id"] for i, m in enumerate("abab a".replace(" ", ""))]
    model, jobs = s.claim_group(2)
    assert model == "a" and [j["id"] for j in jobs] == [ids[0], ids[2]]
    assert all(j["state"] == "running" and j["attempts"] == 1 for j in jobs)
    model, jobs = s.claim_group(8)
    assert model == "b" and [j["id"] for j in jobs] == [ids[1], ids[3]]
    model, jobs = s.claim_group(8)
    assert model == "a" and [j["id"] for j in jobs] == [ids[4]]
    assert s.claim_group(8) is None
    assert s.counts()["running"] == 5 and s.counts()["queued"] == 0
    # committed: another connection sees every job at once
    other = sqlite3.connect(tmp_path / "s.db")
    assert other.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0] == 5
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_outcome_only_from_the_attempt_that_holds_the_job(tmp_path):
    s = Store(tmp_path / "s.db")
    job, _ = s.submit("a", "sparse", {"sparsity": 0.5})
    _, (claimed,) = s.claim_group(4)
    assert s.resume() == 1  # a restart: the running job goes back to the queue
    assert s.get(job["id"])["state"] == "queued"
    assert not s.finish(job["id"], claimed["attempts"], result={"sparsity": 0.5})  # the old attempt's late result
    _, (again,) = s.claim_group(4)
    assert again["attempts"] == 2
    assert s.finish(job["id"], 2, result={"sparsity": 0.5}, artifact="x", artifact_bytes=3, artifact_sha256="h")
    assert not s.finish(job["id"], 2, result={"sparsity": 0.5})  # twice: no second completion
    states = [e["state"] for e in s.events(job["id"])]
    assert states == ["queued", "running", "queued", "running", "done"]
    # cancelled while running: the outcome is dropped
    job2, _ = s.submit("a", "sparse", {"sparsity": 0.4})
    _, (c2,) = s.claim_group(4)
    s.cancel(job2["id"])
    assert not s.finish(job2["id"], c2["attempts"], result={})
    assert s.get(job2["id"])["state"] == "cancelled"
    s.close()


def test_idempotency_and_queue_bound(tmp_path):
    s = Store(tmp_path / "s.db")
    a, created = s.submit("a", "sparse", {"sparsity": 0.5}, idempotency_key="k")
    b, created2 = s.submit("a", "sparse", {"sparsity": 0.5}, idempotency_key="k")
    assert created and not created2 and a["id"] == b["id"]
    with pytest.raises(IdempotencyConflict):
        s.submit("a", "dense", {"sparsity": 0.5}, idempotency_key="k")
    s.submit("a", "sparse", {"sparsity": 0.6}, max_queue=2)
    with pytest.raises(QueueFull):
        s.submit("a", "sparse", {"sparsity": 0.7}, max_queue=2)
    assert len(s.jobs()) == 2
    s.close()


def test_one_server_per_database(tmp_path):
    s = Store(tmp_path / "s.db")
    with pytest.raises(CompressError, match="another `compress serve` holds this job database"):
        Store(tmp_path / "s.db")
    s.close()
    Store(tmp_path / "s.db").close()  # free again once the first is gone
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CompressError, match="not a job database"):
        Store(tmp_path / "junk.db")


def test_start_clears_what_a_killed_server_was_writing(tmp_path):
    from compress.config import ServeConfig
    from compress.serve.worker import Dispatcher

    art = tmp_path / "art"
    (art / ".work" / "job-1-123").mkdir(parents=True)
    (art / ".work" / "job-1-123" / "model.safetensors").write_bytes(b"half")
    (art / ".x.sparse.safetensors.tmp-abc").write_bytes(b"half")
    (art / ".y.tar.tmp-def").mkdir()
    (art / "done.sparse.safetensors").write_bytes(b"kept")
    s = Store(tmp_path / "s.db")
    d = Dispatcher(s, None, ServeConfig(registry=tmp_path / "r.yml"), art)
    d.start()
    d.stop()
    s.close()
    assert sorted(p.name for p in art.iterdir()) == ["done.sparse.safetensors"]
