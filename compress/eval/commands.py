"""`compress eval`: one evaluator flag, run by ``compress.eval.run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from compress.config import EvalConfig, build
from compress.options import DEVICE, out


def eval_cmd(
    model: Path = typer.Argument(..., help="Model folder: a zoo task folder, an encoder with --head, or a causal "
                                           "LM for --perplexity."),
    task: Optional[str] = typer.Option(None, help="Classification accuracy on this task (sst2, trec, subj, "
                                                  "agnews, cola, mrpc, sick, emotion), and its official metric "
                                                  "(MCC for cola, F1 for mrpc)."),
    perplexity: Optional[str] = typer.Option(None, help="Perplexity on a text file (.txt, .txt.gz) or a bundled "
                                                        "corpus name (wikitext2.test, ptb.test, shakespeare, ...)."),
    kl_to: Optional[Path] = typer.Option(None, help="KL(reference ‖ MODEL) per token, the reference a causal LM "
                                                    "folder (e.g. the dense model); needs --calib."),
    calib: Optional[str] = typer.Option(None, help="--kl-to: text file or bundled corpus to compare on."),
    recall: Optional[Path] = typer.Option(None, help="Context-recall accuracy and hallucination rate on a recall "
                                                     "jsonl (e.g. checkpoints/zoo/lm-zoo/recall_eval.jsonl)."),
    head: Optional[Path] = typer.Option(None, help="--task: the task folder whose head to use (default: MODEL's)."),
    split: str = typer.Option("test", help="--task: train, dev or test."),
    limit: Optional[int] = typer.Option(None, help="--task: the first N rows of the split."),
    seqlen: int = typer.Option(256, help="--perplexity: tokens per window."),
    max_tokens: Optional[int] = typer.Option(None, help="--perplexity: score the first N tokens only."),
    batch_size: int = typer.Option(64, help="Rows (--task) or windows (--perplexity) per forward pass."),
    dtype: Optional[str] = typer.Option(None, help="Load the model in this dtype (default float32)."),
    blockwise: Optional[bool] = typer.Option(None, "--blockwise/--whole-model",
                                             help="--perplexity, --kl-to: run block by block (only the embeddings "
                                                  "and one block on the device) or whole (default: block by block "
                                                  "when the weights take more than half the free device memory)."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Evaluate a model with exactly one evaluator: --task (accuracy, official metric), --perplexity, --kl-to or
    --recall."""
    cfg = build(EvalConfig, model=model, task=task, perplexity=perplexity, kl_to=kl_to, calib=calib, recall=recall,
                head=head, split=split, limit=limit,
                seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size, dtype=dtype, blockwise=blockwise,
                device=device)
    from compress.eval.run import run_eval

    info, line = run_eval(cfg)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out.print(line)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
