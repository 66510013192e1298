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
import re
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


# --- classification tasks (the minilm-8task benchmark, and any task folder a user brings) ------------------------

# the bundled eight, in the benchmark's order; any folder under <data>/tasks, or any folder given by path, that
# holds a valid task.json and its splits is a task as well (``task_names``, ``task_dir``)
TASKS = ("sst2", "trec", "subj", "agnews", "cola", "mrpc", "sick", "emotion")
SPLITS = ("train", "dev", "test")
# a task's official metric (task.json "metric", default accuracy), reported beside accuracy: GLUE's Matthews
# correlation for CoLA, F1 of label 1 for MRPC (compress.eval.metrics computes them)
METRICS = ("accuracy", "mcc", "f1")
# a task's name becomes a folder of a zoo and a field of head.json: a plain name, never a path
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TASK_FIELDS = ("name", "labels", "pair", "metric", "description", "source", "rows")
MAX_LABELS = 1000
MAX_TASK_JSON = 1 << 20  # bytes


def check_task_name(name: str, where: str = "task") -> str:
    """``name`` if it is a plain task name (letters, digits, ``_.-``, at most 64, not starting with a dot)."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise CompressError(f"{where}: {name!r} is not a task name (letters, digits, '_', '.', '-'; at most 64; "
                            "starting with a letter or digit)")
    return name


def is_task_path(ref: str | os.PathLike) -> bool:
    """A task reference that names a folder (``./mine``, ``/data/mine``, ``~/mine``) rather than a task of the data
    root (``sst2``)."""
    return isinstance(ref, os.PathLike) or any(c in ref for c in "/\\") or ref.startswith((".", "~"))


def task_names() -> list[str]:
    """The tasks of the data root: the bundled ones in the benchmark's order, then any other folder under
    ``<data>/tasks`` holding a task.json, sorted."""
    folder = data_dir() / "tasks"
    found = {p.parent.name for p in folder.glob("*/task.json") if TASK_NAME.fullmatch(p.parent.name)}
    return [t for t in TASKS if t in found] + sorted(found - set(TASKS))


def task_dir(ref: str | os.PathLike) -> Path:
    """The folder of a task: ``<data>/tasks/<ref>`` for a name, or ``ref`` itself for a path to a folder holding
    ``task.json`` and the splits (``train|dev|test.jsonl[.gz]``); its name is the folder's."""
    if is_task_path(ref):
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise CompressError(f"{folder}: no such task folder")
        if not (folder / "task.json").is_file():
            raise CompressError(f"{folder}: not a task folder (no task.json)")
        folder = folder.resolve()
        check_task_name(folder.name, f"{folder}: the folder's name")
        return folder
    name = str(ref)
    folder = data_dir() / "tasks" / name
    if not TASK_NAME.fullmatch(name) or not (folder / "task.json").is_file():
        raise CompressError(f"unknown task '{name}' (choose one of {', '.join(task_names())}, or give the path of a "
                            "folder holding task.json and its splits)")
    return folder


def task_name(ref: str | os.PathLike) -> str:
    """The name of a task (its folder's name)."""
    return task_dir(ref).name


def _task_info(ref) -> dict:
    return _read_task_info(task_dir(ref))


