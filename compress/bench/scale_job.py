"""One job of ``compress bench scale``, in a process of its own so that its peaks are its own:
``python -m compress.bench.scale_job compress|mergekit|llmcompressor ARGS...``.

The job runs in-process (``python -m compress.cli``, mergekit-yaml, or llm-compressor's ``oneshot``); the
last stdout line is ``{"scale_job": {...}}`` with the seconds of the call itself (imports excluded), peak GPU
memory (``torch.cuda.max_memory_allocated``/``reserved``), ``ru_maxrss`` and VmHWM (this process's own peak RSS;
ru_maxrss can carry the high-water mark of the process that forked it)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _as_main(module: str, argv: list[str]) -> None:
    """``python -m MODULE ARGV`` inside this process (so the peaks measured here are the job's): the CLI's public
    entry point, as the other benchmarks call it in a subprocess, and no import of the layer above."""
    import runpy

    saved, fast = sys.argv, os.environ.get("COMPRESS_FAST_EXIT")
    sys.argv = [module, *argv]
    os.environ["COMPRESS_FAST_EXIT"] = "0"  # this process measures and reports after the job
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
        if fast is None:
            os.environ.pop("COMPRESS_FAST_EXIT", None)
        else:
            os.environ["COMPRESS_FAST_EXIT"] = fast


def _compress(argv: list[str]) -> None:
    _as_main("compress.cli", argv)


def _mergekit(argv: list[str]) -> None:
    _as_main("mergekit.scripts.run_yaml", argv)


def _llmcompressor(argv: list[str]) -> None:
    """oneshot Wanda or SparseGPT on the calibration windows `compress prune` draws (same text, count, length)."""
    p = argparse.ArgumentParser(prog="scale_job llmcompressor")
    p.add_argument("model")
    p.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--calib", default="wikitext2.valid", help="a bundled corpus or a text file")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import corpus_path, read_text
    from compress.prune.calib import calibration_windows

    tok = AutoTokenizer.from_pretrained(a.model)
    text = read_text(a.calib if Path(a.calib).is_file() else corpus_path(a.calib))
    windows = calibration_windows(tok, text, a.nsamples, a.seqlen)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    cls = WandaPruningModifier if a.method == "wanda" else SparseGPTModifier
    recipe = cls(sparsity=a.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["lm_head"])
    oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe, num_calibration_samples=a.nsamples,
            max_seq_length=a.seqlen, pipeline="sequential", output_dir=a.out)


JOBS = {"compress": _compress, "mergekit": _mergekit, "llmcompressor": _llmcompressor}


def execute(tool: str, argv: list[str]) -> dict:
    """Run one job in this process; its seconds, exit code and peaks (GPU peaks reset first)."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rc = 0
    t0 = time.perf_counter()
    try:
        JOBS[tool](argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    seconds = time.perf_counter() - t0
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"tool": tool, "rc": rc, "seconds": seconds,
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "vm_hwm_bytes": _vm_hwm()}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOBS:
        print(f"usage: python -m compress.bench.scale_job {{{','.join(JOBS)}}} ARGS...", file=sys.stderr)
        sys.exit(2)
    report = execute(argv[0], argv[1:])
    sys.stdout.flush()
    print(json.dumps({"scale_job": report}), flush=True)
    sys.exit(report["rc"])


if __name__ == "__main__":
    main()
