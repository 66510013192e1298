"""The `compress` command line. Every command validates through ``compress.config`` and reports bad input as
one line on stderr with exit code 2 (DESIGN principle 6)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

# typer >= 0.29 vendors click and raises its own copies of click's exceptions: catch both families.
_EXIT, _CLICK_ERROR, _ABORT = [click.exceptions.Exit], [click.ClickException], [click.exceptions.Abort]
try:
    import typer._click.exceptions as _tce
    import typer.exceptions as _te

    _EXIT.append(_te.Exit), _CLICK_ERROR.append(_tce.ClickException), _ABORT.append(_te.Abort)
except (ImportError, AttributeError):
    pass
_EXIT, _CLICK_ERROR, _ABORT = tuple(_EXIT), tuple(_CLICK_ERROR), tuple(_ABORT)
from rich.console import Console
from rich.table import Table

from compress.config import ApplyConfig, EvalConfig, ExtractConfig, ExtractLoraConfig, ZooBuildConfig, build
from compress.runtime import resolve_device, torch_dtype
from compress.errors import CompressError
from compress.extras import require


class _Interrupted(Exception):
    """Ctrl-C, carried past typer to main()."""


class _Group(typer.core.TyperGroup):
    # typer >= 0.29 turns a KeyboardInterrupt into Exit(130), which standalone_mode=False hands back as a return
    # value main() took for success (exit 0, no message); re-raised as _Interrupted it reaches main() intact.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress and recombine fine-tuned transformer checkpoints.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print and save what they measure.")
app.add_typer(bench_app, name="bench")
out = Console(soft_wrap=True)

DEVICE = typer.Option("cpu", help="cpu, cuda or cuda:N")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
ZOO_ROOT = typer.Option(Path("checkpoints/zoo"), help="Where the zoo models are.")
RESULTS = typer.Option(Path("checkpoints/bench"), help="Where JSON, markdown and the plot go.")
OVERWRITE = typer.Option(False, help="Replace OUT if it exists.")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@app.command()
def extract(
    base: Path = typer.Option(..., help="Base checkpoint (folder, .safetensors, index or .bin)."),
    finetuned: Path = typer.Option(..., help="Fine-tuned checkpoint, or a PEFT LoRA adapter folder."),
    out_path: Path = typer.Option(..., "--out", help="Delta file to write (.safetensors)."),
    density: float = typer.Option(1.0, help="Fraction of each tensor's delta entries to keep, in (0, 1]."),
    method: str = typer.Option("magnitude", help="magnitude (top-k |τ|) or random (DARE-style keep)."),
    seed: int = typer.Option(0, help="Seed for random keep, combined with each tensor's name."),
    dtype: Optional[str] = typer.Option(None, help="dtype of stored values (default: the fine-tuned dtype)."),
    extra: str = typer.Option("error", help="Tensors only in the fine-tuned model: error or carry (store whole)."),
    vocab: str = typer.Option("carry", help="Embeddings whose vocab size differs: carry (store whole) or error."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Store θ_ft − θ_base compactly: kept values plus a bitmask or delta-coded indices."""
    from compress.delta import extract_delta
    from compress.io.reader import open_checkpoint
    from compress.io.writer import check_output, config_inputs
    from compress.taskvec import TaskVector

    cfg = build(ExtractConfig, base=base, finetuned=finetuned, out=out_path, density=density, method=method,
                seed=seed, dtype=dtype, extra=extra, vocab=vocab, device=device, overwrite=overwrite, quiet=quiet)
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    base_ck = open_checkpoint(cfg.base)
    tv = TaskVector.from_paths(base_ck, cfg.finetuned, extra=cfg.extra, vocab=cfg.vocab)
    s = extract_delta(base_ck, tv, cfg.out, density=cfg.density, method=cfg.method, seed=cfg.seed,
                      value_dtype=torch_dtype(cfg.dtype), device=resolve_device(cfg.device),
                      overwrite=cfg.overwrite, quiet=cfg.quiet, extra_metadata={"finetuned": str(cfg.finetuned)})
    out.print(f"wrote {s.path}: {s.tensors} tensors, {s.params:,} parameters covered, {s.kept:,} kept "
              f"(density {s.kept / max(s.params, 1):.4f}), {_human(s.file_bytes)}, "
              f"{s.bits_per_param:.3f} bits/parameter" + (f", {s.carried} carried whole" if s.carried else ""))


