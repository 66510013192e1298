"""``compress bench write-once``: the bytes each writer passes to write(2), against the bytes of what it writes.

A safetensors file starts with its header, which names every tensor's offsets; a writer that streams tensors
either reserves room for the header (and writes each byte once) or writes the data to a side file and copies it
behind the header at the end (each byte twice). This benchmark measures which one each writer does:

1. a random Llama-shaped float32 base and fine-tuned checkpoint of ``size_gb`` each (``io_memory.write_pair``),
   a density-1.0 delta between them (``compress extract``) and a 50%-pruned copy of the fine-tuned one;
2. each writer runs in a fresh process that reads ``/proc/self/io`` just before and after it: ``compress apply``
   (a model folder), ``compress extract --density 0.1`` (a delta file), ``write_sparse`` (a sparse file) and
   ``compress extract-lora`` (an adapter). ``wchar`` (bytes passed to write(2) by any thread, whatever the
   filesystem) and ``write_bytes - cancelled_write_bytes`` (bytes sent to storage; a side file deleted before
   writeback is cancelled) are each divided by the size of the output;
3. with ``before`` (a git revision of this checkout, or a folder holding an older ``compress`` package), the same
   cases run with that code too, so the table shows before and after on the same files.

Results go to ``results/write_once.json`` and ``.md``; the scratch folder is removed.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from compress.errors import CompressError

MB = 10**6

# Runs one CLI command and reports what this process wrote while it ran (imports excluded).
IO_RUNNER = """
import json, sys

def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}

