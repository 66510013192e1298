"""mergekit's planned forms: ``slices:``, ``modules:``, ``model+lora`` references, ``tokenizer:`` sections,
``tokenizer_source: <model>`` and ``chat_template``.

Each output tensor is re-mapped to (source model, source tensor name) before any maths: an output slice becomes a
part whose inputs are renamed views of the sources (layer ``a + k`` of a source is read as output layer ``o + k``),
and the ordinary ``Merger`` merges the part. The planner follows mergekit 0.1.5's ``MergePlanner``:

* ``models:`` is one slice over every layer of every model (the base added when it is not listed);
* the weights before the layers (embeddings) come from the first slice's sources, those after (final norm,
  ``lm_head``) from the last slice's, both at t = 0; within a slice of n layers, layer k has t = k/(n−1) (1 when
  n = 1), so a gradient runs across each slice;
* parameters are looked up per source, then the slice's, the module's, the recipe's (first that answers wins);
* ``passthrough`` copies its single source (times ``scale`` when given): a frankenmerge;
* ``model+lora`` merges the PEFT adapter into the model first (``merge_and_unload``: W + ΔW in float32, rounded
  to W's dtype), as a base or as a source;
* the output config counts the layers written (and keeps ``layer_types`` in step).

A model's own parameters (and their fallbacks) match filters against its source tensor name, the recipe's
shared ones against the output name, as mergekit's resolver. Where the tensors are the same, so is the output:
the part's merge is the one ``compress merge`` runs on whole models.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from compress.config import SHARD_SIZE
from compress.errors import CompressError
from compress.io.reader import Checkpoint, all_finite, open_checkpoint
from compress.merge.elementwise import passthrough
from compress.merge.executor import Merger, MergeSummary, aux_files
from compress.merge.recipe import LAYER_RE, _relative, from_mergekit, resolve_setting
from compress.merge.recipe import load_recipe as load_plain_recipe
from compress.taskvec import VOCAB_TENSOR_RE

# weights before the first layer (mergekit's pre_weights): token and position embeddings; the rest come after
_PRE_RE = re.compile(r"(embed_tokens|embed_in|word_embeddings|wte|wpe|embed_positions|position_embeddings)\.weight$")
_NEEDS_PLAN = ("slices", "modules", "tokenizer", "chat_template")
_SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


def needs_plan(data: dict) -> bool:
    """Whether a mergekit recipe uses a form only the planner handles."""
    refs = [data.get("base_model")] + [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    return (any(data.get(k) for k in _NEEDS_PLAN) or data.get("tokenizer_source") is not None
            or data.get("merge_method") == "passthrough"
            or any(isinstance(r, str) and "+" in r for r in refs))


def load_recipe(path: str | os.PathLike, **cli):
    """A merge recipe file: a ``SlicePlan`` for mergekit's planned forms, else ``recipe.load_recipe``'s config."""
    from compress.io.files import read_mapping

    path = Path(path)
    data = read_mapping(path)
    if "merge_method" not in data or not needs_plan(data):
        return load_plain_recipe(path, **cli)
    try:
        return plan_mergekit(data, path.parent, **cli)
    except CompressError as e:
        raise CompressError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------ sources and views

class LoraMerged:
    """``model+lora``: the checkpoint with the PEFT adapter merged in, tensor by tensor, as ``merge_and_unload``."""

    def __init__(self, model: Path, lora: Path):
        from compress.io.lora import LoraAdapter

        self.ckpt = open_checkpoint(model)
        self.adapter = LoraAdapter(lora, self.ckpt)
        self.path, self.root = Path(f"{model}+{lora}"), self.ckpt.root

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def names(self) -> list[str]:
        return self.ckpt.names()

    def info(self, name: str):
        return self.ckpt.info(name)

    @property
    def config(self):
        return self.ckpt.config

    def get(self, name: str, *, device=None, dtype=None, check_finite: bool = True) -> torch.Tensor:
        w = self.ckpt.get(name, device=device, check_finite=check_finite)
        if name in self.adapter:
            # PEFT adds a float32 ΔW to W in place: the sum is taken in float32 and rounded to W's dtype
            w = (w.float() + self.adapter.get(name, device=device, dtype=torch.float32)).to(w.dtype)
        return w.to(dtype) if dtype is not None and w.is_floating_point() else w


class View:
    """A source seen under the output's tensor names (``mapping``: output name → source name); vocabulary tensors
    can come from a ``PartVocab`` (the tokenizer's rows)."""

    def __init__(self, src, mapping: dict[str, str], vocab: Optional["PartVocab"] = None, key: str = ""):
        self.src, self.mapping, self.vocab, self.key = src, mapping, vocab, key
        self.path, self.root = src.path, src.root
        self.read_ahead = None  # a ``compress.io.prefetch.ReadAhead`` serving ``get`` while the executor walks

    def __contains__(self, name: str) -> bool:
        return name in self.mapping

    def names(self) -> list[str]:
        return list(self.mapping)

    def info(self, name: str):
        info = self.src.info(self.mapping[name])
        if self.vocab is not None and self.vocab.covers(name):
            return dataclasses.replace(info, shape=(self.vocab.rows,) + tuple(info.shape[1:]))
        return info

    @property
    def config(self):
        return self.src.config

    @property
    def nbytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.mapping)

    def get(self, name: str, *, device=None, dtype=None, check_finite: bool = True) -> torch.Tensor:
        t = self.read_ahead.take((id(self), name)) if self.read_ahead is not None else None
        if t is not None:
            if check_finite and t.is_floating_point() and not all_finite(t):
                raise CompressError(f"{self.path}: tensor '{self.mapping[name]}' contains NaN or Inf")
        else:
            t = self._read(name, check_finite)
        t = t.to(device) if device is not None else t
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def _read(self, name: str, check_finite: bool = False) -> torch.Tensor:
        if self.vocab is not None and self.vocab.covers(name):
            return self.vocab.get(self.key, name)
        return self.src.get(self.mapping[name], check_finite=check_finite)

    def read_job(self, name: str, staging=None):
        """A read of ``name`` for the executor's read-ahead (``compress.io.prefetch.walk``); on the CPU, since a
        source may be a LoRA merge or the tokenizer's permuted rows rather than bytes in a file."""
        return lambda: self._read(name)

    def close(self) -> None:
        pass


