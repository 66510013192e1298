"""Objectives for the search, built from the classification evaluators (``compress.eval.classify``).

A ``TaskObjective`` holds one task's dev rows, tokenized once and cut into batches that live on the encoder's
device, and that task's head; ``metrics(encoder)`` runs the encoder once and returns accuracy, cross-entropy loss
and KL(fine-tuned ‖ model) (the KL once ``set_reference`` has stored the fine-tuned model's logits). The value to
minimize is chosen by ``kind``:

* ``kl``: mean KL(p_ft ‖ p) over the rows: how far the pruned model's predictions are from the fine-tuned
  model's (smooth, and what "keep the individual accuracy" asks for; the default);
* ``loss``: mean cross-entropy against the labels;
* ``accuracy``: −accuracy, ties broken by the KL (× 1e-3), so a flat stretch of equal accuracies still has a
  downhill direction.

``MeanObjective`` averages several tasks (merging, interpolation with tasks to keep).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from compress.errors import CompressError

Kind = Literal["kl", "loss", "accuracy"]
KINDS = ("kl", "loss", "accuracy")


class TaskObjective:
    def __init__(self, evaluator, head, encoder, kind: Kind = "kl", batch_size: int = 256,
                 rows: Optional[torch.Tensor] = None):
        """``rows``: indices of the evaluator's rows to score (default all), e.g. one half of a split dev set."""
        from compress.eval.classify import _device_of

        if kind not in KINDS:
            raise CompressError(f"objective: unknown kind '{kind}' (choose {', '.join(KINDS)})")
        if head.task != evaluator.task:
            raise CompressError(f"objective: head of task '{head.task}' given for task '{evaluator.task}'")
        self.task, self.kind, self.head = evaluator.task, kind, head
        self.split = evaluator.split
        data = evaluator.data
        device = _device_of(encoder)
        rows = torch.arange(len(data)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= len(data):
            raise CompressError(f"objective: rows of task '{self.task}' must be indices in [0, {len(data)})")
        order = rows[torch.argsort(data.lengths[rows], descending=True, stable=True)]  # less padding per batch
        self.batches = [data.batch(idx, device) for idx in order.split(batch_size)]
        self.labels = data.labels[order].to(device)
        self.reference: Optional[torch.Tensor] = None

    @torch.no_grad()
    def logits(self, encoder) -> torch.Tensor:
        from compress.eval.classify import pooled_output

        was = encoder.training
        encoder.eval()
        try:
            return torch.cat([self.head.logits(pooled_output(encoder, b)) for b in self.batches]).float()
        finally:
            encoder.train(was)

    def set_reference(self, encoder) -> None:
        """Store the log-probabilities of ``encoder`` (the fine-tuned model) as the KL reference."""
        self.reference = torch.log_softmax(self.logits(encoder), -1)

    def metrics(self, encoder) -> dict[str, float]:
        logp = torch.log_softmax(self.logits(encoder), -1)
        out = {"acc": float((logp.argmax(-1) == self.labels).float().mean()),
               "loss": float(torch.nn.functional.nll_loss(logp, self.labels))}
        if self.reference is not None:
            out["kl"] = float((self.reference.exp() * (self.reference - logp)).sum(-1).mean())
        return out

    def value(self, m: dict[str, float]) -> float:
        if self.kind == "kl" and "kl" not in m:
            raise CompressError(f"objective kl on task '{self.task}' needs the fine-tuned reference "
                                "(set_reference)")
        if self.kind == "kl":
            return m["kl"]
        if self.kind == "loss":
            return m["loss"]
        return -m["acc"] + 1e-3 * m.get("kl", m["loss"])

    def __call__(self, encoder) -> tuple[float, dict]:
        m = self.metrics(encoder)
        return self.value(m), m


class MeanObjective:
    """The mean of several tasks' values (each task's own head); metrics per task and their mean accuracy."""

    def __init__(self, objectives: list[TaskObjective]):
        if not objectives:
            raise CompressError("objective: no tasks to evaluate")
        self.objectives = objectives

    def __call__(self, encoder) -> tuple[float, dict]:
        vals, metrics = [], {}
        for o in self.objectives:
            v, m = o(encoder)
            vals.append(v)
            metrics[o.task] = m
        metrics["mean_acc"] = sum(m["acc"] for m in metrics.values()) / len(self.objectives)
        return sum(vals) / len(vals), metrics
