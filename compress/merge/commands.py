"""`compress merge|interpolate`: options (or a recipe) into a config; ``--method nps`` or a recipe saying so goes to
the NPS search (compress.search.commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from compress.config import build
from compress.errors import CompressError
from compress.extras import require
from compress.options import (
    DEVICE,
    OVERWRITE,
    PER_LAYER,
    PROTECT_HEADS,
    PROTECT_SPARSITY,
    PROTECT_TOP,
    QUIET,
    SHARD_SIZE_DEFAULT,
    out,
    protect_flags,
)
from compress.runtime import resolve_device
from compress.search.recipe import wants_nps


def merge(
    recipe: Optional[Path] = typer.Argument(None, help="A merge recipe (ours or mergekit's YAML); flags override it."),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder to write (mergekit's form; same as "
                                                                         "--out)."),
    base: Optional[Path] = typer.Option(None, help="Base checkpoint the task vectors are taken from."),
    models: Optional[list[Path]] = typer.Option(None, help="Models to merge: checkpoints or LoRA adapter folders "
                                                           "(--models A B C)."),
    method: Optional[str] = typer.Option(None, help="linear, slerp, task_arithmetic, magnitude_prune, ties, "
                                                    "dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
                                                    "della_linear, tsv, iso_c, iso_cts, wudi, adamerging."),
    density: Optional[list[float]] = typer.Option(None, help="Fraction of each task vector kept: one value, or "
                                                             "one per model."),
    weights: Optional[list[float]] = typer.Option(None, help="One weight per model (default 1)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Scale of the merged task vector (default 1)."),
    t: Optional[float] = typer.Option(None, help="slerp: position between the base (0) and the model (1)."),
    variant: Optional[str] = typer.Option(None, help="Defaults of the switches: paper (default), peft or mergekit."),
    topk: Optional[str] = typer.Option(None, help="TIES trim: global (paper) or per_tensor (PEFT, mergekit)."),
    sign_on: Optional[str] = typer.Option(None, help="Sign election on unweighted (paper, PEFT) or weighted "
                                                     "(mergekit) deltas."),
    consensus: Optional[str] = typer.Option(None, help="Sign election by mass (Σ τ) or count (Σ sign τ)."),
    disjoint: Optional[str] = typer.Option(None, help="mean (paper, PEFT), weighted_mean or sum (mergekit)."),
    rescale: Optional[str] = typer.Option(None, help="After random drops: inverse_keep (1/p, paper), l1 "
                                                     "(mergekit) or none."),
    tie_break: Optional[str] = typer.Option(None, help="Equal magnitudes at the top-k threshold: index (lowest "
                                                       "first, fast) or argsort (mergekit's order, bit-exact)."),
    seed: Optional[int] = typer.Option(None, help="Seed of random drops, combined with each tensor's name."),
    granularity: Optional[str] = typer.Option(None, help="adamerging: one λ per task (task) or per task and "
                                                         "tensor (layer, default)."),
    text: Optional[Path] = typer.Option(None, help="adamerging of causal LMs: unlabeled text to adapt on."),
    param: Optional[list[str]] = typer.Option(None, help="A method parameter KEY=VALUE, repeatable: rank (tsv), "
                                                         "common (iso_cts), steps and lr (wudi, adamerging)."),
    vocab: Optional[str] = typer.Option(None, help="Vocabulary sizes differ: error (default), base (keep the "
                                                   "base's rows) or union (keep every row)."),
    dtype: Optional[str] = typer.Option(None, help="dtype of the output (default: the base's)."),
    shard_size: Optional[str] = typer.Option(None, help="Largest shard, e.g. 5GB."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Folder to write."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N"),
    tasks: Optional[list[str]] = typer.Option(None, help="nps: the task of each model (--tasks sst2 trec …)."),
    heads: Optional[list[Path]] = typer.Option(None, help="nps: head folder per model (default: the model folders)."),
    budget: Optional[int] = typer.Option(None, help="nps: evaluations of the search."),
    protect: Optional[Path] = typer.Option(None, help="Protect JSON: tensors/rows/columns whose task-vector "
                                                      "entries skip sparsification."),
    protect_heads: Optional[Path] = PROTECT_HEADS, protect_top: Optional[float] = PROTECT_TOP,
    per_layer: bool = PER_LAYER, protect_sparsity: Optional[float] = PROTECT_SPARSITY,
    cuda: bool = typer.Option(False, "--cuda", help="mergekit's flag: the same as --device cuda."),
    out_shard_size: Optional[str] = typer.Option(None, help="mergekit's flag: largest shard, e.g. 5B, 500M (bytes, "
                                                            "as mergekit's writer counts them; --shard-size)."),
    copy_tokenizer: Optional[bool] = typer.Option(None, "--copy-tokenizer/--no-copy-tokenizer",
                                                  help="Copy the tokenizer files to the output (default: yes)."),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle", help="mergekit's flag, accepted and ignored: "
                                                                      "compress always reads one tensor at a time."),
    random_seed: Optional[int] = typer.Option(None, help="mergekit's flag: the same as --seed."),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Merge task-tuned checkpoints into one model (TIES, DARE, task arithmetic, SLERP, NPS, …), streaming."""
    from compress.config import MergeConfig
    from compress.merge import load_recipe, run_merge

    if wants_nps(method, recipe, recipe_decides=method is None):
        from compress.search.commands import nps_merge_command

        require("search", "compress merge --method nps")
        nps_merge_command(base=base, models=models or None, tasks=tasks or None, heads=heads or None,
                          density=density[0] if density else None, out=out_path, device=device, recipe=recipe,
                          protect=protect, overwrite=overwrite, quiet=quiet, budget=budget, seed=seed,
                          **protect_flags(protect_heads, protect_top, per_layer, protect_sparsity))
        return

    out_path, device, seed = mergekit_forms(out_path, out_dir, device, cuda, seed, random_seed)
    params: dict = {}
    if density and len(density) == 1:
        params["density"] = density[0]
    if lam is not None:
        params["lambda"] = lam
    if t is not None:
        params["t"] = t
    params.update(_key_values(param or []))
    flags = dict(base=base, method=method, variant=variant, topk=topk, sign_on=sign_on, consensus=consensus,
                 disjoint=disjoint, rescale=rescale, tie_break=tie_break, seed=seed, vocab=vocab, dtype=dtype,
                 shard_size=shard_size, protect=protect, granularity=granularity, text=text,
                 copy_tokenizer=copy_tokenizer,
                 **protect_flags(protect_heads, protect_top, per_layer, protect_sparsity),
                 out=out_path, device=device, overwrite=overwrite or None, quiet=quiet or None)
    if recipe is not None:
        cfg = load_recipe(recipe, **flags)
        if (models or weights or density or params) and hasattr(cfg, "run"):
            raise CompressError(f"{recipe}: a recipe with slices, modules, LoRA references or a tokenizer section "
                                "takes its models and parameters from the file, not from --models/--weights/…")
        if models or weights or density or params:
            cfg = _merge_cli_models(cfg, models, weights, density, params)
    else:
        if not models:
            raise CompressError("no models to merge: pass --models A B … (or a recipe file)")
        if method is None:
            raise CompressError("no merge method: pass --method (e.g. ties, task_arithmetic, linear)")
        cfg = build(MergeConfig, models=[{"model": m} for m in models], parameters=params,
                    **{k: v for k, v in flags.items() if v is not None})
        cfg = _merge_cli_models(cfg, None, weights, density, {})
    if out_shard_size is not None:
        cfg = cfg.model_copy(update={"shard_size": str(shard_bytes(out_shard_size))})
    s = run_merge(cfg)
    extra = f"; dropped rows: {s.dropped_rows}" if s.dropped_rows else ""
    out.print(f"wrote {s.out}: {s.tensors} tensors, {s.params:,} parameters, {cfg.method} of {len(cfg.models)} "
              f"models in {s.seconds:.1f} s ({s.gb_per_s:.2f} GB/s read){extra}")


