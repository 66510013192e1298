"""``compress bench nps minilm-8task``: NPS-Pruning against the sparsification baselines and the merging methods,
on the zoo's real fine-tuned models, plus what the search costs.

Three parts (``--parts``), each resumable (a result already in ``RESULTS/nps_minilm-8task.json`` is kept, so a
long run can be split over several calls with ``--tasks``/``--densities``):

* ``compress``: per task and density, test accuracy of the task's encoder with its task vector sparsified by
  magnitude top-k per tensor (PEFT's ``magnitude_based_pruning``), the same with each tensor's L1 norm restored
  (mergekit's rescale), DARE (random keep, ÷ density, drawn per (seed, tensor name)) and NPS (``compress.search``;
  searched on the task's dev rows, scored once on test); and each as a % of the individual model's accuracy.
* ``merge``: the NPS merge protocol (``compress.search.protocol``) over all tasks' vectors, per seed: dev split
  into a search half and a validation half, TIES (λ on the search half) as start and anchor, every candidate
  setting (``MergeProtocol``: grouping, M, regularization strength, budget) searched on the search half and
  chosen on the validation half, kept only where it beats TIES there, else TIES with λ tuned on dev; mean ± sd
  over the seeds of the answer, of the search's own point and of TIES on the same splits, against ``compress
  bench merge``'s rows (task arithmetic, TIES, DARE-TIES with λ chosen on dev), computed in the same run with the
  same heads, dev rows and test splits; like that table, with each task's official metric beside its accuracy
  where it is not accuracy (MCC for CoLA, F1 for MRPC).
* ``cost``: one task at one density, seconds and dev/test outcome as M and the budget vary.

Writes ``nps_minilm-8task.json``, ``.md`` and ``.png`` (normalized accuracy against density) into ``results``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.progress import console
from compress.search.protocol import TIES_LAMBDAS

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
        self.dev_eval = {}
        for t in tasks:
            h = self.heads[t]
            ev = self.dev_eval[t] = TaskEvaluator(h.task_ref, "dev", tokenizer=tok, limit=dev_limit,
                                                  max_length=h.max_length)
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


@dataclass(frozen=True)
class MergeProtocol:
    """The settings of the NPS merge protocol (``compress.search.protocol``) that the bench chooses among on the
    validation half of dev, per seed: each (grouping, M, strength) is searched with ``budget`` evaluations, its
    budget chosen among ``checkpoints``. Defaults: what a dev-only sweep chose (``compress/bench/README.md``)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    groupings: tuple[str, ...] = ("layer",)
    ms: tuple[int, ...] = (1,)
    strengths: tuple[float, ...] = (0.0, 1.0)
    budget: int = 200
    checkpoints: tuple[int, ...] = (50, 100)
    margin: float = 0.0
    lambdas: tuple[float, ...] = TIES_LAMBDAS  # TIES' λ grid, on the search half and on the whole dev split

    def __post_init__(self):
        import math

        checks = [(self.seeds, "--merge-seeds: give at least one seed"),
                  (self.groupings and all(g in ("none", "layer", "module") for g in self.groupings),
                   f"--merge-grouping: {', '.join(self.groupings) or 'nothing'}; choose among none, layer, module"),
                  (self.ms and all(1 <= m <= 64 for m in self.ms), "--merge-m: each M in [1, 64]"),
                  (self.strengths and all(math.isfinite(v) and v >= 0 for v in self.strengths),
                   "--merge-strength: each strength a finite number >= 0"),
                  (self.budget >= 2, "--merge-budget: at least 2 evaluations"),
                  (all(2 <= b <= self.budget for b in self.checkpoints),
                   f"--merge-checkpoints: each in [2, --merge-budget {self.budget}]"),
                  (math.isfinite(self.margin) and self.margin >= 0, "--merge-margin: a number >= 0"),
                  (self.lambdas and all(math.isfinite(v) and v > 0 for v in self.lambdas),
                   "--merge-lambdas: each λ a finite number > 0")]
        for ok, msg in checks:
            if not ok:
                raise CompressError(msg)


