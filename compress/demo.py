"""The toolkit's three jobs on the bundled permissive data (`make demo`, `compress demo`), in about 3 minutes on 2
CPU cores. Data: stories260K (MIT), tiny Shakespeare (public domain; last 10% held out), WikiText-2 (CC BY-SA;
``wikitext2.valid`` to calibrate and train, ``wikitext2.test`` to evaluate). Every perplexity is over the first
``eval_tokens`` tokens of a held-out text, windows of 256.

0. Convert the real pretrained stories260K (llama2.c) into a Hugging Face Llama and greedy-decode a prompt.
1. **Prune**: Wanda at 50% through ``compress.prune.run_prune`` (what `compress prune` runs), calibrated on 128
   windows of ``wikitext2.valid``; perplexity before and after; the sparse file's size against the dense weights.
2. **Requests**: a quick StratNet (``run_train``, what `compress strategy train` runs) on the same model and
   calibration, then ``REQUESTS`` (sparsity targets, byte budgets, preferences λ) answered by ``run_batch``
   (`compress batch`): requested against achieved sparsity and size, the KL to the dense model on the StratNet's
   evaluator windows (``EVAL_WINDOWS`` held-out windows of ``wikitext2.valid``), perplexity. Timed against one
   per-request CMA-ES search (``run_search``, `compress strategy search`, its default budget of 100, the same
   evaluator) for the 50% request; the time for all eight by search is an estimate (setup once + 8 × the search
   loop), labelled as such.
3. **Merge**: fine-tune briefly on Shakespeare and on ``wikitext2.valid``, extract both task vectors as compact
   delta files at ``density``, rebuild each pruned fine-tune, merge by task arithmetic (dense at λ = 0.5, pruned
   at ``lam``).

Writes ``results.json`` (sections ``prune``, ``requests``, ``merge``), ``results.md`` (the three tables) and
``results.png`` (perplexity on both held-out texts against stored bytes, every model the demo made) into the
workdir, each atomically.

How the defaults were chosen (runtime and dev data only; ``wikitext2.test`` and the Shakespeare held-out text were
never looked at for this): ``steps`` 150 as before (about 30 s per fine-tune on one core). The StratNet's evaluator
(and the search's) uses 16 held-out windows, half the training default: an evaluation is one forward pass over
them, and the search's 100 evaluations dominated the demo's time. StratNet budget 64 true evaluations (48 design +
16 in one active round) and 200 Adam steps: on the evaluator's own windows (dev), mean KL of StratNet's answers at
targets 0.35/0.45/0.5/0.55/0.65 relative to uniform was +7.1% at a budget of 32, −0.9% at 48 and −5.5% at 64.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compress.data import corpus_path, read_text, stories260k_files
from compress.delta import apply_delta, extract_delta
from compress.eval.perplexity import load_causal_lm, perplexity
from compress.finetune import finetune_causal_lm
from compress.io.deltafile import DeltaFile
from compress.io.llama2c import convert_llama2c
from compress.io.models import save_module
from compress.io.reader import open_checkpoint
from compress.io.writer import atomic_file
from compress.taskvec import TaskVector

# piped or captured (not a terminal), rich would wrap the tables at 80 columns
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
EVAL_TOKENS = 16384  # per corpus: enough for stable perplexities, small enough for a 2-core demo
CALIB = "wikitext2.valid"
PRUNE_SPARSITY = 0.5
EVAL_WINDOWS = 16
SEARCHED = "sparsity-0.5"  # the request the per-request search answers too
# StratNet answers mean sparsities in (0.3, 0.7) (the training default); on stories260K's sparse files (fp32) that
# is 472,140 to 834,635 bytes, so the three budgets sit low, middle and high in it
REQUESTS = [{"id": "sparsity-0.4", "sparsity": 0.4}, {"id": "sparsity-0.5", "sparsity": 0.5},
            {"id": "sparsity-0.6", "sparsity": 0.6}, {"id": "bytes-800k", "size_bytes": 800_000},
            {"id": "bytes-650k", "size_bytes": 650_000}, {"id": "bytes-500k", "size_bytes": 500_000},
            {"id": "pref-0.2", "preference": 0.2}, {"id": "pref-0.8", "preference": 0.8}]


def _texts() -> dict[str, tuple[str, str]]:
    """domain -> (training text, held-out text)."""
    shakespeare = read_text(corpus_path("shakespeare"))
    cut = int(0.9 * len(shakespeare))
    return {"shakespeare": (shakespeare[:cut], shakespeare[cut:]),
            "wikitext2": (read_text(corpus_path("wikitext2.valid")), read_text(corpus_path("wikitext2.test")))}


def _prefix(tok, text: str, n_tokens: int) -> str:
    """The shortest-ish prefix of ``text`` whose first ``n_tokens`` tokens are the full text's: perplexity
    re-tokenizes its text on every call, and all of wikitext2.test takes a second to tokenize on one core."""
    enc = tok(text, return_offsets_mapping=True, verbose=False)
    if len(enc["input_ids"]) <= n_tokens + 64:
        return text
    cut = text[: enc["offset_mapping"][n_tokens + 64][1]]
    same = tok(cut, verbose=False)["input_ids"][:n_tokens] == enc["input_ids"][:n_tokens]
    return cut if same else text


def _greedy(path: Path, prompt: str = "Once upon a time", tokens: int = 40) -> str:
    model, tok = load_causal_lm(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _md(head: list[str], rows: list[list[str]], right: int = 1) -> str:
    """A markdown table; columns from ``right`` on are right-aligned."""
    sep = ["---" if i < right else "---:" for i in range(len(head))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, sep, *rows]) + "\n"


def _show(title: str, head: list[str], rows: list[list[str]], right: int = 1) -> None:
    table = Table(title=title)
    for i, h in enumerate(head):
        table.add_column(h, justify="right" if i >= right else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)


def run_demo(workdir: str | Path = "checkpoints/demo", *, steps: int = 150, density: float = 0.1,
             lam: float = 1.0, stratnet_budget: int = 64, stratnet_steps: int = 200, search_budget: int = 100,
             eval_tokens: int = EVAL_TOKENS, device: str = "cpu", quiet: bool = False) -> dict:
    from transformers.utils import logging as hf_logging

    from compress.config import (
        BatchConfig,
        CompressionRequest,
        PruneConfig,
        StrategySearchConfig,
        StrategyTrainConfig,
        build,
    )
    from compress.prune import run_prune
    from compress.strategy.batch import run_batch
    from compress.strategy.evaluate import Evaluator
    from compress.strategy.stratnet import StratNetModel
    from compress.strategy.train import run_search, run_train, stratnet_pruner

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would drown the demo's own output
    t0 = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    torch.manual_seed(0)
    base = workdir / "stories260K"
    if not (base / "config.json").is_file():
        convert_llama2c(*stories260k_files(), base, overwrite=base.exists())
    console.print(f"[bold]base[/]: {base}  greedy: {_greedy(base)!r}")
    texts = _texts()
    cols = list(texts)
    base_tok = load_causal_lm(base)[1]  # every model the demo makes keeps the base's tokenizer
    heldout = {d: _prefix(base_tok, held, eval_tokens) for d, (_, held) in texts.items()}

    def ppl_of(model, tok) -> dict[str, float]:
        return {d: perplexity(model, tok, held, seqlen=256, max_tokens=eval_tokens, device=device)
                for d, held in heldout.items()}

    def ppl_at(path: Path) -> dict[str, float]:
        return ppl_of(*load_causal_lm(path, device))

    base_ppl = ppl_at(base)
    base_bytes = _weight_bytes(base)
    models = [{"model": "stories260K", "job": "base", "stored_bytes": base_bytes, "ppl": base_ppl}]

    # 1. prune: the very function `compress prune` runs
    console.rule("[bold]1. prune: Wanda 50%")
    t = time.time()
    pruned_dir = workdir / "wanda-50"
    rep = run_prune(build(PruneConfig, model=base, out=pruned_dir, sparsity=PRUNE_SPARSITY, method="wanda",
                          calib=CALIB, cache_dir=cache, device=device, overwrite=True, quiet=quiet))
    sp = rep["sparse"]
    pruned_ppl = ppl_at(pruned_dir)
    prune = {"method": "wanda", "target_sparsity": PRUNE_SPARSITY, "calib": CALIB,
             "nsamples": PruneConfig.model_fields["nsamples"].default, "sparsity": rep["sparsity"],
             "params_pruned_over": rep["params_pruned_over"], "layers": rep["layers"], "out": str(pruned_dir),
             "sparse_file": sp["path"], "sparse_bytes": sp["file_bytes"], "dense_bytes": base_bytes,
             "sparse_vs_dense": sp["file_bytes"] / base_bytes, "ppl": {"dense": base_ppl, "pruned": pruned_ppl},
             "seconds": round(time.time() - t, 1)}
    models.append({"model": "Wanda 50%", "job": "prune", "stored_bytes": sp["file_bytes"], "ppl": pruned_ppl})
    prune_head = ["model", "sparsity", "stored as", "bytes", "vs dense", *[f"ppl {c}" for c in cols]]
    prune_rows = [["stories260K", "0", "model.safetensors", f"{base_bytes:,}", "100.0%",
                   *[f"{base_ppl[c]:.2f}" for c in cols]],
                  ["Wanda 50%", f"{rep['sparsity']:.4f}", "sparse file", f"{sp['file_bytes']:,}",
                   f"{100 * prune['sparse_vs_dense']:.1f}%", *[f"{pruned_ppl[c]:.2f}" for c in cols]]]
    _show(f"1. Wanda {PRUNE_SPARSITY:.0%} on stories260K, calibrated on {CALIB} (perplexity: first {eval_tokens} "
          "held-out tokens)", prune_head, prune_rows)

    # 2. requests: a quick StratNet, then one batch of mixed requests, against one per-request search
    console.rule("[bold]2. compression requests")
    stratnet = workdir / "stratnet.pt"
    t_job = t = time.time()
    train = run_train(build(StrategyTrainConfig, model=base, out=stratnet, calib=CALIB, budget=stratnet_budget,
                            eval_windows=EVAL_WINDOWS, rounds=1, steps=stratnet_steps, cache_dir=cache,
                            device=device, overwrite=True, quiet=quiet))
    train_seconds = time.time() - t
    req_file = workdir / "requests.jsonl"
    with atomic_file(req_file, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    with contextlib.redirect_stdout(io.StringIO()):  # its own table is saved as requests/summary.md; ours follows
        summary = run_batch(build(BatchConfig, model=base, stratnet=stratnet, requests=req_file,
                                  out=workdir / "requests", cache_dir=cache, device=device, overwrite=True,
                                  quiet=quiet))
    # the KL of every answer on the evaluator StratNet was trained with (same pruner, same held-out windows)
    net = StratNetModel.load(stratnet, base)
    pruner = stratnet_pruner(net, base, device=device, cache_dir=cache, quiet=True)
    ev = Evaluator(pruner, net.meta.get("method", "wanda"), eval_windows=net.meta["eval_windows"],
                   eval_seqlen=net.meta["eval_seqlen"])
    tok = pruner.tokenizer()
    req_rows = []
    for row in summary["rows"]:
        rec = ev.evaluate(row["strategy"], phase="demo")
        req = row["request"]
        file_bytes = (workdir / "requests" / row["file"]).stat().st_size
        r = {"id": row["id"], "target": row["target"], "requested": req[row["target"]],
             "sparsity_target": row["sparsity_target"], "sparsity": row["sparsity"], "file": row["file"],
             "file_bytes": file_bytes, "kl": rec["kl"], "strategy": row["strategy"],
             "ppl": ppl_of(pruner.model, tok)}
        req_rows.append(r)
        models.append({"model": row["id"], "job": "requests", "stored_bytes": file_bytes, "ppl": r["ppl"]})
    uniform_kl = ev.evaluate([PRUNE_SPARSITY] * len(pruner.block_params), phase="demo-uniform")["kl"]
    pruner.load(None)
    t = time.time()
    searched_req = next(r for r in REQUESTS if r["id"] == SEARCHED)
    search = run_search(build(StrategySearchConfig, model=base, calib=CALIB, budget=search_budget,
                              eval_windows=EVAL_WINDOWS,
                              request=build(CompressionRequest, **searched_req), cache_dir=cache, device=device,
                              quiet=quiet))
    search_wall = time.time() - t
    served = next(r for r in req_rows if r["id"] == SEARCHED)
    timing = {"stratnet_train_seconds": train_seconds, "batch_seconds": summary["seconds"],
              "batch_answer_seconds": summary["answer_seconds"], "requests": len(req_rows),
              "search_seconds": search_wall, "search_loop_seconds": search["seconds"],
              "search_evaluations": search["evaluations"],
              "search_all_estimate_seconds": search_wall - search["seconds"] + len(req_rows) * search["seconds"]}
    requests = {"stratnet": {"path": str(stratnet), "budget": stratnet_budget, "steps": stratnet_steps,
                             "evaluations": train["evaluations"], "sparsity_range": list(net.sparsity_range),
                             "seconds": train_seconds},
                "kl_windows": f"{int(ev.windows.shape[0])} held-out windows of {CALIB}, {ev.eval_seqlen} tokens",
                "rows": req_rows, "uniform_kl": uniform_kl,
                "search": {"request": searched_req, "optimizer": search["optimizer"], "budget": search_budget,
                           "kl": search["kl"], "uniform_kl": search["uniform_kl"], "strategy": search["strategy"],
                           "served_kl": served["kl"]},
                "timing": timing}
    req_head = ["request", "asked", "target sparsity", "achieved sparsity", "file bytes", "within budget", "KL",
                *[f"ppl {c}" for c in cols]]
    req_body = []
    for r in req_rows:
        asked = {"sparsity": f"sparsity {r['requested']:g}", "size_bytes": f"≤ {r['requested']:,} B",
                 "preference": f"λ = {r['requested']:g}"}[r["target"]]
        ok = ("yes" if r["file_bytes"] <= r["requested"] else "NO") if r["target"] == "size_bytes" else ""
        req_body.append([r["id"], asked, f"{r['sparsity_target']:.4f}", f"{r['sparsity']:.4f}",
                         f"{r['file_bytes']:,}", ok, f"{r['kl']:.4f}", *[f"{r['ppl'][c]:.2f}" for c in cols]])
    _show(f"2. {len(req_rows)} requests answered by one StratNet ({train['evaluations']} evaluations); KL to the "
          f"dense model on {requests['kl_windows']}", req_head, req_body)
    time_lines = [
        f"StratNet training (once): {train_seconds:.1f} s; the batch of all {len(req_rows)} requests (answer, prune, "
        f"write sparse files): {timing['batch_seconds']:.1f} s",
        f"one per-request search ({search['optimizer']}, {search['evaluations']} evaluations) for {SEARCHED}: "
        f"{search_wall:.1f} s; for all {len(req_rows)}: ≈{timing['search_all_estimate_seconds']:.0f} s "
        "(estimate: setup once + 8 × the search loop)",
        f"KL at sparsity 0.5: uniform (job 1's Wanda 50%) {uniform_kl:.4f}, StratNet {served['kl']:.4f}, "
        f"search {search['kl']:.4f}"]
    for line in time_lines:
        console.print(line)
    requests["seconds"] = round(time.time() - t_job, 1)

    # 3. fine-tune → extract → merge
    console.rule("[bold]3. fine-tune, extract, merge")
    t_job = time.time()
    finetuned: dict[str, Path] = {}
    for domain, (train_text, _) in texts.items():
        out = workdir / f"ft-{domain}"
        model, tok = load_causal_lm(base, device)
        t = time.time()
        losses = finetune_causal_lm(model, tok, train_text, steps=steps, device=device, progress=not quiet)
        save_module(model, out, tokenizer=tok, overwrite=True)
        console.print(f"fine-tuned on {domain}: {steps} steps in {time.time() - t:.1f}s, "
                      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        finetuned[domain] = out

    base_ck = open_checkpoint(base)
    deltas: dict[str, Path] = {}
    merge_models: list[tuple[str, Path, str, int]] = []  # label, folder, stored as, stored bytes
    for domain, ft in finetuned.items():
        merge_models.append((f"ft-{domain}", ft, "model.safetensors", _weight_bytes(ft)))
        delta = workdir / f"delta-{domain}-d{density}.safetensors"
        s = extract_delta(base_ck, TaskVector.from_paths(base_ck, ft), delta, density=density,
                          device=device, overwrite=True, quiet=quiet, extra_metadata={"finetuned": str(ft)})
        console.print(f"delta {domain}: {s.file_bytes:,} B for {s.params:,} parameters "
                      f"({s.bits_per_param:.2f} bits/param, dense fp32 {4 * s.params:,} B)")
        deltas[domain] = delta
        rebuilt = workdir / f"ft-{domain}-d{density}"
        apply_delta(base_ck, DeltaFile(delta), rebuilt, device=device, overwrite=True, quiet=quiet)
        merge_models.append((f"ft-{domain} d={density}", rebuilt, "delta file (+ base)", s.file_bytes))

    dense_tv = sum((TaskVector.from_paths(base_ck, ft) for ft in finetuned.values()), TaskVector([]))
    sparse_tv = TaskVector([(1.0, DeltaFile(d)) for d in deltas.values()])
    # task arithmetic: θ_base + λ·Σ τ_i; dense τ overlap, so they share λ = 0.5; pruned ones mostly do not
    for label, tv, scale in (("merge dense λ=0.5", dense_tv, 0.5),
                             (f"merge pruned d={density} λ={lam}", sparse_tv, lam)):
        out = workdir / ("merge-dense" if "dense" in label else f"merge-pruned-d{density}")
        tv.apply(base_ck, out, scale=scale, device=device, overwrite=True, quiet=quiet,
                 card={"title": label, "method": "task arithmetic",
                       "inputs": {"base": str(base), **{k: str(v) for k, v in finetuned.items()}},
                       "params": {"lambda": scale, "density": density if "pruned" in label else 1.0}})
        merge_models.append((label, out, "model.safetensors", _weight_bytes(out)))
    merge_rows = [{"model": "base", "path": str(base), "stored_as": "model.safetensors", "stored_bytes": base_bytes,
                   "ppl": base_ppl}]
    for label, path, stored_as, nbytes in merge_models:
        ppl = ppl_at(path)
        merge_rows.append({"model": label, "path": str(path), "stored_as": stored_as, "stored_bytes": nbytes,
                           "ppl": ppl})
        models.append({"model": label, "job": "merge", "stored_bytes": nbytes, "ppl": ppl})
    merge = {"steps": steps, "density": density, "lambda": lam,
             "train": {"shakespeare": "first 90% of shakespeare", "wikitext2": "wikitext2.valid"},
             "heldout": {"shakespeare": "last 10% of shakespeare", "wikitext2": "wikitext2.test"},
             "rows": merge_rows, "seconds": round(time.time() - t_job, 1)}
    merge_head = ["model", *[f"ppl {c}" for c in cols], "stored as", "bytes"]
    merge_body = [[r["model"], *[f"{r['ppl'][c]:.3f}" for c in cols], r["stored_as"], f"{r['stored_bytes']:,}"]
                  for r in merge_rows]
    _show(f"3. fine-tune → extract → merge: perplexity on held-out text (first {eval_tokens} tokens)",
          merge_head, merge_body)

    result = {"settings": {"steps": steps, "density": density, "lambda": lam, "stratnet_budget": stratnet_budget,
                           "stratnet_steps": stratnet_steps, "search_budget": search_budget,
                           "eval_tokens": eval_tokens, "calib": CALIB, "device": device},
              "prune": prune, "requests": requests, "merge": merge, "models": models,
              "plot": str(workdir / "results.png"), "seconds": round(time.time() - t0, 1)}
    md = "\n".join([
        "# compress demo", "", f"## 1. Wanda {PRUNE_SPARSITY:.0%} (calibrated on {CALIB})", "",
        _md(prune_head, prune_rows), f"## 2. compression requests (one StratNet, {train['evaluations']} evaluations)",
        "", _md(req_head, req_body), *[f"- {x}" for x in time_lines], "", "## 3. fine-tune → extract → merge", "",
        _md(merge_head, merge_body), f"Perplexity: first {eval_tokens} tokens of the held-out text, windows of 256. "
        f"{result['seconds']:.0f} s in all.", ""])
    with atomic_file(workdir / "results.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_file(workdir / "results.md", overwrite=True) as tmp:
        tmp.write_text(md)
    png = plot(models, workdir / "results.png", cols)
    console.print(f"saved {workdir / 'results.json'}, {workdir / 'results.md'}"
                  + (f" and {png}" if png else "") + f" ({result['seconds']}s in all: prune {prune['seconds']}s, "
                  f"requests {requests['seconds']}s, merge {merge['seconds']}s)")
    return result


def plot(models: list[dict], path: Path, cols: list[str]) -> Path | None:
    """Perplexity on each held-out text (one panel each) against stored bytes, every model the demo made."""
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    styles = {"base": ("k", "*", "base (dense)"), "prune": ("tab:red", "s", "1. Wanda 50% (sparse file)"),
              "requests": ("tab:blue", "o", "2. requests (sparse files)"),
              "merge": ("tab:green", "^", "3. fine-tunes, merges (dense) and delta files")}
    fig, axes = plt.subplots(1, len(cols), figsize=(6 * len(cols), 4.8), sharex=True)
    kb = [m["stored_bytes"] / 1e3 for m in models]
    for ax, c in zip(axes, cols):
        logp = [math.log(m["ppl"][c]) for m in models]
        span_x, span_y = (max(kb) - min(kb)) or 1.0, (max(logp) - min(logp)) or 1.0
        placed: list[tuple[float, float]] = []
        for job, (color, marker, label) in styles.items():
            pts = [i for i, m in enumerate(models) if m["job"] == job]
            ax.scatter([kb[i] for i in pts], [models[i]["ppl"][c] for i in pts], c=color, marker=marker,
                       s=60 if job == "base" else 30, label=label, zorder=3)
        # name a point only where no named point sits close by (the table has them all): base, prune and merge
        # models first, then the requests
        for i in sorted(range(len(models)), key=lambda i: models[i]["job"] == "requests"):
            x, y = (kb[i] - min(kb)) / span_x, (logp[i] - min(logp)) / span_y
            if all(abs(x - px) > 0.12 or abs(y - py) > 0.04 for px, py in placed):
                placed.append((x, y))
                ax.annotate(models[i]["model"], (kb[i], models[i]["ppl"][c]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("stored kB (weights file, sparse file, or delta file on top of the base)")
        ax.set_ylabel(f"perplexity, held-out {c} (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("compress demo: every model it made, quality against stored size")
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
