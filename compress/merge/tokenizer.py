"""mergekit's tokenizer sections: ``tokenizer_source: base | union | <model>``, ``tokenizer: {source, tokens,
pad_to_multiple_of}`` and ``chat_template``, with mergekit 0.1.5's semantics.

The output tokenizer is the base's, the union of every model's (the base's ids first, then the other models'
new tokens, then added tokens), or a named model's; ``tokens:`` keys are added when missing. Every vocabulary
tensor (embeddings, ``lm_head``) of every input is then permuted to the output's ids before the merge
(``permute_rows``): a token that a model lacks takes the only model's row that has it, else the base's, else the
mean of the models that have it, else zeros; ``tokens:`` entries choose the row (``source: MODEL``, ``{kind:
model_token, model, token_id | token}``, ``{kind: zero}``) and ``force`` applies it to every model. Rows past the
vocabulary (``pad_to_multiple_of``) are the mean of the others.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

from compress.errors import CompressError


@dataclasses.dataclass
class VocabInfo:
    tokenizer: Any  # the output's transformers tokenizer
    vocab: dict[str, int]
    rows: int  # vocabulary rows written (len(vocab) padded)
    perms: dict[str, torch.Tensor]  # model key → source row of each output id (-1: the model lacks the token)
    tokens: dict[str, dict]  # token → {"source": key | {"kind": ...}, "force": bool}
    vocabs: dict[str, dict[str, int]]  # each model's own vocabulary


# ------------------------------------------------------------------------------------------------ pure tensor maths

def permute_rows(tensors: dict[str, torch.Tensor], info: VocabInfo, base: Optional[str] = None
                 ) -> dict[str, torch.Tensor]:
    """Each model's vocabulary tensor (rows = token ids) re-indexed to the output vocabulary, missing rows filled
    as mergekit's ``PermutedVocabulary`` fills them."""
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = {m: t.to(dtype) for m, t in tensors.items()}
    perms = {m: info.perms[m] for m in models}
    present = torch.stack([perms[m] >= 0 for m in models])
    count = present.sum(0)
    shape = tensors[models[0]].shape[1:]
    ids = {i: tok for tok, i in info.vocab.items()}
    forced = {info.vocab[t] for t, c in info.tokens.items() if c.get("force") and t in info.vocab}
    todo = sorted(set((count < len(models)).nonzero().flatten().tolist()) | forced)
    defaults: dict[int, torch.Tensor] = {}
    for tid in todo:
        tok = ids[tid]
        cfg = info.tokens.get(tok)
        row = tensors[models[0]].new_zeros(shape)
        if cfg is None:  # mergekit's automatic choice of the row
            have = [m for m, p in zip(models, present[:, tid].tolist()) if p]
            if len(have) == 1:
                row = tensors[have[0]][perms[have[0]][tid]]
            elif base in have:
                row = tensors[base][perms[base][tid]]
            elif have:
                for m in have:
                    row = row + tensors[m][perms[m][tid]]
                row /= len(have)
        else:
            row = _chosen_row(cfg, tok, tid, tensors, perms, info, row)
        defaults[tid] = row
    out = {}
    for m in models:
        p = perms[m]
        new = tensors[m].new_zeros((info.rows,) + tuple(shape))
        keep = p >= 0
        if forced:
            keep[list(forced)] = False
        new[: len(p)][keep] = tensors[m][p[keep]]
        for tid, row in defaults.items():
            if not keep[tid]:
                new[tid] = row
        if info.rows > len(p):
            new[len(p):] = new[: len(p)].mean(dim=0)
        out[m] = new
    return out


