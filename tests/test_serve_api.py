"""`compress serve` through real HTTP (uvicorn on a loopback port, in a thread) on a tiny Llama with a trained
StratNet: the API end to end on the local and the Ray backend (strategy equal to the StratNet's own answer,
measured sparsity, artifacts that load, idempotency, cancel), the security answers (401, 404, 400, 413, 429),
and `compress request` from the command line."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import run_cli, tiny_stories_llama

from compress.bench.serve import free_port
from compress.data import corpus_path, read_text

TOKEN = "test-token-0123456789"


def registry_with_stratnet(root, eval_windows: int, extra: str = ""):
    """A tiny Llama with stories260K's tokenizer, a StratNet trained for it and a one-model registry:
    (registry path, model folder, StratNet path, calibration cache)."""
    tiny = tiny_stories_llama(root)
    calib = root / "calib.txt"
    calib.write_text(read_text(corpus_path("wikitext2.valid"))[:30000])
    sn = root / "sn.pt"
    code, out, err = run_cli("strategy", "train", tiny, "--calib", calib, "--budget", "16", "--steps", "40",
                             "--rounds", "1", "--out", sn, "--cache-dir", root / "cache", "--nsamples", "8",
                             "--seqlen", "32", "--eval-windows", "6", "--quiet")
    assert code == 0, err
    reg = root / "models.yml"
    reg.write_text(f"models:\n  tiny:\n    model: {tiny}\n    stratnet: {sn}\n    eval_windows: {eval_windows}\n"
                   + extra)
    return reg, tiny, sn, root / "cache"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(registry path, model folder, StratNet path, calibration cache)."""
    return registry_with_stratnet(tmp_path_factory.mktemp("serve"), 4, "    description: a tiny Llama\n")


class Running:
    """`compress serve`'s app under uvicorn in a background thread (same code path as the command)."""

    def __init__(self, cfg):
        import uvicorn

        from compress.serve import build_app

        self.asgi, self.app, self.store, self.dispatcher = build_app(cfg)
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.asgi, host=cfg.host, port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.store.close()


