"""The server's job store: SQLite in WAL mode, one file, every change committed before the server answers.

Tables: ``jobs`` (one row per accepted request: its body, state, attempts, result, artifact record) and ``events``
(an append-only log of every state change, written in the same transaction as the change, so the history of a job
can be audited after a crash: a job that completed has exactly one ``done`` event).

States: ``queued`` → ``running`` → ``done`` | ``failed``; ``cancelled`` from any of them (DELETE). A claim bumps
``attempts``; a result is recorded only by the attempt that holds the job (``state = 'running' AND attempts = ?``),
so a result that arrives after a restart re-queued the job, or after a DELETE, changes nothing. On start the
server calls ``resume()``: jobs left ``running`` by a crash go back to ``queued``.

One server per database: ``Store`` takes an exclusive ``flock`` on ``<db>.lock`` (released by the kernel when the
process dies, so a kill -9 never leaves it stale).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

from compress.errors import CompressError

FINAL = ("done", "failed", "cancelled")
STATES = ("queued", "running", *FINAL)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    model TEXT NOT NULL,
    format TEXT NOT NULL,
    request TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    error TEXT,
    artifact TEXT,
    artifact_bytes INTEGER,
    artifact_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, model, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job);
"""


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    pass


def body_sha256(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Store:
    """Thread-safe job store over one SQLite connection (calls are short; a lock serializes them)."""

    def __init__(self, path: str | os.PathLike, *, lock: bool = True):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CompressError(f"{self.path}: cannot create the database folder ({e.strerror})") from None
        self._lockfile = None
        if lock:
            self._lockfile = open(self.path.with_name(self.path.name + ".lock"), "w")
            try:
                fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lockfile.close()
                raise CompressError(f"{self.path}: another `compress serve` holds this job database; stop it or "
                                    "give another --db") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the HTTP answer goes out (WAL's NORMAL may lose the last commits
            # on power loss; a process crash loses nothing either way).
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            if self._lockfile is not None:
                self._lockfile.close()
            raise CompressError(f"{self.path}: not a job database ({e})") from None
        self.db.row_factory = sqlite3.Row
        self._mutex = threading.RLock()
        # called after every committed change (the server wakes its long-polls with it)
        self.listeners: list = []

    def close(self) -> None:
        with self._mutex:
            self.db.close()
        if self._lockfile is not None:
            self._lockfile.close()

    # -- transactions ----------------------------------------------------------------------------------------
    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._mutex.acquire()
                store.db.execute("BEGIN IMMEDIATE")
                return store.db

            def __exit__(self, kind, value, tb):
                try:
                    store.db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    store._mutex.release()
                if kind is None:
                    for listener in store.listeners:
                        listener()
                return False

        return _Tx()

    @staticmethod
    def _event(db, job: str, attempt: int, state: str, detail: Optional[str] = None) -> None:
        db.execute("INSERT INTO events (job, attempt, state, at, detail) VALUES (?, ?, ?, ?, ?)",
                   (job, attempt, state, time.time(), detail))

    # -- accepting ---------------------------------------------------------------------------------------------
    def submit(self, model: str, fmt: str, request: dict, *, idempotency_key: Optional[str] = None,
               max_queue: Optional[int] = None) -> tuple[dict, bool]:
        """(job, created): a new queued job, or the existing one for a repeated idempotency key with the same body.
        ``QueueFull`` when ``max_queue`` jobs are queued; ``IdempotencyConflict`` for a reused key with another
        body."""
        sha = body_sha256({"model": model, "format": fmt, "request": request})
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_sha256"] != sha:
                        raise IdempotencyConflict(idempotency_key)
                    return _job(row), False
            if max_queue is not None:
                n = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
                if n >= max_queue:
                    raise QueueFull(n)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job_id = uuid.uuid4().hex
            db.execute("INSERT INTO jobs (id, seq, model, format, request, body_sha256, idempotency_key, state, "
                       "created) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                       (job_id, seq, model, fmt, json.dumps(request), sha, idempotency_key, time.time()))
            self._event(db, job_id, 0, "queued")
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row), True

    # -- reading -----------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Optional[dict]:
        with self._mutex:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, state: Optional[str] = None) -> list[dict]:
        with self._mutex:
            if state is None:
                rows = self.db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            else:
                rows = self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state,)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._mutex:
            rows = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r[0]: r[1] for r in rows}

    def position(self, job: dict) -> Optional[int]:
        """Jobs queued ahead of a queued job (None for other states)."""
        if job["state"] != "queued":
            return None
        with self._mutex:
            return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?",
                                   (job["seq"],)).fetchone()[0]

    def events(self, job_id: Optional[str] = None) -> list[dict]:
        with self._mutex:
            if job_id is None:
                rows = self.db.execute("SELECT * FROM events ORDER BY seq").fetchall()
            else:
                rows = self.db.execute("SELECT * FROM events WHERE job = ? ORDER BY seq", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    # -- the worker's side -----------------------------------------------------------------------------------
    def resume(self) -> int:
        """Put jobs a crash left ``running`` back in the queue; returns how many."""
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for r in rows:
                self._event(db, r["id"], r["attempts"], "queued", "resumed after an interruption")
            db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE state = 'running'")
        return len(rows)

    def claim_group(self, max_batch: int, models: Optional[Iterable[str]] = None) -> Optional[tuple[str, list[dict]]]:
        """(model, jobs): up to ``max_batch`` queued jobs of the model whose oldest job waits longest, marked
        ``running`` with their attempt bumped; None when nothing is queued (for ``models``, when given)."""
        with self._tx() as db:
            if models is None:
                row = db.execute("SELECT model FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            else:
                models = list(models)
                if not models:
                    return None
                marks = ",".join("?" * len(models))
                row = db.execute(f"SELECT model FROM jobs WHERE state = 'queued' AND model IN ({marks}) "
                                 "ORDER BY seq LIMIT 1", models).fetchone()
            if row is None:
                return None
            model = row["model"]
            rows = db.execute("SELECT * FROM jobs WHERE state = 'queued' AND model = ? ORDER BY seq LIMIT ?",
                              (model, max_batch)).fetchall()
            now = time.time()
            for r in rows:
                db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ? WHERE id = ?",
                           (now, r["id"]))
                self._event(db, r["id"], r["attempts"] + 1, "running", f"group of {len(rows)}")
            ids = [r["id"] for r in rows]
            out = db.execute(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))}) ORDER BY seq",
                             ids).fetchall()
        return model, [_job(r) for r in out]

    def finish(self, job_id: str, attempt: int, *, result: Optional[dict] = None, error: Optional[str] = None,
               artifact: Optional[str] = None, artifact_bytes: Optional[int] = None,
               artifact_sha256: Optional[str] = None) -> bool:
        """Record the outcome of ``attempt`` (done with ``result``/``artifact``, or failed with ``error``); False
        when that attempt no longer holds the job (cancelled, or re-queued by a restart): nothing changes."""
        state = "failed" if error is not None else "done"
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = ?, finished = ?, result = ?, error = ?, artifact = ?, "
                             "artifact_bytes = ?, artifact_sha256 = ? WHERE id = ? AND state = 'running' AND "
                             "attempts = ?",
                             (state, time.time(), None if result is None else json.dumps(result), error, artifact,
                              artifact_bytes, artifact_sha256, job_id, attempt))
            if cur.rowcount != 1:
                return False
            self._event(db, job_id, attempt, state, error)
        return True

    def requeue(self, job_id: str, attempt: int, why: str) -> bool:
        """Give a claimed job back to the queue (the worker stopped before it)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE id = ? AND state = 'running' "
                             "AND attempts = ?", (job_id, attempt))
            if cur.rowcount != 1:
                return False
            self._event(db, job_id, attempt, "queued", why)
        return True

    def cancel(self, job_id: str) -> Optional[dict]:
        """Mark a job cancelled (its artifact record cleared; the caller removes the file); None if unknown."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] != "cancelled":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, artifact = NULL WHERE id = ?",
                           (time.time(), job_id))
                self._event(db, job_id, row["attempts"], "cancelled", f"was {row['state']}")
        return _job(row)  # as it was: the caller removes its artifact


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["request"] = json.loads(job["request"])
    job["result"] = json.loads(job["result"]) if job.get("result") else None
    return job