def _chosen_row(cfg: dict, tok: str, tid: int, tensors, perms, info: VocabInfo, zero: torch.Tensor) -> torch.Tensor:
    src = cfg.get("source")
    if src is None or (isinstance(src, dict) and src.get("kind") == "zero"):
        return zero
    model = src["model"] if isinstance(src, dict) else src
    if model not in tensors:
        raise CompressError(f"tokenizer.tokens['{tok}']: its row comes from {model}, which is not a source of "
                            "this tensor")
    if isinstance(src, dict):
        sid = src.get("token_id")
        if sid is None:
            if src.get("token") not in info.vocabs[model]:
                raise CompressError(f"tokenizer.tokens['{tok}']: token {src.get('token')!r} is not in {model}")
            sid = info.vocabs[model][src["token"]]
        if not 0 <= sid < tensors[model].shape[0]:
            raise CompressError(f"tokenizer.tokens['{tok}']: token_id {sid} is outside {model}'s "
                                f"{tensors[model].shape[0]} rows")
        return tensors[model][sid]
    if perms[model][tid] < 0:
        raise CompressError(f"tokenizer.tokens['{tok}']: {model} does not have the token")
    return tensors[model][perms[model][tid]]


# ------------------------------------------------------------------------------------------------ tokenizers

def _load(root: Optional[Path], key: str):
    from transformers import AutoTokenizer

    if root is None:
        raise CompressError(f"{key}: no model folder, so no tokenizer to read")
    try:
        return AutoTokenizer.from_pretrained(str(root), use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise CompressError(f"{root}: cannot read its tokenizer ({str(e).splitlines()[0]})") from None


def _vocab_size(ref) -> Optional[int]:
    n = (ref.config or {}).get("vocab_size")
    return n if isinstance(n, int) else None


def _token_cfgs(tokens: Any, root: Path, parse_ref) -> dict[str, dict]:
    if tokens is None:
        return {}
    if not isinstance(tokens, dict):
        raise CompressError("mergekit recipe: tokenizer.tokens must map a token to {source, force}")
    out = {}
    for tok, c in tokens.items():
        f = f"tokenizer.tokens['{tok}']"
        c = c or {}
        if not isinstance(c, dict) or set(c) - {"source", "force"}:
            raise CompressError(f"mergekit recipe: {f} must be {{source, force}}")
        src = c.get("source")
        if isinstance(src, str):
            src = parse_ref(src, root, f"{f}.source")
        elif isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero" and set(src) == {"kind"}:
                pass
            elif kind == "model_token" and "model" in src and (("token_id" in src) != ("token" in src)) and \
                    not set(src) - {"kind", "model", "token_id", "token"}:
                src = {**src, "model": parse_ref(src["model"], root, f"{f}.source.model")}
            else:
                raise CompressError(f"mergekit recipe: {f}.source must be a model, {{kind: zero}} or {{kind: "
                                    "model_token, model, token_id | token}}")
        elif src is not None:
            raise CompressError(f"mergekit recipe: {f}.source must be a model or a mapping, got {src!r}")
        if not isinstance(c.get("force", False), bool):
            raise CompressError(f"mergekit recipe: {f}.force must be true or false")
        out[str(tok)] = {"source": src, "force": c.get("force", False)}
    return out


def plan_tokenizer(data: dict, root: Path, refs: dict, base: Optional[str], parse_ref) -> Optional[VocabInfo]:
    """The output tokenizer and every model's row permutation, or None when the recipe builds no tokenizer."""
    section, source = data.get("tokenizer"), data.get("tokenizer_source")
    if section is not None and source is not None:
        raise CompressError("mergekit recipe: give tokenizer_source or a tokenizer section, not both")
    pad = None
    tokens: dict[str, dict] = {}
    if section is not None:
        if not isinstance(section, dict) or set(section) - {"source", "tokens", "pad_to_multiple_of"}:
            raise CompressError("mergekit recipe: tokenizer must be a mapping of source, tokens, pad_to_multiple_of")
        source = section.get("source", "union")
        tokens = _token_cfgs(section.get("tokens"), root, parse_ref)
        pad = section.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
            raise CompressError(f"mergekit recipe: tokenizer.pad_to_multiple_of must be a positive integer, "
                                f"got {pad!r}")
    if source is None:
        return None
    keys = list(refs)
    base = base or keys[0]
    toks = {base: _stripped(_load(refs[base].root, base), _vocab_size(refs[base]), refs[base].root)}
    for k in keys:
        if k not in toks:
            toks[k] = _load(refs[k].root, k)
    if source == "base":
        out = toks[base]
    elif source == "union":
        out = _union(toks, {k: _vocab_size(refs[k]) for k in toks})
    elif isinstance(source, str):
        key = parse_ref(source, root, "tokenizer source")
        if key not in refs:
            raise CompressError(f"mergekit recipe: tokenizer source {source} is not one of the models merged")
        out = _load(refs[key].root, key)
    else:
        raise CompressError(f"mergekit recipe: tokenizer source must be base, union or a model, got {source!r}")
    have = set(out.get_vocab())
    for t in tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    rows = len(vocab)
    if pad and rows % pad:
        rows += pad - rows % pad
    perms = {}
    for k in keys:
        own = toks[k].get_vocab()
        size = _vocab_size(refs[k]) or len(own)
        p = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < size:
                p[i] = j
        perms[k] = p
    return VocabInfo(out, vocab, rows, perms, tokens, {k: t.get_vocab() for k, t in toks.items()})


def _stripped(tok, size: Optional[int], where):
    """The base's tokenizer without the added tokens whose ids are past the model's rows (mergekit strips them
    too); plain vocabulary entries past the rows are refused."""
    import json

    import tokenizers

    past = {t: i for t, i in tok.get_vocab().items() if size is not None and i >= size}
    if not past:
        return tok
    added = {a.content for i, a in tok.added_tokens_decoder.items() if i >= size}
    plain = sorted(set(past) - added)
    if plain or not getattr(tok, "is_fast", False):
        raise CompressError(f"{where}: tokenizer has {len(past)} tokens past the config's vocab_size {size} (e.g. "
                            f"{(plain or list(past))[0]!r}); trim them from the base's tokenizer first")
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["added_tokens"] = [e for e in spec.get("added_tokens", []) if e["id"] < size]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tok


def _union(toks: dict, sizes: dict):
    """The base's tokenizer plus every other model's tokens (plain ones first, then added ones), as mergekit's
    ``build_union_tokenizer``; the base's own object is left untouched (a saved copy is extended)."""
    import tempfile

    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for k, tok in toks.items():
        size = sizes[k] or tok.vocab_size
        for t, i in tok.get_vocab().items():
            if i < size:
                plain.setdefault(t)
        for i, a in tok.added_tokens_decoder.items():
            if i < size:
                added.setdefault(a.content, a)
    base = next(iter(toks.values()))
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d, use_fast=True)
    own = base.get_vocab()
    for t in plain:
        if t not in added and t not in own:
            out.add_tokens(t)
    for a in added.values():
        out.add_tokens(a)
    return out


