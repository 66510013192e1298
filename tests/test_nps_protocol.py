"""The NPS merge protocol (compress.search.protocol): dev halves, the TIES start and anchor, the regularizer, the
budget chosen on validation, and the fallback to TIES; on constructed objectives whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from compress.config import NpsSearch as Space
from compress.errors import CompressError
from compress.search.nps import ModelSetter, NpsProblem, make_layout, search
from compress.search.protocol import anchor_penalty, merge_protocol, split_halves, tune_ties


def test_split_halves_are_disjoint_deterministic_and_seeded():
    s, v = split_halves(101, seed=0, key="trec")
    assert len(s) == 50 and len(v) == 51
    assert set(s.tolist()).isdisjoint(v.tolist()) and sorted(s.tolist() + v.tolist()) == list(range(101))
    again = split_halves(101, seed=0, key="trec")
    assert torch.equal(s, again[0]) and torch.equal(v, again[1])
    assert not torch.equal(s, split_halves(101, seed=1, key="trec")[0])  # another seed, another split
    assert not torch.equal(s, split_halves(101, seed=0, key="subj")[0])  # tasks split independently
    assert [len(h) for h in split_halves(2, 5)] == [1, 1]
    with pytest.raises(CompressError, match="1 dev row"):
        split_halves(1, 0, "x")
    with pytest.raises(CompressError, match=r"fraction must be in \(0, 1\)"):
        split_halves(10, 0, "x", fraction=1.0)


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(12, 10))
        self.b = torch.nn.Parameter(torch.zeros(30))


def _flat(m) -> torch.Tensor:
    return torch.cat([m.a.detach().reshape(-1), m.b.detach().reshape(-1)])


def _setup(density=0.3, **space):
    g = torch.Generator().manual_seed(0)
    layout = make_layout(["a", "b"], [(12, 10), (30,)], [torch.float32] * 2)
    taus = [torch.randn(layout.numel, generator=g) for _ in range(3)]
    problem = NpsProblem(layout, taus, density, Space(parts=2, combine="ties", task_weights="per_task", **space))
    setter = ModelSetter(_Two(), layout, torch.zeros(layout.numel))
    return problem, setter


def _near(target: torch.Tensor, scale: float):
    """An 'accuracy' in (0, 1] that is 1 at ``target`` and falls with the squared distance from it."""
    def objective(m):
        acc = math.exp(-float((_flat(m) - target).pow(2).sum()) / scale)
        return -acc, {"acc": acc}

    return objective


def _protocol(problem, setter, *objectives, **kw):
    return merge_protocol(problem, setter, *objectives, run_search=search, **kw)


def _ties(problem, lam):
    return problem.delta(problem.point([lam] * problem.K))


def _away(problem):
    """A point of the space away from TIES (other λ per task vector, other part weights), and a distance scale
    at which TIES at λ = 1 scores about e⁻¹."""
    x = problem.point([1.4, 0.6, 1.0], torch.tensor([[[1.5, 0.7]], [[0.8, 1.2]], [[1.0, 2.0]]]))
    away = problem.delta(x)
    return away, float((away - _ties(problem, 1.0)).pow(2).sum())


def test_the_start_is_ties_as_the_merge_functions_compute_it():
    from compress.merge.methods import method_preset, task_vector_merge

    problem, _ = _setup(topk="per_tensor")
    for _, name, sl, shape in problem.layout.slices():
        stack = torch.stack([t[sl].reshape(shape) for t in problem.taus])
        want = task_vector_merge(stack, [1.0] * 3, method_preset("ties", "peft"), density=0.3, lam=0.7)
        assert torch.allclose(_ties(problem, 0.7)[sl].reshape(shape), want, atol=1e-6, rtol=1e-5), name
    # one λ for all: TIES at λ is λ times TIES at 1 (what tune_ties relies on)
    assert torch.allclose(_ties(problem, 0.7), 0.7 * _ties(problem, 1.0), atol=1e-6, rtol=1e-6)
    # the same point in every candidate's space (grouping, M): one TIES tuning serves them all
    other = NpsProblem(problem.layout, problem.taus, 0.3, Space(parts=4, grouping="module", combine="ties",
                                                                task_weights="per_task", topk="per_tensor"))
    assert torch.equal(_ties(other, 0.7), _ties(problem, 0.7))


def test_fallback_returns_ties_when_the_search_does_not_beat_it_on_validation():
    """The search half rewards moving away from TIES, the validation half wants TIES itself: the search improves
    its own objective, loses on validation, and the answer is TIES at the λ the whole dev split prefers."""
    problem, setter = _setup()
    away, scale = _away(problem)
    search_obj = _near(away, scale)
    val_obj = _near(_ties(problem, 1.0), scale)
    dev_obj = _near(_ties(problem, 0.7), 50.0)
    r = _protocol(problem, setter, search_obj, val_obj, dev_obj, strength=0.0, budget=60, seed=0)
    assert r.search.value < r.search.start_value  # the search did fit its half
    assert r.validation["nps"] <= r.validation["ties"]
    assert r.chosen == "ties" and r.ties_lambda_dev == 0.7
    assert torch.equal(r.delta, _ties(problem, 0.7)) and torch.equal(_flat(setter.module), r.delta)


def test_the_search_is_kept_where_it_beats_ties_on_validation():
    problem, setter = _setup()
    away, scale = _away(problem)
    obj = _near(away, scale)
    r = _protocol(problem, setter, obj, obj, _near(_ties(problem, 0.7), 50.0), strength=0.0, budget=60,
                       checkpoints=(10, 30), seed=0)
    assert r.chosen == "nps" and r.validation["nps"] > r.validation["ties"]
    # the budget is chosen on validation: the best of the checkpoints (here the full run, as validation = search)
    assert set(r.validation["by_budget"]) == {"10", "30", "60"} and r.budget == 60
    assert r.validation["by_budget"]["10"] <= r.validation["by_budget"]["60"]
    assert torch.equal(r.delta, problem.delta(r.search.best_at[60]))


def test_the_regularizer_pulls_toward_ties():
    problem, setter = _setup()
    away, scale = _away(problem)
    obj = _near(away, scale)
    lam_s, _ = tune_ties(problem, setter, obj)
    anchor = _ties(problem, lam_s)
    dist = {}
    for strength in (0.0, 1e6):
        r = _protocol(problem, setter, obj, obj, obj, strength=strength, budget=40, seed=0)
        dist[strength] = float((problem.delta(r.search.x) - anchor).norm() / anchor.norm())
    assert dist[0.0] > 0.05 and dist[1e6] == 0.0  # a large strength never leaves TIES
    pen = anchor_penalty(anchor, 2.0)
    assert pen(anchor) == 0.0 and pen(2 * anchor) == pytest.approx(2.0)
    assert anchor_penalty(anchor, 0.0) is None
    with pytest.raises(CompressError, match="strength must be a finite number >= 0"):
        anchor_penalty(anchor, -1.0)


def test_the_protocol_needs_a_space_that_holds_ties():
    g = torch.Generator().manual_seed(0)
    layout = make_layout(["a", "b"], [(12, 10), (30,)], [torch.float32] * 2)
    taus = [torch.randn(layout.numel, generator=g) for _ in range(2)]
    problem = NpsProblem(layout, taus, 0.3, Space(parts=2, combine="sum"))
    setter = ModelSetter(_Two(), layout, torch.zeros(layout.numel))
    obj = _near(taus[0], 10.0)
    with pytest.raises(CompressError, match="its space needs combine: ties"):
        _protocol(problem, setter, obj, obj, obj, strength=0.0, budget=10)


def test_search_keeps_the_deltas_of_its_best_points_and_no_more():
    problem, setter = _setup()
    away, scale = _away(problem)
    calls = {"n": 0}
    kept = problem.kept

    def counted(k, w):
        calls["n"] += 1
        return kept(k, w)

    problem.kept = counted
    res = search(problem, setter, _near(away, scale), optimizer="cma", budget=12, seed=0, checkpoints=(4, 8))
    n = calls["n"]
    # the answer and the checkpoints' bests come back without a top-k pass, and equal a fresh computation
    for x in (res.x, *res.best_at.values()):
        d = problem.delta(x)
        assert problem.delta(x) is d
        fresh = NpsProblem(problem.layout, problem.taus, problem.density, problem.space)
        torch.testing.assert_close(d, fresh.delta(x), rtol=0, atol=0)
    assert calls["n"] == n
    assert len(problem._kept) <= 3  # the best and the two checkpoints' bests, however long the search
    # a new search starts clean: without checkpoints it holds its best point's delta alone
    search(problem, setter, _near(away, scale), optimizer="cma", budget=9, seed=1)
    assert len(problem._kept) == 1
