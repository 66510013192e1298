"""A short full fine-tune of a causal LM on one text: how the benchmarks make "fine-tuned" checkpoints from a real
pretrained base (e.g. stories260K on Shakespeare or PTB) so that task vectors and pruning have real signal.

Protocol: tokenize the text once; each step draws ``batch_size`` random windows of ``seqlen`` tokens (start
positions from a ``torch.Generator`` seeded by ``seed``, so the batches do not depend on global RNG state), takes
one AdamW step on the mean next-token cross-entropy, and records the loss. No scheduler, no dropout changes.
"""

from __future__ import annotations

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compress.errors import CompressError
from compress.progress import console, quiet_default


def finetune_causal_lm(model, tokenizer, text: str, steps: int, seqlen: int = 128, batch_size: int = 16,
                       lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
                       progress: bool = True) -> list[float]:
    """Fine-tune ``model`` in place on random windows of ``text``; returns the loss of every step."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= seqlen:
        raise CompressError(f"text has {ids.numel()} tokens; fine-tuning with seqlen={seqlen} needs more")
    if steps < 1 or batch_size < 1:
        raise CompressError(f"steps and batch_size must be >= 1 (got {steps}, {batch_size})")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seqlen)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []
    columns = (TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress or quiet_default()) as bar:
        task = bar.add_task("fine-tune", total=steps, loss="-")
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - seqlen + 1, (batch_size,), generator=gen)
            batch = ids[starts[:, None] + offsets].to(device)
            # labels=input_ids: the model shifts them itself and averages over the seqlen-1 predicted tokens
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