def chat_template(value: str, tokenizers) -> Optional[str]:
    """mergekit's chat_template: 'auto' (the commonest among the models' tokenizers), a name of
    ``chat_templates.NAMED`` (mergekit's rule for a name: under 256 characters, no newline, no '{') or a Jinja
    template."""
    from compress.merge.chat_templates import NAMED

    if value == "auto":
        found = []
        for tok in tokenizers:
            t = tok.chat_template
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in NAMED:
        return NAMED[value]
    if len(value) < 20 or "{" not in value:
        raise CompressError(f"mergekit recipe: chat_template {value!r} is neither 'auto', a template name "
                            f"({', '.join(sorted(NAMED))}) nor a Jinja template")
    return value


def save_tokenizer(plan, folder: Path, copy: bool = True) -> None:
    """Write the output tokenizer (built, or the donor's with the chat template set), as mergekit does."""
    template = plan.data.get("chat_template")
    if plan.tokenizer is not None:
        tok = plan.tokenizer.tokenizer
    elif not copy:
        return  # mergekit warns and saves no template when told not to copy the tokenizer
    else:
        tok = _load(plan.refs[plan.out_ref].root, plan.out_ref)
    if template:
        roots = [(r.root, k) for k, r in plan.refs.items()]
        t = chat_template(template, [_load(r, k) for r, k in roots] if template == "auto" else [])
        if t is not None:
            tok.chat_template = t
    tok.save_pretrained(str(folder))
