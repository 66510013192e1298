"""NPS (compress.search): partitions, the optimizers on a constructed case, exact storage, protection, CLI errors."""

from __future__ import annotations

import math

import pytest
import torch

from compress.config import NpsSearch as Space
from compress.config import build
from compress.errors import CompressError
from compress.search import partition as P
from compress.search.nps import ModelSetter, NpsProblem, load_flat, make_layout, search
from compress.sparsify.protect import Protect
from tests.conftest import run_cli


def test_magnitude_bins_sum_back_exactly_and_order_by_magnitude():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(64, 48, generator=g) * torch.rand(64, 48, generator=g)
    for scheme, span in (("quantile", 1.0), ("quantile", 0.1), ("linear", 1.0), ("log", 0.5)):
        edges = P.bin_edges(tau, 5, scheme, span)
        labels = P.magnitude_bins(tau, edges)
        parts = P.bin_parts(tau, labels, 5)
        total = torch.zeros_like(tau)
        for q in parts:
            total += q
        assert torch.equal(total, tau)  # each entry lives in exactly one part
        # a larger magnitude never gets a later (smaller-magnitude) label
        a, lab = tau.abs().reshape(-1), labels.reshape(-1).long()
        order = torch.argsort(a, descending=True)
        assert bool((lab[order].diff() >= 0).all())
    # equal counts with quantile edges over the whole range
    labels = P.magnitude_bins(tau, P.bin_edges(tau, 4, "quantile", 1.0))
    assert torch.bincount(labels.reshape(-1).long()).tolist() == [768, 768, 768, 768]


def test_svd_bands_sum_back_and_are_rank_bands():
    tau = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    parts = P.svd_bands(tau, 3)
    assert torch.allclose(sum(parts), tau, atol=1e-6, rtol=0)
    ranks = [int(torch.linalg.matrix_rank(q.double(), atol=1e-5)) for q in parts]
    assert ranks == [4, 4, 4]
    # the first band is the best rank-4 approximation (Eckart–Young): its residual equals the tail energy
    s = torch.linalg.svdvals(tau.double())
    assert math.isclose(float((tau - parts[0]).double().norm() ** 2), float((s[4:] ** 2).sum()), rel_tol=1e-5)
    bias = torch.randn(7)
    assert torch.equal(sum(P.svd_bands(bias, 3)), bias)


def test_groups_by_layer_and_module():
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.output.dense.bias"]
    assert P.groups(names, "layer") == (["other", "layer.0", "layer.1"], [0, 1, 2, 2])
    gs, idx = P.groups(names, "module")
    assert idx[1] == idx[2] != idx[3] and gs[0] == "embeddings"


class _Tiny(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(shapes[0]))
        self.b = torch.nn.Parameter(torch.zeros(shapes[1]))


def _constructed(select="topk", density=0.1, **space):
    """A task vector of a dense small shift plus sparse spikes, judged by what it does to a few dense inputs
    (a layer's output): the plain top-k keeps the spikes and loses the shift's summed effect, which a larger weight
    on the kept bands wins back."""
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (50,)]
    layout = make_layout(["a", "b"], shapes, [torch.float32] * 2)
    n = layout.numel
    tau = 0.02 + torch.randn(n, generator=g) * 0.3 * (torch.rand(n, generator=g) < 0.05)
    inputs = 1.0 + 0.2 * torch.randn(3, n, generator=g)
    problem = NpsProblem(layout, [tau], density, Space(parts=4, select=select, **space))
    module = _Tiny(shapes)
    setter = ModelSetter(module, layout, torch.zeros(layout.numel))

    def objective(m):
        flat = torch.cat([m.a.detach().reshape(-1), m.b.detach().reshape(-1)])
        return float(((inputs @ (flat - tau)) ** 2).sum()), {}

    return problem, setter, objective, tau


@pytest.mark.parametrize("optimizer,budget", [("cma", 60), ("bayes", 14)])
def test_search_improves_over_the_unweighted_start(optimizer, budget):
    problem, setter, objective, tau = _constructed()
    setter(problem.delta(problem.point([1.0])))
    unweighted = objective(setter.module)[0]
    res = search(problem, setter, objective, optimizer=optimizer, budget=budget, seed=0)
    assert res.evaluations == budget and len(res.history) == budget
    assert res.start_value <= unweighted
    assert res.value < 0.97 * res.start_value, (res.start_value, res.value)
    # the model is left at the best point, which reproduces the logged value
    assert math.isclose(objective(setter.module)[0], res.value, rel_tol=1e-6)
    # kept entries never exceed the density
    _, mask = problem.kept(0, problem.decode(res.x)[1])
    assert int(mask.sum()) == round(0.1 * tau.numel())