class PartVocab:
    """The vocabulary tensors of one part's sources, permuted to the output tokenizer together (a token missing
    from one model takes its row from the others: ``compress.merge.tokenizer.permute_rows``)."""

    def __init__(self, info, sources: dict[str, Any], base: Optional[str], dtype: Optional[torch.dtype]):
        self.info, self.sources, self.base, self.dtype = info, sources, base, dtype
        self.rows = info.rows
        self._lock = threading.Lock()
        self._cache: tuple[str, dict] = ("", {})

    def covers(self, name: str) -> bool:
        return VOCAB_TENSOR_RE.search(name) is not None

    def get(self, key: str, name: str) -> torch.Tensor:
        from compress.merge.tokenizer import permute_rows

        with self._lock:
            if self._cache[0] != name:
                raw = {k: s.get(name, check_finite=False) for k, s in self.sources.items()}
                if self.dtype is not None:  # mergekit casts to the recipe's dtype as it reads, before permuting
                    raw = {k: t.to(self.dtype) for k, t in raw.items()}
                self._cache = (name, permute_rows(raw, self.info, base=self.base))
            return self._cache[1][key]


# ------------------------------------------------------------------------------------------------ the plan

@dataclasses.dataclass
class Source:
    key: str  # the reference as written, resolved: "path" or "path+lora"
    start: int
    stop: int
    parameters: dict


@dataclasses.dataclass
class Part:
    """Output tensors merged from one set of sources: the weights before the layers, one slice, or those after."""

    sources: list[Source]
    base: Optional[str]
    names: list[str]  # output names, in order
    maps: list[dict[str, str]]  # per source: output name → source name
    t: dict[str, float]
    parameters: dict  # the slice's, module's and recipe's settings, chained (first that answers wins)


