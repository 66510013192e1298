"""``compress bench heads lm-zoo``: does protecting context-recall heads keep recall when the model is pruned?

The lm-zoo recall model is pruned with Wanda (one calibration of the dense model, shared by every row) to the
same overall sparsity four ways: no protection; the top ``top`` fraction of heads by a score (default chd,
computed on probes of the recall task drawn from a held-out seed, never an evaluation prompt) protected; and the
same number of heads chosen at random, once per seed (mean and spread reported). Protected heads keep their q
rows, their KV group's k/v rows and their o_proj columns dense; the rest of each block is pruned harder so that
the measured sparsity over the pruned parameters equals the request (printed for every row). Every row is scored
by context-recall accuracy and hallucination rate on the zoo's held-out ``recall_eval.jsonl``.
Saves ``heads_<zoo>.json``, ``.md`` and ``heads_<zoo>.png`` (the score heatmap, protected heads boxed).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

from compress.config import CALIB_CACHE
from compress.errors import CompressError
from compress.progress import console


def run(zoo: str, *, zoo_root: Path, results: Path, sparsity: float = 0.6, top: float = 0.1, method: str = "chd",
        seeds: int = 5, n_probes: int = 64, nsamples: int = 128, limit: Optional[int] = None, quick: bool = False,
        device: str = "cpu", quiet: bool = False, probe_seed: int = 7) -> dict:
    from compress.eval.recall import recall_eval
    from compress.heads.layout import attention_layout, head_protect
    from compress.heads.probes import encode_text_probe
    from compress.heads.score import score_heads
    from compress.heads.scorefile import draw_heatmap, save_scores
    from compress.heads.select import random_heads, top_heads
    from compress.prune import Pruner
    from compress.zoo.lm import recall_probes

    if zoo != "lm-zoo":
        raise CompressError(f"bench heads: only lm-zoo has a context-recall model (got '{zoo}')")
    if method not in ("chd", "nhar", "sink"):
        raise CompressError(f"bench heads --method {method}: use chd, nhar or sink (scores from the recall model "
                            "alone)")
    root = Path(zoo_root) / zoo
    model_dir, eval_path = root / "recall", root / "recall_eval.jsonl"
    if not (model_dir / "config.json").is_file() or not eval_path.is_file():
        raise CompressError(f"{root}: no recall model or recall_eval.jsonl; build it with `compress zoo build lm-zoo`")
    build = json.loads((root / "build.json").read_text()) if (root / "build.json").is_file() else {}
    quick = quick or bool(build.get("quick", False))
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    pruner = Pruner(model_dir, None, nsamples=nsamples, device=device, quiet=quiet,
                    cache_dir=CALIB_CACHE)
    tok = pruner.tokenizer()
    layout = attention_layout(pruner.model)
    items = recall_probes(n_probes, probe_seed, quick)
    probes = [encode_text_probe(tok, it, method, f"recall probe {i + 1}") for i, it in enumerate(items)]
    t0 = time.perf_counter()
    scores, meta = score_heads(pruner.model, probes, method, layout=layout, quiet=quiet)
    score_seconds = time.perf_counter() - t0
    save_scores(results / f"heads_{zoo}_{method}.safetensors", scores, layout,
                {"method": method, "model": str(model_dir),
                 "probes": f"recall_probes(n={n_probes}, seed={probe_seed})"},
                heatmap=False)

    chosen = top_heads(scores, top)
    rows: list[dict] = []

    def evaluate(label: str, heads: list, kind: str, seed: Optional[int] = None) -> dict:
        protect = head_protect(layout, heads) if heads else None
        r = pruner.prune(sparsity, "wanda", protect=protect) if label != "dense" else None
        pruner.load(r)
        ev = recall_eval(pruner.model, tok, eval_path, limit=limit, device=device)
        pruner.load(None)
        row = {"row": label, "kind": kind, "seed": seed, "heads": heads,
               "sparsity": r.sparsity if r is not None else 0.0,
               "block_sparsity": pruner.layer_sparsity(r) if r is not None else None,
               "accuracy": ev["accuracy"], "hallucination_rate": ev["hallucination_rate"],
               "confusion_rate": ev["confusion_rate"], "prior_rate": ev.get("prior_rate"), "n": ev["n"],
               "by_kind": ev.get("by_kind")}
        rows.append(row)
        console.print(f"{label:<28} sparsity {row['sparsity']:.6f}  recall accuracy {row['accuracy']:.4f}  "
                      f"hallucination {row['hallucination_rate']:.4f}", highlight=False)
        return row

    evaluate("dense", [], "dense")
    evaluate("none", [], "none")
    evaluate(f"top {top:g} {method}", chosen, "top")
    for s in range(seeds):
        evaluate(f"random {top:g} (seed {s})", random_heads(layout.n_layers, layout.n_heads, chosen, s), "random", s)

    rand = [r for r in rows if r["kind"] == "random"]

    def agg(key):
        vals = [r[key] for r in rand]
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals), "max": max(vals)} if vals else None

    report = {"zoo": zoo, "model": str(model_dir), "device": device, "method": method, "sparsity": sparsity,
              "top": top, "heads_protected": len(chosen), "heads_total": layout.n_layers * layout.n_heads,
              "n_probes": n_probes, "probe_seed": probe_seed, "nsamples": nsamples, "seqlen": pruner.seqlen,
              "calib": "wikitext2.valid", "scores": scores.tolist(), "score_meta": meta,
              "score_seconds": score_seconds, "rows": rows,
              "random_mean": {"accuracy": agg("accuracy"), "hallucination_rate": agg("hallucination_rate"),
                              "sparsity": agg("sparsity")},
              "seconds": time.perf_counter() - t_start}
    (results / f"heads_{zoo}.json").write_text(json.dumps(report, indent=1) + "\n")
    draw_heatmap(scores, results / f"heads_{zoo}.png",
                 f"{method} scores of {zoo}/recall; boxed: top {top:g} protected", marked=chosen)
    md = [f"# Head protection on {zoo}: recall model, Wanda {sparsity:g}", "",
          f"{method} scores on {n_probes} held-out probes (seed {probe_seed}); {len(chosen)} of "
          f"{layout.n_layers * layout.n_heads} heads protected (top {top:g}): "
          f"{', '.join(f'{l}.{h}' for l, h in chosen)}; random baseline over {seeds} seeds. Calibration "
          f"{nsamples} × {pruner.seqlen} tokens of wikitext2.valid; recall on {rows[0]['n']} held-out prompts; "
          f"device {device}; {report['seconds']:.0f} s.", "",
          "| row | measured sparsity | recall accuracy | hallucination rate | confusion |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['row']} | {r['sparsity']:.6f} | {r['accuracy']:.4f} | {r['hallucination_rate']:.4f} | "
                  f"{r['confusion_rate']:.4f} |")
    if rand:
        a, h = agg("accuracy"), agg("hallucination_rate")
        md.append(f"| random mean ± sd ({len(rand)} seeds) | {agg('sparsity')['mean']:.6f} | "
                  f"{a['mean']:.4f} ± {a['std']:.4f} | {h['mean']:.4f} ± {h['std']:.4f} | |")
    (results / f"heads_{zoo}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"saved {results / f'heads_{zoo}.json'}, .md and .png")
    return report
