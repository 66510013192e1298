"""Merge recipes: our YAML schema (``compress.config.MergeConfig``) and mergekit's, read into the same model.

A recipe with a ``merge_method`` key is a mergekit config. It is translated, not interpreted loosely: every key
either maps to a ``MergeConfig`` field (with ``variant: mergekit``, so the maths is mergekit's) or stops with an
error naming it. Parameter values keep mergekit's semantics everywhere (``resolve_setting``): a number; a list of
numbers, a gradient interpolated over the layers; a list of ``{filter, value}`` picking the first whose filter is
a substring of the tensor name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from compress.config import WEIGHT_METHOD_PARAMS, Conditional, MergeConfig, build, setting_problem
from compress.errors import CompressError
from compress.merge.methods import METHODS, WEIGHT_METHODS, check_config

MERGEKIT_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "nuslerp", "model_stock", "sce", "karcher",
                    "multislerp", "passthrough", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
_MK_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
           "tokenizer", "chat_template", "slices", "modules", "name"}
_MK_PARAMS = {"weight", "density", "gamma", "epsilon", "lambda", "t", "normalize", "rescale", "int8_mask",
              *WEIGHT_METHOD_PARAMS}
_MK_MODEL_PARAMS = {"weight", "density", "gamma", "epsilon", "scale"}
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def resolve_setting(setting: Any, name: str, t: float) -> Any:
    """The value of a parameter setting for tensor ``name`` at layer position ``t`` in [0, 1] (None: no match).

    Same rules as mergekit's ``evaluate_setting``: a gradient [v0, …, v_{n-1}] is piecewise linear in t;
    conditionals apply in order, the first whose filter is absent, '*' or a substring of ``name`` wins.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
                return setting[int(t * (len(setting) - 1))]
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Conditional):
                raise CompressError(f"a parameter list mixes numbers and {{filter, value}} entries: {setting}")
            if cond.filter is None or cond.filter == "*" or cond.filter in name:
                return resolve_setting(cond.value, name, t)
        return None
    raise CompressError(f"unexpected parameter value {setting!r}")


def layer_position(name: str, num_layers: Optional[int]) -> float:
    """mergekit's t: layer i of L gives i/(L−1) (1 when L = 1); tensors outside the layers give 0."""
    m = LAYER_RE.search(name)
    if m is None or not num_layers:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _read_yaml(path: Path) -> dict:
    from compress.io.files import read_mapping

    return read_mapping(path)


def _relative(value: Any, root: Path) -> Any:
    if not isinstance(value, (str, os.PathLike)):
        return value  # None, or a wrong type the schema then names
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() or p.exists() else (root / p if (root / p).exists() else p)


