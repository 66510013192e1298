"""``compress bench serve``: `compress serve` under load and under a kill -9, against `compress batch`, in one run.

1. **StratNet**: ``--stratnet``, or the one cached at ``checkpoints/serve/<model>.stratnet.pt`` when it loads for
   the model, or a new one (``compress strategy train``, budget 60, calibration shakespeare). The calibration
   statistics are put in the cache before anything is timed, so the server and `compress batch` both read them
   from disk (neither pays the calibration forward pass).
2. **Requests**: a deterministic list of N requests: sparsity targets spread over the StratNet's range (a
   golden-ratio sequence), preferences λ in [0, 1], a few ``size_bytes`` budgets inside the reachable sizes and a
   few with ``protect_heads``. The same list is the JSON-lines file `compress batch` answers.
3. **Load test**: `compress serve` in a subprocess on a free loopback port (a fresh database, a random bearer
   token, a registry written for the run); C client threads, each with its own ``Client``, submit their share of
   the requests at once and long-poll each until it is final. Latency, client side: submit → observed final;
   server side: ``finished − created`` of the job. Throughput: completed requests over first submit → last
   observed completion. Groups: the distinct claim times (``started``) of the jobs in the database. The model
   load happens in the server's first group, inside the measured time.
4. **Baseline**: `compress batch` in a subprocess over the same requests (format sparse). Its wall time counts
   the process start and model load (the server's process start is not counted: it is up before the first
   submit); its summary's own seconds leave the interpreter start out. Both ratios are reported.
5. **Artifacts**: every server artifact is downloaded (``Client.download``, SHA-256 checked), opened as a sparse
   file, its sparsity measured over the pruned tensors against the job's target (0.5 pt), ``size_bytes`` budgets
   checked against the file size, and its stored tensors compared with the batch output of the same request.
6. **Fault test**: a new server (fresh database, ``--max-batch`` small so that jobs wait) gets F requests with
   idempotency keys; once the database shows a job done, one running and one queued, the server gets SIGKILL.
   The states at the kill are read from the database; a new server on the same database resumes; a few requests
   are sent again with their keys; every accepted request is waited for. Checked from the database and the
   files: every job done, exactly one ``done`` event per job, no job beyond the accepted ones, the jobs running
   at the kill ran twice (attempts = 2) and the others once, every artifact present, matching its recorded
   SHA-256 and loading at its target sparsity, the repeated keys answered with the original ids.

Saves ``serve-<model>.json``, ``.md`` and ``.png`` (completion-time and latency CDFs) under ``--results``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from compress.config import CALIB_CACHE
from compress.errors import CompressError
from compress.progress import console

GOLDEN = 0.6180339887498949
STRATNET_DIR = Path("checkpoints/serve")
SPARSITY_TOL = 0.005  # measured sparsity within half a point of the target
HEALTH_SECONDS = 60.0


# -- setup ---------------------------------------------------------------------------------------------------------
def model_dir(zoo: str, zoo_root: Path) -> tuple[Path, str]:
    folder = zoo_root / zoo
    if (folder / "config.json").is_file():
        return folder, zoo
    if Path(zoo).is_dir() and (Path(zoo) / "config.json").is_file():
        return Path(zoo), Path(zoo).name
    raise CompressError(f"{folder}: not built; run `compress zoo build {zoo} --out-root {zoo_root}` first "
                        "(or pass a model folder)")


def ensure_stratnet(model: Path, name: str, given: Optional[Path], *, cache_dir: Path, device: str,
                    quiet: bool) -> tuple[Path, str]:
    """(StratNet file, how it was obtained: given | cached | trained)."""
    from compress.strategy.stratnet import StratNetModel

    if given is not None:
        StratNetModel.load(given, model)  # a StratNet for another model stops here, naming both
        return given, "given"
    path = STRATNET_DIR / f"{name}.stratnet.pt"
    if path.is_file():
        try:
            StratNetModel.load(path, model)
            return path, "cached"
        except CompressError as e:
            console.print(f"[bench serve] {e}: training a new one")
    from compress.config import StrategyTrainConfig, build
    from compress.strategy.train import run_train

    console.print(f"[bench serve] training a StratNet for {model} (budget 60, calibration shakespeare) → {path}")
    run_train(build(StrategyTrainConfig, model=model, out=path, calib="shakespeare", budget=60,
                    cache_dir=cache_dir, device=device, overwrite=True, quiet=quiet))
    return path, "trained"


def warm_pruner(model: Path, stratnet: Path, *, cache_dir: Path, device: str, quiet: bool):
    """The pruner the server and `compress batch` build (same calibration key), its statistics now in the cache."""
    from compress.strategy.stratnet import StratNetModel
    from compress.strategy.train import stratnet_pruner

    net = StratNetModel.load(stratnet, model)
    pruner = stratnet_pruner(net, model, device=device, cache_dir=cache_dir, quiet=quiet)
    pruner.stats()
    return net, pruner


def make_requests(n: int, sparsity_range: tuple[float, float], size_model) -> list[dict]:
    """N deterministic requests: 14 in 20 sparsity targets, 3 preferences, 2 size budgets, 1 sparsity with a
    protected head; targets and budgets fill the StratNet's range (golden-ratio sequence, no two alike)."""
    lo, hi = sparsity_range
    inner_lo, inner_hi = lo + 0.02 * (hi - lo), hi - 0.02 * (hi - lo)
    out = []
    for i in range(n):
        u = ((i + 0.5) * GOLDEN) % 1.0
        t = round(inner_lo + (inner_hi - inner_lo) * u, 4)
        kind = i % 20
        r: dict = {"id": f"r{i:04d}"}
        if kind in (5, 12, 18):
            r["preference"] = round(u, 4)
        elif kind in (9, 16) and size_model is not None:
            r["size_bytes"] = size_model.bytes(t)
        else:
            r["sparsity"] = t
            if kind == 19:
                r["protect_heads"] = [[i % 2, i % 3]]
        out.append(r)
    return out


