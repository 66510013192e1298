"""``compress bench prune``: whole-weight pruning on a zoo causal LM (lm-zoo's base, or stories260k).

Measured in one run, with one ``Pruner`` (one calibration pass of the dense model, cached):

1. Perplexity on held-out text (wikitext2.test; the calibration text is wikitext2.valid) of the dense model and
   of magnitude / Wanda / SparseGPT at 50% unstructured, 2:4 and 4:8; at 70% magnitude, Wanda and SparseGPT
   uniform against Wanda+OWL and SparseGPT+OWL. Pruned weights are loaded into the model in memory.
2. Shared calibration: a fresh Pruner (empty cache) timed from construction through calibration and 1
   strategy, and another through calibration and 16 strategies (random per-block vectors with the same mean,
   through ``Pruner.prune_many``: SparseGPT solves a layer's 16 problems in one batched column loop), side by
   side, for Wanda and for SparseGPT; the ratio is printed. Results stay in memory (no files written).
3. Sparse file size at 50% unstructured and 2:4 (bf16): the pruned folder written in bf16 and
   ``compress.io.sparse.write_sparse`` on it, against the dense bf16 size, over the whole file and over the
   pruned tensors alone.

Saves ``prune_<zoo>.json``, ``.md`` and ``.png`` (perplexity bars) into ``results``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.progress import console

CALIB, HELDOUT = "wikitext2.valid", "wikitext2.test"
CPU_MAX_TOKENS = 65536


def _model_dir(zoo: str, zoo_root: Path) -> Path:
    folder = {"lm-zoo": zoo_root / "lm-zoo" / "base", "stories260k": zoo_root / "stories260k"}.get(zoo)
    if folder is None:
        raise CompressError(f"bench prune runs on lm-zoo or stories260k, not '{zoo}'")
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: not built; run `compress zoo build {zoo}` first")
    return folder


def _rows(sparsity_high: float) -> list[tuple[str, str, str, float, bool]]:
    """(label, method, pattern, sparsity, owl)."""
    rows = []
    for pattern, s in (("unstructured", 0.5), ("2:4", 0.5), ("4:8", 0.5)):
        for method in ("magnitude", "wanda", "sparsegpt"):
            rows.append((f"{method} {pattern if pattern != 'unstructured' else '50%'}", method, pattern, s, False))
    for method in ("magnitude", "wanda", "sparsegpt"):
        rows.append((f"{method} {sparsity_high:.0%}", method, "unstructured", sparsity_high, False))
    for method in ("wanda", "sparsegpt"):
        rows.append((f"{method}+OWL {sparsity_high:.0%}", method, "unstructured", sparsity_high, True))
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_shared_calibration(model_dir: Path, method: str, k: int, *, calib: str, nsamples: int, seqlen: int,
                            device: str, batch_size: int, repeats: int = 2, quiet: bool = True) -> dict:
    """Seconds of (fresh Pruner + calibration + 1 strategy) and of (fresh Pruner + calibration + k strategies),
    each with an empty cache, after one untimed warm-up; the arms alternate ``repeats`` times, the fastest of
    each counts."""
    from compress.prune import Pruner
    from compress.prune.strategy import random_strategies

    def arm(n: int) -> dict:
        with tempfile.TemporaryDirectory() as cache:
            _sync(device)
            t0 = time.perf_counter()
            p = Pruner(model_dir, calib, nsamples=nsamples, seqlen=seqlen, device=device, cache_dir=cache,
                       batch_size=batch_size, quiet=quiet)
            strategies = random_strategies(n, 0.5, p.block_params, spread=0.1, seed=n)
            p.prune_many(strategies, method)
            _sync(device)
            return {"seconds": time.perf_counter() - t0, "calibration_seconds": p.calibration_seconds,
                    "forward_passes": p.forward_passes}

    arm(1)  # warm-up (imports, kernels, file cache): not counted
    runs = {1: [], k: []}
    for _ in range(repeats):  # alternate the arms so that drifts of a shared machine hit both alike
        for n in (1, k):
            runs[n].append(arm(n))
    out = {n: min(rs, key=lambda r: r["seconds"]) | {"all_seconds": [r["seconds"] for r in rs]}
           for n, rs in runs.items()}
    return {"method": method, "k": k, "one": out[1], "many": out[k], "ratio": out[k]["seconds"] / out[1]["seconds"]}


def sparse_sizes(pruner, results_for: dict, workdir: Path) -> dict:
    """Dense bf16 size and sparse-file size for each pruned result (bf16)."""
    from compress.io.sparse import write_sparse

    out = {}
    dense_dir = workdir / "dense-bf16"
    pruner.save(_dense_result(pruner), dense_dir, dtype=torch.bfloat16, overwrite=True)
    out["dense_bytes"] = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
    for label, result in results_for.items():
        folder = workdir / label.replace(" ", "_").replace(":", "-").replace("%", "")
        pruner.save(result, folder, dtype=torch.bfloat16, overwrite=True)
        row = {"folder_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
        s = write_sparse(folder, folder.with_name(folder.name + ".sparse.safetensors"), overwrite=True, quiet=True)
        row.update(file_bytes=s.file_bytes, dense_bytes=s.dense_bytes, ratio=s.ratio,
                   pruned_file_bytes=s.sparse_file_bytes, pruned_dense_bytes=s.sparse_dense_bytes,
                   pruned_ratio=s.pruned_ratio)
        out[label] = row
    return out


def _dense_result(pruner):
    from compress.prune import PruneResult, Strategy

    w = {p.name: pruner._dense[p.name] for p in pruner.modules}
    return PruneResult(w, Strategy.uniform(0.0, pruner.n_blocks), "dense", "-",
                       {n: t.numel() for n, t in w.items()}, 0.0, {n: t.numel() for n, t in w.items()})


def run(zoo: str, zoo_root: Path = Path("checkpoints/zoo"), results: Path = Path("checkpoints/bench"), *,
        device: str = "cpu", nsamples: int = 128, seqlen: Optional[int] = None, max_tokens: Optional[int] = None,
        eval_seqlen: Optional[int] = None, high: float = 0.7, k: int = 16, batch_size: int = 8,
        quiet: bool = False) -> dict:
    from compress.eval.perplexity import perplexity
    from compress.prune import Pruner

    model_dir = _model_dir(zoo, zoo_root)
    cfg = json.loads((model_dir / "config.json").read_text())
    max_pos = cfg.get("max_position_embeddings", 512)
    seqlen = seqlen or min(512, max_pos)
    if max_tokens is None and not device.startswith("cuda"):
        max_tokens = CPU_MAX_TOKENS  # a CPU scores the first 64 Ki held-out tokens, so the run takes minutes
    eval_seqlen = eval_seqlen or min(256, max_pos)
    t_start = time.perf_counter()
    report: dict = {"zoo": zoo, "model": str(model_dir), "device": device, "calib": CALIB, "heldout": HELDOUT,
                    "nsamples": nsamples, "seqlen": seqlen, "eval_seqlen": eval_seqlen, "max_tokens": max_tokens}
    if device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(device)

    # 2. shared calibration first, on a cold process state for both arms
    report["shared_calibration"] = [
        time_shared_calibration(model_dir, m, k, calib=CALIB, nsamples=nsamples, seqlen=seqlen, device=device,
                                batch_size=batch_size) for m in ("wanda", "sparsegpt")]
    for r in report["shared_calibration"]:
        console.print(f"[bench prune] {r['method']}: calibration + 1 strategy {r['one']['seconds']:.2f} s, "
                      f"+ {k} strategies {r['many']['seconds']:.2f} s: ratio {r['ratio']:.2f}")

    # 1. perplexity table
    with tempfile.TemporaryDirectory() as cache:
        pruner = Pruner(model_dir, CALIB, nsamples=nsamples, seqlen=seqlen, device=device, cache_dir=cache,
                        batch_size=batch_size, quiet=quiet)
        tok = pruner.tokenizer()
        from compress.data import corpus_path
        text = corpus_path(HELDOUT)

        def ppl() -> float:
            return perplexity(pruner.model, tok, text, seqlen=eval_seqlen, max_tokens=max_tokens, batch_size=32,
                              device=device)

        rows = {"dense": {"perplexity": ppl(), "sparsity": 0.0}}
        keep_for_size = {}
        owl_strategy = None
        for label, method, pattern, s, owl in _rows(high):
            st = pruner.owl(s) if owl else s
            if owl:
                owl_strategy = st
            r = pruner.prune(st, method, pattern)
            pruner.load(r)
            rows[label] = {"method": method, "pattern": pattern, "target": s, "owl": owl,
                           "sparsity": r.sparsity, "prune_seconds": r.seconds, "perplexity": ppl()}
            pruner.load(None)
            if label in ("wanda 50%", "wanda 2:4"):
                keep_for_size[label] = r
            if not quiet:
                console.print(f"[bench prune] {label}: ppl {rows[label]['perplexity']:.3f} "
                              f"(sparsity {r.sparsity:.4f})")
        report["rows"] = rows
        report["owl_strategy"] = owl_strategy.to_dict() if owl_strategy else None
        report["calibration_forward_passes"] = pruner.forward_passes
        # 3. sizes
        with tempfile.TemporaryDirectory() as work:
            report["sizes"] = sparse_sizes(pruner, keep_for_size, Path(work))
    report["seconds"] = time.perf_counter() - t_start
    from compress.bench import publish

    publish(results, f"prune_{report['zoo']}", report, markdown(report), plot, "bench prune")
    return report


def markdown(report: dict) -> str:
    rows = report["rows"]
    dense = rows["dense"]["perplexity"]
    lines = [f"# compress bench prune — {report['zoo']}", "",
             f"Perplexity on {report['heldout']} (windows of {report['eval_seqlen']} tokens"
             + (f", first {report['max_tokens']} tokens" if report["max_tokens"] else "") + "); calibration "
             f"{report['nsamples']} × {report['seqlen']} tokens of {report['calib']}, statistics of the dense model, "
             f"one pass for every row. Device: {report.get('device_name', report['device'])}.", "",
             "| model | sparsity | perplexity | × dense |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['sparsity']:.4f} | {r['perplexity']:.3f} | {r['perplexity'] / dense:.3f} |")
    owl = report.get("owl_strategy")
    if owl:
        lines += ["", "OWL per-block sparsity (last OWL row): "
                  + ", ".join(f"{v:.3f}" for v in owl["layer_sparsity"])]
    lines += ["", "Shared calibration (fresh Pruner, empty cache, model load included; pruned in memory):", "",
              "| method | calibration + 1 strategy (s) | calibration + K strategies (s) | K | ratio |",
              "|---|---:|---:|---:|---:|"]
    for r in report["shared_calibration"]:
        lines.append(f"| {r['method']} | {r['one']['seconds']:.2f} | {r['many']['seconds']:.2f} | {r['k']} | "
                     f"{r['ratio']:.2f} |")
    sizes = report["sizes"]
    lines += ["", f"Sizes in bf16 (dense safetensors {sizes['dense_bytes']:,} bytes):", ""]
    lines += ["| model | sparse file (bytes) | ÷ dense | pruned tensors only: sparse ÷ dense |",
              "|---|---:|---:|---:|"]
    for label, r in sizes.items():
        if isinstance(r, dict):
            lines.append(f"| {label} | {r['file_bytes']:,} | {r['ratio']:.3f} | {r['pruned_ratio']:.3f} |")
    lines += ["", f"Total {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    labels = list(report["rows"])
    values = [report["rows"][k]["perplexity"] for k in labels]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(labels)), values, color=["gray"] + ["C0" if "OWL" not in x else "C2" for x in labels[1:]])
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity on {report['heldout']} (log)")
    ax.set_title(f"compress bench prune — {report['zoo']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
