"""Calibration: which modules are prunable, the calibration windows, and the per-layer input statistics the
methods need, computed once per (model, calibration set) and cached on disk.

**Statistics come from the dense model.** One forward pass of the unpruned model over the calibration windows
records, for every prunable linear layer, Σ x_j² per input feature (Wanda's ‖X_j‖₂², and OWL's outlier
scores) and, when SparseGPT is asked for, the Hessian H = Σ xᵀx (XᵀX). This is the one-shot setting of
OWL/Wanda-style allocation studies: one pass serves every strategy, so pruning a model to K per-layer
sparsity vectors costs one calibration plus K cheap mask passes. The reference code of SparseGPT and Wanda
instead runs the blocks *sequentially*, feeding block l the outputs of blocks < l already pruned; that ties the
statistics to one strategy and is not what is computed here (the SparseGPT paper reports the difference as
small at 50%; it grows with sparsity).

Calibration windows follow the Wanda/SparseGPT loaders: ``nsamples`` windows of ``seqlen`` tokens starting at
random offsets of the tokenized text, drawn from a generator seeded by ``seed``.

Layers fed the very same input tensor (q/k/v of an attention block, gate/up of a gated MLP) share one set of
statistics: they are accumulated once and stored once (the file's ``alias`` metadata maps the others to it).

Cache key: sha256 of (model fingerprint = sha256 of config.json and every weight file, calibration text
sha256, nsamples, seqlen, seed, the module list). Files: ``<key>.norms.safetensors`` (Σx², tokens) and
``<key>.hessian.safetensors`` (Σx² and XᵀX; serves a norms request too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.config import CALIB_CACHE
from compress.errors import CompressError
from compress.io.blocks import find_blocks, is_conv1d, is_linear

# Names searched (re.search) in module names; embeddings are nn.Embedding and never candidates anyway.
DEFAULT_IGNORE = r"(^|\.)(lm_head|embed_out|score|classifier|pooler|qa_outputs|cls)(\.|$)"


@dataclass(frozen=True)
class Prunable:
    """One prunable linear layer: its module name, block index (None outside the blocks), weight shape as
    [out, in], and whether the stored weight is transposed ([in, out], GPT-2's Conv1D)."""

    name: str
    block: int | None
    out_features: int
    in_features: int
    transposed: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def find_prunable(model: nn.Module, targets: str | None = None, ignore: str | None = DEFAULT_IGNORE
                  ) -> tuple[list[Prunable], int]:
    """(prunable layers, number of blocks). Candidates are linear layers whose name matches ``targets``
    (default: every one inside the blocks) and not ``ignore``; one-line error when none is left."""
    prefix, blocks = find_blocks(model)
    out = []
    for name, m in model.named_modules():
        if not is_linear(m):
            continue
        block = None
        if name.startswith(prefix + "."):
            block = int(name[len(prefix) + 1:].split(".")[0])
        if targets is None and block is None:
            continue
        if targets is not None and not re.search(targets, name):
            continue
        if ignore and re.search(ignore, name):
            continue
        w = m.weight
        transposed = is_conv1d(m)
        o, i = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
        out.append(Prunable(name, block, o, i, transposed))
    if not out:
        what = f"matching --targets '{targets}'" if targets else "inside the blocks"
        raise CompressError(f"{type(model).__name__}: no linear layers found {what}"
                            + (f" (after --ignore '{ignore}')" if ignore else ""))
    return out, len(blocks)


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0,
                        source: str = "calibration text") -> torch.Tensor:
    """[nsamples, seqlen] token windows at random offsets of the tokenized ``text`` (Wanda/SparseGPT loaders)."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen:
        raise CompressError(f"{source} has {ids.numel()} tokens, fewer than one calibration sample of --seqlen "
                            f"{seqlen}; give a longer text or a smaller --seqlen")
    starts = calibration_starts(ids.numel(), nsamples, seqlen, seed)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Start offsets of the calibration windows in a text of ``n_tokens`` tokens (seeded; see above)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen + 1, (nsamples,), generator=g)


def _sha256_file(path: Path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every weight file of a Hugging Face folder (name and content)."""
    from compress.io.reader import resolve_weight_files

    files, _ = resolve_weight_files(model_dir)
    h = hashlib.sha256()
    for path in [Path(model_dir) / "config.json", *sorted(files)]:
        if path.is_file():
            h.update(path.name.encode())
            _sha256_file(path, h)
    return h.hexdigest()


