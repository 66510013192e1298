"""Hostile requests against `compress serve` (real HTTP on a loopback port, a tiny Llama with a trained StratNet):
a request the model cannot answer is refused at submit with its reason (422); one that is in the store anyway
(accepted by an older server, claimed when it crashed) fails alone with its reason while the rest of its group is
done; a group that cannot run at all fails every job; `compress request wait` / `submit --wait` return on a
failure."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_cli
from test_serve_api import Running, registry_with_stratnet, serve_cfg


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(registry path, model folder, StratNet path, calibration cache)."""
    return registry_with_stratnet(tmp_path_factory.mktemp("hostile_serve"), 2)


@pytest.fixture(scope="module")
def sizes(served):
    """The sparse-file size model of the tiny model, from the loaded model (what the worker uses)."""
    from compress.prune import Pruner
    from compress.strategy.project import size_model

    tiny = served[1]
    return size_model(tiny, {n: p.numel for n, p in Pruner(tiny, quiet=True).checkpoint_names().items()})


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unanswerable_requests_refused_at_submit(served, sizes, tmp_path, monkeypatch):
    import httpx

    cfg = serve_cfg(served, tmp_path)
    small, big = sizes.budgets(0.3, 0.7)
    reachable = f"reachable sizes are {small:,} to {big:,} bytes"
    with Running(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as h:
        (model,) = h.get("/v1/models").json()["models"]
        assert model["size_bytes_range"] == [small, big]  # computed from headers alone, equal to the loaded model's
        for size in (1000, small - 1, big + 1, 10 ** 400):
            r = h.post("/v1/requests", json={"model": "tiny", "size_bytes": size})
            detail = r.json()["detail"]
            assert r.status_code == 422 and detail.startswith("model 'tiny': size_bytes ") and reachable in detail, \
                (size, r.text)
        assert "size_bytes of 401 digits needs sparsity -inf" in detail
        r = h.post("/v1/requests", json={"model": "tiny", "sparsity": 0.5, "protect_heads": [[1, 0], [4, 0]]})
        assert r.status_code == 422 and r.json()["detail"] == ("model 'tiny': protect_heads: head (4, 0) is outside "
                                                               "the model: 4 layers of 4 heads")
        # the edges of the range are answerable: accepted, and met
        jobs = [h.post("/v1/requests", json={"model": "tiny", "size_bytes": s}) for s in (small, big)]
        assert [j.status_code for j in jobs] == [202, 202]
        monkeypatch.setenv("COMPRESS_SERVE_URL", srv.url)
        code, out, err = run_cli("request", "submit", "tiny", "--size-bytes", "1000", "--wait")
        assert code == 2 and one_line(err).startswith("error: server answered 422: model 'tiny': size_bytes 1,000 "
                                                      "needs sparsity") and reachable in err
        done = [h.get(f"/v1/requests/{j.json()['id']}", params={"wait": 60}).json() for j in jobs]
        assert [d["state"] for d in done] == ["done", "done"], [d["error"] for d in done]
        assert [d["size_bytes"] <= s for d, s in zip(done, (small, big))] == [True, True]
        assert len(srv.store.jobs()) == 2  # nothing refused was stored


def test_poison_pill_fails_alone(served, sizes, tmp_path, monkeypatch):
    """Bad size budgets in the store among valid jobs, all claimed by a server that then died: on restart they
    are one group; the bad ones fail with their reason, the others are done."""
    from compress.serve.client import Client
    from compress.serve.store import Store

    cfg = serve_cfg(served, tmp_path, max_batch=8)
    bodies = [{"sparsity": 0.4}, {"size_bytes": 1000}, {"preference": 0.6}, {"size_bytes": 10 ** 400},
              {"size_bytes": sizes.bytes(0.5)}]
    store = Store(cfg.db)
    ids = [store.submit("tiny", "sparse", b)[0]["id"] for b in bodies]
    _, claimed = store.claim_group(8)
    assert len(claimed) == 5
    store.close()
    with Running(cfg) as srv, Client(srv.url) as c:
        final = [c.wait(i, timeout=120) for i in ids]
        assert [f["state"] for f in final] == ["done", "failed", "done", "failed", "done"], \
            [f["error"] for f in final]
        reachable = "reachable sizes are {:,} to {:,} bytes".format(*sizes.budgets(0.3, 0.7))
        assert final[1]["error"].startswith("size_bytes 1,000 needs sparsity ")
        assert final[1]["error"].endswith(reachable)
        assert final[3]["error"].startswith("size_bytes of 401 digits needs sparsity -inf")
        assert abs(final[4]["sparsity"] - 0.5) < 5e-3 and final[4]["size_bytes"] <= sizes.bytes(0.5)
        # one group of the five, at their second attempt
        groups = {e["detail"] for e in srv.store.events() if e["state"] == "running" and e["attempt"] == 2}
        assert groups == {"group of 5"}
        monkeypatch.setenv("COMPRESS_SERVE_URL", srv.url)
        code, out, err = run_cli("request", "wait", ids[1], "--timeout", "30")
        assert code == 2 and one_line(err) == f"error: request {ids[1]} failed: {final[1]['error']}"
        code, out, err = run_cli("request", "wait", ids[0], "--timeout", "30")
        assert code == 0, err
        assert srv.store.counts()["running"] == 0


def test_group_that_cannot_run_fails_every_job(served, tmp_path, monkeypatch):
    """A job for a model removed from the registry, and a StratNet file gone after the start: each group fails
    with why (never left running), and `request submit --wait` returns."""
    from compress.serve.client import Client
    from compress.serve.store import Store

    reg, tiny, sn, _ = served
    own = tmp_path / "own.pt"  # this test's StratNet file, under a path no loaded session is keyed by
    shutil.copy(sn, own)
    reg2 = tmp_path / "models.yml"
    reg2.write_text(f"models:\n  tiny:\n    model: {tiny}\n    stratnet: {own}\n    eval_windows: 0\n")
    cfg = serve_cfg((reg2, *served[1:]), tmp_path)
    store = Store(cfg.db)
    gone = [store.submit("retired", "sparse", {"sparsity": 0.5})[0]["id"] for _ in range(2)]
    store.claim_group(8)
    store.close()
    with Running(cfg) as srv, Client(srv.url) as c:
        for job_id in gone:
            job = c.wait(job_id, timeout=60)
            assert job["state"] == "failed" and job["error"] == ("model 'retired' is not in this server's registry "
                                                                 "(removed since the request was accepted)")
        own.unlink()
        monkeypatch.setenv("COMPRESS_SERVE_URL", srv.url)
        code, out, err = run_cli("request", "submit", "tiny", "--sparsity", "0.5", "--wait")
        assert code == 2 and "failed: model 'tiny' could not be loaded: " in one_line(err) \
            and "no such StratNet file" in err
        assert srv.store.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 3, "cancelled": 0}
