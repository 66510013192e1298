"""Calibration: which modules are prunable, the calibration windows, and the per-layer input statistics the
methods need, collected while the model (or one block of it, ``compress.io.blocks``) runs, optionally cached.

For every prunable linear layer: Σ x_j² per input feature (Wanda's ‖X_j‖₂², and OWL's outlier scores) and, when
SparseGPT is asked for, the Hessian H = Σ xᵀx (XᵀX). Two calibration modes (``Pruner``'s ``calibration``):

- **shared**: every block sees the dense model's activations. One pass serves every strategy, so pruning a model
  to K per-layer sparsity vectors costs one calibration plus K cheap mask passes (the one-shot setting of
  OWL/Wanda-style allocation studies; what the strategy evaluators use). Only these statistics are cached.
- **sequential**: block l sees the outputs of blocks < l already pruned, as the reference code of SparseGPT and
  Wanda and llm-compressor's sequential pipeline; the statistics are tied to one strategy.

Measured (stories260K, 64 windows of 128 tokens of wikitext2.valid, perplexity on the dev text ptb.valid, first
16,384 tokens, mean ± sd over calibration seeds 0–2; dense 167.4):

| sparsity | Wanda sequential | Wanda shared | SparseGPT sequential | SparseGPT shared |
|---|---:|---:|---:|---:|
| 50% | 218.8 ± 0.7 | 248.7 ± 3.0 | 260.2 ± 9.1 | 261.4 ± 8.8 |
| 70% | 1105 ± 167 | 694 ± 129 | 520 ± 48 | 471 ± 12 |
| 80% | 1647 ± 476 | 2316 ± 308 | 711 ± 26 | 500 ± 29 |

The difference does grow with sparsity, in both directions: at 50% sequential wins for Wanda (shared +12 to +15%
in every seed) and ties for SparseGPT (−2 to +2%); at 70% shared wins (Wanda −35 to −41%, SparseGPT −18 to +3%);
at 80% shared wins for SparseGPT (−26 to −32%) and loses for Wanda (+12 to +67%). Neither mode wins everywhere:
`compress prune` (one strategy) defaults to sequential, the reference behaviour and the winner at 50% Wanda, its
most common use; the ``Pruner`` API (many strategies) to shared; SparseGPT at 70–80% is better with
``--calibration shared`` on this model.

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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.io.blocks import find_blocks, is_conv1d, is_linear, language_model_prefix
from compress.runtime import tf32

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
    prefix, blocks = find_blocks(model, language_model_prefix(model))
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


class StatsHooks:
    """Forward hooks on prunable layers that add up Σx² per input feature and, with ``hessian``, XᵀX, while the
    model (or one block of it) runs; ``stats`` once the ``with`` ends. A layer whose input, in the first batch, is
    the very tensor an earlier layer received gets that layer's statistics (the same object) instead of its own.
    A batch ends when the first layer to fire fires again."""

    def __init__(self, root: nn.Module, modules: list[Prunable], hessian: bool, device, prefix: str = ""):
        by_name = dict(root.named_modules())
        self._modules = [(p.name, by_name[p.name[len(prefix):]]) for p in modules]
        self.stats: dict[str, LayerStats] = {}
        for p in modules:
            z = torch.zeros(p.in_features, dtype=torch.float32, device=device)
            self.stats[p.name] = LayerStats(z, 0, torch.zeros(p.in_features, p.in_features, dtype=torch.float32,
                                                              device=device) if hessian else None)
        self._alias: dict[str, str] = {}
        self._first: dict[int, tuple[torch.Tensor, str]] | None = {}  # None once the first batch is done
        self._opener: str | None = None
        self._handles: list = []

    def _hook(self, name: str):
        def fn(_module, args, _output):
            if self._opener is None:
                self._opener = name
            elif name == self._opener:
                self._first = None  # the second batch begins: the inputs of the first may be freed
            if self._first is not None:
                seen = self._first.get(id(args[0]))
                if seen is not None and seen[0] is args[0]:
                    self._alias[name] = seen[1]
                    return
                self._first[id(args[0])] = (args[0], name)
            elif name in self._alias:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = self.stats[name]
            s.sqsum += (x * x).sum(0)
            s.tokens += x.shape[0]
            if s.hessian is not None:
                with tf32(False):
                    s.hessian.addmm_(x.T, x)
        return fn

    def __enter__(self) -> "StatsHooks":
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self._modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._first = None
        for name, root in self._alias.items():
            self.stats[name] = self.stats[root]


@torch.no_grad()
def collect_stats(model: nn.Module, modules: list[Prunable], windows: torch.Tensor, *, hessian: bool,
                  batch_size: int = 8, device: str = "cpu", quiet: bool = False) -> dict[str, LayerStats]:
    """One forward pass of the whole (dense) model over ``windows`` with ``StatsHooks`` on every prunable layer."""
    from compress.progress import track

    was_training = model.training
    model.eval()
    try:
        with StatsHooks(model, modules, hessian, device) as hooks:
            for batch in track(list(windows.split(batch_size)), "calibration", quiet=quiet):
                model(input_ids=batch.to(device))
    finally:
        model.train(was_training)
    return hooks.stats


def _aliases(stats: dict[str, LayerStats]) -> dict[str, str]:
    """{layer: the first layer holding the same statistics object}."""
    first: dict[int, str] = {}
    return {name: first[id(s)] for name, s in stats.items() if first.setdefault(id(s), name) != name}


def stats_nbytes(modules: list[Prunable], hessian: bool) -> int:
    """Bytes of a statistics cache file for ``modules`` at most (layers found to share an input store theirs
    once)."""
    return sum(4 * p.in_features * (1 + (p.in_features if hessian else 0)) for p in modules)


class StatsCache:
    """One statistics cache file written as the statistics come (``add`` a block's, then ``close``), atomically:
    its size is printed and checked against the free disk before anything is written, and a full disk stops with
    one line naming the file, with no temporary left behind."""

    def __init__(self, path: Path, nbytes: int, meta: dict, quiet: bool = False, exact: bool = True):
        import shutil
        from contextlib import ExitStack

        from compress.io.writer import SafetensorsStreamWriter, atomic_file
        from compress.progress import console, quiet_default

        self.path, self.meta = Path(path), meta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path.parent).free
        if nbytes > free:
            raise CompressError(f"{self.path}: the statistics cache needs {nbytes / 1e9:,.2f} GB but "
                                f"{self.path.parent} has {free / 1e9:,.2f} GB free; leave out --cache-dir or "
                                "name a folder on a larger disk")
        if not (quiet or quiet_default()):
            console.print(f"statistics cache: writing {'' if exact else 'up to '}{nbytes / 1e9:,.3f} GB "
                          f"({nbytes:,} bytes) to {self.path}", soft_wrap=True)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_file(self.path, overwrite=True))
        self._writer = SafetensorsStreamWriter(tmp)
        self._tokens: dict[str, int] = {}
        self._alias: dict[str, str] = {}

    def add(self, stats: dict[str, LayerStats]) -> None:
        alias = _aliases(stats)
        try:
            for name, s in stats.items():
                self._tokens[name] = s.tokens
                if name in alias:
                    self._alias[name] = alias[name]
                    continue
                self._writer.add(f"{name}.sqsum", s.sqsum.cpu().contiguous())
                if s.hessian is not None:
                    self._writer.add(f"{name}.hessian", s.hessian.cpu().contiguous())
        except BaseException as e:
            self.abort(e)
            raise

    def close(self) -> None:
        self._writer.metadata.update({"meta": json.dumps(self.meta), "tokens": json.dumps(self._tokens),
                                      "alias": json.dumps(self._alias)})
        try:
            self._writer.close()
        except BaseException as e:
            self.abort(e)
            raise
        self._stack.close()

    def abort(self, e: BaseException) -> None:
        """Remove the temporary; an OSError ``e`` (a full disk) comes out as the line naming the file."""
        self._writer.abort()
        self._stack.__exit__(type(e), e, e.__traceback__)


def save_stats(stats: dict[str, LayerStats], path: Path, meta: dict, quiet: bool = False) -> None:
    alias = _aliases(stats)
    nbytes = sum(4 * s.sqsum.numel() + (4 * s.hessian.numel() if s.hessian is not None else 0)
                 for name, s in stats.items() if name not in alias)
    cache = StatsCache(path, nbytes, meta, quiet)
    cache.add(stats)
    cache.close()


def has_stats(path: Path, modules: list[Prunable], hessian: bool) -> bool:
    """Whether the cache file holds statistics of every layer of ``modules`` (its header only is read)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            alias, keys = json.loads(f.metadata().get("alias", "{}")), set(f.keys())
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return False
    want = ("sqsum", "hessian") if hessian else ("sqsum",)
    return all(f"{alias.get(p.name, p.name)}.{k}" in keys for p in modules for k in want)


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
