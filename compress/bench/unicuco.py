"""``compress bench unicuco``: one StratNet for many requests against a search per request (UniCuCo's claim).

In one run, on one model, one calibration and one evaluator (``compress.strategy.evaluate``: Wanda masks from the
cached dense statistics, KL to the dense model on held-out windows of the calibration text):

1. ``requests`` sparsity requests evenly spaced over the range (0.3–0.7 by default).
2. **UniCuCo**: ``train_unicuco`` with ``train_budget`` true evaluations (design + active rounds), then StratNet
   answers every request. Timed: evaluations, GP fits, StratNet training, answering.
3. **Per-request search**: CMA-ES (or BO) for every request with ``budget`` evaluations each, starting from the
   uniform strategy (its first evaluation, which gives the uniform baseline's KL). Timed.
4. Quality, not counted in either time: the served strategies are evaluated once on the same windows; served,
   searched and uniform strategies are also scored on a second held-out text (wikitext2.test windows, never used
   by any search), so the comparison does not reward a search for fitting its own windows. Measured sparsity
   of each served strategy against its target; sparse-file size of each (``project.size_model``, the dtype as
   stored).

**At size** (a 7B-class folder): ``streaming=True`` (default: by size, ``Evaluator``'s rule) runs every evaluation
block by block, so neither side holds the model on the device; ``search_requests=K`` times the per-request search
on K of the requests (evenly spread) and scales its time to all of them (the report prints both figures, and the
quality rows are those K requests).

Saves ``unicuco_<name>.json``, ``.md`` and ``.png`` (size against KL: served, searched, uniform).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.progress import console, track

TEST_TEXT = "wikitext2.test"


def _model_dir(zoo: str, zoo_root: Path) -> tuple[Path, str]:
    if zoo == "lm-zoo":
        folder = zoo_root / "lm-zoo" / "base"
        if not (folder / "config.json").is_file():
            raise CompressError(f"{folder}: not built; run `compress zoo build lm-zoo` first")
        return folder, "lm-zoo"
    folder = Path(zoo)
    if not (folder / "config.json").is_file():
        raise CompressError(f"bench unicuco runs on lm-zoo or a model folder; {zoo} is neither")
    return folder, folder.name


def _warm_imports() -> None:
    """Import what either side needs (cma, botorch, torch.optim's first-use imports) before any timing, so that
    neither side pays the other's one-off import cost."""
    import botorch.fit  # noqa: F401
    import cma  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(zoo: str, zoo_root: Path = Path("checkpoints/zoo"), results: Path = Path("checkpoints/bench"), *,
        device: str = "cpu", requests: int = 64, sparsity_range: tuple[float, float] = (0.3, 0.7),
        budget: int = 160, train_budget: int = 160, rounds: int = 2, steps: int = 300, kappa: float = 0.0,
        optimizer: str = "cma",
        method: str = "wanda", nsamples: int = 128, seqlen: Optional[int] = None, eval_windows: int = 32,
        eval_seqlen: Optional[int] = None, spread: float = 0.2, max_block: float = 0.95, calib: str = "wikitext2.valid",
        seed: int = 0, batch_size: int = 16, cache_dir: Optional[Path] = None, streaming: Optional[bool] = None,
        dtype: torch.dtype = torch.float32, host_cache: bool = False, search_requests: Optional[int] = None,
        quiet: bool = False) -> dict:
    import tempfile

    from compress.data import corpus_path
    from compress.eval.perplexity import text_windows
    from compress.prune.pruner import prunable_numels
    from compress.prune.registry import get_prune_method
    from compress.prune.strategy import weighted_mean
    from compress.strategy.evaluate import Evaluator
    from compress.strategy.project import size_model
    from compress.strategy.search import search_sparsity
    from compress.strategy.train import make_pruner, train_unicuco

    model_dir, name = _model_dir(zoo, zoo_root)
    lo, hi = sparsity_range
    targets = [lo + (hi - lo) * i / (requests - 1) for i in range(requests)] if requests > 1 else [(lo + hi) / 2]
    k = min(search_requests or requests, requests)
    searched_at = torch.linspace(0, requests - 1, k).round().long().tolist() if k < requests else list(range(requests))
    report: dict = {"model": str(model_dir), "name": name, "device": device, "requests": requests,
                    "sparsity_range": [lo, hi], "search_budget": budget, "train_budget": train_budget,
                    "rounds": rounds, "steps": steps, "kappa": kappa, "optimizer": optimizer, "method": method,
                    "calib": calib, "nsamples": nsamples, "eval_windows": eval_windows, "spread": spread, "seed": seed}
    if device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(device)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpcache:
        # -- shared setup: model, calibration statistics, dense log-probs on the evaluation windows ----------
        t0 = time.perf_counter()
        _warm_imports()
        pruner = make_pruner(model_dir, calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                             cache_dir=cache_dir or tmpcache, batch_size=8, quiet=quiet)
        ev = Evaluator(pruner, method, eval_windows=eval_windows, eval_seqlen=eval_seqlen, batch_size=batch_size,
                       streaming=streaming, dtype=dtype, host_cache=host_cache)
        if not ev.streaming:
            pruner.stats(hessian=get_prune_method(method).hessian)
        _sync(device)
        report["setup_seconds"] = time.perf_counter() - t0
        report["streaming"], report["dtype"] = ev.streaming, str(dtype).removeprefix("torch.")
        report["host_cache"] = bool(ev.streaming and host_cache)
        report["eval_windows_used"] = int(ev.windows.shape[0])
        report["eval_seqlen"] = ev.eval_seqlen
        bp = pruner.block_params
        report["block_params"] = bp

        # -- UniCuCo ----------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        net, _, train_report = train_unicuco(ev, sparsity_range=sparsity_range, spread=spread, max_block=max_block,
                                             budget=train_budget, rounds=rounds, steps=steps, seed=seed, kappa=kappa,
                                             quiet=quiet)
        t1 = time.perf_counter()
        with torch.no_grad():
            served = net.for_sparsity(torch.tensor(targets, dtype=torch.float64)).tolist()
        t2 = time.perf_counter()
        report["unicuco"] = {**train_report, "train_seconds": t1 - t0, "serve_seconds": t2 - t1,
                             "total_seconds": t2 - t0}
        console.print(f"[bench unicuco] UniCuCo: {train_report['evaluations']} evaluations, trained in "
                      f"{t1 - t0:.1f} s, {requests} requests served in {t2 - t1:.3f} s")

        # -- per-request search -----------------------------------------------------------------------------
        n_before = ev.evaluations
        t0 = time.perf_counter()
        searched = []
        for i in track(searched_at, "per-request search", quiet=quiet):
            searched.append(search_sparsity(ev, targets[i], bp, spread=spread, max_block=max_block,
                                            optimizer=optimizer, budget=budget, seed=seed + i))
        _sync(device)
        measured = time.perf_counter() - t0
        search_seconds = measured * requests / k
        report["search"] = {"seconds": search_seconds, "seconds_measured": measured, "requests_searched": k,
                            "scaled": k < requests, "evaluations": (ev.evaluations - n_before) * requests // k,
                            "evaluations_measured": ev.evaluations - n_before,
                            "seconds_per_request": measured / k}
        console.print(f"[bench unicuco] search: {ev.evaluations - n_before} evaluations on {k} of {requests} "
                      f"requests in {measured:.1f} s" + (f", scaled to {requests}: {search_seconds:.1f} s"
                                                        if k < requests else ""))

        # -- quality (not timed into either side) -----------------------------------------------------------
        tok = pruner.tokenizer()
        test_windows = text_windows(tok, corpus_path(TEST_TEXT), ev.eval_seqlen, None)
        test_windows = test_windows[torch.linspace(0, len(test_windows) - 1, min(eval_windows, len(test_windows))
                                                   ).round().long()]
        test_ev = Evaluator(pruner, method, batch_size=batch_size, windows=test_windows, streaming=ev.streaming,
                            dtype=dtype, host_cache=ev.stream.host if ev.stream is not None and host_cache else False)
        size = size_model(model_dir, prunable_numels(model_dir))
        rows = []
        for t, s_served, srch in zip([targets[i] for i in searched_at], [served[i] for i in searched_at],
                                     searched):
            rec = ev.evaluate(s_served, phase="served")
            uniform = [t] * len(bp)
            row = {"target": t, "served": s_served, "searched": srch["strategy"],
                   "kl_served": rec["kl"], "kl_searched": srch["kl"], "kl_uniform": srch["uniform_kl"],
                   "sparsity_served": rec["sparsity"], "mean_served": weighted_mean(s_served, bp),
                   "sparsity_error_points": 100 * abs(rec["sparsity"] - t),
                   "test_kl_served": test_ev(s_served), "test_kl_searched": test_ev(srch["strategy"]),
                   "test_kl_uniform": test_ev(uniform), "size_bytes": size.bytes(t)}
            rows.append(row)
        report["rows"] = rows
    report["summary"] = summarize(report)
    report["seconds"] = time.perf_counter() - t_all
    from compress.bench import publish

    publish(results, f"unicuco_{report['name']}", report, markdown(report), plot, "bench unicuco")
    return report


