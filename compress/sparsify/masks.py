"""Per-tensor keep-masks: magnitude top-k and random (DARE-style) keep."""

from __future__ import annotations

import hashlib

import torch

from compress.errors import CompressError
from compress.sparsify.topk import topk_mask


def check_density(density: float) -> float:
    if not (0.0 < float(density) <= 1.0):
        raise CompressError(f"density must be in (0, 1], got {density}")
    return float(density)


def keep_count(numel: int, density: float, rounding: str = "round") -> int:
    """Entries a tensor keeps at ``density``: round(density·numel), at least one for a non-empty tensor (this
    project's extract, NPS), or, with ``rounding="floor"``, ⌊density·numel⌋, which may be 0 (PEFT's
    ``magnitude_based_pruning``; mergekit's own rule, at least one, is ``compress.merge.methods.magnitude_keep``'s
    argsort selection). The one place the count is computed, so a rule is chosen by name, never by accident."""
    if numel == 0:
        return 0
    d = check_density(density)
    if rounding == "round":
        return min(numel, max(1, int(round(d * numel))))
    if rounding == "floor":
        return min(numel, int(d * numel))
    raise CompressError(f"keep_count: rounding must be round or floor (got '{rounding}')")


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, tensor name): draws do not depend on order, device or sharding."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density·numel) entries of largest |t| (per-tensor top-k, as in TIES' trim step).

    Exact radix-histogram selection (``compress.sparsify.topk``): no sort, no ``torch.topk`` scratch. Ties at the
    threshold go to the lowest flat indices, so the mask is the same on every device.
    """
    return topk_mask(t, keep_count(t.numel(), density))


def random_mask(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's Bernoulli drop, Yu et al. 2024).

    Drawn on the CPU from ``generator`` so the mask is the same whatever device ``t`` lives on.
    """
    density = check_density(density)
    if density == 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    draw = torch.rand(t.shape, generator=generator, device="cpu")
    return (draw < density).to(t.device)


def sparsify(t: torch.Tensor, density: float, method: str = "magnitude", *, seed: int = 0,
             name: str = "") -> torch.Tensor:
    """The keep-mask of ``t`` under ``method`` ('magnitude' or 'random'); ``name`` seeds random draws."""
    if method == "magnitude":
        return magnitude_mask(t, density)
    if method == "random":
        return random_mask(t, density, seeded_generator(seed, name))
    raise CompressError(f"unknown sparsify method '{method}' (choose magnitude or random)")
