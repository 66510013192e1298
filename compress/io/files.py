"""The small text files every stage reads: YAML recipes and registries, JSON files, JSON-lines files and model
``config.json`` files, each read strictly, with one-line errors that name the file (and the line or field).

The schemas they validate into are in ``compress.config``; reading files is this layer's work, not theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from compress.config import _Config, format_validation_error
from compress.errors import CompressError


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


MAX_YAML_DEPTH = 64


def _yaml_depth(text: str) -> int:
    """How deeply the YAML's collections nest, from its events (PyYAML's parser keeps a stack, its composer
    recurses); stops counting past ``MAX_YAML_DEPTH``, before the scanner's cost grows with the depth."""
    import yaml

    depth = deepest = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_YAML_DEPTH:
                break
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def read_mapping(path: str | Path, what: str = "recipe") -> dict:
    """A YAML (or JSON) file that must hold a mapping; a missing file, a parse error, nesting deeper than
    ``MAX_YAML_DEPTH`` or another shape is one line naming the file. Every recipe and registry loads here."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if _yaml_depth(text) > MAX_YAML_DEPTH:
            raise CompressError(f"{path}: cannot read the {what}: collections nest deeper than {MAX_YAML_DEPTH} "
                                "levels")
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise CompressError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CompressError(f"{path}: cannot read the {what} as YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a {what} is a YAML mapping of fields, got {type(raw).__name__}")
    return raw


def read_json(path: str | Path, what: str):
    """A JSON file's content; a missing file or a parse error is one line naming the file."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressError(f"{what} file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompressError(f"{what} file '{path}' is not valid JSON ({e})") from None
    except RecursionError:
        raise CompressError(f"{what} file '{path}' is not valid JSON (nested too deeply)") from None


def read_model_config(folder: str | Path, name: str = "config.json") -> Optional[dict]:
    """A model folder's ``config.json`` (or ``name``; None when there is none). Every reader goes through here, so
    a file that is not UTF-8, not JSON or not a JSON object is one line naming it, never a traceback."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict):
        raise CompressError(f"{path}: must hold a JSON object of fields, got a JSON {type(cfg).__name__}")
    return cfg


def read_jsonl(path: str | Path, what: str, hint: str = "", limit: Optional[int] = None) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON-lines file (the first ``limit``); a missing file,
    a line that is not a JSON object, or an empty file is one line naming the file (and the line: ``path:N:``).
    The recall items, head probes and compression requests all read through it; each checks its own fields."""
    import json

    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such file (a {what} JSON-lines file{f'; {hint}' if hint else ''})")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise CompressError(f"{path}:{lineno}: a {what} line is one JSON object")
            out.append((lineno, item))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise CompressError(f"{path}: no {what} lines{f' ({hint})' if hint else ''}")
    return out


def load_recipe(path: str | Path, cls: type[_Config], quick: bool = False, require_quick: bool = True) -> _Config:
    """A YAML recipe validated into ``cls``. ``quick=True`` deep-merges the recipe's ``quick:`` section over the
    rest first (so the quick variant lives in the same file); errors name the file and the field."""
    path = Path(path)
    raw = read_mapping(path)
    quick_part = raw.pop("quick", None)
    if quick_part is not None and not isinstance(quick_part, dict):
        raise CompressError(f"{path}: quick: must be a mapping of fields to override")
    if quick:
        if quick_part is None and require_quick:
            raise CompressError(f"{path}: --quick asked for, but the recipe has no quick: section")
        raw = _deep_merge(raw, quick_part or {})
    try:
        return cls(**raw)
    except ValidationError as e:
        where = f"{path} (quick)" if quick else str(path)
        raise CompressError(f"{where}: {format_validation_error(e)}") from None
