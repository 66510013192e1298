"""`compress prune`: whole-weight pruning through ``compress.prune``, or ``--method nps`` (a task vector) through
the NPS search (compress.search.commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from compress.config import build
from compress.errors import CompressError
from compress.extras import require
from compress.options import (
    OVERWRITE,
    PER_LAYER,
    PROTECT_HEADS,
    PROTECT_SPARSITY,
    PROTECT_TOP,
    QUIET,
    protect_flags,
    prune_methods,
)
from compress.search.recipe import wants_nps


def prune(
    model: Optional[Path] = typer.Argument(None, help="Model folder to prune, or a prune recipe (.yml); "
                                                      "omitted with --method nps."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of each pruned layer's weights set to zero, "
                                                        "in [0, 1) (the mean over pruned parameters)."),
    method: Optional[str] = typer.Option(None, help=f"{prune_methods('wanda')}; nps: task-vector "
                                                    "pruning (--base/--finetuned)."),
    pattern: Optional[str] = typer.Option(None, help="unstructured (default), 2:4 or 4:8 (N kept of every M)."),
    layer_sparsity: Optional[str] = typer.Option(None, help="One sparsity per block, comma-separated."),
    strategy: Optional[Path] = typer.Option(None, help="JSON strategy file: {\"layer_sparsity\": [...]}"),
    owl: bool = typer.Option(False, "--owl", help="OWL allocation (outlier-weighted per-block sparsity)."),
    owl_m: Optional[float] = typer.Option(None, help="OWL outlier threshold M (× mean score; default 5)."),
    owl_lambda: Optional[float] = typer.Option(None, help="OWL spread λ: block sparsity within s ± λ (default 0.08)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text: a .txt/.txt.gz file or a bundled corpus "
                                                   "(default wikitext2.valid)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows (default 128)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default min(512, the model's "
                                                    "max positions))."),
    seed: Optional[int] = typer.Option(None, help="Seed of the calibration window offsets."),
    targets: Optional[str] = typer.Option(None, help="Regex of linear layers to prune (default: all in the blocks)."),
    ignore: Optional[str] = typer.Option(None, help="Regex of linear layers to leave dense (default: lm_head, "
                                                    "classifier, pooler)."),
    protect: Optional[Path] = typer.Option(None, help="Protect JSON: tensors / row / column ranges kept dense."),
    protect_heads: Optional[Path] = PROTECT_HEADS, protect_top: Optional[float] = PROTECT_TOP,
    per_layer: bool = PER_LAYER, protect_sparsity: Optional[float] = PROTECT_SPARSITY,
    calibration: Optional[str] = typer.Option(None, help="sequential (default): each block calibrated on the "
                                                         "outputs of the blocks already pruned; shared: on the "
                                                         "dense model's activations."),
    cache_dir: Optional[Path] = typer.Option(None, help="Opt-in cache of the shared calibration's statistics "
                                                        "(default: none; its size is printed before writing)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Folder to write (Hugging Face layout)."),
    sparse_out: Optional[Path] = typer.Option(None, help="Sparse file (values + packed mask; default "
                                                         "OUT.sparse.safetensors)."),
    no_sparse: bool = typer.Option(False, "--no-sparse", help="Do not write the sparse file."),
    eval_perplexity: Optional[str] = typer.Option(None, help="Print dense and pruned perplexity on this text."),
    eval_seqlen: Optional[int] = typer.Option(None, help="--eval-perplexity: tokens per window (default 256)."),
    eval_max_tokens: Optional[int] = typer.Option(None, help="--eval-perplexity: its first tokens only (default: "
                                                             "all)."),
    dtype: Optional[str] = typer.Option(None, help="dtype of the written model (default: as stored)."),
    base: Optional[Path] = typer.Option(None, help="--method nps: base checkpoint."),
    finetuned: Optional[Path] = typer.Option(None, help="--method nps: fine-tuned checkpoint (a zoo task folder "
                                                        "holds its head)."),
    density: Optional[float] = typer.Option(None, help="--method nps: fraction of τ kept, in (0, 1]."),
    task: Optional[str] = typer.Option(None, help="--method nps: the task whose dev split scores the search."),
    head: Optional[Path] = typer.Option(None, help="--method nps: head folder (default: the fine-tuned folder)."),
    budget: Optional[int] = typer.Option(None, help="--method nps: evaluations of the search."),
    parts: Optional[int] = typer.Option(None, "--m", help="--method nps: M, subspaces of τ."),
    partition: Optional[str] = typer.Option(None, help="--method nps: magnitude or svd."),
    select: Optional[str] = typer.Option(None, help="--method nps: topk (paper) or random (DARE per part)."),
    optimizer: Optional[str] = typer.Option(None, help="--method nps: cma or bayes."),
    objective: Optional[str] = typer.Option(None, help="--method nps: kl, loss or accuracy."),
    log: Optional[Path] = typer.Option(None, help="--method nps: JSON lines file of every evaluation."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N"),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Prune whole weights (magnitude, Wanda, SparseGPT; unstructured or N:M; per-block sparsity, OWL), or a
    task vector (--method nps: subspace weights searched on dev, then pruned to --density)."""
    is_recipe = model is not None and model.suffix in (".yml", ".yaml")
    nps_only = dict(base=base, finetuned=finetuned, density=density, task=task, head=head, budget=budget,
                    parts=parts, partition=partition, select=select, optimizer=optimizer, objective=objective, log=log)
    if wants_nps(method, model, recipe_decides=is_recipe and model.is_file()):
        from compress.search.commands import nps_prune_command

        require("search", "compress prune --method nps")
        if model is not None and not is_recipe:
            raise CompressError("--method nps prunes a task vector: give --base and --finetuned, not MODEL")
        nps_prune_command(out=out_path, device=device, recipe=model, protect=protect, overwrite=overwrite,
                          quiet=quiet, **nps_only, **protect_flags(protect_heads, protect_top, per_layer,
                                                                    protect_sparsity))
        return
    given = [f"--{k.replace('_', '-')}" for k, v in nps_only.items() if v is not None]
    if given:
        raise CompressError(f"{given[0]} belongs to --method nps (task-vector pruning); whole-weight pruning "
                            "takes MODEL and --sparsity")
    from compress.config import PruneConfig
    from compress.prune import load_prune_recipe, run_prune

    vector = None
    if layer_sparsity is not None:
        try:
            vector = [float(v) for v in layer_sparsity.split(",") if v.strip()]
        except ValueError:
            raise CompressError(f"--layer-sparsity '{layer_sparsity}': give comma-separated numbers") from None
    flags = dict(sparsity=sparsity, method=method, pattern=pattern, layer_sparsity=vector, strategy=strategy,
                 owl=owl or None, owl_m=owl_m, owl_lambda=owl_lambda, calib=calib, nsamples=nsamples, seqlen=seqlen,
                 seed=seed, targets=targets, ignore=ignore, protect=protect, calibration=calibration,
                 cache_dir=cache_dir, out=out_path,
                 **protect_flags(protect_heads, protect_top, per_layer, protect_sparsity),
                 sparse_out=sparse_out, no_sparse=no_sparse or None, eval_perplexity=eval_perplexity,
                 eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens, dtype=dtype, device=device,
                 overwrite=overwrite or None, quiet=quiet or None)
    if model is None:
        raise CompressError("no model: give MODEL (a Hugging Face folder) or a prune recipe")
    if model.suffix in (".yml", ".yaml"):
        cfg = load_prune_recipe(model, **flags)
    else:
        cfg = build(PruneConfig, model=model, **{k: v for k, v in flags.items() if v is not None})
    run_prune(cfg)


def register(app: typer.Typer) -> None:
    app.command()(prune)
