"""``compress bench nps minilm-8task``: NPS-Pruning against the sparsification baselines and the merging methods,
on the zoo's real fine-tuned models, plus what the search costs.

Three parts (``--parts``), each resumable (a result already in ``RESULTS/nps_minilm-8task.json`` is kept, so a
long run can be split over several calls with ``--tasks``/``--densities``):

* ``compress``: per task and density, test accuracy of the task's encoder with its task vector sparsified by
  magnitude top-k per tensor (PEFT's ``magnitude_based_pruning``), the same with each tensor's L1 norm restored
  (mergekit's rescale), DARE (random keep, ÷ density, drawn per (seed, tensor name)) and NPS (``compress.search``;
  searched on the task's dev rows, scored once on test); and each as a % of the individual model's accuracy.
* ``merge``: NPS merging of all tasks' vectors (λ per task and shared part weights searched on the mean dev
  objective) against ``compress bench merge``'s rows (task arithmetic, TIES, DARE-TIES with λ chosen on dev),
  computed in the same run with the same heads, dev rows and test splits; like that table, with each task's
  official metric beside its accuracy where it is not accuracy (MCC for CoLA, F1 for MRPC).
* ``cost``: one task at one density, seconds and dev/test outcome as M and the budget vary.

Writes ``nps_minilm-8task.json``, ``.md`` and ``.png`` (normalized accuracy against density) into ``results``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.progress import console

DENSITIES = (0.1, 0.05, 0.02, 0.01, 0.005)
BASELINES = ("magnitude", "magnitude+l1", "dare")
STEM = "nps_minilm-8task"


def baseline_delta(layout, tau: torch.Tensor, method: str, density: float, seed: int = 0) -> torch.Tensor:
    """A baseline's sparsified flat τ, tensor by tensor through ``compress.merge.methods.sparsify_delta``."""
    from compress.merge.methods import sparsify_delta
    from compress.sparsify.masks import random_mask, seeded_generator

    out = torch.empty_like(tau)
    for _, name, sl, shape in layout.slices():
        t = tau[sl].reshape(shape)
        if method == "magnitude":
            d = sparsify_delta(t, "magnitude", density)
        elif method == "magnitude+l1":
            d = sparsify_delta(t, "magnitude", density, rescale="l1")
        elif method == "dare":
            # `compress extract --method random`'s draws (torch.rand < density per (seed, name)), ÷ density
            d = t * random_mask(t, density, seeded_generator(seed, name)) / density
        else:
            raise CompressError(f"unknown baseline '{method}'")
        out[sl] = d.reshape(-1)
    return out


class _Zoo:
    """The encoder on the device, tokenizer, heads, and per task: flat τ, dev objective, test evaluator."""

    def __init__(self, zoo: Path, tasks: list[str], device: str, dev_limit: Optional[int], test_limit, search):
        from compress.eval.classify import TaskEvaluator, load_encoder, load_heads
        from compress.io.reader import open_checkpoint
        from compress.search.nps import ModelSetter, load_flat
        from compress.search.objective import TaskObjective

        self.heads = load_heads(zoo, tasks)
        self.encoder, tok = load_encoder(zoo / "base", device=device)
        base = open_checkpoint(zoo / "base")
        self.layout, self.base_flat, taus = load_flat(base, [zoo / t for t in tasks], device,
                                                       names=set(self.encoder.state_dict()))
        self.tau = dict(zip(tasks, taus))
        self.setter = ModelSetter(self.encoder, self.layout, self.base_flat)
        self.dev, self.test, self.individual, self.individual_dev, self.individual_official = {}, {}, {}, {}, {}
        for t in tasks:
            h = self.heads[t]
            ev = TaskEvaluator(h.task_ref, "dev", tokenizer=tok, limit=dev_limit, max_length=h.max_length)
            self.dev[t] = TaskObjective(ev, h, self.encoder, search.objective, search.batch_size)
            self.test[t] = TaskEvaluator(h.task_ref, "test", tokenizer=tok, limit=test_limit, max_length=h.max_length,
                                         batch_size=256)
            self.setter(self.tau[t])
            self.dev[t].set_reference(self.encoder)
            self.individual_dev[t] = self.dev[t].metrics(self.encoder)["acc"]
            res = self.test_eval(t)
            self.individual[t] = res.accuracy
            if res.metric != "accuracy":
                self.individual_official[t] = res.official
        self.setter(None)

    def test_eval(self, task: str):
        return self.test[task].evaluate(self.encoder, self.heads[task])

    def test_acc(self, task: str) -> float:
        return self.test_eval(task).accuracy