def child_env(threads: int, token: Optional[str] = None) -> dict:
    """The environment of the server and batch processes: this checkout's code first, ``threads`` torch
    threads, no progress bars."""
    import compress

    root = str(Path(compress.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["COMPRESS_QUIET"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    if token is not None:
        env["COMPRESS_SERVE_TOKEN"] = token
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m compress.cli serve` in a subprocess (its own process group), up when /healthz answers."""

    def __init__(self, workdir: Path, registry: Path, db: Path, *, token: str, device: str, threads: int,
                 cache_dir: Path, max_batch: int, tag: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{tag}.log"
        cmd = [sys.executable, "-m", "compress.cli", "serve", "--registry", str(registry), "--host", "127.0.0.1",
               "--port", str(self.port), "--db", str(db), "--device", device, "--cache-dir", str(cache_dir),
               "--max-batch", str(max_batch), "--quiet"]
        t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(threads, token), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_up()
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.perf_counter() - t0

    def _wait_up(self) -> None:
        import httpx

        deadline = time.monotonic() + HEALTH_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CompressError(f"the server exited with code {self.proc.returncode} before answering: "
                                    f"{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise CompressError(f"the server did not answer /healthz within {HEALTH_SECONDS:g} s: {self.tail()}")

    def tail(self, n: int = 400) -> str:
        try:
            return " ".join(self.log.read_text(errors="replace")[-n:].split())
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, no clean-up of any kind (what the fault test needs, and the last resort otherwise)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()


def write_registry(path: Path, name: str, model: Path, stratnet: Path, eval_windows: int) -> Path:
    path.write_text(json.dumps({"models": {name: {"model": str(model.resolve()), "stratnet": str(stratnet.resolve()),
                                                  "eval_windows": eval_windows}}}, indent=1) + "\n")
    return path


def read_db(db: Path) -> tuple[list[dict], list[dict]]:
    """(jobs, events) from a job database, read-only (the server may be running or dead)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        jobs = [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY seq")]
        events = [dict(r) for r in con.execute("SELECT * FROM events ORDER BY seq")]
    finally:
        con.close()
    for j in jobs:
        j["result"] = json.loads(j["result"]) if j.get("result") else None
        j["request"] = json.loads(j["request"])
    return jobs, events


def kill_moment(db: Path) -> dict:
    """Job counts by state, and whether some group has a job done while another of it still runs."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        counts = dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        partly = con.execute("SELECT COUNT(*) FROM jobs r JOIN jobs d ON r.started = d.started "
                             "WHERE r.state = 'running' AND d.state = 'done'").fetchone()[0]
    finally:
        con.close()
    return {"done": counts.get("done", 0), "running": counts.get("running", 0), "queued": counts.get("queued", 0),
            "group_partly_done": partly > 0}


def percentiles(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    a = np.asarray(xs, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "max": float(a.max()),
            "mean": float(a.mean())}


# -- artifacts -----------------------------------------------------------------------------------------------------
def measured_sparsity(path: Path, pruned: list[str]) -> float:
    from compress.io.deltafile import DeltaFile

    f = DeltaFile(path)
    try:
        zeros = total = 0
        for name in pruned:
            t = f.get(name)
            zeros += int((t == 0).sum())
            total += t.numel()
    finally:
        f.close()
    return zeros / total


def same_tensors(a: Path, b: Path) -> bool:
    """The two sparse files store the same tensors (names, dtypes, bytes); their metadata may differ."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def check_artifact(path: Path, target: float, pruned: list[str], request: dict) -> dict:
    out: dict = {"loads": False, "within_tol": False}
    try:
        s = measured_sparsity(path, pruned)
    except Exception as e:  # noqa: BLE001 - a file that does not load is what this check reports
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    out.update(loads=True, sparsity=s, target=target, within_tol=abs(s - target) <= SPARSITY_TOL,
               bytes=path.stat().st_size)
    if "size_bytes" in request:
        out["within_budget"] = out["bytes"] <= request["size_bytes"]
        out["within_tol"] = out["within_tol"] and out["within_budget"]
    return out


# -- load test -----------------------------------------------------------------------------------------------------
def load_test(server: Server, token: str, name: str, requests: list[dict], clients: int, timeout: float) -> dict:
    from compress.serve.client import Client

    shares = [requests[c::clients] for c in range(clients)]
    rows: dict[str, dict] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + timeout
    t0 = time.perf_counter()
    barrier = threading.Barrier(clients)

    def client(share: list[dict]) -> None:
        with Client(server.url, token, timeout=90.0) as c:
            mine = []
            barrier.wait()
            for r in share:
                ts = time.perf_counter()
                try:
                    job = c.submit(name, format="sparse", **r)
                    mine.append((r["id"], job["id"], ts))
                except CompressError as e:
                    with lock:
                        rows[r["id"]] = {"submitted": ts - t0, "error": str(e)[:300]}
            for rid, job_id, ts in mine:
                left = deadline - time.perf_counter()
                row = {"job": job_id, "submitted": ts - t0}
                try:
                    if left <= 0:
                        raise CompressError(f"not final within --timeout {timeout:g} s")
                    job = c.wait(job_id, timeout=left)
                    row.update(done=time.perf_counter() - t0, state=job["state"], error=job.get("error"))
                    row["latency"] = row["done"] - row["submitted"]
                except CompressError as e:
                    row.update(state="unfinished", error=str(e)[:300])
                with lock:
                    rows[rid] = row

    threads = [threading.Thread(target=client, args=(s,), name=f"bench-client-{i}") for i, s in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in rows.values() if r.get("state") == "done"]
    first = min((r["submitted"] for r in rows.values()), default=0.0)
    last = max((r["done"] for r in done), default=first)
    span = last - first
    return {"rows": rows, "completed": len(done), "failed": sum(r.get("state") == "failed" for r in rows.values()),
            "unfinished": len(requests) - len(done) - sum(r.get("state") == "failed" for r in rows.values()),
            "seconds": span, "throughput": len(done) / span if span > 0 else None,
            "latency": percentiles([r["latency"] for r in done])}


def server_side(db: Path, ids: set[str]) -> dict:
    jobs, events = read_db(db)
    mine = [j for j in jobs if j["id"] in ids]
    lat = [j["finished"] - j["created"] for j in mine if j["state"] == "done"]
    groups = Counter(j["started"] for j in mine if j["started"] is not None)
    compute = [j["result"]["seconds"] for j in mine if j["state"] == "done" and j["result"]]
    first_created = min((j["created"] for j in mine), default=0.0)
    first_done = min((j["finished"] for j in mine if j["finished"]), default=None)
    return {"jobs": len(jobs), "latency": percentiles(lat), "latencies": sorted(lat), "groups": len(groups),
            "group_sizes": [groups[k] for k in sorted(groups)],
            "first_done_after": None if first_done is None else first_done - first_created,
            "attempts": dict(Counter(j["attempts"] for j in mine)),
            "job_seconds_mean": sum(compute) / len(compute) if compute else None, "by_id": {j["id"]: j for j in mine},
            "events": len(events)}


# -- baseline ------------------------------------------------------------------------------------------------------
def batch_baseline(model: Path, stratnet: Path, reqs_file: Path, out: Path, *, device: str, threads: int,
                   cache_dir: Path, timeout: float, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "compress.cli", "batch", str(model), "--stratnet", str(stratnet), "--requests",
           str(reqs_file), "--out", str(out), "--format", "sparse", "--device", device, "--cache-dir",
           str(cache_dir), "--quiet"]
    log = workdir / "batch.log"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        try:
            p = subprocess.run(cmd, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CompressError(f"compress batch did not finish within --timeout {timeout:g} s (log {log})") from None
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = " ".join(log.read_text(errors="replace")[-400:].split())
        raise CompressError(f"compress batch exited with code {p.returncode}: {tail}")
    summary = json.loads((out / "summary.json").read_text())
    n = len(summary["rows"])
    # completion time of each request since the process started: the interpreter start and imports (wall minus
    # the summary's own seconds) + model load and answering + the requests before it and itself
    offset = wall - summary["seconds"] + summary["answer_seconds"]
    completions, acc = [], offset
    for r in summary["rows"]:
        acc += r["seconds"]
        completions.append(acc)
    return {"wall_seconds": wall, "summary_seconds": summary["seconds"], "answer_seconds": summary["answer_seconds"],
            "completed": n, "throughput_wall": n / wall, "throughput_summary": n / summary["seconds"],
            "completions": completions, "rows": {r["id"]: r for r in summary["rows"]},
            "job_seconds_mean": sum(r["seconds"] for r in summary["rows"]) / max(1, n)}


# -- fault test ----------------------------------------------------------------------------------------------------
def fault_test(workdir: Path, registry: Path, name: str, requests: list[dict], *, device: str, threads: int,
               cache_dir: Path, max_batch: int, timeout: float, pruned: list[str], batch_out: Optional[Path]) -> dict:
    from compress.serve.client import Client

    fdir = workdir / "fault"
    fdir.mkdir()
    db = fdir / "serve.db"
    artifacts = db.with_name(db.name + ".artifacts")
    token = secrets.token_urlsafe(24)
    key = {r["id"]: f"bench-fault-{r['id']}" for r in requests}
    rep: dict = {"requests": len(requests), "max_batch": max_batch}
    server = Server(fdir, registry, db, token=token, device=device, threads=threads, cache_dir=cache_dir,
                    max_batch=max_batch, tag="fault-1")
    accepted: dict[str, str] = {}  # request id -> job id
    try:
        with Client(server.url, token) as c:
            for r in requests:
                accepted[r["id"]] = c.submit(name, format="sparse", idempotency_key=key[r["id"]], **r)["id"]
        # the moment: a group partly done (a job of the running group done, another still running) with jobs
        # queued behind it; if groups finish too fast to catch that, any done + running + queued before the last
        # group is claimed
        deadline = time.monotonic() + min(timeout, 300.0)
        while time.monotonic() < deadline:
            seen = kill_moment(db)
            basic = seen["done"] >= 1 and seen["running"] >= 1 and seen["queued"] >= 1
            if basic and (seen["group_partly_done"] or seen["queued"] <= max_batch):
                break
            if seen["queued"] == 0 and seen["running"] == 0:
                break  # everything finished before the moment came: reported as not met
            time.sleep(0.003)
        t_kill = time.time()
        server.kill()
    except BaseException:
        server.kill()
        raise
    rep["killed_pid_exit"] = server.proc.returncode
    jobs, events = read_db(db)
    at_kill = {j["id"]: j["state"] for j in jobs}
    rep["states_at_kill"] = dict(Counter(at_kill.values()))
    rep["kill_condition_met"] = all(rep["states_at_kill"].get(s, 0) >= 1 for s in ("done", "running", "queued"))
    # a job done and another running with the same claim: the kill cut a group in the middle
    running_claims = {j["started"] for j in jobs if j["state"] == "running"}
    rep["group_cut_midway"] = any(j["started"] in running_claims for j in jobs if j["state"] == "done")
    # files being written when the kill came: a job's work folder, or a temporary file before its rename
    rep["work_files_at_kill"] = sum(p.is_file() for p in (artifacts / ".work").rglob("*")) \
        if (artifacts / ".work").is_dir() else 0
    rep["temp_files_at_kill"] = sum(p.is_file() and p.name.startswith(".") for p in artifacts.iterdir()) \
        if artifacts.is_dir() else 0
    by_state = {s: [j for j, st in at_kill.items() if st == s] for s in ("done", "running", "queued")}

    server = Server(fdir, registry, db, token=token, device=device, threads=threads, cache_dir=cache_dir,
                    max_batch=max_batch, tag="fault-2")
    try:
        rep["restart_seconds"] = server.start_seconds
        with Client(server.url, token) as c:
            # the same keys again, for jobs that were done, running and queued at the kill: the original ids back
            again = []
            for s in ("done", "running", "queued"):
                for job_id in by_state[s][:2]:
                    rid = next(k for k, v in accepted.items() if v == job_id)
                    r = next(x for x in requests if x["id"] == rid)
                    again.append((s, job_id, c.submit(name, format="sparse", idempotency_key=key[rid], **r)["id"]))
            rep["resubmitted"] = len(again)
            rep["resubmitted_same_id"] = sum(a == b for _, a, b in again)
            end = time.monotonic() + timeout
            final = {}
            for job_id in accepted.values():
                left = end - time.monotonic()
                try:
                    if left <= 0:
                        raise CompressError("timeout")
                    final[job_id] = c.wait(job_id, timeout=left)["state"]
                except CompressError:
                    final[job_id] = "unfinished"
    finally:
        server.stop()
    jobs, events = read_db(db)
    ids = set(accepted.values())
    done_events = Counter(e["job"] for e in events if e["state"] == "done")
    rep["accepted"] = len(ids)
    rep["jobs_in_db"] = len(jobs)
    rep["extra_jobs"] = len({j["id"] for j in jobs} - ids)
    rep["done"] = sum(j["state"] == "done" for j in jobs if j["id"] in ids)
    rep["done_exactly_once"] = sum(done_events[i] == 1 for i in ids)
    rep["resumed_events"] = sum(e["state"] == "queued" and (e["detail"] or "").startswith("resumed") for e in events)
    want_attempts = {j: (2 if at_kill.get(j) == "running" else 1) for j in ids}
    got = {j["id"]: j["attempts"] for j in jobs}
    rep["reran"] = sum(got.get(j) == 2 for j in ids)
    rep["attempts_as_expected"] = sum(got.get(j) == a for j, a in want_attempts.items())
    ok_files = sha_ok = loads = same_as_batch = compared = 0
    from compress.serve.session import sha256_file

    rid_of = {v: k for k, v in accepted.items()}
    for j in jobs:
        if j["id"] not in ids or j["state"] != "done" or not j["artifact"]:
            continue
        path = artifacts / j["artifact"]
        if not path.is_file():
            continue
        ok_files += 1
        sha_ok += sha256_file(path) == j["artifact_sha256"]
        chk = check_artifact(path, j["result"]["target_sparsity"], pruned, j["request"])
        loads += chk["loads"] and chk["within_tol"]
        if batch_out is not None and (batch_out / f"{rid_of[j['id']]}.sparse.safetensors").is_file():
            compared += 1
            same_as_batch += same_tensors(path, batch_out / f"{rid_of[j['id']]}.sparse.safetensors")
    rep.update(artifacts_present=ok_files, sha256_match=sha_ok, artifacts_load=loads, compared_with_batch=compared,
               identical_to_batch=same_as_batch,
               leftover_work_dirs=sorted(p.name for p in (artifacts / ".work").iterdir())
               if (artifacts / ".work").is_dir() else [],
               stray_files=sorted(p.name for p in artifacts.iterdir() if p.is_file() and p.name.startswith(".")))
    rep["final_states"] = dict(Counter(final.values()))
    n = len(ids)
    rep["passed"] = bool(rep["kill_condition_met"] and rep["done"] == n and rep["done_exactly_once"] == n
                         and rep["extra_jobs"] == 0 and rep["attempts_as_expected"] == n
                         and rep["artifacts_present"] == n and rep["sha256_match"] == n and rep["artifacts_load"] == n
                         and rep["resubmitted_same_id"] == rep["resubmitted"] and rep["jobs_in_db"] == n)
    rep["kill_time"] = t_kill
    return rep


# -- the run -------------------------------------------------------------------------------------------------------
def run(zoo: str = "stories260k", *, zoo_root: Path = Path("checkpoints/zoo"),
        results: Path = Path("checkpoints/bench"),
        requests: int = 200, clients: int = 8, stratnet: Optional[Path] = None, fault_requests: int = 60,
        fault: bool = True, fault_batch: int = 8, eval_windows: int = 0, timeout: float = 600.0, threads: int = 1,
        device: str = "cpu", cache_dir: Path = CALIB_CACHE, keep: bool = False,
        quiet: bool = False) -> dict:
    import torch

    from compress.bench import publish

    if requests < 1 or clients < 1 or fault_requests < 3 or fault_batch < 1 or timeout <= 0 or threads < 1:
        raise CompressError("--requests >= 1, --clients >= 1, --fault-requests >= 3, --fault-batch >= 1, "
                            "--timeout > 0 and --threads >= 1")
    clients = min(clients, requests)
    torch.set_num_threads(threads)
    model, name = model_dir(zoo, zoo_root)
    t_all = time.perf_counter()
    sn_path, sn_how = ensure_stratnet(model, name, stratnet, cache_dir=cache_dir, device=device, quiet=quiet)
    net, pruner = warm_pruner(model, sn_path, cache_dir=cache_dir, device=device, quiet=quiet)
    from compress.strategy.project import size_model

    pruned_numel = {n: p.numel for n, p in pruner.checkpoint_names().items()}
    pruned = sorted(pruned_numel)
    sm = size_model(model, pruned_numel, None)
    del pruner
    reqs = make_requests(requests, net.sparsity_range, sm)
    report: dict = {"model": str(model), "name": name, "device": device, "threads": threads,
                    "stratnet": str(sn_path), "stratnet_from": sn_how, "sparsity_range": list(net.sparsity_range),
                    "requests": requests, "clients": clients, "eval_windows": eval_windows, "timeout": timeout,
                    "request_kinds": dict(Counter(next(k for k in ("sparsity", "preference", "size_bytes")
                                                       if k in r) + ("+protect_heads" if "protect_heads" in r else "")
                                                  for r in reqs))}
    if device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(device)
    results.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".serve-{name}-", dir=results))
    try:
        reqs_file = workdir / "requests.jsonl"
        reqs_file.write_text("".join(json.dumps(r) + "\n" for r in reqs))
        registry = write_registry(workdir / "models.yml", name, model, sn_path, eval_windows)
        token = secrets.token_urlsafe(24)

        # -- load test ------------------------------------------------------------------------------------------
        db = workdir / "load" / "serve.db"
        db.parent.mkdir()
        console.print(f"[bench serve] load test: {requests} requests from {clients} clients")
        server = Server(workdir, registry, db, token=token, device=device, threads=threads, cache_dir=cache_dir,
                        max_batch=64, tag="load")
        try:
            load = load_test(server, token, name, reqs, clients, timeout)
            load["server_start_seconds"] = server.start_seconds
            # artifacts while the server is up: downloaded through the API
            from compress.serve.client import Client

            dl = workdir / "downloads"
            dl.mkdir()
            with Client(server.url, token) as c:
                for rid, row in load["rows"].items():
                    if row.get("state") == "done":
                        try:
                            c.download(row["job"], dl / f"{rid}.sparse.safetensors")
                            row["downloaded"] = True
                        except CompressError as e:
                            row["downloaded"] = False
                            row["download_error"] = str(e)[:300]
        finally:
            server.stop()
        srv = server_side(db, {r["job"] for r in load["rows"].values() if "job" in r})

        # -- baseline -------------------------------------------------------------------------------------------
        console.print(f"[bench serve] compress batch over the same {requests} requests")
        batch_out = workdir / "batch"
        batch = batch_baseline(model, sn_path, reqs_file, batch_out, device=device, threads=threads,
                               cache_dir=cache_dir, timeout=timeout, workdir=workdir)

        # -- artifacts --------------------------------------------------------------------------------------------
        checks = {"downloaded": 0, "load_within_tol": 0, "size_budget_met": 0, "size_budget_requests": 0,
                  "identical_to_batch": 0, "strategy_max_abs_diff": 0.0, "target_max_abs_diff": 0.0}
        bad = []
        for r in reqs:
            row = load["rows"].get(r["id"], {})
            if not row.get("downloaded"):
                continue
            checks["downloaded"] += 1
            job = srv["by_id"][row["job"]]
            res = job["result"]
            chk = check_artifact(dl / f"{r['id']}.sparse.safetensors", res["target_sparsity"], pruned, r)
            checks["load_within_tol"] += chk["loads"] and chk["within_tol"]
            if "size_bytes" in r:
                checks["size_budget_requests"] += 1
                checks["size_budget_met"] += bool(chk.get("within_budget"))
            if not (chk["loads"] and chk["within_tol"]):
                bad.append({"id": r["id"], **chk})
            b = batch["rows"].get(r["id"])
            if b is not None:
                checks["identical_to_batch"] += same_tensors(dl / f"{r['id']}.sparse.safetensors",
                                                             batch_out / b["file"])
                checks["strategy_max_abs_diff"] = max(checks["strategy_max_abs_diff"],
                                                      max(abs(x - y) for x, y in zip(res["strategy"], b["strategy"])))
                checks["target_max_abs_diff"] = max(checks["target_max_abs_diff"],
                                                    abs(res["target_sparsity"] - b["sparsity_target"]))
        checks["bad"] = bad[:10]

        # -- fault test ---------------------------------------------------------------------------------------------
        fault_rep = None
        if fault:
            n_f = min(fault_requests, len(reqs))
            console.print(f"[bench serve] fault test: {n_f} requests, kill -9 with jobs done, running and queued")
            fault_rep = fault_test(workdir, registry, name, reqs[:n_f], device=device, threads=threads,
                                   cache_dir=cache_dir, max_batch=fault_batch, timeout=timeout, pruned=pruned,
                                   batch_out=batch_out)
    finally:
        if keep:
            console.print(f"[bench serve] kept the work folder {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    lat_server = srv.pop("latency")
    server_latencies = srv.pop("latencies")
    srv.pop("by_id")
    completions = sorted(r["done"] - min(x["submitted"] for x in load["rows"].values())
                         for r in load["rows"].values() if r.get("state") == "done")
    latencies = sorted(r["latency"] for r in load["rows"].values() if r.get("state") == "done")
    load_rows = load.pop("rows")
    report["load"] = {**load, "server": {**srv, "latency": lat_server}, "completions": completions,
                      "latencies": latencies, "server_latencies": server_latencies,
                      "errors": [{"id": k, **v} for k, v in load_rows.items() if v.get("state") != "done"][:10]}
    batch.pop("rows")
    report["batch"] = batch
    report["artifacts"] = checks
    report["ratios"] = {
        "throughput_server_over_batch_wall": (load["throughput"] / batch["throughput_wall"]
                                              if load["throughput"] else None),
        "throughput_server_over_batch_summary": (load["throughput"] / batch["throughput_summary"]
                                                 if load["throughput"] else None),
        "server_seconds_over_batch_wall": load["seconds"] / batch["wall_seconds"],
    }
    report["all_complete"] = load["completed"] == requests and checks["load_within_tol"] == requests
    report["fault"] = fault_rep
    report["seconds"] = time.perf_counter() - t_all
    publish(results, f"serve-{name}", report, markdown(report), plot, label="bench serve")
    return report


def _f(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    ld, b, a, ra, s = r["load"], r["batch"], r["artifacts"], r["ratios"], r["load"]["server"]
    n = r["requests"]
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(r["request_kinds"].items()))
    lines = [f"# compress bench serve — {r['name']}", "",
             f"{n} requests ({kinds}) from {r['clients']} clients to `compress serve` on loopback, against "
             f"`compress batch` over the same requests; device {r['device']}, {r['threads']} torch thread(s), "
             f"StratNet {r['stratnet']} ({r['stratnet_from']}, range {r['sparsity_range'][0]:g}–"
             f"{r['sparsity_range'][1]:g}), KL measurement windows on the server: {r['eval_windows']}.", "",
             "| | compress serve | compress batch | serve / batch |", "|---|---:|---:|---:|",
             f"| completed | {ld['completed']}/{n} (failed {ld['failed']}, unfinished {ld['unfinished']}) | "
             f"{b['completed']}/{n} | |",
             f"| seconds (serve: first submit → last done; batch: process start → exit) | {ld['seconds']:.2f} | "
             f"{b['wall_seconds']:.2f} | {ra['server_seconds_over_batch_wall']:.3f} |",
             f"| throughput, requests/s | {_f(ld['throughput'], '.2f')} | {b['throughput_wall']:.2f} | "
             f"{_f(ra['throughput_server_over_batch_wall'])} |",
             f"| throughput vs batch's own seconds ({b['summary_seconds']:.2f} s, no interpreter start) | "
             f"{_f(ld['throughput'], '.2f')} | {b['throughput_summary']:.2f} | "
             f"{_f(ra['throughput_server_over_batch_summary'])} |",
             f"| latency p50 / p95 / max, s (client: submit → observed done) | {_f(ld['latency']['p50'])} / "
             f"{_f(ld['latency']['p95'])} / {_f(ld['latency']['max'])} | | |",
             f"| latency p50 / p95 / max, s (server: created → finished) | {_f(s['latency']['p50'])} / "
             f"{_f(s['latency']['p95'])} / {_f(s['latency']['max'])} | | |",
             f"| mean seconds per request inside the worker (prune, write; server: + its share of the StratNet "
             f"pass) | {_f(s['job_seconds_mean'], '.4f')} | {b['job_seconds_mean']:.4f} | "
             f"{_f(s['job_seconds_mean'] / b['job_seconds_mean'] if s['job_seconds_mean'] else None)} |",
             f"| groups formed (sizes) | {s['groups']} ({', '.join(map(str, s['group_sizes']))}) | 1 | |",
             f"| first job done after its submit, s (includes the model load) | {_f(s['first_done_after'])} | | |",
             f"| artifacts downloaded, loaded, sparsity within 0.5 pt of target | {a['load_within_tol']}/"
             f"{a['downloaded']} | | |",
             f"| size_bytes budgets met | {a['size_budget_met']}/{a['size_budget_requests']} | | |",
             f"| artifacts with tensors identical to batch's | {a['identical_to_batch']}/{a['downloaded']} | | |",
             f"| max abs strategy difference to batch | {a['strategy_max_abs_diff']:.3g} | | |",
             "", f"Server start (process → /healthz): {ld['server_start_seconds']:.2f} s (not in the serve "
             f"seconds). All complete and loading: **{r['all_complete']}**."]
    f = r.get("fault")
    if f:
        k = f["states_at_kill"]
        lines += ["", "## Fault test (kill -9, restart on the same database)", "",
                  "| check | result |", "|---|---:|",
                  f"| requests accepted before the kill (max batch {f['max_batch']}) | {f['accepted']} |",
                  f"| states at the kill: done / running / queued | {k.get('done', 0)} / {k.get('running', 0)} / "
                  f"{k.get('queued', 0)} |",
                  f"| a group cut midway (one of its jobs done, another running) | {f['group_cut_midway']} |",
                  f"| files in flight at the kill (work folder / temporary) | {f['work_files_at_kill']} / "
                  f"{f['temp_files_at_kill']} |",
                  f"| jobs resumed on restart (re-queued 'running') | {f['resumed_events']} |",
                  f"| done after restart | {f['done']}/{f['accepted']} |",
                  f"| exactly one `done` event | {f['done_exactly_once']}/{f['accepted']} |",
                  f"| jobs in the database / beyond the accepted | {f['jobs_in_db']} / {f['extra_jobs']} |",
                  f"| attempts as expected (2 for the {k.get('running', 0)} running at the kill, else 1) | "
                  f"{f['attempts_as_expected']}/{f['accepted']} |",
                  f"| artifacts present / SHA-256 match / load at target | {f['artifacts_present']} / "
                  f"{f['sha256_match']} / {f['artifacts_load']} |",
                  f"| identical to batch's output for the same request | {f['identical_to_batch']}/"
                  f"{f['compared_with_batch']} |",
                  f"| idempotency keys sent again → original id | {f['resubmitted_same_id']}/{f['resubmitted']} |",
                  f"| leftover work folders / stray temporary files | {len(f['leftover_work_dirs'])} / "
                  f"{len(f['stray_files'])} |",
                  f"| **passed** | **{f['passed']}** |"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    ld, b = report["load"], report["batch"]
    n = report["requests"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for xs, label in ((ld["completions"], f"compress serve, {report['clients']} clients (since first submit)"),
                      (b["completions"], "compress batch (since process start)")):
        if xs:
            ax1.step(sorted(xs), [(i + 1) / n for i in range(len(xs))], where="post", label=label)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("fraction of requests complete")
    ax1.set_title(f"completion times, {n} requests")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(alpha=0.3)
    if ld["latencies"]:
        xs = ld["latencies"]
        ax2.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label="client: submit → done")
        xs = ld.get("server_latencies") or []
        ax2.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label="server: created → finished")
        for q, ls in (("p50", ":"), ("p95", "--")):
            ax2.axvline(ld["latency"][q], color="gray", ls=ls, lw=1, label=f"{q} {ld['latency'][q]:.2f} s")
    ax2.set_xlabel("latency, seconds")
    ax2.set_ylabel("CDF")
    ax2.set_title("compress serve latency")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"compress bench serve — {report['name']} ({report['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
