"""``compress bench io-memory``: peak RSS of task-vector extraction against checkpoint size.

DESIGN principle 1 promises that a pass over checkpoints costs about (inputs + 1) × the largest tensor, not the
model size. This benchmark checks that promise on the real command line:

1. two random checkpoints of ``size_gb`` each — a "base" and a "finetuned" one (base + small noise) — are written
   tensor by tensor as Hugging Face folders with sharded safetensors, through the project's own streaming
   ``ShardedWriter`` inside ``atomic_dir`` (so writing them never holds a whole model). Shapes are those of a
   Llama-like transformer: many [h, h] float32 matrices, two [4h, h] vocabulary matrices (h = 2048 unless the
   checkpoint is too small to hold 10 of the largest tensor). Every tensor is drawn from a generator seeded by
   (seed, tensor name), so the files are the same on every run;
2. each case runs in a fresh subprocess and its peak resident set size is read from the kernel:
   ``/usr/bin/time -v`` ("Maximum resident set size") where it exists, else a tiny runner process that
   ``os.wait4``s that one child (``getrusage(RUSAGE_CHILDREN)`` would be the maximum over *all* children run so
   far, not per case):

   * the imports alone: ``python -c "import compress.cli, torch"`` (what every case pays before any tensor);
   * ``compress extract --density 1.0`` and ``--density 0.1``;
   * ``compress apply`` of the density-1.0 delta;
   * a naive reference: both state dicts loaded whole with ``safetensors.torch.load_file`` and subtracted;
3. a table is printed and ``io_memory.json`` / ``io_memory.md`` are written into ``results``; the scratch folder is
   removed (the results are kept). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

GNU_TIME = "/usr/bin/time"
MB = 10**6

# The naive way to take a task vector: every shard of both checkpoints loaded whole, then subtracted.
NAIVE_SCRIPT = """
import sys
from pathlib import Path
from safetensors.torch import load_file

def load(folder):
    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd

