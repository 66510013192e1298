"""The server's job store: SQLite in WAL mode, one file, every change committed before the server answers.

Tables: ``jobs`` (one row per accepted request: its body, state, attempts, result, artifact record) and ``events``
(an append-only log of every state change, written in the same transaction as the change, so the history of a job
can be audited after a crash: a job that completed has exactly one ``done`` event).

States: ``queued`` → ``running`` → ``done`` | ``failed``; ``cancelled`` from any of them (DELETE). A claim bumps
``attempts``; a result is recorded only by the attempt that holds the job (``state = 'running' AND attempts = ?``),
so a result that arrives after a restart re-queued the job, or after a DELETE, changes nothing. On start the
server calls ``resume()``: jobs left ``running`` by a crash go back to ``queued``.

A job interrupted while running ``MAX_RESUMES`` times (the server crashed each time: a job that kills the process)
is failed by ``resume()`` instead of queued again, so it cannot crash every restart.

Start (``Store(path)``): a missing file is created whole (schema and version written to a temporary file that is
then linked into place); a file that exists is checked before anything writes to it (SQLite header, ``PRAGMA
integrity_check`` on a read-only connection, the expected tables and columns, ``PRAGMA user_version``) and a
damaged one is refused with one line, never reset: an empty or truncated file is a store that lost its jobs. A
store written before versions were recorded (``user_version`` 0, same tables) is copied to
``<db>.v0-<time>.bak`` before it is stamped with the current version.

One server per database: ``Store`` takes an exclusive ``flock`` on the database file itself (released by the
kernel when the process dies, so a kill -9 never leaves it stale), so a symlink or a hard link to the same file
meets the same lock. A file with several hard links is refused: SQLite keeps its write-ahead log beside the name
it was opened by, so a server started through another name would miss committed jobs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

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
SCHEMA_VERSION = 1  # PRAGMA user_version; 0: written before versions were recorded (the same tables)
MAX_RESUMES = 3
SQLITE_MAGIC = b"SQLite format 3\x00"


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
        real = _real_path(self.path)
        if not real.exists():
            _create(real, self.path)
        self._lockfd = _lock(real, self.path) if lock else None
        try:
            version = _check(real, self.path)
            try:
                self.db = sqlite3.connect(real, isolation_level=None, check_same_thread=False, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk before the HTTP answer goes out (WAL's NORMAL may lose the last
                # commits on power loss; a process crash loses nothing either way).
                self.db.execute("PRAGMA synchronous=FULL")
                if version < SCHEMA_VERSION:
                    _migrate(self.db, real, version)
            except (sqlite3.DatabaseError, OSError) as e:
                raise CompressError(f"{self.path}: cannot open the job database ({e})") from None
        except BaseException:
            if getattr(self, "db", None) is not None:
                self.db.close()
            if self._lockfd is not None:
                os.close(self._lockfd)
            raise
        self.db.row_factory = sqlite3.Row
        self._mutex = threading.RLock()
        # called after every committed change (the server wakes its long-polls with it)
        self.listeners: list = []

    def close(self) -> None:
        with self._mutex:
            self.db.close()
        # after SQLite's own descriptors: closing any descriptor of the file drops this process's POSIX locks on it
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None

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
        """Put jobs a crash left ``running`` back in the queue (failing those interrupted ``MAX_RESUMES`` times);
        returns how many were re-queued."""
        queued = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for r in rows:
                before = db.execute("SELECT COUNT(*) FROM events WHERE job = ? AND state = 'queued' AND detail LIKE "
                                    "'resumed%'", (r["id"],)).fetchone()[0]
                if before + 1 >= MAX_RESUMES:
                    why = (f"interrupted {before + 1} times while running (the server stopped or crashed each "
                           "time); not retried")
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                               (time.time(), why, r["id"]))
                    self._event(db, r["id"], r["attempts"], "failed", why)
                    continue
                self._event(db, r["id"], r["attempts"], "queued", "resumed after an interruption")
                db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE id = ?", (r["id"],))
                queued += 1
        return queued

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


# -- opening ---------------------------------------------------------------------------------------------------
def _real_path(path: Path) -> Path:
    """The file behind ``path`` (symlinks resolved): what is checked, locked and opened."""
    real = path.resolve()
    if os.path.lexists(path) and not real.exists():
        raise CompressError(f"{path}: a link to {real}, which does not exist; restore or mount it, or remove the "
                            "link to start a new job database")
    if real.exists() and not real.is_file():
        raise CompressError(f"{path}: not a file ({real}); give a job database file with --db")
    return real


def _sidecars(real: Path) -> list[Path]:
    return [real.with_name(real.name + s) for s in ("-wal", "-shm")]


def _create(real: Path, given: Path) -> None:
    """A new, empty store at ``real`` (which does not exist): written beside it, linked into place whole, so the
    path never holds a half-made database (and an empty file there is never one of ours)."""
    wal = _sidecars(real)[0]
    if wal.exists():
        raise CompressError(f"{given}: the job database is missing but its write-ahead log {wal.name} is there "
                            "(committed jobs may be in it): restore the database, or remove the log to start anew")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{real.name}.new-", dir=real.parent)
        os.close(fd)
    except OSError as e:
        raise CompressError(f"{given}: cannot create the job database ({e.strerror})") from None
    tmp = Path(name)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, real)  # unlike a rename, never replaces a store another server created meanwhile
        except FileExistsError:
            pass  # that one is checked and locked like any existing store
        except OSError:
            if not real.exists():  # a filesystem without hard links
                os.rename(tmp, real)
        dfd = os.open(real.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise CompressError(f"{given}: cannot create the job database ({e.strerror})") from None
    finally:
        for p in (tmp, *_sidecars(tmp)):
            p.unlink(missing_ok=True)


def _lock(real: Path, given: Path) -> int:
    """An exclusive flock on the database file's own inode (every name of it meets the same lock); the
    descriptor, kept open while the store is."""
    where = f" (the file {real})" if real != given else ""
    fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CompressError(f"{given}: another `compress serve` holds this job database{where}; stop it or give "
                            "another --db") from None
    st = os.fstat(fd)
    problem = None
    if os.stat(real).st_ino != st.st_ino:
        problem = "was replaced while the server started; start it again"
    elif st.st_nlink > 1:
        problem = (f"the job database has {st.st_nlink} names (hard links); SQLite keeps its write-ahead log beside "
                   "the name it is opened by, so a server started through another name would miss committed jobs: "
                   "keep one name (remove the other links)")
    if problem:
        os.close(fd)
        raise CompressError(f"{given}: {problem}")
    return fd


def _check(real: Path, given: Path) -> int:
    """The schema version of the store at ``real``, after checking it (read-only: nothing is written to it);
    a damaged or foreign file is one line."""
    size = real.stat().st_size
    wal = _sidecars(real)[0]
    if size == 0:
        raise CompressError(f"{given}: the job database is empty (0 bytes): truncated, its jobs lost? refusing to "
                            "start over it; restore it from a backup, or move it away to start a new one")
    with open(real, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise CompressError(f"{given}: not a job database (not an SQLite file); give another --db")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or size % page:
        raise CompressError(f"{given}: the job database is truncated or damaged ({size:,} bytes is not a whole "
                            f"number of its {page:,}-byte pages); restore it from a backup")
    existed = [p.exists() for p in _sidecars(real)]
    try:
        db = sqlite3.connect(f"file:{quote(str(real))}?mode=ro", uri=True, timeout=30)
        try:
            problems = [r[0] for r in db.execute("PRAGMA integrity_check(5)").fetchall()]
            tables = {name: {c[1] for c in db.execute(f"PRAGMA table_info({name})")}
                      for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        problems, tables, version = [str(e)], {}, None
    finally:  # what the read-only check made beside it (an empty log, the index): gone again
        for p, was in zip(_sidecars(real), existed):
            if not was and p.exists() and (p != wal or p.stat().st_size == 0):
                p.unlink(missing_ok=True)
    if problems != ["ok"]:
        raise CompressError(f"{given}: the job database is damaged ({'; '.join(problems)[:300]}); refusing to serve "
                            "from it: restore it from a backup, or move it away to start a new one")
    missing = [f"{t}.{c}" for t, cols in _expected_tables().items() for c in sorted(cols - tables.get(t, set()))]
    if missing:
        raise CompressError(f"{given}: not a job database (no {missing[0]}); give another --db")
    if version > SCHEMA_VERSION:
        raise CompressError(f"{given}: job database version {version}, this build reads up to {SCHEMA_VERSION}; "
                            "upgrade compress")
    return version


def _expected_tables() -> dict[str, set[str]]:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    out = {name: {c[1] for c in db.execute(f"PRAGMA table_info({name})")} for name in ("jobs", "events")}
    db.close()
    return out


def _migrate(db: sqlite3.Connection, real: Path, version: int) -> None:
    """Bring a store of ``version`` to ``SCHEMA_VERSION``, after a whole copy of it beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    backup = real.with_name(f"{real.name}.v{version}-{stamp}.bak")
    tmp = backup.with_name("." + backup.name + ".tmp")
    dst = sqlite3.connect(tmp)
    try:
        db.backup(dst)
    finally:
        dst.close()
    os.replace(tmp, backup)
    # 0 → 1: the same tables; only the version is recorded
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