def _halves(zoo: _Zoo, tasks, seed: int, search):
    """(search half, validation half) objectives: each task's dev rows split by (seed, task), each half with its
    own fine-tuned reference (the KL of the objective)."""
    from compress.search.objective import MeanObjective, TaskObjective
    from compress.search.protocol import split_halves

    halves: tuple[list, list] = ([], [])
    for t in tasks:
        ev = zoo.dev_eval[t]
        zoo.setter(zoo.tau[t])
        for half, rows in zip(halves, split_halves(len(ev.data), seed, t)):
            o = TaskObjective(ev, zoo.heads[t], zoo.encoder, search.objective, search.batch_size, rows=rows)
            o.set_reference(zoo.encoder)
            half.append(o)
    zoo.setter(None)
    return MeanObjective(halves[0]), MeanObjective(halves[1])


def _scores(zoo: _Zoo, tasks, delta) -> dict:
    zoo.setter(delta)
    res = {t: zoo.test_eval(t) for t in tasks}
    acc = {t: r.accuracy for t, r in res.items()}
    return {"acc": acc, "official": {t: r.official for t, r in res.items() if r.metric != "accuracy"},
            "avg": sum(acc.values()) / len(acc),
            "normalized_avg": sum(acc[t] / zoo.individual[t] for t in tasks) / len(tasks)}


PROTOCOL_ROWS = ("NPS protocol", "NPS search", "TIES (λ on search half)", "TIES (λ on dev)")


def run_protocol_seed(zoo: _Zoo, tasks, search, density: float, proto: MergeProtocol, seed: int,
                      quiet: bool = True) -> dict:
    """One seed of the protocol: every candidate setting searched on the search half, the best on validation
    kept if it beats TIES there; test scores of the answer, of the search's point, and of TIES on these splits."""
    from compress.search.nps import NpsProblem
    from compress.search.nps import search as nps_search
    from compress.search.objective import MeanObjective
    from compress.search.protocol import merge_protocol

    for t in tasks:
        zoo.dev[t].kind = search.objective
    dev = MeanObjective([zoo.dev[t] for t in tasks])
    s_obj, v_obj = _halves(zoo, tasks, seed, search)
    taus = [zoo.tau[t] for t in tasks]
    t0 = time.perf_counter()
    cands, tuned = [], {}  # TIES is the same point in every candidate's space: tuned once per split
    for grouping in proto.groupings:
        for m in proto.ms:
            space = search.model_copy(update={"grouping": grouping, "parts": m, "combine": "ties", "select": "topk",
                                              "rescale": "none", "task_weights": "per_task", "seed": seed})
            problem = NpsProblem(zoo.layout, taus, density, space)
            for strength in proto.strengths:
                r = merge_protocol(problem, zoo.setter, s_obj, v_obj, dev, run_search=nps_search, strength=strength,
                                   budget=proto.budget,
                                   checkpoints=proto.checkpoints, optimizer=search.optimizer, sigma0=search.sigma0,
                                   popsize=search.popsize, seed=seed, margin=proto.margin, tuned=tuned,
                                   lambdas=proto.lambdas)
                cands.append(({"grouping": grouping, "M": m, "strength": strength}, problem, r))
                if not quiet:
                    console.print(f"[bench nps] merge seed {seed} {cands[-1][0]}: validation TIES "
                                  f"{100 * r.validation['ties']:.2f}, NPS {100 * r.validation['nps']:.2f} "
                                  f"(budget {r.budget}) → {r.chosen}", highlight=False)
    seconds = time.perf_counter() - t0
    # the first listed of the best on validation; it beats TIES there exactly when any candidate does
    setting, problem, best = max(cands, key=lambda c: c[2].validation["nps"])
    point = lambda lam: problem.delta(problem.point([lam] * problem.K))  # noqa: E731
    rows = {"NPS protocol": _scores(zoo, tasks, best.delta),
            "NPS search": _scores(zoo, tasks, problem.delta(best.search.best_at[best.budget])),
            "TIES (λ on search half)": _scores(zoo, tasks, point(best.ties_lambda_search)),
            "TIES (λ on dev)": _scores(zoo, tasks, point(best.ties_lambda_dev))}
    zoo.setter(None)
    return {"seed": seed, "chosen": best.chosen, "setting": setting, "seconds": seconds, **best.as_dict(),
            "candidates": [{**c[0], "validation": c[2].validation, "budget": c[2].budget, "chosen": c[2].chosen,
                            "seconds": c[2].search.seconds} for c in cands],
            "rows": rows}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def summarize_protocol(runs: list[dict], tasks) -> dict:
    """Per row of ``PROTOCOL_ROWS``: accuracy per task and official metrics averaged over seeds, and the mean and
    sd (n − 1) over seeds of the average and normalized accuracy."""
    out = {}
    for name in PROTOCOL_ROWS:
        rs = [r["rows"][name] for r in runs]
        avg, sd = _mean_sd([r["avg"] for r in rs])
        norm, norm_sd = _mean_sd([r["normalized_avg"] for r in rs])
        out[name] = {"acc": {t: sum(r["acc"][t] for r in rs) / len(rs) for t in tasks},
                     "official": {t: sum(r["official"][t] for r in rs) / len(rs) for t in rs[0]["official"]},
                     "avg": avg, "avg_sd": sd, "normalized_avg": norm, "normalized_sd": norm_sd, "seeds": len(rs)}
    return out