@app.command("apply")
def apply_cmd(
    base: Optional[Path] = typer.Option(None, help="Base checkpoint the delta was extracted from (not needed for a "
                                                   "sparse weight file written by `compress prune`)."),
    delta: Path = typer.Option(..., help="Compact delta file (`compress extract`) or sparse weight file "
                                         "(`compress prune`)."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write (Hugging Face layout)."),
    dtype: Optional[str] = typer.Option(None, help="Cast float tensors of the output (default: as stored)."),
    shard_size: str = typer.Option("5GB", help="Largest shard, e.g. 5GB, 500MB."),
    config_from: Optional[Path] = typer.Option(None, help="Folder to copy config, generation config and "
                                                          "tokenizer from (default: the base folder)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Rebuild a model from a base and a delta file (exact at every kept entry), or from a sparse weight file."""
    from compress.io.files import read_model_config
    from compress.delta import apply_delta
    from compress.io.deltafile import DeltaFile
    from compress.io.reader import open_checkpoint
    from compress.io.sparse import apply_sparse, is_sparse_file
    from compress.io.writer import check_output, config_inputs, parse_size

    cfg = build(ApplyConfig, base=base, delta=delta, out=out_path, dtype=dtype, shard_size=shard_size,
                config_from=config_from, device=device, overwrite=overwrite, quiet=quiet)
    parse_size(cfg.shard_size)
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    if cfg.config_from is not None and not cfg.config_from.is_dir():
        raise CompressError(f"{cfg.config_from}: --config-from must be a folder holding config.json")
    if cfg.config_from is not None:
        read_model_config(cfg.config_from)  # copied into the output: a broken one stops here, not in the next tool
    delta_file = DeltaFile(cfg.delta)
    opts = dict(device=resolve_device(cfg.device), dtype=torch_dtype(cfg.dtype), shard_size=cfg.shard_size,
                overwrite=cfg.overwrite, quiet=cfg.quiet, aux_from=cfg.config_from)
    if is_sparse_file(delta_file):
        if cfg.base is not None:
            raise CompressError(f"{cfg.delta} is a sparse weight file (it holds the whole model): drop --base")
        apply_sparse(delta_file, cfg.out, **opts)
    elif cfg.base is None:
        raise CompressError(f"{cfg.delta} is a task-vector delta: give --base, the checkpoint it was extracted from")
    else:
        base_ck = open_checkpoint(cfg.base)
        if cfg.config_from is None and base_ck.root is not None:
            read_model_config(base_ck.root)  # the base's is the one copied
        apply_delta(base_ck, delta_file, cfg.out, **opts)
    out.print(f"wrote {cfg.out}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Delta file, checkpoint or PEFT adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    count_zeros: bool = typer.Option(False, help="Checkpoints: read every tensor to report density."),
    tensors: bool = typer.Option(False, help="List every tensor."),
):
    """Tensors, parameter count, density, bits per parameter and size against dense."""
    from compress.inspect import inspect_path

    info = inspect_path(path, count_zeros=count_zeros)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if tensors:
        t = Table(title=str(path))
        keys = [k for k in info["tensors"][0]] if info["tensors"] else []
        for k in keys:
            t.add_column(k)
        for r in info["tensors"] + info.get("aux", []):
            t.add_row(*[f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys])
        out.print(t)
    s = Table(title=f"{info['kind']}: {path}", show_header=False)
    s.add_row("tensors", str(len(info["tensors"])))
    if info.get("aux"):
        s.add_row("auxiliary files", ", ".join(f"{r['name']} ({r['bytes']:,} B)" for r in info["aux"]))
    s.add_row("parameters" + (" covered" if info["kind"] == "delta" else ""), f"{info['params']:,}")
    if "kept" in info:
        s.add_row("kept", f"{info['kept']:,}")
    if "density" in info:
        s.add_row("density", f"{info['density']:.4f}")
    s.add_row("file size", f"{info['file_bytes']:,} B ({_human(info['file_bytes'])})")
    if "dense_bytes" in info:
        s.add_row("dense size", f"{info['dense_bytes']:,} B ({_human(info['dense_bytes'])})")
    if "bits_per_param" in info:
        s.add_row("bits / parameter", f"{info['bits_per_param']:.3f}")
    if "compression" in info:
        s.add_row("dense / file", f"{info['compression']:.2f}x")
    if "file_vs_dense" in info:
        s.add_row("file / dense", f"{100 * info['file_vs_dense']:.1f}%")
        s.add_row("pruned tensors", f"{info['pruned_tensors']}: {_human(info['pruned_file_bytes'])} stored, "
                                    f"{_human(info['pruned_dense_bytes'])} dense "
                                    f"({100 * info['pruned_file_vs_dense']:.1f}%)")
    for k in ("peft_type", "r", "lora_alpha", "base_model"):
        if k in info:
            s.add_row(k, str(info[k]))
    for k, v in info.get("metadata", {}).items():
        s.add_row(f"meta {k}", str(v))
    out.print(s)


@app.command("extract-lora")
def extract_lora(
    base: Path = typer.Option(..., help="Base checkpoint."),
    finetuned: Path = typer.Option(..., help="Fine-tuned checkpoint (or an adapter to re-rank)."),
    out_path: Path = typer.Option(..., "--out", help="Adapter folder to write."),
    rank: int = typer.Option(16, help="LoRA rank r (capped at each matrix's smaller side)."),
    targets: Optional[str] = typer.Option(None, help="Regex on tensor names to include (default: 2-D linear "
                                                     "weights except embeddings and lm_head)."),
    dtype: Optional[str] = typer.Option(None, help="dtype of the adapter weights (default float32)."),
    extra: str = typer.Option("error", help="Tensors only in the fine-tuned model: error or carry (skipped)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Turn a dense task vector into a PEFT LoRA adapter by truncated SVD (loadable by PeftModel)."""
    from compress.io.lora import write_lora_adapter
    from compress.io.reader import open_checkpoint
    from compress.io.writer import check_output, config_inputs
    from compress.taskvec import TaskVector

    cfg = build(ExtractLoraConfig, base=base, finetuned=finetuned, out=out_path, rank=rank, targets=targets,
                dtype=dtype, extra=extra, device=device, overwrite=overwrite, quiet=quiet)
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    dev = resolve_device(cfg.device)
    base_ck = open_checkpoint(cfg.base)
    tv = TaskVector.from_paths(base_ck, cfg.finetuned, extra=cfg.extra)
    names = tv.names()
    deltas = ((name, tv.get(name, device=dev)) for name in names)
    # GPT-2 style Conv1D stores weights as [in, out]; PEFT then expects fan_in_fan_out adapters
    conv1d = (base_ck.config or {}).get("model_type") in ("gpt2", "gpt_bigcode")
    s = write_lora_adapter(deltas, cfg.out, cfg.rank, str(cfg.base.resolve()), dtype=torch_dtype(cfg.dtype),
                           overwrite=cfg.overwrite, targets_regex=cfg.targets, fan_in_fan_out=conv1d,
                           total=len(names), progress=not cfg.quiet)
    worst = max((c["rel_error"] for c in s["covered"].values()), default=0.0)
    out.print(f"wrote {cfg.out}: rank {s['r']}, {len(s['covered'])} matrices ({s['covered_params']:,} parameters "
              f"of task vector) as {s['lora_params']:,} LoRA parameters; worst relative error {worst:.4g}; "
              f"skipped {len(s['skipped'])} tensors ({s['skipped_params']:,} parameters: biases, norms, embeddings)")


@app.command("convert-llama2c")
def convert_llama2c_cmd(
    out_path: Path = typer.Option(Path("checkpoints/stories260K"), "--out", help="Folder to write."),
    model_bin: Optional[Path] = typer.Option(None, help="llama2.c model .bin (default: the bundled stories260K)."),
    tokenizer_bin: Optional[Path] = typer.Option(None, help="llama2.c tokenizer .bin (default: tok512.bin)."),
    overwrite: bool = OVERWRITE,
):
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face LlamaForCausalLM folder."""
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    if model_bin is None or tokenizer_bin is None:
        default_bin, default_tok = stories260k_files()
        model_bin, tokenizer_bin = model_bin or default_bin, tokenizer_bin or default_tok
    convert_llama2c(model_bin, tokenizer_bin, out_path, overwrite=overwrite)
    out.print(f"wrote {out_path}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("checkpoints/demo"), help="Where the demo writes its models."),
    steps: int = typer.Option(150, help="Fine-tuning steps per corpus."),
    density: float = typer.Option(0.1, help="Density the task vectors are pruned to."),
    stratnet_budget: int = typer.Option(64, help="True evaluations for the demo's StratNet."),
    search_budget: int = typer.Option(100, help="Evaluations of the per-request search it is timed against."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """The three jobs on bundled permissive data: Wanda 50% on stories260K, a batch of compression requests
    answered by a StratNet, fine-tune → extract → merge."""
    from compress.demo import run_demo

    run_demo(workdir, steps=steps, density=density, stratnet_budget=stratnet_budget, search_budget=search_budget,
             device=resolve_device(device), quiet=quiet)

@app.command()
def merge(
    recipe: Optional[Path] = typer.Argument(None, help="A merge recipe (ours or mergekit's YAML); flags override it."),
    base: Optional[Path] = typer.Option(None, help="Base checkpoint the task vectors are taken from."),
    models: Optional[list[Path]] = typer.Option(None, help="Models to merge: checkpoints or LoRA adapter folders "
                                                           "(--models A B C)."),
    method: Optional[str] = typer.Option(None, help="linear, slerp, task_arithmetic, magnitude_prune, ties, "
                                                    "dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
                                                    "della_linear."),
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
    protect_heads: Optional[Path] = typer.Option(None, help="Head scores file (`compress heads score`): keep its "
                                                           "top heads' q/k/v rows and o_proj columns."),
    protect_top: Optional[float] = typer.Option(None, help="--protect-heads: fraction of heads to protect "
                                                           "(default 0.1)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="--protect-heads: the top fraction of each layer."),
    protect_sparsity: Optional[float] = typer.Option(None, help="Prune the protected slices to this sparsity "
                                                                "instead of keeping them dense."),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Merge task-tuned checkpoints into one model (TIES, DARE, task arithmetic, SLERP, NPS, …), streaming."""
    from compress.config import MergeConfig
    from compress.merge import load_recipe, run_merge

    if method == "nps" or (method is None and recipe is not None and _recipe_method(recipe) == "nps"):
        from compress.search.cli import nps_merge_command

        require("search", "compress merge --method nps")
        nps_merge_command(base=base, models=models or None, tasks=tasks or None, heads=heads or None,
                          density=density[0] if density else None, out=out_path, device=device, recipe=recipe,
                          protect=protect, overwrite=overwrite, quiet=quiet, budget=budget, seed=seed,
                          **_protect_flags(protect_heads, protect_top, per_layer, protect_sparsity))
        return

    params: dict = {}
    if density and len(density) == 1:
        params["density"] = density[0]
    if lam is not None:
        params["lambda"] = lam
    if t is not None:
        params["t"] = t
    flags = dict(base=base, method=method, variant=variant, topk=topk, sign_on=sign_on, consensus=consensus,
                 disjoint=disjoint, rescale=rescale, tie_break=tie_break, seed=seed, vocab=vocab, dtype=dtype,
                 shard_size=shard_size, protect=protect,
                 **_protect_flags(protect_heads, protect_top, per_layer, protect_sparsity),
                 out=out_path, device=device, overwrite=overwrite or None, quiet=quiet or None)
    if recipe is not None:
        cfg = load_recipe(recipe, **flags)
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
    s = run_merge(cfg)
    extra = f"; dropped rows: {s.dropped_rows}" if s.dropped_rows else ""
    out.print(f"wrote {s.out}: {s.tensors} tensors, {s.params:,} parameters, {cfg.method} of {len(cfg.models)} "
              f"models in {s.seconds:.1f} s ({s.gb_per_s:.2f} GB/s read){extra}")


def _protect_flags(protect_heads, protect_top, per_layer, protect_sparsity) -> dict:
    """The head-protection flags shared by prune, merge and NPS, as config fields (None: not given)."""
    if protect_heads is None and (protect_top is not None or per_layer):
        raise CompressError("--protect-top/--per-layer choose among the heads of --protect-heads SCORES; give it")
    return dict(protect_heads=protect_heads, protect_top=protect_top, protect_per_layer=per_layer or None,
                protect_sparsity=protect_sparsity)


def _recipe_method(recipe: Path) -> Optional[str]:
    """The ``method`` key of a YAML recipe (an unreadable recipe is the loader's one-line error)."""
    from compress.io.files import read_mapping

    return read_mapping(recipe).get("method")


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


@app.command()
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
    shard_size: str = typer.Option("5GB", help="Largest shard."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """θ_base + α·(θ_ft − θ_base) for one or several α: written, or only evaluated when an evaluator is given."""
    from compress.config import InterpolateConfig
    from compress.merge.interpolate import best_alpha, evaluate_alphas, write_alphas

    if method == "nps" or (recipe is not None and _recipe_method(recipe) == "nps"):
        from compress.search.cli import nps_interpolate_command

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


@bench_app.command("io-memory")
def bench_io_memory(
    size_gb: float = typer.Option(1.0, help="Size of each random checkpoint."),
    workdir: Path = typer.Option(Path("checkpoints/bench-io-memory"), help="Scratch folder (removed after)."),
    results: Path = typer.Option(Path("checkpoints/bench"), help="Where JSON and markdown results go."),
):
    """Peak RSS of `compress extract` on two random checkpoints, against their size."""
    from compress.bench.io_memory import run

    run(size_gb=size_gb, workdir=workdir, results=results)


@bench_app.command("write-once")
def bench_write_once(
    size_gb: float = typer.Option(1.0, help="Size of the random checkpoint."),
    before: Optional[str] = typer.Option(None, help="Also measure this code: a git revision of this checkout, or "
                                                    "a folder holding an older compress package."),
    workdir: Path = typer.Option(Path("checkpoints/bench-write-once"), help="Scratch folder (removed after)."),
    results: Path = typer.Option(Path("checkpoints/bench"), help="Where JSON and markdown results go."),
):
    """Bytes `compress apply` writes (/proc/self/io) against the size of the folder it writes."""
    from compress.bench.write_once import run

    run(size_gb=size_gb, workdir=workdir, results=results, before=before)


@bench_app.command("devices")
def bench_devices(
    size_gb: float = typer.Option(0.5, help="Size of each random checkpoint."),
    results: Path = typer.Option(Path("checkpoints/bench"), help="Where JSON and markdown results go."),
    device: str = typer.Option("cuda", help="The device compared with the CPU."),
):
    """extract / apply / extract-lora on the CPU and on the GPU: same outputs? how much faster?"""
    from compress.bench.devices import run

    run(size_gb=size_gb, results=results, device=resolve_device(device))


# --- the benchmark zoo ----------------------------------------------------------------------------------------

strategy_app = typer.Typer(no_args_is_help=True, help="Per-block pruning strategies for compression requests "
                                                             "(UniCuCo: StratNet trained through a GP surrogate).")
app.add_typer(strategy_app, name="strategy")


def _pair(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    vals = _csv(text, flag)
    if len(vals) != 2:
        raise CompressError(f"{flag}: give two comma-separated numbers, e.g. 0.3,0.7")
    return [float(v) for v in vals]


def _prune_methods(default: str | None = None) -> str:
    """The registry's pruning methods for a help text: 'magnitude, wanda (default) or sparsegpt'."""
    from compress.prune.registry import method_names  # no torch: the names only

    names = [f"{n} (default)" if n == default else n for n in method_names()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


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
    calib: Optional[str] = typer.Option(None, help="Calibration text: file or bundled corpus (default wikitext2.valid); "
                                                   "its held-out windows score every evaluation."),
    budget: Optional[int] = typer.Option(None, help="True evaluations for the GP: design + active rounds (default 160)."),
    method: Optional[str] = typer.Option(None, help=f"Pruning method: {_prune_methods('wanda')}."),
    sparsity_range: Optional[str] = typer.Option(None, help="Mean sparsities StratNet answers (default 0.3,0.7)."),
    spread: Optional[float] = typer.Option(None, help="Each block within mean ± spread (default 0.2)."),
    rounds: Optional[int] = typer.Option(None, help="Active rounds (default 2)."),
    active_fraction: Optional[float] = typer.Option(None, help="Share of the budget for active rounds (default 0.25)."),
    steps: Optional[int] = typer.Option(None, help="Adam steps per round (default 400)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows (default 128)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window."),
    eval_windows: Optional[int] = typer.Option(None, help="Held-out windows the KL runs on (default 32)."),
    eval_seqlen: Optional[int] = typer.Option(None, help="Tokens per held-out window (default min(256, max positions))."),
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
        sparsity_range=_pair(sparsity_range, "--sparsity-range"), spread=spread, rounds=rounds,
        active_fraction=active_fraction, steps=steps, nsamples=nsamples, seqlen=seqlen, eval_windows=eval_windows,
        eval_seqlen=eval_seqlen, seed=seed, log=log, cache_dir=cache_dir, device=device,
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
    method: str = typer.Option("wanda", help=f"Pruning method: {_prune_methods()}."),
    spread: float = typer.Option(0.2, help="Each block within mean ± spread."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window."),
    eval_windows: int = typer.Option(32, help="Held-out windows the KL runs on."),
    seed: int = typer.Option(0, help="Seed."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Strategy JSON to write (`compress prune --strategy`)."),
    log: Optional[Path] = typer.Option(None, help="JSON lines file of every evaluation."),
    dtype: Optional[str] = typer.Option(None, help="--size-bytes: dtype of the sparse file (default: as stored)."),
    cache_dir: Path = typer.Option(Path("checkpoints/cache/calib"), help="Calibration statistics cache."),
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


@app.command("batch")
def batch_cmd(
    model: Path = typer.Argument(..., help="Model folder the StratNet was trained for."),
    stratnet: Path = typer.Option(..., help="StratNet file (`compress strategy train`)."),
    requests: Path = typer.Option(..., help="JSON lines: one request per line, e.g. {\"id\": \"a\", \"sparsity\": 0.5}."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write: one output per request and a summary."),
    fmt: str = typer.Option("sparse", "--format", help="sparse (one sparse file per request), folder or both."),
    dtype: Optional[str] = typer.Option(None, help="dtype of the outputs (default: as stored)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text (default: the one the StratNet was trained on)."),
    cache_dir: Path = typer.Option(Path("checkpoints/cache/calib"), help="Calibration statistics cache."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Answer every request of a JSON-lines file with a StratNet: one pruned model per request, a summary table."""
    from compress.config import BatchConfig
    from compress.strategy.batch import run_batch

    cfg = build(BatchConfig, model=model, stratnet=stratnet, requests=requests, out=out_path, format=fmt,
                dtype=dtype, calib=calib, cache_dir=cache_dir, device=device, overwrite=overwrite, quiet=quiet)
    run_batch(cfg)


@app.command("serve")
def serve_cmd(
    registry: Path = typer.Option(..., help="YAML registry: models: {name: {model, stratnet, calib, ...}}."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (non-loopback needs a token)."),
    port: int = typer.Option(8000, help="Port to bind."),
    db: Path = typer.Option(Path("checkpoints/serve.db"), help="SQLite job store (WAL)."),
    artifacts: Optional[Path] = typer.Option(None, help="Artifacts folder (default: <db>.artifacts)."),
    token: Optional[str] = typer.Option(None, help="Bearer token clients must send (default: $COMPRESS_SERVE_TOKEN)."),
    backend: str = typer.Option("local", help="local (groups in the server's worker thread) or ray."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: start a local Ray)."),
    ray_gpus: Optional[float] = typer.Option(None, help="GPUs per group task (default: 1 with --device cuda)."),
    workers: int = typer.Option(1, help="Groups running at once (ray backend)."),
    max_queue: int = typer.Option(1000, help="Queued jobs beyond this get 429."),
    max_batch: int = typer.Option(64, help="Most jobs answered in one group."),
    max_body: int = typer.Option(64 * 1024, help="Request bodies over this many bytes get 413."),
    public_docs: bool = typer.Option(False, help="Serve /docs and /openapi.json without the token."),
    cache_dir: Path = typer.Option(Path("checkpoints/cache/calib"), help="Calibration statistics cache."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Serve compression requests over HTTP: a job store that survives restarts, a batching worker, /docs."""
    import os

    from compress.config import ServeConfig
    from compress.serve import TOKEN_ENV, serve

    require("serve", "compress serve", ("fastapi", "uvicorn"))
    if backend == "ray":
        require("ray", "compress serve --backend ray")
    cfg = build(ServeConfig, registry=registry, host=host, port=port, db=db, artifacts=artifacts,
                token=token if token is not None else (os.environ.get(TOKEN_ENV) or None), backend=backend,
                ray_address=ray_address, ray_gpus=ray_gpus, workers=workers, max_queue=max_queue,
                max_batch=max_batch, max_body=max_body, cache_dir=cache_dir, device=device, quiet=quiet)
    serve(cfg, public_docs=public_docs)


request_app = typer.Typer(no_args_is_help=True, help="Talk to `compress serve`: submit, status, wait, download, "
                                                      "cancel, models. URL/token from --url/--token or "
                                                      "$COMPRESS_SERVE_URL/$COMPRESS_SERVE_TOKEN.")
app.add_typer(request_app, name="request")
URL = typer.Option(None, "--url", help="Server URL (default: $COMPRESS_SERVE_URL or http://127.0.0.1:8000).")
TOKEN = typer.Option(None, "--token", help="Bearer token (default: $COMPRESS_SERVE_TOKEN).")


def _client(url, token):
    from compress.serve.client import Client

    require("serve", "compress request", ("httpx",))
    return Client(url, token)


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=1))


@request_app.command("submit")
def request_submit(
    model: str = typer.Argument(..., help="Registered model name (see `compress request models`)."),
    sparsity: Optional[float] = typer.Option(None, help="Target mean sparsity in (0, 1)."),
    size_bytes: Optional[int] = typer.Option(None, help="Budget for the sparse file, in bytes."),
    preference: Optional[float] = typer.Option(None, help="Size/quality trade-off λ in [0, 1] (1: smallest)."),
    protect_heads: Optional[str] = typer.Option(None, help="Heads kept dense: 'layer.head,layer.head'."),
    fmt: str = typer.Option("sparse", "--format", help="sparse (sparse weight file) or dense (pruned folder)."),
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with the same key returns the same job."),
    wait: bool = typer.Option(False, help="Wait until the request is finished."),
    out: Optional[Path] = typer.Option(None, help="With --wait: download the artifact here."),
    overwrite: bool = OVERWRITE, url: Optional[str] = URL, token: Optional[str] = TOKEN,
):
    """Submit one compression request; prints the job (its id, state)."""
    from compress.config import CompressionRequest, ServeRequest

    heads = None
    if protect_heads:
        try:
            heads = [[int(x) for x in h.strip().split(".")] for h in protect_heads.split(",") if h.strip()]
        except ValueError:
            raise CompressError(f"--protect-heads '{protect_heads}': give layer.head pairs, e.g. 0.1,2.3") from None
    if out is not None and not wait:
        raise CompressError("--out needs --wait (or use `compress request download ID OUT` later)")
    body = build(ServeRequest, model=model, sparsity=sparsity, size_bytes=size_bytes, preference=preference,
                 protect_heads=heads, format=fmt, idempotency_key=idempotency_key)
    fields = body.model_dump(exclude_none=True, include=set(CompressionRequest.model_fields))
    with _client(url, token) as c:
        job = c.submit(model, format=body.format, idempotency_key=body.idempotency_key, **fields)
        if wait:
            job = c.wait(job["id"])
            if out is not None and job["state"] == "done":
                c.download(job["id"], out, overwrite=overwrite)
        _print_json(job)
        if wait and job["state"] != "done":
            raise CompressError(f"request {job['id']} {job['state']}: {job.get('error') or ''}".rstrip(": "))


@request_app.command("status")
def request_status(job_id: str = typer.Argument(...), url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """A request's state, strategy, measured KL and size."""
    with _client(url, token) as c:
        _print_json(c.get(job_id))


@request_app.command("wait")
def request_wait(job_id: str = typer.Argument(...), timeout: Optional[float] = typer.Option(None, help="Seconds."),
                 url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Wait until a request is finished; exit 2 when it failed or was cancelled."""
    with _client(url, token) as c:
        job = c.wait(job_id, timeout=timeout)
    _print_json(job)
    if job["state"] != "done":
        raise CompressError(f"request {job_id} {job['state']}: {job.get('error') or ''}".rstrip(": "))


@request_app.command("download")
def request_download(job_id: str = typer.Argument(...),
                     out: Path = typer.Argument(..., help="File (sparse) or folder (dense) to write."),
                     overwrite: bool = OVERWRITE, url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Download a finished request's artifact (checked against the server's SHA-256)."""
    with _client(url, token) as c:
        path = c.download(job_id, out, overwrite=overwrite)
    print(f"wrote {path}")


@request_app.command("cancel")
def request_cancel(job_id: str = typer.Argument(...), url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """Cancel a queued or running request (a finished one's artifact is deleted)."""
    with _client(url, token) as c:
        _print_json(c.cancel(job_id))


@request_app.command("models")
def request_models(url: Optional[str] = URL, token: Optional[str] = TOKEN):
    """The models the server answers for."""
    with _client(url, token) as c:
        _print_json(c.models())


zoo_app = typer.Typer(no_args_is_help=True, help="The benchmark zoo: real models built by recipe (recipes/zoo).")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="Zoo model to build (see `compress zoo list`)."),
    out_root: Path = typer.Option(Path("checkpoints/zoo"), help="The model goes to OUT_ROOT/NAME."),
    recipe: Optional[Path] = typer.Option(None, help="Recipe YAML (default: recipes/zoo/<recipe of NAME>.yml)."),
    quick: bool = typer.Option(False, help="Merge the recipe's quick: section over it: a small CPU build."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated subset of the recipe's parts "
                                                   "(minilm-8task: tasks, e.g. sst2,trec)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Build a zoo model from its recipe, atomically, with build.json (accuracy or checks, seconds, device)."""
    from compress import zoo

    only = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    cfg = build(ZooBuildConfig, name=name, out_root=out_root, recipe=recipe, quick=quick, only=only,
                device=device, overwrite=overwrite, quiet=quiet)
    zoo.entry(cfg.name)
    from compress.io.writer import check_output

    check_output(cfg.out_root / cfg.name, cfg.overwrite, [cfg.recipe])
    summary = zoo.build(cfg.name, device=resolve_device(cfg.device), quick=cfg.quick, out_root=cfg.out_root,
                        recipe=cfg.recipe, overwrite=cfg.overwrite, quiet=cfg.quiet, only=cfg.only)
    if summary.get("table"):
        print(summary["table"])
    seconds = f" in {summary['seconds']} s" if "seconds" in summary else ""
    out.print(f"wrote {cfg.out_root / cfg.name}{seconds}")


@zoo_app.command("list")
def zoo_list(
    out_root: Path = typer.Option(Path("checkpoints/zoo"), help="Where built models are looked for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Zoo models: what each is, its recipe, and whether it is built under OUT_ROOT."""
    from compress import zoo

    rows = []
    for e in zoo.ZOO.values():
        folder = out_root / e.name
        built = None
        if (folder / "build.json").is_file():
            try:
                built = "quick" if json.loads((folder / "build.json").read_text()).get("quick") else "full"
            except (OSError, ValueError):
                built = "unreadable build.json"
        rows.append({"name": e.name, "description": e.description, "recipe": str(zoo.recipes_dir() / e.recipe),
                     "recipe_exists": (zoo.recipes_dir() / e.recipe).is_file(), "path": str(folder), "built": built})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"zoo (built under {out_root})")
    for col in ("name", "what", "recipe", "built"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["description"], Path(r["recipe"]).name + ("" if r["recipe_exists"] else " (missing)"),
                  r["built"] or "no")
    out.print(t)


@zoo_app.command("carry")
def zoo_carry(
    name: str = typer.Argument(..., help="Zoo model to prepare for a GPU machine."),
    out_path: Path = typer.Option(Path(".carry"), "--out", help="Folder to prepare (git-ignored)."),
    overwrite: bool = OVERWRITE,
):
    """Prepare what a bare GPU machine needs to build NAME, in pieces that fit the device tool's 64 MiB a call."""
    from compress import zoo

    sizes = zoo.carry(name, out_path, overwrite=overwrite)
    for part, n in sizes.items():
        if part != "out":
            print(f"{out_path / part}: {n / 2**20:.1f} MiB")
    if name == "minilm-8task":
        print("GPU build, two calls back to back (the machine stays warm about 30 s between them):\n"
                  f"  1. carry [{out_path}/minilm-a]: mkdir -p /tmp/minilm && cp {out_path}/minilm-a/* /tmp/minilm/\n"
                  f"  2. carry [{out_path}/minilm-b, .whl]: cp {out_path}/minilm-b/* /tmp/minilm/ && "
                  f"COMPRESS_MINILM=/tmp/minilm python3 -m compress.cli zoo build "
                  "minilm-8task --device cuda  (see README, 'The benchmark zoo')")


# --- evaluation -------------------------------------------------------------------------------------------------

def _eval_task(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.data import task_info
    from compress.eval.classify import evaluate

    task_info(cfg.task)  # an unknown task fails here, before any model is loaded
    res = evaluate(cfg.model, head=cfg.head, task=cfg.task, split=cfg.split, limit=cfg.limit,
                   batch_size=cfg.batch_size, device=resolve_device(cfg.device), dtype=torch_dtype(cfg.dtype))
    info = {"evaluator": "task", "model": str(cfg.model), "head": str(cfg.head or cfg.model), "limit": cfg.limit,
            **res.as_dict()}
    return info, res.summary()


def _text_or_corpus(value: str, flag: str) -> Path:
    from compress.data import corpus_names, corpus_path

    text = Path(value)
    if not text.is_file():
        if value not in corpus_names():
            raise CompressError(f"{flag} {value}: neither a file nor a bundled corpus "
                                f"(corpora: {', '.join(corpus_names())})")
        text = corpus_path(value)
    return text


def _eval_perplexity(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.perplexity import load_causal_lm, perplexity

    text = _text_or_corpus(cfg.perplexity, "--perplexity")
    device = resolve_device(cfg.device)
    with hf_quiet():
        model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
    ppl = perplexity(model, tok, text, seqlen=cfg.seqlen, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                     device=device)
    info = {"evaluator": "perplexity", "model": str(cfg.model), "text": str(text), "seqlen": cfg.seqlen,
            "max_tokens": cfg.max_tokens, "perplexity": ppl}
    return info, f"perplexity {ppl:.4f} on {text} (windows of {cfg.seqlen} tokens)"


def _eval_kl(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.kl import kl_divergence
    from compress.eval.perplexity import load_causal_lm

    text = _text_or_corpus(cfg.calib, "--calib")
    device = resolve_device(cfg.device)
    with hf_quiet():
        model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
        ref, _ = load_causal_lm(cfg.kl_to, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
    kl = kl_divergence(model, ref, tok, text, seqlen=cfg.seqlen, max_tokens=cfg.max_tokens,
                       batch_size=cfg.batch_size, device=device)
    info = {"evaluator": "kl_to", "model": str(cfg.model), "reference": str(cfg.kl_to), "text": str(text),
            "seqlen": cfg.seqlen, "max_tokens": cfg.max_tokens, "kl_nats_per_token": kl}
    return info, f"KL(reference ‖ model) {kl:.6f} nats/token on {text}"


def _eval_recall(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.perplexity import load_causal_lm
    from compress.eval.recall import recall_eval

    device = resolve_device(cfg.device)
    with hf_quiet():
        model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
    r = recall_eval(model, tok, cfg.recall, limit=cfg.limit, batch_size=cfg.batch_size, device=device)
    info = {"evaluator": "recall", "model": str(cfg.model), "prompts": str(cfg.recall), **r}
    return info, (f"context recall on {r['n']} prompts: accuracy {r['accuracy']:.4f}, hallucination rate "
                  f"{r['hallucination_rate']:.4f}, confusion {r['confusion_rate']:.4f} (chance {r['chance']:.4f})")


# One function per evaluator flag of `compress eval` (the flag names are EvalConfig fields; see config.EVALUATORS).
EVALUATOR_RUNNERS = {"task": _eval_task, "perplexity": _eval_perplexity, "kl_to": _eval_kl, "recall": _eval_recall}


heads_app = typer.Typer(no_args_is_help=True, help="Attention-head importance: score, reinforce, probes.")
app.add_typer(heads_app, name="heads")


@heads_app.command("score")
def heads_score(
    model: Path = typer.Argument(..., help="Model folder (Llama-like, GPT-2, BERT, LLaVA)."),
    method: str = typer.Option(..., help="vhd (LLaVA: with/without the image), chd (with/without the context), "
                                         "nhar, seekr (needs --base), sink."),
    probes: Path = typer.Option(..., help="Probes JSON lines (prompt, context, answer, image); see the README."),
    out_path: Path = typer.Option(..., "--out", help="Scores file to write (.safetensors; a .png heatmap beside)."),
    base: Optional[Path] = typer.Option(None, help="seekr: the model before fine-tuning."),
    limit: Optional[int] = typer.Option(None, help="Use the first N probes."),
    epsilon: float = typer.Option(0.3, help="sink: ε of the sink-head rate."),
    anchors: int = typer.Option(3, help="nhar: anchor words per layer (most frequent logit-lens decodings)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """One importance score per attention head ([layers, heads] + KV-group scores) and a heatmap."""
    from compress.config import HeadsScoreConfig
    from compress.heads.cli import run_score

    run_score(build(HeadsScoreConfig, model=model, method=method, probes=probes, out=out_path, base=base,
                    limit=limit, epsilon=epsilon, anchors=anchors, device=device, overwrite=overwrite, quiet=quiet))


@heads_app.command("reinforce")
def heads_reinforce(
    model: Path = typer.Argument(..., help="Model folder."),
    scores: Path = typer.Option(..., help="Scores file from `compress heads score`."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write."),
    alpha: float = typer.Option(2.0, help="Scale of the chosen heads' outputs."),
    top_per_layer: float = typer.Option(0.5, help="Fraction of each chosen layer's heads, by score."),
    layers: Optional[str] = typer.Option(None, help="Layers to reinforce: 0,1,2 or 2-5 (default: all)."),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """VHR: scale the top heads' outputs by α, baked into the output projection's columns."""
    from compress.config import HeadsReinforceConfig
    from compress.heads.cli import run_reinforce

    run_reinforce(build(HeadsReinforceConfig, model=model, scores=scores, out=out_path, alpha=alpha,
                        top_per_layer=top_per_layer, layers=_int_list(layers, "--layers") if layers else None,
                        overwrite=overwrite, quiet=quiet))


@heads_app.command("probes")
def heads_probes(
    zoo: str = typer.Argument("lm-zoo", help="lm-zoo (recall task probes from its recipe)."),
    out_path: Path = typer.Option(..., "--out", help="Probes file to write (.jsonl)."),
    n: int = typer.Option(64, help="Number of probes."),
    seed: int = typer.Option(7, help="Probe seed (must differ from the recipe's training and evaluation seeds)."),
    quick: bool = typer.Option(False, "--quick", help="The recipe's quick: section (the CPU zoo)."),
    recipe: Optional[Path] = typer.Option(None, help="Zoo recipe (default recipes/zoo/lm-zoo.yml)."),
    overwrite: bool = OVERWRITE,
):
    """Write head-scoring probes (with a context span and an answer) from a zoo recipe, held out from eval."""
    from compress.heads.probes import write_probes
    from compress.io.writer import check_output
    from compress.zoo.lm import recall_probes

    if zoo != "lm-zoo":
        raise CompressError(f"probes for '{zoo}': only lm-zoo (its recall task) has a probe generator")
    check_output(out_path, overwrite, [recipe])
    write_probes(recall_probes(n, seed, quick, recipe), out_path, overwrite)
    print(f"wrote {n} probes to {out_path}")


def _int_list(text: str, flag: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise CompressError(f"{flag} '{text}': give layer numbers like 0,1,2 or 2-5") from None
    return out


@bench_app.command("heads")
def bench_heads(
    zoo: str = typer.Argument("lm-zoo", help="lm-zoo (built by `compress zoo build lm-zoo`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    sparsity: float = typer.Option(0.6, help="Wanda sparsity."),
    top: float = typer.Option(0.1, help="Fraction of heads protected."),
    method: str = typer.Option("chd", help="Head score that chooses the protected heads."),
    seeds: int = typer.Option(5, help="Random-protection baselines (seeds 0..N-1)."),
    n_probes: int = typer.Option(64, help="Probes for the head scores (held-out seed)."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    limit: Optional[int] = typer.Option(None, help="Recall prompts to evaluate (default: all)."),
    quick: bool = typer.Option(False, "--quick", help="The zoo was built with --quick."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Recall model pruned with Wanda: protected top heads vs random heads vs none, same overall sparsity."""
    from compress.bench.heads import run

    require("bench", "compress bench heads", ("matplotlib",))

    run(zoo, zoo_root=zoo_root, results=results, sparsity=sparsity, top=top, method=method, seeds=seeds,
        n_probes=n_probes, nsamples=nsamples, limit=limit, quick=quick, device=resolve_device(device), quiet=quiet)


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Model folder: a zoo task folder, an encoder with --head, or a causal "
                                           "LM for --perplexity."),
    task: Optional[str] = typer.Option(None, help="Classification accuracy on this task (sst2, trec, subj, "
                                                  "agnews, cola, mrpc, sick, emotion), and its official metric "
                                                  "(MCC for cola, F1 for mrpc)."),
    perplexity: Optional[str] = typer.Option(None, help="Perplexity on a text file (.txt, .txt.gz) or a bundled "
                                                        "corpus name (wikitext2.test, ptb.test, shakespeare, ...)."),
    kl_to: Optional[Path] = typer.Option(None, help="KL(reference ‖ MODEL) per token, the reference a causal LM "
                                                    "folder (e.g. the dense model); needs --calib."),
    calib: Optional[str] = typer.Option(None, help="--kl-to: text file or bundled corpus to compare on."),
    recall: Optional[Path] = typer.Option(None, help="Context-recall accuracy and hallucination rate on a recall "
                                                     "jsonl (e.g. checkpoints/zoo/lm-zoo/recall_eval.jsonl)."),
    head: Optional[Path] = typer.Option(None, help="--task: the task folder whose head to use (default: MODEL's)."),
    split: str = typer.Option("test", help="--task: train, dev or test."),
    limit: Optional[int] = typer.Option(None, help="--task: the first N rows of the split."),
    seqlen: int = typer.Option(256, help="--perplexity: tokens per window."),
    max_tokens: Optional[int] = typer.Option(None, help="--perplexity: score the first N tokens only."),
    batch_size: int = typer.Option(64, help="Rows (--task) or windows (--perplexity) per forward pass."),
    dtype: Optional[str] = typer.Option(None, help="Load the model in this dtype (default float32)."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Evaluate a model with exactly one evaluator: --task (accuracy, official metric), --perplexity, --kl-to or
    --recall."""
    cfg = build(EvalConfig, model=model, task=task, perplexity=perplexity, kl_to=kl_to, calib=calib, recall=recall,
                head=head, split=split, limit=limit,
                seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size, dtype=dtype, device=device)
    name = next(n for n in EVALUATOR_RUNNERS if getattr(cfg, n) is not None)
    info, line = EVALUATOR_RUNNERS[name](cfg)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out.print(line)

@app.command()
def prune(
    model: Optional[Path] = typer.Argument(None, help="Model folder to prune, or a prune recipe (.yml); "
                                                      "omitted with --method nps."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of each pruned layer's weights set to zero, "
                                                        "in [0, 1) (the mean over pruned parameters)."),
    method: Optional[str] = typer.Option(None, help=f"{_prune_methods('wanda')}; nps: task-vector "
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
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default min(512, the model's max positions))."),
    seed: Optional[int] = typer.Option(None, help="Seed of the calibration window offsets."),
    targets: Optional[str] = typer.Option(None, help="Regex of linear layers to prune (default: all in the blocks)."),
    ignore: Optional[str] = typer.Option(None, help="Regex of linear layers to leave dense (default: lm_head, "
                                                    "classifier, pooler)."),
    protect: Optional[Path] = typer.Option(None, help="Protect JSON: tensors / row / column ranges kept dense."),
    protect_heads: Optional[Path] = typer.Option(None, help="Head scores file (`compress heads score`): keep its "
                                                           "top heads' q/k/v rows and o_proj columns."),
    protect_top: Optional[float] = typer.Option(None, help="--protect-heads: fraction of heads to protect "
                                                           "(default 0.1)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="--protect-heads: the top fraction of each layer."),
    protect_sparsity: Optional[float] = typer.Option(None, help="Prune the protected slices to this sparsity "
                                                                "instead of keeping them dense."),
    cache_dir: Optional[Path] = typer.Option(None, help="Calibration statistics cache "
                                                        "(default checkpoints/cache/calib)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Folder to write (Hugging Face layout)."),
    sparse_out: Optional[Path] = typer.Option(None, help="Sparse file (values + packed mask; default "
                                                         "OUT.sparse.safetensors)."),
    no_sparse: bool = typer.Option(False, "--no-sparse", help="Do not write the sparse file."),
    eval_perplexity: Optional[str] = typer.Option(None, help="Print dense and pruned perplexity on this text."),
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
    nps_recipe = is_recipe and model.is_file() and "nps" == _recipe_method(model)
    nps_only = dict(base=base, finetuned=finetuned, density=density, task=task, head=head, budget=budget,
                    parts=parts, partition=partition, select=select, optimizer=optimizer, objective=objective, log=log)
    if method == "nps" or nps_recipe:
        from compress.search.cli import nps_prune_command

        require("search", "compress prune --method nps")
        if model is not None and not is_recipe:
            raise CompressError("--method nps prunes a task vector: give --base and --finetuned, not MODEL")
        nps_prune_command(out=out_path, device=device, recipe=model, protect=protect, overwrite=overwrite,
                          quiet=quiet, **nps_only, **_protect_flags(protect_heads, protect_top, per_layer,
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
                 seed=seed, targets=targets, ignore=ignore, protect=protect, cache_dir=cache_dir, out=out_path,
                 **_protect_flags(protect_heads, protect_top, per_layer, protect_sparsity),
                 sparse_out=sparse_out, no_sparse=no_sparse or None, eval_perplexity=eval_perplexity, dtype=dtype,
                 device=device, overwrite=overwrite or None, quiet=quiet or None)
    if model is None:
        raise CompressError("no model: give MODEL (a Hugging Face folder) or a prune recipe")
    if model.suffix in (".yml", ".yaml"):
        cfg = load_prune_recipe(model, **flags)
    else:
        cfg = build(PruneConfig, model=model, **{k: v for k, v in flags.items() if v is not None})
    run_prune(cfg)


# Options that take several values after one flag (`--models A B C`); click wants the flag repeated.
MULTI_VALUE = ("--models", "--weights", "--density", "--alpha", "--tasks", "--heads")


def expand_multi(argv: list[str]) -> list[str]:
    """`--models A B --out X` → `--models A --models B --out X` for the flags in MULTI_VALUE."""
    res, flag = [], None
    for a in argv:
        if a in MULTI_VALUE:
            flag = a
            continue
        if flag is not None and a.startswith("--"):
            flag = None
        if flag is not None and not (a.startswith("-") and not _is_number(a)):
            res += [flag, a]
            continue
        flag = None
        res.append(a)
    return res


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@bench_app.command("merge")
def bench_merge(
    zoo: str = typer.Argument("minilm-8task", help="minilm-8task or lm-zoo (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    dev_limit: Optional[int] = typer.Option(500, help="Dev rows per task for choosing λ (0: all)."),
    test_limit: Optional[int] = typer.Option(None, help="Test rows per task (default: all)."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Zero-shot, individual, average, task arithmetic, TIES and DARE-TIES on the zoo's fine-tuned models."""
    from compress.bench.merge import run

    require("bench", "compress bench merge", ("matplotlib",))

    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), dev_limit=dev_limit or None,
        test_limit=test_limit, quiet=quiet)


@bench_app.command("prune")
def bench_prune(
    zoo: str = typer.Argument("stories260k", help="stories260k or lm-zoo (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Calibration window (default min(512, max positions))."),
    max_tokens: Optional[int] = typer.Option(None, help="Score the first N held-out tokens only (default: all on CUDA, 65536 on a CPU)."),
    k: int = typer.Option(16, help="Strategies in the shared-calibration timing."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Perplexity of magnitude / Wanda / SparseGPT (50%, 2:4, 4:8, 70% ± OWL), shared-calibration time, sizes."""
    from compress.bench.prune import run

    require("bench", "compress bench prune", ("matplotlib",))

    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), nsamples=nsamples, seqlen=seqlen,
        max_tokens=max_tokens, k=k, quiet=quiet)


@bench_app.command("nps")
def bench_nps(
    zoo: str = typer.Argument("minilm-8task", help="minilm-8task (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = typer.Option(Path("checkpoints/bench"), help="Where JSON, markdown and the plot go (results "
                                                                 "already there are kept: runs resume)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (default: all built)."),
    densities: str = typer.Option("0.1,0.05,0.02,0.01,0.005", help="Comma-separated densities."),
    parts: str = typer.Option("compress,merge,cost", help="Which tables: compress, merge, cost."),
    budget: int = typer.Option(120, help="NPS evaluations per search (starts included)."),
    nps_parts: int = typer.Option(8, "--m", help="M, subspaces per task vector."),
    grouping: str = typer.Option("none", help="Part weights per: none, layer or module."),
    objective: str = typer.Option("kl", help="kl, loss or accuracy on the dev rows."),
    select: str = typer.Option("random", help="Compression search: random (DARE generalized per part) or topk "
                                              "(the paper's top-k of the reweighted vector)."),
    merge_select: str = typer.Option("topk", help="Merge search: topk or random."),
    merge_objective: str = typer.Option("accuracy", help="Merge search objective: accuracy (mean dev accuracy, "
                                                         "as λ is chosen for TIES), kl or loss."),
    merge_density: float = typer.Option(0.2, help="Density of each task vector in the NPS merge."),
    merge_grouping: str = typer.Option("layer", help="Merge search: part weights per none, layer or module."),
    merge_parts: int = typer.Option(1, "--merge-m", help="Merge search: M (1 with layer grouping and per_task: "
                                                         "one scale per task and layer)."),
    merge_combine: str = typer.Option("sum", help="Merge search: sum (the paper's) or ties (sign election and "
                                                  "disjoint mean on the searched vectors)."),
    merge_task_weights: str = typer.Option("per_task", help="Merge search: shared part weights or per_task (one "
                                                          "table per task vector, as NPS searches each vector)."),
    merge_budget: int = typer.Option(1800, help="Evaluations of the merge search (the +2 over TIES needed 1800; see README)."),
    cost_budgets: str = typer.Option("30,60,120,240", help="Budgets of the cost sweep."),
    cost_ms: str = typer.Option("2,4,8,16", help="M values of the cost sweep."),
    dev_limit: int = typer.Option(500, help="Dev rows per task for the search (0: all)."),
    test_limit: Optional[int] = typer.Option(None, help="Test rows per task (default: all)."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """NPS against magnitude top-k and DARE (compression), TIES and task arithmetic (merging), and search cost."""
    from compress.bench.nps import run
    from compress.config import NpsSearch

    require("search", "compress bench nps")
    require("bench", "compress bench nps", ("matplotlib",))
    if zoo != "minilm-8task":
        raise CompressError(f"bench nps runs on minilm-8task, not '{zoo}'")
    floats = lambda s, flag: [float(v) for v in _csv(s, flag)]  # noqa: E731
    search = build(NpsSearch, budget=budget, parts=nps_parts, grouping=grouping, objective=objective,
                   dev_limit=dev_limit or None, select=select)
    merge_search = build(NpsSearch, **{**search.model_dump(), "select": merge_select, "objective": merge_objective,
                                       "task_weights": merge_task_weights, "combine": merge_combine,
                                       "grouping": merge_grouping, "parts": merge_parts})
    run(zoo_root, results, device=resolve_device(device), tasks=_csv(tasks, "--tasks") if tasks else None,
        densities=floats(densities, "--densities"), parts=tuple(_csv(parts, "--parts")), search=search,
        merge_search=merge_search,
        merge_density=merge_density, merge_budget=merge_budget,
        cost_budgets=[int(v) for v in floats(cost_budgets, "--cost-budgets")],
        cost_ms=[int(v) for v in floats(cost_ms, "--cost-ms")], dev_limit=dev_limit or None,
        test_limit=test_limit, quiet=quiet)


def _csv(text: str, flag: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise CompressError(f"{flag}: give a comma-separated list")
    for v in items:
        if flag not in ("--tasks", "--parts") and not _is_number(v):
            raise CompressError(f"{flag}: '{v}' is not a number")
    return items


@bench_app.command("unicuco")
def bench_unicuco(
    zoo: str = typer.Argument("lm-zoo", help="lm-zoo (built by `compress zoo build`) or a model folder."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    requests: int = typer.Option(64, help="Sparsity requests, evenly spaced over --sparsity-range."),
    sparsity_range: str = typer.Option("0.3,0.7", help="Range of the requests (and of StratNet)."),
    budget: int = typer.Option(160, help="Evaluations of each per-request search (default: as many as UniCuCo "
                                         "spends in all)."),
    train_budget: int = typer.Option(160, help="UniCuCo's true evaluations in all (design + active rounds)."),
    rounds: int = typer.Option(2, help="UniCuCo active rounds."),
    steps: int = typer.Option(300, help="StratNet Adam steps per round."),
    optimizer: str = typer.Option("cma", help="Per-request search: cma or bayes."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    eval_windows: int = typer.Option(32, help="Held-out windows the KL runs on."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """UniCuCo (StratNet through a GP) against a search per request: total time, KL, sparsity error, Pareto plot."""
    from compress.bench.unicuco import run

    require("search", "compress bench unicuco")
    require("bench", "compress bench unicuco", ("matplotlib",))

    if optimizer not in ("cma", "bayes"):
        raise CompressError(f"--optimizer {optimizer}: choose cma or bayes")
    if requests < 1 or budget < 2 or train_budget < 8:
        raise CompressError("--requests >= 1, --budget >= 2 and --train-budget >= 8")
    lo, hi = _pair(sparsity_range, "--sparsity-range")
    if not 0 < lo < hi < 0.95:
        raise CompressError(f"--sparsity-range {sparsity_range}: need 0 < low < high < 0.95")
    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), requests=requests,
        sparsity_range=(lo, hi), budget=budget, train_budget=train_budget, rounds=rounds, steps=steps,
        optimizer=optimizer, nsamples=nsamples, eval_windows=eval_windows, seed=seed, quiet=quiet)


@bench_app.command("serve")
def bench_serve(
    zoo: str = typer.Argument("stories260k", help="Zoo model under --zoo-root (or a model folder)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    requests: int = typer.Option(200, help="Requests of the load test (and of the batch baseline)."),
    clients: int = typer.Option(8, help="Concurrent client threads of the load test."),
    stratnet: Optional[Path] = typer.Option(None, help="StratNet file (default: checkpoints/serve/<model>.stratnet.pt, "
                                                       "trained when missing)."),
    fault_requests: int = typer.Option(60, help="Requests of the fault test."),
    fault: bool = typer.Option(True, "--fault/--no-fault", help="Run the kill -9 fault test."),
    fault_batch: int = typer.Option(8, help="The fault test server's --max-batch (small, so that jobs wait)."),
    eval_windows: int = typer.Option(0, help="The server's KL windows per request (0: the same work as batch)."),
    timeout: float = typer.Option(600.0, help="Seconds the load test (and each other phase) may take."),
    threads: int = typer.Option(1, help="Torch threads of the server and batch processes."),
    cache_dir: Path = typer.Option(Path("checkpoints/cache/calib"), help="Calibration statistics cache."),
    keep: bool = typer.Option(False, help="Keep the work folder (databases, logs, artifacts) under --results."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """`compress serve` under load (N requests, C clients) and a kill -9, against `compress batch`, in one run."""
    from compress.bench.serve import run

    require("serve", "compress bench serve")
    require("search", "compress bench serve")
    require("bench", "compress bench serve", ("matplotlib",))

    run(zoo, zoo_root=zoo_root, results=results, requests=requests, clients=clients, stratnet=stratnet,
        fault_requests=fault_requests, fault=fault, fault_batch=fault_batch, eval_windows=eval_windows,
        timeout=timeout, threads=threads, device=resolve_device(device), cache_dir=cache_dir, keep=keep,
        quiet=quiet)


@bench_app.command("merge-speed")
def bench_merge_speed(
    params: float = typer.Option(0.5e9, help="Parameters per model (three bf16 Llama checkpoints)."),
    workdir: Path = typer.Option(Path("checkpoints/bench-merge-speed"), help="Models, venv and outputs."),
    results: Path = typer.Option(Path("checkpoints/bench"), help="Where JSON and markdown results go."),
    mergekit: str = typer.Option("mergekit", help="What follows `pip install` to get mergekit (a requirement, or "
                                                             "wheel files and flags offline)."),
    venv: Optional[Path] = typer.Option(None, help="Virtual environment for mergekit (default: WORKDIR/mergekit-venv)."),
    device: str = DEVICE,
):
    """TIES and task arithmetic through `compress merge` and mergekit: wall time, peak RSS, max |difference|."""
    from compress.bench.merge_speed import run

    run(params=params, workdir=workdir, results=results, device=resolve_device(device), mergekit=mergekit,
        venv=venv)


def _exit_on_sigterm() -> None:
    """SIGTERM → SystemExit(143) in the main thread, so the atomic writers' cleanup runs and no temporary is left;
    a second SIGTERM during the cleanup kills at once. A process that handles SIGTERM itself keeps its handler."""
    import signal
    import threading

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("error: terminated by SIGTERM; unfinished outputs are removed", file=sys.stderr)
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input → one line on stderr and exit code 2; never a traceback for the user's mistake."""
    _exit_on_sigterm()
    cmd = typer.main.get_command(app)
    argv = expand_multi(list(sys.argv[1:] if argv is None else argv))
    try:
        rc = cmd.main(args=argv, prog_name="compress", standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer hands a command's Exit(n) back as a value when not standalone
            sys.exit(rc)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:
        e.show()
        sys.exit(e.exit_code)
    except (_Interrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _ABORT:
        print("aborted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
