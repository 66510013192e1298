"""A task's official metric from its labels and predictions, through ``sklearn.metrics``: the numbers GLUE reports,
Matthews correlation for CoLA and the F1 of the positive class (label 1) for MRPC; accuracy elsewhere.

The metric of each task is named in its ``task.json`` (``compress.data.task_metric``)."""

from __future__ import annotations

from typing import Sequence

from compress.data import METRICS
from compress.errors import CompressError

LABELS = {"accuracy": "accuracy", "mcc": "MCC", "f1": "F1"}  # how tables and printed lines name them
assert set(LABELS) == set(METRICS)


def official_metric(metric: str, labels: Sequence[int], predictions: Sequence[int]) -> float:
    """``metric`` (accuracy, mcc or f1) of integer ``predictions`` against ``labels`` (sequences or 1-D tensors).

    mcc: ``matthews_corrcoef`` (0 when either side is constant, as sklearn defines it); f1: binary F1 of label 1,
    0 when there is no positive label or prediction at all (sklearn's ``zero_division=0``)."""
    y = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    p = [int(v) for v in (predictions.tolist() if hasattr(predictions, "tolist") else predictions)]
    if len(y) != len(p) or not y:
        raise CompressError(f"{metric}: {len(y)} labels and {len(p)} predictions (need the same number, at least 1)")
    if metric == "accuracy":
        return sum(a == b for a, b in zip(y, p)) / len(y)
    # imported here: sklearn.metrics takes seconds to import, and only these two metrics need it
    from sklearn.metrics import f1_score, matthews_corrcoef

    if metric == "mcc":
        return float(matthews_corrcoef(y, p))
    if metric == "f1":
        if any(v not in (0, 1) for v in (*y, *p)):
            raise CompressError("f1 is the binary F1 of label 1: labels and predictions must be 0 or 1")
        return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
    raise CompressError(f"unknown metric '{metric}' (choose one of {', '.join(METRICS)})")
