"""StratNet's pessimism term (issue 19): the GP's closed-form posterior deviation against botorch's, the linear
trend's estimation variance against the vague-prior limit it stands for, κ = 0 reproducing the mean-only training
exactly, κ > 0 keeping a strategy near the data where the mean alone runs to an unsupported corner, and κ < 0 as
one line of bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from test_strategy_core import BP, Quadratic

from compress.strategy.project import project
from compress.strategy.surrogate import Surrogate


def _near_uniform_surrogate(seed: int = 0) -> Surrogate:
    """Evaluations only near uniform strategies (each block within ~0.01 of the mean): log KL rises with the mean
    sparsity and, locally, falls as blocks 0 and 2 take more than blocks 1 and 3. The linear trend extrapolates
    that gain to the band's corner (0.2 away, twenty times the data's spread), where the truth (a quadratic
    penalty the data barely sees) is far worse."""
    g = torch.Generator().manual_seed(seed)
    sur = Surrogate(4, (0.1, 0.9))
    for t in torch.linspace(0.3, 0.7, 6, dtype=torch.float64):
        for _ in range(2):
            s = project(0.05 * torch.randn(4, generator=g, dtype=torch.float64), t, BP, spread=0.2, max_block=0.95)
            d = s - t
            sur.add(s, float(torch.exp(-4 + 4 * t - 3 * (d[0] - d[1] + d[2] - d[3]) + 20 * d.square().sum())))
    return sur.fit()


def test_posterior_std_is_botorchs_and_the_trend_term_is_the_vague_prior_limit():
    sur = _near_uniform_surrogate()
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(40, 4, generator=g, dtype=torch.float64)
    x = torch.cat([x, torch.stack(sur.X[:3])])  # at data points too, where the variance is ~ noise
    assert torch.allclose(sur.std(x), sur.posterior_std(x), rtol=1e-6, atol=1e-9)
    rbf = sur._rbf
    sur._rbf = None  # the generic kernel path (any gpytorch kernel) gives the same
    try:
        assert torch.allclose(sur.std(x), sur.posterior_std(x), rtol=1e-6, atol=1e-9)
        generic = sur.std(x, trend=True)
    finally:
        sur._rbf = rbf
    # trend=True: the posterior deviation of a GP whose linear mean's weights have a N(0, c·I) prior, c → ∞
    # (Rasmussen & Williams §2.7), computed here directly from the augmented kernel k + c·h(x)ᵀh(x')
    c = 1e5
    with torch.no_grad():
        gp = sur.gp
        xn, xd = sur._normalize(x), sur._xn

        def h(z):
            return torch.cat([torch.ones_like(z[:, :1]), z], -1)

        def kern(a, b):
            return gp.covar_module(a, b).to_dense() + c * h(a) @ h(b).T

        K = kern(xd, xd) + gp.likelihood.noise * torch.eye(len(xd), dtype=torch.float64)
        ks = kern(xn, xd)
        var = kern(xn, xn).diagonal() - (ks * torch.linalg.solve(K, ks.T).T).sum(-1)
        want = var.clamp_min(0).sqrt() * sur._y_std
    got = sur.std(x, trend=True)
    assert torch.allclose(got, want, rtol=2e-3, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(got, generic, rtol=1e-9)
    assert bool((got >= sur.std(x) - 1e-12).all())
    # differentiable, finite at a data point too
    xg = x.clone().requires_grad_()
    sur.pessimistic(xg, 2.0).sum().backward()
    assert bool(xg.grad.isfinite().all()) and float(xg.grad.abs().sum()) > 0


def test_kappa_zero_reproduces_the_mean_only_training(monkeypatch):
    """κ = 0 trains exactly as the mean-only StratNet did (before the pessimism term, it called ``surrogate.mean``):
    the same run with ``pessimistic`` replaced by the mean gives the same strategies bit for bit. The values
    recorded from that older code on an AVX2 machine must also hold, to 1e-3: the GP's hyperparameter fit moves
    them by about 2e-4 on an AVX-512 one."""
    from compress.strategy.surrogate import Surrogate
    from compress.strategy.train import train_unicuco

    torch.set_num_threads(1)

    def run():
        model, _, report = train_unicuco(Quadratic(), sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95,
                                         budget=24, rounds=1, active_fraction=0.25, steps=40, hidden=16, lr=0.02,
                                         batch_requests=16, seed=3, kappa=0.0, quiet=True)
        assert report["kappa"] == 0.0
        with torch.no_grad():
            return (model.for_sparsity([0.35, 0.6]), *model.for_preference([0.2, 0.8]))

    sp, pref, t = run()
    calls = []

    def mean_only(self, X, kappa=0.0):
        calls.append(kappa)
        return self.mean(X)

    monkeypatch.setattr(Surrogate, "pessimistic", mean_only)
    sp0, pref0, t0 = run()
    assert calls and set(calls) == {0.0}
    assert torch.equal(sp, sp0) and torch.equal(pref, pref0) and torch.equal(t, t0)
    before = torch.tensor([[0.5048955284838479, 0.2891884270201194, 0.3339174161962332, 0.2570725387839677],
                           [0.7650368695848415, 0.528875988682596, 0.5752432990379149, 0.5063817011217625]],
                          dtype=torch.float64)
    before_pref = torch.tensor([[0.8471270791909812, 0.6270378446077323, 0.6568110908301978, 0.600071518586827],
                                [0.8524495375177341, 0.6251042275359038, 0.6681162784237429, 0.5993552830339244]],
                               dtype=torch.float64)
    assert torch.allclose(sp, before, rtol=0, atol=1e-3)
    assert torch.allclose(pref, before_pref, rtol=0, atol=1e-3)
    assert torch.allclose(t, torch.tensor([0.688232733818838, 0.6916106529072289], dtype=torch.float64), atol=1e-3)


def test_kappa_keeps_stratnet_near_the_data_where_the_mean_runs_to_a_corner():
    from compress.strategy.stratnet import StratNet, StratNetModel, train_through

    torch.set_num_threads(1)
    sur = _near_uniform_surrogate()
    X = torch.stack(sur.X)
    ts = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64)
    out = {}
    for kappa in (0.0, 16.0):
        torch.manual_seed(0)
        m = StratNetModel(StratNet(4, 16), block_params=BP, sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95)
        losses = train_through(m, sur, steps=150, lr=0.02, batch=16, seed=0, kappa=kappa)
        assert losses[-1] < losses[0]
        with torch.no_grad():
            s = m.for_sparsity(ts)
        out[kappa] = (torch.cdist(s, X).min(-1).values, s)
    d0, s0 = out[0.0]
    d8, s8 = out[16.0]
    # the mean alone: to the corner the trend rewards (blocks 0, 2 up, 1, 3 down), far from every evaluation
    assert bool((s0[:, 0] > ts + 0.1).all()) and bool((d0 > 0.25).all()), (s0, d0)
    # pessimism: within a small multiple of the data's own spread, and the true KL there is lower
    assert bool((d8 < d0 / 3).all()), (d8, d0)
    d = s0 - ts[:, None], s8 - ts[:, None]
    true = [-3 * (e @ torch.tensor([1.0, -1, 1, -1], dtype=torch.float64)) + 20 * e.square().sum(-1) for e in d]
    assert bool((true[1] < true[0]).all()), true


@pytest.mark.parametrize("args", [["strategy", "train", "{m}", "--out", "{o}", "--kappa", "-0.5"],
                                  ["bench", "unicuco", "{m}", "--results", "{o}", "--kappa", "-1"]])
def test_negative_kappa_is_one_line_exit_2(tmp_path, args):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    out = tmp_path / "out"
    code, _, err = run_cli(*[a.format(m=tmp_path / "m", o=out) for a in args])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "kappa" in lines[0], err
    assert not out.exists()