def _search(zoo: _Zoo, taus: list[torch.Tensor], density: float, search, objective, budget=None, parts=None):
    from compress.search.nps import NpsProblem
    from compress.search.nps import search as nps_search

    space = search if parts is None else search.model_copy(update={"parts": parts})
    problem = NpsProblem(zoo.layout, taus, density, space)
    res = nps_search(problem, zoo.setter, objective, optimizer=search.optimizer, budget=budget or search.budget,
                     sigma0=search.sigma0, popsize=search.popsize, seed=search.seed)
    return problem, res


def run_compress(zoo: _Zoo, report: dict, tasks, densities, search, quiet, save=None) -> None:
    rows = report.setdefault("compress", {})
    for t in tasks:
        for d in densities:
            key = f"{t}@{d:g}"
            have = rows.get(key, {})
            for method in BASELINES:
                if method in have:
                    continue
                zoo.setter(baseline_delta(zoo.layout, zoo.tau[t], method, d, search.seed))
                have[method] = {"acc": zoo.test_acc(t)}
            if "nps" not in have:
                problem, res = _search(zoo, [zoo.tau[t]], d, search, zoo.dev[t])
                have["nps"] = {"acc": zoo.test_acc(t), "dev": res.dev, "start_value": res.start_value,
                               "value": res.value, "lambdas": res.lambdas, "weights": res.weights,
                               "seconds": res.seconds, "evaluations": res.evaluations,
                               "history": [{k: h[k] for k in ("i", "phase", "value", "acc", "seconds") if k in h}
                                           for h in res.history]}
            for m in have.values():
                m["pct"] = 100 * m["acc"] / zoo.individual[t]
            rows[key] = {**have, "task": t, "density": d}
            zoo.setter(None)
            if save is not None:
                save()
            if not quiet:
                console.print(f"[bench nps] {key}: " + ", ".join(f"{m} {100 * have[m]['acc']:.1f}"
                                                                 for m in (*BASELINES, "nps")), highlight=False)


def run_merge(zoo_dir: Path, zoo: _Zoo, report: dict, tasks, search, density, budget, device, dev_limit,
              test_limit, quiet):
    from compress.bench.merge_zoo import run_minilm
    from compress.search.objective import MeanObjective

    if "merge" in report:
        return
    ref = run_minilm(zoo_dir, device=device, dev_limit=dev_limit, test_limit=test_limit, quiet=True)
    rows = {name: {"acc": {t: r["acc"][t] for t in tasks}, "lambda": r.get("lambda"),
                   "official": {t: v for t, v in r["official"].items() if t in tasks}}
            for name, r in ref["rows"].items() if name in ("task arithmetic", "TIES", "DARE-TIES")}
    taus = [zoo.tau[t] for t in tasks]
    for t in tasks:
        zoo.dev[t].kind = search.objective
    problem, res = _search(zoo, taus, density, search, MeanObjective([zoo.dev[t] for t in tasks]), budget=budget)
    scored = {t: zoo.test_eval(t) for t in tasks}
    rows["NPS"] = {"acc": {t: r.accuracy for t, r in scored.items()},
                   "official": {t: r.official for t, r in scored.items() if r.metric != "accuracy"},
                   "lambdas": res.lambdas, "weights": res.weights,
                   "density": density, "seconds": res.seconds, "evaluations": res.evaluations,
                   "dev_mean_acc": res.dev.get("mean_acc"), "start_value": res.start_value, "value": res.value}
    zoo.setter(None)
    rows["individual"] = {"acc": dict(zoo.individual),
                          "official": {t: v for t, v in zoo.individual_official.items() if t in tasks}}
    rows["NPS"]["objective"] = search.objective
    for r in rows.values():
        r["avg"] = sum(r["acc"].values()) / len(tasks)
        r["normalized_avg"] = sum(r["acc"][t] / zoo.individual[t] for t in tasks) / len(tasks)
    report["merge"] = {"tasks": tasks, "official_metrics": {t: m for t, m in ref["official_metrics"].items()
                                                            if t in tasks},
                       "rows": rows, "baseline_seconds": ref["seconds"]}
    if not quiet:
        console.print("[bench nps] merge: " + ", ".join(f"{k} {100 * r['avg']:.1f}" for k, r in rows.items()))


