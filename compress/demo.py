"""The main job end to end on real data (`make demo`, `compress demo`), in a few minutes on 2 CPU cores.

1. Convert the real pretrained stories260K (llama2.c) into a Hugging Face Llama and greedy-decode a prompt.
2. Fine-tune it briefly on two real corpora: tiny Shakespeare (last 10% held out) and Penn Treebank
   (train on ptb.valid, evaluate on ptb.test).
3. Extract both task vectors as compact delta files at ``density`` (magnitude top-k per tensor).
4. Rebuild each pruned fine-tune, and merge: task arithmetic (λ·Σ τ_i) from the dense and the pruned deltas.
5. Print and save (``results.json``, ``results.md``) perplexity on both held-out texts for every model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compress.data import corpus_path, read_text, stories260k_files
from compress.delta import apply_delta, extract_delta
from compress.io.deltafile import DeltaFile
from compress.eval.perplexity import load_causal_lm, perplexity
from compress.finetune import finetune_causal_lm
from compress.io.llama2c import convert_llama2c
from compress.io.reader import open_checkpoint
from compress.io.writer import atomic_dir
from compress.taskvec import TaskVector

console = Console(soft_wrap=True)
EVAL_TOKENS = 16384  # per corpus: enough for stable perplexities, small enough for a 2-core demo


def _texts() -> dict[str, tuple[str, str]]:
    """domain -> (training text, held-out text)."""
    shakespeare = read_text(corpus_path("shakespeare"))
    cut = int(0.9 * len(shakespeare))
    return {"shakespeare": (shakespeare[:cut], shakespeare[cut:]),
            "ptb": (read_text(corpus_path("ptb.valid")), read_text(corpus_path("ptb.test")))}


def _greedy(path: Path, prompt: str = "Once upon a time", tokens: int = 40) -> str:
    model, tok = load_causal_lm(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def _md_table(rows: list[dict], cols: list[str]) -> str:
    head = "| model | " + " | ".join(f"ppl {c}" for c in cols) + " | size |"
    sep = "|---|" + "---:|" * (len(cols) + 1)
    body = [f"| {r['model']} | " + " | ".join(f"{r['ppl'][c]:.3f}" for c in cols) + f" | {r['size']} |"
            for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def run_demo(workdir: str | Path = "checkpoints/demo", *, steps: int = 150, density: float = 0.1,
             lam: float = 1.0, device: str = "cpu", quiet: bool = False) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load would drown the demo's own output
    t0 = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = workdir / "stories260K"
    if not (base / "config.json").is_file():
        convert_llama2c(*stories260k_files(), base, overwrite=base.exists())
    console.print(f"[bold]base[/]: {base}  greedy: {_greedy(base)!r}")
    texts = _texts()

    # 2. fine-tune one copy per domain
    finetuned: dict[str, Path] = {}
    for domain, (train, _) in texts.items():
        out = workdir / f"ft-{domain}"
        model, tok = load_causal_lm(base, device)
        t = time.time()
        losses = finetune_causal_lm(model, tok, train, steps=steps, device=device, progress=not quiet)
        if out.exists():
            shutil.rmtree(out)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        console.print(f"fine-tuned on {domain}: {steps} steps in {time.time() - t:.1f}s, "
                      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        finetuned[domain] = out

    # 3. compact deltas, 4. pruned rebuilds and merges
    base_ck = open_checkpoint(base)
    deltas: dict[str, Path] = {}
    models: dict[str, tuple[Path, str]] = {"base": (base, "-")}
    for domain, ft in finetuned.items():
        models[f"ft-{domain}"] = (ft, "dense")
        delta = workdir / f"delta-{domain}-d{density}.safetensors"
        s = extract_delta(base_ck, TaskVector.from_paths(base_ck, ft), delta, density=density,
                          device=device, overwrite=True, quiet=quiet, extra_metadata={"finetuned": str(ft)})
        dense_bytes = 4 * s.params
        console.print(f"delta {domain}: {s.file_bytes:,} B for {s.params:,} parameters "
                      f"({s.bits_per_param:.2f} bits/param, dense fp32 {dense_bytes:,} B)")
        deltas[domain] = delta
        rebuilt = workdir / f"ft-{domain}-d{density}"
        apply_delta(base_ck, DeltaFile(delta), rebuilt, device=device, overwrite=True, quiet=quiet)
        models[f"ft-{domain} d={density}"] = (rebuilt, f"{s.file_bytes:,} B delta")

    dense_tv = sum((TaskVector.from_paths(base_ck, ft) for ft in finetuned.values()), TaskVector([]))
    sparse_tv = TaskVector([(1.0, DeltaFile(d)) for d in deltas.values()])
    # task arithmetic: θ_base + λ·Σ τ_i; dense τ overlap, so they share λ = 0.5; pruned ones mostly do not
    for label, tv, scale in (("merge dense λ=0.5", dense_tv, 0.5), (f"merge pruned d={density} λ={lam}", sparse_tv, lam)):
        out = workdir / ("merge-dense" if "dense" in label else f"merge-pruned-d{density}")
        tv.apply(base_ck, out, scale=scale, device=device, overwrite=True, quiet=quiet,
                 card={"title": label, "method": "task arithmetic",
                       "inputs": {"base": str(base), **{k: str(v) for k, v in finetuned.items()}},
                       "params": {"lambda": scale, "density": density if "pruned" in label else 1.0}})
        models[label] = (out, "-")

    # 5. perplexities
    rows = []
    for label, (path, size) in models.items():
        model, tok = load_causal_lm(path, device)
        ppl = {d: perplexity(model, tok, held, seqlen=256, max_tokens=EVAL_TOKENS, device=device)
               for d, (_, held) in texts.items()}
        rows.append({"model": label, "path": str(path), "ppl": ppl, "size": size})
    cols = list(texts)
    table = Table(title=f"perplexity on held-out text (first {EVAL_TOKENS} tokens, windows of 256)")
    table.add_column("model")
    for c in cols:
        table.add_column(f"ppl {c}", justify="right")
    table.add_column("stored as", justify="right")
    for r in rows:
        table.add_row(r["model"], *[f"{r['ppl'][c]:.3f}" for c in cols], r["size"])
    console.print(table)
    result = {"steps": steps, "density": density, "lambda": lam, "eval_tokens": EVAL_TOKENS, "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (workdir / "results.md").write_text(_md_table(rows, cols))
    console.print(f"saved {workdir / 'results.json'} and {workdir / 'results.md'} "
                  f"({result['seconds']}s in all)")
    return result