def summarize(report: dict) -> dict:
    rows = report["rows"]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    u, s = report["unicuco"], report["search"]
    out = {"rows": len(rows), "mean_kl_served": mean("kl_served"), "mean_kl_searched": mean("kl_searched"),
           "mean_kl_uniform": mean("kl_uniform"), "mean_test_kl_served": mean("test_kl_served"),
           "mean_test_kl_searched": mean("test_kl_searched"), "mean_test_kl_uniform": mean("test_kl_uniform"),
           "served_better_than_uniform": sum(r["kl_served"] < r["kl_uniform"] for r in rows),
           "served_better_than_uniform_test": sum(r["test_kl_served"] < r["test_kl_uniform"] for r in rows),
           "searched_better_than_uniform": sum(r["kl_searched"] < r["kl_uniform"] for r in rows),
           "max_sparsity_error_points": max(r["sparsity_error_points"] for r in rows),
           "speedup": s["seconds"] / u["total_seconds"],
           "speedup_with_setup": (s["seconds"] + report["setup_seconds"]) / (u["total_seconds"]
                                                                             + report["setup_seconds"])}
    out["served_vs_searched"] = out["mean_kl_served"] / out["mean_kl_searched"] - 1
    out["served_vs_searched_test"] = out["mean_test_kl_served"] / out["mean_test_kl_searched"] - 1
    sec = u["seconds"]
    parts = {"evaluations": sec["evaluations"], "GP fits": sec["gp_fit"], "StratNet training": sec["stratnet_train"],
             "answering": u["serve_seconds"]}
    out["unicuco_dominant"] = max(parts, key=parts.get)
    out["unicuco_parts"] = parts
    return out


