"""``compress bench merge``: what merging keeps of each task's skill, on the zoo's real fine-tuned models.

minilm-8task (the shape of the CLIP ViT-B/32 eight-task table of the merging papers): rows zero-shot (the
pretrained encoder with each task's own head), individual fine-tuned, simple average, task arithmetic, TIES,
DARE-TIES, the data-free subspace merges TSV-M, Iso-C, Iso-CTS and WUDI (``compress.merge.subspace``) and the
test-time AdaMerging (``compress.merge.adamerging``: λ learned on unlabeled dev rows); columns the eight tasks'
test accuracy, their average and the normalized average (accuracy ÷ the individual model's accuracy, averaged),
and beside a task whose official metric is not accuracy that metric (MCC for CoLA, F1 for MRPC: task.json
``metric``), under ``official`` in the JSON. λ is chosen on the dev splits (best mean dev accuracy over a grid),
as the papers do, and so are the settings of ``GRIDS`` (TSV-M's rank, Iso-CTS' common fraction, WUDI's step
size); each row records its merge's seconds. The merged vectors come from ``compress.merge.Merger`` (the same
code as `compress merge`), computed once at λ = 1 and scaled, since each method is linear in λ.

lm-zoo: the same rows over the domain and recall task models, columns perplexity per domain (lower is better),
context-recall accuracy and hallucination rate; λ chosen on dev text and dev recall prompts.

Writes ``merge_<zoo>.json``, ``merge_<zoo>.md`` and ``merge_<zoo>.png`` (a bar chart) into ``results``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from compress.config import MergeConfig, build
from compress.errors import CompressError
from compress.progress import console

LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0)
MERGES = {  # row → (method, parameters); λ searched for all but the average and AdaMerging (which learns it)
    "simple average": ("linear", {}),
    "task arithmetic": ("task_arithmetic", {}),
    "TIES": ("ties", {"density": 0.2}),
    "DARE-TIES": ("dare_ties", {"density": 0.2}),
    "TSV-M": ("tsv", {}),
    "Iso-C": ("iso_c", {}),
    "Iso-CTS": ("iso_cts", {"common": 0.8}),
    "WUDI": ("wudi", {}),
    "AdaMerging": ("adamerging", {}),
}
# settings tried besides the row's parameters, each with its own λ search; the best mean dev score wins
GRIDS = {
    "TSV-M": [{}, {"rank": 0.25}],
    "Iso-CTS": [{"common": 0.8}, {"common": 0.5}],
    "WUDI": [{}, {"lr": 1e-4}],
}
LEARNED = ("adamerging",)  # methods whose merge already holds its coefficients: no λ search
QUICK = {"lambdas": (0.3, 0.6, 1.0), "steps": {"wudi": 20, "adamerging": 5}}  # --quick: a CPU run end to end


def settings(row: str, method: str, params: dict, quick: bool) -> list[dict]:
    """The parameter settings a row tries (only its own with ``quick``, and fewer optimiser steps)."""
    grid = [params] if quick else GRIDS.get(row, [params])
    if quick and method in QUICK["steps"]:
        grid = [{**p, "steps": QUICK["steps"][method]} for p in grid]
    return grid


def tune_merge(base: Path, models: list[Path], method: str, grid: list[dict], device: str,
               at: Callable[[dict, float], None], dev_score: Callable[[], float], lambdas=LAMBDAS,
               **fields) -> dict:
    """Merge once per setting of ``grid``, choose λ on dev (a learned method keeps its own) and the setting with the
    best dev score; leaves that model loaded through ``at(merged, λ)``. ``fields``: extra MergeConfig fields."""
    best, trials = None, []
    for params in grid:
        start = time.perf_counter()
        merged = merged_deltas(base, models, method, params, device, **fields)
        seconds = time.perf_counter() - start
        if method in LEARNED:
            at(merged, 1.0)
            lam, seen = 1.0, {1.0: dev_score()}
        else:
            lam, seen = choose_lambda(lambda v: at(merged, v), dev_score, lambdas)
        trials.append({"params": params, "lambda": lam, "dev": seen[lam], "merge_seconds": seconds,
                       "dev_by_lambda": {str(k): v for k, v in seen.items()}})
        if best is None or seen[lam] > best[0]["dev"]:
            best = (trials[-1], merged)
        else:
            del merged
    chosen, merged = best
    at(merged, chosen["lambda"])
    return {**chosen, "settings_tried": trials}


def merged_deltas(base: Path, models: list[Path], method: str, params: dict, device: str,
                  quiet: bool = True, **fields) -> dict[str, torch.Tensor]:
    """{name: merged tensor − base} at λ = 1 (or the merged tensor itself for 'linear'), float32 on ``device``.
    ``fields``: more MergeConfig fields (e.g. AdaMerging's ``text``)."""
    from compress.merge.executor import Merger

    cfg = build(MergeConfig, method=method, base=base, models=[{"model": m} for m in models],
                parameters=params, device=device, quiet=quiet, **fields)
    merger = Merger(cfg)
    out = {}
    for name, t in merger.tensors(quiet=quiet):
        if not t.is_floating_point():
            continue
        t = t.float()
        out[name] = t if method == "linear" else t - merger.ref.get(name, device=device, dtype=torch.float32)
    return out


def choose_lambda(apply: Callable[[float], None], dev_score: Callable[[], float],
                  lambdas=LAMBDAS) -> tuple[float, dict[float, float]]:
    """The λ of the grid with the best dev score (ties → the smaller λ), and every score seen."""
    seen = {}
    for lam in lambdas:
        apply(lam)
        seen[lam] = dev_score()
    best = max(seen, key=lambda lam: (seen[lam], -lam))
    return best, seen


# -- minilm-8task -------------------------------------------------------------------------------------------

def run_minilm(zoo: Path, *, device: str = "cpu", dev_limit: Optional[int] = 500, test_limit: Optional[int] = None,
               lambdas=LAMBDAS, batch_size: int = 256, quiet: bool = False, quick: bool = False,
               merges: Optional[dict] = None) -> dict:
    """The minilm-8task table; ``merges``: the merge rows to run (default ``MERGES``, all of them)."""
    from compress.eval.classify import TaskEvaluator, load_encoder, load_heads, set_encoder_weights
    from compress.io.reader import open_checkpoint

    if not (zoo / "base").is_dir():
        raise CompressError(f"{zoo}: no base/ folder; build it with `compress zoo build minilm-8task`")
    heads = load_heads(zoo)
    tasks = list(heads)
    encoder, tok = load_encoder(zoo / "base", device=device)
    base_sd = {n: t.detach().clone() for n, t in encoder.state_dict().items()}
    evals = {split: {t: TaskEvaluator(heads[t].task_ref, split, tokenizer=tok, limit=lim,
                                      max_length=heads[t].max_length, batch_size=batch_size) for t in tasks}
             for split, lim in (("dev", dev_limit), ("test", test_limit))}

    def score(split: str, only: Optional[list[str]] = None) -> dict[str, float]:
        return {t: evals[split][t].accuracy(encoder, heads[t]) for t in (only or tasks)}

    def test_scores(only: Optional[list[str]] = None) -> dict:
        """{"acc": accuracy by task, "official": the official metric of the tasks not scored by accuracy}."""
        res = {t: evals["test"][t].evaluate(encoder, heads[t]) for t in (only or tasks)}
        return {"acc": {t: r.accuracy for t, r in res.items()},
                "official": {t: r.official for t, r in res.items() if r.metric != "accuracy"}}

    def load(weights: dict[str, torch.Tensor]) -> None:
        set_encoder_weights(encoder, weights, strict=False)

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    load(base_sd)
    rows["zero-shot"] = test_scores()
    individual, individual_official = {}, {}
    for t in tasks:
        ck = open_checkpoint(zoo / t)
        load({n: ck.get(n) for n in base_sd if n in ck})
        s = test_scores([t])
        individual[t] = s["acc"][t]
        individual_official.update(s["official"])
    rows["individual fine-tuned"] = {"acc": individual, "official": individual_official}
    models = [zoo / t for t in tasks]

    def at(merged: dict, lam: float) -> None:
        load({n: base_sd[n].float() + lam * d for n, d in merged.items()})

    def dev() -> float:
        s = score("dev")
        return sum(s.values()) / len(s)

    for row, (method, params) in (MERGES if merges is None else merges).items():
        if method == "linear":
            start = time.perf_counter()
            load(merged_deltas(zoo / "base", models, method, params, device))
            rows[row] = {**test_scores(), "method": method, "merge_seconds": time.perf_counter() - start}
            continue
        chosen = tune_merge(zoo / "base", models, method, settings(row, method, params, quick), device, at, dev,
                            lambdas)
        rows[row] = {**test_scores(), "method": method, **chosen}
        if not quiet:
            acc = rows[row]["acc"]  # the test score too, so that a log cut off by a time limit still has it
            console.print(f"[bench merge] {row}: {chosen['params']}, λ = {chosen['lambda']} (dev "
                          f"{chosen['dev']:.4f}, test {sum(acc.values()) / len(acc):.4f}, "
                          f"{chosen['merge_seconds']:.1f} s)")
    for r in rows.values():
        accs = r["acc"]
        r["avg"] = sum(accs.values()) / len(accs)
        r["normalized_avg"] = sum(accs[t] / individual[t] for t in accs) / len(accs)
    return {"zoo": "minilm-8task", "zoo_dir": str(zoo), "tasks": tasks, "metric": "test accuracy",
            "official_metrics": official_metrics(evals["test"]),
            "dev_limit": dev_limit, "test_limit": test_limit, "lambdas": list(lambdas), "device": device,
            "quick": quick, "seconds": time.perf_counter() - t0, "rows": rows}


def official_metrics(evaluators: dict) -> dict[str, str]:
    """{task: metric} of the tasks whose official metric is not accuracy (``TaskEvaluator.metric``)."""
    return {t: ev.metric for t, ev in evaluators.items() if ev.metric != "accuracy"}


def task_columns(tasks: list[str], official: dict[str, str]) -> list[str]:
    """Each task's accuracy column, followed by its official metric's where that is not accuracy."""
    from compress.eval.metrics import LABELS

    return [c for t in tasks for c in ([t, f"{t} {LABELS[official[t]]}"] if t in official else [t])]


def task_cells(row: dict, tasks: list[str], official: dict[str, str]) -> list[str]:
    """The cells of ``task_columns``, in %: accuracy, then the official metric (MCC, F1) × 100."""
    cells = []
    for t in tasks:
        cells.append(f"{100 * row['acc'][t]:.1f}" if t in row["acc"] else "")
        if t in official:
            v = row.get("official", {}).get(t)
            cells.append("" if v is None else f"{100 * v:.1f}")
    return cells


def lambda_cell(row: dict) -> str:
    """λ as chosen, "learned" for AdaMerging, with the chosen setting (rank, common, lr) beside it."""
    if "lambda" not in row:
        return ""
    lam = "learned" if row.get("method") in LEARNED else f"{row['lambda']:g}"
    extra = ", ".join(f"{k} {v:g}" for k, v in (row.get("params") or {}).items() if k not in ("density", "steps"))
    return f"{lam} ({extra})" if extra else lam


def seconds_cell(row: dict) -> str:
    return f"{row['merge_seconds']:.1f}" if "merge_seconds" in row else ""


def markdown_minilm(report: dict) -> str:
    tasks = report["tasks"]
    official = report.get("official_metrics", {})
    head = ["method", *task_columns(tasks, official), "avg", "normalized avg", "λ", "merge s"]
    note = (" Beside a task's accuracy, its official metric × 100 where it is not accuracy (MCC for CoLA, F1 of "
            "label 1 for MRPC); avg and normalized average accuracies." if official else "")
    lines = [f"# compress bench merge — {report['zoo']}", "",
             f"Test accuracy (%) per task with each task's own head; λ chosen on dev "
             f"({report['dev_limit'] or 'all'} rows per task); normalized = accuracy ÷ individual accuracy.{note}",
             "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in report["rows"].items():
        cells = task_cells(r, tasks, official)
        lines.append("| " + " | ".join([name, *cells, f"{100 * r['avg']:.1f}", f"{100 * r['normalized_avg']:.1f}",
                                        lambda_cell(r), seconds_cell(r)]) + " |")
    quick = " Quick settings (--quick: 3 λ, no setting grid, few optimiser steps): a smoke run, not the table." \
        if report.get("quick") else ""
    lines += ["", f"device {report['device']}, {report['seconds']:.0f} s; merge s: one merge of the chosen setting "
              f"(reading the checkpoints included; AdaMerging's includes its learning).{quick}", ""]
    return "\n".join(lines)


# -- plotting and the entry point ------------------------------------------------------------------------

def plot(report: dict, path: Path, metric_key: str = "acc", title: str = "") -> Optional[Path]:
    """A grouped bar chart: one group per column, one bar per row. None when matplotlib is missing."""
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    rows = report["rows"]
    cols = list(report.get("columns") or report["tasks"]) + ["avg"]
    names = list(report.get("plot_rows") or rows)
    fig, ax = plt.subplots(figsize=(min(14, max(8, 0.5 * len(cols) * len(names) / 3)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [rows[name][metric_key].get(c, float("nan")) if c != "avg" else rows[name]["avg"] for c in cols]
        ax.bar([j + i * width for j in range(len(cols))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=30)
    ax.set_title(title or f"compress bench merge — {report['zoo']}")
    ax.set_ylabel(report.get("plot_ylabel", "test accuracy"))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(report: dict, results: Path, md: str) -> dict[str, Path]:
    results.mkdir(parents=True, exist_ok=True)
    stem = f"merge_{report['zoo']}"
    paths = {"json": results / f"{stem}.json", "md": results / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(md)
    png = plot(report, results / f"{stem}.png", metric_key=report.get("plot_key", "acc"))
    if png is not None:
        paths["png"] = png
    return paths
