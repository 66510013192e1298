"""PEFT LoRA adapters as inputs (a lazy task vector on the base's tensor names) and as outputs (extract-lora).

Everything here follows PEFT's conventions (huggingface/peft, checked against 0.21):

* file layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``), keys
  ``base_model.model.<module>.lora_A.weight`` (r × in) and ``.lora_B.weight`` (out × r); embeddings use
  ``<module>.lora_embedding_A`` (r × num_embeddings) and ``.lora_embedding_B`` (dim × r), no ``.weight``;
* ΔW = scale · B @ A with scale = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` and
  ``alpha_pattern`` keys are regexes matched like ``peft.utils.other.get_pattern_key``:
  ``re.match(rf"(.*\\.)?({key})$", module_name)``, first matching key in dict order wins (PEFT writes the config
  with ``sort_keys=True``, so once saved that is sorted order);
* Conv1D (GPT-2) layers hold (in × out) weights, so ΔW is transposed; PEFT decides per layer type and rewrites the
  config's ``fan_in_fan_out`` as it goes, so the shape decides here and the flag only for square matrices;
  embeddings are always transposed;
* ``modules_to_save``, ``bias="all"/"lora_only"`` and a targeted embedding's ``base_layer.weight`` are stored as
  full tensors that replace the base tensor when PEFT loads the adapter: their delta is saved − base;
* ``lora_bias=True`` stores ``lora_B.bias``; merging adds scale · bias to the base bias.

Pure tensor math (``lora_delta``, ``svd_lora``) is kept apart from the folder walking (``LoraAdapter``,
``write_lora_adapter``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.io.reader import Checkpoint, TensorInfo, open_checkpoint
from compress.io.writer import SafetensorsStreamWriter, atomic_dir, header_room
from compress.progress import track

PREFIX = "base_model.model."  # PEFT's key prefix for LoRA (PeftModel.base_model = LoraModel, .model = the HF model)
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# LoraConfig options whose effect is not "add scale·B@A to W" (PEFT 0.21: fields tagged ``is_lora_variant`` plus
# options that change the model's structure or which parameters are adapted). Truthy value → CompressError.
UNSUPPORTED_OPTIONS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                       "arrow_config", "kasa_config", "use_qalora", "layer_replication", "target_parameters",
                       "trainable_token_indices")
UNSUPPORTED_INIT = ("mica",)  # init_lora_weights values that select a LoRA variant

# Module names treated as embeddings (PEFT's EMBEDDING_LAYER_NAMES plus the usual HF spellings).
_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|embed_positions|wte|wpe|shared|word_embeddings|"
                           r"position_embeddings|token_type_embeddings|embeddings)$")
_OUTPUT_RE = re.compile(r"(^|\.)(lm_head|embed_out)$")


# ----------------------------------------------------------------------------------------------- pure tensor math

def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's ``LoraLayer.update_layer``: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, transpose: bool = False) -> torch.Tensor:
    """ΔW = scale · B @ A, transposed for Conv1D (``fan_in_fan_out``) and embedding layers (PEFT's get_delta_weight)."""
    d = (B @ A) * scale
    return d.T if transpose else d


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key matching ``module`` (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def svd_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD factors (A: rank × in, B: out × rank) with B @ A ≈ ``delta``, √S split between the two.

    By Eckart–Young the error is minimal among rank-``rank`` matrices: ‖Δ − BA‖_F² = Σ_{i>rank} σ_i². Computed in
    float32 (float64 stays float64) on ``delta``'s device; the rank is capped at min(shape).
    """
    if delta.dim() != 2:
        raise CompressError(f"svd_lora: expected a 2-D tensor, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise CompressError(f"svd_lora: rank must be at least 1, got {rank}")
    work = delta if delta.dtype == torch.float64 else delta.to(torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


# ------------------------------------------------------------------------------------------ adapter as input

@dataclass(frozen=True)
class _Part:
    """One contribution to a base tensor's delta."""

    kind: str  # "lora" | "bias" (lora_B.bias) | "full" (saved tensor replacing the base)
    keys: tuple[str, ...]  # adapter keys: (A, B) for lora, (B.bias,) for bias, (saved,) for full
    scale: float = 1.0
    transpose: bool = False


def _read_config(path: Path) -> dict:
    f = path / CONFIG_FILE
    if not f.is_file():
        raise CompressError(f"{path}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CompressError(f"{f}: expected a JSON object")
    return cfg


def _check_config(cfg: dict, where: Path) -> None:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CompressError(f"{where}: peft_type is '{cfg.get('peft_type')}'; only LORA adapters can be read "
                            "(merge other adapter types with PEFT first)")
    for opt in UNSUPPORTED_OPTIONS:
        if cfg.get(opt):
            raise CompressError(f"{where}: option '{opt}' is not supported (its effect is not a plain low-rank "
                                f"delta); merge with PEFT's merge_and_unload() and pass the full model instead")
    if cfg.get("init_lora_weights") in UNSUPPORTED_INIT:
        raise CompressError(f"{where}: init_lora_weights='{cfg['init_lora_weights']}' selects a LoRA variant that "
                            "is not supported; merge with PEFT's merge_and_unload() and pass the full model instead")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise CompressError(f"{where}: field '{field}' must be a positive number, got {cfg.get(field)!r}")


class LoraAdapter:
    """A PEFT LoRA adapter folder seen as a lazy task vector on the base checkpoint's tensor names.

    ``names()``/``info()`` read only headers; ``get(name)`` reads the few adapter tensors behind one base tensor
    (and the base tensor itself for fully saved modules) and returns ΔW, so that base + ΔW equals PEFT's
    ``merge_and_unload()``.
    """

    def __init__(self, path: str | os.PathLike, base: Checkpoint):
        self.path = Path(path)
        self.base = base
        self.config = _read_config(self.path)
        _check_config(self.config, self.path / CONFIG_FILE)
        files = [self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()]
        if not files:
            raise CompressError(f"{self.path}: adapter folder has no {' or '.join(WEIGHT_FILES)}")
        self.file = files[0]
        self._ckpt = open_checkpoint(self.file)
        self._tails: dict[str, list[str]] | None = None
        self._parts: dict[str, list[_Part]] = {}
        self._build()

    # --- mapping adapter keys to base names (reads headers only)
    def _rank_scale(self, module: str) -> tuple[int, float]:
        """r and scale of one module, as PEFT's LoraModel._create_and_replace picks them from the patterns."""
        cfg = self.config
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r = rank_pattern.get(pattern_key(rank_pattern, module), cfg["r"])
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), cfg["lora_alpha"])
        return r, lora_scale(r, alpha, bool(cfg.get("use_rslora")))

    def _build(self) -> None:
        pairs: dict[tuple[str, str], dict[str, str]] = {}  # (module, "lora"|"embedding") -> {"A": key, "B": key}
        for key in self._ckpt.names():
            rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", rel):
                pairs.setdefault((m[1], "lora"), {})[m[2]] = key
            elif m := re.fullmatch(r"(.+)\.lora_embedding_([AB])", rel):
                pairs.setdefault((m[1], "embedding"), {})[m[2]] = key
            elif m := re.fullmatch(r"(.+)\.lora_B\.bias", rel):
                self._add(self._resolve(m[1] + ".bias", key), _Part("bias", (key,), self._rank_scale(m[1])[1]))
            elif re.search(r"(^|\.)lora_", rel):
                raise CompressError(f"{self.file}: key '{key}' belongs to a LoRA variant this reader does not "
                                    "support; merge with PEFT's merge_and_unload() and pass the full model instead")
            else:  # modules_to_save / bias / a targeted embedding's base_layer: a full replacement tensor
                name = self._resolve(re.sub(r"\.base_layer(?=\.[^.]+$)", "", rel), key)
                if self._ckpt.info(key).shape != self.base.info(name).shape:
                    raise CompressError(
                        f"{self.file}: saved tensor '{key}' has shape {list(self._ckpt.info(key).shape)} but base "
                        f"tensor '{name}' has {list(self.base.info(name).shape)} (resized during fine-tuning?); "
                        "a task vector needs equal shapes")
                self._add(name, _Part("full", (key,)))
        for (module, kind), ab in pairs.items():
            if set(ab) != {"A", "B"}:
                have = next(iter(ab.values()))
                raise CompressError(f"{self.file}: '{have}' has no matching lora_{'B' if 'A' in ab else 'A'}")
            self._add_lora(module, kind, ab["A"], ab["B"])
        self._check_bias_option()

    def _add_lora(self, module: str, kind: str, key_a: str, key_b: str) -> None:
        name = self._resolve(module + ".weight", key_a)
        a_shape, b_shape = self._ckpt.info(key_a).shape, self._ckpt.info(key_b).shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CompressError(f"{self.file}: '{key_a}' has shape {list(a_shape)}; only LoRA on linear and "
                                "embedding layers is supported (not convolutions)")
        r, scale = self._rank_scale(module)
        if a_shape[0] != r or b_shape[1] != r:
            raise CompressError(f"{self.file}: '{key_a}' has rank {a_shape[0]} but the config gives r={r} for "
                                f"module '{module}' (check r / rank_pattern in {CONFIG_FILE})")
        ba = (b_shape[0], a_shape[1])  # shape of B @ A
        target = self.base.info(name).shape
        if kind == "embedding":
            transpose = True
        elif ba[0] == ba[1]:
            transpose = bool(self.config.get("fan_in_fan_out"))
        else:  # PEFT forces fan_in_fan_out per layer type (True for Conv1D, False for Linear): follow the shape
            transpose = tuple(target) == ba[::-1]
        if tuple(target) != (ba[::-1] if transpose else ba):
            raise CompressError(f"{self.file}: LoRA on '{module}' gives a {list(ba)} update but base tensor '{name}' "
                                f"has shape {list(target)}; is this adapter for a different base model?")
        self._add(name, _Part("lora", (key_a, key_b), scale, transpose))

    def _check_bias_option(self) -> None:
        bias = self.config.get("bias", "none") or "none"
        if bias == "none" or any(p.kind == "full" and p.keys[0].endswith(".bias")
                                 for ps in self._parts.values() for p in ps):
            return
        if bias == "all":
            wanted = [n for n in self.base.names() if n.endswith(".bias")]
        else:  # "lora_only": biases of the LoRA layers
            lora = [n for n, ps in self._parts.items() if any(p.kind == "lora" for p in ps)]
            wanted = [b for n in lora if (b := n.removesuffix("weight") + "bias") in self.base]
        if wanted:
            raise CompressError(f"{self.path / CONFIG_FILE}: bias='{bias}' but the adapter holds no bias tensors "
                                f"(base has e.g. '{wanted[0]}'); re-save it with its biases or set bias='none'")

    def _add(self, name: str, part: _Part) -> None:
        self._parts.setdefault(name, []).append(part)

    def _resolve(self, rel: str, key: str) -> str:
        """The base tensor an adapter path stands for, allowing one or two wrapper prefixes on either side (e.g. an
        adapter trained on LlamaForCausalLM, ``model.layers.0...``, over a base saved from a bare LlamaModel,
        ``layers.0...``, or the reverse)."""
        if rel in self.base:
            return rel
        parts = rel.split(".")
        for k in (1, 2):
            if len(parts) - k >= 2 and (cand := ".".join(parts[k:])) in self.base:
                return cand
        if self._tails is None:
            self._tails = {}
            for n in self.base.names():
                p = n.split(".")
                for k in (1, 2):
                    if len(p) - k >= 2:
                        self._tails.setdefault(".".join(p[k:]), []).append(n)
        found = self._tails.get(rel, [])
        if len(found) == 1:
            return found[0]
        why = f"matches {len(found)} base tensors ({', '.join(found[:3])})" if found else "matches no base tensor"
        raise CompressError(f"{self.file}: adapter key '{key}' {why} in {self.base.path}; is this adapter for a "
                            "different base model?")

    # --- the task-vector interface
    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self._parts)} tensors)"

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def names(self) -> list[str]:
        """Base tensor names this adapter changes, in the base checkpoint's order."""
        return [n for n in self.base.names() if n in self._parts]

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of the base tensor ``name``."""
        if name not in self._parts:
            raise CompressError(f"{self.path}: adapter does not change tensor '{name}'")
        return self.base.info(name)

    def get(self, name: str, *, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW for one base tensor, computed in float32 (float64 if asked) and returned in ``dtype``."""
        if name not in self._parts:
            raise CompressError(f"{self.path}: adapter does not change tensor '{name}'")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        read = lambda key: self._ckpt.get(key, device=device, dtype=work)  # noqa: E731
        total = None
        for p in self._parts[name]:
            if p.kind == "lora":
                d = lora_delta(read(p.keys[0]), read(p.keys[1]), p.scale, p.transpose)
            elif p.kind == "bias":
                d = read(p.keys[0]) * p.scale
            else:
                d = read(p.keys[0]) - self.base.get(name, device=device, dtype=work)
            total = d if total is None else total + d
        return total.to(dtype)

    def close(self) -> None:
        """Close the adapter's weight file (the base checkpoint belongs to the caller)."""
        self._ckpt.close()

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- adapter as output

