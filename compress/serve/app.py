"""The HTTP API (FastAPI; OpenAPI docs at /docs).

``POST /v1/requests`` → 202 {id, state}; ``GET /v1/requests/{id}[?wait=S]``; ``GET /v1/requests/{id}/artifact``;
``DELETE /v1/requests/{id}``; ``GET /v1/models``; ``GET /healthz`` (the only route open without the token).

Security: with a token, every route but /healthz needs ``Authorization: Bearer <token>`` (401 otherwise; the
docs too, unless ``public_docs``); bodies over ``max_body`` bytes get 413 before they are read; a model name
that looks like a path gets 400, one not in the registry 404. Clients never name files: artifacts are served by
job id from the server's own folder. A request the model cannot answer (a sparsity outside its StratNet's range, a
``size_bytes`` budget no file of it meets, a head it lacks) gets 422 with the reason, before it is stored.
"""



import asyncio
import hmac
import time
from pathlib import Path
from typing import Optional

from compress.errors import CompressError
from compress.serve.store import FINAL, IdempotencyConflict, QueueFull

OPEN_PATHS = {"/healthz"}
DOC_PATHS = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over ``limit``, and for a streamed body that grows past
    it (counted as it arrives, never buffered whole)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    return await _plain(send, 400, "Content-Length is not a number")
                if declared > self.limit:
                    return await _plain(send, 413, f"request body of {declared} bytes is over the limit of "
                                                   f"{self.limit} bytes")
        seen, started, too_large = 0, False, False

        async def counted_receive():
            nonlocal seen, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_large = True  # the app sees a disconnect; its answer is replaced by the 413 below
                    return {"type": "http.disconnect"}
            return msg

        async def tracked_send(msg):
            nonlocal started
            if too_large:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BaseException:
            if not too_large:
                raise
        if too_large and not started:
            await _plain(send, 413, f"request body over the limit of {self.limit} bytes")


def _or_none(build):
    """``build()``, or None when it fails: what cannot be known at submit is left to the worker, where such a
    request fails alone with its reason."""
    try:
        return build()
    except Exception:  # noqa: BLE001
        return None