def test_random_select_start_is_dare():
    from compress.sparsify.masks import random_mask, seeded_generator

    problem, _, _, tau = _constructed(select="random", density=0.2)
    kept, mask = problem.kept(0, problem.decode(problem.point([1.0]))[1])
    for _, name, sl, shape in problem.layout.slices():
        t = tau[sl].reshape(shape)
        dare = t * random_mask(t, 0.2, seeded_generator(0, name)) / 0.2
        assert torch.allclose(kept[sl].reshape(shape), dare, rtol=1e-6, atol=0)


@pytest.mark.parametrize("select", ["topk", "random"])
def test_protect_keeps_rows_dense(select):
    g = torch.Generator().manual_seed(3)
    layout = make_layout(["w", "v"], [(16, 8), (10,)], [torch.float32] * 2)
    tau = torch.randn(layout.numel, generator=g)
    protect = Protect(rows={"w": [(2, 5)]}, tensors=("^v$",))
    problem = NpsProblem(layout, [tau], 0.05, Space(parts=3, select=select), protect=protect)
    kept, mask = problem.kept(0, problem.decode(problem.point([1.0]))[1])
    w = mask[:128].reshape(16, 8)
    assert bool(w[2:5].all()) and bool(mask[128:].all())
    assert torch.equal(kept[:128].reshape(16, 8)[2:5], tau[:128].reshape(16, 8)[2:5])


def _bert_pair(root):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def test_stored_delta_reproduces_the_searched_model(tmp_path):
    from compress.delta import apply_delta
    from compress.io.deltafile import DeltaFile
    from compress.io.reader import open_checkpoint
    from compress.search.nps import write_model, write_nps_delta

    b, f = _bert_pair(tmp_path)
    base = open_checkpoint(b)
    layout, base_flat, taus = load_flat(base, [f], "cpu")
    for select in ("topk", "random"):
        problem = NpsProblem(layout, taus, 0.05, Space(parts=4, select=select))
        lo, hi = problem.bounds()
        x = [a + (c - a) * ((i * 0.37) % 1) for i, (a, c) in enumerate(zip(lo, hi))]  # an arbitrary point
        delta = problem.delta(x)
        _, mask = problem.kept(0, problem.decode(x)[1])
        write_model(tmp_path / f"model-{select}", base, layout, delta)
        write_nps_delta(tmp_path / f"d-{select}.safetensors", base, layout, delta, mask, metadata={"method": "nps"})
        apply_delta(base, DeltaFile(tmp_path / f"d-{select}.safetensors"), tmp_path / f"applied-{select}")
        searched = open_checkpoint(tmp_path / f"model-{select}")
        applied = open_checkpoint(tmp_path / f"applied-{select}")
        assert set(searched.names()) == set(applied.names())
        for name in searched.names():
            assert torch.equal(searched.get(name), applied.get(name)), name
        # and the searched tensors are base + delta
        for _, name, sl, shape in layout.slices():
            assert torch.equal(searched.get(name), (base_flat[sl] + delta[sl]).reshape(shape))


def test_problem_and_config_errors():
    layout = make_layout(["a"], [(4,)], [torch.float32])
    with pytest.raises(CompressError, match="density"):
        NpsProblem(layout, [torch.ones(4)], 0.0)
    with pytest.raises(CompressError, match="select: Input should be 'topk' or 'random'"):
        build(Space, select="best")
    from compress.config import NpsConfig

    with pytest.raises(CompressError, match="exactly one fine-tuned model"):
        build(NpsConfig, mode="prune", base="b", models=["x", "y"], tasks=["trec", "subj"])
    with pytest.raises(CompressError, match="one task per model"):
        build(NpsConfig, mode="merge", base="b", models=["x", "y"], tasks=["trec"])


