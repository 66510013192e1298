"""``compress bench merge lm-zoo``: the merge table of ``compress.bench.merge_zoo`` on the causal-LM zoo.

Task models: the domain fine-tunes (shakespeare, ptb) and the context-recall fine-tune. Columns: perplexity on
each domain's held-out text (lower is better), perplexity on wikitext2.test (general language, held out from the
whole zoo), context-recall accuracy and hallucination rate on the held-out recall prompts. Each held-out set is cut
in two: the first half is dev (λ is chosen on it), the second half is test (the table). Normalized scores:
individual perplexity ÷ perplexity for the domains, accuracy ÷ individual accuracy for recall, averaged over the
three tasks ("normalized avg", higher is better); λ maximizes that average on dev.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from compress.bench.merge_zoo import LAMBDAS, MERGES, lambda_cell, merged_deltas, seconds_cell, settings, tune_merge
from compress.errors import CompressError
from compress.progress import console

TASKS = ("shakespeare", "ptb", "recall")


def _halves(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, len(text) // 2)
    cut = cut if cut > 0 else len(text) // 2
    return text[:cut], text[cut:]


def heldout_texts(zoo: Path) -> dict[str, str]:
    """{shakespeare, ptb, wikitext2}: the held-out texts of the zoo's build (never trained on)."""
    from compress.zoo.lm import corpora, load_recipe

    build = json.loads((zoo / "build.json").read_text()) if (zoo / "build.json").is_file() else {}
    return corpora(load_recipe(quick=bool(build.get("quick", False))))[1]


def run_lm(zoo: Path, *, device: str = "cpu", dev_limit: Optional[int] = 500, test_limit: Optional[int] = None,
           lambdas=LAMBDAS, quiet: bool = False, max_tokens: int = 32768, seqlen: int = 256,
           quick: bool = False, merges: Optional[dict] = None, batch_size: Optional[int] = None,
           recall_batch_size: Optional[int] = None) -> dict:
    """The lm-zoo table; ``merges``: the merge rows to run (default ``MERGES``, all of them). ``batch_size`` /
    ``recall_batch_size``: perplexity windows / recall prompts per forward (default 8 / 32 on the CPU, 64 / 256 on
    a GPU, where the 31.6 M-parameter zoo model at batch 8 is bound by kernel launches)."""
    from compress.eval.perplexity import load_causal_lm, text_windows, windows_perplexity
    from compress.eval.recall import read_recall_items, recall_eval

    for part in ("base", *TASKS):
        if not (zoo / part / "config.json").is_file():
            raise CompressError(f"{zoo / part}: missing; build it with `compress zoo build lm-zoo`")
    on_gpu = str(device).startswith("cuda")
    batch_size = batch_size or (64 if on_gpu else 8)
    recall_batch_size = recall_batch_size or (256 if on_gpu else 32)
    model, tok = load_causal_lm(zoo / "base", device=device)
    base_sd = {n: t.detach().clone() for n, t in model.state_dict().items()}
    texts = {k: _halves(v) for k, v in heldout_texts(zoo).items()}
    # each half is scored once per λ and setting: tokenized once here
    windows = {k: [text_windows(tok, half, seqlen, max_tokens) for half in v] for k, v in texts.items()}
    items = read_recall_items(zoo / "recall_eval.jsonl")
    half = len(items) // 2
    splits = {"dev": items[:half][:dev_limit] if dev_limit else items[:half],
              "test": items[half:][:test_limit] if test_limit else items[half:]}
    tmp = Path(zoo) / ".bench-recall"
    tmp.mkdir(exist_ok=True)
    recall_files = {}
    for split, rows in splits.items():
        recall_files[split] = tmp / f"{split}.jsonl"
        recall_files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load(weights: dict[str, torch.Tensor]) -> None:
        state = model.state_dict()
        with torch.no_grad():
            for n, t in weights.items():
                if n in state:
                    state[n].copy_(t)

    def score(split: str) -> dict:
        i = 0 if split == "dev" else 1
        out = {f"ppl_{k}": windows_perplexity(model, v[i], batch_size=batch_size, device=device)
               for k, v in windows.items()}
        r = recall_eval(model, tok, recall_files[split], batch_size=recall_batch_size, device=device)
        out.update(recall_accuracy=r["accuracy"], hallucination_rate=r["hallucination_rate"])
        return out

    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    rows["zero-shot"] = {"scores": score("test")}
    individual, individual_dev = {}, {}
    for task in TASKS:
        from compress.io.reader import open_checkpoint

        ck = open_checkpoint(zoo / task)
        load({n: ck.get(n) for n in ck.names()})
        s, d = score("test"), score("dev")
        key = "recall_accuracy" if task == "recall" else f"ppl_{task}"
        individual[task], individual_dev[task] = s[key], d[key]
        rows[f"individual ({task})"] = {"scores": s}

    def normalized(s: dict, ref: dict) -> float:
        parts = [ref["shakespeare"] / s["ppl_shakespeare"], ref["ptb"] / s["ppl_ptb"],
                 s["recall_accuracy"] / max(ref["recall"], 1e-9)]
        return sum(parts) / len(parts)

    models = [zoo / t for t in TASKS]
    # AdaMerging adapts on unlabeled text: the dev halves of the held-out texts (never the test halves)
    adapt_text = tmp / "dev-text.txt"
    adapt_text.write_text("\n".join(v[0] for v in texts.values()))

    def at(merged: dict, lam: float) -> None:
        load({n: base_sd[n].float() + lam * d for n, d in merged.items()})

    for row, (method, params) in (MERGES if merges is None else merges).items():
        if method == "linear":
            start = time.perf_counter()
            load(merged_deltas(zoo / "base", models, method, params, device))
            rows[row] = {"scores": score("test"), "method": method, "merge_seconds": time.perf_counter() - start}
            continue
        fields = {"text": adapt_text} if method == "adamerging" else {}
        chosen = tune_merge(zoo / "base", models, method, settings(row, method, params, quick), device, at,
                            lambda: normalized(score("dev"), individual_dev), lambdas, **fields)
        rows[row] = {"scores": score("test"), "method": method, **chosen}
        if not quiet:
            console.print(f"[bench merge] {row}: {chosen['params']}, λ = {chosen['lambda']} (dev normalized "
                          f"{chosen['dev']:.4f}, {chosen['merge_seconds']:.1f} s)")
    for r in rows.values():
        r["normalized_avg"] = normalized(r["scores"], individual)
    return {"zoo": "lm-zoo", "zoo_dir": str(zoo), "tasks": list(TASKS), "individual": individual,
            "dev_limit": dev_limit, "test_limit": test_limit, "lambdas": list(lambdas), "device": device,
            "max_tokens": max_tokens, "seqlen": seqlen, "quick": quick,
            "batch_size": batch_size, "recall_batch_size": recall_batch_size, "seconds": time.perf_counter() - t0,
            "rows": rows,
            "plot_key": "plot", "columns": ["shakespeare", "ptb", "recall"],
            "plot_ylabel": "normalized score (own task's model = 1)"}