def serve_cfg(served, tmp_path, **kw):
    from compress.config import ServeConfig

    reg, _, _, cache = served
    return ServeConfig(registry=reg, port=free_port(), db=tmp_path / "serve.db", cache_dir=cache, **kw)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_api_end_to_end(served, tmp_path, backend):
    from transformers import AutoModelForCausalLM

    from compress.config import CompressionRequest
    from compress.errors import CompressError
    from compress.io.deltafile import DeltaFile
    from compress.io.sparse import apply_sparse
    from compress.serve.client import Client, ServerError
    from compress.strategy.stratnet import StratNetModel

    reg, tiny, sn, _ = served
    cfg = serve_cfg(served, tmp_path, token=TOKEN, backend=backend, max_batch=8)
    net = StratNetModel.load(sn)
    reqs = [dict(sparsity=0.4), dict(preference=0.7), dict(sparsity=0.55, protect_heads=[[1, 0]]),
            dict(sparsity=0.5, format="dense")]
    with Running(cfg) as srv, Client(srv.url, TOKEN) as c:
        assert [m["name"] for m in c.models()] == ["tiny"]
        assert c.models()[0]["sparsity_range"] == list(net.sparsity_range)
        jobs = [c.submit("tiny", **r) for r in reqs]
        assert all(j["state"] in ("queued", "running") for j in jobs)
        # a repeat with the same idempotency key answers the same job; another body under it is a conflict
        first = c.submit("tiny", sparsity=0.45, idempotency_key="k-1")
        again = c.submit("tiny", sparsity=0.45, idempotency_key="k-1")
        assert again["id"] == first["id"]
        with pytest.raises(ServerError) as e:
            c.submit("tiny", sparsity=0.46, idempotency_key="k-1")
        assert e.value.status == 409
        done = [c.wait(j["id"], timeout=180) for j in jobs + [first]]
        assert [d["state"] for d in done] == ["done"] * 5, [d["error"] for d in done]
        assert len(srv.store.jobs()) == 5
        for r, d in zip(reqs + [dict(sparsity=0.45)], done):
            want, target = net.answer(CompressionRequest(**{k: v for k, v in r.items() if k != "format"}))
            assert d["strategy"] == pytest.approx(want, abs=1e-12)  # the StratNet's own answer
            assert abs(d["sparsity"] - target) < 5e-3 and d["kl"] > 0
        # sparse artifact: downloads (sha256 checked), rebuilds a folder that loads with the pruned weights
        art = c.download(done[0]["id"], tmp_path / "a.sparse.safetensors")
        assert art.stat().st_size == done[0]["size_bytes"]
        folder = apply_sparse(DeltaFile(art), tmp_path / "a", quiet=True)
        m = AutoModelForCausalLM.from_pretrained(folder)
        w = m.model.layers[0].mlp.down_proj.weight
        assert 0.2 < float((w == 0).float().mean()) < 0.7
        # dense artifact: the pruned Hugging Face folder, extracted
        dense = c.download(done[3]["id"], tmp_path / "dense")
        assert json.loads((dense / "prune.json").read_text())["sparsity"] == pytest.approx(done[3]["sparsity"])
        AutoModelForCausalLM.from_pretrained(dense)
        # protected head: its q rows are the dense model's
        prot = apply_sparse(DeltaFile(c.download(done[2]["id"], tmp_path / "p.sparse.safetensors")),
                            tmp_path / "p", quiet=True)
        q = AutoModelForCausalLM.from_pretrained(prot).model.layers[1].self_attn.q_proj.weight
        q0 = AutoModelForCausalLM.from_pretrained(tiny).model.layers[1].self_attn.q_proj.weight
        hd = q.shape[0] // AutoModelForCausalLM.from_pretrained(tiny).config.num_attention_heads
        assert torch.equal(q[:hd], q0[:hd]) and not torch.equal(q[hd:], q0[hd:])
        # DELETE: the record stays, cancelled; the artifact is gone
        gone = c.cancel(done[0]["id"])
        assert gone["state"] == "cancelled"
        with pytest.raises(CompressError, match="is cancelled: no artifact"):
            c.download(done[0]["id"], tmp_path / "again.sparse.safetensors")
        r = c.http.get(f"/v1/requests/{done[0]['id']}/artifact")
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]
        assert not (srv.dispatcher.artifacts / f"{done[0]['id']}.sparse.safetensors").exists()
        # one group answered the first burst (one model load, one StratNet pass)
        groups = {ev["detail"] for ev in srv.store.events() if ev["state"] == "running"}
        assert any(g.startswith("group of") and int(g.split()[-1]) >= 2 for g in groups), groups
        events = srv.store.events()
        assert sorted(ev["job"] for ev in events if ev["state"] == "done") == sorted(d["id"] for d in done)


def test_security_answers(served, tmp_path):
    import httpx

    cfg = serve_cfg(served, tmp_path, token=TOKEN, max_body=2048)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    with Running(cfg) as srv, httpx.Client(base_url=srv.url) as h:
        assert h.get("/healthz").status_code == 200  # the one open route
        routes = [("GET", "/v1/models"), ("POST", "/v1/requests"), ("GET", "/v1/requests/x"),
                  ("GET", "/v1/requests/x/artifact"), ("DELETE", "/v1/requests/x"), ("GET", "/docs"),
                  ("GET", "/openapi.json")]
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": TOKEN}):
                r = h.request(method, path, headers=headers, json={"model": "tiny", "sparsity": 0.5})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        assert h.get("/v1/requests/nope", headers=ok).status_code == 404
        r = h.post("/v1/requests", headers=ok, json={"model": "llama-70b", "sparsity": 0.5})
        assert r.status_code == 404 and "not registered" in r.json()["detail"]
        for name in ("../tiny", "/etc/passwd", "models/tiny", "~root", ".tiny", "C:\\tiny", "tiny/..", "file:tiny"):
            r = h.post("/v1/requests", headers=ok, json={"model": name, "sparsity": 0.5})
            assert r.status_code == 400 and "looks like a path" in r.json()["detail"], (name, r.text)
        big = {"model": "tiny", "sparsity": 0.5, "name": "x" * 4000}
        r = h.post("/v1/requests", headers=ok, json=big)
        assert r.status_code == 413 and "2048" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b" " * 512

        r = h.post("/v1/requests", headers={**ok, "Content-Type": "application/json"}, content=chunks())
        assert r.status_code == 413
        r = h.post("/v1/requests", headers=ok, json={"model": "tiny", "sparsity": 0.5, "preference": 0.2})
        assert r.status_code == 422
        assert r.json()["detail"].endswith("give exactly one target, got sparsity and preference")
        r = h.post("/v1/requests", headers=ok, json={"model": "tiny", "sparsity": 0.9})
        assert r.status_code == 422 and r.json()["detail"] == ("sparsity 0.9 is outside the range model 'tiny' "
                                                               "answers [0.3, 0.7]")
        r = h.post("/v1/requests", headers=ok, json={"model": "tiny", "sparsity": 0.5, "format": "zip"})
        assert r.status_code == 422 and r.json()["detail"].startswith("format:")
        assert h.get("/docs", headers=ok).status_code == 200
        assert not srv.store.jobs()  # nothing refused was stored


