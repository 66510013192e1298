"""The batching worker: claims groups of queued jobs of one model from the store (``Store.claim_group``) and runs
each group through ``session.run_group`` on a backend, recording every outcome in the store as it arrives.

* ``local``: one group at a time, in the server's worker thread; outcomes are recorded job by job.
* ``ray``: each group is a Ray task asking for ``ray_gpus`` GPUs (1 with a CUDA device unless set), up to
  ``workers`` groups at once; ``ray.init(address=...)`` joins a running cluster, otherwise a local Ray instance is
  started. Artifacts are written by the task into the artifacts folder, which must be shared storage on a
  cluster. Ray re-runs a task whose worker died (system failures); a task that raises fails its jobs.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from compress.errors import CompressError
from compress.serve.session import reason

log = logging.getLogger("compress.serve")


class Dispatcher:
    def __init__(self, store, registry, cfg, artifacts: Path):
        self.store, self.registry, self.cfg, self.artifacts = store, registry, cfg, Path(artifacts)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self.backend = RayBackend(self) if cfg.backend == "ray" else LocalBackend(self)
        self.groups = 0

    def start(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        # what a killed server was writing: no job runs before start, and its job re-runs from the queue
        shutil.rmtree(self.artifacts / ".work", ignore_errors=True)
        for stale in self.artifacts.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        self.backend.start()
        self._thread = threading.Thread(target=self._loop, name="compress-serve-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.backend.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.backend.has_room():
                    self.backend.poll(0.2)
                    continue
                group = self.store.claim_group(self.cfg.max_batch)
                if group is None:
                    self.backend.poll(0.0)
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                model, jobs = group
                self.groups += 1
                log.info("group of %d job(s) for %s", len(jobs), model)
                try:
                    entry = self.registry.models.get(model)
                    if entry is None:
                        raise CompressError(f"model '{model}' is not in this server's registry (removed since the "
                                            "request was accepted)")
                    self.backend.submit(model, entry, jobs)
                except Exception as e:  # noqa: BLE001 - the group fails with why; none of its jobs stays running
                    log.exception("group of %d job(s) for %s", len(jobs), model)
                    self.fail_group(jobs, reason(e))
            except Exception:  # noqa: BLE001 - keep serving (the store itself failed)
                log.exception("worker loop")
                time.sleep(1.0)

    def fail_group(self, jobs: list[dict], why: str) -> None:
        """Fail each job of a claimed group that its claim still holds (the ones already answered keep theirs)."""
        for job in jobs:
            self.store.finish(job["id"], job["attempts"], error=why)

    # -- outcomes ----------------------------------------------------------------------------------------------
    def record(self, job_id: str, attempt: int, outcome: dict) -> None:
        if "error" in outcome:
            kept = self.store.finish(job_id, attempt, error=outcome["error"])
        else:
            kept = self.store.finish(job_id, attempt, result=outcome["result"], artifact=outcome["artifact"],
                                     artifact_bytes=outcome["artifact_bytes"],
                                     artifact_sha256=outcome["artifact_sha256"])
            if not kept:  # cancelled while it ran: its file goes
                (self.artifacts / outcome["artifact"]).unlink(missing_ok=True)
        if not kept:
            log.info("job %s attempt %d: outcome dropped (cancelled or re-queued)", job_id, attempt)


class LocalBackend:
    def __init__(self, d: Dispatcher):
        self.d = d

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def has_room(self) -> bool:
        return True

    def poll(self, timeout: float) -> None:
        pass

    def submit(self, model, entry, jobs) -> None:
        from compress.serve.session import run_group

        d = self.d
        done = set()

        def on_result(job, outcome):
            done.add(job["id"])
            d.record(job["id"], job["attempts"], outcome)

        run_group(model, entry, jobs, d.artifacts, device=d.cfg.device, cache_dir=d.cfg.cache_dir,
                  on_result=on_result, stop=lambda: d.stopping)
        for job in jobs:
            if job["id"] not in done:
                d.store.requeue(job["id"], job["attempts"], "the server stopped before this job")


def _ray_group(model, entry, jobs, artifacts, device, cache_dir):
    from compress.serve.session import run_group

    return run_group(model, entry, jobs, artifacts, device=device, cache_dir=cache_dir)


class RayBackend:
    def __init__(self, d: Dispatcher):
        self.d = d
        self.inflight: dict = {}
        self._started_ray = False

    def start(self) -> None:
        try:
            import ray
        except ImportError:
            raise CompressError("--backend ray needs Ray: pip install 'compress[ray]'") from None
        cfg = self.d.cfg
        if not ray.is_initialized():
            try:
                if cfg.ray_address:
                    ray.init(address=cfg.ray_address, log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, log_to_driver=False)
                    self._started_ray = True
            except Exception as e:  # noqa: BLE001 - ray raises many kinds; the user needs the one line
                raise CompressError(f"cannot start or join Ray ({cfg.ray_address or 'local'}): "
                                    f"{' '.join(str(e).split())[:200]}") from None
        gpus = cfg.ray_gpus if cfg.ray_gpus is not None else (1.0 if cfg.device.startswith("cuda") else 0.0)
        self.task = ray.remote(_ray_group).options(num_gpus=gpus, num_cpus=1, max_retries=2)
        self.ray = ray

    def stop(self) -> None:
        # running tasks are left to finish or die with a local Ray; their jobs stay 'running' and resume on start
        if self._started_ray:
            self.ray.shutdown()

    def has_room(self) -> bool:
        return len(self.inflight) < self.d.cfg.workers

    def submit(self, model, entry, jobs) -> None:
        cfg = self.d.cfg
        ref = self.task.remote(model, entry, jobs, str(self.d.artifacts.resolve()),
                               "cuda" if cfg.device.startswith("cuda") else cfg.device, str(cfg.cache_dir))
        self.inflight[ref] = jobs

    def poll(self, timeout: float) -> None:
        if not self.inflight:
            time.sleep(timeout)
            return
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in ready:
            jobs = self.inflight.pop(ref)
            try:
                outcomes = self.ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the task failed as a whole: each of its jobs fails with why
                why = f"ray task failed: {' '.join(str(e).split())[:300]}"
                outcomes = [(j["id"], j["attempts"], {"error": why}) for j in jobs]
            for job_id, attempt, outcome in outcomes:
                self.d.record(job_id, attempt, outcome)