base, ft = load(sys.argv[1]), load(sys.argv[2])
delta = {k: ft[k] - base[k] for k in ft}
print(len(delta), "tensors")
"""

BASELINE_SCRIPT = "import compress.cli, torch"


def _log(msg: str) -> None:
    print(f"[bench io-memory] {msg}", file=sys.stderr, flush=True)


# -- the checkpoints ---------------------------------------------------------------------------------------
def model_spec(size_bytes: int, max_hidden: int = 2048) -> dict:
    """Tensor names and shapes of a Llama-like float32 model of about ``size_bytes`` (never more).

    The largest tensors are the two [4h, h] vocabulary matrices; h is halved from ``max_hidden`` until the
    checkpoint holds at least 10 of them, so small checkpoints still have many tensors.
    """
    h = max_hidden
    while h > 64 and 16 * h * h * 10 > size_bytes:
        h //= 2
    vocab = 4 * h
    per_layer = 4 * (7 * h * h + 2 * h)
    fixed = 4 * (2 * vocab * h + h)
    layers = max(1, (size_bytes - fixed) // per_layer)
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.append((p + "input_layernorm.weight", (h,)))
        tensors += [(p + f"self_attn.{k}_proj.weight", (h, h)) for k in "qkvo"]
        tensors.append((p + "post_attention_layernorm.weight", (h,)))
        tensors += [(p + f"mlp.{k}_proj.weight", (h, h)) for k in ("gate", "up", "down")]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    nbytes = [4 * _numel(s) for _, s in tensors]
    largest = max(range(len(tensors)), key=lambda i: nbytes[i])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": h, "num_hidden_layers": int(layers), "num_attention_heads": max(1, h // 128),
              "num_key_value_heads": max(1, h // 128), "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    return {"tensors": tensors, "hidden_size": h, "layers": int(layers), "total_bytes": sum(nbytes),
            "largest_name": tensors[largest][0], "largest_shape": list(tensors[largest][1]),
            "largest_bytes": nbytes[largest], "config": config}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _draw(shape: tuple[int, ...], seed: int, role: str, name: str) -> torch.Tensor:
    from compress.sparsify.masks import seeded_generator

    return torch.randn(shape, generator=seeded_generator(seed, f"{role}:{name}"), dtype=torch.float32)


def write_pair(base_dir: Path, ft_dir: Path, spec: dict, *, shard_size: int, seed: int = 0,
               noise: float = 1e-3) -> None:
    """Write the base and the fine-tuned checkpoint tensor by tensor (one tensor pair in memory at a time)."""
    from compress.io.writer import ShardedWriter, atomic_dir
    from compress.progress import track

    with atomic_dir(base_dir) as tb, atomic_dir(ft_dir) as tf:
        n = len(spec["tensors"])
        wb, wf = (ShardedWriter(t, shard_size, expected_tensors=n) for t in (tb, tf))
        for name, shape in track(spec["tensors"], "write checkpoints"):
            if len(shape) == 1:  # norm weights sit near 1, as in a trained model
                base = 1.0 + 0.02 * _draw(shape, seed, "base", name)
            else:
                base = 0.02 * _draw(shape, seed, "base", name)
            wb.add(name, base)
            base.add_(_draw(shape, seed, "finetune", name), alpha=noise)
            wf.add(name, base)
            del base
        wb.close(), wf.close()
        for t in (tb, tf):
            (t / "config.json").write_text(json.dumps(spec["config"], indent=2) + "\n")


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- measuring one subprocess ------------------------------------------------------------------------------
_MAXRSS_RE = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


# The fallback when GNU time is missing: a bare interpreter that runs the case and reports the case's own rusage.
# It must be a small process of its own: on Linux a child's ru_maxrss starts from the high-water RSS of the process
# it was forked (or vforked) from, so waiting on the case straight from this process (which has torch imported)
# would report at least this process's size. Forked from this runner, the floor is the runner's few MB.
WAIT4_RUNNER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
p.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(p.returncode if p.returncode >= 0 else 128 - p.returncode)
"""


def measure(argv: list[str], *, env: dict[str, str] | None = None, use_gnu_time: bool | None = None) -> dict:
    """Run ``argv`` in a fresh process; return its peak RSS in bytes, wall seconds and how RSS was read.

    ``use_gnu_time=None`` picks ``/usr/bin/time -v`` when it is installed, else a tiny Python runner that
    ``os.wait4``s the case (its rusage is that one process's, unlike ``getrusage(RUSAGE_CHILDREN)``, which is the
    largest of all children so far). Both fork the case from a small process, so the case's ru_maxrss is its own.
    """
    if use_gnu_time is None:
        use_gnu_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as d:
        out_f, err_f, rss_f = (Path(d) / n for n in ("stdout", "stderr", "rss"))
        if use_gnu_time:
            cmd = [GNU_TIME, "-v", "-o", str(rss_f), *argv]
        else:
            cmd = [sys.executable, "-I", "-S", "-c", WAIT4_RUNNER, str(rss_f), *argv]
        with open(out_f, "wb") as o, open(err_f, "wb") as e:
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, stdout=o, stderr=e, env=env).returncode
            seconds = time.perf_counter() - t0
        stdout, stderr = out_f.read_text(errors="replace"), err_f.read_text(errors="replace")
        report = rss_f.read_text(errors="replace") if rss_f.exists() else ""
    if rc != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark case failed (exit {rc}): {' '.join(argv)}\n{tail}")
    if use_gnu_time:
        m = _MAXRSS_RE.search(report)
        if not m:
            raise RuntimeError(f"{GNU_TIME} -v printed no 'Maximum resident set size' line:\n{report}")
        maxrss_kib = int(m.group(1))
    else:
        maxrss_kib = int(report)  # Linux reports ru_maxrss in KiB
    return {"peak_rss_bytes": maxrss_kib * 1024, "seconds": seconds,
            "rss_method": "gnu-time" if use_gnu_time else "wait4-runner", "stdout": stdout.strip()}


