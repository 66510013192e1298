"""``compress bench merge-speed``: the same merge recipes through `compress merge` and mergekit, side by side.

1. Three random-weight Hugging Face Llama checkpoints in bfloat16 (real Llama tensor names and shapes, about
   0.5 B parameters each by default): a base and two "fine-tuned" models (base + seeded noise), written tensor by
   tensor with the project's streaming writer. Every tensor is drawn from a generator seeded by (seed, name).
2. mergekit is installed from the package registry into the benchmark's own virtual environment (created with
   ``--system-site-packages`` so it uses the torch already here, never a second multi-GB download); an existing
   environment that already has it is reused.
3. One mergekit YAML per method (TIES at density 0.2 and task arithmetic, both with ``dtype: bfloat16``) is run by
   ``mergekit-yaml`` and by ``compress merge`` (which reads mergekit's format and uses mergekit's variant of the
   maths), each in a fresh process whose peak RSS is read from the kernel (``compress.bench.io_memory.measure``).
4. The outputs are compared tensor by tensor: max |difference|, and how many entries differ by more than one
   bfloat16 step of the larger value ("beyond bf16 rounding").

With ``--device cuda`` our side runs on the GPU (mergekit with ``--cuda``), and the table adds GB/s of tensor data
read. Results go to ``merge_speed.json`` and ``merge_speed.md``; the table is printed.
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
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

import compress
from compress.bench.io_memory import MB, measure
from compress.bench.timing import MIN_ROUNDS, alternate, describe, ratios, spread, summary
from compress.bench.write_once import source_tree
from compress.errors import CompressError

METHODS = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.2, "weight": [1.0, 0.8]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": [0.6, 0.4]}},
}


def _log(msg: str) -> None:
    print(f"[bench merge-speed] {msg}", file=sys.stderr, flush=True)


def llama_spec(params: float) -> dict:
    """A Llama config (hidden 1024, MLP 2816, vocab 32000) with as many layers as reach ``params``."""
    h, inter, vocab, heads = 1024, 2816, 32000, 16
    if params < 50e6:  # small runs (tests): shrink everything
        h, inter, vocab, heads = 128, 352, 1000, 4
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, int((params - 2 * vocab * h - h) // per_layer))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu"}
    tensors = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        tensors += [(p + f"self_attn.{k}_proj.weight", (h, h)) for k in "qkvo"]
        tensors += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    n = sum(torch.Size(s).numel() for _, s in tensors)
    return {"config": config, "tensors": tensors, "params": n, "bytes": 2 * n}


def write_models(root: Path, spec: dict, seed: int = 0, noise: float = 2e-3, n_models: int = 2,
                 shard_size: int = 2 * 10**9) -> list[Path]:
    """base, ft1, …: bf16 Hugging Face folders, one tensor per model in memory at a time."""
    from compress.bench.io_memory import _draw
    from compress.io.writer import ShardedWriter, atomic_dir
    from compress.progress import track

    dirs = [root / "base"] + [root / f"ft{i + 1}" for i in range(n_models)]
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    ctxs = [atomic_dir(d) for d in dirs]
    tmps = [c.__enter__() for c in ctxs]
    try:
        writers = [ShardedWriter(t, shard_size, expected_tensors=len(spec["tensors"])) for t in tmps]
        for name, shape in track(spec["tensors"], "write checkpoints"):
            base = (1.0 + 0.02 * _draw(shape, seed, "base", name)) if len(shape) == 1 \
                else 0.02 * _draw(shape, seed, "base", name)
            writers[0].add(name, base.to(torch.bfloat16))
            for i, w in enumerate(writers[1:]):
                w.add(name, (base + noise * _draw(shape, seed, f"ft{i}", name)).to(torch.bfloat16))
        for w, t in zip(writers, tmps):
            w.close()
            (t / "config.json").write_text(json.dumps(spec["config"], indent=2) + "\n")
    except BaseException:
        for c in ctxs:
            c.__exit__(*sys.exc_info())
        raise
    for c in ctxs:
        c.__exit__(None, None, None)
    return dirs


def mergekit_env(venv: Path, spec: str) -> Path:
    """The ``mergekit-yaml`` of a venv that has ``spec`` installed (created and installed when missing).

    ``spec`` is what follows ``pip install``: a requirement, or wheel files and flags on a machine with no
    registry (``--no-deps --no-index wheels/mergekit-….whl wheels/immutables-….whl``)."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    _log(f"creating {venv} and installing {spec} from the package registry ...")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # when this interpreter is itself a venv, --system-site-packages reaches only the base interpreter's packages;
    # a .pth line makes this environment's (torch, transformers, …) visible too
    import sysconfig

    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", code],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "compress-parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the system torch satisfies mergekit's torch requirement, so pip does not fetch a CUDA build
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *shlex.split(spec)], capture_output=True,
                       text=True)
    if r.returncode != 0 or not exe.exists():
        raise RuntimeError(f"installing {spec} failed:\n{r.stderr[-3000:]}")
    return exe