@dataclasses.dataclass
class SlicePlan:
    """What ``compress merge`` runs for a mergekit recipe with slices, modules, LoRA references or a tokenizer."""

    method: str
    data: dict  # the recipe (its parameters, dtype, out_dtype)
    parts: list[Part]
    refs: dict[str, Any]  # key → LoraMerged or Checkpoint
    out_ref: str  # the model whose config and tokenizer the output starts from
    layers: int
    layer_types: Optional[list]
    cli: dict
    tokenizer: Any = None  # compress.merge.tokenizer.VocabInfo when the recipe builds one
    out: Optional[Path] = None
    overwrite: bool = False
    quiet: Optional[bool] = None
    shard_size: Optional[str] = None
    dtype: Optional[str] = None
    copy_tokenizer: bool = True

    @property
    def base(self) -> Optional[Path]:
        return _model_path(self.out_ref)

    @property
    def models(self) -> list:
        return sorted({s.key for p in self.parts for s in p.sources})

    def model_copy(self, update: dict) -> "SlicePlan":
        return dataclasses.replace(self, **update)

    def run(self, quiet: Optional[bool] = None) -> MergeSummary:
        return write_plan(self, quiet if quiet is not None else self.quiet)


def _model_path(key: str) -> Path:
    return Path(key.split("+")[0])


def parse_ref(value: Any, root: Path, field: str) -> str:
    """A mergekit model reference, ``path`` or ``path+lora``, with each path resolved against the recipe folder."""
    if not isinstance(value, str) or not value:
        raise CompressError(f"mergekit recipe: {field} must be a model path, got {value!r}")
    parts = value.split("+")
    if len(parts) > 2 or not all(parts):
        raise CompressError(f"mergekit recipe: {field} '{value}' is not 'MODEL' or 'MODEL+LORA'")
    paths = [Path(_relative(p, root)) for p in parts]
    return "+".join(str(p.absolute() if p.exists() else p) for p in paths)


def _open(key: str):
    model, _, lora = key.partition("+")
    if lora:
        from compress.io.reader import is_peft_adapter

        if not is_peft_adapter(lora):
            raise CompressError(f"{lora}: not a PEFT LoRA adapter folder (no adapter_config.json), in '{key}'")
        return LoraMerged(Path(model), Path(lora))
    if Path(model).is_dir() and (Path(model) / "adapter_config.json").is_file():
        raise CompressError(f"{model} is a LoRA adapter; mergekit takes it as 'BASE_MODEL+{model}'")
    return open_checkpoint(model)


def _layer_groups(ck) -> tuple[dict[int, list[str]], list[str], list[str]]:
    """{layer: names} in checkpoint order, the names before the layers (embeddings) and those after."""
    layers: dict[int, list[str]] = {}
    pre, post = [], []
    for n in ck.names():
        m = LAYER_RE.search(n)
        if m is not None:
            layers.setdefault(int(m.group(1)), []).append(n)
        elif _PRE_RE.search(n):
            pre.append(n)
        else:
            post.append(n)
    return layers, pre, post


def _reindex(name: str, layer: int) -> str:
    m = LAYER_RE.search(name)
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


def _chain(*settings) -> Any:
    """Settings of one parameter from several scopes as one: conditionals in order, then the first plain value
    (which always answers), so that resolving it gives what mergekit's scope-by-scope lookup gives."""
    conds: list = []
    for s in settings:
        if s is None or (isinstance(s, list) and not s):
            continue
        if isinstance(s, dict):
            s = [s]
        if isinstance(s, list) and all(isinstance(c, dict) for c in s):
            conds += s
            continue
        conds.append({"value": s})
        break
    if not conds:
        return None
    return conds[0]["value"] if len(conds) == 1 and set(conds[0]) == {"value"} else conds


def _chained(*scopes: Optional[dict]) -> dict:
    keys = [k for s in scopes if s for k in s]
    out = {}
    for k in dict.fromkeys(keys):
        v = _chain(*[(s or {}).get(k) for s in scopes])
        if v is not None:
            out[k] = v
    return out