def run_merge(zoo_dir: Path, zoo: _Zoo, report: dict, tasks, search, density, proto: MergeProtocol, device,
              dev_limit, test_limit, quiet, save=None):
    """The merge table: ``compress bench merge``'s rows (same heads, dev rows and test splits) and the NPS protocol
    over ``proto.seeds`` (resumable seed by seed)."""
    from compress.bench.merge_zoo import MERGES, run_minilm

    baselines = ("task arithmetic", "TIES", "DARE-TIES")

    mg = report.get("merge", {})
    same = (mg.get("protocol"), mg.get("tasks"), mg.get("density")) == (json.loads(json.dumps(asdict(proto))), tasks,
                                                                      density)
    if not same:
        mg = {}  # other settings: start again
    if "baselines" not in mg:
        # only the rows this table shows: the other merge rows (subspace, AdaMerging) are `bench merge`'s
        ref = run_minilm(zoo_dir, device=device, dev_limit=dev_limit, test_limit=test_limit, quiet=True,
                         merges={k: MERGES[k] for k in baselines})
        rows = {name: {"acc": {t: r["acc"][t] for t in tasks}, "lambda": r.get("lambda"),
                       "official": {t: v for t, v in r["official"].items() if t in tasks}}
                for name, r in ref["rows"].items() if name in baselines}
        rows["individual"] = {"acc": {t: zoo.individual[t] for t in tasks},
                              "official": {t: v for t, v in zoo.individual_official.items() if t in tasks}}
        for r in rows.values():
            r["avg"] = sum(r["acc"].values()) / len(tasks)
            r["normalized_avg"] = sum(r["acc"][t] / zoo.individual[t] for t in tasks) / len(tasks)
        mg = {"tasks": tasks, "density": density, "protocol": asdict(proto), "objective": search.objective,
              "official_metrics": {t: m for t, m in ref["official_metrics"].items() if t in tasks},
              "baselines": rows, "baseline_seconds": ref["seconds"], "runs": []}
        report["merge"] = mg
        if save is not None:
            save()  # the baselines survive a run stopped before its first seed
    report["merge"] = mg
    done = {r["seed"] for r in mg["runs"]}
    for seed in proto.seeds:
        if seed in done:
            continue
        mg["runs"].append(run_protocol_seed(zoo, tasks, search, density, proto, seed, quiet))
        mg["summary"] = summarize_protocol(mg["runs"], tasks)
        if save is not None:
            save()
        if not quiet:
            r = mg["runs"][-1]
            console.print(f"[bench nps] merge seed {seed}: chose {r['chosen']} ({r['setting']}); test avg "
                          + ", ".join(f"{k} {100 * v['avg']:.2f}" for k, v in r["rows"].items()), highlight=False)
    mg["summary"] = summarize_protocol(mg["runs"], tasks)


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
    if mg and mg.get("summary"):
        lines += merge_markdown(mg)
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


