"""Shared fixtures: tiny random Hugging Face models built here, never downloaded."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COMPRESS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def save_llama(path: Path, seed: int, dtype=torch.float32, **kw) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype)
    model.save_pretrained(path)
    return path


def finetune_like(base: Path, out: Path, scale: float = 0.01, seed: int = 1, dtype=None) -> Path:
    """A 'fine-tuned' copy of ``base``: every float weight moved by a small random delta."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = save_llama(root / "base", seed=0)
    ft = finetune_like(base, root / "ft")
    return base, ft


@pytest.fixture(scope="session")
def llama_pair_bf16(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama_bf16")
    base = save_llama(root / "base", seed=0, dtype=torch.bfloat16)
    ft = finetune_like(base, root / "ft", dtype=torch.bfloat16)
    return base, ft


def tiny_stories_llama(root: Path) -> Path:
    """A tiny random Llama (4 blocks, GQA) with stories260K's real 512-token tokenizer, in ``root/tiny``."""
    import shutil

    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    stories = convert_llama2c(*stories260k_files(), root / "stories") or root / "stories"
    path = save_llama(root / "tiny", seed=0, vocab_size=512, num_hidden_layers=4, hidden_size=48,
                      intermediate_size=96)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(stories) / f, path / f)
    return path


def run_cli(*args: str):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from compress.cli import main

    o, e = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main([str(a) for a in args])
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else 1
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def stories260k(tmp_path_factory) -> Path:
    """The real pretrained stories260K (llama2.c) as a Hugging Face Llama folder, with its 512-token tokenizer."""
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories") / "stories260k"
    convert_llama2c(*stories260k_files(), out)
    return out


@pytest.fixture(scope="module")
def calib_wikitext(tmp_path_factory) -> Path:
    """A short calibration text: the first 20,000 characters of the bundled wikitext2.valid."""
    from compress.data import corpus_path, read_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(read_text(corpus_path("wikitext2.valid"))[:20000])
    return path


ANIMALS = ("cat", "dog", "horse", "rabbit", "parrot", "goat")
VEHICLES = ("car", "truck", "bus", "train", "bicycle", "tractor")
FRUIT = ("apple", "banana", "cherry", "plum", "mango", "pear")
TOOLS = ("hammer", "saw", "drill", "wrench", "chisel", "spanner")


def _rows(n: int, seed: int, classes=(ANIMALS, VEHICLES)) -> list[dict]:
    """An easy two-class task: sentences about one kind of thing (0) or another (1)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        thing = rng.choice(classes[label])
        rows.append({"text": f"{rng.choice(('I saw a', 'there is a', 'my neighbour has a'))} {thing} "
                             f"{rng.choice(('today', 'outside', 'in the street', 'again'))}", "label": label})
    rng.shuffle(rows)
    return rows


def make_task(folder, *, n=(192, 40, 60), gz=("dev",), classes=(ANIMALS, VEHICLES), **fields):
    """A task folder: task.json plus train/dev/test (``gz`` splits gzip-compressed, the others plain .jsonl)."""
    folder.mkdir(parents=True)
    info = {"labels": ["a", "b"], "pair": False, "description": "one kind of thing or another", **fields}
    (folder / "task.json").write_text(json.dumps(info))
    for seed, (split, count) in enumerate(zip(("train", "dev", "test"), n)):
        text = "".join(json.dumps(r) + "\n" for r in _rows(count, seed, classes))
        if split in gz:
            with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / f"{split}.jsonl").write_text(text)
    return folder


QUICK_TASKS = ("trec", "subj")  # bundled tasks of the shared quick minilm zoo, by name
PATH_TASKS = ("things", "kit")  # and two task folders it has never seen, by path (``minilm_task_folders``)


@pytest.fixture(scope="session")
def minilm_task_folders(tmp_path_factory) -> dict[str, Path]:
    """Two easy task folders outside the data root: 96 training rows, 6 steps of the quick recipe a task, enough to
    score well above chance."""
    root = tmp_path_factory.mktemp("task-folders")
    return {"things": make_task(root / "things", n=(96, 40, 60)),
            "kit": make_task(root / "kit", n=(96, 40, 60), classes=(FRUIT, TOOLS), gz=())}


@pytest.fixture(scope="session")
def minilm_zoo(tmp_path_factory, minilm_task_folders) -> Path:
    """The quick minilm-8task zoo, built once through the CLI for every test that needs one: trec and subj by name,
    ``minilm_task_folders`` by path (about a minute on one CPU thread)."""
    root = tmp_path_factory.mktemp("zoo")
    # one thread: on 2 cores shared with other work, two threads ran the quick build 3 to 6 times slower (each waits
    # for the other at every barrier); on an idle machine one thread costs little here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = [*QUICK_TASKS, *(str(minilm_task_folders[t]) for t in PATH_TASKS)]
        code, out, err = run_cli("zoo", "build", "minilm-8task", "--quick", "--tasks", ",".join(tasks),
                                 "--out-root", root)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "| trec |" in out and "| things |" in out and "wrote" in out
    return root / "minilm-8task"


def zoo_of(zoo: Path, tasks, root: Path) -> Path:
    """A zoo folder under ``root`` holding links to ``zoo``'s base and to the given task folders only (a benchmark
    over a zoo runs on every task it holds)."""
    out = root / "minilm-8task"
    out.mkdir(parents=True)
    for f in ("base", *tasks):
        (out / f).symlink_to(zoo / f)
    return out