def _mapping(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CompressError(f"mergekit recipe: {field} must be a mapping, got {value!r}")
    return value


def _slices_of(data: dict, root: Path, layers_of) -> tuple[list[dict], dict]:
    """The recipe's output slices (mergekit's normalisation of models: / modules:) and the module's parameters."""
    forms = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(forms) != 1:
        raise CompressError("mergekit recipe: give exactly one of 'models', 'slices' or 'modules'"
                            + (f" (got {', '.join(forms)})" if forms else ""))
    module_params: dict = {}
    where = forms[0]
    body = data
    if where == "modules":
        modules = _mapping(data["modules"], "modules")
        if len(modules) != 1 or "default" not in modules:
            raise CompressError(f"mergekit recipe: modules: only 'default' (the one module of a decoder-only "
                                f"architecture) is supported, got {', '.join(map(str, modules)) or 'none'}")
        body = _mapping(modules["default"], "modules.default")
        extra = sorted(set(body) - {"slices", "models", "parameters"})
        if extra:
            raise CompressError(f"mergekit recipe: modules.default: unknown field '{extra[0]}'")
        if bool(body.get("slices")) == bool(body.get("models")):
            raise CompressError("mergekit recipe: modules.default: give either 'slices' or 'models'")
        module_params = _mapping(body.get("parameters"), "modules.default.parameters")
        where = "modules.default." + ("slices" if body.get("slices") else "models")
    base = data.get("base_model")
    base = parse_ref(base, root, "base_model") if base is not None else None
    if body.get("models"):
        entries = body["models"]
        if not isinstance(entries, list):
            raise CompressError(f"mergekit recipe: {where} must be a list of {{model, parameters}} entries")
        sources = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
                raise CompressError(f"mergekit recipe: {where}[{i}] needs 'model' (and optional 'parameters') only")
            key = parse_ref(e["model"], root, f"{where}[{i}].model")
            sources.append({"model": key, "layer_range": [0, layers_of(key)], "parameters": e.get("parameters")})
        if base is not None and data.get("merge_method") == "passthrough":
            # mergekit adds the base to the inputs, and passthrough takes one (as methods.WEIGHT_METHODS says)
            raise CompressError("mergekit recipe: base_model: passthrough takes no base model (give the one model "
                                f"under {where})")
        if base is not None and base not in [s["model"] for s in sources]:
            sources.append({"model": base, "layer_range": [0, layers_of(base)], "parameters": None})
        return [{"sources": sources, "_field": where}], module_params
    slices = body.get("slices")
    if not isinstance(slices, list):
        raise CompressError(f"mergekit recipe: {where} must be a list of {{sources: [...]}} entries")
    out = []
    for i, sl in enumerate(slices):
        f = f"{where}[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise CompressError(f"mergekit recipe: {f} needs 'sources': a list of {{model, layer_range}}")
        extra = sorted(set(sl) - _SLICE_KEYS)
        if extra:
            raise CompressError(f"mergekit recipe: {f}: unknown field '{extra[0]}'")
        if sl.get("residual_weight") is not None:
            from compress.progress import console

            console.print(f"[yellow]{f}.residual_weight is ignored (as mergekit 0.1.5 ignores it)")
        srcs = []
        for j, s in enumerate(sl["sources"]):
            fs = f"{f}.sources[{j}]"
            if not isinstance(s, dict) or "model" not in s or "layer_range" not in s:
                raise CompressError(f"mergekit recipe: {fs} needs 'model' and 'layer_range'")
            extra = sorted(set(s) - _SOURCE_KEYS)
            if extra:
                raise CompressError(f"mergekit recipe: {fs}: unknown field '{extra[0]}'")
            key = parse_ref(s["model"], root, f"{fs}.model")
            r = s["layer_range"]
            if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in r)):
                raise CompressError(f"mergekit recipe: {fs}.layer_range must be [start, stop], two integers; got "
                                    f"{r!r}")
            n = layers_of(key)
            if not 0 <= r[0] < r[1] <= n:
                raise CompressError(f"mergekit recipe: {fs}.layer_range {r} is outside the {n} layers of {key} "
                                    "(start < stop, stop at most the layer count)")
            srcs.append({"model": key, "layer_range": r, "parameters": s.get("parameters")})
        if len({s["layer_range"][1] - s["layer_range"][0] for s in srcs}) != 1:
            raise CompressError(f"mergekit recipe: {f}: every source of a slice must span the same number of layers, "
                                f"got {[s['layer_range'] for s in srcs]}")
        sb = sl.get("base_model")
        out.append({"sources": srcs, "base_model": parse_ref(sb, root, f"{f}.base_model") if sb else None,
                    "parameters": sl.get("parameters"), "_field": f})
    return out, module_params


