"""StratNet (UniCuCo, Ye & Tang 2025): a small MLP from a compression request to a pruning strategy, trained
through the gradient of the GP surrogate's posterior mean (or, with κ > 0, a pessimistic bound on it).

*Features* of a request (after a size budget is turned into its sparsity, ``project.sparsity_for_size``):
[is-sparsity, is-preference, 2·(t − lo)/(hi − lo) − 1, 2λ − 1], zeros where not applicable.

*Output*: n + 1 raw values. The first n are z of the exact projection (``project.project``); for a sparsity
request the mean is the request's t, for a preference request it is lo + (hi − lo)·σ(out_{n}). The last layer
starts at zero, so an untrained StratNet answers the uniform strategy (and the middle of the range for a
preference).

*Objective*, minimized with Adam through f(s) = μ(s) + κ·σ(s), the GP posterior mean and standard deviation of
log KL, over a fresh batch of requests per step (t uniform over the range, λ uniform in [0, 1]):

* sparsity request: f(s) (the mean is fixed, so this is the best allocation for t);
* preference λ: the Tchebycheff scalarization max(λ·size(s), (1 − λ)·loss(s)) with the ideal point at 0,
  size = (hi − mean)/(hi − lo) and loss = (f(s) − f(uniform lo))/(f(uniform hi) − f(uniform lo)).

κ = 0 is the paper's objective (UniCuCo trains through the mean only). κ > 0 departs from it on purpose: with few
evaluations per block (48 or 160 points in 32 dimensions) the mean's linear trend extrapolates optimistically
and gradient descent runs to corners of the box where there is no data (seen: a 7B-class Llama answered
bang-bang between the band's edges, KL 1.39 against 1.00 uniform). Minimizing the upper confidence bound is the
pessimism principle of offline model-based optimization (GP-LCB's bound, Srinivas et al. 2010, turned around):
a strategy far from the evaluated ones must be predicted better by more than κ posterior deviations.

The file (``save``/``load``) holds the weights, the architecture, the fingerprint of the model it was trained for
(``compress.prune.calib.model_fingerprint``), block_params, the sparsity range and band, the pruning method and
calibration, and a format version; loading it for another model is a one-line error naming both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compress.errors import CompressError
from compress.strategy.project import project

VERSION = 1
N_FEATURES = 4


class StratNet(nn.Module):
    def __init__(self, n_blocks: int, hidden: int = 64):
        super().__init__()
        self.n_blocks, self.hidden = n_blocks, hidden
        self.mlp = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_blocks + 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.double()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.to(torch.float64))


class StratNetModel:
    """A StratNet with what it was trained for: answers requests with strategies (lists of per-block sparsity)."""

    def __init__(self, net: StratNet, *, block_params: Sequence[int], sparsity_range: tuple[float, float],
                 spread: float, max_block: float, meta: dict | None = None):
        self.net = net
        self.block_params = [int(v) for v in block_params]
        self.sparsity_range = (float(sparsity_range[0]), float(sparsity_range[1]))
        self.spread, self.max_block = float(spread), float(max_block)
        self.meta = dict(meta or {})

    # -- requests ------------------------------------------------------------------------------------------
    def features(self, sparsity: torch.Tensor | None = None, preference: torch.Tensor | None = None
                 ) -> torch.Tensor:
        lo, hi = self.sparsity_range
        if sparsity is not None:
            t = torch.as_tensor(sparsity, dtype=torch.float64).reshape(-1)
            z = torch.zeros_like(t)
            return torch.stack([torch.ones_like(t), z, 2 * (t - lo) / (hi - lo) - 1, z], -1)
        lam = torch.as_tensor(preference, dtype=torch.float64).reshape(-1)
        z = torch.zeros_like(lam)
        return torch.stack([z, torch.ones_like(lam), z, 2 * lam - 1], -1)

    def for_sparsity(self, t: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
        """[B, n] strategies for sparsity targets (differentiable through the net's weights)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        out = self.net(self.features(sparsity=t))
        return project(out[:, :-1], t, self.block_params, spread=self.spread, max_block=self.max_block)

    def for_preference(self, lam: torch.Tensor | Sequence[float] | float) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, n] strategies, [B] their mean sparsity) for preferences λ."""
        lo, hi = self.sparsity_range
        lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
        out = self.net(self.features(preference=lam))
        t = lo + (hi - lo) * torch.sigmoid(out[:, -1])
        return project(out[:, :-1], t, self.block_params, spread=self.spread, max_block=self.max_block), t

    @torch.no_grad()
    def answer(self, request, size_model=None) -> tuple[list[float], float]:
        """(strategy, target mean sparsity) for a ``CompressionRequest``; a size budget needs ``size_model``
        (``project.size_model``) of the output dtype."""
        from compress.strategy.project import sparsity_for_size

        lo, hi = self.sparsity_range
        if request.preference is not None:
            s, t = self.for_preference([request.preference])
            return s[0].tolist(), float(t[0])
        if request.size_bytes is not None:
            if size_model is None:
                raise CompressError("a size_bytes request needs the model's sparse-file size model")
            t = sparsity_for_size(request.size_bytes, size_model, lo, hi)
        else:
            t = request.sparsity
        if not lo <= t <= hi:
            raise CompressError(f"sparsity {t:g} is outside the range this StratNet was trained for [{lo:g}, {hi:g}]; "
                                "train one with a wider --sparsity-range")
        return self.for_sparsity([t])[0].tolist(), float(t)

    @torch.no_grad()
    def answer_many(self, requests, size_model=None) -> list:
        """``answer`` for many requests in one forward pass per kind (targets, preferences): a list holding, per
        request, (strategy, target) or the ``CompressError`` that request gets (the others are still answered)."""
        from compress.strategy.project import sparsity_for_size

        lo, hi = self.sparsity_range
        out: list = [None] * len(requests)
        sp, pref = [], []
        for i, r in enumerate(requests):
            if r.preference is not None:
                pref.append((i, r.preference))
                continue
            if r.size_bytes is not None:
                if size_model is None:
                    out[i] = CompressError("a size_bytes request needs the model's sparse-file size model")
                    continue
                try:
                    t = sparsity_for_size(r.size_bytes, size_model, lo, hi)
                except CompressError as e:  # this request's budget only: the others are still answered
                    out[i] = e
                    continue
            else:
                t = r.sparsity
            if not lo <= t <= hi:
                out[i] = CompressError(f"sparsity {t:g} is outside the range this StratNet was trained for "
                                       f"[{lo:g}, {hi:g}]; train one with a wider --sparsity-range")
            else:
                sp.append((i, t))
        if sp:
            for (i, t), s in zip(sp, self.for_sparsity([t for _, t in sp]).tolist()):
                out[i] = (s, float(t))
        if pref:
            s, t = self.for_preference([lam for _, lam in pref])
            for (i, _), si, ti in zip(pref, s.tolist(), t.tolist()):
                out[i] = (si, float(ti))
        return out

    # -- file ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        from compress.io.writer import atomic_file

        blob = {"format": "compress.stratnet", "version": VERSION, "n_blocks": self.net.n_blocks,
                "hidden": self.net.hidden, "state_dict": self.net.state_dict(), "block_params": self.block_params,
                "sparsity_range": list(self.sparsity_range), "spread": self.spread, "max_block": self.max_block,
                "meta": self.meta}
        with atomic_file(path, overwrite) as tmp:
            torch.save(blob, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> "StratNetModel":
        """Read a StratNet file; with ``model_dir``, check it was trained for that model (fingerprint)."""
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"{path}: no such StratNet file (train one with `compress strategy train`)")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
            raise CompressError(f"{path}: not a StratNet file ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(blob, dict) or blob.get("format") != "compress.stratnet":
            raise CompressError(f"{path}: not a StratNet file (written by `compress strategy train`)")
        if blob.get("version") != VERSION:
            raise CompressError(f"{path}: StratNet file version {blob.get('version')}, this build reads {VERSION}; "
                                "train it again")
        meta = blob.get("meta", {})
        if model_dir is not None:
            from compress.prune.calib import model_fingerprint

            fp = model_fingerprint(Path(model_dir))
            if fp != meta.get("fingerprint"):
                raise CompressError(f"{path} was trained for model {meta.get('model')} (fingerprint "
                                    f"{str(meta.get('fingerprint'))[:12]}), not for {model_dir} (fingerprint "
                                    f"{fp[:12]}); train a StratNet for this model")
        net = StratNet(int(blob["n_blocks"]), int(blob["hidden"]))
        net.load_state_dict(blob["state_dict"])
        return cls(net, block_params=blob["block_params"], sparsity_range=tuple(blob["sparsity_range"]),
                   spread=blob["spread"], max_block=blob["max_block"], meta=meta)


def train_through(model: StratNetModel, surrogate, *, steps: int = 400, lr: float = 0.01, batch: int = 64,
                  preference_share: float = 0.5, seed: int = 0, kappa: float = 0.0) -> list[float]:
    """Adam on StratNet's weights, minimizing the scalarized objective through ``surrogate.pessimistic`` with
    ``kappa`` (μ + κσ; κ = 0: the posterior mean, as the paper) (see the module docstring); returns the loss of
    every step."""
    lo, hi = model.sparsity_range
    g = torch.Generator().manual_seed(seed)
    n = len(model.block_params)
    with torch.no_grad():
        ends = surrogate.pessimistic(torch.tensor([[lo] * n, [hi] * n], dtype=torch.float64), kappa)
        mu_lo, mu_hi = float(ends[0]), float(ends[1])
    scale = (mu_hi - mu_lo) if mu_hi - mu_lo > 1e-9 else 1.0
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    n_pref = int(round(batch * preference_share))
    n_sp = max(1, batch - n_pref)
    losses = []
    model.net.train()
    for _ in range(steps):
        t = lo + (hi - lo) * torch.rand(n_sp, generator=g, dtype=torch.float64)
        loss = surrogate.pessimistic(model.for_sparsity(t), kappa).mean()
        if n_pref:
            lam = torch.rand(n_pref, generator=g, dtype=torch.float64)
            s, mean = model.for_preference(lam)
            size = (hi - mean) / (hi - lo)
            qual = (surrogate.pessimistic(s, kappa) - mu_lo) / scale
            loss = loss + torch.maximum(lam * size, (1 - lam) * qual).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.net.eval()
    return losses