start = io()
import compress
from compress.cli import main
code = 0
try:
    if sys.argv[2] == "--python":  # a library call no command makes on its own (the sparse file)
        exec(sys.argv[3])
    else:
        main(sys.argv[2:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
end = io()
with open(sys.argv[1], "w") as f:
    json.dump({"io": {k: end[k] - start[k] for k in end}, "compress": compress.__file__}, f)
sys.exit(code)
"""


def _log(msg: str) -> None:
    print(f"[bench write-once] {msg}", file=sys.stderr, flush=True)


def source_tree() -> Path:
    """The folder holding the ``compress`` package this process runs."""
    import compress

    return Path(compress.__file__).resolve().parent.parent


def checkout(before: str, dest: Path) -> Path:
    """A folder holding the ``compress`` package of ``before``: that folder itself when it holds one, else the
    revision ``before`` of the git checkout this package lives in (``git archive``)."""
    if (Path(before) / "compress" / "cli.py").is_file():
        return Path(before)
    root = source_tree()
    r = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", before, "compress"], capture_output=True)
    if r.returncode != 0:
        msg = (r.stderr.decode(errors="replace").strip().splitlines() or ["git archive failed"])[-1]
        raise CompressError(f"--before {before}: neither a folder holding compress/ nor a revision of {root} "
                            f"({msg})")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def measure_io(argv: list[str], tree: Path, env: dict[str, str]) -> dict:
    """Run ``compress ARGV`` with the package of ``tree``; what it wrote (``/proc/self/io`` deltas), wall
    seconds, and the ``compress/__init__.py`` it imported."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as d:
        report = Path(d) / "io.json"
        t0 = time.perf_counter()
        # -P: the working folder is not put first on sys.path, so PYTHONPATH decides which compress runs
        r = subprocess.run([sys.executable, "-P", "-c", IO_RUNNER, str(report), *argv], env=env, capture_output=True,
                           text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0 or not report.is_file():
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark case failed (exit {r.returncode}): compress {' '.join(argv)}\n{tail}")
        got = json.loads(report.read_text())
    imported = Path(got["compress"]).resolve()
    if not imported.is_relative_to(tree.resolve()):
        raise RuntimeError(f"the case imported {imported}, not the package in {tree}")
    return {**got["io"], "seconds": seconds, "compress": str(imported)}


def write_pruned(src: Path, out: Path) -> None:
    """``src`` with the smaller half (by magnitude) of every matrix set to zero: the input of a sparse file."""
    from compress.io.reader import open_checkpoint
    from compress.io.writer import write_folder

    with open_checkpoint(src) as ck:
        def tensors():
            for name in ck.names():
                t = ck.get(name)
                if t.dim() == 2:
                    t[t.abs() < t.abs().median()] = 0
                yield name, t

        write_folder(out, tensors(), expected_tensors=len(ck), aux_from=ck.root)


def cases(base: Path, ft: Path, delta: Path, pruned: Path, shard_size: str) -> dict:
    """{command: argv for an output path}: every writer of a model, a delta, a sparse file or an adapter."""
    sparse = "from compress.io.sparse import write_sparse; write_sparse({!r}, {!r}, quiet=True)"
    return {
        "apply": lambda out: ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out),
                              "--shard-size", shard_size, "--quiet"],
        "extract": lambda out: ["extract", "--base", str(base), "--finetuned", str(ft), "--density", "0.1",
                                "--out", str(out), "--quiet"],
        "sparse file": lambda out: ["--python", sparse.format(str(pruned), str(out))],
        "extract-lora": lambda out: ["extract-lora", "--base", str(base), "--finetuned", str(ft), "--rank", "8",
                                     "--out", str(out), "--quiet"],
    }


def _folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(size_gb: float = 1.0, workdir: str | os.PathLike = "checkpoints/bench-write-once",
        results: str | os.PathLike = "checkpoints/bench", *, before: Optional[str] = None, seed: int = 0,
        max_hidden: int = 2048, shard_size: str = "5GB", publish_results: bool = True) -> dict:
    """Run the benchmark; returns what it saved to ``results/write_once.json``."""
    import torch

    from compress.bench import publish, save_results
    from compress.bench.io_memory import model_spec, scratch_dir, write_pair

    if not size_gb > 0:
        raise CompressError(f"--size-gb must be positive, got {size_gb}")
    workdir, results = Path(workdir), Path(results)
    spec = model_spec(int(size_gb * 10**9), max_hidden)
    env = {**os.environ, "COMPRESS_QUIET": "1"}
    after_tree = source_tree()
    with scratch_dir(workdir) as scratch:
        trees = [("after", "this checkout", after_tree)]
        if before is not None:
            trees.insert(0, ("before", before, checkout(before, scratch / "before-src")))
        base, ft, delta = scratch / "base", scratch / "finetuned", scratch / "delta.safetensors"
        input_shard = max(spec["largest_bytes"], spec["total_bytes"] // 2)
        _log(f"writing two float32 checkpoints of {spec['total_bytes'] / MB:.1f} MB each "
             f"({len(spec['tensors'])} tensors) into {scratch}")
        write_pair(base, ft, spec, shard_size=input_shard, seed=seed)
        pruned = scratch / "pruned"
        write_pruned(ft, pruned)
        _log("extracting a density-1.0 delta ...")
        measure_io(["extract", "--base", str(base), "--finetuned", str(ft), "--density", "1.0", "--out",
                    str(delta), "--quiet"], after_tree, env)
        rows = []
        for key, source, tree in trees:
            for command, make in cases(base, ft, delta, pruned, shard_size).items():
                out = scratch / f"{command.replace(' ', '-')}-{key}"
                os.sync()  # earlier runs' dirty pages are written back before this one is counted
                _log(f"measuring {command} ({key}: {source}) ...")
                m = measure_io(make(out), tree, env)
                size = _folder_bytes(out)
                storage = m["write_bytes"] - m["cancelled_write_bytes"]
                rows.append({"key": key, "code": source, "command": command, "compress": m["compress"],
                             "output_bytes": size, "shards": len(list(out.glob("*.safetensors"))) if out.is_dir()
                             else 1, "wchar": m["wchar"], "write_bytes": m["write_bytes"],
                             "cancelled_write_bytes": m["cancelled_write_bytes"], "storage_bytes": storage,
                             "wchar_ratio": m["wchar"] / size, "storage_ratio": storage / size,
                             "seconds": m["seconds"]})
                _log(f"  {command} ({key}): output {size / MB:.1f} MB, write(2) {m['wchar'] / MB:.1f} MB "
                     f"({m['wchar'] / size:.2f}x), to storage {storage / MB:.1f} MB in {m['seconds']:.1f} s")
                shutil.rmtree(out) if out.is_dir() else out.unlink()
    report = {"benchmark": "write-once",
              "commands": {"apply": "compress apply (density-1.0 delta)", "extract": "compress extract --density 0.1",
                           "sparse file": "compress.io.sparse.write_sparse of a 50%-pruned copy",
                           "extract-lora": "compress extract-lora --rank 8"},
              "checkpoint_bytes": spec["total_bytes"], "checkpoint_tensors": len(spec["tensors"]),
              "hidden_size": spec["hidden_size"], "layers": spec["layers"], "shard_size": shard_size, "seed": seed,
              "cases": rows,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "platform": platform.platform()}}
    if publish_results:
        publish(results, "write_once", report, markdown(report), label="bench write-once")
    else:
        save_results(results, "write_once", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["# compress bench write-once\n",
             "; ".join(f"{k}: `{v}`" for k, v in report["commands"].items()) +
             f", on a float32 Llama-shaped checkpoint of {report['checkpoint_bytes'] / MB:.1f} MB "
             f"({report['checkpoint_tensors']} tensors), shards of at most {report['shard_size']}. write(2) = "
             "`wchar` of /proc/self/io while the command ran; dirtied = `write_bytes` (page-cache pages dirtied for "
             "storage), cancelled = `cancelled_write_bytes` (dirty pages of files deleted before writeback: the side "
             "file of a shard copied behind its header); to storage = dirtied - cancelled.\n",
             "| command | code | output MB | shards | write(2) MB | write(2) / output | dirtied MB | cancelled MB "
             "| to storage MB | to storage / output | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["cases"]:
        lines.append(f"| {r['command']} | {r['key']} ({r['code']}) | {r['output_bytes'] / MB:.1f} | {r['shards']} | "
                     f"{r['wchar'] / MB:.1f} | {r['wchar_ratio']:.3f} | {r['write_bytes'] / MB:.1f} | "
                     f"{r['cancelled_write_bytes'] / MB:.1f} | {r['storage_bytes'] / MB:.1f} | "
                     f"{r['storage_ratio']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"
