"""The GP surrogate of the evaluation (UniCuCo, Ye & Tang 2025): strategy → log KL to the dense model.

A botorch ``SingleTaskGP`` (botorch's default kernel: RBF with one lengthscale per block and a
dimension-scaled log-normal lengthscale prior) on the per-block sparsity vector, inputs
normalized to the unit cube over the box every feasible strategy lies in, outputs standardized. The target is
log KL: KL grows fifteenfold between 30% and 70% sparsity on lm-zoo (0.07 to 1.1 nats), its logarithm stays on
one scale over the range. The mean function is linear (``gpytorch.means.LinearMean``) instead of botorch's constant:
far from the data the posterior mean falls back to that trend, not to the average of all evaluations, so
StratNet is not drawn to strategies at high sparsity that merely lie away from the design points.

``mean`` and ``std`` are the posterior's mean and deviation in closed form from the Cholesky factor kept at fit
time (equal to botorch's ``posterior``); ``std(trend=True)`` and ``pessimistic`` (StratNet's κ) add the linear
trend's estimation variance.

The design is space-filling over the feasible set: a scrambled Sobol sequence in [0, 1]^(n+1), the first
coordinate the mean sparsity over the range, the others raw values σ⁻¹(u) mapped by the exact projection
(``project.project``), plus a few uniform strategies evenly spaced over the range (anchors: the baseline every
request is compared with). Active rounds add StratNet's own proposals (``add``), then ``fit`` again.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from compress.strategy.project import project


def design(n: int, block_params: Sequence[int], sparsity_range: tuple[float, float], *, spread: float,
           max_block: float, anchors: int = 0, seed: int = 0) -> torch.Tensor:
    """[n, blocks] feasible strategies: ``anchors`` uniform ones, then Sobol points (see the module docstring)."""
    lo, hi = sparsity_range
    d = len(block_params)
    out = []
    if anchors:
        for t in torch.linspace(lo, hi, anchors, dtype=torch.float64):
            out.append(torch.full((d,), float(t), dtype=torch.float64))
    k = n - len(out)
    if k > 0:
        u = torch.quasirandom.SobolEngine(d + 1, scramble=True, seed=seed).draw(k).to(torch.float64)
        t = lo + (hi - lo) * u[:, 0]
        z = torch.logit(u[:, 1:].clamp(0.02, 0.98))
        out.extend(project(z, t, block_params, spread=spread, max_block=max_block))
    return torch.stack(out)


def _rbf_parameters(covar) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output scale, lengthscales) when the kernel is an RBF, bare (botorch >= 0.12) or scaled; else None."""
    from gpytorch.kernels import RBFKernel, ScaleKernel

    scale = torch.ones((), dtype=torch.float64)
    if isinstance(covar, ScaleKernel):
        scale, covar = covar.outputscale.detach().to(torch.float64), covar.base_kernel
    if type(covar) is not RBFKernel or covar.active_dims is not None:
        return None
    return scale, covar.lengthscale.detach().to(torch.float64).reshape(1, -1)


