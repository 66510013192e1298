"""The minilm-8task zoo model (quick build of two tasks on the real all-MiniLM-L6-v2 and real task data), the
classification evaluator, `compress zoo` and `compress eval`, and the stories260k zoo builder."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import PATH_TASKS, QUICK_TASKS, run_cli, zoo_of

from compress.config import ClassifierTrain, MiniLMRecipe
from compress.data import TASKS, load_task, task_dir, task_info
from compress.errors import CompressError
from compress.eval.classify import (
    Head,
    TaskEvaluator,
    accuracy,
    evaluate,
    load_classifier,
    load_encoder,
    load_heads,
    pooled_output,
    set_encoder_weights,
)
from compress.io import open_checkpoint
from compress.io.files import load_recipe
from compress.taskvec import TaskVector
from compress.zoo import default_recipe
from compress.zoo.minilm import load_minilm_recipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on 2 cores shared with other work, two threads ran the quick build 3 to 6
    times slower (each waits for the other at every barrier); on an idle machine one thread costs little here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo_quick(minilm_zoo):
    """The shared quick minilm-8task zoo (conftest's ``minilm_zoo``): trec and subj, and two task folders by path
    that test_task_folders checks."""
    return minilm_zoo


ALL_TASKS = (*QUICK_TASKS, *PATH_TASKS)


def _label0_fraction(task: str, split: str, limit: int) -> float:
    with gzip.open(task_dir(task) / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        labels = [json.loads(line)["label"] for line in f if line.strip()][:limit]
    return labels.count(0) / len(labels)


def test_quick_build_beats_chance_on_held_out_data(zoo_quick):
    summary = json.loads((zoo_quick / "build.json").read_text())
    for task in QUICK_TASKS:
        test = summary["tasks"][task]["test"]
        # held-out test rows: well above the majority class (trec: 6 labels, subj: 2)
        assert test["n"] == 200 and test["accuracy"] > test["majority"] + 0.15, (task, test)
    # the evaluator reproduces the accuracy the build recorded, from the folder alone
    got = evaluate(zoo_quick / "trec", split="test", limit=200)
    assert got.correct == summary["tasks"]["trec"]["test"]["correct"]


def test_layout_and_task_vectors(zoo_quick):
    root = zoo_quick.parent
    assert sorted(p.name for p in root.iterdir()) == ["minilm-8task"]  # no temporary left beside it
    assert sorted(p.name for p in zoo_quick.iterdir()) == sorted(["base", *ALL_TASKS, "build.json", "results.md"])
    base = open_checkpoint(zoo_quick / "base")
    for task in QUICK_TASKS:
        folder = zoo_quick / task
        ft = open_checkpoint(folder)
        assert {n: base.info(n).shape for n in base.names()} == {n: ft.info(n).shape for n in ft.names()}
        for f in ("config.json", "tokenizer.json", "head.safetensors", "head.json", "README.md"):
            assert (folder / f).is_file(), f
        head = Head.load(folder)
        assert head.task == task and head.num_labels == len(task_info(task)["labels"])
        assert head.hidden_size == 384 and head.pooling == "mean" and head.max_length == 64
        tv = TaskVector.from_paths(base, folder)
        assert float(tv.get("pooler.dense.weight").abs().max()) == 0.0  # unused by mean pooling
        assert float(tv.get("encoder.layer.5.output.dense.weight").abs().max()) > 0
    assert set(load_heads(zoo_quick)) == set(ALL_TASKS)


def test_build_json(zoo_quick):
    s = json.loads((zoo_quick / "build.json").read_text())
    rec = load_recipe(default_recipe("minilm-8task"), MiniLMRecipe, quick=True)
    assert s["name"] == "minilm-8task" and s["quick"] is True and s["device"] == "cpu"
    # the task folders are given by path; their summaries go by the folder's name
    assert s["tasks_built"][:2] == list(QUICK_TASKS) and len(s["tasks_built"]) == len(ALL_TASKS)
    assert list(s["tasks"]) == list(ALL_TASKS)
    assert s["base"]["params"] == 22_713_216 and s["seconds"] > 0
    for task in ALL_TASKS:
        r = s["tasks"][task]
        # the quick recipe's 192 training rows and 100 dev rows; a task folder has 96 and 40
        rows, dev = (192, 100) if task in QUICK_TASKS else (96, 40)
        assert r["hyperparameters"] == rec.train.model_dump()
        assert r["train_rows"] == rows and r["steps"] == math.ceil(rows / 16) and r["train_seconds"] > 0
        assert r["dev"]["n"] == dev and 0 <= r["dev"]["accuracy"] <= 1
        assert r["target"] is None  # targets belong to the full build
    assert (zoo_quick / "results.md").read_text().count("\n| ") == 1 + len(ALL_TASKS)


def test_constant_head_known_answer_and_weight_swap(zoo_quick):
    encoder, tok = load_encoder(zoo_quick / "base")
    # a head that always says label 0 scores exactly the share of label-0 rows, counted here from the raw file
    bias = torch.full((6,), -1.0)
    bias[0] = 1.0
    always0 = Head(weight=torch.zeros(6, 384), bias=bias, task="trec", labels=[str(i) for i in range(6)],
                   max_length=64)
    assert accuracy(encoder, always0, split="dev", limit=150, tokenizer=tok) == pytest.approx(
        _label0_fraction("trec", "dev", 150), abs=0)
    # swapping the fine-tuned weights into the base encoder in memory == loading the fine-tuned folder
    ev = TaskEvaluator("trec", "test", tokenizer=tok, limit=100, max_length=64)
    clf = load_classifier(zoo_quick / "trec")
    set_encoder_weights(encoder, open_checkpoint(zoo_quick / "trec"))
    assert torch.equal(ev.evaluate(encoder, clf.head).predictions, ev.evaluate(clf.encoder, clf.head).predictions)
    with pytest.raises(CompressError, match="not given"):
        set_encoder_weights(encoder, {"pooler.dense.bias": torch.zeros(384)})
    with pytest.raises(CompressError, match="not 'subj'"):
        TaskEvaluator("subj", "dev", tokenizer=tok, limit=4).evaluate(encoder, clf.head)


def test_eval_cli(zoo_quick):
    trec = zoo_quick / "trec"
    code, out, err = run_cli("eval", trec, "--task", "trec", "--limit", "60", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["n"] == 60 and info["accuracy"] == evaluate(trec, limit=60).accuracy
    # a bare encoder folder (what a merge writes) scored with a task's head
    code, out, err = run_cli("eval", zoo_quick / "base", "--task", "trec", "--head", trec, "--limit", "60")
    assert code == 0, err
    assert out.startswith("trec test: accuracy ") and "/60)" in out
    bad = [
        (("eval", trec, "--task", "nope"), "unknown task 'nope' (choose one of sst2, trec"),
        (("eval", trec), "choose exactly one evaluator"),
        (("eval", trec, "--task", "trec", "--perplexity", "ptb.test"), "choose exactly one evaluator"),
        (("eval", zoo_quick / "base", "--task", "trec"), "no classification head"),
        (("eval", trec, "--task", "trec", "--split", "val"), "split"),
        (("eval", trec, "--task", "subj"), "head was trained for task 'trec'"),
    ]
    for args, msg in bad:
        code, out, err = run_cli(*args)
        assert code == 2 and msg in err and err.count("\n") == 1, (args, err)


def _confusion(labels: torch.Tensor, preds: torch.Tensor) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) with label 1 positive."""
    tp, fp = int(((preds == 1) & (labels == 1)).sum()), int(((preds == 1) & (labels == 0)).sum())
    fn, tn = int(((preds == 0) & (labels == 1)).sum()), int(((preds == 0) & (labels == 0)).sum())
    return tp, fp, fn, tn


def _balanced_head(encoder, tok, task: str, folder, limit: int, seed: int):
    """A random linear head for ``task`` whose bias splits the first ``limit`` test rows about in half, so that
    both labels are predicted and MCC / F1 are not degenerate."""
    ev = TaskEvaluator(task, "test", tokenizer=tok, limit=limit)
    w = torch.randn(2, encoder.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pooled = pooled_output(encoder, ev.data.batch(torch.arange(len(ev.data))))
    margin = pooled @ (w[1] - w[0])
    folder.mkdir()
    Head(w, torch.tensor([0.0, -float(margin.median())]), task=task, labels=["0", "1"]).save(folder)
    return folder


def test_eval_cli_reports_mcc_for_cola_and_f1_for_mrpc(zoo_quick, tmp_path):
    base = zoo_quick / "base"
    encoder, tok = load_encoder(base)
    n = 40  # rows: the balanced head predicts each label about n / 2 times
    for task, seed in (("cola", 0), ("mrpc", 1)):
        head = _balanced_head(encoder, tok, task, tmp_path / task, n, seed)
        res = evaluate(base, head=head, task=task, limit=n)
        tp, fp, fn, tn = _confusion(torch.tensor([r["label"] for r in load_task(task, "test", n)]),
                                    res.predictions)
        assert min(tp + fp, fn + tn) > 10, (tp, fp, fn, tn)  # both labels predicted
        if task == "cola":
            want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        else:
            want = 2 * tp / (2 * tp + fp + fn)
        # cola as JSON, mrpc as the printed line: the two outputs of the same evaluation
        code, out, err = run_cli("eval", base, "--task", task, "--head", head, "--limit", str(n),
                                 *(["--json"] if task == "cola" else []))
        assert code == 0, err
        if task == "cola":
            info = json.loads(out)
            assert info["metric"] == "mcc" and info["mcc"] == pytest.approx(want, abs=1e-12)
            assert info["accuracy"] == pytest.approx((tp + tn) / n)
        else:
            assert out.strip() == f"mrpc test: accuracy {(tp + tn) / n:.4f} ({tp + tn}/{n}), F1 {want:.4f}"


def test_zoo_cli_errors_and_list(zoo_quick):
    root = zoo_quick.parent
    for args, msg in [
        (("zoo", "build", "nope", "--out-root", root), "unknown zoo model 'nope'"),
        (("zoo", "build", "minilm-8task", "--quick", "--tasks", "trec", "--out-root", root), "already exists"),
        (("zoo", "build", "minilm-8task", "--quick", "--tasks", "trec,xyz", "--out-root", root / "x"),
         "unknown task 'xyz'"),
    ]:
        code, _, err = run_cli(*args)
        assert code == 2 and msg in err and err.count("\n") == 1, (args, err)
    assert not (root / "x").exists()
    code, out, _ = run_cli("zoo", "list", "--out-root", root, "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["minilm-8task"]["built"] == "quick" and rows["stories260k"]["built"] is None


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import compress.zoo.minilm as minilm

    def boom(*a, **k):
        raise CompressError("boom")

    monkeypatch.setattr(minilm, "finetune_task", boom)
    code, _, err = run_cli("zoo", "build", "minilm-8task", "--quick", "--tasks", "trec", "--out-root", tmp_path)
    assert code == 2 and "boom" in err
    assert list(tmp_path.iterdir()) == []


def test_finetune_is_deterministic():
    from compress.zoo.minilm import finetune_task, pretrained_dir

    p = ClassifierTrain(epochs=1, lr=1e-4, head_lr=1e-2, batch_size=8, max_length=32, train_limit=16)
    runs = [finetune_task(pretrained_dir(), "sst2", p, seed=3, quiet=True) for _ in range(2)]
    (e1, h1, s1), (e2, h2, s2) = runs
    assert s1["steps"] == 2 and s1["epoch_losses"] == s2["epoch_losses"]
    assert torch.equal(h1.weight, h2.weight) and torch.equal(h1.bias, h2.bias)
    assert all(torch.equal(a, b) for a, b in zip(e1.state_dict().values(), e2.state_dict().values()))


def test_task_data_and_recipe_errors(tmp_path):
    assert len(TASKS) == 8
    rows = load_task("mrpc", "dev", limit=3)
    assert len(rows) == 3 and all("text_pair" in r and isinstance(r["label"], int) for r in rows)
    assert len(load_task("trec", "test")) == task_info("trec")["rows"]["test"]
    with pytest.raises(CompressError, match=r"unknown task 'imdb' \(choose one of sst2, trec"):
        load_task("imdb", "train")
    with pytest.raises(CompressError, match=r"unknown split 'validation' \(choose one of train, dev, test\)"):
        load_task("sst2", "validation")
    full = load_recipe(default_recipe("minilm-8task"), MiniLMRecipe)
    assert full.tasks == list(TASKS) and full.train.epochs == 3 and full.train.lr == 3e-5
    assert full.train.batch_size == 32 and full.train.max_length == 128 and set(full.targets) == set(TASKS)
    bad = tmp_path / "bad.yml"
    bad.write_text("name: minilm-8task\ntasks: [sst2]\ntrain: {lr: -1}\n")
    with pytest.raises(CompressError, match=r"bad.yml: train.lr: .*greater than 0"):
        load_recipe(bad, MiniLMRecipe)
    with pytest.raises(CompressError, match="no quick: section"):
        load_recipe(bad, MiniLMRecipe, quick=True)
    bad.write_text("name: minilm-8task\ntasks: [sst2, sst3]\n")
    with pytest.raises(CompressError, match="bad.yml: tasks: unknown task 'sst3'"):
        load_minilm_recipe(bad)
    bad.write_text("name: minilm-8task\ntasks: [sst2]\nper_task: {sst2: {epochs: 0}}\n")
    with pytest.raises(CompressError, match="per_task.sst2: epochs"):
        load_recipe(bad, MiniLMRecipe)


def test_stories260k_zoo_build(tmp_path):
    from compress.eval.perplexity import load_causal_lm

    code, out, err = run_cli("zoo", "build", "stories260k", "--out-root", tmp_path)
    assert code == 0, err
    s = json.loads((tmp_path / "stories260k" / "build.json").read_text())
    assert s["params"] == 260_032 and 1 < s["check"]["perplexity"] < 1000 and len(s["source"]["model_sha256"]) == 64
    model, tok = load_causal_lm(tmp_path / "stories260k")
    assert model.config.num_hidden_layers == 5 and tok("Once upon a time")["input_ids"][0] == 1
    code, out, err = run_cli("eval", tmp_path / "stories260k", "--perplexity", "shakespeare", "--max-tokens", "4096",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(s["check"]["perplexity"], rel=1e-6)


def test_carry_splits_the_pretrained_model_losslessly(tmp_path, monkeypatch):
    """`python3 -m compress.bench.carry minilm-8task`: two folders under 64 MiB each that, copied together, are the
    model."""
    import shutil

    from compress.zoo.minilm import pretrained_dir

    r = subprocess.run([sys.executable, "-m", "compress.bench.carry", "minilm-8task", "--out", str(tmp_path / "carry")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "minilm-a:" in r.stdout and "minilm-b:" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "compress.bench.carry", "stories260k", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'stories260k'" in bad.stderr
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli("zoo", "carry", "minilm-8task", "--out", tmp_path / "cli")  # not a product command
    assert code == 2 and "No such command 'carry'" in err and not (tmp_path / "cli").exists()
    joined = tmp_path / "joined"
    joined.mkdir()
    for part in ("minilm-a", "minilm-b"):
        folder = tmp_path / "carry" / part
        assert sum(p.stat().st_size for p in folder.iterdir()) < 60 * 2**20
        for p in folder.iterdir():
            shutil.copy(p, joined / p.name)
    # the task data ships in the package: only the model travels
    assert sorted(p.name for p in (tmp_path / "carry").iterdir()) == ["minilm-a", "minilm-b"]
    original = open_checkpoint(pretrained_dir())
    monkeypatch.setenv("COMPRESS_MINILM", str(joined))
    assert pretrained_dir() == joined
    again = open_checkpoint(joined)
    assert sorted(again.names()) == sorted(original.names())
    assert all(torch.equal(again.get(n), original.get(n)) for n in original.names())
    monkeypatch.setenv("COMPRESS_MINILM", str(tmp_path / "nowhere"))
    with pytest.raises(CompressError, match="COMPRESS_MINILM"):
        pretrained_dir()


def _zoo_with_cola(zoo_quick, root):
    """The quick zoo's tasks plus a 'cola' model (subj's encoder with a cola head), as links: a task whose official
    metric (MCC) is not accuracy, at no training cost."""
    zoo = zoo_of(zoo_quick, QUICK_TASKS, root)
    (zoo / "cola").mkdir()
    for f in (zoo_quick / "subj").iterdir():
        if not f.name.startswith("head."):
            (zoo / "cola" / f.name).symlink_to(f)
    subj = Head.load(zoo_quick / "subj")
    Head(subj.weight, subj.bias, task="cola", labels=["0", "1"]).save(zoo / "cola")
    return zoo


def test_bench_merge_table_on_the_quick_zoo(zoo_quick, tmp_path):
    """One `bench merge` run over the quick zoo and a 'cola' model: every row, λ chosen on dev, and a cola MCC column
    beside cola's accuracy. Few rows: the rows' scores are compared with the evaluator's on the same rows, not
    judged for quality."""
    from compress.bench.merge import run

    zoo = _zoo_with_cola(zoo_quick, tmp_path / "zoo")
    report = run("minilm-8task", zoo_root=zoo.parent, results=tmp_path / "r", dev_limit=10, test_limit=20,
                 lambdas=(0.5, 1.0), quiet=True, quick=True)
    tasks = [*QUICK_TASKS, "cola"]
    assert report["tasks"] == tasks and report["official_metrics"] == {"cola": "mcc"}
    rows = report["rows"]
    assert list(rows) == ["zero-shot", "individual fine-tuned", "simple average", "task arithmetic", "TIES",
                          "DARE-TIES", "TSV-M", "Iso-C", "Iso-CTS", "WUDI", "AdaMerging"]
    assert all(set(r["official"]) == {"cola"} for r in rows.values())
    assert rows["individual fine-tuned"]["normalized_avg"] == pytest.approx(1.0)
    # the two real fine-tunes, against the pretrained encoder with their own heads (cola's stand-in is not one)
    assert sum(rows["individual fine-tuned"]["acc"][t] - rows["zero-shot"]["acc"][t] for t in QUICK_TASKS) > 0
    for r in rows.values():
        assert r["avg"] == pytest.approx(sum(r["acc"][t] for t in tasks) / 3)
    for name in ("task arithmetic", "TIES", "DARE-TIES", "TSV-M", "Iso-C", "Iso-CTS", "WUDI"):
        assert rows[name]["lambda"] in (0.5, 1.0)
        best = rows[name]["dev_by_lambda"][str(rows[name]["lambda"])]
        assert best == max(rows[name]["dev_by_lambda"].values())
    want = {"zero-shot": evaluate(zoo / "base", head=zoo / "cola", limit=20),
            "individual fine-tuned": evaluate(zoo / "cola", limit=20)}
    for name, res in want.items():
        assert rows[name]["acc"]["cola"] == res.accuracy and rows[name]["official"]["cola"] == res.official
    # the subspace and test-time rows, each with its merge's seconds; AdaMerging's λ is learned, not searched
    for name in ("TSV-M", "Iso-C", "Iso-CTS", "WUDI", "AdaMerging"):
        assert rows[name]["merge_seconds"] > 0, name
    assert rows["AdaMerging"]["settings_tried"][0]["params"] == {"steps": 5}
    saved = json.loads((tmp_path / "r" / "merge_minilm-8task.json").read_text())
    assert saved["rows"]["TIES"]["acc"] == rows["TIES"]["acc"]
    assert saved["rows"]["TIES"]["official"] == rows["TIES"]["official"]
    md = (tmp_path / "r" / "merge_minilm-8task.md").read_text()
    assert "| TIES |" in md and "normalized avg" in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert header.startswith("| method | trec | subj | cola | cola MCC | avg |") and header.endswith("| λ | merge s |")
    ada = next(line for line in lines if line.startswith("| AdaMerging |")).split(" | ")
    assert ada[-2] == "learned"
    zero = next(line for line in lines if line.startswith("| zero-shot |")).split(" | ")
    assert zero[3:5] == [f"{100 * want['zero-shot'].accuracy:.1f}", f"{100 * want['zero-shot'].official:.1f}"]
    assert (tmp_path / "r" / "merge_minilm-8task.png").stat().st_size > 10_000