def markdown(report: dict) -> str:
    s, u, srch = report["summary"], report["unicuco"], report["search"]
    sec = u["seconds"]
    lines = [f"# compress bench unicuco — {report['name']}", "",
             f"{report['requests']} sparsity requests evenly over {report['sparsity_range'][0]}–"
             f"{report['sparsity_range'][1]}; {report['method']} masks from one calibration ({report['nsamples']} "
             f"windows of {report['calib']}); KL to the dense model on {report['eval_windows_used']} held-out "
             f"windows of "
             f"{report['eval_seqlen']} tokens of the calibration text (the evaluator), and on as many windows of "
             f"{TEST_TEXT} (test, never searched). Device: {report.get('device_name', report['device'])}; evaluator "
             + ("streaming blocks" + (" from a host copy" if report.get("host_cache") else " from the files")
                if report.get("streaming") else "in memory") + f" ({report.get('dtype')}).", "",
             "| | evaluations | seconds |", "|---|---:|---:|",
             f"| shared setup (model, calibration, dense log-probs) | | {report['setup_seconds']:.2f} |",
             f"| UniCuCo: design + active rounds ({u['design']} + {u['active']}) | {u['evaluations']} | "
             f"{sec['evaluations']:.2f} |",
             f"| UniCuCo: GP fits ({u['gp_fits']}) | | {sec['gp_fit']:.2f} |",
             f"| UniCuCo: StratNet training ({' + '.join(str(n) for n in u.get('steps', []))} Adam steps, "
             f"κ = {report.get('kappa', 0):g}) | | "
             f"{sec['stratnet_train']:.2f} |",
             f"| UniCuCo: answering {report['requests']} requests | | {u['serve_seconds']:.4f} |",
             f"| **UniCuCo total** | {u['evaluations']} | **{u['total_seconds']:.2f}** |",
             f"| **per-request search** ({report['optimizer']}, {report['search_budget']} each) | "
             f"{srch['evaluations']} | **{srch['seconds']:.2f}** |", "",
             *([f"The search was timed on {srch['requests_searched']} of the {report['requests']} requests (evenly "
                f"spread): {srch['evaluations_measured']} evaluations in {srch['seconds_measured']:.2f} s, scaled by "
                f"{report['requests']}/{srch['requests_searched']} to the figure above; the quality rows below are "
                "those requests.", ""] if srch.get("scaled") else []),
             f"Speed-up (search ÷ UniCuCo): **{s['speedup']:.1f}×** ({s['speedup_with_setup']:.1f}× with the shared "
             f"setup on both sides). UniCuCo's time is dominated by {s['unicuco_dominant']}.", "",
             "| mean KL over the requests | served (UniCuCo) | searched | uniform |", "|---|---:|---:|---:|",
             f"| evaluator windows | {s['mean_kl_served']:.5f} | {s['mean_kl_searched']:.5f} | "
             f"{s['mean_kl_uniform']:.5f} |",
             f"| {TEST_TEXT} | {s['mean_test_kl_served']:.5f} | {s['mean_test_kl_searched']:.5f} | "
             f"{s['mean_test_kl_uniform']:.5f} |", "",
             f"Served against searched: {100 * s['served_vs_searched']:+.2f}% (evaluator windows), "
             f"{100 * s['served_vs_searched_test']:+.2f}% ({TEST_TEXT}). Served better than uniform at "
             f"{s['served_better_than_uniform']}/{s['rows']} requests "
             f"({s['served_better_than_uniform_test']}/{s['rows']} on {TEST_TEXT}); searched at "
             f"{s['searched_better_than_uniform']}/{s['rows']}. Largest sparsity error of a served strategy: "
             f"{s['max_sparsity_error_points']:.4f} points.", "",
             "| target | KL served | KL searched | KL uniform | test KL served | test KL searched | test KL uniform | "
             "served strategy |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['target']:.4f} | {r['kl_served']:.5f} | {r['kl_searched']:.5f} | {r['kl_uniform']:.5f} "
                     f"| {r['test_kl_served']:.5f} | {r['test_kl_searched']:.5f} | {r['test_kl_uniform']:.5f} | "
                     + " ".join(f"{v:.3f}" for v in r["served"]) + " |")
    lines += ["", f"Total {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    rows = report["rows"]
    mb = [r["size_bytes"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label, style in (("kl_uniform", "uniform", "s-"), ("kl_searched", "per-request search", "^-"),
                              ("kl_served", "UniCuCo (served)", "o-")):
        ax.plot(mb, [r[key] for r in rows], style, ms=3, lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sparse file size (MB, as stored)")
    ax.set_ylabel("KL to the dense model (nats, log)")
    ax.set_title(f"compress bench unicuco — {report['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