def plan_mergekit(data: dict, root: Path, **cli) -> SlicePlan:
    """The parts of a mergekit recipe with slices, modules, LoRA references or a tokenizer section."""
    from compress.merge.recipe import _MK_TOP, MERGEKIT_METHODS

    unknown = sorted(set(data) - _MK_TOP)
    if unknown:
        raise CompressError(f"mergekit recipe: unknown field '{unknown[0]}'")
    method = data["merge_method"]
    if method not in MERGEKIT_METHODS and method != "passthrough":
        raise CompressError(f"mergekit recipe: unknown or unsupported merge_method '{method}' "
                            f"(supported: {', '.join(MERGEKIT_METHODS + ('passthrough',))})")
    refs: dict[str, Any] = {}
    groups: dict[str, tuple] = {}

    def source(key: str):
        if key not in refs:
            refs[key] = _open(key)
            groups[key] = _layer_groups(refs[key])
        return refs[key]

    def layers_of(key: str) -> int:
        source(key)
        cfg = refs[key].config or {}
        n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
        return int(n) if isinstance(n, int) else len(groups[key][0])

    slices, module_params = _slices_of(data, root, layers_of)
    base = data.get("base_model")
    base = parse_ref(base, root, "base_model") if base is not None else None
    if base is not None:
        source(base)
    global_params = _mapping(data.get("parameters"), "parameters")
    parts: list[Part] = []
    out_layer = 0
    for sl in slices:
        sbase = sl.get("base_model") or base
        srcs = [Source(s["model"], *s["layer_range"], _mapping(s["parameters"], "parameters")) for s in sl["sources"]]
        keys = [s.key for s in srcs]
        if len(set(keys)) != len(keys):
            raise CompressError(f"mergekit recipe: {sl['_field']}: a model appears twice among the sources")
        if method == "passthrough":
            if len(srcs) != 1:
                raise CompressError(f"mergekit recipe: {sl['_field']}: passthrough takes exactly one source, got "
                                    f"{len(srcs)}")
        elif method != "linear" and sbase not in keys:
            raise CompressError(f"mergekit recipe: {sl['_field']}: the base model ({sbase}) must be one of the "
                                f"slice's sources for {method}")
        ref = srcs[keys.index(sbase)] if sbase in keys else srcs[0]
        n = srcs[0].stop - srcs[0].start
        names, maps, t = [], [[] for _ in srcs], {}
        for k in range(n):
            template = groups[ref.key][0].get(ref.start + k, [])
            for name in template:
                o = _reindex(name, out_layer + k)
                names.append(o)
                t[o] = k / (n - 1) if n > 1 else 1.0
                for j, s in enumerate(srcs):
                    src_name = _reindex(name, s.start + k)
                    if src_name not in source(s.key):
                        raise CompressError(f"mergekit recipe: {sl['_field']}.sources[{j}]: {s.key} has no tensor "
                                            f"'{src_name}' (its layers differ from {ref.key}'s)")
                    maps[j].append((o, src_name))
        out_layer += n
        parts.append(Part(srcs, sbase, names, [dict(m) for m in maps], t,
                          _chained(sl.get("parameters"), module_params, global_params)))
    first, last = parts[0], parts[-1]
    for i, (part, which) in enumerate(((first, 1), (last, 2))):
        # mergekit pairs the last slice's sources with as many weight slots as the first slice has sources
        srcs = part.sources[: len(first.sources)]
        keys = [s.key for s in srcs]
        if method not in ("linear", "passthrough") and part.base not in keys:
            raise CompressError(f"mergekit recipe: the weights after the layers merge the last slice's first "
                                f"{len(keys)} sources (as many as the first slice has), which leave out the base "
                                f"{part.base}; list the base earlier in the last slice")
        ref = srcs[keys.index(part.base)] if part.base in keys else srcs[0]
        names = groups[ref.key][which]
        for s in srcs:
            missing = [n for n in names if n not in source(s.key)]
            if missing:
                raise CompressError(f"mergekit recipe: {s.key} has no tensor '{missing[0]}' ({ref.key} has it)")
        edge = Part(srcs, part.base, list(names), [{n: n for n in names} for _ in srcs], {}, part.parameters)
        if i == 0:
            parts.insert(0, edge)
        else:
            parts.append(edge)
    out_ref = base or slices[0]["sources"][0]["model"]
    plan = SlicePlan(method=method, data=data, parts=parts, refs=refs, out_ref=out_ref, layers=out_layer,
                     layer_types=_layer_types(slices, refs), cli=cli,
                     **{k: v for k, v in cli.items() if k in ("out", "overwrite", "quiet", "shard_size") and
                        v is not None})
    plan.dtype = cli.get("dtype") or data.get("out_dtype") or data.get("dtype")
    if cli.get("copy_tokenizer") is not None:
        plan.copy_tokenizer = cli["copy_tokenizer"]
    from compress.merge.tokenizer import chat_template, plan_tokenizer

    if isinstance(data.get("chat_template"), str) and data["chat_template"] != "auto":
        chat_template(data["chat_template"], [])

    plan.tokenizer = plan_tokenizer(data, root, refs, base, parse_ref)
    for p in parts:
        _configs(plan, p)  # every part's recipe is checked before anything is written
    return plan


