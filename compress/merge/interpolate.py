"""Pairwise interpolation θ(α) = θ_base + α·τ along a task vector (Ilharco et al. 2023; α = 1 is the fine-tuned
model, α = 0 the base, α > 1 extrapolates).

Writing: one Hugging Face folder per α, streamed tensor by tensor like every other pass. Evaluating: the model is
loaded once, τ read once, and each α costs only a weight update plus the evaluator (``evaluate_alphas``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from compress.config import InterpolateConfig
from compress.errors import CompressError
from compress.io.reader import open_checkpoint
from compress.runtime import resolve_device, torch_dtype
from compress.taskvec import TaskVector


def alpha_dir(out: Path, alpha: float) -> Path:
    return out / f"alpha-{alpha:g}"


def write_alphas(cfg: InterpolateConfig) -> list[Path]:
    """θ_base + α·τ for each α: into ``out`` for a single α, else into ``out/alpha-<α>/``."""
    if cfg.out is None:
        raise CompressError("no output folder: pass --out DIR, or an evaluator to only evaluate")
    from compress.io.writer import check_output, config_inputs

    base = open_checkpoint(cfg.base)
    tv = TaskVector.from_paths(base, cfg.finetuned)
    targets = [cfg.out] if len(cfg.alphas) == 1 else [alpha_dir(cfg.out, a) for a in cfg.alphas]
    for t in targets:
        check_output(t, cfg.overwrite, config_inputs(cfg))
    device = resolve_device(cfg.device)
    for alpha, target in zip(cfg.alphas, targets):
        card = {"title": f"Interpolated model (α = {alpha:g})", "method": "θ_base + α·(θ_ft − θ_base)",
                "inputs": {"base": str(cfg.base), "finetuned": str(cfg.finetuned)}, "params": {"alpha": alpha}}
        tv.apply(base, target, scale=alpha, device=device, dtype=torch_dtype(cfg.dtype), shard_size=cfg.shard_size,
                 overwrite=cfg.overwrite, quiet=cfg.quiet, card=card)
    return targets


def best_alpha(alphas: list[float], scores: list[float]) -> float:
    """The α of the lowest score, among finite scores only (a diverged model scores NaN or Inf and is never best)."""
    finite = [i for i, sc in enumerate(scores) if math.isfinite(sc)]
    if not finite:
        raise CompressError(f"no α gave a finite score (α = {', '.join(f'{a:g}' for a in alphas)}); nothing written")
    return alphas[min(finite, key=scores.__getitem__)]


@torch.no_grad()
def evaluate_alphas(model: torch.nn.Module, tv: TaskVector, alphas: list[float],
                    evaluate: Callable[[torch.nn.Module], float], names: Optional[dict[str, str]] = None,
                    quiet: Optional[bool] = None) -> list[float]:
    """Score ``model`` (loaded from the base) at each α by moving its parameters along τ in place.

    ``names`` maps task-vector tensor names to the model's parameter names (identity when None); tensors of τ
    the model does not have are an error. The model is left at the base weights.
    """
    from compress.progress import track

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    base, tau = {}, {}
    for name in tv.names():
        pname = (names or {}).get(name, name)
        if pname not in params:
            raise CompressError(f"task-vector tensor '{name}' has no parameter '{pname}' in the model")
        p = params[pname]
        base[pname] = p.detach().clone()
        tau[pname] = tv.get(name, device=p.device).to(torch.float32)
    scores = []
    try:
        for alpha in track(alphas, "interpolate", quiet=quiet):
            for pname, b in base.items():
                params[pname].copy_((b.float() + alpha * tau[pname]).to(b.dtype))
            scores.append(float(evaluate(model)))
    finally:
        for pname, b in base.items():
            params[pname].copy_(b)
    return scores
