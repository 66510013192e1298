"""Whole-weight pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, with per-block sparsity vectors
(uniform, given, or OWL) answered from one cached calibration pass (``Pruner``).

Modules: ``methods`` (pure tensor functions: masks, OBS update), ``registry`` (the methods by name: what every
entry point dispatches on), ``calib`` (prunable-layer discovery, calibration windows, dense-model statistics and
their disk cache), ``strategy`` (per-block sparsity vectors), ``owl`` (outlier-weighted allocation), ``pruner``
(``Pruner``). ``run_prune(cfg)`` is `compress prune`.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import CompressError
from compress.prune.registry import METHODS, PruneMethod, get_prune_method, register

__all__ = ["METHODS", "PruneMethod", "get_prune_method", "register", "Pruner", "PruneResult", "Strategy",
           "run_prune", "load_prune_recipe", "default_sparse_out"]


def __getattr__(name: str):
    # loaded on first use: they import torch, and the CLI reads the registry's names without it
    if name in ("Pruner", "PruneResult", "resolve_text"):
        from compress.prune import pruner

        return getattr(pruner, name)
    if name == "Strategy":
        from compress.prune.strategy import Strategy

        return Strategy
    raise AttributeError(f"module 'compress.prune' has no attribute '{name}'")


def default_sparse_out(out: Path) -> Path:
    return out.with_name(out.name + ".sparse.safetensors")


def load_prune_recipe(path: str | os.PathLike, **cli):
    """A prune recipe (YAML mapping of ``PruneConfig`` fields; relative paths are relative to the working
    directory, as on the command line); ``cli`` values that are not None win."""
    from compress.config import PruneConfig, build
    from compress.io.files import read_mapping

    data = read_mapping(path, "prune recipe")
    return build(PruneConfig, **{**data, **{k: v for k, v in cli.items() if v is not None}})


def run_prune(cfg) -> dict:
    """Prune ``cfg.model`` as ``cfg`` says, write ``cfg.out`` (and the sparse file), print a summary line per
    step; returns what was done (sparsity, sizes, perplexities)."""
    spec = get_prune_method(cfg.method)  # before any work, as a schema error would be
    from compress.heads.select import resolve_protect
    from compress.io.writer import check_output, config_inputs
    from compress.progress import console
    from compress.prune.pruner import Pruner, resolve_text
    from compress.runtime import resolve_device, torch_dtype
    device = resolve_device(cfg.device)
    sparse_out = None
    if cfg.out is not None:
        check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
        if not cfg.no_sparse:
            sparse_out = cfg.sparse_out or default_sparse_out(cfg.out)
            check_output(sparse_out, cfg.overwrite, config_inputs(cfg))
            if sparse_out.resolve().is_relative_to(cfg.out.resolve()):
                # it is written beside the folder, in the same pass, and a file inside would read as a shard
                raise CompressError(f"--sparse-out {sparse_out}: lies inside --out {cfg.out}; write it beside the "
                                    "folder")
    elif cfg.eval_perplexity is None:
        raise CompressError("nothing to do: give --out DIR (and/or --eval-perplexity TEXT)")
    eval_text = resolve_text(cfg.eval_perplexity)[1] if cfg.eval_perplexity else None
    from compress.prune.calib import DEFAULT_IGNORE

    pruner = Pruner(cfg.model, cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
                    targets=cfg.targets, ignore=DEFAULT_IGNORE if cfg.ignore is None else (cfg.ignore or None),
                    device=device, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, blocksize=cfg.blocksize,
                    percdamp=cfg.percdamp, quiet=cfg.quiet, calibration=cfg.calibration)
    if eval_text is not None and pruner.skeleton.get_output_embeddings() is None:  # before any work or output
        raise CompressError(f"--eval-perplexity: {cfg.model} (model type '{pruner.skeleton.config.model_type}') has "
                            "no LM head; perplexity needs a causal LM")
    protect = resolve_protect(cfg, pruner.skeleton)  # named as the loaded model names its parameters
    strategy = pruner.strategy(cfg.sparsity, cfg.layer_sparsity, cfg.strategy, cfg.owl, cfg.owl_m, cfg.owl_lambda)
    # block by block, each block written as soon as it is pruned (the folder and the sparse file in one pass): the
    # whole model is never in memory
    result = pruner.prune_blocks(strategy, cfg.method, cfg.pattern, protect, out=cfg.out,
                                 dtype=torch_dtype(cfg.dtype), overwrite=cfg.overwrite, shard_size=cfg.shard_size,
                                 sparse_out=sparse_out, sparse_metadata={"model": str(cfg.model)})
    report = {**result.summary(), "layers": len(pruner.modules), "blocks": pruner.n_blocks,
              "calibration": cfg.calibration, "calibration_forward_passes": pruner.forward_passes,
              "cache_key": pruner.key() if spec.calibrated and cfg.cache_dir is not None else None}
    calibration = ("from cache" if spec.calibrated and not pruner.forward_passes
                   else f"{cfg.calibration}, computed" if pruner.forward_passes else "not needed")
    console.print(f"pruned {len(pruner.modules)} layers in {pruner.n_blocks} blocks: {cfg.method} {cfg.pattern}, "
                  f"sparsity {result.sparsity:.4f} over {report['params_pruned_over']:,} parameters "
                  f"({strategy.source}; calibration {calibration})")
    if eval_text is not None:
        from compress.eval.blockwise import blockwise_perplexity

        # block by block: the dense model from its folder, the pruned one as written (float32), or, with no
        # folder written, the input's with the pruned weights in their place
        kw = {"seqlen": cfg.eval_seqlen, "max_tokens": cfg.eval_max_tokens, "device": device}
        tok = pruner.tokenizer()
        dense = blockwise_perplexity(cfg.model, tok, eval_text, **kw)
        if cfg.out is not None:
            pruned = blockwise_perplexity(cfg.out, tok, eval_text, **kw)
        else:
            pruned = blockwise_perplexity(cfg.model, tok, eval_text, weights=pruner.checkpoint_weights(result), **kw)
        report["perplexity"] = {"text": eval_text, "dense": dense, "pruned": pruned}
        print(f"perplexity on {eval_text}: dense {dense:.4f}, pruned {pruned:.4f}")
    if cfg.out is not None:
        report["out"] = str(cfg.out)
        line = f"wrote {cfg.out}"
        s = result.sparse
        if s is not None:
            report["sparse"] = {"path": str(sparse_out), "file_bytes": s.file_bytes, "dense_bytes": s.dense_bytes,
                                "pruned_file_bytes": s.sparse_file_bytes, "pruned_dense_bytes": s.sparse_dense_bytes}
            line += (f" and {sparse_out} ({s.ratio:.1%} of the dense size; the pruned tensors "
                     f"{s.pruned_ratio:.1%} of theirs)")
        print(line)
    return report
