"""Keep-masks against direct references: torch.topk for magnitude, Bernoulli rate and seeding for random."""

from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.sparsify import keep_count, magnitude_mask, random_mask, seeded_generator, sparsify


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.001])
def test_magnitude_mask_keeps_the_topk_magnitudes(dtype, density):
    x = torch.randn(300, 333, generator=torch.Generator().manual_seed(0)).to(dtype)
    m = magnitude_mask(x, density)
    k = round(density * x.numel())
    assert m.shape == x.shape and int(m.sum()) == k
    kept = torch.sort(x.abs()[m].double()).values
    ref = torch.sort(torch.topk(x.abs().reshape(-1).double(), k).values).values
    assert torch.equal(kept, ref)


def test_ties_go_to_the_lowest_indices():
    x = torch.tensor([0.0, 2.0, 1.0, 1.0, -1.0, 1.0, 0.5])
    assert magnitude_mask(x, 3 / 7).tolist() == [False, True, True, True, False, False, False]


def test_random_mask_rate_and_seeding():
    x = torch.ones(200_000)
    a = random_mask(x, 0.3, seeded_generator(1, "w"))
    assert abs(a.float().mean().item() - 0.3) < 0.005
    assert torch.equal(a, sparsify(x, 0.3, "random", seed=1, name="w"))
    assert not torch.equal(a, sparsify(x, 0.3, "random", seed=1, name="v"))


def test_density_checks():
    assert keep_count(10, 1e-6) == 1 and keep_count(0, 0.5) == 0 and keep_count(7, 1.0) == 7
    for bad in (0.0, 1.01, -1):
        with pytest.raises(CompressError, match="density must be in"):
            magnitude_mask(torch.ones(4), bad)
    with pytest.raises(CompressError, match="unknown sparsify method"):
        sparsify(torch.ones(4), 0.5, "wanda")