def from_mergekit(data: dict, root: Path, **cli) -> MergeConfig:
    """A ``MergeConfig`` that reproduces what mergekit computes for this config (``variant: mergekit``)."""
    unknown = sorted(set(data) - _MK_TOP)
    if unknown:
        raise CompressError(f"mergekit recipe: unknown field '{unknown[0]}'")
    for key in ("slices", "modules", "tokenizer", "chat_template"):
        if data.get(key):
            raise CompressError(f"mergekit recipe: '{key}' is not supported (merge whole models with 'models:')")
    method = data["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise CompressError(f"mergekit recipe: unknown or unsupported merge_method '{method}' "
                            f"(supported: {', '.join(MERGEKIT_METHODS)})")
    params = dict(_mapping(data.get("parameters"), "parameters"))
    bad = sorted(set(params) - _MK_PARAMS)
    if bad:
        raise CompressError(f"mergekit recipe: unknown parameter '{bad[0]}' (known: {', '.join(sorted(_MK_PARAMS))})")
    _check_settings(params, "parameters")
    overrides: dict[str, Any] = {}
    if "rescale" in params:
        overrides["rescale"] = "l1" if params.pop("rescale") else "none"
    params.pop("int8_mask", None)
    # a parameter the method does not read is ignored, as mergekit ignores it, but named on stderr
    if method in WEIGHT_METHODS:
        m = WEIGHT_METHODS[method]
        reads_per_model = set(m.model_params) | ({"weight"} if m.weighted else set())
        params = _drop_unread(params, set(m.params) | reads_per_model, "parameters", method)
    else:
        reads_per_model = _MK_MODEL_PARAMS - {"scale"}
        params = _drop_unread(params, _MK_PARAMS - set(WEIGHT_METHOD_PARAMS) - {"t"}, "parameters", method)
    models, base = [], data.get("base_model")
    # mergekit's linear and karcher take the base as one more input; which methods require a weight per model
    base_is_input = method in WEIGHT_METHODS and WEIGHT_METHODS[method].base == "input"
    weighted = method in METHODS or (method in WEIGHT_METHODS and WEIGHT_METHODS[method].weighted)
    listed_base = False
    if base is not None and not isinstance(base, str):
        raise CompressError(f"mergekit recipe: base_model must be a model path, got {base!r}")
    entries = data.get("models")
    if entries is not None and not isinstance(entries, list):
        raise CompressError(f"mergekit recipe: models must be a list of {{model, parameters}} entries, "
                            f"got {type(entries).__name__} {entries!r}")
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or "model" not in entry:
            raise CompressError(f"mergekit recipe: models[{i}] needs a 'model' key")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise CompressError(f"mergekit recipe: models[{i}]: unknown field '{extra[0]}'")
        if not isinstance(entry["model"], str):
            raise CompressError(f"mergekit recipe: models[{i}].model must be a model path, got {entry['model']!r}")
        mp = dict(_mapping(entry.get("parameters"), f"models[{i}].parameters"))
        bad = sorted(set(mp) - _MK_MODEL_PARAMS)
        if bad:
            raise CompressError(f"mergekit recipe: models[{i}]: unknown parameter '{bad[0]}'")
        mp = _drop_unread(mp, reads_per_model, f"models[{i}]", method)
        _check_settings(mp, f"models[{i}].parameters")
        is_base = base is not None and str(entry["model"]) == str(base)
        if is_base and not base_is_input:
            continue  # mergekit lists the base among the models for slerp and friends; it is not a task vector
        if weighted and "weight" not in mp and "weight" not in params:
            raise CompressError(f"mergekit recipe: models[{i}] ({entry['model']}) has no weight; mergekit's "
                                f"{method} requires one (give models[{i}].parameters.weight or parameters.weight)")
        models.append({"model": _relative(entry["model"], root), "parameters": mp})
        listed_base |= is_base
    if base_is_input and base is not None and not listed_base:
        # mergekit adds an unlisted base as the last input, with the shared parameters
        if weighted and "weight" not in params:
            raise CompressError(f"mergekit recipe: base_model {base} is one of {method}'s inputs in mergekit and has"
                                " no weight; list it under models with a weight, or set parameters.weight")
        models.append({"model": _relative(base, root), "parameters": {}})
    if method in WEIGHT_METHODS and WEIGHT_METHODS[method].base == "none" and base is not None:
        if [str(m["model"]) for m in models] != [str(_relative(base, root))] and models:
            raise CompressError(f"mergekit recipe: {method} takes one input; base_model {base} would be a second")
        models = models or [{"model": _relative(base, root), "parameters": {}}]
        base = None
    tok = data.get("tokenizer_source")
    if tok not in (None, "base", "union"):
        raise CompressError(f"mergekit recipe: tokenizer_source '{tok}' is not supported (use base or union)")
    fields = dict(method=method, base=_relative(base, root), models=models, parameters=params, variant="mergekit",
                  dtype=data.get("out_dtype") or data.get("dtype"), compute_dtype=data.get("dtype"),
                  vocab=tok or "error", **overrides)
    fields.update({k: v for k, v in cli.items() if v is not None})
    return build(MergeConfig, **fields)


def _drop_unread(params: dict, reads: set, where: str, method: str) -> dict:
    unread = sorted(set(params) - reads)
    if unread:
        from compress.progress import console

        console.print(f"[yellow]mergekit recipe: {where}: {method} does not read {', '.join(unread)} (ignored, as "
                      "mergekit ignores it)")
    return {k: v for k, v in params.items() if k in reads}


def _mapping(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CompressError(f"mergekit recipe: {field} must be a mapping of parameter: value, got {value!r}")
    return value


def _check_settings(params: dict, field: str) -> None:
    """Types and ranges checked here, under mergekit's own field paths (the translation drops the base from
    ``models``, so the schema's indices would not be the file's)."""
    for key, setting in params.items():
        problem = setting_problem(key, setting, zero_density=True)
        if problem:
            raise CompressError(f"mergekit recipe: {field}.{key} {problem}")


def load_recipe(path: str | os.PathLike, **cli) -> MergeConfig:
    """A merge recipe file (ours or mergekit's) as a ``MergeConfig``; ``cli`` values (not None) win. Errors name
    the file and the field."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        cfg = _from_data(data, path.parent, **cli)
        check_config(cfg)
        return cfg
    except CompressError as e:
        raise CompressError(f"{path}: {e}") from None


def _from_data(data: dict, root: Path, **cli) -> MergeConfig:
    if "merge_method" in data:
        return from_mergekit(data, root, **cli)
    for key in ("base", "out"):
        if data.get(key) is not None:
            data[key] = _relative(data[key], root)
    for m in data.get("models") if isinstance(data.get("models"), list) else []:
        if isinstance(m, dict) and "model" in m:
            m["model"] = _relative(m["model"], root)
    data.update({k: v for k, v in cli.items() if v is not None})
    return build(MergeConfig, **data)