class Surrogate:
    """(strategy, KL) pairs and the GP fitted to (strategy, log KL)."""

    def __init__(self, n_blocks: int, bounds: tuple[float, float]):
        self.n_blocks = n_blocks
        self.bounds = torch.tensor([[bounds[0]] * n_blocks, [bounds[1]] * n_blocks], dtype=torch.float64)
        self.X: list[torch.Tensor] = []
        self.kl: list[float] = []
        self.gp = None
        self.fit_seconds = 0.0
        self.fits = 0
        self._rbf = None

    def add(self, strategy: Sequence[float] | torch.Tensor, kl: float) -> None:
        self.X.append(torch.as_tensor(strategy, dtype=torch.float64).reshape(-1))
        self.kl.append(float(kl))

    def __len__(self) -> int:
        return len(self.X)

    def fit(self, hyperparameters: bool = True) -> "Surrogate":
        """Fit the GP to all pairs so far. ``hyperparameters=False`` keeps the kernel, mean and noise
        hyperparameters of the last fit (the active rounds: new data, no new marginal-likelihood optimization,
        a Cholesky instead of an L-BFGS run)."""
        import time

        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from gpytorch.means import LinearMean
        from gpytorch.mlls import ExactMarginalLogLikelihood

        t0 = time.perf_counter()
        X = torch.stack(self.X)
        Y = torch.tensor([math.log(max(v, 1e-12)) for v in self.kl], dtype=torch.float64).unsqueeze(-1)
        gp = SingleTaskGP(X, Y, mean_module=LinearMean(self.n_blocks),
                          input_transform=Normalize(self.n_blocks, bounds=self.bounds),
                          outcome_transform=Standardize(1))
        if hyperparameters or self.gp is None:
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
            self.fits += 1
        else:
            gp.load_state_dict({k: v for k, v in self.gp.state_dict().items()
                                if not k.startswith(("outcome_transform", "input_transform"))}, strict=False)
        gp.eval()
        for p in gp.parameters():
            p.requires_grad_(False)
        self.gp = gp
        # the posterior in closed form on the normalized, standardized data: mean m(x) + k(x, X)·α with
        # α = (K + σ²I)⁻¹(y − m(X)), variance k(x, x) − ‖L⁻¹k(X, x)‖² with L the Cholesky factor of K + σ²I: what
        # gp.posterior(x) computes, without its per-call machinery (StratNet calls it thousands of times; tested
        # equal)
        with torch.no_grad():
            xn = self._normalize(X)
            yt = gp.outcome_transform(Y)[0].squeeze(-1)
            K = gp.covar_module(xn, xn).to_dense() + gp.likelihood.noise * torch.eye(len(xn), dtype=torch.float64)
            self._L = torch.linalg.cholesky(K)
            self._alpha = torch.cholesky_solve((yt - gp.mean_module(xn)).unsqueeze(-1), self._L)
            # the linear trend's estimation variance (see ``std``): W = L⁻¹Hᵀ, A = H K⁻¹ Hᵀ = WᵀW with the trend's
            # basis h(x) = [1, x]; a relative ridge keeps A invertible with fewer points than blocks + 1
            self._W = torch.linalg.solve_triangular(self._L, self._basis(xn), upper=False)
            A = self._W.T @ self._W
            A = A + 1e-9 * A.diagonal().mean() * torch.eye(len(A), dtype=torch.float64)
            self._C = torch.linalg.cholesky(A)
            self._xn = xn
            self._rbf = _rbf_parameters(gp.covar_module)
            self._y_mean = gp.outcome_transform.means.squeeze()
            self._y_std = gp.outcome_transform.stdvs.squeeze()
        self.fit_seconds += time.perf_counter() - t0
        return self

    def _normalize(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.bounds[0]) / (self.bounds[1] - self.bounds[0])

    def _cross(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized X [B, n], k(X, data) [B, N])."""
        if self.gp is None:
            raise RuntimeError("Surrogate.fit() first")
        xn = self._normalize(X.reshape(-1, self.n_blocks).to(torch.float64))
        if self._rbf is not None:  # gpytorch's lazy-kernel machinery costs more than the arithmetic here
            scale, ls = self._rbf
            # not torch.cdist: its gradient is NaN at distance 0
            return xn, scale * torch.exp(-0.5 * ((xn / ls).unsqueeze(-2) - (self._xn / ls)).square().sum(-1))
        return xn, self.gp.covar_module(xn, self._xn).to_dense()

    @staticmethod
    def _basis(xn: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones_like(xn[:, :1]), xn], -1)

    def _mean_of(self, xn: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (self.gp.mean_module(xn) + (k @ self._alpha).squeeze(-1)) * self._y_std + self._y_mean

    def _std_of(self, xn: torch.Tensor, k: torch.Tensor, trend: bool = False) -> torch.Tensor:
        prior = self._rbf[0].expand(len(xn)) if self._rbf is not None else self.gp.covar_module(xn, xn, diag=True)
        v = torch.linalg.solve_triangular(self._L, k.transpose(0, 1), upper=False)
        var = prior - v.square().sum(0)
        if trend:
            r = self._basis(xn).T - self._W.T @ v
            var = var + torch.linalg.solve_triangular(self._C, r, upper=False).square().sum(0)
        # clamped: round-off can make the variance slightly negative at a data point, and sqrt's gradient at 0 is
        # infinite
        return var.clamp_min(1e-12).sqrt() * self._y_std

    def mean(self, X: torch.Tensor) -> torch.Tensor:
        """Posterior mean of log KL at strategies [..., n_blocks]; differentiable in X."""
        xn, k = self._cross(X)
        return self._mean_of(xn, k).reshape(X.shape[:-1])

    def std(self, X: torch.Tensor, trend: bool = False) -> torch.Tensor:
        """Posterior standard deviation of log KL (of the latent function, no observation noise; the units of
        ``mean``) at strategies [..., n_blocks]; differentiable in X. ``trend=False``: botorch's, the linear mean's
        weights taken as known. ``trend=True`` adds their estimation variance (Rasmussen & Williams 2006, §2.7,
        a vague prior on the weights of explicit basis functions): rᵀ(H K⁻¹ Hᵀ)⁻¹r with r = h(x) − H K⁻¹ k(X, x).
        The weights are fitted to the data by maximum likelihood, which for a fixed kernel is the same generalized
        least-squares estimate that formula assumes. With few points per block the residual GP is small (the
        trend explains the data) and botorch's deviation stays small everywhere, while the trend's slopes, one per
        block, are barely determined: only this term grows away from the data along the directions the slopes
        extrapolate."""
        xn, k = self._cross(X)
        return self._std_of(xn, k, trend).reshape(X.shape[:-1])

    def pessimistic(self, X: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
        """μ(X) + κ·σ(X) with σ = ``std(X, trend=True)``: an upper confidence bound on log KL (GP-LCB's bound,
        Srinivas et al. 2010, used for pessimism as in offline model-based optimization): where the GP has no data
        σ is large, so a strategy there must earn its predicted gain. ``kappa=0`` is ``mean`` itself (σ not
        computed)."""
        xn, k = self._cross(X)
        out = self._mean_of(xn, k)
        if kappa:
            out = out + kappa * self._std_of(xn, k, trend=True)
        return out.reshape(X.shape[:-1])

    def posterior_mean(self, X: torch.Tensor) -> torch.Tensor:
        """The same through botorch's ``posterior`` (slower; the reference ``mean`` is tested against)."""
        shape = X.shape[:-1]
        return self.gp.posterior(X.reshape(-1, self.n_blocks).to(torch.float64)).mean.reshape(shape)

    def posterior_std(self, X: torch.Tensor) -> torch.Tensor:
        """The same as ``std`` through botorch's ``posterior`` (the reference ``std`` is tested against)."""
        shape = X.shape[:-1]
        return self.gp.posterior(X.reshape(-1, self.n_blocks).to(torch.float64)).variance.sqrt().reshape(shape)
