"""A Python client for `compress serve` (httpx), and what `compress request …` runs.

    from compress.serve.client import Client
    c = Client("http://127.0.0.1:8000", token="…")
    job = c.submit("stories260k", sparsity=0.5)            # 202: queued
    job = c.wait(job["id"])                                 # done (or failed / cancelled)
    c.download(job["id"], "out.sparse.safetensors")         # dense: a folder is extracted from the tar

The URL and token default to ``COMPRESS_SERVE_URL`` / ``COMPRESS_SERVE_TOKEN``. A non-2xx answer raises
``CompressError`` with the status and the server's one-line reason.
"""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path
from typing import Optional

from compress.errors import CompressError
from compress.serve import TOKEN_ENV, URL_ENV

FINAL = ("done", "failed", "cancelled")


class ServerError(CompressError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"server answered {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, *, timeout: float = 60.0,
                 transport=None):
        import httpx

        self.url = (url or os.environ.get(URL_ENV) or "http://127.0.0.1:8000").rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kw = {"transport": transport} if transport is not None else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise CompressError(f"{self.url}: cannot reach the server ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ServerError(r.status_code, str(detail)[:500])
        return r

    def health(self) -> dict:
        return self._call("GET", "/healthz").json()

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models").json()["models"]

    def submit(self, model: str, *, format: str = "sparse", idempotency_key: Optional[str] = None,
               **request) -> dict:
        """Send one request (``sparsity=`` | ``size_bytes=`` | ``preference=``, optional ``protect_heads=``)."""
        body = {"model": model, "format": format, **{k: v for k, v in request.items() if v is not None}}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self._call("POST", "/v1/requests", json=body).json()

    def get(self, job_id: str, wait: float = 0.0) -> dict:
        return self._call("GET", f"/v1/requests/{job_id}", params={"wait": wait} if wait else None).json()

    def wait(self, job_id: str, timeout: Optional[float] = None, poll: float = 30.0) -> dict:
        """Long-poll until the job is done, failed or cancelled (``timeout`` seconds at most: then an error)."""
        start = time.monotonic()
        while True:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise CompressError(f"request {job_id} is not finished after {timeout:g} s")
            job = self.get(job_id, wait=min(poll, left) if left is not None else poll)
            if job["state"] in FINAL:
                return job

    def cancel(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/requests/{job_id}").json()

    def download(self, job_id: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the artifact: a sparse file to ``out``; a dense tar is extracted into the folder ``out``.
        Written atomically, checked against the server's SHA-256 first."""
        import tempfile

        from compress.io.writer import atomic_dir, atomic_file, check_output

        out = check_output(out, overwrite)
        job = self.get(job_id)
        if job["state"] != "done":
            raise CompressError(f"request {job_id} is {job['state']}: no artifact to download")
        if job["format"] == "sparse":
            with atomic_file(out, overwrite) as tmp:
                self._fetch(job, tmp)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.dl-", dir=out.parent) as d:
            tar_path = Path(d) / "artifact.tar"
            self._fetch(job, tar_path)
            with atomic_dir(out, overwrite) as folder, tarfile.open(tar_path) as tar:
                members = []
                for m in tar.getmembers():
                    if m.name == job_id:
                        continue
                    if not m.name.startswith(job_id + "/") or not (m.isfile() or m.isdir()):
                        raise CompressError(f"request {job_id}: unexpected entry '{m.name}' in the artifact")
                    m.name = m.name[len(job_id) + 1:]
                    members.append(m)
                tar.extractall(folder, members=members, filter="data")
        return out

    def _fetch(self, job: dict, path: Path) -> None:
        import hashlib

        h = hashlib.sha256()
        with self.http.stream("GET", f"/v1/requests/{job['id']}/artifact") as r:
            if r.status_code >= 400:
                r.read()
                raise ServerError(r.status_code, r.json().get("detail", r.text))
            with open(path, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        if job.get("sha256") and h.hexdigest() != job["sha256"]:
            raise CompressError(f"request {job['id']}: the download does not match the server's SHA-256")
