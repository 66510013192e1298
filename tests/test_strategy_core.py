"""UniCuCo's pure parts: the exact budget projection, the GP surrogate's closed-form mean, StratNet trained
through the GP on a constructed objective with a known optimum, the StratNet file, and the request schema."""

from __future__ import annotations

import math

import pytest
import torch

from compress.config import CompressionRequest, build
from compress.errors import CompressError
from compress.strategy.project import SizeModel, project, sparsity_for_size, weighted_mean

BP = [3000, 1000, 2000, 4000]


def test_projection_is_exact_within_bounds_and_uniform_at_zero():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 4, generator=g, dtype=torch.float64) * 5
    t = 0.05 + 0.85 * torch.rand(200, generator=g, dtype=torch.float64)
    s = project(z, t, BP, spread=0.2, max_block=0.95)
    assert (weighted_mean(s, BP) - t).abs().max() < 1e-6
    # the hand-computed mean, not the module's helper
    mean = (s * torch.tensor(BP, dtype=torch.float64)).sum(-1) / sum(BP)
    assert torch.allclose(mean, t, atol=1e-9, rtol=0)
    lo, hi = (t - 0.2).clamp_min(0), (t + 0.2).clamp_max(0.95)
    assert bool((s >= lo[:, None] - 1e-12).all()) and bool((s <= hi[:, None] + 1e-12).all())
    u = project(torch.zeros(3, 4, dtype=torch.float64), torch.tensor([0.3, 0.5, 0.7]), BP)
    assert torch.allclose(u, torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)[:, None].expand(3, 4), atol=1e-9)


def test_projection_gradient_is_the_implicit_one():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.1]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.55], dtype=torch.float64, requires_grad=True)
    # gradcheck compares autograd against finite differences of the whole projection (bisection included)
    assert torch.autograd.gradcheck(lambda z, t: project(z, t, BP, spread=0.3), (z, t), eps=1e-6, atol=1e-5)
    # the mean stays the target whatever z does: its gradient in z is zero, in t one
    m = weighted_mean(project(z, t, BP), BP).sum()
    gz, gt = torch.autograd.grad(m, (z, t))
    assert gz.abs().max() < 1e-9 and abs(float(gt) - 1) < 1e-9


def test_projection_rejects_unreachable_targets():
    with pytest.raises(CompressError, match="outside"):
        project(torch.zeros(4), 0.97, BP, max_block=0.95)


def test_size_budget_inverts_the_size_model():
    m = SizeModel(fixed_bytes=10_000, pruned_params=1_000_000, itemsize=2)
    assert m.sparsity(m.bytes(0.4)) == pytest.approx(0.4, abs=1e-6)
    assert sparsity_for_size(m.bytes(0.55), m, 0.3, 0.7) == pytest.approx(0.55, abs=1e-6)
    with pytest.raises(CompressError, match=r"outside the range \[0.3, 0.7\].*reachable sizes"):
        sparsity_for_size(m.bytes(0.1), m, 0.3, 0.7)


class Quadratic:
    """A constructed 'true evaluation' with a known optimum: at mean sparsity t the best strategy is t + D (the
    offsets D have parameter-weighted mean 0, so t + D meets the budget); KL = 0.01·exp(4t + 40·Σ c_i (s_i − t −
    D_i)²)."""

    D = torch.tensor([0.08, -0.12, 0.06, -0.06], dtype=torch.float64)
    C = torch.tensor([1.0, 2.0, 1.5, 1.0], dtype=torch.float64)

    def __init__(self):
        w = torch.tensor(BP, dtype=torch.float64)
        assert abs(float((self.D * w).sum())) < 1e-9
        self.history = []

        class _P:
            block_params = BP
        self.pruner = _P()

    def optimum(self, t):
        return torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) + self.D

    def evaluate(self, s, phase=""):
        s = torch.tensor(s, dtype=torch.float64)
        t = float(weighted_mean(s, BP))
        kl = 0.01 * math.exp(4 * t + 40 * float((self.C * (s - t - self.D) ** 2).sum()))
        self.history.append(kl)
        return {"kl": kl}

    @property
    def evaluations(self):
        return len(self.history)


def test_gp_gradient_training_moves_stratnet_to_the_known_optimum():
    from compress.strategy.train import train_unicuco

    q = Quadratic()
    model, surrogate, report = train_unicuco(q, sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95, budget=48,
                                             rounds=1, active_fraction=0.25, steps=300, hidden=32, lr=0.02,
                                             batch_requests=32, seed=0, quiet=True)
    assert report["evaluations"] == 48 == q.evaluations
    ts = torch.linspace(0.32, 0.68, 9, dtype=torch.float64)
    with torch.no_grad():
        served = model.for_sparsity(ts)
    start = project(torch.zeros(9, 4), ts, BP)  # an untrained StratNet answers the uniform strategy
    d0 = (start - q.optimum(ts)).norm(dim=-1).mean()
    d1 = (served - q.optimum(ts)).norm(dim=-1).mean()
    assert d1 < d0 / 4, (float(d0), float(d1))
    assert (weighted_mean(served, BP) - ts).abs().max() < 1e-6
    # the closed-form posterior mean StratNet trains through is botorch's
    x = served.detach()
    assert torch.allclose(surrogate.mean(x), surrogate.posterior_mean(x), atol=1e-8)


