"""The pure merge functions against PEFT's merge utilities, hand-computed cases and mergekit's documented maths."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft.utils import merge_utils as peft

from compress.config import Conditional
from compress.errors import CompressError
from compress.merge.methods import (
    combine,
    della_keep_prob,
    magnitude_keep,
    method_preset,
    outlier_keep,
    slerp,
    task_vector_merge,
)
from compress.merge.recipe import layer_position, resolve_setting
from compress.sparsify.topk import GlobalThreshold, kth_largest_bits, magnitude_bits, topk_mask


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(40, 25, generator=g) for _ in range(3)], torch.tensor([0.5, 1.0, 0.8])


@pytest.mark.parametrize("name,peft_fn,kwargs", [
    ("task_arithmetic", peft.task_arithmetic, {}),
    ("magnitude_prune", peft.magnitude_prune, {"density": 0.3}),
    ("ties", peft.ties, {"density": 0.2}),
])
def test_deterministic_methods_equal_peft(tensors, name, peft_fn, kwargs):
    ts, w = tensors
    ours = task_vector_merge(torch.stack(ts), w, method_preset(name, "peft"), **kwargs)
    assert torch.equal(ours, peft_fn(ts, w, **kwargs))


def test_ties_count_election_equals_peft_frequency(tensors):
    ts, w = tensors
    ours = task_vector_merge(torch.stack(ts), w, method_preset("ties", "peft", consensus="count"), density=0.4)
    assert torch.equal(ours, peft.ties(ts, w, 0.4, majority_sign_method="frequency"))


@pytest.mark.parametrize("name,peft_fn", [("dare_linear", peft.dare_linear), ("dare_ties", peft.dare_ties)])
def test_dare_equals_peft_with_the_same_draws(tensors, name, peft_fn):
    # PEFT draws torch.bernoulli from the global generator, model by model; ours from the generator it is given
    ts, w = tensors
    torch.manual_seed(123)
    ref = peft_fn(ts, w, 0.3)
    ours = task_vector_merge(torch.stack(ts), w, method_preset(name, "peft"), density=0.3,
                             generator=torch.Generator().manual_seed(123))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    assert not torch.equal(ours, task_vector_merge(torch.stack(ts), w, method_preset(name, "peft"), density=0.3,
                                                   generator=torch.Generator().manual_seed(124)))


def test_ties_hand_computed_three_models():
    # τ_1, τ_2, τ_3 over 5 entries, density 0.6 → each keeps its 3 largest |τ|
    t1 = torch.tensor([0.5, -0.1, 0.3, -0.8, 0.05])    # keeps 0.5, 0.3, -0.8
    t2 = torch.tensor([-0.4, 0.2, 0.6, -0.1, 0.7])     # keeps -0.4, 0.6, 0.7
    t3 = torch.tensor([0.1, -0.9, -0.2, 0.3, -0.25])   # keeps -0.9, 0.3, -0.25
    # trimmed: [0.5, 0, 0.3, -0.8, 0], [-0.4, 0, 0.6, 0, 0.7], [0, -0.9, 0, 0.3, -0.25]
    # elected sign of Σ: [+0.1 → +, -0.9 → -, +0.9 → +, -0.5 → -, +0.45 → +]
    # disjoint mean of the agreeing entries:
    #   e0: only 0.5 agrees → 0.5;  e1: -0.9;  e2: (0.3 + 0.6)/2 = 0.45;  e3: -0.8;  e4: 0.7
    expected = torch.tensor([0.5, -0.9, 0.45, -0.8, 0.7])
    ours = task_vector_merge(torch.stack([t1, t2, t3]), [1, 1, 1], method_preset("ties", "peft"), density=0.6)
    assert torch.allclose(ours, expected, atol=1e-7)
    # λ scales the merged vector; the paper's global top-k equals per-tensor when there is one tensor
    paper = task_vector_merge(torch.stack([t1, t2, t3]), [1, 1, 1], method_preset("ties"), density=0.6, lam=0.5)
    assert torch.allclose(paper, 0.5 * expected, atol=1e-7)


def test_mergekit_variant_weights_the_election_and_the_mean():
    # two models, weights 3 and 1: τ_1 = [+1, -1], τ_2 = [-2, +2]
    d = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])
    w = [3.0, 1.0]
    # unweighted mass: Σ = [-1, +1] → model 2 wins both; PEFT mean of weighted agreeing: [-2·1, 2·1]
    peft_like = combine(d, w, consensus="mass", sign_on="unweighted", disjoint="mean")
    assert peft_like.tolist() == [-2.0, 2.0]
    # weighted (mergekit): Σ w τ = [3 - 2, -3 + 2] = [+1, -1] → model 1 wins; weighted mean: 3·1 / 3 = 1
    mk = method_preset("ties", "mergekit")
    assert (mk.sign_on, mk.disjoint, mk.topk) == ("weighted", "weighted_mean", "per_tensor")
    assert combine(d, w, consensus="mass", sign_on="weighted", disjoint="weighted_mean").tolist() == [1.0, -1.0]
    assert combine(d, w, consensus="mass", sign_on="weighted", disjoint="sum").tolist() == [3.0, -3.0]


def test_presets_default_to_the_papers():
    ties = method_preset("ties")
    assert (ties.topk, ties.sign_on, ties.disjoint, ties.consensus) == ("global", "unweighted", "mean", "mass")
    assert method_preset("dare_ties").rescale == "inverse_keep"
    assert method_preset("dare_ties", "mergekit").rescale == "l1"
    assert method_preset("della").rescale == "inverse_keep"
    with pytest.raises(CompressError, match="unknown merge method 'tie'"):
        method_preset("tie")


def test_dare_rescale_inverse_keep_preserves_the_expectation():
    d = torch.full((200_000,), 0.5)
    out = task_vector_merge(d[None], [1.0], method_preset("dare_linear"), density=0.1,
                            generator=torch.Generator().manual_seed(0))
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 5.0))           # each kept entry scaled by 1/p
    assert abs(out.mean().item() - 0.5) < 0.02                         # E[out] = τ
    l1 = task_vector_merge(d[None], [1.0], method_preset("dare_linear", rescale="l1"), density=0.1,
                           generator=torch.Generator().manual_seed(0))
    assert torch.allclose(l1.abs().sum(), d.abs().sum())               # mergekit: L1 norm kept


def test_breadcrumbs_drops_outliers_and_the_tail():
    d = torch.arange(1, 101, dtype=torch.float32)  # |d| = 1..100
    m = outlier_keep(d, density=0.5, gamma=0.1)
    # top 10 dropped (91..100), next 50 kept (41..90), bottom 40 dropped
    assert d[m].tolist() == list(range(41, 91))


def test_della_keep_probabilities_rise_with_magnitude():
    d = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = della_keep_prob(d, density=0.5, epsilon=0.2)
    # ranks by |d|: 0.1→0, 0.5→1, 1.0→2, 2.0→3, 3.0→4; p = 0.3 + rank/4 · 0.4
    assert torch.allclose(p, torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]]))
    with pytest.raises(CompressError, match="epsilon"):
        della_keep_prob(d, density=0.1, epsilon=0.2)


def test_slerp_endpoints_and_the_arc():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid, torch.tensor([2 ** -0.5, 2 ** -0.5]))  # on the unit circle, not the chord
    near = slerp(0.5, a, a + 1e-6)
    assert torch.allclose(near, a, atol=1e-6)                           # collinear → linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_radix_selection_equals_topk(dtype):
    g = torch.Generator().manual_seed(1)
    for n in (7, 1000, 300_000):
        x = torch.randn(n, generator=g).to(dtype)
        bits = magnitude_bits(x)
        for k in (1, n // 3, n):
            assert kth_largest_bits(bits, k) == int(torch.kthvalue(bits, n - k + 1).values)
            m = topk_mask(x, k)
            assert int(m.sum()) == k
            assert torch.equal(x.abs().float()[m].sort().values, x.abs().float().topk(k).values.sort().values)
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert topk_mask(ties, 2).tolist() == [False, True, True, False, False]  # ties: lowest index first


def test_global_threshold_streams_to_the_exact_global_topk():
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(s, generator=g) for s in ((300, 200), (17,), (400_000,))]
    th = GlobalThreshold(0.05)
    for p in parts:
        th.add(p)
    for p in parts:
        th.refine(p)
    allv = torch.cat([p.reshape(-1) for p in parts]).abs()
    k = int(0.05 * allv.numel())
    assert th.threshold == int(allv.topk(k).values[-1].view(torch.int32))
    assert sum(int(th.mask(p).sum()) for p in parts) == k
    # the global and per-tensor masks differ: a tensor of small values keeps less than 5 %
    small = th.mask(parts[1] * 1e-3)
    assert int(small.sum()) == 0
    # per tensor, ⌊0.05·17⌋ = 0: PEFT's rule keeps none, mergekit's (argsort) at least one
    assert int(magnitude_keep(parts[1] * 1e-3, 0.05).sum()) == 0
    assert int(magnitude_keep(parts[1] * 1e-3, 0.05, "argsort").sum()) == 1


def test_resolve_setting_gradients_and_filters():
    assert resolve_setting(0.5, "x", 0.3) == 0.5
    assert resolve_setting([0.0, 1.0], "x", 0.25) == 0.25
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)   # between the 2nd and 3rd point
    conds = [Conditional(filter="self_attn", value=[0.0, 1.0]), Conditional(filter="mlp", value=0.3),
             Conditional(value=0.7)]
    assert resolve_setting(conds, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert resolve_setting(conds, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.3
    assert resolve_setting(conds, "model.norm.weight", 0.0) == 0.7
    assert resolve_setting([Conditional(filter="mlp", value=1.0)], "model.norm.weight", 0) is None
    assert layer_position("model.layers.3.mlp.up_proj.weight", 7) == 0.5
    assert layer_position("model.embed_tokens.weight", 7) == 0.0


def test_fused_ties_of_two_bf16_models_is_the_torch_path_bit_for_bit():
    """The C passes of mergekit's TIES combine (two bf16 models, sign elected on the weighted values) and of the
    weighted sum against the torch ops they replace, on values made to break them: exponents over 60 octaves, +0
    and -0, exact opposites, infinities, zero and negative weights, both disjoint rules and none, a λ."""
    from compress.merge.methods import combine

    g = torch.Generator().manual_seed(0)
    n = 1 << 16
    for trial in range(3):
        d = torch.randn(2, n, generator=g) * torch.exp2(torch.randint(-30, 30, (2, n), generator=g).float())
        d[:, ::7] = 0.0
        d[0, ::11] = -0.0
        d[1, 5::13] = -d[0, 5::13]
        if trial == 2:
            d[0, 3::101], d[1, 4::103] = float("inf"), float("-inf")
        d = d.to(torch.bfloat16)
        for w in ([1.0, 0.8], [0.3, -0.7], [0.0, 1.0], [1e-3, 3.0]):
            for disjoint in ("weighted_mean", "sum", None):  # None: task arithmetic's weighted sum
                kw = dict(consensus="mass" if disjoint else None, sign_on="weighted", disjoint=disjoint or "mean",
                          lam=1.3)
                fused, ref = combine(d.clone(), w, **kw), combine(d.clone(), w, native=False, **kw)
                finite = ref.isfinite() | ref.isinf()
                assert torch.equal(fused.isnan(), ref.isnan()), (w, disjoint)
                assert torch.equal(fused[finite].view(torch.int16), ref[finite].view(torch.int16)), (w, disjoint)
    # and it is the fused pass that ran: a three-model stack or float32 takes the torch ops only
    from compress.merge.methods import _ties2_native

    assert _ties2_native(d, torch.ones(2, 1, dtype=torch.bfloat16), "sum") is not None or shutil.which("cc") is None
    assert _ties2_native(d.float(), torch.ones(2, 1), "sum") is None
