"""UniCuCo training (`compress strategy train`) and the per-request search command (`compress strategy search`).

Training spends ``budget`` true evaluations: (1 − active_fraction) of them on the space-filling design, fits the
GP and trains StratNet through its posterior mean; then ``rounds`` active rounds each evaluate StratNet's own
proposals for a spread of requests (three quarters sparsity targets stratified over the range, a quarter
preferences), add them to the GP, refit, and continue training.
"""

from __future__ import annotations

import contextlib
import time

import torch

from compress.errors import CompressError
from compress.progress import console, track


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block: the GP fit and StratNet's steps are many tiny float64
    operations, for which a pool of threads is expected to cost more than the arithmetic (seen: the GP fit took
    2.2 s on the 16-core H200 host with torch's default threads, 0.6 s on one thread of the 2-core development
    machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_pruner(model, calib, *, nsamples, seqlen, seed, device, cache_dir, batch_size=8, quiet=False):
    from compress.prune import Pruner

    return Pruner(model, calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device, cache_dir=cache_dir,
                  batch_size=batch_size, quiet=quiet)


def stratnet_pruner(net, model, *, calib=None, nsamples=None, device, cache_dir, quiet=False):
    """The ``Pruner`` ``net`` was trained with (its calibration, windows, seed from the StratNet file; ``calib``/
    ``nsamples`` override), checked to have the StratNet's blocks. `compress batch`, the server's model sessions
    and `compress bench serve` all build it here, so they share one calibration cache key."""
    meta = net.meta
    pruner = make_pruner(model, calib or meta.get("calib"), nsamples=nsamples or meta.get("nsamples", 128),
                         seqlen=meta.get("seqlen"), seed=meta.get("seed", 0), device=device, cache_dir=cache_dir,
                         quiet=quiet)
    if pruner.block_params != net.block_params:
        raise CompressError(f"StratNet trained for blocks of {net.block_params} parameters, {model} has "
                            f"{pruner.block_params}")
    return pruner


def train_unicuco(evaluator, *, sparsity_range=(0.3, 0.7), spread=0.2, max_block=0.95, budget=160, rounds=2,
                  active_fraction=0.25, steps=400, round_steps=None, hidden=64, lr=0.01, batch_requests=64, seed=0,
                  refit="first", kappa=0.0, meta=None, quiet=False):
    """(StratNetModel, surrogate, report): the design, the GP, StratNet, the active rounds; every evaluation goes
    through ``evaluator`` (and its log). ``steps`` Adam steps after the design, ``round_steps`` (default
    steps // 2) after each active round, continuing from the current weights; ``refit``: "first" fits the GP's
    hyperparameters on the design only (the rounds add data), "always" refits them every round. ``kappa``: StratNet
    minimizes μ + κσ of the GP (``stratnet.train_through``; 0 = the paper's posterior mean); the active rounds
    then evaluate those pessimistic proposals."""
    from compress.strategy.stratnet import StratNet, StratNetModel, train_through
    from compress.strategy.surrogate import Surrogate, design

    bp = evaluator.pruner.block_params
    n = len(bp)
    lo, hi = sparsity_range
    if not kappa >= 0:
        raise CompressError(f"kappa must be >= 0 (the weight of the GP's posterior deviation), got {kappa}")
    if hi + 1e-9 >= max_block:
        raise CompressError(f"sparsity range top {hi:g} must be below the largest block sparsity {max_block:g}")
    t_start = time.perf_counter()
    n_active = int(round(budget * active_fraction)) if rounds else 0
    n_design = budget - n_active
    anchors = min(5, max(2, n_design // 16))
    surrogate = Surrogate(n, (max(0.0, lo - spread), min(max_block, hi + spread)))
    seconds = {"evaluations": 0.0, "gp_fit": 0.0, "stratnet_train": 0.0}

    def evaluate_all(strategies, phase, what):
        t0 = time.perf_counter()
        for s in track(list(strategies), what, quiet=quiet):
            surrogate.add(s, evaluator.evaluate([float(v) for v in s], phase=phase)["kl"])
        seconds["evaluations"] += time.perf_counter() - t0

    def fit_and_train(round_no):
        t0 = time.perf_counter()
        with one_thread():
            surrogate.fit(hyperparameters=round_no == 0 or refit == "always")
            t1 = time.perf_counter()
            n_steps = steps if round_no == 0 else (round_steps if round_steps is not None else max(1, steps // 2))
            losses = train_through(model, surrogate, steps=n_steps, lr=lr, batch=batch_requests,
                                   seed=seed + round_no, kappa=kappa)
        seconds["gp_fit"] += t1 - t0
        seconds["stratnet_train"] += time.perf_counter() - t1
        return losses

    evaluate_all(design(n_design, bp, sparsity_range, spread=spread, max_block=max_block, anchors=anchors,
                        seed=seed), "design", "GP design")
    torch.manual_seed(seed)
    model = StratNetModel(StratNet(n, hidden), block_params=bp, sparsity_range=sparsity_range, spread=spread,
                          max_block=max_block, meta=meta)
    losses = [fit_and_train(0)]
    per_round = [n_active // rounds + (1 if r < n_active % rounds else 0) for r in range(rounds)] if rounds else []
    for r, k in enumerate(per_round, 1):
        if k == 0:
            continue
        k_pref = k // 4
        k_sp = k - k_pref
        g = torch.Generator().manual_seed(seed + 1000 + r)
        t = lo + (hi - lo) * (torch.arange(k_sp, dtype=torch.float64) + torch.rand(k_sp, generator=g,
                                                                                   dtype=torch.float64)) / k_sp
        with torch.no_grad():
            props = list(model.for_sparsity(t))
            if k_pref:
                lam = (torch.arange(k_pref, dtype=torch.float64) + torch.rand(k_pref, generator=g,
                                                                             dtype=torch.float64)) / k_pref
                props += list(model.for_preference(lam)[0])
        evaluate_all(props, f"active-{r}", f"active round {r}")
        losses.append(fit_and_train(r))
    report = {"evaluations": evaluator.evaluations, "design": n_design, "active": n_active, "rounds": rounds,
              "steps": [len(x) for x in losses],
              "gp_points": len(surrogate), "seconds": {**seconds, "total": time.perf_counter() - t_start},
              "loss_first": losses[0][0], "loss_last": losses[-1][-1], "gp_fits": surrogate.fits,
              "kappa": float(kappa)}
    model.meta.update({"training": report})
    return model, surrogate, report


def _pruner_and_evaluator(cfg, log=None):
    from compress.prune.registry import get_prune_method
    from compress.runtime import resolve_device
    from compress.strategy.evaluate import Evaluator

    device = resolve_device(cfg.device)
    pruner = make_pruner(cfg.model, cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                         device=device, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, quiet=cfg.quiet)
    t0 = time.perf_counter()
    pruner.stats(hessian=get_prune_method(cfg.method).hessian)
    calib_seconds = time.perf_counter() - t0
    ev = Evaluator(pruner, cfg.method, eval_windows=cfg.eval_windows, eval_seqlen=cfg.eval_seqlen,
                   batch_size=cfg.batch_size, log=log)
    return pruner, ev, calib_seconds


def run_train(cfg) -> dict:
    """`compress strategy train`: train and save the StratNet file; returns the report."""
    from compress.io.writer import check_output, config_inputs
    from compress.prune.calib import model_fingerprint
    from compress.prune.pruner import DEFAULT_CALIB
    from compress.prune.registry import get_prune_method

    get_prune_method(cfg.method)  # before any work, as a schema error would be
    if cfg.out is None:
        raise CompressError("give --out FILE (the StratNet file to write)")
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    t0 = time.perf_counter()
    pruner, ev, calib_seconds = _pruner_and_evaluator(cfg, cfg.log)
    meta = {"model": str(cfg.model), "fingerprint": model_fingerprint(cfg.model), "method": cfg.method,
            "calib": str(cfg.calib or DEFAULT_CALIB), "nsamples": pruner.nsamples, "seqlen": pruner.seqlen,
            "seed": cfg.seed, "eval_windows": int(ev.windows.shape[0]), "eval_seqlen": ev.eval_seqlen}
    model, _, report = train_unicuco(ev, sparsity_range=cfg.sparsity_range, spread=cfg.spread,
                                     max_block=cfg.max_block_sparsity, budget=cfg.budget, rounds=cfg.rounds,
                                     active_fraction=cfg.active_fraction, steps=cfg.steps, hidden=cfg.hidden,
                                     lr=cfg.lr, batch_requests=cfg.batch_requests, seed=cfg.seed, kappa=cfg.kappa,
                                     meta=meta,
                                     quiet=cfg.quiet)
    report["seconds"]["calibration"] = calib_seconds
    report["seconds"]["dense_logits"] = ev.seconds["dense"]
    report["seconds"]["all"] = time.perf_counter() - t0
    model.meta["training"] = report
    model.save(cfg.out, overwrite=cfg.overwrite)
    s = report["seconds"]
    console.print(f"trained StratNet on {report['evaluations']} evaluations ({report['design']} design, "
                  f"{report['active']} active in {report['rounds']} rounds) in {s['all']:.1f} s: evaluations "
                  f"{s['evaluations']:.1f} s, GP fits {s['gp_fit']:.1f} s, StratNet {s['stratnet_train']:.1f} s, "
                  f"calibration {calib_seconds:.1f} s; kappa {cfg.kappa:g}")
    lo, hi = cfg.sparsity_range
    with torch.no_grad():
        for t in (lo, (lo + hi) / 2, hi):
            st = model.for_sparsity([t])[0]
            print(f"  sparsity {t:.3f}: " + " ".join(f"{v:.3f}" for v in st.tolist()))
    print(f"wrote {cfg.out}")
    return report


def run_search(cfg) -> dict:
    """`compress strategy search`: one request, searched; prints and optionally writes the strategy JSON."""
    import json

    from compress.io.writer import atomic_file, check_output, config_inputs
    from compress.prune.registry import get_prune_method
    from compress.strategy.project import size_model, sparsity_for_size
    from compress.strategy.request import head_protect
    from compress.strategy.search import search_preference, search_sparsity

    get_prune_method(cfg.method)  # before any work, as a schema error would be
    if cfg.out is not None:
        check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    req = cfg.request
    pruner, ev, _ = _pruner_and_evaluator(cfg, cfg.log)
    ev.protect = head_protect(pruner, req.protect_heads)
    lo, hi = cfg.sparsity_range
    opts = dict(spread=cfg.spread, max_block=cfg.max_block_sparsity, optimizer=cfg.optimizer, budget=cfg.budget,
                seed=cfg.seed)
    if req.preference is not None:
        res = search_preference(ev, req.preference, pruner.block_params, cfg.sparsity_range, **opts)
    else:
        t = req.sparsity
        if req.size_bytes is not None:
            from compress.runtime import torch_dtype

            sm = size_model(cfg.model, {n: p.numel for n, p in pruner.checkpoint_names().items()},
                            torch_dtype(cfg.dtype))
            t = sparsity_for_size(req.size_bytes, sm, lo, hi)
        if not 0 < t < cfg.max_block_sparsity:
            raise CompressError(f"sparsity {t:g} is outside (0, {cfg.max_block_sparsity:g})")
        res = search_sparsity(ev, t, pruner.block_params, **opts)
    line = (f"searched {res['evaluations']} strategies ({res['optimizer']}) in {res['seconds']:.1f} s: KL "
            f"{res['kl']:.5f}" + (f" (uniform {res['uniform_kl']:.5f})" if "uniform_kl" in res else
                                  f" at mean sparsity {res['mean']:.4f}")
            + "\n  strategy: " + " ".join(f"{v:.3f}" for v in res["strategy"]))
    print(line)
    if cfg.out is not None:
        with atomic_file(cfg.out, cfg.overwrite) as tmp:
            tmp.write_text(json.dumps({"layer_sparsity": res["strategy"], "source": "compress strategy search",
                                       "request": req.model_dump(exclude_none=True),
                                       **{k: v for k, v in res.items() if k != "strategy"}}, indent=1) + "\n")
        print(f"wrote {cfg.out}")
    return res
