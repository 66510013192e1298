"""Tasks from any data folder: discovery under the data root, a task folder given by path, strict task.json
validation, and a minilm zoo built (quick, on the CPU) from a task folder outside the bundled ones, then scored
with `compress eval --task <path>`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PATH_TASKS, make_task, run_cli, zoo_of

from compress.data import TASKS, load_task, task_dir, task_info, task_names
from compress.errors import CompressError
from compress.eval.classify import Head, evaluate, load_heads


def test_tasks_under_the_data_root_are_discovered(tmp_path, monkeypatch):
    assert task_names() == list(TASKS)
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path))
    make_task(tmp_path / "tasks" / "things")
    make_task(tmp_path / "tasks" / "sst2")
    (tmp_path / "tasks" / "notes").mkdir()  # no task.json: not a task
    assert task_names() == ["sst2", "things"]
    assert task_info("things")["name"] == "things" and len(load_task("things", "dev")) == 40
    assert len(load_task(tmp_path / "tasks" / "things", "train", limit=5)) == 5  # the same task by path
    with pytest.raises(CompressError, match=r"unknown task 'notes' \(choose one of sst2, things, or give the path"):
        task_dir("notes")


BAD = [  # (task.json fields over a valid one, or a raw file text, and the message naming the field)
    ({"labels": ["a"]}, "'labels' must be a list of 2 to 1000 label names"),
    ({"labels": ["a", "a"]}, "'labels' lists a name twice"),
    ({"labels": ["a", 3]}, "labels[1] must be a printable string"),
    ({"labels": ["a", "b\x1b[2J"]}, "labels[1] must be a printable string"),
    ({"pair": "yes"}, "'pair' must be true (rows are text pairs) or false"),
    ({"metric": "auc"}, "'metric' must be one of accuracy, mcc, f1 (got 'auc')"),
    ({"rows": {"val": 3}}, "rows: unknown split 'val'"),
    ({"rows": {"dev": -1}}, "rows.dev must be a positive integer (got -1)"),
    ({"rows": {"dev": 7}}, "dev.jsonl.gz: task.json rows.dev says 7, the file has 40 rows"),
    ({"name": "other"}, "'name' is 'other', but the folder is 'mine'"),
    ({"script": "rm -rf /"}, "unknown field 'script'"),
    ({"description": ["x"]}, "'description' must be a string"),
    ({"pair": True}, "dev.jsonl.gz:1: task.json says pair true, but this row has no 'text_pair'"),
    ("[1, 2]", "must be a JSON object"),
    ("{labels", "cannot read as JSON"),
]


@pytest.mark.parametrize("change, msg", BAD)
def test_task_json_is_validated_strictly(tmp_path, change, msg):
    folder = make_task(tmp_path / "mine")
    if isinstance(change, str):
        (folder / "task.json").write_text(change)
    else:
        info = json.loads((folder / "task.json").read_text())
        (folder / "task.json").write_text(json.dumps({**info, **change}))
    # the CLI reads the task before it loads any model: one line naming the file and the field
    code, out, err = run_cli("eval", tmp_path / "model", "--task", str(folder), "--split", "dev")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {folder}") and msg in err, err


def test_task_folder_errors(tmp_path):
    for ref, msg in [(tmp_path / "none", "no such task folder"), (tmp_path, r"not a task folder \(no task.json\)")]:
        with pytest.raises(CompressError, match=msg):
            task_dir(ref)
    folder = make_task(tmp_path / "-odd name", n=(4, 4, 4))
    with pytest.raises(CompressError, match=r"the folder's name: '-odd name' is not a task name"):
        task_dir(folder)
    folder = make_task(tmp_path / "nodev", n=(4, 4, 4))
    (folder / "dev.jsonl.gz").unlink()
    with pytest.raises(CompressError, match=r"nodev: no dev split \(dev.jsonl.gz or dev.jsonl\)"):
        load_task(folder, "dev")
    (folder / "test.jsonl").write_text('{"text": "a", "label": 2}\n')
    with pytest.raises(CompressError, match=r"test.jsonl:1: label 2 is not an integer in \[0, 2\)"):
        load_task(folder, "test")
    head = tmp_path / "head"
    head.mkdir()
    Head(torch.zeros(2, 4), torch.zeros(2), task="ok", labels=["a", "b"]).save(head)
    meta = json.loads((head / "head.json").read_text())
    (head / "head.json").write_text(json.dumps({**meta, "task": "../../etc"}))
    with pytest.raises(CompressError, match=r"head.json: task: '../../etc' is not a task name"):
        Head.load(head)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zoo_from_task_folders_then_eval_and_bench_by_path(minilm_zoo, minilm_task_folders, tmp_path, one_thread):
    """The zoo recipe, quick, on the CPU, over two tasks the project has never seen, given by path (the shared quick
    zoo, built beside two bundled tasks given by name); then `compress eval --task <path>` and the NPS merge protocol
    of `compress bench nps` on them."""
    zoo = minilm_zoo
    task, other = minilm_task_folders["things"], minilm_task_folders["kit"]
    assert sorted(p.name for p in zoo.iterdir()) == ["base", "build.json", "kit", "results.md", "subj", "things",
                                                     "trec"]
    head = Head.load(zoo / "things")
    assert head.task == "things" and head.task_path == str(task.resolve()) and head.labels == ["a", "b"]
    assert Head.load(zoo / "trec").task_path is None  # a bundled task, by name
    assert list(load_heads(zoo)) == ["trec", "subj", "kit", "things"]  # the bundled tasks first, then by name
    build = json.loads((zoo / "build.json").read_text())
    assert build["tasks"]["things"]["data"] == str(task.resolve())
    code, out, err = run_cli("eval", zoo / "things", "--task", str(task), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["task"] == "things" and info["n"] == 60 and info["accuracy"] >= 0.8, info  # chance is 0.5
    # the head knows where its task lives: the Python API needs no task argument
    assert evaluate(zoo / "things").accuracy == info["accuracy"]
    # by name, the task is not one of the data root's
    code, out, err = run_cli("eval", zoo / "things", "--task", "things")
    assert code == 2 and "unknown task 'things'" in err and err.count("\n") == 1
    # a task folder named like the zoo's own folder is refused before anything is written
    base_task = make_task(tmp_path / "data2" / "base", n=(4, 4, 4))
    code, out, err = run_cli("zoo", "build", "minilm-8task", "--quick", "--tasks", str(base_task), "--out-root",
                             tmp_path / "zoo2")
    assert code == 2 and "would be built into base/, the zoo's own folder" in err and err.count("\n") == 1
    assert not (tmp_path / "zoo2").exists()
    # the bench runs on every task of a zoo: a zoo of the two task folders only
    by_path = zoo_of(zoo, PATH_TASKS, tmp_path / "by-path")
    _bench_merge_protocol(by_path.parent, tmp_path / "bench")
    _merge_command_protocol(zoo, task, other, tmp_path)


def _bench_merge_protocol(root, results):
    """Two seeds at a tiny budget; a candidate of enormous strength never leaves TIES."""
    code, out, err = run_cli("bench", "nps", "--zoo-root", root, "--results", results, "--parts", "merge",
                             "--dev-limit", "16", "--test-limit", "10", "--merge-seeds", "0,1", "--merge-budget", "4",
                             "--merge-checkpoints", "2", "--merge-strength", "0,1000000", "--merge-lambdas", "0.5,1,2",
                             "--quiet")
    assert code == 0, err
    mg = json.loads((results / "nps_minilm-8task.json").read_text())["merge"]
    assert mg["tasks"] == ["kit", "things"] and [r["seed"] for r in mg["runs"]] == [0, 1]
    assert all(set(r["ties_dev_by_lambda"]) == {"0.5", "1.0", "2.0"} for r in mg["runs"])  # --merge-lambdas
    assert {"task arithmetic", "TIES", "DARE-TIES", "individual"} <= set(mg["baselines"])
    for r in mg["runs"]:
        assert r["chosen"] in ("nps", "ties") and r["budget"] in (2, 4) and len(r["candidates"]) == 2
        same = "NPS search" if r["chosen"] == "nps" else "TIES (λ on dev)"
        assert r["rows"]["NPS protocol"] == r["rows"][same]
        assert r["chosen"] == "ties" or r["validation"]["nps"] > r["validation"]["ties"]
        stiff = r["candidates"][1]
        assert stiff["strength"] == 1e6 and set(stiff["validation"]["by_budget"].values()) == {
            stiff["validation"]["ties"]}
    avgs = [r["rows"]["NPS protocol"]["avg"] for r in mg["runs"]]
    s = mg["summary"]["NPS protocol"]
    assert s["avg"] == pytest.approx(sum(avgs) / 2) and s["avg_sd"] == pytest.approx(abs(avgs[0] - avgs[1]) / 2 ** 0.5)
    md = (results / "nps_minilm-8task.md").read_text()
    assert "| NPS protocol |" in md and " ± " in md and "| TIES (λ on dev) |" in md


def _merge_command_protocol(zoo, task, other, tmp_path):
    """`compress merge` with an NPS recipe that anchors on TIES: at an enormous strength the search cannot beat
    TIES on validation, so the model written is TIES at the λ the whole dev split chose, as `compress merge
    --method ties` writes it."""
    import re

    from compress.io.reader import open_checkpoint

    recipe = tmp_path / "nps.yml"
    recipe.write_text(json.dumps({
        "method": "nps", "base": str(zoo / "base"), "models": [str(zoo / "kit"), str(zoo / "things")],
        "tasks": [str(other), str(task)], "density": 0.2, "out": str(tmp_path / "merged"),
        "search": {"anchor": "ties", "regularize": 1e6, "combine": "ties", "task_weights": "per_task",
                   "grouping": "layer", "parts": 1, "budget": 2, "dev_limit": 16, "objective": "accuracy"}}))
    code, out, err = run_cli("merge", recipe)
    assert code == 0, err
    # the summary line goes to stderr with the progress output, wrapped to the console's width
    lam = re.search(r"kept TIES at λ ([0-9.]+) \(validation half: TIES ([0-9.]+), NPS ([0-9.]+)", " ".join(err.split()))
    assert lam and lam[2] == lam[3], err
    code, _, err = run_cli("merge", "--method", "ties", "--base", zoo / "base", "--models", zoo / "kit",
                           zoo / "things", "--density", "0.2", "--lambda", lam[1], "--out", tmp_path / "ties")
    assert code == 0, err
    got, want = open_checkpoint(tmp_path / "merged"), open_checkpoint(tmp_path / "ties")
    # the search evaluates TIES with λ folded into its own arithmetic: float order may flip an entry whose
    # election or trim sits on a boundary (measured: at most 0.04% of a matrix's entries, 5.5e-5 at most)
    for name in want.names():
        a, b = got.get(name), want.get(name)
        off = (a - b).abs() > 1e-6
        assert off.float().mean() <= 1e-3 and (a - b).norm() <= 1e-3 * b.norm(), name
