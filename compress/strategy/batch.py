"""`compress batch MODEL --stratnet FILE --requests FILE.jsonl --out DIR`: serve many requests with one StratNet.

Everything that can be wrong is checked before anything is written: every line of the requests file
(``read_requests``), the StratNet file against the model (fingerprint), every request's target against the
StratNet's sparsity range (size budgets through the sparse-file size model of the output dtype). Then one
``Pruner`` (the calibration statistics from the cache the training filled, or one forward pass) prunes each
request's strategy; DIR is written as a whole, atomically: ``<id>.sparse.safetensors`` and/or ``<id>/`` per
request, ``summary.json`` and ``summary.md`` (target, strategy, measured sparsity, file size).
"""

from __future__ import annotations

import json
import shutil
import time

from compress.errors import CompressError
from compress.progress import console, track


def run_batch(cfg) -> dict:
    from compress.io.sparse import write_sparse
    from compress.io.writer import atomic_dir, check_output, config_inputs
    from compress.runtime import resolve_device, torch_dtype
    from compress.strategy.project import size_model
    from compress.strategy.request import head_protect, read_requests
    from compress.strategy.stratnet import StratNetModel
    from compress.strategy.train import stratnet_pruner

    t_start = time.perf_counter()
    requests = read_requests(cfg.requests)
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    net = StratNetModel.load(cfg.stratnet, cfg.model)
    meta = net.meta
    dtype = torch_dtype(cfg.dtype)
    try:
        pruner = stratnet_pruner(net, cfg.model, calib=cfg.calib, nsamples=cfg.nsamples,
                                 device=resolve_device(cfg.device), cache_dir=cfg.cache_dir, quiet=cfg.quiet)
    except CompressError as e:
        raise CompressError(f"{cfg.stratnet}: {e}") from None
    sm = None
    if any(r.size_bytes is not None for r in requests):
        sm = size_model(cfg.model, {n: p.numel for n, p in pruner.checkpoint_names().items()}, dtype)
    answers = []
    for r, answer in zip(requests, net.answer_many(requests, sm)):  # one StratNet pass for the whole file
        try:
            if isinstance(answer, CompressError):
                raise answer
            strategy, target = answer
            protect = head_protect(pruner, r.protect_heads)
        except CompressError as e:
            raise CompressError(f"{cfg.requests}: request '{r.id}': {e}") from None
        answers.append((r, strategy, target, protect))
    t_answer = time.perf_counter()
    method = meta.get("method", "wanda")
    rows = []
    with atomic_dir(cfg.out, cfg.overwrite) as tmp:
        for r, strategy, target, protect in track(answers, "requests", quiet=cfg.quiet):
            t0 = time.perf_counter()
            result = pruner.prune(strategy, method, protect=protect)
            folder = tmp / r.id if cfg.format != "sparse" else tmp / ".work" / r.id
            pruner.save(result, folder, dtype=dtype, extra={"request": r.model_dump(exclude_none=True),
                                                            "stratnet": str(cfg.stratnet)})
            row = {"id": r.id, "target": r.target, "request": r.model_dump(exclude_none=True),
                   "sparsity_target": target, "sparsity": result.sparsity, "strategy": strategy,
                   "layer_sparsity_measured": pruner.layer_sparsity(result)}
            if cfg.format != "folder":
                s = write_sparse(folder, tmp / f"{r.id}.sparse.safetensors", quiet=True,
                                 metadata={"method": method, "sparsity": f"{result.sparsity:.6f}",
                                           "model": str(cfg.model), "request": json.dumps(row["request"])})
                row["file"] = f"{r.id}.sparse.safetensors"
                row["file_bytes"] = s.file_bytes
                if cfg.format == "sparse":
                    shutil.rmtree(folder)
            if cfg.format != "sparse":
                row["folder"] = r.id
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        summary = {"model": str(cfg.model), "stratnet": str(cfg.stratnet), "requests": str(cfg.requests),
                   "method": method, "format": cfg.format, "answer_seconds": t_answer - t_start,
                   "seconds": time.perf_counter() - t_start, "rows": rows}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        md = markdown(summary)
        (tmp / "summary.md").write_text(md)
    print(md)
    console.print(f"wrote {cfg.out}: {len(rows)} requests in {summary['seconds']:.1f} s")
    return summary


def markdown(summary: dict) -> str:
    lines = [f"# compress batch — {summary['model']}", "",
             f"StratNet {summary['stratnet']}, method {summary['method']}, {len(summary['rows'])} requests.", "",
             "| id | request | target sparsity | measured | file bytes | strategy |", "|---|---|---:|---:|---:|---|"]
    for r in summary["rows"]:
        req = ", ".join(f"{k}={v}" for k, v in r["request"].items() if k not in ("id", "name"))
        lines.append(f"| {r['id']} | {req} | {r['sparsity_target']:.4f} | {r['sparsity']:.4f} | "
                     f"{r.get('file_bytes', '')} | {' '.join(f'{v:.3f}' for v in r['strategy'])} |")
    return "\n".join(lines) + "\n"
