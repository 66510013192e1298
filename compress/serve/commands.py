"""`compress serve` and `compress request ...`. Nothing here imports torch: `compress request` runs on a machine
with only the client's dependencies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from compress.config import build
from compress.errors import CompressError
from compress.extras import require
from compress.options import CALIB_CACHE, DEVICE, OVERWRITE, QUIET


def serve_cmd(
    registry: Path = typer.Option(..., help="YAML registry: models: {name: {model, stratnet, calib, ...}}."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (non-loopback needs a token)."),
    port: int = typer.Option(8000, help="Port to bind."),
    db: Path = typer.Option(Path("checkpoints/serve.db"), help="SQLite job store (WAL)."),
    artifacts: Optional[Path] = typer.Option(None, help="Artifacts folder (default: <db>.artifacts)."),
    token: Optional[str] = typer.Option(None, help="Bearer token clients must send (default: $COMPRESS_SERVE_TOKEN)."),
    backend: str = typer.Option("local", help="local (groups in the server's worker thread) or ray."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: start a local Ray)."),
    ray_gpus: Optional[float] = typer.Option(None, help="GPUs per group task (default: 1 with --device cuda)."),
    workers: int = typer.Option(1, help="Groups running at once (ray backend)."),
    max_queue: int = typer.Option(1000, help="Queued jobs beyond this get 429."),
    max_batch: int = typer.Option(64, help="Most jobs answered in one group."),
    max_body: int = typer.Option(64 * 1024, help="Request bodies over this many bytes get 413."),
    public_docs: bool = typer.Option(False, help="Serve /docs and /openapi.json without the token."),
    cache_dir: Path = CALIB_CACHE,
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Serve compression requests over HTTP: a job store that survives restarts, a batching worker, /docs."""
    import os

    from compress.config import ServeConfig
    from compress.serve import TOKEN_ENV, serve

    require("serve", "compress serve", ("fastapi", "uvicorn"))
    if backend == "ray":
        require("ray", "compress serve --backend ray")
    cfg = build(ServeConfig, registry=registry, host=host, port=port, db=db, artifacts=artifacts,
                token=token if token is not None else (os.environ.get(TOKEN_ENV) or None), backend=backend,
                ray_address=ray_address, ray_gpus=ray_gpus, workers=workers, max_queue=max_queue,
                max_batch=max_batch, max_body=max_body, cache_dir=cache_dir, device=device, quiet=quiet)
    serve(cfg, public_docs=public_docs)


request_app = typer.Typer(no_args_is_help=True, help="Talk to `compress serve`: submit, status, wait, download, "
                                                      "cancel, models. URL/token from --url/--token or "
                                                      "$COMPRESS_SERVE_URL/$COMPRESS_SERVE_TOKEN.")

URL = typer.Option(None, "--url", help="Server URL (default: $COMPRESS_SERVE_URL or http://127.0.0.1:8000).")
TOKEN = typer.Option(None, "--token", help="Bearer token (default: $COMPRESS_SERVE_TOKEN).")


def _client(url, token):
    from compress.serve.client import Client

    require("serve", "compress request", ("httpx",))
    return Client(url, token)


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1))


@request_app.command("submit")
def request_submit(
    model: str = typer.Argument(..., help="Registered model name (see `compress request models`)."),
    sparsity: Optional[float] = typer.Option(None, help="Target mean sparsity in (0, 1)."),
    size_bytes: Optional[int] = typer.Option(None, help="Budget for the sparse file, in bytes."),
    preference: Optional[float] = typer.Option(None, help="Size/quality trade-off λ in [0, 1] (1: smallest)."),
    protect_heads: Optional[str] = typer.Option(None, help="Heads kept dense: 'layer.head,layer.head'."),
    fmt: str = typer.Option("sparse", "--format", help="sparse (sparse weight file) or dense (pruned folder)."),
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with the same key returns the same job."),
    wait: bool = typer.Option(False, help="Wait until the request is finished."),
    out: Optional[Path] = typer.Option(None, help="With --wait: download the artifact here."),
    overwrite: bool = OVERWRITE, url: Optional[str] = URL, token: Optional[str] = TOKEN,
):
    """Submit one compression request; prints the job (its id, state)."""
    from compress.config import CompressionRequest, ServeRequest

    heads = None
    if protect_heads:
        try:
            heads = [[int(x) for x in h.strip().split(".")] for h in protect_heads.split(",") if h.strip()]
        except ValueError:
            raise CompressError(f"--protect-heads '{protect_heads}': give layer.head pairs, e.g. 0.1,2.3") from None
    if out is not None and not wait:
        raise CompressError("--out needs --wait (or use `compress request download ID OUT` later)")
    body = build(ServeRequest, model=model, sparsity=sparsity, size_bytes=size_bytes, preference=preference,
                 protect_heads=heads, format=fmt, idempotency_key=idempotency_key)
    fields = body.model_dump(exclude_none=True, include=set(CompressionRequest.model_fields))
    with _client(url, token) as c:
        job = c.submit(model, format=body.format, idempotency_key=body.idempotency_key, **fields)
        if wait:
            job = c.wait(job["id"])
            if out is not None and job["state"] == "done":
                c.download(job["id"], out, overwrite=overwrite)
        _print_json(job)
        if wait and job["state"] != "done":
            raise CompressError(f"request {job['id']} {job['state']}: {job.get('error') or ''}".rstrip(": "))


@request_app.command("status")
def request_status(job_id: str = typer.Argument(...), url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """A request's state, strategy, measured KL and size."""
    with _client(url, token) as c:
        _print_json(c.get(job_id))


@request_app.command("wait")
def request_wait(job_id: str = typer.Argument(...), timeout: Optional[float] = typer.Option(None, help="Seconds."),
                 url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Wait until a request is finished; exit 2 when it failed or was cancelled."""
    with _client(url, token) as c:
        job = c.wait(job_id, timeout=timeout)
    _print_json(job)
    if job["state"] != "done":
        raise CompressError(f"request {job_id} {job['state']}: {job.get('error') or ''}".rstrip(": "))


@request_app.command("download")
def request_download(job_id: str = typer.Argument(...),
                     out: Path = typer.Argument(..., help="File (sparse) or folder (dense) to write."),
                     overwrite: bool = OVERWRITE, url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Download a finished request's artifact (checked against the server's SHA-256)."""
    with _client(url, token) as c:
        path = c.download(job_id, out, overwrite=overwrite)
    print(f"wrote {path}")


@request_app.command("cancel")
def request_cancel(job_id: str = typer.Argument(...), url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Cancel a queued or running request (a finished one's artifact is deleted)."""
    with _client(url, token) as c:
        _print_json(c.cancel(job_id))


@request_app.command("models")
def request_models(url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """The models the server answers for."""
    with _client(url, token) as c:
        _print_json(c.models())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.add_typer(request_app, name="request")