def test_queue_full_is_429(served, tmp_path):
    from fastapi.testclient import TestClient

    from compress.config import ServeConfig
    from compress.serve import load_registry
    from compress.serve.app import create_app
    from compress.serve.store import Store

    reg = served[0]
    cfg = ServeConfig(registry=reg, db=tmp_path / "q.db", max_queue=3, artifacts=tmp_path / "art")
    store = Store(cfg.db)
    asgi, _ = create_app(cfg, load_registry(reg), store, dispatcher=None)  # no worker: jobs stay queued
    with TestClient(asgi) as h:
        codes = [h.post("/v1/requests", json={"model": "tiny", "sparsity": 0.5}).status_code for _ in range(5)]
        assert codes == [202, 202, 202, 429, 429]
        r = h.post("/v1/requests", json={"model": "tiny", "sparsity": 0.5})
        assert r.headers["retry-after"] == "5" and "queue is full" in r.json()["detail"]
        assert h.get(f"/v1/requests/{store.jobs()[2]['id']}").json()["queue_position"] == 2
    store.close()


def test_serve_refuses_bad_setups(served, tmp_path):
    reg = served[0]
    code, out, err = run_cli("serve", "--registry", reg, "--host", "0.0.0.0", "--db", tmp_path / "a.db")
    assert code == 2 and "refusing to listen on 0.0.0.0 without a token" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yml"
    bad.write_text("models:\n  ../x:\n    model: a\n    stratnet: b\n")
    code, out, err = run_cli("serve", "--registry", bad, "--db", tmp_path / "b.db")
    assert code == 2 and "looks like a path" in err
    missing = tmp_path / "missing.yml"
    missing.write_text(f"models:\n  m:\n    model: {served[1]}\n    stratnet: {tmp_path / 'none.pt'}\n")
    code, out, err = run_cli("serve", "--registry", missing, "--db", tmp_path / "c.db")
    assert code == 2 and "models.m:" in err and "no such StratNet file" in err
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "c.db").exists()


def test_request_cli(served, tmp_path, monkeypatch):
    cfg = serve_cfg(served, tmp_path, token=TOKEN)
    with Running(cfg) as srv:
        monkeypatch.setenv("COMPRESS_SERVE_URL", srv.url)
        monkeypatch.setenv("COMPRESS_SERVE_TOKEN", TOKEN)
        out_file = tmp_path / "r.sparse.safetensors"
        code, out, err = run_cli("request", "submit", "tiny", "--sparsity", "0.5", "--wait", "--out", out_file)
        assert code == 0, err
        job = json.loads(out)
        assert job["state"] == "done" and out_file.stat().st_size == job["size_bytes"]
        code, out, err = run_cli("request", "status", job["id"])
        assert code == 0 and json.loads(out)["sha256"] == job["sha256"]
        code, out, err = run_cli("request", "submit", "tiny", "--sparsity", "0.5", "--preference", "0.1")
        assert code == 2 and "give exactly one target" in err  # refused before it is sent
        code, out, err = run_cli("request", "submit", "other", "--sparsity", "0.5")
        assert code == 2 and "server answered 404" in err
        code, out, err = run_cli("request", "models", "--token", "wrong-token-xyz")
        assert code == 2 and "server answered 401" in err
        assert [j["id"] for j in srv.store.jobs()] == [job["id"]]
