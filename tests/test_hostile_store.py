"""Hostile job databases: an empty, truncated or corrupt store is refused at start with one line and left
byte-identical (never reset); a missing one is created whole; a crash's write-ahead log is kept; a store from
before schema versions is copied aside before it is stamped; a symlink or hard link to a running server's database
meets its lock; a job that keeps crashing the server is failed after ``MAX_RESUMES`` interruptions."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest
from conftest import run_cli, save_llama

from compress.errors import CompressError
from compress.serve.store import MAX_RESUMES, SCHEMA, SCHEMA_VERSION, Store


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry of a tiny Llama and an (untrained) StratNet made for it: enough for `compress serve` to start."""
    from compress.prune.calib import model_fingerprint
    from compress.strategy.stratnet import StratNet, StratNetModel

    root = tmp_path_factory.mktemp("hostile_store")
    tiny = save_llama(root / "tiny", seed=0)
    sn = root / "sn.pt"
    StratNetModel(StratNet(2), block_params=[9216, 9216], sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95,
                  meta={"fingerprint": model_fingerprint(tiny), "model": str(tiny)}).save(sn)
    reg = root / "models.yml"
    reg.write_text(f"models:\n  tiny:\n    model: {tiny}\n    stratnet: {sn}\n    eval_windows: 0\n")
    return reg


def stored(path) -> "os.PathLike":
    """A closed store holding jobs in every state (several pages of them)."""
    s = Store(path)
    ids = [s.submit("tiny", "sparse", {"sparsity": 0.3 + i / 200, "name": "x" * 300})[0]["id"] for i in range(60)]
    _, group = s.claim_group(10)
    for job in group[:5]:
        s.finish(job["id"], job["attempts"], result={"sparsity": 0.5}, artifact="a", artifact_bytes=1,
                 artifact_sha256="h")
    s.finish(group[5]["id"], group[5]["attempts"], error="boom")
    s.cancel(ids[-1])
    s.close()
    return path


