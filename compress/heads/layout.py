"""Where attention heads sit in a checkpoint: per layer, the query/key/value/output weights and the rows or
columns of each head, for Llama-like models (Llama, Mistral, Qwen2: ``self_attn.{q,k,v,o}_proj``), GPT-2
(fused ``attn.c_attn`` and ``attn.c_proj``, ``Conv1D`` stored ``[in, out]``), BERT
(``attention.self.{query,key,value}`` and ``attention.output.dense``) and LLaVA (the Llama-like language model
inside ``LlavaForConditionalGeneration``; the vision tower is not scored or protected).

A head ``h`` of size ``d`` is, in Hugging Face ``nn.Linear`` layout ``[out, in]``: rows ``[h·d, (h+1)·d)`` of q,
its key/value group's rows of k and v, and columns ``[h·d, (h+1)·d)`` of the output projection. For GPT-2's
``Conv1D`` (stored ``[in, out]``) the same slices are columns of ``c_attn`` (at offsets 0, hidden, 2·hidden) and
rows of ``c_proj``. ``head_protect`` turns a list of heads into a ``compress.sparsify.protect.Protect`` in the
stored layout, which pruning, merging and NPS all accept.

**GQA.** With fewer key/value heads than query heads, KV group ``g = h // (n_heads / n_kv_heads)`` is shared by
``n_heads / n_kv_heads`` query heads. Protecting query head ``h`` also keeps its group's k and v rows: the head's
output is ``softmax(q_h k_gᵀ) v_g``, so pruning k_g or v_g would change the protected head however dense q_h
and its o columns stay. The price is that a protected group also shields the other query heads of the group
(their q rows and o columns are still pruned).

Names come from the model itself when there is one: a loaded ``nn.Module`` (its module names) or a checkpoint
folder/file (its tensor names, read lazily), so any prefix (``bert.``, ``model.language_model.``,
``language_model.model.``) is found rather than guessed; a bare config falls back to the names
``save_pretrained`` writes for its ``architectures``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from compress.errors import CompressError
from compress.sparsify.protect import Protect

# (family, regex over module names with the layer index as group 1, parts relative to the layer's attention)
_FAMILIES = (
    ("llama", re.compile(r"^(?P<pre>.*?)layers\.(?P<i>\d+)\.self_attn$"),
     {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}),
    ("gpt2", re.compile(r"^(?P<pre>.*?)h\.(?P<i>\d+)\.attn$"), {"qkv": "c_attn", "o": "c_proj"}),
    ("bert", re.compile(r"^(?P<pre>.*?)layer\.(?P<i>\d+)\.attention$"),
     {"q": "self.query", "k": "self.key", "v": "self.value", "o": "output.dense"}),
)
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|image_encoder)(\.|$)")


@dataclass(frozen=True)
class LayerNames:
    """Module names (without ``.weight``) of one layer's attention projections; GPT-2 has q = k = v = c_attn."""

    q: str
    k: str
    v: str
    o: str
    fused: bool = False