def _skip_reason(name: str, delta: torch.Tensor, targets: re.Pattern | None) -> str | None:
    if delta.dim() != 2:
        return f"{delta.dim()}-D"
    if not name.endswith(".weight"):
        return "not a .weight"
    if not delta.is_floating_point():
        return "not a float tensor"
    module = name[: -len(".weight")]
    if targets is not None:
        return None if targets.search(module) else "not matched by targets_regex"
    if _EMBEDDING_RE.search(module) or _OUTPUT_RE.search(module):
        return "embedding / output head (pass targets_regex to include)"
    return None


def write_lora_adapter(deltas: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, rank: int,
                       base_model_name_or_path: str, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                       targets_regex: str | None = None, task_type: str | None = None, fan_in_fan_out: bool = False,
                       total: int | None = None, progress: bool = True,
                       shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Write a PEFT-loadable LoRA adapter approximating ``deltas`` (base tensor name → ΔW) at ``rank``.

    Deltas are consumed one at a time: each is factored by ``svd_lora`` and its factors streamed to
    ``adapter_model.safetensors``; the folder appears atomically. By default only 2-D ``*.weight`` tensors of linear
    layers are covered (not embeddings, not lm_head); ``targets_regex`` (``re.search`` on the module path, e.g.
    ``model.layers.0.self_attn.q_proj``) selects instead. Embedding modules are written in PEFT's
    ``lora_embedding_A/B`` layout. ``fan_in_fan_out=True`` marks the weights as Conv1D (GPT-2), stored (in × out).

    The config follows PEFT: ``r`` = largest rank used, ``lora_alpha`` = r so the scale is 1, ``target_modules`` =
    explicit module paths, and for a matrix whose rank is capped below r (rank ≤ min(shape)) both ``rank_pattern``
    and ``alpha_pattern`` name it, because PEFT's scale is alpha / r per module.

    ``total`` (the number of deltas, taken from ``len`` when it has one) enables the progress bar. ``shapes``
    ({name: shape} of the deltas to come, a superset is fine) reserves the header's room, so that each byte of the
    adapter file is written once.

    Returns ``{"out_dir", "r", "covered": {name: {"module", "rank", "params", "rel_error", "lora_params"}},
    "skipped": {name: {"params", "reason"}}, "covered_params", "skipped_params", "lora_params"}``; rel_error =
    ‖Δ − BA‖_F / ‖Δ‖_F with the factors as stored (after the ``dtype`` cast).
    """
    if not isinstance(rank, int) or rank < 1:
        raise CompressError(f"rank must be a positive integer, got {rank!r}")
    try:
        targets = re.compile(targets_regex) if targets_regex is not None else None
    except re.error as e:
        raise CompressError(f"targets_regex '{targets_regex}' is not a valid regular expression ({e})") from None
    if total is None and isinstance(deltas, Sized):
        total = len(deltas)
    quiet = True if (not progress or total is None) else None  # None: COMPRESS_QUIET decides
    covered, skipped = {}, {}
    with atomic_dir(out_dir, overwrite) as tmp:
        meta = {"format": "pt"}
        reserve = 0 if shapes is None else header_room(_factor_bounds(shapes, rank), meta)
        writer = SafetensorsStreamWriter(tmp / "adapter_model.safetensors", meta, reserve=reserve)
        try:
            for name, delta in track(deltas, "extract LoRA", total=total, quiet=quiet):
                reason = _skip_reason(name, delta, targets)
                if reason is not None:
                    skipped[name] = {"params": delta.numel(), "reason": reason}
                    continue
                module = name[: -len(".weight")]
                (key_a, A), (key_b, B), err = _factor(module, delta, rank, dtype, fan_in_fan_out)
                writer.add(key_a, A)
                writer.add(key_b, B)
                covered[name] = {"module": module, "rank": A.shape[0], "params": delta.numel(), "rel_error": err,
                                 "lora_params": A.numel() + B.numel()}
            if not covered:
                raise CompressError(f"{out_dir}: no tensor to factor (only 2-D linear '.weight' deltas are covered "
                                    "by default); pass targets_regex to choose modules")
        except BaseException:
            writer.abort()
            raise
        writer.close()
        ranks = {c["module"]: c["rank"] for c in covered.values()}
        r = max(ranks.values())
        low = {m: k for m, k in ranks.items() if k < r}
        config = {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "r": r, "lora_alpha": r, "target_modules": list(ranks), "rank_pattern": low, "alpha_pattern": dict(low),
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "lora_dropout": 0.0, "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return {
        "out_dir": str(out_dir), "r": r, "covered": covered, "skipped": skipped,
        "covered_params": sum(c["params"] for c in covered.values()),
        "skipped_params": sum(s["params"] for s in skipped.values()),
        "lora_params": sum(c["lora_params"] for c in covered.values()),
    }


def _factor_bounds(shapes: dict[str, tuple[int, ...]], rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """The adapter entries ``shapes``' 2-D weights may give (both key spellings), dimensions at their largest."""
    out = []
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            module, side = name[: -len(".weight")], max(shape)
            out += [(f"{PREFIX}{module}.lora_embedding_{ab}", (side, rank)) for ab in "AB"]
    return out


def _factor(module: str, delta: torch.Tensor, rank: int, dtype: torch.dtype | None, fan_in_fan_out: bool):
    """One module's PEFT keys and factors, and the relative error of the factors as stored."""
    embedding = bool(_EMBEDDING_RE.search(module))
    # PEFT's layout: B @ A is (out × in); Conv1D (fan_in_fan_out) and embeddings store its transpose as the weight
    target = delta.T if (embedding or fan_in_fan_out) else delta
    A, B = svd_lora(target, rank)
    A, B = A.to(dtype or delta.dtype).contiguous(), B.to(dtype or delta.dtype).contiguous()
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    ref = target.to(work)
    norm = float(torch.linalg.norm(ref))
    err = float(torch.linalg.norm(ref - B.to(work) @ A.to(work))) / norm if norm > 0 else 0.0
    suffix = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    return (f"{PREFIX}{module}.{suffix[0]}", A), (f"{PREFIX}{module}.{suffix[1]}", B), err