def _layer_types(slices: list[dict], refs: dict) -> Optional[list]:
    """The output's ``layer_types`` (Qwen2 and others list one per layer): each output layer keeps its source's."""
    out = []
    for sl in slices:
        s = sl["sources"][0]
        types = (refs[s["model"]].config or {}).get("layer_types")
        if not isinstance(types, list):
            return None
        out += types[s["layer_range"][0]: s["layer_range"][1]]
    return out


def _configs(plan: SlicePlan, part: Part):
    """The part's MergeConfig (the recipe's semantics, through ``from_mergekit``) and its opener; None for
    passthrough, which needs neither."""
    if plan.method == "passthrough":
        return None
    base = None if plan.method == "linear" else part.base
    models = [{"model": s.key, "parameters": s.parameters} for s in part.sources]
    sub = {"merge_method": plan.method, "models": models, "parameters": part.parameters}
    if base is not None:
        sub["base_model"] = base
    for k in ("dtype", "out_dtype"):
        if plan.data.get(k) is not None:
            sub[k] = plan.data[k]
    cli = {k: v for k, v in plan.cli.items() if k not in ("base", "out", "copy_tokenizer")}
    cfg = from_mergekit(sub, Path("/"), **cli)
    from compress.merge.methods import check_config

    check_config(cfg)
    return cfg


class _PartMerger(Merger):
    """A Merger over one part's views: t comes from the slice, not from the output layer index, and a model's own
    parameters match their filters against its source tensor name (mergekit's per-input lookup)."""

    def __init__(self, cfg, views: dict[Path, View], t: dict[str, float]):
        super().__init__(cfg, opener=views.__getitem__)
        self._t = t
        self._source_names = [views[Path(m.model)].mapping for m in cfg.models]
        self._out_name: Optional[str] = None

    def position(self, name: str) -> float:
        return self._t.get(self._out_name or name, 0.0)

    def param(self, key: str, name: str, model: Optional[int] = None) -> float:
        if model is None:
            return super().param(key, name)
        self._out_name = name
        try:
            return super().param(key, self._source_names[model].get(name, name), model)
        finally:
            self._out_name = None


def _views(plan: SlicePlan, part: Part) -> dict[Path, View]:
    from compress.runtime import torch_dtype

    vocab = None
    if plan.tokenizer is not None:
        vocab = PartVocab(plan.tokenizer, {s.key: plan.refs[s.key] for s in part.sources},
                          part.base, torch_dtype(plan.data.get("dtype")))
    return {Path(s.key): View(plan.refs[s.key], m, vocab, s.key) for s, m in zip(part.sources, part.maps)}