def merge_markdown(mg: dict) -> list[str]:
    from compress.bench.merge_zoo import task_cells, task_columns

    tasks, official = mg["tasks"], mg.get("official_metrics", {})
    cols = task_columns(tasks, official)
    p = mg["protocol"]
    n = len(mg["runs"])
    lines = ["## Merging: test accuracy (%), same heads and splits" +
             (" (and official metrics × 100 beside accuracy: MCC, F1)" if official else ""), "",
             f"NPS merge protocol (`compress.search.protocol`), density {mg['density']:g}, objective "
             f"{mg['objective']}: dev split per seed into a search half and a validation half; TIES (λ tuned on the "
             f"search half) is the start and the anchor; settings (grouping {p['groupings']}, M {p['ms']}, "
             f"strength {p['strengths']}, budget {p['checkpoints']} or {p['budget']}) chosen on the validation "
             "half; kept only if it beats TIES there, else TIES with λ tuned on all of dev. Rows of the protocol "
             f"are means over {n} seed(s); ± is the sd over seeds.", "",
             "| method | " + " | ".join(cols) + " | avg | normalized |", "|---|" + "---:|" * (len(cols) + 2)]
    for name, r in mg["baselines"].items():
        lines.append(f"| {name} | " + " | ".join(task_cells(r, tasks, official)) +
                     f" | {100 * r['avg']:.1f} | {100 * r['normalized_avg']:.1f} |")
    for name, r in mg["summary"].items():
        lines.append(f"| {name} | " + " | ".join(task_cells(r, tasks, official)) +
                     f" | {100 * r['avg']:.2f} ± {100 * r['avg_sd']:.2f} | {100 * r['normalized_avg']:.2f} ± "
                     f"{100 * r['normalized_sd']:.2f} |")
    lines += ["", "Per seed (validation = mean accuracy on the validation half; test = average test accuracy):", "",
              "| seed | chosen | setting | budget | TIES λ (search half / dev) | validation TIES | validation NPS | "
              "test: protocol | NPS search | TIES (search-half λ) | TIES (dev λ) | search s |",
              "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in mg["runs"]:
        st = r["setting"]
        v, rows = r["validation"], r["rows"]
        lines.append(f"| {r['seed']} | {r['chosen']} | {st['grouping']}, M {st['M']}, strength {st['strength']:g} | "
                     f"{r['budget']} | {r['ties_lambda_search']:g} / {r['ties_lambda_dev']:g} | "
                     f"{100 * v['ties']:.2f} | {100 * v['nps']:.2f} | " +
                     " | ".join(f"{100 * rows[k]['avg']:.2f}" for k in PROTOCOL_ROWS) + f" | {r['seconds']:.0f} |")
    lines += ["", "Candidates (validation mean accuracy, by budget):", "",
              "| seed | grouping | M | strength | validation TIES | " +
              " | ".join(f"NPS @ {b}" for b in sorted({*p["checkpoints"], p["budget"]})) + " |",
              "|---:|---|---:|---:|---:|" + "---:|" * len({*p["checkpoints"], p["budget"]})]
    for r in mg["runs"]:
        for c in r["candidates"]:
            by = c["validation"]["by_budget"]
            lines.append(f"| {r['seed']} | {c['grouping']} | {c['M']} | {c['strength']:g} | "
                         f"{100 * c['validation']['ties']:.2f} | " +
                         " | ".join(f"{100 * by[str(b)]:.2f}" if str(b) in by else ""
                                    for b in sorted({*p["checkpoints"], p["budget"]})) + " |")
    return lines + [""]


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
        merge_protocol: Optional[MergeProtocol] = None, cost_task: Optional[str] = None, cost_density: float = 0.01,
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
        run_merge(zoo_dir, zoo, report, all_tasks, merge_search or search, merge_density,
                  merge_protocol or MergeProtocol(), device, search.dev_limit, test_limit, quiet,
                  save=lambda: _save(report, results, png=False))
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
