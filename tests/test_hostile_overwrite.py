"""An output never replaces, holds or lies inside an input, with or without --overwrite (issue 17, item 7), and
never is the working folder or one of its parents (item 9): one line naming both paths, nothing touched."""

import os

import pytest

from tests.conftest import finetune_like, run_cli, save_llama


def _snapshot(root):
    """Every file under ``root`` (hidden temporaries included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    base = save_llama(root / "base", seed=0)
    ft = finetune_like(base, root / "ft")
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", root / "d.safetensors")[0] == 0
    (root / "requests.jsonl").write_text('{"id": "a", "sparsity": 0.5}\n')
    (root / "scores.safetensors").write_bytes(b"not read: the output is refused first")
    (root / "link").symlink_to(root / "base", target_is_directory=True)
    return root


# (command line, the output, the input it would destroy, how the message describes the output)
CASES = {
    "extract into the fine-tuned folder": (
        "extract --base {r}/base --finetuned {r}/ft --out {r}/ft/model.safetensors",
        "{r}/ft/model.safetensors", "{r}/ft", "lies inside the input"),
    "extract over the fine-tuned file": (
        "extract --base {r}/base --finetuned {r}/ft/model.safetensors --out {r}/ft/model.safetensors",
        "{r}/ft/model.safetensors", "{r}/ft/model.safetensors", "is the input"),
    "apply over the base": (
        "apply --base {r}/base --delta {r}/d.safetensors --out {r}/base", "{r}/base", "{r}/base", "is the input"),
    "apply over the delta": (
        "apply --base {r}/base --delta {r}/d.safetensors --out {r}/d.safetensors", "{r}/d.safetensors",
        "{r}/d.safetensors", "is the input"),
    "merge over the folder holding the models": (
        "merge --base {r}/base --models {r}/ft --method task_arithmetic --out {r}", "{r}", "{r}/base",
        "holds the input"),
    "interpolate through a symlink to the base": (
        "interpolate --base {r}/base --finetuned {r}/ft --alpha 0.5 --out {r}/link", "{r}/link", "{r}/base",
        "is the input"),
    "prune over the model": (
        "prune {r}/base --method magnitude --sparsity 0.5 --out {r}/base", "{r}/base", "{r}/base", "is the input"),
    "prune's sparse file into the model": (
        "prune {r}/base --method magnitude --sparsity 0.5 --out {r}/p --sparse-out {r}/base/model.safetensors",
        "{r}/base/model.safetensors", "{r}/base", "lies inside the input"),
    "prune over its calibration text": (
        "prune {r}/base --method magnitude --sparsity 0.5 --calib {r}/requests.jsonl --out {r}/requests.jsonl",
        "{r}/requests.jsonl", "{r}/requests.jsonl", "is the input"),
    "extract-lora over the fine-tuned model": (
        "extract-lora --base {r}/base --finetuned {r}/ft --out {r}/ft", "{r}/ft", "{r}/ft", "is the input"),
    "heads reinforce over the model": (
        "heads reinforce {r}/base --scores {r}/scores.safetensors --out {r}/base", "{r}/base", "{r}/base",
        "is the input"),
    "batch over the requests": (
        "batch {r}/base --stratnet {r}/scores.safetensors --requests {r}/requests.jsonl --out {r}/requests.jsonl",
        "{r}/requests.jsonl", "{r}/requests.jsonl", "is the input"),
    "strategy train into the model": (
        "strategy train {r}/base --out {r}/base/stratnet.pt", "{r}/base/stratnet.pt", "{r}/base",
        "lies inside the input"),
}


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_output_that_is_holds_or_lies_inside_an_input_is_refused(world, case, overwrite):
    line, out, victim, how = (s.format(r=world) for s in CASES[case])
    before = _snapshot(world)
    code, _, err = run_cli(*line.split(), *(["--overwrite"] if overwrite else []))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {out}: {how} {victim}")
    assert _snapshot(world) == before  # every input byte for byte, and no temporary anywhere


@pytest.mark.parametrize("out", [".", "..", "sub/..", "CWD", "PARENT"])
def test_output_naming_the_working_folder_or_a_parent_is_refused(world, monkeypatch, out):
    work = world / "work"
    (work / "sub").mkdir(parents=True, exist_ok=True)
    (work / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    out = {"CWD": str(work), "PARENT": str(world)}.get(out, out)
    before = _snapshot(world)
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli("interpolate", "--base", world / "base", "--finetuned", world / "ft", "--alpha", "0.5",
                               "--out", out, *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0] == f"error: {out}: is the working folder or holds it; name a new folder or file to write"
    assert _snapshot(world) == before


def test_outputs_beside_inputs_still_work_and_overwrite_replaces_an_output(world, monkeypatch):
    monkeypatch.chdir(world)
    # a weights file alone guards itself, not the folder it sits in
    code, _, err = run_cli("extract", "--base", "base/model.safetensors", "--finetuned", "ft/model.safetensors",
                           "--out", "base/delta.safetensors")
    assert code == 0, err
    for alpha in ("0.5", "1"):
        code, _, err = run_cli("interpolate", "--base", "base", "--finetuned", "ft", "--alpha", alpha, "--out", "o",
                               "--overwrite")
        assert code == 0, err
    assert "(α = 1)" in (world / "o" / "README.md").read_text()
    assert not [p for p in os.listdir(world) if p.startswith(".")]
