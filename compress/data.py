"""Where the bundled real assets live and how to read them.

The assets ship inside the package (``compress/assets``: corpora, llama2.c stories260K, the eight classification
tasks; origins and licences in ``compress/assets/SOURCES.md``), so a wheel, an editable install and a plain clone
all carry them. No hub is reachable, so benchmarks and tests read these files; ``COMPRESS_DATA`` points elsewhere.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from compress.errors import CompressError

ASSETS = Path(__file__).resolve().parent / "assets"


def data_dir() -> Path:
    """``$COMPRESS_DATA`` if set, else the package's own ``assets`` folder."""
    env = os.environ.get("COMPRESS_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise CompressError(f"COMPRESS_DATA={env}: not a folder")
        return path
    if not (ASSETS / "corpus").is_dir():
        raise CompressError(f"{ASSETS}: the package's data folder is missing (a broken install?); reinstall, or set "
                            "COMPRESS_DATA to a folder holding corpus/, stories260K/ and tasks/")
    return ASSETS


def corpus_names() -> list[str]:
    folder = data_dir() / "corpus"
    return sorted(p.name[: -len(".txt.gz")] for p in folder.glob("*.txt.gz"))


def corpus_path(name: str) -> Path:
    """A bundled text corpus by name: 'shakespeare', 'wikitext2.valid', 'wikitext2.test', 'ptb.valid', ..."""
    for fname in (f"{name}.txt.gz", f"{name}.txt"):
        path = data_dir() / "corpus" / fname
        if path.is_file():
            return path
    raise CompressError(f"corpus '{name}' not found in {data_dir() / 'corpus'}; available: "
                        f"{', '.join(corpus_names()) or 'none'}")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompressError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CompressError(f"{path}: cannot read as UTF-8 text ({e})") from None


def stories260k_files() -> tuple[Path, Path]:
    """(model .bin, tokenizer .bin) of the real pretrained llama2.c stories260K model."""
    folder = data_dir() / "stories260K"
    files = folder / "stories260K.bin", folder / "tok512.bin"
    for f in files:
        if not f.is_file():
            raise CompressError(f"{f}: missing; the data folder should hold stories260K/")
    return files


# --- classification tasks (the minilm-8task benchmark) -------------------------------------------------------

TASKS = ("sst2", "trec", "subj", "agnews", "cola", "mrpc", "sick", "emotion")
SPLITS = ("train", "dev", "test")
# a task's official metric (task.json "metric", default accuracy), reported beside accuracy: GLUE's Matthews
# correlation for CoLA, F1 of label 1 for MRPC (compress.eval.metrics computes them)
METRICS = ("accuracy", "mcc", "f1")


def task_dir(name: str) -> Path:
    """``<data>/tasks/<name>``: train/dev/test ``.jsonl.gz`` and ``task.json``."""
    if name not in TASKS:
        raise CompressError(f"unknown task '{name}' (choose one of {', '.join(TASKS)})")
    folder = data_dir() / "tasks" / name
    if not (folder / "task.json").is_file():
        raise CompressError(f"{folder}: missing task.json; the data folder should hold tasks/{name}/")
    return folder


def _task_info(name: str) -> dict:
    return _read_task_info(task_dir(name))


@lru_cache(maxsize=None)
def _read_task_info(folder: Path) -> dict:
    # cached by folder, so pointing COMPRESS_DATA elsewhere reads the other files
    path = folder / "task.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompressError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(info.get("labels"), list) or not info["labels"]:
        raise CompressError(f"{path}: 'labels' must be a non-empty list of label names")
    metric = info.setdefault("metric", "accuracy")
    if metric not in METRICS:
        raise CompressError(f"{path}: 'metric' must be one of {', '.join(METRICS)} (got {metric!r})")
    if metric == "f1" and len(info["labels"]) != 2:
        raise CompressError(f"{path}: 'metric' f1 is the binary F1 of label 1: it needs two labels, not "
                            f"{len(info['labels'])}")
    return info


def task_info(name: str) -> dict:
    """The task's ``task.json``: ``labels`` (names, index = label id), ``pair`` (text pairs?), ``metric`` (one of
    ``METRICS``), ``description``, ``rows`` per split, ``source``."""
    return copy.deepcopy(_task_info(name))


def task_metric(name: str) -> str:
    """The task's official metric: ``accuracy``, ``mcc`` or ``f1`` (task.json ``metric``, default accuracy)."""
    return _task_info(name)["metric"]


@lru_cache(maxsize=None)
def _read_split(folder: Path, split: str) -> tuple[dict, ...]:
    num_labels = len(_read_task_info(folder)["labels"])
    path = folder / f"{split}.jsonl.gz"
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CompressError(f"{path}:{i}: not JSON ({e})") from None
        label, text, pair = row.get("label"), row.get("text"), row.get("text_pair")
        if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
            raise CompressError(f"{path}:{i}: 'text' (and 'text_pair' when present) must be strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
            raise CompressError(f"{path}:{i}: label {label!r} is not an integer in [0, {num_labels})")
        rows.append({"text": text, "text_pair": pair, "label": label} if pair is not None
                    else {"text": text, "label": label})
    if not rows:
        raise CompressError(f"{path}: no rows")
    return tuple(rows)


def load_task(name: str, split: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"text", ["text_pair"], "label": int}`` of one split, in file order (the files are pre-shuffled, so
    the first ``limit`` rows are a random sample). Parsed once per process; each call returns fresh dicts."""
    if limit is not None and limit < 1:
        raise CompressError(f"limit must be >= 1 (got {limit})")
    folder = task_dir(name)
    if split not in SPLITS:
        raise CompressError(f"unknown split '{split}' (choose one of {', '.join(SPLITS)})")
    rows = _read_split(folder, split)
    return [dict(r) for r in rows[:limit]]