def mergekit_version(exe: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    r = subprocess.run([str(exe.parent / "python"), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: max |a − b| and entries differing beyond one bfloat16 step of the larger magnitude."""
    from compress.io.reader import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.names()) != set(cb.names()):
        missing = sorted(set(ca.names()) ^ set(cb.names()))
        return {"same_names": False, "name_differences": missing[:5]}
    worst, worst_name, beyond, total, differ = 0.0, "", 0, 0, 0
    for name in ca.names():
        x, y = ca.get(name, dtype=torch.float32), cb.get(name, dtype=torch.float32)
        d = (x - y).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > worst:
            worst, worst_name = m, name
        # one bf16 step (ulp) at the larger magnitude: 2^(exponent − 7)
        ulp = torch.ldexp(torch.ones_like(x), torch.frexp(torch.maximum(x.abs(), y.abs()))[1] - 8)
        beyond += int(torch.count_nonzero(d > ulp))
        differ += int(torch.count_nonzero(d))
        total += d.numel()
    return {"same_names": True, "max_abs_diff": worst, "max_abs_diff_tensor": worst_name, "entries": total,
            "entries_differing": differ, "entries_beyond_bf16_step": beyond}


_OURS_RE = re.compile(r"in ([0-9.]+) s \(([0-9.]+) GB/s read\)")


def _compress_env(env: dict[str, str], tree: Optional[Path]) -> dict[str, str]:
    """``env`` for a ``compress`` process that imports the package of ``tree`` (None: this process's own). The
    tree's modules are byte-compiled first, as an installed wheel's are (mergekit's are, in its venv): with
    ``PYTHONDONTWRITEBYTECODE`` set, each run would otherwise compile the package again."""
    import compileall

    tree = tree or source_tree()
    compileall.compile_dir(str(tree / "compress"), quiet=1)
    return {**env, "PYTHONPATH": os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def run(params: float = 0.5e9, workdir: str | os.PathLike = "checkpoints/bench-merge-speed",
        results: str | os.PathLike = "checkpoints/bench", *, device: str = "cpu", mergekit: str = "mergekit",
        venv: str | os.PathLike | None = None, methods: tuple[str, ...] = tuple(METHODS), seed: int = 0,
        rounds: int = MIN_ROUNDS, before: Optional[str] = None, keep: bool = False, print_table: bool = True) -> dict:
    """Run the benchmark; returns what it saved to ``results/merge_speed[_cuda].json``.

    Per method, mergekit and compress run in turn ``rounds`` times (A B A B ...; with ``before``, a git revision or
    a folder holding an older package, that compress runs third in each round); time ratios are per round."""
    from compress.bench.write_once import checkout

    if rounds < MIN_ROUNDS:
        raise CompressError(f"--rounds must be at least {MIN_ROUNDS} (a median of per-round ratios), got {rounds}")
    workdir, results = Path(workdir), Path(results)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = llama_spec(params)
    _log(f"{spec['params'] / 1e6:.0f} M parameters per model ({spec['config']['num_hidden_layers']} layers), "
         f"{spec['bytes'] / MB:.0f} MB each in bf16; writing base + 2 models into {workdir} ...")
    t0 = time.perf_counter()
    models = write_models(workdir / "models", spec, seed=seed)
    write_seconds = time.perf_counter() - t0
    exe = mergekit_env(Path(venv) if venv else workdir / "mergekit-venv", mergekit)
    version = mergekit_version(exe)
    env = {**os.environ, "COMPRESS_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    if compress.HUGE_PAGES_SET_HERE:  # this process's choice, not the user's: each contender makes its own
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    envs = {"mergekit": env, "compress": _compress_env(env, None)}
    if before is not None:
        src = workdir / "before-src"
        shutil.rmtree(src, ignore_errors=True)
        envs["compress_before"] = _compress_env(env, checkout(before, src))
    load_start = os.getloadavg()
    rows = []
    for method in methods:
        recipe = dict(METHODS[method])
        weights = recipe["parameters"]["weight"]
        cfg = {"merge_method": recipe["merge_method"], "base_model": str(models[0].resolve()), "dtype": "bfloat16",
               "models": [{"model": str(m.resolve()), "parameters": {"weight": w,
                           **({"density": recipe["parameters"]["density"]} if "density" in recipe["parameters"]
                              else {})}} for m, w in zip(models[1:], weights)]}
        yml = workdir / f"{method}.yml"
        yml.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tools = list(envs)
        outs = {t: workdir / f"out-{t.replace('_', '-')}-{method}" for t in tools}
        # -P: the working folder is not put first on sys.path, so PYTHONPATH decides which compress runs
        ours = [sys.executable, "-P", "-m", "compress.cli", "merge", str(yml), "--device", device, "--quiet", "--out"]
        argv = {t: ours + [str(outs[t])] for t in tools}
        argv["mergekit"] = [str(exe), str(yml), str(outs["mergekit"])] + (["--cuda"] if device != "cpu" else [])
        if "density" in recipe["parameters"]:
            # a mergekit YAML keeps equal |δ| at the top-k threshold in mergekit's argsort order (replayed, not
            # sorted); the radix selection that keeps them lowest index first is the other row
            outs["compress_index"] = workdir / f"out-compress-index-{method}"
            argv["compress_index"] = ours + [str(outs["compress_index"]), "--tie-break", "index"]
            envs_m = {**envs, "compress_index": envs["compress"]}
        else:
            envs_m = envs

        def case(tool: str):
            def go(i: int) -> dict:
                _log(f"{method}: round {i + 1}/{rounds}, {tool} ...")
                m = measure(argv[tool], env=envs_m[tool])
                r = {"seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"], "rss_method": m["rss_method"]}
                hit = _OURS_RE.search(m["stdout"]) if tool.startswith("compress") else None
                if hit:
                    r["merge_seconds"], r["gb_per_s"] = float(hit.group(1)), float(hit.group(2))
                _log(f"  {tool}: {m['seconds']:.1f} s, peak RSS {m['peak_rss_bytes'] / MB:.0f} MB")
                return r
            return go

        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        got = alternate({t: case(t) for t in tools}, rounds, before=lambda t, i: shutil.rmtree(outs[t], True))
        if "compress_index" in outs:  # once: it is there for the comparison of outputs
            got["compress_index"] = [case("compress_index")(0)]
        row = {"method": method, "recipe": cfg, "rounds": rounds}
        for tool, res in got.items():
            row[tool] = {**summary(res), "runs": res, "command": " ".join(argv[tool])}
            gbs = [r["gb_per_s"] for r in res if "gb_per_s" in r]
            if gbs:
                row[tool]["gb_per_s"] = spread(gbs)
        row["time_ratio"] = ratios(got["compress"], got["mergekit"])
        row["rss_ratio"] = row["compress"]["peak_rss_bytes"] / row["mergekit"]["peak_rss_bytes"]
        if "compress_before" in got:
            row["time_ratio_before"] = ratios(got["compress_before"], got["mergekit"])
            row["after_vs_before"] = ratios(got["compress"], got["compress_before"])
        row["compare"] = compare(outs["mergekit"], outs["compress"])
        if "compress_index" in outs:
            row["compare_index"] = compare(outs["mergekit"], outs["compress_index"])
        rows.append(row)
        if not keep:
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
    report = {"benchmark": "merge-speed", "device": device, "params_per_model": spec["params"],
              "bytes_per_model": spec["bytes"], "models": 3, "layers": spec["config"]["num_hidden_layers"],
              "bytes_read_per_merge": 3 * spec["bytes"], "write_seconds": write_seconds, "rounds": rounds,
              "before": before, "mergekit_version": version, "rows": rows,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name() if device != "cpu" else None,
                          "platform": platform.platform(), "loadavg_1min_start": load_start[0],
                          "loadavg_1min_end": os.getloadavg()[0]}}
    results.mkdir(parents=True, exist_ok=True)
    tag = "" if device == "cpu" else "_cuda"
    (results / f"merge_speed{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"merge_speed{tag}.md").write_text(markdown(report))
    _log(f"wrote {results / f'merge_speed{tag}.json'} and .md")
    if print_table:
        print(markdown(report))
    return report


COLUMNS = ("method", "mergekit s", "compress s", "time ratio: median (min–max)", "mergekit peak RSS MB",
           "compress peak RSS MB", "RSS ratio", "compress GB/s", "max abs diff", "entries beyond one bf16 step")


def _cells(name: str, r: dict, tool: str, ratio: dict | None, c: dict) -> str:
    mk, ours = r["mergekit"], r[tool]
    gbs = ours.get("gb_per_s", {}).get("median", float("nan"))
    return "| " + " | ".join([
        name, f"{mk['seconds']['median']:.1f}", f"{ours['seconds']['median']:.1f}",
        describe(ratio) if ratio else f"{ours['seconds']['median'] / mk['seconds']['median']:.3f} (1 run)",
        f"{mk['peak_rss_bytes'] / MB:.0f}", f"{ours['peak_rss_bytes'] / MB:.0f}",
        f"{ours['peak_rss_bytes'] / mk['peak_rss_bytes']:.3f}", f"{gbs:.2f}",
        f"{c.get('max_abs_diff', float('nan')):.3g}",
        f"{c.get('entries_beyond_bf16_step', '?')} of {c.get('entries', '?')}"]) + " |"


def markdown(report: dict) -> str:
    lines = [f"# compress bench merge-speed ({report['device']})", "",
             f"Base + 2 random bf16 Llama models of {report['params_per_model'] / 1e6:.0f} M parameters "
             f"({report['bytes_per_model'] / MB:.0f} MB each, {report['layers']} layers); mergekit "
             f"{report['mergekit_version']}; each run a fresh process. The tools run in turn, "
             f"{report['rounds']} rounds (A B A B ...); seconds are medians, the time ratio (compress ÷ mergekit) "
             "is the median of the per-round ratios, peak RSS the highest of the rounds.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for r in report["rows"]:
        lines.append(_cells(r["method"], r, "compress", r["time_ratio"], r["compare"]))
        if "compress_before" in r:
            lines.append(_cells(f"{r['method']} (before: {report['before']})", r, "compress_before",
                                r["time_ratio_before"], {}))
        if "compress_index" in r:
            lines.append(_cells(f"{r['method']} (--tie-break index)", r, "compress_index", None,
                                r["compare_index"]))
    m = report["machine"]
    lines += ["", "A mergekit YAML keeps equal magnitudes at the top-k threshold in mergekit's (argsort) order, "
              "found by replaying torch's sort rather than sorting; `--tie-break index` keeps them lowest index "
              "first (radix selection)."]
    if report.get("before"):
        lines += ["", "This checkout ÷ before, per round: " + "; ".join(
            f"{r['method']} {describe(r['after_vs_before'])}" for r in report["rows"])]
    lines += ["", f"GB/s: bytes of the three checkpoints ÷ compress's own merge time (without process start-up). "
              f"Python {m['python']}, torch {m['torch']}, {m['cpus']} CPUs"
              + (f", {m['gpu']}" if m.get("gpu") else "") + f"; load average {m['loadavg_1min_start']:.1f} → "
              f"{m['loadavg_1min_end']:.1f}.", ""]
    return "\n".join(lines)