COLUMNS = (("ppl_shakespeare", "ppl shakespeare ↓", "{:.2f}"), ("ppl_ptb", "ppl ptb ↓", "{:.2f}"),
           ("ppl_wikitext2", "ppl wikitext2 ↓", "{:.2f}"), ("recall_accuracy", "recall acc % ↑", "{:.1%}"),
           ("hallucination_rate", "hallucination % ↓", "{:.1%}"))


def add_diagonal(report: dict) -> dict:
    """The "individual fine-tuned" row: each column scored by its own task's model (as minilm-8task's row)."""
    rows = report["rows"]
    if "individual fine-tuned" not in rows:
        own = {"ppl_shakespeare": rows["individual (shakespeare)"]["scores"]["ppl_shakespeare"],
               "ppl_ptb": rows["individual (ptb)"]["scores"]["ppl_ptb"],
               "ppl_wikitext2": float("nan"),
               "recall_accuracy": rows["individual (recall)"]["scores"]["recall_accuracy"],
               "hallucination_rate": rows["individual (recall)"]["scores"]["hallucination_rate"]}
        items = list(rows.items())
        at = [k for k, _ in items].index("individual (recall)") + 1
        items.insert(at, ("individual fine-tuned", {"scores": own, "normalized_avg": 1.0, "own_task_only": True}))
        report["rows"] = dict(items)
    return report


def markdown_lm(report: dict) -> str:
    add_diagonal(report)
    head = ["method", *[c[1] for c in COLUMNS], "normalized avg ↑", "λ", "merge s"]
    lines = ["# compress bench merge — lm-zoo", "",
             "Second half of each held-out text / recall prompt set (the first half chose λ). Normalized: individual "
             "perplexity ÷ perplexity (domains), accuracy ÷ individual accuracy (recall), averaged.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in report["rows"].items():
        s = r["scores"]
        cells = ["–" if s[k] != s[k] else fmt.format(s[k]).replace("%", "") for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([name, *cells, f"{100 * r['normalized_avg']:.1f}", lambda_cell(r),
                                        seconds_cell(r)]) + " |")
    lines += ["", f"device {report['device']}, {report['seconds']:.0f} s; perplexity over ≤ {report['max_tokens']} "
              f"tokens per half, windows of {report['seqlen']}.", ""]
    # the plot shows normalized per-task scores of the merged rows against the per-task models
    report["plot_rows"] = [k for k in report["rows"] if not k.startswith("individual (")]
    for r in report["rows"].values():
        s, ind = r["scores"], report["individual"]
        r["plot"] = {"shakespeare": ind["shakespeare"] / s["ppl_shakespeare"], "ptb": ind["ptb"] / s["ppl_ptb"],
                     "recall": s["recall_accuracy"] / max(ind["recall"], 1e-9)}
        r["avg"] = r["normalized_avg"]
    return "\n".join(lines)