def _check_task_json(path: Path, info) -> dict:
    """task.json, strictly: one line naming the file and the field that is wrong."""
    if not isinstance(info, dict):
        raise CompressError(f"{path}: must be a JSON object")
    unknown = [k for k in info if k not in TASK_FIELDS]
    if unknown:
        raise CompressError(f"{path}: unknown field '{unknown[0]}' (fields: {', '.join(TASK_FIELDS)})")
    if "name" in info and info["name"] != path.parent.name:
        raise CompressError(f"{path}: 'name' is {info['name']!r}, but the folder is '{path.parent.name}'")
    labels = info.get("labels")
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise CompressError(f"{path}: 'labels' must be a list of 2 to {MAX_LABELS} label names")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label or len(label) > 200 or not label.isprintable():
            raise CompressError(f"{path}: labels[{i}] must be a printable string of 1 to 200 characters "
                                f"(got {label!r:.60})")
    if len(set(labels)) != len(labels):
        raise CompressError(f"{path}: 'labels' lists a name twice")
    if not isinstance(info.setdefault("pair", False), bool):
        raise CompressError(f"{path}: 'pair' must be true (rows are text pairs) or false")
    metric = info.setdefault("metric", "accuracy")
    if metric not in METRICS:
        raise CompressError(f"{path}: 'metric' must be one of {', '.join(METRICS)} (got {metric!r:.60})")
    if metric == "f1" and len(labels) != 2:
        raise CompressError(f"{path}: 'metric' f1 is the binary F1 of label 1: it needs two labels, not "
                            f"{len(labels)}")
    for key in ("description", "source"):
        if not isinstance(info.setdefault(key, ""), str):
            raise CompressError(f"{path}: '{key}' must be a string")
    rows = info.setdefault("rows", {})
    if not isinstance(rows, dict):
        raise CompressError(f"{path}: 'rows' must map splits ({', '.join(SPLITS)}) to row counts")
    for split, n in rows.items():
        if split not in SPLITS:
            raise CompressError(f"{path}: rows: unknown split '{split:.60}' (splits: {', '.join(SPLITS)})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise CompressError(f"{path}: rows.{split} must be a positive integer (got {n!r:.60})")
    info["name"] = path.parent.name
    return info


@lru_cache(maxsize=None)
def _read_task_info(folder: Path) -> dict:
    # cached by folder, so pointing COMPRESS_DATA elsewhere reads the other files
    path = folder / "task.json"
    try:
        if path.stat().st_size > MAX_TASK_JSON:
            raise CompressError(f"{path}: {path.stat().st_size} bytes; a task.json is at most {MAX_TASK_JSON}")
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompressError(f"{path}: cannot read as JSON ({e})") from None
    return _check_task_json(path, info)


def task_info(ref: str | os.PathLike) -> dict:
    """The task's ``task.json``: ``name`` (its folder's), ``labels`` (names, index = label id), ``pair`` (text
    pairs?), ``metric`` (one of ``METRICS``), ``description``, ``rows`` per split, ``source``."""
    return copy.deepcopy(_task_info(ref))


def task_metric(ref: str | os.PathLike) -> str:
    """The task's official metric: ``accuracy``, ``mcc`` or ``f1`` (task.json ``metric``, default accuracy)."""
    return _task_info(ref)["metric"]


def split_path(folder: Path, split: str) -> Path:
    """``<split>.jsonl.gz``, else ``<split>.jsonl``, of a task folder."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise CompressError(f"{folder}: no {split} split ({split}.jsonl.gz or {split}.jsonl)")


@lru_cache(maxsize=None)
def _read_split(folder: Path, split: str) -> tuple[dict, ...]:
    info = _read_task_info(folder)
    num_labels, pair = len(info["labels"]), info["pair"]
    path = split_path(folder, split)
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CompressError(f"{path}:{i}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise CompressError(f"{path}:{i}: a row must be a JSON object")
        label, text, text_pair = row.get("label"), row.get("text"), row.get("text_pair")
        if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
            raise CompressError(f"{path}:{i}: 'text' (and 'text_pair' when present) must be strings")
        if (text_pair is not None) != pair:
            raise CompressError(f"{path}:{i}: task.json says pair {str(pair).lower()}, but this row "
                                f"{'has' if text_pair is not None else 'has no'} 'text_pair'")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
            raise CompressError(f"{path}:{i}: label {label!r:.60} is not an integer in [0, {num_labels})")
        rows.append({"text": text, "text_pair": text_pair, "label": label} if pair else {"text": text, "label": label})
    if not rows:
        raise CompressError(f"{path}: no rows")
    want = info["rows"].get(split)
    if want is not None and want != len(rows):
        raise CompressError(f"{path}: task.json rows.{split} says {want}, the file has {len(rows)} rows")
    return tuple(rows)


def load_task(ref: str | os.PathLike, split: str, limit: int | None = None) -> list[dict]:
    """Rows ``{"text", ["text_pair"], "label": int}`` of one split of a task (a name or a task folder's path), in
    file order (the files are pre-shuffled, so the first ``limit`` rows are a random sample). Parsed once per
    process; each call returns fresh dicts."""
    if limit is not None and limit < 1:
        raise CompressError(f"limit must be >= 1 (got {limit})")
    folder = task_dir(ref)
    if split not in SPLITS:
        raise CompressError(f"unknown split '{split}' (choose one of {', '.join(SPLITS)})")
    rows = _read_split(folder, split)
    return [dict(r) for r in rows[:limit]]
