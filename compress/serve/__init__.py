"""`compress serve`: compression requests over HTTP (see ``app``), a persistent SQLite job store (``store``),
a batching worker (``worker``) over model sessions (``session``), and a Python client (``client``)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from compress.errors import CompressError

TOKEN_ENV = "COMPRESS_SERVE_TOKEN"
URL_ENV = "COMPRESS_SERVE_URL"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_registry(path: str | os.PathLike, *, check: bool = True):
    """The registry YAML validated into ``ServeRegistry``; with ``check``, every model folder and StratNet is
    opened now (fingerprint checked) so a bad entry stops the server at start, naming the entry."""
    from pydantic import ValidationError

    from compress.config import ServeRegistry, format_validation_error
    from compress.io.files import read_mapping
    from compress.strategy.stratnet import StratNetModel

    raw = read_mapping(path, "registry")
    try:
        reg = ServeRegistry(**raw)
    except ValidationError as e:
        raise CompressError(f"{path}: {format_validation_error(e)}") from None
    if check:
        for name, entry in reg.models.items():
            if not Path(entry.model).is_dir():
                raise CompressError(f"{path}: models.{name}.model: {entry.model} is not a model folder")
            try:
                StratNetModel.load(entry.stratnet, entry.model)
            except CompressError as e:
                raise CompressError(f"{path}: models.{name}: {e}") from None
    return reg


def artifacts_dir(cfg) -> Path:
    return Path(cfg.artifacts) if cfg.artifacts is not None else cfg.db.with_name(cfg.db.name + ".artifacts")


def build_app(cfg, *, public_docs: bool = False):
    """(asgi app, fastapi app, store, dispatcher) for ``cfg`` (``ServeConfig``): what `compress serve` runs and
    the tests drive in-process."""
    from compress.serve.app import create_app
    from compress.serve.store import Store
    from compress.serve.worker import Dispatcher

    if cfg.token is None and not is_loopback(cfg.host):
        raise CompressError(f"refusing to listen on {cfg.host} without a token: anyone who can reach it could use "
                            f"the service; pass --token or set {TOKEN_ENV} (or bind 127.0.0.1)")
    registry = load_registry(cfg.registry)
    store = Store(cfg.db)
    dispatcher = Dispatcher(store, registry, cfg, artifacts_dir(cfg))
    asgi, app = create_app(cfg, registry, store, dispatcher, public_docs=public_docs)
    return asgi, app, store, dispatcher


def serve(cfg, *, public_docs: bool = False, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    asgi, _, store, _ = build_app(cfg, public_docs=public_docs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    auth = "bearer token required" if cfg.token else "no token (loopback only)"
    print(f"compress serve: http://{cfg.host}:{cfg.port} (docs /docs), {cfg.backend} backend, {auth}, "
          f"db {cfg.db}", flush=True)
    try:
        uvicorn.run(asgi, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        store.close()
