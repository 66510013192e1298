"""Each task's official metric (task.json "metric"): MCC for CoLA, binary F1 of label 1 for MRPC, accuracy
elsewhere, computed through sklearn.metrics and checked here against a confusion matrix worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from compress.data import TASKS, task_info, task_metric
from compress.errors import CompressError
from compress.eval.classify import ClassifyResult
from compress.eval.metrics import official_metric

# TP = 3, FN = 1 (label 1), FP = 2, TN = 4 (label 0)
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def test_mcc_f1_and_accuracy_of_a_hand_computed_confusion_matrix():
    # MCC = (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 − 2) / √(5·4·6·5) = 10 / √600 = 1/√6
    assert official_metric("mcc", LABELS, PREDS) == pytest.approx(1 / math.sqrt(6), abs=1e-12)
    # F1 of label 1 = 2TP / (2TP + FP + FN) = 6/9; label 0's would be 8/11, the macro mean 0.6970
    assert official_metric("f1", LABELS, PREDS) == pytest.approx(2 / 3, abs=1e-12)
    assert official_metric("accuracy", LABELS, PREDS) == pytest.approx(0.7)
    # tensors as the evaluator holds them give the same
    assert official_metric("mcc", torch.tensor(LABELS), torch.tensor(PREDS)) == pytest.approx(1 / math.sqrt(6))
    # a constant prediction: MCC 0 (sklearn's definition), F1 0 (no positive predicted)
    assert official_metric("mcc", LABELS, [0] * 10) == 0.0
    assert official_metric("f1", LABELS, [0] * 10) == 0.0
    # a perfect one, and a perfectly wrong one
    assert official_metric("mcc", LABELS, LABELS) == pytest.approx(1.0)
    assert official_metric("mcc", LABELS, [1 - v for v in LABELS]) == pytest.approx(-1.0)
    for metric, labels, preds, msg in [("f1", [0, 2], [0, 1], "must be 0 or 1"),
                                       ("mcc", [0, 1], [0], "2 labels and 1 predictions"),
                                       ("auc", [0, 1], [0, 1], "unknown metric 'auc'")]:
        with pytest.raises(CompressError, match=msg):
            official_metric(metric, labels, preds)


def test_classify_result_reports_the_official_metric_beside_accuracy():
    res = ClassifyResult("cola", "test", 10, 7, torch.tensor(PREDS), metric="mcc", labels=torch.tensor(LABELS))
    d = res.as_dict()
    assert d["accuracy"] == 0.7 and d["metric"] == "mcc" and d["mcc"] == pytest.approx(1 / math.sqrt(6))
    assert res.summary() == "cola test: accuracy 0.7000 (7/10), MCC 0.4082"
    res = ClassifyResult("mrpc", "dev", 10, 7, torch.tensor(PREDS), metric="f1", labels=torch.tensor(LABELS))
    assert res.as_dict()["f1"] == pytest.approx(2 / 3) and res.summary().endswith(", F1 0.6667")
    res = ClassifyResult("trec", "test", 10, 7, torch.tensor(PREDS), labels=torch.tensor(LABELS))
    assert res.as_dict() == {"task": "trec", "split": "test", "n": 10, "correct": 7, "accuracy": 0.7,
                             "metric": "accuracy"}
    assert res.summary() == "trec test: accuracy 0.7000 (7/10)"


def test_bundled_tasks_name_their_metric():
    assert task_metric("cola") == "mcc" and task_metric("mrpc") == "f1"
    assert all(task_metric(t) == "accuracy" for t in TASKS if t not in ("cola", "mrpc"))
    assert task_info("mrpc")["metric"] == "f1"


def _task_folder(root, name, **fields):
    folder = root / "tasks" / name
    folder.mkdir(parents=True)
    info = {"name": name, "labels": ["0", "1"], "pair": False, **fields}
    (folder / "task.json").write_text(json.dumps(info))
    return folder / "task.json"


def test_task_json_metric_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path))
    (tmp_path / "model").mkdir()
    _task_folder(tmp_path, "sst2")  # no metric: accuracy
    assert task_metric("sst2") == "accuracy"
    bad_name = _task_folder(tmp_path, "cola", metric="auc")
    bad_f1 = _task_folder(tmp_path, "trec", metric="f1", labels=["a", "b", "c"])
    for task, path, msg in [("cola", bad_name, "'metric' must be one of accuracy, mcc, f1 (got 'auc')"),
                            ("trec", bad_f1, "'metric' f1 is the binary F1 of label 1: it needs two labels, not 3")]:
        # the CLI reads task.json before it loads any model: one line naming the file and the field
        code, out, err = run_cli("eval", tmp_path / "model", "--task", task)
        assert code == 2 and err == f"error: {path}: {msg}\n", err
        assert out == ""