def folder(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


DAMAGE = {
    "empty": lambda b: b"",
    "half": lambda b: b[:len(b) // 2],
    "last page cut": lambda b: b[:-4096],
    "one byte cut": lambda b: b[:-1],
    "page overwritten": lambda b: b[:8192] + bytes(range(256)) * 16 + b[12288:],
    "header only": lambda b: b[:100],
    "not sqlite": lambda b: b'{"jobs": []}\n' * 40,
}
WHY = {"empty": "is empty (0 bytes)", "half": "is damaged (database disk image is malformed)",
       "last page cut": "is damaged", "one byte cut": "is truncated or damaged", "page overwritten": "is damaged",
       "header only": "is truncated or damaged", "not sqlite": "not a job database (not an SQLite file)"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_store_refused_untouched(tmp_path, damage):
    db = stored(tmp_path / "serve.db")
    db.write_bytes(DAMAGE[damage](db.read_bytes()))
    before = folder(tmp_path)
    with pytest.raises(CompressError) as e:
        Store(db)
    msg = one_line(str(e.value))
    assert msg.startswith(f"{db}: ") and WHY[damage] in msg, msg
    assert folder(tmp_path) == before  # byte-identical, and nothing made beside it


def test_serve_refuses_a_truncated_store(registry, tmp_path):
    from compress.bench.serve import free_port

    db = stored(tmp_path / "serve.db")
    half = db.read_bytes()[:20480]
    db.write_bytes(half)
    code, out, err = run_cli("serve", "--registry", registry, "--db", db, "--port", free_port())
    assert code == 2 and one_line(err).startswith(f"error: {db}: the job database is damaged (")
    db.write_bytes(b"")
    code, out, err = run_cli("serve", "--registry", registry, "--db", db, "--port", free_port())
    assert code == 2 and one_line(err) == (f"error: {db}: the job database is empty (0 bytes): truncated, its jobs "
                                           "lost? refusing to start over it; restore it from a backup, or move it "
                                           "away to start a new one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve.db"] and db.stat().st_size == 0


def test_missing_store_created_whole_and_a_crash_log_kept(tmp_path):
    db = tmp_path / "new" / "serve.db"
    s = Store(db)
    assert not [p for p in db.parent.iterdir() if ".new-" in p.name]  # the temporary file is gone
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    ids = [s.submit("tiny", "sparse", {"sparsity": 0.5})[0]["id"] for _ in range(3)]
    # what a kill -9 leaves: the committed jobs partly in the write-ahead log, beside the database
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("serve.db", "serve.db-wal"):
        shutil.copy(db.parent / name, crashed / name)
    s.close()
    assert sorted(p.name for p in db.parent.iterdir()) == ["serve.db"]
    assert (crashed / "serve.db-wal").stat().st_size > 0
    s = Store(crashed / "serve.db")
    assert [j["id"] for j in s.jobs()] == ids
    s.close()
    # the database gone but its log still there: not a new store
    (crashed / "serve.db").unlink()
    (crashed / "serve.db-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(28))
    with pytest.raises(CompressError, match="the job database is missing but its write-ahead log serve.db-wal is "
                                            "there"):
        Store(crashed / "serve.db")
    assert sorted(p.name for p in crashed.iterdir()) == ["serve.db-wal"]


def test_store_before_versions_is_copied_then_stamped(tmp_path):
    db = tmp_path / "serve.db"
    old = sqlite3.connect(db, isolation_level=None)  # as the first `compress serve` wrote it: no user_version
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(SCHEMA)
    old.execute("INSERT INTO jobs (id, seq, model, format, request, body_sha256, state, created) VALUES "
                "('j1', 1, 'tiny', 'sparse', '{\"sparsity\": 0.5}', 'h', 'queued', 1.0)")
    old.close()
    s = Store(db)
    assert [j["id"] for j in s.jobs()] == ["j1"]
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    s.close()
    (backup,) = tmp_path.glob("serve.db.v0-*.bak")
    b = sqlite3.connect(backup)
    assert b.execute("SELECT id FROM jobs").fetchall() == [("j1",)]
    assert b.execute("PRAGMA user_version").fetchone()[0] == 0
    b.close()
    Store(db).close()  # stamped: no second copy
    assert len(list(tmp_path.glob("*.bak"))) == 1


@pytest.mark.parametrize("kind", ["newer", "foreign"])
def test_other_databases_refused_untouched(tmp_path, kind):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    if kind == "newer":
        con.executescript(SCHEMA)
        con.execute("PRAGMA user_version = 99")
    else:
        con.execute("CREATE TABLE jobs (id TEXT, state TEXT)")
        con.execute("INSERT INTO jobs VALUES ('a', 'done')")
    con.commit()
    con.close()
    before = folder(tmp_path)
    want = ("job database version 99, this build reads up to 1; upgrade compress" if kind == "newer"
            else "not a job database (no jobs.artifact); give another --db")
    with pytest.raises(CompressError) as e:
        Store(db)
    assert one_line(str(e.value)) == f"{db}: {want}"
    assert folder(tmp_path) == before


def test_lock_follows_the_file_not_the_name(registry, tmp_path):
    """A second `compress serve` through a symlink or a hard link to a running server's database is refused by
    the lock (nothing of the first one's store changes); a file with two names is refused even when free."""
    from compress.bench.serve import Server, free_port, read_db

    db = tmp_path / "a" / "serve.db"
    db.parent.mkdir()
    s = Store(stored(db))
    for job in s.jobs():  # only finished jobs: the first server has nothing to change of its own accord
        if job["state"] in ("queued", "running"):
            s.cancel(job["id"])
    s.close()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    link, hard = tmp_path / "b" / "link.db", tmp_path / "c" / "hard.db"
    link.symlink_to(db)
    first = Server(tmp_path, registry, db, token=None, device="cpu", threads=1, cache_dir=tmp_path / "cache",
                   max_batch=8, tag="first")
    try:
        os.link(db, hard)
        before = read_db(db)
        for other in (link, hard, db):
            code, out, err = run_cli("serve", "--registry", registry, "--db", other, "--port", free_port())
            where = f" (the file {db})" if other == link else ""
            assert code == 2 and one_line(err) == (f"error: {other}: another `compress serve` holds this job "
                                                   f"database{where}; stop it or give another --db"), err
        assert read_db(db) == before and first.proc.poll() is None
    finally:
        first.stop()
    with pytest.raises(CompressError, match=r"hard.db: the job database has 2 names \(hard links\)"):
        Store(hard)
    with pytest.raises(CompressError, match="has 2 names"):
        Store(link)
    hard.unlink()
    s = Store(link)  # one file, one name: opened through the symlink, the same jobs
    assert [j["id"] for j in s.jobs()] == [j["id"] for j in before[0]]
    s.close()


def test_a_job_that_keeps_crashing_the_server_fails(tmp_path):
    s = Store(tmp_path / "s.db")
    bad, _ = s.submit("tiny", "sparse", {"sparsity": 0.5})
    for n in range(1, MAX_RESUMES):
        _, (claimed,) = s.claim_group(8)
        assert claimed["id"] == bad["id"] and claimed["attempts"] == n
        assert s.resume() == 1  # the server died while running it: queued again
    other, _ = s.submit("tiny", "sparse", {"sparsity": 0.4})
    s.claim_group(8)
    assert s.resume() == 1  # the other one, interrupted once
    job = s.get(bad["id"])
    assert job["state"] == "failed" and job["error"] == (f"interrupted {MAX_RESUMES} times while running (the "
                                                         "server stopped or crashed each time); not retried")
    assert s.get(other["id"])["state"] == "queued"
    assert [e["state"] for e in s.events(bad["id"])][-1] == "failed"
    s.close()
