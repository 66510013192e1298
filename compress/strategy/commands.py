"""`compress strategy train|search` and `compress batch`: options (or a strategy recipe) into configs for
``compress.strategy``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from compress.config import build
from compress.extras import require
from compress.options import CALIB_CACHE, DEVICE, OVERWRITE, QUIET, pair, prune_methods

strategy_app = typer.Typer(no_args_is_help=True, help="Per-block pruning strategies for compression requests "
                                                             "(UniCuCo: StratNet trained through a GP surrogate).")


def _strategy_cfg(cls, model: Path, flags: dict):
    """A strategy config from MODEL (a folder) or a recipe (.yml, its fields; flags given win)."""
    from compress.io.files import read_mapping

    flags = {k: v for k, v in flags.items() if v is not None}
    if model.suffix in (".yml", ".yaml"):
        data = read_mapping(model, "strategy recipe")
        return build(cls, **{**data, **flags})
    return build(cls, model=model, **flags)


@strategy_app.command("train")
def strategy_train(
    model: Path = typer.Argument(..., help="Model folder (Hugging Face causal LM), or a strategy recipe (.yml)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="StratNet file to write (e.g. stratnet.pt)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text: file or bundled corpus (default "
                                                   "wikitext2.valid); "
                                                   "its held-out windows score every evaluation."),
    budget: Optional[int] = typer.Option(None, help="True evaluations for the GP: design + active rounds (default "
                                                    "160)."),
    method: Optional[str] = typer.Option(None, help=f"Pruning method: {prune_methods('wanda')}."),
    sparsity_range: Optional[str] = typer.Option(None, help="Mean sparsities StratNet answers (default 0.3,0.7)."),
    spread: Optional[float] = typer.Option(None, help="Each block within mean ± spread (default 0.2)."),
    rounds: Optional[int] = typer.Option(None, help="Active rounds (default 2)."),
    active_fraction: Optional[float] = typer.Option(None, help="Share of the budget for active rounds (default 0.25)."),
    steps: Optional[int] = typer.Option(None, help="Adam steps per round (default 400)."),
    kappa: Optional[float] = typer.Option(None, help="Pessimism: train through the GP's mean + kappa · posterior "
                                                     "std of log KL (default 0: the mean, as the paper)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows (default 128)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window."),
    eval_windows: Optional[int] = typer.Option(None, help="Held-out windows the KL runs on (default 32)."),
    eval_seqlen: Optional[int] = typer.Option(None, help="Tokens per held-out window (default min(256, max "
                                                         "positions))."),
    seed: Optional[int] = typer.Option(None, help="Seed (calibration windows, design, training)."),
    log: Optional[Path] = typer.Option(None, help="JSON lines file of every true evaluation."),
    cache_dir: Optional[Path] = typer.Option(None, help="Calibration statistics cache."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N"),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Train a StratNet: evaluate a space-filling design of strategies, fit a GP, train through its mean."""
    from compress.config import StrategyTrainConfig
    from compress.strategy.train import run_train

    require("search", "compress strategy train")
    cfg = _strategy_cfg(StrategyTrainConfig, model, dict(
        out=out_path, calib=calib, budget=budget, method=method,
        sparsity_range=pair(sparsity_range, "--sparsity-range"), spread=spread, rounds=rounds,
        active_fraction=active_fraction, steps=steps, kappa=kappa, nsamples=nsamples, seqlen=seqlen,
        eval_windows=eval_windows, eval_seqlen=eval_seqlen, seed=seed, log=log, cache_dir=cache_dir, device=device,
        overwrite=overwrite or None, quiet=quiet or None))
    run_train(cfg)


@strategy_app.command("search")
def strategy_search(
    model: Path = typer.Argument(..., help="Model folder (Hugging Face causal LM)."),
    sparsity: Optional[float] = typer.Option(None, help="Target sparsity over pruned parameters, in (0, 1)."),
    size_bytes: Optional[int] = typer.Option(None, help="Target sparse-file size in bytes."),
    preference: Optional[float] = typer.Option(None, help="Size/quality preference λ in [0, 1] (1: smallest)."),
    budget: int = typer.Option(100, help="Evaluations of the search (the uniform start included)."),
    optimizer: str = typer.Option("cma", help="cma (CMA-ES) or bayes (botorch BO)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text (default wikitext2.valid)."),
    method: str = typer.Option("wanda", help=f"Pruning method: {prune_methods()}."),
    spread: float = typer.Option(0.2, help="Each block within mean ± spread."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window."),
    eval_windows: int = typer.Option(32, help="Held-out windows the KL runs on."),
    seed: int = typer.Option(0, help="Seed."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Strategy JSON to write (`compress prune "
                                                                "--strategy`)."),
    log: Optional[Path] = typer.Option(None, help="JSON lines file of every evaluation."),
    dtype: Optional[str] = typer.Option(None, help="--size-bytes: dtype of the sparse file (default: as stored)."),
    cache_dir: Path = CALIB_CACHE,
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Search one request's strategy (CMA-ES or BO over the same evaluator as StratNet): the per-request baseline."""
    from compress.config import CompressionRequest, StrategySearchConfig
    from compress.strategy.train import run_search

    require("search", "compress strategy search")
    req = build(CompressionRequest, sparsity=sparsity, size_bytes=size_bytes, preference=preference)
    cfg = build(StrategySearchConfig, model=model, request=req, calib=calib, method=method, spread=spread,
                nsamples=nsamples, seqlen=seqlen, eval_windows=eval_windows, optimizer=optimizer, budget=budget,
                seed=seed, out=out_path, log=log, dtype=dtype, cache_dir=cache_dir, device=device, overwrite=overwrite,
                quiet=quiet)
    run_search(cfg)


def batch_cmd(
    model: Path = typer.Argument(..., help="Model folder the StratNet was trained for."),
    stratnet: Path = typer.Option(..., help="StratNet file (`compress strategy train`)."),
    requests: Path = typer.Option(..., help="JSON lines: one request per line, e.g. {\"id\": \"a\", \"sparsity\": "
                                            "0.5}."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write: one output per request and a summary."),
    fmt: str = typer.Option("sparse", "--format", help="sparse (one sparse file per request), folder or both."),
    dtype: Optional[str] = typer.Option(None, help="dtype of the outputs (default: as stored)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text (default: the one the StratNet was trained on)."),
    cache_dir: Path = CALIB_CACHE,
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Answer every request of a JSON-lines file with a StratNet: one pruned model per request, a summary table."""
    from compress.config import BatchConfig
    from compress.strategy.batch import run_batch

    cfg = build(BatchConfig, model=model, stratnet=stratnet, requests=requests, out=out_path, format=fmt,
                dtype=dtype, calib=calib, cache_dir=cache_dir, device=device, overwrite=overwrite, quiet=quiet)
    run_batch(cfg)


def register(app: typer.Typer) -> None:
    app.command("batch")(batch_cmd)
    app.add_typer(strategy_app, name="strategy")