def cache_key(model_fp: str, text_sha: str, nsamples: int, seqlen: int, seed: int,
              modules: list[Prunable]) -> str:
    spec = {"model": model_fp, "calib": text_sha, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "modules": [m.name for m in modules], "version": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class LayerStats:
    """Σx² per input feature, optionally XᵀX, over ``tokens`` calibration tokens (float32, on some device)."""

    sqsum: torch.Tensor
    tokens: int
    hessian: torch.Tensor | None = None

    @property
    def col_norm(self) -> torch.Tensor:
        return self.sqsum.clamp_min(0).sqrt()


@torch.no_grad()
def collect_stats(model: nn.Module, modules: list[Prunable], windows: torch.Tensor, *, hessian: bool,
                  batch_size: int = 8, device: str = "cpu", quiet: bool = False) -> dict[str, LayerStats]:
    """One forward pass of the (dense) model over ``windows``; forward hooks on every prunable layer add up
    Σx² per input feature and, with ``hessian``, XᵀX. A layer whose input, in the first batch, is the very tensor
    an earlier layer received gets that layer's statistics (the same object) instead of its own."""
    from compress.progress import track

    by_name = dict(model.named_modules())
    stats: dict[str, LayerStats] = {}
    for p in modules:
        z = torch.zeros(p.in_features, dtype=torch.float32, device=device)
        stats[p.name] = LayerStats(z, 0, torch.zeros(p.in_features, p.in_features, dtype=torch.float32,
                                                    device=device) if hessian else None)
    alias: dict[str, str] = {}
    first_inputs: dict[int, tuple[torch.Tensor, str]] | None = {}  # None once the first batch is done

    def hook(name):
        def fn(_module, args, _output):
            if first_inputs is not None:
                seen = first_inputs.get(id(args[0]))
                if seen is not None and seen[0] is args[0]:
                    alias[name] = seen[1]
                    return
                first_inputs[id(args[0])] = (args[0], name)
            elif name in alias:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats[name]
            s.sqsum += (x * x).sum(0)
            s.tokens += x.shape[0]
            if s.hessian is not None:
                s.hessian.addmm_(x.T, x)
        return fn

    handles = [by_name[p.name].register_forward_hook(hook(p.name)) for p in modules]
    was_training = model.training
    model.eval()
    try:
        for batch in track(list(windows.split(batch_size)), "calibration", quiet=quiet):
            model(input_ids=batch.to(device))
            first_inputs = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, root in alias.items():
        stats[name] = stats[root]
    return stats


def _aliases(stats: dict[str, LayerStats]) -> dict[str, str]:
    """{layer: the first layer holding the same statistics object}."""
    first: dict[int, str] = {}
    return {name: first[id(s)] for name, s in stats.items() if first.setdefault(id(s), name) != name}


def save_stats(stats: dict[str, LayerStats], path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    from compress.io.writer import atomic_file

    alias = _aliases(stats)
    tensors = {}
    for name, s in stats.items():
        if name in alias:
            continue
        tensors[f"{name}.sqsum"] = s.sqsum.cpu().contiguous()
        if s.hessian is not None:
            tensors[f"{name}.hessian"] = s.hessian.cpu().contiguous()
    tokens = {name: s.tokens for name, s in stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta), "tokens": json.dumps(tokens),
                                               "alias": json.dumps(alias)})


def load_stats(path: Path, modules: list[Prunable], hessian: bool, device: str = "cpu"
               ) -> dict[str, LayerStats] | None:
    """The cached statistics, or None when the file is missing or lacks a layer."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tokens = json.loads(f.metadata()["tokens"])
            alias = json.loads(f.metadata().get("alias", "{}"))
            keys = set(f.keys())
            out = {}
            for p in modules:
                if p.name in alias:
                    continue
                if f"{p.name}.sqsum" not in keys or (hessian and f"{p.name}.hessian" not in keys):
                    return None
                h = f.get_tensor(f"{p.name}.hessian").to(device) if hessian else None
                out[p.name] = LayerStats(f.get_tensor(f"{p.name}.sqsum").to(device), int(tokens[p.name]), h)
            for p in modules:
                if p.name in alias:
                    if alias[p.name] not in out:
                        return None
                    out[p.name] = out[alias[p.name]]
            return out
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None  # an unreadable cache entry is recomputed, not an error


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_paths(cache_dir: Path, key: str) -> dict[str, Path]:
    return {"norms": Path(cache_dir) / f"{key}.norms.safetensors",
            "hessian": Path(cache_dir) / f"{key}.hessian.safetensors"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CALIB_CACHE", CALIB_CACHE))
