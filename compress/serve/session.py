"""A registered model, loaded once and kept: the pruner (model, cached calibration statistics), its StratNet,
the size model for ``size_bytes`` requests and the KL evaluator. ``run_group`` answers a group of jobs of one
model with one StratNet pass, then prunes, measures and writes each job's artifact atomically.

The same function runs in the server's worker thread (local backend) and inside a Ray task (ray backend); both
keep sessions in this process's ``SESSIONS`` cache, so a worker process that answers the same model again pays no
model load or calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from compress.config import CALIB_CACHE
from compress.errors import CompressError

ARTIFACT_SUFFIX = {"sparse": ".sparse.safetensors", "dense": ".tar"}
MAX_SESSIONS = 2


class ModelSession:
    def __init__(self, name: str, entry, *, device: str = "cpu", cache_dir: str | os.PathLike = CALIB_CACHE,
                 quiet: bool = True):
        from compress.runtime import resolve_device, torch_dtype
        from compress.strategy.stratnet import StratNetModel
        from compress.strategy.train import stratnet_pruner

        t0 = time.perf_counter()
        self.name, self.entry = name, entry
        self.net = StratNetModel.load(entry.stratnet, entry.model)
        meta = self.net.meta
        self.method = meta.get("method", "wanda")
        self.dtype = torch_dtype(entry.dtype)
        self.pruner = stratnet_pruner(self.net, entry.model, calib=entry.calib, nsamples=entry.nsamples,
                                      device=resolve_device(device), cache_dir=cache_dir, quiet=quiet)
        self.pruner.stats()  # calibration now (from the cache when trained here), not in the first request
        self._size_model = None
        self.evaluator = None
        if entry.eval_windows:
            from compress.strategy.evaluate import Evaluator

            self.evaluator = Evaluator(self.pruner, self.method, eval_windows=entry.eval_windows)
        self.load_seconds = time.perf_counter() - t0

    def size_model(self):
        """The sparse-file size model of this session's pruner (``folder_size_model`` computes the same without
        loading the model)."""
        if self._size_model is None:
            from compress.strategy.project import size_model

            self._size_model = size_model(self.entry.model, {n: p.numel for n, p in
                                                             self.pruner.checkpoint_names().items()}, self.dtype)
        return self._size_model

    def run(self, jobs: list[dict], artifacts: Path, on_result: Callable[[dict, dict], None],
            stop: Optional[Callable[[], bool]] = None) -> None:
        """Answer ``jobs`` (store rows of this model): ``on_result(job, outcome)`` after each, where outcome holds
        ``result`` + artifact fields, or ``error``; jobs left when ``stop()`` turns true are not called back."""
        from compress.config import CompressionRequest

        requests, outcomes = [], {}
        for job in jobs:
            try:
                requests.append(CompressionRequest(**{k: v for k, v in job["request"].items()
                                                      if k in CompressionRequest.model_fields}))
            except Exception as e:  # noqa: BLE001 - validated on accept; a schema change must not kill the group
                outcomes[job["id"]] = {"error": f"request no longer valid: {e}"}
                requests.append(None)
        t0 = time.perf_counter()
        sm = None
        if any(r is not None and r.size_bytes is not None for r in requests):
            try:
                sm = self.size_model()
            except Exception as e:  # noqa: BLE001 - fails the size budgets only
                for i, (job, r) in enumerate(zip(jobs, requests)):
                    if r is not None and r.size_bytes is not None:
                        outcomes[job["id"]] = {"error": f"size_bytes: {reason(e)}"}
                        requests[i] = None
        live = [r for r in requests if r is not None]
        try:
            answers = iter(self.net.answer_many(live, sm))  # the group's one StratNet pass
        except Exception as e:  # noqa: BLE001 - every job of the group gets the reason; none is left running
            why = f"the group's strategy step failed: {reason(e)}"
            for job in jobs:
                if stop is not None and stop():
                    return
                on_result(job, outcomes.get(job["id"], {"error": why}))
            return
        answer_seconds = (time.perf_counter() - t0) / max(1, len(live))
        planned = [(job, r, next(answers) if r is not None else None) for job, r in zip(jobs, requests)]
        for job, r, answer in planned:
            if stop is not None and stop():
                return
            if job["id"] in outcomes:
                on_result(job, outcomes[job["id"]])
                continue
            if isinstance(answer, CompressError):
                on_result(job, {"error": str(answer)})
                continue
            try:
                outcome = self._one(job, r, answer, artifacts, answer_seconds)
            except CompressError as e:
                outcome = {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - one job's crash (e.g. out of memory) fails that job only
                outcome = {"error": reason(e)}
            on_result(job, outcome)

    def _one(self, job: dict, request, answer, artifacts: Path, answer_seconds: float) -> dict:
        from compress.io.sparse import write_sparse
        from compress.io.writer import atomic_file
        from compress.strategy.request import head_protect

        t0 = time.perf_counter()
        strategy, target = answer
        protect = head_protect(self.pruner, request.protect_heads)
        result = self.pruner.prune(strategy, self.method, protect=protect)
        kl = None
        if self.evaluator is not None:
            self.pruner.load(result)
            kl = self.evaluator.kl()
            self.pruner.load(None)
        name = job["id"] + ARTIFACT_SUFFIX[job["format"]]
        work = artifacts / ".work" / f"{job['id']}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            self.pruner.save(result, work / "model", dtype=self.dtype,
                             extra={"request": job["request"], "model_name": self.name})
            if job["format"] == "sparse":
                write_sparse(work / "model", artifacts / name, overwrite=True, quiet=True,
                             metadata={"method": self.method, "sparsity": f"{result.sparsity:.6f}",
                                       "model": self.name, "job": job["id"], "request": json.dumps(job["request"])})
            else:
                with atomic_file(artifacts / name, overwrite=True) as tmp:
                    with tarfile.open(tmp, "w") as tar:
                        tar.add(work / "model", arcname=job["id"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        path = artifacts / name
        return {"result": {"strategy": strategy, "target_sparsity": target, "sparsity": result.sparsity,
                           "kl": kl, "method": self.method, "seconds": time.perf_counter() - t0 + answer_seconds},
                "artifact": name, "artifact_bytes": path.stat().st_size, "artifact_sha256": sha256_file(path)}


def folder_size_model(entry):
    """The sparse-file size model of a registry entry, from its config and checkpoint headers alone."""
    from compress.prune.pruner import prunable_numels
    from compress.runtime import torch_dtype
    from compress.strategy.project import size_model

    return size_model(entry.model, prunable_numels(entry.model), torch_dtype(entry.dtype))


def reason(e: BaseException) -> str:
    """One line for a job's error: a ``CompressError``'s message, else the exception's type and message."""
    if isinstance(e, CompressError):
        return str(e)
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SESSIONS: "OrderedDict[str, ModelSession]" = OrderedDict()
_SESSIONS_LOCK = threading.Lock()


