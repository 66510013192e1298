"""Whole-weight pruning methods as tensor functions: N:M validity, SparseGPT's reconstruction against Wanda's,
OWL's allocation, strategies, protection."""

from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.prune import methods as M
from compress.prune.owl import outlier_ratio, owl_allocation
from compress.prune.strategy import Strategy, random_strategies, validate, weighted_mean


def _layer(seed=0, out=48, inp=64, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    # correlated inputs with uneven feature scales, as activations of a real layer are
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    x = x * torch.linspace(0.2, 3.0, inp)
    return w, x


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_prune_exactly_m_minus_n_of_every_group(pattern):
    n, m = M.parse_pattern(pattern)
    w, x = _layer()
    h = x.T @ x
    masks = {"magnitude": M.magnitude_mask(w, 0.5, (n, m)),
             "wanda": M.wanda_mask(w, (x * x).sum(0).sqrt(), 0.5, (n, m)),
             "sparsegpt": M.sparsegpt_prune(w, h, 0.5, (n, m))[1]}
    for name, mask in masks.items():
        pruned_per_group = (~mask).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((pruned_per_group == m - n).all()), name


def test_nm_trailing_partial_group_keeps_the_layer_at_half():
    w, _ = _layer(inp=172)  # stories260k's MLP width: a multiple of 4, not of 8
    mask = M.magnitude_mask(w, 0.5, (4, 8))
    assert int((~mask).sum()) == w.numel() // 2
    assert bool(((~mask)[:, :168].reshape(w.shape[0], -1, 8).sum(-1) == 4).all())


def test_sparsegpt_reconstructs_a_layer_better_than_wanda():
    w, x = _layer()
    h = x.T @ x
    norms = (x * x).sum(0).sqrt()
    for nm in (None, (2, 4)):
        w_wanda = w * M.wanda_mask(w, norms, 0.5, nm)
        w_sgpt, mask = M.sparsegpt_prune(w, h, 0.5, nm)
        assert bool((w_sgpt[~mask] == 0).all())
        assert abs(1 - mask.float().mean().item() - 0.5) < 1e-9
        e_wanda = M.reconstruction_error(w, w_wanda, x)
        e_sgpt = M.reconstruction_error(w, w_sgpt, x)
        assert e_sgpt < 0.95 * e_wanda, (nm, e_sgpt, e_wanda)


def test_row_and_tensor_comparison_groups():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 10, generator=g)
    scores[0] *= 100  # one row of large scores: per-tensor keeps it whole, per-row prunes it too
    row = M.row_mask(scores, 0.3)
    assert bool(((~row).sum(1) == 3).all())
    tensor = M.tensor_mask(scores, 0.3)
    assert int((~tensor).sum()) == 18 and bool(tensor[0].all())
    # s·in not whole: rows differ by one so the layer total is round(numel·s)
    uneven = M.row_mask(scores, 0.25)
    assert int((~uneven).sum()) == 15 and set((~uneven).sum(1).tolist()) == {2, 3}


def test_protected_rows_stay_dense_and_count_as_kept():
    w, x = _layer()
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[:8] = True
    h = x.T @ x
    for mask, new in ((M.wanda_mask(w, (x * x).sum(0).sqrt(), 0.5, keep=keep), None),
                      (M.magnitude_mask(w, 0.5, keep=keep), None),
                      M.sparsegpt_prune(w, h, 0.5, keep=keep)[::-1],
                      M.sparsegpt_prune(w, h, 0.5, (2, 4), keep=keep)[::-1]):
        assert bool(mask[:8].all())
        if new is not None:  # OBS leaves a row with nothing pruned exactly as it was
            assert torch.equal(new[:8], w[:8])
    # per tensor: the protected entries take part of the kept half, the rest is pruned harder
    mask = M.magnitude_mask(w, 0.5, keep=keep)
    assert int(mask.sum()) == w.numel() // 2


def test_outlier_ratio_by_hand():
    # mean 2.8; M = 3 → threshold 8.4; one entry of five above it
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 10.0])], 3.0) == pytest.approx(0.2)