def _key_values(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise CompressError(f"--param: expected KEY=NUMBER (e.g. rank=0.125), got '{item}'")
    return out


def mergekit_forms(out_path, out_dir, device, cuda, seed, random_seed):
    """mergekit's CLI forms (positional OUT, --cuda, --random-seed) as the native --out, --device and --seed."""
    if out_dir is not None:
        if out_path is not None and out_path != out_dir:
            raise CompressError(f"two output folders: OUT {out_dir} and --out {out_path}; give one")
        out_path = out_dir
    if cuda:
        if device is not None and not device.startswith("cuda"):
            raise CompressError(f"--cuda and --device {device} disagree; give one")
        device = device or "cuda"
    if random_seed is not None:
        if seed is not None and seed != random_seed:
            raise CompressError(f"--random-seed {random_seed} and --seed {seed} disagree; give one")
        seed = random_seed
    return out_path, device, seed


def shard_bytes(size: str) -> int:
    """mergekit's --out-shard-size (5B, 500M, 1000): its help says parameters, its writer counts bytes; bytes here."""
    text = str(size).strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    if not number.isdigit() or int(number) <= 0:
        raise CompressError(f"--out-shard-size: '{size}' is not a size (e.g. 5B, 500M, 1000000)")
    return int(number) * scale


def _merge_cli_models(cfg, models, weights, density, params):
    """Apply --models/--weights/--density (per model) and shared parameters given on the command line."""
    from compress.config import MergeConfig

    entries = [m.model_dump() for m in cfg.models] if not models else [{"model": m} for m in models]
    for name, values in (("weight", weights), ("density", density if density and len(density) > 1 else None)):
        if values:
            if len(values) != len(entries):
                raise CompressError(f"{len(values)} {name}s given for {len(entries)} models; give one per model")
            for e, v in zip(entries, values):
                e.setdefault("parameters", {})[name] = v
    return build(MergeConfig, **{**cfg.model_dump(), "models": entries,
                                 "parameters": {**cfg.parameters, **params}})


def interpolate(
    recipe: Optional[Path] = typer.Argument(None, help="nps: a recipe with method: nps."),
    base: Optional[Path] = typer.Option(None, help="Base checkpoint (α = 0)."),
    finetuned: Optional[Path] = typer.Option(None, help="Fine-tuned checkpoint or LoRA adapter (α = 1)."),
    alpha: Optional[list[float]] = typer.Option(None, help="One or more α (--alpha 0.25 0.5 1)."),
    method: str = typer.Option("linear", help="linear (θ_base + α·τ) or nps (λ and subspace weights searched)."),
    task: Optional[str] = typer.Option(None, help="nps: the fine-tuned model's task (dev split scores the search)."),
    density: Optional[float] = typer.Option(None, help="nps: fraction of τ kept."),
    budget: Optional[int] = typer.Option(None, help="nps: evaluations of the search."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Folder to write (one subfolder alpha-<α> per α "
                                                                "when several)."),
    eval_perplexity: Optional[Path] = typer.Option(None, help="Only evaluate: perplexity of each α on this text "
                                                              "(causal LMs)."),
    seqlen: int = typer.Option(256, help="Perplexity window."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate on the first N tokens only."),
    dtype: Optional[str] = typer.Option(None, help="dtype of written models (default: as stored)."),
    shard_size: str = typer.Option(SHARD_SIZE_DEFAULT, help="Largest shard."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """θ_base + α·(θ_ft − θ_base) for one or several α: written, or only evaluated when an evaluator is given."""
    from compress.config import InterpolateConfig
    from compress.merge.interpolate import best_alpha, evaluate_alphas, write_alphas

    if wants_nps(method, recipe):
        from compress.search.commands import nps_interpolate_command

        require("search", "compress interpolate --method nps")
        nps_interpolate_command(base=base, finetuned=finetuned, task=task, density=density, out=out_path,
                                device=device, recipe=recipe, overwrite=overwrite, quiet=quiet, budget=budget)
        return
    if method != "linear":
        raise CompressError(f"--method: '{method}' is not an interpolation (choose linear or nps)")
    if recipe is not None:
        raise CompressError(f"{recipe}: only nps interpolation takes a recipe (method: nps)")
    if base is None or finetuned is None or not alpha:
        raise CompressError("interpolate needs --base, --finetuned and --alpha")

    cfg = build(InterpolateConfig, base=base, finetuned=finetuned, alphas=alpha, out=out_path, dtype=dtype,
                shard_size=shard_size, device=device, overwrite=overwrite, quiet=quiet)
    if eval_perplexity is None:
        for p in write_alphas(cfg):
            out.print(f"wrote {p}")
        return
    from compress.eval.perplexity import load_causal_lm, perplexity
    from compress.io.writer import check_output, config_inputs
    from compress.taskvec import TaskVector

    if cfg.out is not None:  # before the evaluation: the best α is written there
        check_output(cfg.out, cfg.overwrite, config_inputs(cfg) + [eval_perplexity])
    dev = resolve_device(cfg.device)
    model, tok = load_causal_lm(cfg.base, device=dev)
    tv = TaskVector.from_paths(cfg.base, cfg.finetuned)
    scores = evaluate_alphas(model, tv, cfg.alphas, lambda m: perplexity(m, tok, eval_perplexity, seqlen=seqlen,
                                                                         max_tokens=max_tokens, device=dev),
                             quiet=cfg.quiet)
    table = Table("alpha", f"perplexity ({eval_perplexity.name})")
    for a, sc in zip(cfg.alphas, scores):
        table.add_row(f"{a:g}", f"{sc:.3f}")
    out.print(table)
    if out_path is not None:
        best = best_alpha(cfg.alphas, scores)
        for p in write_alphas(cfg.model_copy(update={"alphas": [best]})):
            out.print(f"wrote {p} (best α = {best:g})")


def register(app: typer.Typer) -> None:
    app.command()(merge)
    app.command()(interpolate)