def _passthrough(plan: SlicePlan, part: Part, view: View):
    """mergekit's passthrough: the source's tensor, cast to the recipe's dtype, times ``scale`` when one is set
    (``elementwise.passthrough``, the maths of the native ``method: passthrough`` too)."""
    from compress.runtime import torch_dtype

    dtype, out_dtype = torch_dtype(plan.data.get("dtype")), torch_dtype(plan.dtype)
    src = part.sources[0]
    for name in part.names:
        t = view.get(name)
        if t.is_floating_point():
            t = t.to(dtype) if dtype is not None else t
            scale = None
            for scope in (src.parameters, part.parameters):
                if "scale" in scope:
                    scale = resolve_setting(scope["scale"], view.mapping[name], part.t.get(name, 0.0))
                    if scale is not None:
                        break
            t = passthrough(t[None], scale=None if scale is None else float(scale))
            t = t.to(out_dtype) if out_dtype is not None else t
        yield name, t


def write_plan(plan: SlicePlan, quiet: Optional[bool] = None) -> MergeSummary:
    """Write the plan's parts, in order, as one folder (atomically, as every merge)."""
    from compress.io.writer import check_output, write_folder

    if plan.out is None:
        raise CompressError("no output folder: pass OUT or --out DIR")
    inputs = [Path(p) for k in plan.refs for p in k.split("+")]
    check_output(plan.out, plan.overwrite, inputs)
    start = time.perf_counter()
    summary = MergeSummary(out=Path(plan.out))

    def tensors():
        for part in plan.parts:
            views = _views(plan, part)
            if plan.method == "passthrough":
                it = _passthrough(plan, part, next(iter(views.values())))
            else:
                it = _PartMerger(_configs(plan, part), views, part.t).tensors(quiet)
            for name, t in it:
                summary.tensors += 1
                summary.params += t.numel()
                yield name, t

    root = plan.refs[plan.out_ref].root
    aux = aux_files(root, plan.copy_tokenizer and plan.tokenizer is None)
    card = {"title": f"Merged model ({plan.method}, {len(plan.parts) - 2} slices)",
            "method": f"{plan.method} by slices, mergekit's planner (compress.merge.slices); variant mergekit",
            "inputs": {f"model {i + 1}": k for i, k in enumerate(plan.models)},
            "params": {"layers": plan.layers, **{k: v for k, v in (plan.data.get("parameters") or {}).items()}}}
    finish_aux = aux.pop("finish", None)

    def finish(folder: Path) -> None:
        if finish_aux is not None:
            finish_aux(folder)
        _finish_config(plan, folder)
        if plan.tokenizer is not None or plan.data.get("chat_template"):
            from compress.merge.tokenizer import save_tokenizer

            save_tokenizer(plan, folder, copy=plan.copy_tokenizer)

    write_folder(plan.out, tensors(), overwrite=plan.overwrite, expected_tensors=sum(len(p.names) for p in plan.parts),
                 shard_size=plan.shard_size or SHARD_SIZE, card=card, finish=finish, **aux)
    summary.seconds = time.perf_counter() - start
    summary.bytes_read = sum((r if isinstance(r, Checkpoint) else r.ckpt).nbytes for r in plan.refs.values())
    return summary


def _finish_config(plan: SlicePlan, folder: Path) -> None:
    """The output config counts the layers written (mergekit sets the architecture's layer-count key)."""
    import json

    from compress.io.files import read_model_config

    root = plan.refs[plan.out_ref].root
    cfg = read_model_config(folder) if (folder / "config.json").is_file() else (
        read_model_config(root) if root is not None else None)
    if cfg is None:
        return
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in cfg), "num_hidden_layers")
    cfg[key] = plan.layers
    if plan.layer_types is not None and isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = plan.layer_types
    if plan.tokenizer is not None:
        cfg["vocab_size"] = plan.tokenizer.rows
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