@contextmanager
def scratch_dir(workdir: Path) -> Iterator[Path]:
    """A fresh folder inside ``workdir``, removed afterwards with ``workdir`` itself when this made it."""
    made = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made:
            try:
                workdir.rmdir()
            except OSError:
                pass


# -- the benchmark -----------------------------------------------------------------------------------------
def run(size_gb: float = 1.0, workdir: str | os.PathLike = "checkpoints/bench-io-memory",
        results: str | os.PathLike = "checkpoints/bench", *, seed: int = 0, shard_size: int | None = None,
        max_hidden: int = 2048, use_gnu_time: bool | None = None, print_table: bool = True) -> dict:
    """Run the benchmark; returns what it saved to ``results/io_memory.json``.

    ``max_hidden`` caps the hidden size h (largest tensors [4h, h]); a smaller cap gives more, smaller tensors.
    """
    if not size_gb > 0:
        from compress.errors import CompressError

        raise CompressError(f"--size-gb must be positive, got {size_gb}")
    workdir, results = Path(workdir), Path(results)
    size_bytes = int(size_gb * 10**9)
    spec = model_spec(size_bytes, max_hidden)
    if shard_size is None:  # at least two shards, so the sharded index path is what gets read
        shard_size = max(spec["largest_bytes"], min(500 * MB, spec["total_bytes"] // 2))

    load_start = os.getloadavg()
    env = {**os.environ, "COMPRESS_QUIET": "1"}
    py = sys.executable
    with scratch_dir(workdir) as scratch:
        base, ft = scratch / "base", scratch / "finetuned"
        d1, d01, rec = scratch / "d1.safetensors", scratch / "d01.safetensors", scratch / "rec"
        _log(f"writing two checkpoints of {spec['total_bytes'] / MB:.1f} MB each ({len(spec['tensors'])} tensors, "
             f"hidden {spec['hidden_size']}, {spec['layers']} layers, shards of {shard_size / MB:.0f} MB) "
             f"into {scratch}")
        t0 = time.perf_counter()
        write_pair(base, ft, spec, shard_size=shard_size, seed=seed)
        write_seconds = time.perf_counter() - t0
        shards = len(list(base.glob("*.safetensors")))

        cli = [py, "-m", "compress.cli"]
        plan = [
            ("baseline", "imports only", [py, "-c", BASELINE_SCRIPT], None),
            ("extract_d1", "extract density 1.0",
             cli + ["extract", "--base", str(base), "--finetuned", str(ft), "--density", "1.0", "--out", str(d1),
                    "--quiet"], d1),
            ("extract_d0.1", "extract density 0.1",
             cli + ["extract", "--base", str(base), "--finetuned", str(ft), "--density", "0.1", "--out", str(d01),
                    "--quiet"], d01),
            ("apply", "apply density-1.0 delta",
             cli + ["apply", "--base", str(base), "--delta", str(d1), "--out", str(rec), "--quiet"], rec),
            ("naive", "naive load_file + subtract", [py, "-c", NAIVE_SCRIPT, str(base), str(ft)], None),
        ]
        rows = []
        for key, label, argv, output in plan:
            _log(f"measuring {label} ...")
            m = measure(argv, env=env, use_gnu_time=use_gnu_time)
            _log(f"  {label}: peak RSS {m['peak_rss_bytes'] / MB:.1f} MB in {m['seconds']:.1f} s")
            shown = [a if a not in (py,) else "python" for a in argv]
            if key == "naive":
                shown = ["python", "-c", "<load_file both, subtract>", *argv[3:]]
            rows.append({"key": key, "case": label, "command": shlex.join(shown), **m,
                         "output_bytes": _folder_bytes(output) if output is not None else None})

    size = spec["total_bytes"]
    baseline = rows[0]["peak_rss_bytes"]
    for r in rows:
        r.pop("stdout", None)
        r["peak_rss_mb"] = r["peak_rss_bytes"] / MB
        r["ratio_rss_to_checkpoint"] = r["peak_rss_bytes"] / size
        r["over_baseline_bytes"] = r["peak_rss_bytes"] - baseline
        r["over_baseline_in_largest_tensors"] = (r["peak_rss_bytes"] - baseline) / spec["largest_bytes"]
    report = {
        "benchmark": "io-memory",
        "size_gb_requested": size_gb,
        "checkpoint_bytes": size,
        "checkpoint_tensors": len(spec["tensors"]),
        "hidden_size": spec["hidden_size"],
        "layers": spec["layers"],
        "largest_tensor": {"name": spec["largest_name"], "shape": spec["largest_shape"],
                           "bytes": spec["largest_bytes"]},
        "largest_tensor_bytes": spec["largest_bytes"],
        "shard_size_bytes": shard_size,
        "shards_per_checkpoint": shards,
        "seed": seed,
        "write_seconds": write_seconds,
        "rss_method": rows[0]["rss_method"],
        "baseline": rows[0],
        "cases": rows[1:],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_1min_start": load_start[0], "loadavg_1min_end": os.getloadavg()[0]},
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "io_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "io_memory.md").write_text(markdown(report))
    _log(f"wrote {results / 'io_memory.json'} and {results / 'io_memory.md'}")
    if print_table:
        from rich.console import Console

        Console().print(rich_table(report))
    return report


# -- reporting ---------------------------------------------------------------------------------------------
COLUMNS = ("case", "peak RSS MB", "checkpoint size MB", "ratio RSS/size", "seconds", "over imports MB",
           "over imports / largest tensor")
SHORT = ("case", "peak RSS MB", "ckpt MB", "RSS/size", "s", "+imports MB", "/largest")


def _cells(report: dict) -> list[list[str]]:
    size = report["checkpoint_bytes"]
    return [[r["case"], f"{r['peak_rss_bytes'] / MB:.1f}", f"{size / MB:.1f}", f"{r['ratio_rss_to_checkpoint']:.3f}",
             f"{r['seconds']:.1f}", f"{r['over_baseline_bytes'] / MB:.1f}",
             f"{r['over_baseline_in_largest_tensors']:.1f}"]
            for r in [report["baseline"], *report["cases"]]]


def _caption(report: dict) -> str:
    lt = report["largest_tensor"]
    return (f"two float32 checkpoints of {report['checkpoint_bytes'] / MB:.1f} MB each, "
            f"{report['checkpoint_tensors']} tensors in {report['shards_per_checkpoint']} shards; largest tensor "
            f"{lt['name']} {lt['shape']} = {lt['bytes'] / MB:.1f} MB; peak RSS via {report['rss_method']}")


def rich_table(report: dict):
    from rich.table import Table

    t = Table(title="compress bench io-memory", caption=_caption(report))
    for i, c in enumerate(SHORT):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in _cells(report):
        t.add_row(*row)
    return t


def markdown(report: dict) -> str:
    lines = ["# compress bench io-memory", "",
             "Peak resident set size of each case, each run in a fresh process, against the size of one "
             "checkpoint.", "", _caption(report) + ".", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _cells(report)]
    lines += ["", "Commands:", ""]
    lines += [f"- {r['case']}: `{r['command']}`" for r in [report["baseline"], *report["cases"]]]
    m = report["machine"]
    lines += ["", f"Python {m['python']}, torch {m['torch']}, {m['cpus']} CPUs, {m['platform']}; 1-minute load "
              f"average {m['loadavg_1min_start']:.1f} at the start, {m['loadavg_1min_end']:.1f} at the end (seconds "
              "depend on it, peak RSS does not).", ""]
    return "\n".join(lines)