def session(name: str, entry, *, device: str, cache_dir, quiet: bool = True) -> ModelSession:
    """This process's session for a registered model (loaded on first use, least recently used dropped)."""
    key = json.dumps([name, entry.model_dump(mode="json"), device])
    with _SESSIONS_LOCK:
        s = SESSIONS.get(key)
        if s is not None:
            SESSIONS.move_to_end(key)
            return s
        s = ModelSession(name, entry, device=device, cache_dir=cache_dir, quiet=quiet)
        SESSIONS[key] = s
        while len(SESSIONS) > MAX_SESSIONS:
            SESSIONS.popitem(last=False)
        return s


def run_group(name: str, entry, jobs: list[dict], artifacts: str | os.PathLike, *, device: str, cache_dir,
              on_result: Optional[Callable[[dict, dict], None]] = None, stop=None, quiet: bool = True) -> list:
    """Answer one model's group of jobs; returns [(job id, attempt, outcome)] (also passed to ``on_result`` as
    each finishes). A model that cannot load fails every job of the group with that one-line reason."""
    artifacts = Path(artifacts)
    out = []

    def record(job, outcome):
        out.append((job["id"], job["attempts"], outcome))
        if on_result is not None:
            on_result(job, outcome)

    try:
        s = session(name, entry, device=device, cache_dir=cache_dir, quiet=quiet)
    except Exception as e:  # noqa: BLE001 - whatever stops the load fails the group with why, none left running
        for job in jobs:
            record(job, {"error": f"model '{name}' could not be loaded: {reason(e)}"})
        return out
    s.run(jobs, artifacts, record, stop)
    return out
