"""Sentence classification with an encoder and a linear head on mean pooling: the minilm-8task benchmark's model,
its on-disk head format, and batched accuracy with each task's official metric beside it (``metrics``).

A task folder (``checkpoints/zoo/minilm-8task/<task>/``) is a Hugging Face encoder folder (``config.json``,
``model.safetensors``, tokenizer files) plus the task's head: ``head.safetensors`` (``weight`` [num_labels, hidden],
``bias`` [num_labels]) and ``head.json`` (task, labels, pooling, max_length). The head is kept apart from the
encoder on purpose: merging benchmarks merge encoders only (task vectors τ = θ_ft − θ_base over the encoder
tensors) and score the merged encoder with each task's own head::

    from compress.eval.classify import Head, TaskEvaluator, load_encoder, set_encoder_weights

    encoder, tok = load_encoder("checkpoints/zoo/minilm-8task/base", device="cuda")
    heads = {t: Head.load(f"checkpoints/zoo/minilm-8task/{t}") for t in tasks}
    evals = {t: TaskEvaluator(t, "dev", tokenizer=tok, device="cuda") for t in tasks}   # tokenized once
    for lam in (0.2, 0.3, 0.4):
        set_encoder_weights(encoder, merged_state(lam))        # in place, no reload from disk
        scores = {t: evals[t].accuracy(encoder, heads[t]) for t in tasks}

Pooling is the masked mean of the last hidden states (sentence-transformers' mean pooling), computed in float32.
Evaluation runs in the encoder's own dtype (float32 unless loaded otherwise), in eval mode (no dropout), so an
accuracy is a deterministic function of the weights and the data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Optional

import torch

from compress.errors import CompressError
from compress.io.models import hf_quiet, load_model  # noqa: F401 (hf_quiet: imported from here too)
from compress.io.models import load_tokenizer as _load_tokenizer

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
HEAD_FORMAT = "compress.head/1"
POOLINGS = ("mean",)


# --- the head -------------------------------------------------------------------------------------------------

@dataclass
class Head:
    """A linear classification head over a pooled sentence embedding: logits = pooled · weightᵀ + bias."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels]
    task: str
    labels: list[str]
    pooling: str = "mean"
    max_length: int = 128
    source: Optional[Path] = field(default=None, compare=False)  # folder it was loaded from (for its tokenizer)
    task_path: Optional[str] = None  # the task's folder, when the task is not one of the data root's

    @property
    def task_ref(self) -> str:
        """What ``compress.data`` finds the task's data by: its folder's path, else its name."""
        return self.task_path or self.task

    def __post_init__(self):
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise CompressError(f"head of task '{self.task}': weight {tuple(self.weight.shape)} and bias "
                                f"{tuple(self.bias.shape)} do not form a [num_labels, hidden] linear layer")
        if self.weight.shape[0] != len(self.labels):
            raise CompressError(f"head of task '{self.task}': {self.weight.shape[0]} outputs but "
                                f"{len(self.labels)} label names")
        if self.pooling not in POOLINGS:
            raise CompressError(f"head of task '{self.task}': pooling '{self.pooling}' is not supported "
                                f"(choose one of {', '.join(POOLINGS)})")

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=pooled.device, dtype=pooled.dtype)
        return torch.nn.functional.linear(pooled, w, self.bias.to(device=pooled.device, dtype=pooled.dtype))

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({"weight": self.weight.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}, folder / HEAD_WEIGHTS,
                  metadata={"format": "pt", "compress.format": HEAD_FORMAT, "task": self.task})
        meta = {"format": HEAD_FORMAT, "task": self.task, "num_labels": self.num_labels, "labels": self.labels,
                "pooling": self.pooling, "hidden_size": self.hidden_size, "max_length": self.max_length}
        if self.task_path is not None:
            meta["task_path"] = self.task_path
        (folder / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Head":
        """The head stored in a task folder (``head.safetensors`` + ``head.json``)."""
        from safetensors import safe_open

        folder = Path(folder)
        if not (folder / HEAD_WEIGHTS).is_file() or not (folder / HEAD_CONFIG).is_file():
            raise CompressError(f"{folder}: no classification head ({HEAD_WEIGHTS} and {HEAD_CONFIG}); a task "
                                f"folder of `compress zoo build minilm-8task` holds one (pass it with --head)")
        try:
            meta = json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8"))
            with safe_open(folder / HEAD_WEIGHTS, "pt") as f:
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except (OSError, ValueError, KeyError) as e:
            raise CompressError(f"{folder}: cannot read the head ({e})") from None
        missing = [k for k in ("task", "labels") if k not in meta]
        if missing:
            raise CompressError(f"{folder / HEAD_CONFIG}: missing {', '.join(missing)}")
        from compress.data import check_task_name

        check_task_name(meta["task"], f"{folder / HEAD_CONFIG}: task")
        task_path = meta.get("task_path")
        if task_path is not None and (not isinstance(task_path, str) or not Path(task_path).is_absolute()):
            raise CompressError(f"{folder / HEAD_CONFIG}: task_path must be an absolute folder path")
        return cls(weight=weight, bias=bias, task=meta["task"], labels=list(meta["labels"]),
                   pooling=meta.get("pooling", "mean"), max_length=int(meta.get("max_length", 128)), source=folder,
                   task_path=task_path)


def has_head(folder: str | os.PathLike) -> bool:
    return (Path(folder) / HEAD_WEIGHTS).is_file()


def load_heads(zoo_dir: str | os.PathLike, tasks: Optional[list[str]] = None) -> dict[str, Head]:
    """The heads of a built minilm-8task folder, by task (default: every task folder that holds a head, the
    bundled tasks first in the benchmark's order, then the others by name)."""
    from compress.data import TASKS

    zoo_dir = Path(zoo_dir)
    if tasks is None:
        found = {p.name for p in zoo_dir.iterdir() if p.is_dir() and has_head(p)} if zoo_dir.is_dir() else set()
        tasks = [t for t in TASKS if t in found] + sorted(found - set(TASKS))
        if not tasks:
            raise CompressError(f"{zoo_dir}: no task folders with a head (build it: compress zoo build minilm-8task)")
    return {t: Head.load(zoo_dir / t) for t in tasks}


# --- tokenized data and batches -------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Rows tokenized once and padded to the longest row; ``batch`` slices a batch to its own longest row."""

    input_ids: torch.Tensor  # [N, L] long
    token_type_ids: torch.Tensor  # [N, L] long
    lengths: torch.Tensor  # [N] long
    labels: torch.Tensor  # [N] long

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        n = int(self.lengths[idx].max())
        lengths = self.lengths[idx]
        mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
        return {"input_ids": self.input_ids[idx, :n].to(device, non_blocking=True),
                "token_type_ids": self.token_type_ids[idx, :n].to(device, non_blocking=True),
                "attention_mask": mask.to(device, non_blocking=True)}


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> Encoded:
    """Tokenize rows (``text``, optional ``text_pair`` encoded as a pair) with truncation to ``max_length``."""
    if not rows:
        raise CompressError("no rows to encode")
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    has_pair = [p is not None for p in pairs]
    if any(has_pair) and not all(has_pair):
        raise CompressError("rows mix single texts and text pairs; a task is one or the other")
    enc = tokenizer(texts, pairs if all(has_pair) else None, truncation=True, max_length=max_length,
                    return_token_type_ids=True, return_attention_mask=False)
    ids, types = enc["input_ids"], enc["token_type_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    token_type_ids = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids, types)):
        input_ids[i, :len(a)] = torch.tensor(a, dtype=torch.long)
        token_type_ids[i, :len(b)] = torch.tensor(b, dtype=torch.long)
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    return Encoded(input_ids, token_type_ids, lengths, labels)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, in float32: Σ_t m_t h_t / Σ_t m_t."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pooled_output(encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def predict(encoder, head: Head, data: Encoded, batch_size: int = 128) -> torch.Tensor:
    """Predicted label of every row ([N] long, on the CPU), on the encoder's device, in eval mode. Rows are
    batched longest first (less padding); predictions come back in row order."""
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1 (got {batch_size})")
    if head.hidden_size != encoder.config.hidden_size:
        raise CompressError(f"head of task '{head.task}' takes hidden size {head.hidden_size}, the encoder gives "
                            f"{encoder.config.hidden_size}")
    device = _device_of(encoder)
    order = torch.argsort(data.lengths, descending=True, stable=True)
    preds = torch.empty(len(data), dtype=torch.long)
    was_training = encoder.training
    encoder.eval()
    try:
        for idx in order.split(batch_size):
            logits = head.logits(pooled_output(encoder, data.batch(idx, device)))
            preds[idx] = logits.argmax(-1).cpu()
    finally:
        encoder.train(was_training)
    return preds


# --- encoders -------------------------------------------------------------------------------------------------

def load_tokenizer(folder: str | os.PathLike):
    return _load_tokenizer(folder)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: Optional[torch.dtype] = None):
    """(encoder, tokenizer or None) from a Hugging Face encoder folder (a zoo task folder, its base, or a merged
    encoder written by ``TaskVector.apply``); the encoder in eval mode on ``device``."""
    path = Path(path)
    encoder = load_model(path, device=device, dtype=dtype or torch.float32, kind="encoder")
    tok = None
    if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file():
        tok = load_tokenizer(path)
    return encoder, tok


def set_encoder_weights(encoder, weights, strict: bool = True) -> None:
    """Copy tensors into ``encoder`` in place (no reload, no reallocation): ``weights`` is a mapping name → tensor
    (a state dict) or a lazy checkpoint (``compress.io.open_checkpoint``), named as in the encoder's own folder
    (``embeddings.word_embeddings.weight``, ...). ``strict``: every encoder tensor must be given, and nothing
    else. Values are cast to each parameter's dtype and device."""
    state = encoder.state_dict()
    if hasattr(weights, "names") and hasattr(weights, "get") and not isinstance(weights, Mapping):
        names, getter = list(weights.names()), weights.get
    else:
        names, getter = list(weights.keys()), weights.__getitem__
    unknown = [n for n in names if n not in state]
    if unknown:
        raise CompressError(f"tensor '{unknown[0]}' is not in the encoder ({len(unknown)} unknown names)")
    if strict:
        missing = [n for n in state if n not in set(names)]
        if missing:
            raise CompressError(f"encoder tensor '{missing[0]}' not given ({len(missing)} missing); pass "
                                f"strict=False to keep the current values")
    with torch.no_grad():
        for n in names:
            t = getter(n)
            if tuple(t.shape) != tuple(state[n].shape):
                raise CompressError(f"tensor '{n}': shape {tuple(t.shape)}, the encoder has {tuple(state[n].shape)}")
            state[n].copy_(t)


# --- evaluation -----------------------------------------------------------------------------------------------

@dataclass
class ClassifyResult:
    task: str
    split: str
    n: int
    correct: int
    predictions: torch.Tensor = field(repr=False)
    metric: str = "accuracy"  # the task's official metric (task.json), reported beside accuracy
    labels: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @cached_property
    def official(self) -> float:
        """The task's official metric (``metric``) on these predictions: MCC for CoLA, F1 for MRPC, else accuracy."""
        if self.metric == "accuracy":
            return self.accuracy
        if self.labels is None:
            raise CompressError(f"task '{self.task}': {self.metric} needs the labels, and this result has none")
        from compress.eval.metrics import official_metric

        return official_metric(self.metric, self.labels, self.predictions)

    def as_dict(self) -> dict:
        """JSON fields; a task whose official metric is not accuracy adds it under its name (``"mcc"``, ``"f1"``)."""
        d = {"task": self.task, "split": self.split, "n": self.n, "correct": self.correct,
             "accuracy": self.accuracy, "metric": self.metric}
        if self.metric != "accuracy":
            d[self.metric] = self.official
        return d

    def summary(self) -> str:
        """One line: ``cola test: accuracy 0.8100 (81/100), MCC 0.5203``."""
        from compress.eval.metrics import LABELS

        line = f"{self.task} {self.split}: accuracy {self.accuracy:.4f} ({self.correct}/{self.n})"
        return line if self.metric == "accuracy" else f"{line}, {LABELS[self.metric]} {self.official:.4f}"


class TaskEvaluator:
    """One task split tokenized once, scored against any (encoder, head): the building block of λ searches."""

    def __init__(self, task: str | os.PathLike, split: str = "test", *, tokenizer, limit: Optional[int] = None,
                 max_length: int = 128, batch_size: int = 128):
        """``task``: a task of the data root by name, or a task folder by path (``Head.task_ref``)."""
        from compress.data import load_task, task_metric, task_name

        self.task, self.split, self.batch_size = task_name(task), split, batch_size
        self.metric = task_metric(task)
        self.rows = load_task(task, split, limit)
        self.data = encode_rows(tokenizer, self.rows, max_length)

    @property
    def labels(self) -> torch.Tensor:
        return self.data.labels

    def evaluate(self, encoder, head: Head) -> ClassifyResult:
        if head.task != self.task:
            raise CompressError(f"head was trained for task '{head.task}', not '{self.task}'")
        preds = predict(encoder, head, self.data, self.batch_size)
        return ClassifyResult(self.task, self.split, len(self.data), int((preds == self.data.labels).sum()), preds,
                              metric=self.metric, labels=self.data.labels)

    def accuracy(self, encoder, head: Head) -> float:
        return self.evaluate(encoder, head).accuracy

    __call__ = accuracy


@dataclass
class Classifier:
    """An encoder with its tokenizer and one task head (what a zoo task folder holds)."""

    encoder: torch.nn.Module
    tokenizer: object
    head: Head

    def evaluate(self, split: str = "test", limit: Optional[int] = None, batch_size: int = 128) -> ClassifyResult:
        ev = TaskEvaluator(self.head.task_ref, split, tokenizer=self.tokenizer, limit=limit,
                           max_length=self.head.max_length, batch_size=batch_size)
        return ev.evaluate(self.encoder, self.head)


def load_classifier(task_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    head: str | os.PathLike | Head | None = None, dtype: Optional[torch.dtype] = None) -> Classifier:
    """The encoder in ``task_dir`` with its head, or with ``head`` (a task folder or a ``Head``) when given, e.g. a
    merged encoder folder scored with one task's head. The tokenizer comes from ``task_dir``, else the head's."""
    if not Path(task_dir).is_dir():
        raise CompressError(f"{task_dir}: no such folder")
    h = head if isinstance(head, Head) else Head.load(head if head is not None else task_dir)
    encoder, tok = load_encoder(task_dir, device=device, dtype=dtype)
    if tok is None:
        if h.source is None:
            raise CompressError(f"{task_dir}: no tokenizer files, and the head has no folder to take them from")
        tok = load_tokenizer(h.source)
    return Classifier(encoder, tok, h)


def evaluate(model, head: str | os.PathLike | Head | None = None, task: Optional[str] = None, split: str = "test",
             limit: Optional[int] = None, batch_size: int = 128, device: str | torch.device = "cpu",
             tokenizer=None, max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> ClassifyResult:
    """Accuracy of an encoder + head on a task split, and the task's official metric (``.official``).

    ``model``: an encoder folder (a zoo task folder, holding its own head; or any encoder folder, e.g. a merge,
    with ``head`` given) or an in-memory encoder module (already on its device; ``device`` is then ignored).
    ``head``: a task folder or a ``Head`` (default: the head inside ``model``). ``task``: default the head's task;
    must match it. ``tokenizer``: default the model folder's, else the head folder's. ``max_length``: default the
    head's (its training truncation)."""
    if isinstance(model, (str, os.PathLike)):
        clf = load_classifier(model, device=device, head=head, dtype=dtype)
        encoder, tok, h = clf.encoder, clf.tokenizer, clf.head
    else:
        if head is None:
            raise CompressError("an in-memory encoder needs head= (a task folder or a Head)")
        encoder, h, tok = model, head if isinstance(head, Head) else Head.load(head), None
    tok = tokenizer or tok
    if tok is None:
        if h.source is None:
            raise CompressError("no tokenizer: pass tokenizer= or a head loaded from a task folder")
        tok = load_tokenizer(h.source)
    ev = TaskEvaluator(task or h.task_ref, split, tokenizer=tok, limit=limit, max_length=max_length or h.max_length,
                       batch_size=batch_size)
    return ev.evaluate(encoder, h)


def accuracy(model, head: str | os.PathLike | Head | None = None, task: Optional[str] = None, split: str = "test",
             limit: Optional[int] = None, batch_size: int = 128, device: str | torch.device = "cpu", **kw) -> float:
    """``evaluate(...).accuracy``: the fraction of rows whose argmax label is right."""
    return evaluate(model, head, task, split, limit, batch_size, device, **kw).accuracy