async def _plain(send, status: int, detail: str):
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(cfg, registry, store, dispatcher=None, *, public_docs: bool = False):
    """The FastAPI app over ``store``; ``dispatcher`` (``worker.Dispatcher``) is started and stopped with the app
    and woken on every accepted request."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import ValidationError

    from compress.config import ServeRequest, format_validation_error, model_name_problem

    artifacts = dispatcher.artifacts if dispatcher is not None else Path(cfg.artifacts)
    token = cfg.token

    # long-polls wait on futures that the store's commits resolve (no polling while nothing changes)
    waiters: set = set()

    def wake_all():
        for f in waiters:
            if not f.done():
                f.set_result(None)
        waiters.clear()

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def changed():
            if not loop.is_closed():
                loop.call_soon_threadsafe(wake_all)

        store.listeners.append(changed)
        resumed = store.resume()
        if resumed:
            import logging

            logging.getLogger("compress.serve").warning("resumed %d interrupted job(s)", resumed)
        if dispatcher is not None:
            dispatcher.start()
            dispatcher.wake()
        yield
        if dispatcher is not None:
            await loop.run_in_executor(None, dispatcher.stop)
        store.listeners.remove(changed)

    docs_open = public_docs or token is None
    app = FastAPI(title="compress serve", version="1", lifespan=lifespan,
                  description="Compression requests (UniCuCo): POST a request for a registered model, poll its state, "
                              "download the pruned artifact.")
    bearer = HTTPBearer(auto_error=False)

    def auth(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)):
        if token is None:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token" if creds else "missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def protect_docs(request: Request, call_next):
        if not docs_open and request.url.path in DOC_PATHS:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def one_line(request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "body") or "body"
            parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
        return JSONResponse({"detail": "; ".join(parts)}, 422)

    def view(job: dict) -> dict:
        res = job.get("result") or {}
        out = {"id": job["id"], "model": job["model"], "format": job["format"], "state": job["state"],
               "request": job["request"], "created": job["created"], "started": job["started"],
               "finished": job["finished"], "attempts": job["attempts"],
               "strategy": res.get("strategy"), "target_sparsity": res.get("target_sparsity"),
               "sparsity": res.get("sparsity"), "kl": res.get("kl"), "method": res.get("method"),
               "size_bytes": job["artifact_bytes"], "sha256": job["artifact_sha256"], "error": job["error"],
               "queue_position": store.position(job)}
        if job["state"] == "done" and job["artifact"]:
            out["artifact_url"] = f"/v1/requests/{job['id']}/artifact"
        if job["idempotency_key"] is not None:
            out["idempotency_key"] = job["idempotency_key"]
        return out

    def known(job_id: str) -> dict:
        job = store.get(job_id) if len(job_id) <= 64 else None
        if job is None:
            raise HTTPException(404, f"no request '{job_id[:64]}'")
        return job

    @app.get("/healthz", tags=["service"])
    def healthz():
        """Liveness and queue depth (no token needed)."""
        counts = store.counts()
        return {"ok": True, "queued": counts["queued"], "running": counts["running"],
                "backend": cfg.backend}

    # what a request can be checked against before it is accepted: the StratNet's range, the sparse-file size
    # model (size_bytes) and the attention geometry (protect_heads), from headers and configs, no weights
    catalog, sizes, layouts = {}, {}, {}
    for name, entry in registry.models.items():
        from compress.heads.layout import attention_layout
        from compress.serve.session import folder_size_model
        from compress.strategy.stratnet import StratNetModel

        item = {"name": name, "description": entry.description, "formats": ["sparse", "dense"]}
        try:
            net = StratNetModel.load(entry.stratnet)
            item.update(method=net.meta.get("method", "wanda"), sparsity_range=list(net.sparsity_range),
                        blocks=len(net.block_params), parameters=sum(net.block_params))
        except Exception as e:  # noqa: BLE001 - one broken entry must not hide the others
            item["error"] = str(e)
        sizes[name] = _or_none(lambda: folder_size_model(entry))
        layouts[name] = _or_none(lambda: attention_layout(entry.model))
        if "sparsity_range" in item and sizes[name] is not None:
            item["size_bytes_range"] = list(sizes[name].budgets(*net.sparsity_range))
        catalog[name] = item

    def refusal(req) -> Optional[str]:
        """Why the model cannot answer ``req`` (None: it can), as the worker would find out after accepting it."""
        from compress.strategy.project import sparsity_for_size

        m = f"model '{req.model}'"
        lo_hi = catalog[req.model].get("sparsity_range")
        if req.sparsity is not None and lo_hi and not lo_hi[0] <= req.sparsity <= lo_hi[1]:
            return f"sparsity {req.sparsity:g} is outside the range {m} answers [{lo_hi[0]:g}, {lo_hi[1]:g}]"
        if req.size_bytes is not None and lo_hi and sizes[req.model] is not None:
            try:
                sparsity_for_size(req.size_bytes, sizes[req.model], *lo_hi)
            except CompressError as e:
                return f"{m}: {e}"
        if req.protect_heads and layouts[req.model] is not None:
            layout = layouts[req.model]
            try:
                for layer, head in req.protect_heads:
                    layout.check(int(layer), int(head))
            except CompressError as e:
                return f"{m}: protect_heads: {e}"
        return None

    @app.get("/v1/models", tags=["models"], dependencies=[Depends(auth)])
    def models():
        """The registered models a request may name, with what their StratNet answers."""
        return {"models": list(catalog.values())}

    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": ServeRequest.model_json_schema(),
        "example": {"model": next(iter(registry.models)), "sparsity": 0.5, "format": "sparse"}}}}}

    @app.post("/v1/requests", status_code=202, tags=["requests"], dependencies=[Depends(auth)],
              openapi_extra=body_schema)
    async def submit(request: Request):
        """Accept a compression request (the UniCuCo request schema plus ``model``, ``format`` and an optional
        ``idempotency_key``); it is committed to the job store before this answers 202 with its id."""
        import json

        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPException(422, "body: a JSON object (a compression request)")
        name = body.get("model")
        if isinstance(name, str):
            problem = model_name_problem(name)
            if problem:
                raise HTTPException(400, problem)
        try:
            req = ServeRequest(**body)
        except ValidationError as e:
            raise HTTPException(422, format_validation_error(e)) from None
        if req.model not in registry.models:
            raise HTTPException(404, f"model '{req.model}' is not registered (GET /v1/models lists them)")
        problem = refusal(req)
        if problem:
            raise HTTPException(422, problem)
        payload = req.model_dump(exclude_none=True, exclude={"model", "format", "idempotency_key"})

        def accept():
            return store.submit(req.model, req.format, payload, idempotency_key=req.idempotency_key,
                                max_queue=cfg.max_queue)

        try:
            job, created = await asyncio.get_running_loop().run_in_executor(None, accept)
        except QueueFull as e:
            raise HTTPException(429, f"the queue is full ({e.args[0]} jobs waiting); retry later",
                                headers={"Retry-After": "5"}) from None
        except IdempotencyConflict:
            raise HTTPException(409, f"idempotency_key '{req.idempotency_key}' was used for another request") from None
        if dispatcher is not None and created:
            dispatcher.wake()
        return JSONResponse(view(job), 202 if created else 200)

    @app.get("/v1/requests/{job_id}", tags=["requests"], dependencies=[Depends(auth)])
    async def status(job_id: str, wait: float = Query(0.0, ge=0.0, le=60.0,
                                                      description="seconds to wait for a final state")):
        """A request's state, strategy, measured KL and artifact size, or its error; ``wait`` long-polls."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        while True:
            change = loop.create_future()
            waiters.add(change)  # before the read: a commit right after it still wakes us
            job = await loop.run_in_executor(None, known, job_id)
            left = deadline - time.monotonic()
            if job["state"] in FINAL or left <= 0:
                change.cancel()
                return view(job)
            try:
                await asyncio.wait_for(change, left)
            except asyncio.TimeoutError:
                pass

    @app.get("/v1/requests/{job_id}/artifact", tags=["requests"], dependencies=[Depends(auth)])
    def artifact(job_id: str):
        """The artifact file: a sparse weight file (format sparse) or a tar of the pruned folder (dense)."""
        job = known(job_id)
        if job["state"] != "done" or not job["artifact"]:
            raise HTTPException(409, f"request '{job_id}' has no artifact: it is {job['state']}")
        path = artifacts / job["artifact"]
        if not path.is_file():
            raise HTTPException(410, f"the artifact of '{job_id}' is gone from the server")
        media = "application/x-tar" if job["format"] == "dense" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=job["artifact"],
                            headers={"X-Content-SHA256": job["artifact_sha256"] or ""})

    @app.delete("/v1/requests/{job_id}", tags=["requests"], dependencies=[Depends(auth)])
    def cancel(job_id: str):
        """Cancel a queued or running request, or delete a finished one's artifact; the record stays (cancelled)."""
        if len(job_id) > 64 or store.get(job_id) is None:
            raise HTTPException(404, f"no request '{job_id[:64]}'")
        before = store.cancel(job_id)
        if before["artifact"]:
            (artifacts / before["artifact"]).unlink(missing_ok=True)
        return view(store.get(job_id))

    return BodyLimit(app, cfg.max_body), app