def test_stratnet_file_round_trip_and_wrong_model(tmp_path):
    from conftest import save_llama

    from compress.prune.calib import model_fingerprint
    from compress.strategy.stratnet import StratNet, StratNetModel

    a = save_llama(tmp_path / "model-a", seed=0)
    b = save_llama(tmp_path / "model-b", seed=1)
    torch.manual_seed(0)
    net = StratNet(4, 16)
    torch.nn.init.normal_(net.mlp[-1].weight)  # not the all-zero start, so the round trip is tested
    m = StratNetModel(net, block_params=BP, sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95,
                      meta={"model": str(a), "fingerprint": model_fingerprint(a)})
    m.save(tmp_path / "sn.pt")
    back = StratNetModel.load(tmp_path / "sn.pt", a)
    with torch.no_grad():
        assert torch.equal(back.for_sparsity([0.4, 0.6]), m.for_sparsity([0.4, 0.6]))
        assert not torch.allclose(m.for_sparsity([0.4]), torch.full((1, 4), 0.4, dtype=torch.float64))
    assert back.block_params == BP and back.sparsity_range == (0.3, 0.7)
    with pytest.raises(CompressError) as e:
        StratNetModel.load(tmp_path / "sn.pt", b)
    assert str(a) in str(e.value) and str(b) in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CompressError, match="not a StratNet file"):
        StratNetModel.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("kw, msg", [
    ({}, "no target"),
    ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\), got 1.0"),
    ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": -0.2}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 0.5, "preference": 0.3}, "exactly one target, got sparsity and preference"),
    ({"preference": 1.5}, r"preference must be in \[0, 1\]"),
    ({"size_bytes": 0}, "size_bytes must be a positive"),
    ({"sparsity": 0.5, "protect_heads": [[0, -1]]}, r"pair \[layer, head\]"),
    ({"sparsity": 0.5, "protect_heads": [[0, 1, 2]]}, r"pair \[layer, head\]"),
    ({"sparsity": 0.5, "id": "../x"}, "may hold only"),
    ({"sparsity": 0.5, "colour": "red"}, "colour"),
])
def test_request_errors(kw, msg):
    with pytest.raises(CompressError, match=msg) as e:
        build(CompressionRequest, **kw)
    assert "\n" not in str(e.value)


def test_request_fields_and_requests_file(tmp_path):
    from compress.strategy.request import read_requests

    r = build(CompressionRequest, sparsity=0.4, protect_heads=[[1, 2], [0, 3]], id="u1")
    assert r.target == "sparsity" and r.protect_heads == [(1, 2), (0, 3)]
    assert build(CompressionRequest, preference=0.0).target == "preference"
    p = tmp_path / "r.jsonl"
    p.write_text('{"sparsity": 0.4}\n\n{"size_bytes": 1000, "id": "small"}\n{"preference": 0.2}\n')
    reqs = read_requests(p)
    assert [x.id for x in reqs] == ["req-001", "small", "req-004"]
    p.write_text('{"sparsity": 0.4}\n{"sparsity": 0.4, "preference": 0.5}\n')
    with pytest.raises(CompressError, match=r"r.jsonl:2: give exactly one target"):
        read_requests(p)
    p.write_text('{"sparsity": 0.4}\n{"sparsity": 0.4,\n')
    with pytest.raises(CompressError, match=r"r.jsonl:2: not JSON"):
        read_requests(p)
    p.write_text('{"id": "a", "sparsity": 0.4}\n{"id": "a", "sparsity": 0.5}\n')
    with pytest.raises(CompressError, match=r"r.jsonl:2: id 'a' is already used on line 1"):
        read_requests(p)


def test_strategy_recipe_validates():
    from pathlib import Path

    from compress.config import StrategyTrainConfig
    from compress.io.files import read_mapping

    root = Path(__file__).resolve().parents[1] / "recipes" / "strategy"
    cfg = build(StrategyTrainConfig, **read_mapping(root / "lm-zoo.yml"))
    assert cfg.sparsity_range == (0.3, 0.7) and cfg.budget == 160 and cfg.method == "wanda"
    from compress.strategy.request import read_requests

    assert [r.target for r in read_requests(root / "requests.jsonl")] == ["sparsity"] * 3 + ["preference"] * 2
    with pytest.raises(CompressError, match="sparsity_range"):
        build(StrategyTrainConfig, model="m", sparsity_range=(0.7, 0.3))


def test_bayes_is_reproducible_in_its_seed():
    """``minimize("bayes", ...)``: one seed gives one run whatever the global RNG holds (botorch draws its
    acquisition restarts from it), and the caller's RNG is left as it was."""
    from compress.search.optimize import minimize

    def f(x):
        return (x[0] - 0.3) ** 2 + (x[1] + 0.5) ** 2

    runs = []
    for outer in (1, 2):
        torch.manual_seed(outer)
        res = minimize("bayes", f, [0.0, 0.0], [-1.0, -1.0], [1.0, 1.0], 7, seed=3)
        after = torch.rand(1)
        torch.manual_seed(outer)
        assert torch.equal(after, torch.rand(1))
        runs.append([r["x"] for r in res.history])
    assert runs[0] == runs[1] and len(runs[0]) == 7
    assert res.value < res.start_value