@dataclass(frozen=True)
class AttentionLayout:
    """Attention geometry and names of a model's language layers."""

    family: str  # llama | gpt2 | bert
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    layers: tuple[LayerNames, ...]
    bias: frozenset = frozenset()  # module names that carry a bias (per-head q/k/v entries are protected too)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_group(self, head: int) -> int:
        return head // self.group_size

    def check(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise CompressError(f"head ({layer}, {head}) is outside the model: {self.n_layers} layers of "
                                f"{self.n_heads} heads")

    def slices(self, layer: int, head: int, kv: bool = True) -> list[tuple[str, int, int, int]]:
        """(tensor name, axis of the stored tensor, start, stop) of every weight entry of the head; ``kv``:
        include its KV group's k/v slices. Bias entries of q/k/v come as axis 0 of the 1-D bias."""
        self.check(layer, head)
        names, d = self.layers[layer], self.head_dim
        q = (head * d, (head + 1) * d)
        g = self.kv_group(head)
        kvs = (g * d, (g + 1) * d)
        out = []
        if names.fused:
            # GPT-2 Conv1D: c_attn [in, 3·hidden] (columns q | k | v), c_proj [hidden, out] (rows = head inputs)
            spans = [q] + ([(self.hidden + kvs[0], self.hidden + kvs[1]),
                            (2 * self.hidden + kvs[0], 2 * self.hidden + kvs[1])] if kv else [])
            for a, b in spans:
                out.append((f"{names.q}.weight", 1, a, b))
                if names.q in self.bias:
                    out.append((f"{names.q}.bias", 0, a, b))
            out.append((f"{names.o}.weight", 0, *q))
            return out
        for mod, span in [(names.q, q)] + ([(names.k, kvs), (names.v, kvs)] if kv else []):
            out.append((f"{mod}.weight", 0, *span))
            if mod in self.bias:
                out.append((f"{mod}.bias", 0, *span))
        out.append((f"{names.o}.weight", 1, *q))
        return out


def _config_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg.get("language_config") or cfg


def geometry(cfg: dict) -> tuple[int, int, int, int]:
    """(n_heads, n_kv_heads, head_dim, hidden) of a (text) config dict."""
    t = _text_config(cfg)
    n_heads = t.get("num_attention_heads") or t.get("n_head")
    hidden = t.get("hidden_size") or t.get("n_embd")
    if not n_heads or not hidden:
        raise CompressError("config: cannot find the number of attention heads and the hidden size "
                            "(num_attention_heads/n_head, hidden_size/n_embd)")
    n_kv = t.get("num_key_value_heads") or n_heads
    head_dim = t.get("head_dim") or hidden // n_heads
    if n_heads % n_kv:
        raise CompressError(f"config: {n_heads} attention heads are not a multiple of {n_kv} key/value heads")
    return int(n_heads), int(n_kv), int(head_dim), int(hidden)


def _from_names(names: Iterable[str], params: set[str], cfg: dict, where: str) -> AttentionLayout:
    names = [n for n in names if not _VISION.search(n)]
    found: dict[str, dict[int, LayerNames]] = {}
    for fam, rx, parts in _FAMILIES:
        for n in names:
            m = rx.match(n)
            if not m:
                continue
            base = n
            mods = {k: f"{base}.{v}" for k, v in parts.items()}
            if not all(f"{x}.weight" in params for x in mods.values()):
                continue
            if "qkv" in mods:
                ln = LayerNames(mods["qkv"], mods["qkv"], mods["qkv"], mods["o"], fused=True)
            else:
                ln = LayerNames(mods["q"], mods["k"], mods["v"], mods["o"])
            found.setdefault(fam, {})[int(m.group("i"))] = ln
    if not found:
        raise CompressError(f"{where}: no attention layers found (supported: Llama-like self_attn.q/k/v/o_proj, "
                            "GPT-2 attn.c_attn/c_proj, BERT attention.self.query/key/value + output.dense, LLaVA's "
                            "language model)")
    fam, layers = max(found.items(), key=lambda kv: len(kv[1]))
    idx = sorted(layers)
    if idx != list(range(len(idx))):
        raise CompressError(f"{where}: attention layers {idx} are not numbered 0..{len(idx) - 1}")
    n_heads, n_kv, head_dim, hidden = geometry(cfg)
    if fam == "gpt2":
        n_kv = n_heads
    bias = frozenset(x for ln in layers.values() for x in {ln.q, ln.k, ln.v} if f"{x}.bias" in params)
    return AttentionLayout(fam, n_heads, n_kv, head_dim, hidden, tuple(layers[i] for i in idx), bias)


def _canonical_names(cfg: dict) -> list[str]:
    """Tensor names ``save_pretrained`` writes for a config's architecture (used when only a config is given)."""
    t = _text_config(cfg)
    n = t.get("num_hidden_layers") or t.get("n_layer")
    arch = (cfg.get("architectures") or [""])[0]
    mt = cfg.get("model_type", "")
    if not n:
        raise CompressError("config: no num_hidden_layers/n_layer")
    out = []
    for i in range(int(n)):
        if mt == "gpt2":
            pre = "transformer." if arch.endswith(("LMHeadModel", "ForSequenceClassification",
                                                   "ForTokenClassification", "DoubleHeadsModel")) else ""
            a = f"{pre}h.{i}.attn"
            out += [f"{a}.c_attn.weight", f"{a}.c_attn.bias", f"{a}.c_proj.weight"]
        elif mt == "bert":
            pre = "bert." if arch and arch != "BertModel" else ""
            a = f"{pre}encoder.layer.{i}.attention"
            for p in ("self.query", "self.key", "self.value"):
                out += [f"{a}.{p}.weight", f"{a}.{p}.bias"]
            out.append(f"{a}.output.dense.weight")
        else:
            pre = "model.language_model." if "text_config" in cfg else "model."
            a = f"{pre}layers.{i}.self_attn"
            bias = bool(t.get("attention_bias"))
            for p in ("q_proj", "k_proj", "v_proj"):
                out.append(f"{a}.{p}.weight")
                if bias:
                    out.append(f"{a}.{p}.bias")
            out.append(f"{a}.o_proj.weight")
    return out


def attention_layout(model_or_config) -> AttentionLayout:
    """The ``AttentionLayout`` of an ``nn.Module``, a checkpoint folder or file (str/Path), a Hugging Face
    config object or a config dict."""
    if hasattr(model_or_config, "named_parameters"):
        model = model_or_config
        params = {n for n, _ in model.named_parameters()}
        mods = [n for n, _ in model.named_modules()]
        return _from_names(mods, params, _config_dict(model.config), type(model).__name__)
    if isinstance(model_or_config, (str, os.PathLike)):
        from compress.io.reader import open_checkpoint

        path = Path(model_or_config)
        ck = open_checkpoint(path)
        params = set(ck.names())
        mods = sorted({n.rsplit(".", 1)[0] for n in params} | {n.rsplit(".", 2)[0] for n in params if n.count(".") > 1})
        cfg = ck.config
        if not cfg:
            cfg_path = (path if path.is_dir() else path.parent) / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        if not cfg:
            raise CompressError(f"{path}: no config.json beside the weights (the head geometry comes from it)")
        return _from_names(mods, params, cfg, str(path))
    cfg = _config_dict(model_or_config)
    params = set(_canonical_names(cfg))
    mods = sorted({n.rsplit(".", 2)[0] for n in params})
    return _from_names(mods, params, cfg, "config")


def head_protect(model_or_config, heads: Sequence[tuple[int, int]], sparsity: Optional[float] = None,
                 kv: bool = True) -> Protect:
    """A ``Protect`` that keeps the given (layer, head) pairs: q rows, their KV group's k/v rows (``kv``), and
    output-projection columns (rows/columns swapped for GPT-2's Conv1D), plus the per-head bias entries of q/k/v
    where the model has biases. ``sparsity``: prune the protected slices to this sparsity instead of keeping them
    dense (``--protect-sparsity``)."""
    layout = model_or_config if isinstance(model_or_config, AttentionLayout) else attention_layout(model_or_config)
    rows: dict[str, list[tuple[int, int]]] = {}
    cols: dict[str, list[tuple[int, int]]] = {}
    for layer, head in heads:
        for name, axis, a, b in layout.slices(int(layer), int(head), kv):
            spans = (rows if axis == 0 else cols).setdefault(name, [])
            if (a, b) not in spans:
                spans.append((a, b))
    return Protect((), {k: sorted(v) for k, v in rows.items()}, {k: sorted(v) for k, v in cols.items()},
                   sparsity=sparsity)