def run_cost(zoo: _Zoo, report: dict, task: str, density: float, search, ms, budgets, quiet) -> None:
    rows = report.setdefault("cost", {})
    combos = [(m, search.budget) for m in ms] + [(search.parts, b) for b in budgets]
    for m, b in combos:
        key = f"{task}@{density:g} M={m} budget={b}"
        if key in rows:
            continue
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        problem, res = _search(zoo, [zoo.tau[task]], density, search, zoo.dev[task], budget=b, parts=m)
        rows[key] = {"task": task, "density": density, "M": m, "budget": b, "seconds": res.seconds,
                     "seconds_per_eval": res.seconds / res.evaluations, "evaluations": res.evaluations,
                     "start_value": res.start_value, "value": res.value, "dev_acc": res.dev["acc"],
                     "test_acc": zoo.test_acc(task)}
        zoo.setter(None)
        if not quiet:
            r = rows[key]
            console.print(f"[bench nps] cost {key}: {r['seconds']:.1f} s, dev value {r['value']:.4f}, "
                          f"test {100 * r['test_acc']:.1f}", highlight=False)


def markdown(report: dict) -> str:
    lines = ["# compress bench nps — minilm-8task", "",
             f"device {report.get('device')}; search: {json.dumps(report.get('search', {}))}", ""]
    comp = report.get("compress", {})
    if comp:
        lines += ["## Compression: test accuracy (%) and % of the individual model", "",
                  "| task | density | individual | magnitude | magnitude+l1 | DARE | NPS | NPS − best baseline | "
                  "NPS search s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in comp.items():
            t = r["task"]
            ind = 100 * report["individual"][t]
            cells = [f"{100 * r[m]['acc']:.1f} ({r[m]['pct']:.1f}%)" for m in (*BASELINES, "nps")]
            best = max(r[m]["acc"] for m in BASELINES)
            lines.append(f"| {t} | {r['density']:g} | {ind:.1f} | " + " | ".join(cells) +
                         f" | {100 * (r['nps']['acc'] - best):+.1f} | {r['nps']['seconds']:.1f} |")
        lines += ["", "Mean % of individual accuracy over tasks:", "",
                  "| density | magnitude | magnitude+l1 | DARE | NPS |", "|---:|---:|---:|---:|---:|"]
        for d in sorted({r["density"] for r in comp.values()}, reverse=True):
            rs = [r for r in comp.values() if r["density"] == d]
            lines.append(f"| {d:g} | " + " | ".join(f"{sum(r[m]['pct'] for r in rs) / len(rs):.1f}"
                                                   for m in (*BASELINES, "nps")) + f" |  ({len(rs)} tasks)")
        lines.append("")
    mg = report.get("merge")
    if mg:
        from compress.bench.merge_zoo import task_cells, task_columns

        tasks, official = mg["tasks"], mg.get("official_metrics", {})
        cols = task_columns(tasks, official)
        lines += ["## Merging: test accuracy (%), same heads and splits" +
                  (" (and official metrics × 100 beside accuracy: MCC, F1)" if official else ""), "",
                  "| method | " + " | ".join(cols) + " | avg | normalized |",
                  "|---|" + "---:|" * (len(cols) + 2)]
        for name, r in mg["rows"].items():
            lines.append(f"| {name} | " + " | ".join(task_cells(r, tasks, official)) +
                         f" | {100 * r['avg']:.1f} | {100 * r['normalized_avg']:.1f} |")
        nps = mg["rows"]["NPS"]
        lines += ["", f"NPS merge: density {nps['density']:g}, λ {[round(v, 3) for v in nps['lambdas']]}, "
                      f"{nps['evaluations']} evaluations in {nps['seconds']:.1f} s.", ""]
    cost = report.get("cost")
    if cost:
        lines += ["## Search cost", "", "| task | density | M | budget | evaluations | seconds | s/eval | "
                  "start value | best value | dev acc | test acc |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cost.values():
            lines.append(f"| {r['task']} | {r['density']:g} | {r['M']} | {r['budget']} | {r['evaluations']} | "
                         f"{r['seconds']:.1f} | {r['seconds_per_eval']:.3f} | {r['start_value']:.4f} | "
                         f"{r['value']:.4f} | {100 * r['dev_acc']:.1f} | {100 * r['test_acc']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Optional[Path]:
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    comp = report.get("compress", {})
    if not comp:
        return None
    ds = sorted({r["density"] for r in comp.values()})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in (*BASELINES, "nps"):
        ys = []
        for d in ds:
            rs = [r for r in comp.values() if r["density"] == d]
            ys.append(sum(r[m]["pct"] for r in rs) / len(rs))
        ax.plot(ds, ys, marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("density (fraction of τ kept)")
    ax.set_ylabel("% of individual accuracy (mean over tasks)")
    ax.set_title("compress bench nps — minilm-8task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(zoo_root: Path = Path("checkpoints/zoo"), results: Path = Path("checkpoints/bench"), *,
        device: str = "cpu", tasks: Optional[list[str]] = None, densities=DENSITIES,
        parts=("compress", "merge", "cost"), search=None, merge_search=None, merge_density: float = 0.2,
        merge_budget: Optional[int] = None, cost_task: Optional[str] = None, cost_density: float = 0.01,
        cost_ms=(2, 4, 8, 16), cost_budgets=(30, 60, 120, 240), dev_limit: Optional[int] = 500,
        test_limit: Optional[int] = None, quiet: bool = False) -> dict:
    from compress.config import NpsSearch
    from compress.eval.classify import load_heads

    search = search or NpsSearch(dev_limit=dev_limit)
    zoo_dir = zoo_root / "minilm-8task"
    if not (zoo_dir / "base").is_dir():
        raise CompressError(f"{zoo_dir}: no base/ folder; build it with `compress zoo build minilm-8task`")
    all_tasks = list(load_heads(zoo_dir))
    tasks = tasks or all_tasks
    bad = [t for t in tasks if t not in all_tasks]
    if bad:
        raise CompressError(f"task '{bad[0]}' is not built in {zoo_dir} (built: {', '.join(all_tasks)})")
    bad = [p for p in parts if p not in ("compress", "merge", "cost")]
    if bad:
        raise CompressError(f"--parts: unknown part '{bad[0]}' (choose compress, merge, cost)")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{STEM}.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    t0 = time.perf_counter()
    use = all_tasks if "merge" in parts else tasks
    zoo = _Zoo(zoo_dir, use, device, search.dev_limit, test_limit, search)
    report.update(device=device, search=search.model_dump(), dev_limit=search.dev_limit, test_limit=test_limit)
    report.setdefault("individual", {}).update(zoo.individual)
    if "compress" in parts:
        run_compress(zoo, report, tasks, densities, search, quiet, save=lambda: _save(report, results, png=False))
        _save(report, results)
    if "merge" in parts:
        run_merge(zoo_dir, zoo, report, all_tasks, merge_search or search, merge_density, merge_budget, device,
                  search.dev_limit, test_limit, quiet)
        _save(report, results)
    if "cost" in parts:
        run_cost(zoo, report, cost_task or tasks[0], cost_density, search, cost_ms, cost_budgets, quiet)
    report.setdefault("seconds", {})[",".join(parts) + ":" + ",".join(tasks)] = time.perf_counter() - t0
    paths = _save(report, results)
    print(markdown(report))
    console.print(f"[bench nps] wrote {', '.join(str(p) for p in paths)}")
    return report


def _save(report: dict, results: Path, png: bool = True) -> list[Path]:
    js, md = results / f"{STEM}.json", results / f"{STEM}.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    out = [js, md]
    png = plot(report, results / f"{STEM}.png") if png else None
    if png is not None:
        out.append(png)
    return out
