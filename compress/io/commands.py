"""`compress extract|apply|inspect|extract-lora|convert-llama2c`: options parsed into configs, then ``compress.io``
and ``compress.delta`` do the work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from compress.config import ApplyConfig, ExtractConfig, ExtractLoraConfig, build
from compress.errors import CompressError
from compress.options import DEVICE, OVERWRITE, QUIET, SHARD_SIZE, human, out
from compress.runtime import resolve_device, torch_dtype


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
              f"(density {s.kept / max(s.params, 1):.4f}), {human(s.file_bytes)}, "
              f"{s.bits_per_param:.3f} bits/parameter" + (f", {s.carried} carried whole" if s.carried else "") +
              f"; in {s.seconds:.1f} s ({s.gb_per_s:.2f} GB/s read)")


def apply_cmd(
    base: Optional[Path] = typer.Option(None, help="Base checkpoint the delta was extracted from (not needed for a "
                                                   "sparse weight file written by `compress prune`)."),
    delta: Path = typer.Option(..., help="Compact delta file (`compress extract`) or sparse weight file "
                                         "(`compress prune`)."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write (Hugging Face layout)."),
    dtype: Optional[str] = typer.Option(None, help="Cast float tensors of the output (default: as stored)."),
    shard_size: str = SHARD_SIZE,
    config_from: Optional[Path] = typer.Option(None, help="Folder to copy config, generation config and "
                                                          "tokenizer from (default: the base folder)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """Rebuild a model from a base and a delta file (exact at every kept entry), or from a sparse weight file."""
    from compress.delta import apply_delta
    from compress.io.deltafile import DeltaFile
    from compress.io.files import read_model_config
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
    start = time.perf_counter()
    delta_file = DeltaFile(cfg.delta)
    read = os.path.getsize(cfg.delta)
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
        read += sum(base_ck.info(n).nbytes for n in base_ck.names()
                    if delta_file.table.get(n, {}).get("encoding") != "full")
    seconds = time.perf_counter() - start
    out.print(f"wrote {cfg.out} in {seconds:.1f} s ({read / 1e9 / max(seconds, 1e-9):.2f} GB/s read)")


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
    s.add_row("file size", f"{info['file_bytes']:,} B ({human(info['file_bytes'])})")
    if "dense_bytes" in info:
        s.add_row("dense size", f"{info['dense_bytes']:,} B ({human(info['dense_bytes'])})")
    if "bits_per_param" in info:
        s.add_row("bits / parameter", f"{info['bits_per_param']:.3f}")
    if "compression" in info:
        s.add_row("dense / file", f"{info['compression']:.2f}x")
    if "file_vs_dense" in info:
        s.add_row("file / dense", f"{100 * info['file_vs_dense']:.1f}%")
        s.add_row("pruned tensors", f"{info['pruned_tensors']}: {human(info['pruned_file_bytes'])} stored, "
                                    f"{human(info['pruned_dense_bytes'])} dense "
                                    f"({100 * info['pruned_file_vs_dense']:.1f}%)")
    for k in ("peft_type", "r", "lora_alpha", "base_model"):
        if k in info:
            s.add_row(k, str(info[k]))
    for k, v in info.get("metadata", {}).items():
        s.add_row(f"meta {k}", str(v))
    out.print(s)


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
                           total=len(names), progress=not cfg.quiet,
                           shapes={n: tuple(tv.info(n).shape) for n in names})
    worst = max((c["rel_error"] for c in s["covered"].values()), default=0.0)
    out.print(f"wrote {cfg.out}: rank {s['r']}, {len(s['covered'])} matrices ({s['covered_params']:,} parameters "
              f"of task vector) as {s['lora_params']:,} LoRA parameters; worst relative error {worst:.4g}; "
              f"skipped {len(s['skipped'])} tensors ({s['skipped_params']:,} parameters: biases, norms, embeddings)")


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


def register(app: typer.Typer) -> None:
    app.command()(extract)
    app.command("apply")(apply_cmd)
    app.command()(inspect)
    app.command("extract-lora")(extract_lora)
    app.command("convert-llama2c")(convert_llama2c_cmd)