def test_owl_allocation_keeps_the_weighted_mean_and_favours_outlier_blocks():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03, 0.04]
    params = [100, 100, 300, 100, 100, 50]
    s, lam = 0.7, 0.08
    alloc = owl_allocation(ratios, params, s, lam)
    assert weighted_mean(alloc, params) == pytest.approx(s, abs=1e-9)
    assert all(s - lam - 1e-12 <= a <= s + lam + 1e-12 for a in alloc)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert [alloc[i] for i in order] == sorted(alloc, reverse=True)  # more outliers → pruned less


def test_strategy_round_trip_and_validation(tmp_path):
    params = [10, 10, 20]
    st = Strategy((0.4, 0.6, 0.5), "test", {"note": "x"})
    st.save(tmp_path / "s.json")
    back = Strategy.load(tmp_path / "s.json")
    assert back.layer_sparsity == st.layer_sparsity and back.info == {"note": "x"}
    assert validate(back, params, 0.5) is back
    with pytest.raises(CompressError, match="has 3 values but the model has 2 blocks"):
        validate(back, [10, 10])
    with pytest.raises(CompressError, match="not the requested 0.6"):
        validate(back, params, 0.6)
    with pytest.raises(CompressError, match="outside"):
        validate(Strategy((0.5, 1.0, 0.2)), params)
    for r in random_strategies(4, 0.5, params, spread=0.2, seed=1):
        assert weighted_mean(r.layer_sparsity, params) == pytest.approx(0.5, abs=1e-9)
        assert len(set(r.layer_sparsity)) > 1


def test_batched_sparsegpt_solves_each_strategy_as_if_alone():
    w, x = _layer(inp=160)  # two column blocks with blocksize 128: the cross-block update is exercised
    h = x.T @ x
    sparsities = [0.3, 0.5, 0.7]
    W, masks = M.sparsegpt_prune_many(w, h, sparsities)
    for b, s in enumerate(sparsities):
        w1, m1 = M.sparsegpt_prune(w, h, s)
        assert torch.equal(masks[b], m1), s
        torch.testing.assert_close(W[b], w1, rtol=1e-5, atol=1e-6)
        assert abs(1 - m1.float().mean().item() - s) < 1e-3


def _sparsegpt_column_loop(w, h, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT's Algorithm 1 as its reference code writes it: one column at a time."""
    W = w.clone().float()
    cols = W.shape[1]
    hinv, dead = M.inverse_hessian_factor(h, percdamp)
    W[:, dead] = 0
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Q1, Err1, H1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1), \
            hinv[i1:i2, i1:i2]
        if nm is None:
            score = W1 ** 2 / torch.diag(H1).reshape(1, -1) ** 2
            k = int(round(score.numel() * sparsity))
            mask1 = torch.zeros_like(W1, dtype=torch.bool).reshape(-1)
            mask1[torch.sort(score.reshape(-1), stable=True).indices[:k]] = True
            mask1 = mask1.reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]] ** 2 / torch.diag(H1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices, True)
            q = W1[:, i].masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (W1[:, i] - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ H1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return W, ~pruned & ~dead


# the GPU path too, where the machine has one (the batched triangular solves are a different kernel there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_group_solves_equal_the_reference_column_loop(nm, device):
    # 300 inputs: two full column blocks and a partial one, so the cross-block update and the tail are exercised
    w, x = _layer(inp=300, out=40, tokens=4096)
    h = x.T @ x
    h[7] = h[:, 7] = 0  # a dead input
    ref_w, ref_mask = _sparsegpt_column_loop(w, h, 0.6, nm)
    W, masks = M.sparsegpt_prune_many(w.to(device), h.to(device), [0.6, 0.6], nm)
    for b in range(2):
        assert torch.equal(masks[b].cpu(), ref_mask)
        torch.testing.assert_close(W[b].cpu(), ref_w, rtol=1e-4, atol=1e-5)
    # a different answer than the plain masked weight: the update really moved the kept entries
    assert (W[0].cpu() - w * ref_mask).abs().max() > 1e-2