def test_cli_bad_input(tmp_path):
    code, _, err = run_cli("prune", "--method", "nps", "--base", tmp_path, "--finetuned", tmp_path, "--task", "trec",
                           "--density", "1.5", "--out", tmp_path / "o")
    assert code == 2 and "density: must be in (0, 1]" in err
    (tmp_path / "ft").mkdir()  # an input folder may not hold the output
    code, _, err = run_cli("prune", "--method", "nps", "--base", tmp_path / "none", "--finetuned", tmp_path / "ft",
                           "--task", "trec", "--density", "0.1", "--out", tmp_path / "o")
    assert code == 2 and "none" in err
    code, _, err = run_cli("merge", "--method", "nps", "--base", tmp_path, "--models", tmp_path, tmp_path,
                           "--tasks", "trec", "--out", tmp_path / "o")
    assert code == 2 and "one task per model" in err
    code, _, err = run_cli("bench", "nps", "--densities", "a,b")
    assert code == 2 and "--densities" in err
    code, _, err = run_cli("interpolate", "--base", tmp_path, "--finetuned", tmp_path, "--alpha", "1",
                           "--method", "cubic")
    assert code == 2 and "cubic" in err


def test_prune_command_keeps_nps_and_whole_weight_options_apart(tmp_path):
    code, _, err = run_cli("prune", tmp_path, "--sparsity", "0.5", "--density", "0.1", "--out", tmp_path / "o")
    assert code == 2 and "--density belongs to --method nps" in err and not (tmp_path / "o").exists()
    code, _, err = run_cli("prune", tmp_path, "--method", "nps", "--base", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "not MODEL" in err



def test_a_recipe_saying_nps_sends_prune_merge_and_interpolate_to_nps(tmp_path):
    from compress.search.recipe import wants_nps

    nps, ties = tmp_path / "nps.yml", tmp_path / "ties.yml"
    nps.write_text("method: nps\n")
    ties.write_text("method: ties\n")
    assert wants_nps("nps", None) and wants_nps(None, nps) and not wants_nps(None, ties)
    assert not wants_nps("ties", nps, recipe_decides=False)  # merge: a --method given wins over the recipe's
    with pytest.raises(CompressError, match="missing.yml"):
        wants_nps(None, tmp_path / "missing.yml")
    for cmd in ("prune", "merge", "interpolate"):  # NpsConfig alone has `tasks`: the NPS side answered
        code, _, err = run_cli(cmd, nps, "--out", tmp_path / "o")
        assert code == 2 and err.count("\n") == 1 and "tasks: Field required" in err, (cmd, err)
    assert not (tmp_path / "o").exists()

def test_per_task_part_weights_act_on_their_own_vector_only():

    layout = make_layout(["a", "b"], [(4, 4), (8,)], [torch.float32] * 2)
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(24, generator=g) for _ in range(2)]
    problem = NpsProblem(layout, taus, 1.0, Space(parts=2, grouping="module", task_weights="per_task"))
    assert problem.dim == 2 + 2 * 2 * 2
    x = problem.point([1.0, 1.0])
    assert torch.allclose(problem.delta(x), taus[0] + taus[1])
    x[problem.K] = math.log(0.5)  # task 0, first group ('a'), first part
    _, w = problem.decode(x)
    assert w.shape == (2, 2, 2) and w[0, 0, 0] == pytest.approx(0.5) and w[1, 0, 0] == pytest.approx(1.0)
    changed = (problem.delta(x) - (taus[0] + taus[1])).abs() > 1e-7
    assert bool(changed[:16].any()) and not bool(changed[16:].any())  # only tensor 'a' of task 0 moved
    with pytest.raises(CompressError, match="per_task needs select topk"):
        build(Space, task_weights="per_task", select="random")


def test_ties_combine_matches_the_merge_functions():
    from compress.merge.methods import combine

    layout = make_layout(["a"], [(6, 5)], [torch.float32])
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(30, generator=g) for _ in range(3)]
    problem = NpsProblem(layout, taus, 0.5, Space(parts=2, combine="ties"))
    x = problem.point([0.5, 1.0, 2.0])
    kept = torch.stack([problem.kept(k, problem.decode(x)[1])[0] for k in range(3)])
    want = combine(kept, [0.5, 1.0, 2.0], consensus="mass", sign_on="weighted", disjoint="mean")
    got = problem.delta(x)
    assert torch.allclose(got, want)
    # by hand for one entry: the elected sign is that of the weighted sum; disagreeing values drop out
    i = int((kept[0].sign() != kept[2].sign()).logical_and(kept[0] != 0).logical_and(kept[2] != 0).nonzero()[0])
    vals = torch.tensor([0.5, 1.0, 2.0]) * kept[:, i]
    sign = 1.0 if vals.sum() >= 0 else -1.0
    agree = vals[(vals.sign() == sign)]
    assert float(got[i]) == pytest.approx(float(agree.mean()))
