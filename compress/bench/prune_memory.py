"""``compress bench prune-memory``: peak RSS of `compress prune` (block by block) against the model's weight bytes.

A random Llama of about ``params`` parameters (float32, GQA, stories260K's real 512-token tokenizer) is written
tensor by tensor, then each case runs in a fresh process and its peak resident set size is read from the kernel
(``compress.bench.io_memory.measure``: ``/usr/bin/time -v`` or a small ``wait4`` runner):

* the imports alone (what every pruning process pays before it reads a weight);
* the fixed cost: the same command on a model of the same width with 2 blocks (tokenizer, calibration text, the
  kernels' code pages, one block's working memory);
* `compress prune MODEL --method M --sparsity 0.5 --nsamples N --seqlen T --calibration C --out DIR --no-sparse`
  for each method and calibration mode asked for;
* with ``eval_tokens``, the first of those with `--eval-perplexity` on the first ``eval_tokens`` tokens of the
  calibration text too (dense and pruned perplexity, each model run block by block from its folder);
* with ``sparse``, the first of those writing the sparse file too (in the same pass).

The target (issue 19) is a peak below the imports plus half the weight bytes: the model is never held, only the
embeddings, one block and its statistics. What grows with the model is the peak over the fixed cost, also
reported against half the weights (on a small model the fixed cost alone can exceed half its weights).
``prune_memory.json`` and ``prune_memory.md`` go to ``results``; the scratch folder is removed.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from compress.bench.io_memory import measure, scratch_dir

MB = 10**6
VOCAB = 512  # stories260K's tokenizer
IMPORTS = ("import compress.cli, torch, transformers, tokenizers; from compress.prune import pruner; "
           "from compress.io import blocks; import transformers.models.llama.modeling_llama")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_config(params: float, hidden: int | None = None):
    """A Llama config (hidden h, GQA with 4 query heads per KV head, intermediate ≈ 2.75 h) of about ``params``."""
    from transformers import LlamaConfig

    h = hidden or (1024 if params >= 1e8 else 512 if params >= 5e6 else 128)
    inter = max(64, round(2.75 * h / 64) * 64)
    per_block = 2.5 * h * h + 3 * h * inter
    layers = max(2, round((params - 2 * VOCAB * h) / per_block))
    heads = h // 64
    return LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=512,
                       tie_word_embeddings=False)


def write_model(path: Path, cfg, tokenizer_dir: Path, seed: int = 0) -> int:
    """Write a random float32 Llama of ``cfg`` to ``path`` one tensor at a time; returns its weight bytes."""
    from transformers import LlamaForCausalLM

    from compress.io.blocks import parameters_on_meta
    from compress.io.writer import write_folder

    with parameters_on_meta():
        skeleton = LlamaForCausalLM(cfg)
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]

    def tensors():
        for i, (name, shape) in enumerate(shapes):
            if len(shape) == 1:
                yield name, torch.ones(shape)
            else:
                g = torch.Generator().manual_seed(seed * 100_003 + i)
                yield name, torch.randn(shape, generator=g) / shape[-1] ** 0.5

    cfg.architectures = ["LlamaForCausalLM"]  # a causal LM, LM head included, as --eval-perplexity needs
    files = {"config.json": cfg.to_json_string()}
    for f in ("tokenizer.json", "tokenizer_config.json"):
        files[f] = (tokenizer_dir / f).read_bytes()
    write_folder(path, tensors(), expected_tensors=len(shapes), files=files)
    return sum(4 * torch.Size(s).numel() for _, s in shapes)


def run(params: float = 3e8, workdir: str | os.PathLike = "checkpoints/bench-prune-memory",
        results: str | os.PathLike = "checkpoints/bench", *, methods: tuple[str, ...] = ("wanda",),
        calibrations: tuple[str, ...] = ("sequential", "shared"), nsamples: int = 8, seqlen: int = 128,
        hidden: int | None = None, calib: str = "wikitext2.valid", imports: bool = True,
        eval_tokens: int | None = 4096, sparse: bool = True, use_gnu_time: bool | None = None,
        print_table: bool = True) -> dict:
    """Run the benchmark; returns what it saved to ``results/prune_memory.json``. ``imports=False`` skips the
    imports-alone case (and the target built on it); ``eval_tokens=None`` the --eval-perplexity case; ``sparse=False``
    the sparse-file case."""
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    workdir, results = Path(workdir), Path(results)
    env = {**os.environ, "COMPRESS_QUIET": "1"}
    py = sys.executable
    load_start = os.getloadavg()
    cfg = llama_config(params, hidden)
    small_cfg = llama_config(0, cfg.hidden_size)
    small_cfg.num_hidden_layers = 2

    def prune_argv(model_dir: Path, out: Path, method: str, calibration: str, extra: tuple = ("--no-sparse",)
                   ) -> list[str]:
        return [py, "-m", "compress.cli", "prune", str(model_dir), "--method", method, "--sparsity", "0.5",
                "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                "--calibration", calibration, "--out", str(out), *extra, "--quiet"]

    with scratch_dir(workdir) as scratch:
        stories = scratch / "stories"
        convert_llama2c(*stories260k_files(), stories)
        model, small = scratch / "model", scratch / "small"
        t0 = time.perf_counter()
        weight_bytes = write_model(model, cfg, stories)
        write_model(small, small_cfg, stories)
        _log(f"wrote a random Llama of {weight_bytes / 4 / 1e6:.1f} M parameters ({weight_bytes / MB:.0f} MB, "
             f"{cfg.num_hidden_layers} blocks of hidden {cfg.hidden_size}) in {time.perf_counter() - t0:.1f} s")
        base = measure([py, "-c", IMPORTS], env=env, use_gnu_time=use_gnu_time) if imports else None
        if base is not None:
            _log(f"imports alone: peak RSS {base['peak_rss_bytes'] / MB:.1f} MB")
        fixed = measure(prune_argv(small, scratch / "out-small", methods[0], calibrations[0]), env=env,
                        use_gnu_time=use_gnu_time)
        _log(f"fixed cost (2 blocks): peak RSS {fixed['peak_rss_bytes'] / MB:.1f} MB")
        cases = [(method, calibration, "", ("--no-sparse",)) for method in methods for calibration in calibrations]
        if sparse:
            cases.append((methods[0], calibrations[0], "sparse file", ()))
        if eval_tokens:
            cases.append((methods[0], calibrations[0], "eval perplexity",
                          ("--no-sparse", "--eval-perplexity", calib, "--eval-max-tokens", str(eval_tokens))))
        rows = []
        for method, calibration, also, extra in cases:
            out = scratch / f"out-{method}-{calibration}-{also.replace(' ', '-')}"
            argv = prune_argv(model, out, method, calibration, extra)
            m = measure(argv, env=env, use_gnu_time=use_gnu_time)
            _log(f"{method} {calibration} {also}: peak RSS {m['peak_rss_bytes'] / MB:.1f} MB in "
                 f"{m['seconds']:.1f} s")
            shown = ["python" if a == py else a for a in argv]
            row = {"method": method, "calibration": calibration, "also": also, "command": shlex.join(shown),
                   "peak_rss_bytes": m["peak_rss_bytes"], "seconds": m["seconds"],
                   "over_fixed_bytes": m["peak_rss_bytes"] - fixed["peak_rss_bytes"]}
            if base is not None:
                row["over_imports_bytes"] = m["peak_rss_bytes"] - base["peak_rss_bytes"]
                row["over_imports_per_weight_byte"] = row["over_imports_bytes"] / weight_bytes
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            Path(f"{out}.sparse.safetensors").unlink(missing_ok=True)
    target = base["peak_rss_bytes"] + weight_bytes // 2 if base is not None else None
    for r in rows:
        if target is not None:
            r["below_target"] = r["peak_rss_bytes"] < target
        r["over_fixed_below_half_weights"] = r["over_fixed_bytes"] < weight_bytes // 2
    report = {
        "benchmark": "prune-memory", "params": weight_bytes // 4, "weight_bytes": weight_bytes,
        "config": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                   "blocks": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                   "kv_heads": cfg.num_key_value_heads, "vocab": VOCAB, "dtype": "float32"},
        "calibration_windows": {"nsamples": nsamples, "seqlen": seqlen, "calib": calib},
        "imports_peak_rss_bytes": base["peak_rss_bytes"] if base is not None else None,
        "imports_command": f"python -c {shlex.quote(IMPORTS)}" if base is not None else None,
        "fixed_peak_rss_bytes": fixed["peak_rss_bytes"], "fixed_blocks": small_cfg.num_hidden_layers,
        "target_bytes": target, "rss_method": fixed["rss_method"], "cases": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_1min_start": load_start[0],
                    "loadavg_1min_end": os.getloadavg()[0]},
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "prune_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "prune_memory.md").write_text(markdown(report))
    _log(f"wrote {results / 'prune_memory.json'} and {results / 'prune_memory.md'}")
    if print_table:
        print(markdown(report))
    return report


def markdown(report: dict) -> str:
    c = report["config"]
    lines = ["# compress bench prune-memory", "",
             f"`compress prune` of a random float32 Llama of {report['params'] / 1e6:.1f} M parameters "
             f"({report['weight_bytes'] / MB:.0f} MB of weights; {c['blocks']} blocks, hidden {c['hidden_size']}, "
             f"intermediate {c['intermediate_size']}, {c['heads']} heads / {c['kv_heads']} KV heads) on the CPU, "
             f"{report['calibration_windows']['nsamples']} windows of {report['calibration_windows']['seqlen']} "
             f"tokens of {report['calibration_windows']['calib']}; each case in a fresh process, peak RSS via "
             f"{report['rss_method']}.", ""]
    if report["target_bytes"] is not None:
        lines += [f"Imports alone: {report['imports_peak_rss_bytes'] / MB:.1f} MB. Target: below the imports plus "
                  f"half the weights = {report['target_bytes'] / MB:.1f} MB.", ""]
    lines += [f"Fixed cost (the same pruning of a {report['fixed_blocks']}-block model of this width): "
              f"{report['fixed_peak_rss_bytes'] / MB:.1f} MB; half the weights: {report['weight_bytes'] / 2 / MB:.1f} "
              "MB.", "",
              "| method | calibration | also | peak RSS MB | over imports MB | over imports / weight bytes | "
              "over fixed MB | seconds | below target |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["cases"]:
        imp = (f"{r['over_imports_bytes'] / MB:.1f} | {r['over_imports_per_weight_byte']:.3f}"
               if "over_imports_bytes" in r else "– | –")
        below = {True: "yes", False: "no"}.get(r.get("below_target"), "–")
        lines.append(f"| {r['method']} | {r['calibration']} | {r.get('also') or '–'} | "
                     f"{r['peak_rss_bytes'] / MB:.1f} | {imp} | {r['over_fixed_bytes'] / MB:.1f} | "
                     f"{r['seconds']:.1f} | {below} |")
    m = report["machine"]
    lines += ["", f"Python {m['python']}, torch {m['torch']}, {m['cpus']} CPUs; 1-minute load average "
              f"{m['loadavg_1min_start']:.1f} at the start, {m['loadavg_1min_end']:.1f} at the end.", ""]
    return "\n".join(lines)
