"""``compress bench scale``: time, peak GPU memory, peak host RSS and GB/s of the product's jobs on random Llama
checkpoints of real shapes (1B- and 7B-class, ``tiny`` for the CPU test), beside mergekit and llm-compressor.

1. Checkpoints are drawn on the chosen device (bf16, std 0.02 like Llama's init, norms near 1; every tensor from a
   generator seeded by (seed, model, name)) and written with the project's folder writer in ~5 GB shards, with a
   config.json and the stories260K tokenizer (512 pieces; the config's vocab size is the embedding's rows).
   Fine-tunes are the base plus small random deltas. Folders already written with the same spec are reused.
2. Each job runs in its own process (``compress.bench.scale_job``), which reports its own peak GPU memory and
   RSS: merge (TIES at density 0.2 and task arithmetic, base + fine-tunes, from one mergekit YAML), extract
   (density 0.1), apply, prune (Wanda and SparseGPT, 50%, each ``--calibration`` mode when the CLI has the flag)
   and a batch of 16 compression requests (``compress batch``, StratNet trained first as a timed setup step).
3. Where mergekit and llm-compressor import, they run the same merges and prunes in the same run. The two tools
   alternate A B A B (``--pairs``); the ratio is compress ÷ tool: median, min and max of the per-pair ratios.
4. A 70B-class estimate (hidden 8192, 80 blocks) scales the largest measured size's figures per block; it is
   labelled as an estimate everywhere it appears.

Results (``scale.json``, ``scale.md``, ``scale.png``) accumulate under ``--out``: rows already there for another
(size, job) are kept, so a run may be split over several calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from compress.bench.io_memory import _folder_bytes, measure
from compress.bench.timing import alternate, ratios
from compress.errors import CompressError

GB = 10**9


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    positions: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def block_params(self) -> int:
        h = self.hidden
        return 2 * h + 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate

    def params(self) -> int:
        return self.layers * self.block_params() + 2 * self.vocab * self.hidden + self.hidden

    def largest_tensor(self) -> int:
        return max(self.vocab, self.intermediate) * self.hidden

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
                "max_position_embeddings": self.positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                "torch_dtype": "bfloat16"}


SIZES = {
    "tiny": Shape(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2, vocab=512, positions=256),
    "1b": Shape(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000, positions=2048),
    "7b": Shape(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000, positions=4096),
}
ESTIMATED = ("70b", Shape(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=32000,
                          positions=4096))
# (fine-tunes, calibration windows, tokens per window); 7b takes 2 fine-tunes so that base + fine-tunes + one
# output fit a 64 GiB disk
DEFAULTS = {"tiny": (3, 8, 64), "1b": (3, 128, 2048), "7b": (2, 128, 2048)}
CALIB = "wikitext2.valid"
# tiny calibrates on the corpus's first characters: tokenizing all of it would be most of the CPU test's time
TINY_CALIB_CHARS = 40_000
MERGES = {"merge_ties": {"merge_method": "ties", "density": 0.2}, "merge_task_arithmetic":
          {"merge_method": "task_arithmetic"}}
JOBS = (*MERGES, "extract", "apply", "prune_wanda", "prune_sparsegpt", "batch")
GROUPS = {"merge": tuple(MERGES), "prune": ("prune_wanda", "prune_sparsegpt")}
STREAMING = (*MERGES, "extract", "apply")
BATCH_REQUESTS = 16


def _log(msg: str) -> None:
    print(f"[bench scale] {msg}", file=sys.stderr, flush=True)


def parse_jobs(text: str) -> list[str]:
    jobs: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        names = GROUPS.get(part, (part,) if part in JOBS else None)
        if names is None:
            raise CompressError(f"--jobs {part}: choose from {', '.join([*GROUPS, *JOBS])}")
        jobs += [n for n in names if n not in jobs]
    if not jobs:
        raise CompressError("--jobs is empty")
    return [j for j in JOBS if j in jobs]


def parse_sizes(text: str) -> list[str]:
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise CompressError(f"--sizes {text}: choose from {', '.join(SIZES)}")
    return sizes


# -- checkpoints -------------------------------------------------------------------------------------------
def _generator(device: str, seed: int, role: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{role}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _draw(shape, device: str, seed: int, role: str, name: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(device, seed, role, name), device=device, dtype=torch.float32)


def _tensors(shape: Shape, device: str, seed: int, delta_of: str | None, noise: float):
    for name, dims in shape.tensors():
        base = _draw(dims, device, seed, "base", name).mul_(0.02)
        if len(dims) == 1:
            base.add_(1.0)
        if delta_of is not None:
            base.add_(_draw(dims, device, seed, delta_of, name), alpha=noise)
        yield name, base.to(torch.bfloat16).cpu()


def write_model(folder: Path, shape: Shape, *, device: str, seed: int = 0, finetune: str | None = None,
                noise: float = 1e-3, shard_size: str = "5GB") -> Path:
    """A bf16 Llama folder of ``shape`` (base, or base + noise·N(0, 1) for a fine-tune), with a tokenizer."""
    from compress.data import stories260k_files
    from compress.io.llama2c import read_llama2c_tokenizer, save_tokenizer
    from compress.io.writer import write_folder

    spec = {"shape": asdict(shape), "seed": seed, "finetune": finetune, "noise": noise}
    marker = folder / "scale_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    pieces, scores = read_llama2c_tokenizer(stories260k_files()[1], 512)

    def finish(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        save_tokenizer(pieces, scores, tmp, shape.positions)
        (tmp / "scale_spec.json").write_text(json.dumps(spec) + "\n")

    with torch.no_grad():
        write_folder(folder, _tensors(shape, device, seed, finetune, noise), overwrite=True,
                     expected_tensors=len(shape.tensors()), shard_size=shard_size, finish=finish)
    return folder


# -- running one job ---------------------------------------------------------------------------------------
_JOB_LINE = re.compile(r'^\{"scale_job": .*\}$', re.M)


def run_job(tool: str, argv: list[str], env: dict[str, str], outputs: tuple[Path, ...] = (),
            isolate: bool = True) -> dict:
    """One process: wall seconds and peak RSS from outside, the child's own report from inside.

    ``isolate=False`` runs the job in this process instead (quick checks: peaks are then this process's)."""
    if not isolate:
        from compress.bench.scale_job import execute

        child = execute(tool, argv)
        if child["rc"] != 0:
            return {"status": "failed", "error": f"exit {child['rc']} (its message is on stderr above)"}
        out = {"status": "ok", "wall_seconds": child["seconds"], "seconds": child["seconds"],
               "peak_rss_bytes": child["vm_hwm_bytes"] or child["ru_maxrss_bytes"], "rss_method": "in-process",
               "gpu_peak_allocated_bytes": child["gpu_peak_allocated_bytes"],
               "gpu_peak_reserved_bytes": child["gpu_peak_reserved_bytes"]}
        return {**out, "output_bytes": _outputs_bytes(outputs)}
    try:
        m = measure([sys.executable, "-m", "compress.bench.scale_job", tool, *argv], env=env)
    except RuntimeError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not _JOB_LINE.match(ln)]
        return {"status": "failed", "error": " | ".join(lines[-3:])[-600:]}
    hits = _JOB_LINE.findall(m["stdout"])
    child = json.loads(hits[-1])["scale_job"] if hits else {}
    out = {"status": "ok", "wall_seconds": m["seconds"], "seconds": child.get("seconds", m["seconds"]),
           "peak_rss_bytes": m["peak_rss_bytes"], "rss_method": m["rss_method"],
           "gpu_peak_allocated_bytes": child.get("gpu_peak_allocated_bytes"),
           "gpu_peak_reserved_bytes": child.get("gpu_peak_reserved_bytes"),
           "child_vm_hwm_bytes": child.get("vm_hwm_bytes"), "child_ru_maxrss_bytes": child.get("ru_maxrss_bytes")}
    return {**out, "output_bytes": _outputs_bytes(outputs)}


def _outputs_bytes(outputs: tuple[Path, ...]) -> int | None:
    return sum(_folder_bytes(p) for p in outputs if p.exists()) if outputs else None


def _clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def summarize(runs: list[dict], input_bytes: int) -> dict:
    """Median seconds over the runs, the worst peaks, GB/s of input over the in-process seconds."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": "failed", "error": runs[-1].get("error", "?") if runs else "not run", "runs": runs}
    import statistics

    secs = statistics.median(r["seconds"] for r in ok)
    peak = lambda k: max((r.get(k) or 0) for r in ok)  # noqa: E731
    return {"status": "ok", "runs": runs, "seconds": secs, "wall_seconds": statistics.median(r["wall_seconds"]
                                                                                             for r in ok),
            "gpu_peak_bytes": peak("gpu_peak_allocated_bytes"), "gpu_reserved_bytes": peak("gpu_peak_reserved_bytes"),
            "peak_rss_bytes": peak("peak_rss_bytes"), "input_bytes": input_bytes,
            "gb_per_s": input_bytes / secs / GB if secs > 0 else None, "output_bytes": ok[-1].get("output_bytes")}


class Runner:
    """Runs the jobs of one size; a job's side-by-side tool alternates with it A B A B."""

    def __init__(self, size: str, root: Path, *, device: str, pairs: int, tools_path: str | None, compare: bool,
                 finetunes: int, nsamples: int, seqlen: int, seed: int, isolate: bool = True, side: str = "both"):
        self.size, self.shape, self.device, self.isolate, self.side = size, SIZES[size], device, isolate, side
        self.root, self.pairs, self.compare = root, pairs, compare
        self.nsamples, self.seqlen, self.seed = nsamples, seqlen, seed
        self.models = [root / "base"] + [root / f"ft{i + 1}" for i in range(finetunes)]
        repo = str(Path(__file__).resolve().parents[2])
        base_env = {**os.environ, "COMPRESS_QUIET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        path = [repo] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        self.env = {**base_env, "PYTHONPATH": os.pathsep.join(path)}
        self.tool_env = {**base_env, "PYTHONPATH": os.pathsep.join(([tools_path] if tools_path else []) + path)}
        self.available = {t: compare and side != "compress" and self._imports(t) for t in ("mergekit", "llmcompressor")}
        self.calibration_modes = self._calibration_modes()
        self.calib = CALIB
        if size == "tiny":
            from compress.data import corpus_path, read_text

            self.calib = str(root / "calib.txt")
            Path(self.calib).write_text(read_text(corpus_path(CALIB))[:TINY_CALIB_CHARS])

    def _imports(self, tool: str) -> bool:
        module = {"mergekit": "mergekit.scripts.run_yaml", "llmcompressor": "llmcompressor"}[tool]
        r = subprocess.run([sys.executable, "-c", f"import {module}"], env=self.tool_env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            _log(f"{tool} does not import here; its rows are skipped ({(r.stderr.strip().splitlines() or ['?'])[-1]})")
        return r.returncode == 0

    def _calibration_modes(self) -> list[str | None]:
        r = subprocess.run([sys.executable, "-m", "compress.cli", "prune", "--help"], env={**self.env,
                           "COLUMNS": "200"}, capture_output=True, text=True)
        return ["sequential", "shared"] if re.search(r"--calibration\b", r.stdout) else [None]

    def model_bytes(self) -> int:
        return 2 * self.shape.params()

    def prepare(self, jobs: list[str]) -> float:
        need = len(self.models) if any(j in MERGES for j in jobs) else 2 if {"extract", "apply"} & set(jobs) else 1
        t0 = time.perf_counter()
        for i, folder in enumerate(self.models[:need]):
            write_model(folder, self.shape, device=self.device, seed=self.seed, finetune=None if i == 0 else f"ft{i}")
        return time.perf_counter() - t0

    def _room(self, need: int, keep: int) -> str | None:
        """Free disk for ``need`` bytes, deleting fine-tunes past the first ``keep`` models; None or a reason."""
        for folder in reversed(self.models[keep:]):
            if shutil.disk_usage(self.root).free >= need:
                break
            if folder.exists():
                _log(f"deleting {folder} to make room (rewritten when a later run needs it)")
                _clear(folder)
        free = shutil.disk_usage(self.root).free
        return None if free >= need else f"needs about {need / GB:.1f} GB of disk, {free / GB:.1f} GB free"

    def side_by_side(self, ours, theirs, tool: str | None) -> tuple[list[dict], list[dict], dict | None]:
        """Our runs, the tool's runs and the paired ratios; ``side`` may leave one of them out (split runs)."""
        has_tool = tool is not None and self.available.get(tool)
        if self.side == "tool":
            if not has_tool:
                return [], [], None
            runs = []
            try:
                for _ in range(self.pairs):
                    runs.append(theirs())
            except _ToolFailed as e:
                runs.append(e.result)
            return [], runs, None
        if not has_tool or self.side == "compress":
            return [ours()], [], None
        try:
            res = alternate({"compress": lambda i: ours(), tool: lambda i: theirs()}, rounds=self.pairs)
        except _ToolFailed as e:  # the tool broke: keep our runs, report its error
            return [r for r in e.ours if r] or [ours()], [e.result], None
        a, b = res["compress"], res[tool]
        return a, b, {"tool": tool, "pair_seconds": [[x["seconds"], y["seconds"]] for x, y in zip(a, b)],
                      "ratio": ratios(a, b)}

    def _tool_call(self, tool: str, argv: list[str], out: Path, ours_so_far: list):
        def call():
            _clear(out)
            r = run_job(tool, argv, self.tool_env, (out,))
            _clear(out)
            if r["status"] != "ok":
                raise _ToolFailed(r, ours_so_far)
            return r
        return call

    def _ours_call(self, argv: list[str], *outs: Path, keep_out: bool = False):
        def call():
            _clear(*outs)
            r = run_job("compress", argv, self.env, outs, self.isolate)
            if not keep_out:
                _clear(*outs)
            if r["status"] != "ok":
                raise _OursFailed(r)
            return r
        return call

    def job(self, name: str) -> list[dict]:
        if self.side == "tool" and name not in (*MERGES, *GROUPS["prune"]):
            return []
        try:
            return getattr(self, "_" + ("merge" if name in MERGES else name))(name)
        except _OursFailed as e:
            return [self._row(name, "compress", None, [e.result], 0)]

    def _row(self, job: str, tool: str, mode: str | None, runs: list[dict], input_bytes: int, **extra) -> dict:
        return {"size": self.size, "job": job, "tool": tool, "mode": mode, **summarize(runs, input_bytes), **extra}

    def _merge(self, name: str) -> list[dict]:
        recipe = MERGES[name]
        params = {"weight": 1.0, **({"density": recipe["density"]} if "density" in recipe else {})}
        fts = self.models[1:]
        cfg = {"merge_method": recipe["merge_method"], "base_model": str(self.models[0].resolve()),
               "dtype": "bfloat16", "models": [{"model": str(m.resolve()), "parameters": params} for m in fts]}
        yml = self.root / f"{name}.yml"
        yml.write_text(yaml.safe_dump(cfg, sort_keys=False))
        reason = self._room(2 * self.model_bytes(), len(self.models))
        if reason:
            return [self._row(name, "compress", None, [{"status": "skipped", "error": reason}], 0)]
        out = self.root / f"out-{name}"
        ours = self._ours_call(["merge", str(yml), "--device", self.device, "--quiet", "--out", str(out)], out)
        ours_runs: list = []
        theirs = self._tool_call("mergekit", [str(yml), str(out)] + (["--cuda"] if self.device != "cpu" else []),
                                 out, ours_runs)
        a, b, vs = self.side_by_side(_Track(ours, ours_runs), theirs, "mergekit")
        read = len(self.models) * self.model_bytes()
        rows = [self._row(name, "compress", None, a, read, vs=vs)] if a else []
        if b:
            rows.append(self._row(name, "mergekit", None, b, read))
        return rows

    def _extract(self, name: str, keep: bool = False) -> list[dict]:
        delta = self.root / "delta-0.1.safetensors"
        reason = self._room(self.model_bytes(), 2)
        if reason:
            return [self._row(name, "compress", None, [{"status": "skipped", "error": reason}], 0)]
        argv = ["extract", "--base", str(self.models[0]), "--finetuned", str(self.models[1]), "--density", "0.1",
                "--out", str(delta), "--device", self.device, "--quiet"]
        runs = [self._ours_call(argv, delta, keep_out=True)()]
        return [self._row(name, "compress", None, runs, 2 * self.model_bytes(), density=0.1)]

    def _apply(self, name: str) -> list[dict]:
        delta = self.root / "delta-0.1.safetensors"
        if not delta.is_file():
            self._extract("extract")
        reason = self._room(2 * self.model_bytes(), 2)
        if reason:
            return [self._row(name, "compress", None, [{"status": "skipped", "error": reason}], 0)]
        out = self.root / "out-apply"
        argv = ["apply", "--base", str(self.models[0]), "--delta", str(delta), "--out", str(out), "--device",
                self.device, "--quiet"]
        runs = [self._ours_call(argv, out)()]
        return [self._row(name, "compress", None, runs, self.model_bytes() + delta.stat().st_size)]

    def _prune_argv(self, method: str, out: Path, cache: Path, mode: str | None) -> list[str]:
        return (["prune", str(self.models[0]), "--method", method, "--sparsity", "0.5", "--nsamples",
                 str(self.nsamples), "--seqlen", str(self.seqlen), "--calib", self.calib, "--device", self.device,
                 # SparseGPT's Hessian cache would be 28 GB at 7B (a 64 GB disk holds the models already): the
                 # norms' cache only
                 *(["--cache-dir", str(cache)] if method != "sparsegpt" else []),
                 "--out", str(out), "--sparse-out", f"{out}.sparse.safetensors", "--quiet"]
                + (["--calibration", mode] if mode else []))

    def _prune_wanda(self, name: str) -> list[dict]:
        return self._prune(name, "wanda")

    def _prune_sparsegpt(self, name: str) -> list[dict]:
        return self._prune(name, "sparsegpt")

    def _prune(self, name: str, method: str) -> list[dict]:
        reason = self._room(2 * self.model_bytes(), 1)
        if reason:
            return [self._row(name, "compress", None, [{"status": "skipped", "error": reason}], 0)]
        out, cache = self.root / f"out-{name}", self.root / "calib-cache"
        rows = []
        for i, mode in enumerate(self.calibration_modes):
            def ours_fn(mode=mode):
                _clear(cache)
                try:
                    return self._ours_call(self._prune_argv(method, out, cache, mode), out,
                                           Path(f"{out}.sparse.safetensors"))()
                finally:
                    _clear(cache)
            ours_runs: list = []
            largv = [str(self.models[0]), "--method", method, "--sparsity", "0.5", "--nsamples", str(self.nsamples),
                     "--seqlen", str(self.seqlen), "--calib", self.calib, "--out", str(out)]
            # llm-compressor calibrates sequentially: it is paired with our sequential (or only) mode
            tool = "llmcompressor" if i == 0 else None
            try:
                a, b, vs = self.side_by_side(_Track(ours_fn, ours_runs),
                                             self._tool_call("llmcompressor", largv, out, ours_runs), tool)
            except _OursFailed as e:
                a, b, vs = [e.result], [], None
            if a:
                rows.append(self._row(name, "compress", mode, a, self.model_bytes(), vs=vs))
            if b:
                rows.append(self._row(name, "llmcompressor", "sequential", b, self.model_bytes()))
        return rows

    def _batch(self, name: str) -> list[dict]:
        net, cache = self.root / "stratnet.pt", self.root / "calib-cache-batch"
        out = self.root / "out-batch"
        sparse_bytes = int(0.6 * self.model_bytes())
        self._room(self.model_bytes() + BATCH_REQUESTS * sparse_bytes, 1)
        free = shutil.disk_usage(self.root).free - self.model_bytes() - GB
        n = max(0, min(BATCH_REQUESTS, int(free // sparse_bytes)))
        if n == 0:
            return [self._row(name, "compress", None, [{"status": "skipped", "error": "no disk for one request"}], 0)]
        _clear(net, cache)
        train = ["strategy", "train", str(self.models[0]), "--out", str(net), "--budget", "8", "--rounds", "0",
                 "--active-fraction", "0", "--steps", "50", "--calib", self.calib, "--nsamples", str(self.nsamples),
                 "--seqlen",
                 str(self.seqlen), "--eval-windows", "2", "--cache-dir", str(cache), "--device", self.device, "--quiet"]
        train_runs = [self._ours_call(train, net, keep_out=True)()]
        rows = [self._row("strategy_train", "compress", None, train_runs, self.model_bytes(),
                          note="setup of the batch: StratNet through a GP of 8 evaluations; fills the calibration "
                               "cache the batch reads")]
        requests = self.root / "requests.jsonl"
        lo, hi = 0.35, 0.65
        requests.write_text("".join(json.dumps({"id": f"r{i:02d}", "sparsity": round(lo + (hi - lo) * i /
                                                max(1, n - 1), 4)}) + "\n" for i in range(n)))
        argv = ["batch", str(self.models[0]), "--stratnet", str(net), "--requests", str(requests), "--out", str(out),
                "--cache-dir", str(cache), "--device", self.device, "--quiet"]
        try:
            runs = [self._ours_call(argv, out)()]
        finally:
            _clear(cache)
        note = f"{n} requests" + ("" if n == BATCH_REQUESTS else
                                  f" of {BATCH_REQUESTS}: the disk holds no more outputs; seconds not scaled")
        rows.append(self._row(name, "compress", None, runs, self.model_bytes(), requests=n, note=note))
        return rows


class _ToolFailed(Exception):
    def __init__(self, result: dict, ours: list):
        super().__init__(result.get("error"))
        self.result, self.ours = result, ours


class _OursFailed(Exception):
    def __init__(self, result: dict):
        super().__init__(result.get("error"))
        self.result = result


class _Track:
    """A run of our side that also keeps its result, so a tool failing mid-pairs does not lose our runs."""

    def __init__(self, fn, log: list):
        self.fn, self.log = fn, log

    def __call__(self):
        r = self.fn()
        self.log.append(r)
        return r


def _key(r: dict) -> tuple:
    return r["size"], r["job"], r["tool"], r["mode"]


def unpaired(rows: list[dict]) -> list[dict]:
    """Where our row and the tool's come from separate calls (no pairs), their ratio of medians, labelled so."""
    for r in rows:
        r.pop("vs_unpaired", None)
        if r["tool"] != "compress" or r.get("vs") or r["status"] != "ok" or r["mode"] not in (None, "sequential"):
            continue
        for t in rows:
            if t["tool"] != "compress" and (t["size"], t["job"]) == (r["size"], r["job"]) and t["status"] == "ok":
                r["vs_unpaired"] = {"tool": t["tool"], "ratio": r["seconds"] / t["seconds"]}
    return rows


# -- the 70B-class estimate --------------------------------------------------------------------------------
def estimate(rows: list[dict]) -> list[dict]:
    """70B-class figures scaled from the largest measured size of each compress job (an estimate, not a run).

    Streaming jobs scale time with parameters and memory with the largest tensor; passes that run the model scale
    per block (SparseGPT's update also with the hidden size) times 80 blocks. A peak above half the bytes the job
    reads (one model for a pass that runs it) means the whole model was resident: it is then scaled with the model,
    except for prune, which is block-wise whatever its peak."""
    name, big = ESTIMATED
    order = list(SIZES)
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["tool"] != "compress" or r.get("status") != "ok":
            continue
        key = (r["job"], r["mode"])
        if key not in best or order.index(r["size"]) > order.index(best[key]["size"]):
            best[key] = r
    out = []
    for (job, mode), r in best.items():
        s = SIZES[r["size"]]
        model = big.params() / s.params()
        if job in STREAMING:
            t_scale, m_scale, basis = model, big.largest_tensor() / s.largest_tensor(), "streaming: time × params"
        else:
            t_scale = big.block_params() / s.block_params() * big.layers / s.layers
            if "sparsegpt" in job:
                t_scale *= big.hidden / s.hidden
            m_scale, basis = big.block_params() / s.block_params(), "per block × 80 blocks"
        # a streaming job reads several models: "resident" means half of what it read, not half of one model
        held = r["input_bytes"] if job in STREAMING else 2 * s.params()

        def mem(v):
            if not v:
                return v, False
            # prune runs block by block by construction (one block, its statistics and the activations): its
            # peak is per block even where that is more than half a 7B model (SparseGPT's Hessians)
            resident = v > 0.5 * held and not job.startswith("prune")
            return v * (model if resident else m_scale), resident
        gpu, gpu_whole = mem(r.get("gpu_peak_bytes"))
        rss, rss_whole = mem(r.get("peak_rss_bytes"))
        out.append({"size": name, "estimate": True, "job": job, "mode": mode, "from_size": r["size"],
                    "basis": basis, "seconds": r["seconds"] * t_scale, "gpu_peak_bytes": gpu,
                    "gpu_scaled_with_model": gpu_whole, "peak_rss_bytes": rss, "rss_scaled_with_model": rss_whole,
                    "params": big.params()})
    return out


# -- reporting ---------------------------------------------------------------------------------------------
def _gb(v) -> str:
    return f"{v / GB:.2f}" if v else "–"


def _num(v, fmt: str = "{:.1f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def markdown(report: dict) -> str:
    lines = ["# compress bench scale", "",
             f"Device {report['machine'].get('gpu') or report['device']}; random bf16 Llama checkpoints; each job a "
             "process of its own. seconds: the call inside the process (imports excluded; median over runs), "
             "wall: the whole process. GB/s: input bytes ÷ seconds. Peak GPU: torch.cuda.max_memory_allocated in "
             "the job; peak RSS: the job process (" + report.get("rss_method", "?") + "). ratio: compress ÷ tool, "
             "median [min–max] of the per-pair ratios of runs alternating A B A B.", ""]
    for size, info in report["sizes"].items():
        lines.append(f"- **{size}**: {info['params'] / 1e9:.2f} B parameters ({info['bytes'] / GB:.1f} GB), hidden "
                     f"{info['shape']['hidden']}, {info['shape']['layers']} blocks, {info['finetunes']} fine-tunes, "
                     f"calibration {info['nsamples']} × {info['seqlen']}; checkpoints written in "
                     f"{info['write_seconds']:.1f} s; pairs {info['pairs']}"
                     + (" (1 pair only at this size)" if info['pairs'] == 1 else "") + ".")
    cols = ("size", "job", "tool", "mode", "seconds", "wall s", "GB/s in", "peak GPU GB", "peak RSS GB", "output GB",
            "ratio vs tool", "status")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 7 + ["---"]) + "|"]
    for r in report["rows"]:
        vs, loose = r.get("vs"), r.get("vs_unpaired")
        ratio = (f"{vs['ratio']['median']:.3f} [{vs['ratio']['min']:.3f}–{vs['ratio']['max']:.3f}] vs {vs['tool']}, "
                 f"{vs['ratio']['rounds']} pair(s)") if vs else \
            (f"{loose['ratio']:.3f} vs {loose['tool']}, unpaired (separate calls)" if loose else "")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:160]}"
        if r.get("note"):
            status += f" ({r['note']})"
        lines.append("| " + " | ".join([
            r["size"], r["job"], r["tool"], r["mode"] or "", _num(r.get("seconds")), _num(r.get("wall_seconds")),
            _num(r.get("gb_per_s"), "{:.2f}"), _gb(r.get("gpu_peak_bytes")), _gb(r.get("peak_rss_bytes")),
            _gb(r.get("output_bytes")), ratio, status]) + " |")
    if report.get("estimate"):
        lines += ["", f"## ESTIMATE, not measured: 70B-class ({ESTIMATED[1].params() / 1e9:.1f} B parameters, hidden "
                  f"{ESTIMATED[1].hidden}, {ESTIMATED[1].layers} blocks)", "",
                  "Scaled from the largest measured size of each job: streaming jobs' time with the parameters and "
                  "memory with the largest tensor; model passes per block × 80 blocks (SparseGPT also × hidden). "
                  "A measured peak above half the bytes the job reads (whole model resident) is scaled with the "
                  "model.",
                  "", "| job | mode | from | basis | est. seconds | est. peak GPU GB | est. peak RSS GB |",
                  "|---|---|---|---|---:|---:|---:|"]
        for e in report["estimate"]:
            gpu = _gb(e["gpu_peak_bytes"]) + (" (whole model)" if e["gpu_scaled_with_model"] else "")
            rss = _gb(e["peak_rss_bytes"]) + (" (whole model)" if e["rss_scaled_with_model"] else "")
            lines.append(f"| {e['job']} | {e['mode'] or ''} | {e['from_size']} | {e['basis']} | "
                         f"{e['seconds']:.0f} (estimate) | {gpu} | {rss} |")
    m = report["machine"]
    lines += ["", f"Python {m['python']}, torch {m['torch']}, {m['cpus']} CPUs; mergekit: "
              f"{report['tools']['mergekit']}, llm-compressor: {report['tools']['llmcompressor']}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    from compress.bench import pyplot

    plt = pyplot()
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    if plt is None or not rows:
        return None
    labels = [f"{r['size']} {r['job'].replace('merge_', '')}{' ' + r['mode'] if r['mode'] else ''}\n{r['tool']}"
              for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.6 * len(rows) + 4), 5))
    colors = ["tab:blue" if r["tool"] == "compress" else "tab:orange" for r in rows]
    for ax, key, title in ((axes[0], "seconds", "seconds (in-process)"), (axes[1], "gpu_peak_bytes",
                                                                          "peak GPU memory, GB")):
        vals = [(r.get(key) or 0) / (GB if key.endswith("bytes") else 1) for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=7)
        ax.set_title(title)
    fig.suptitle("compress bench scale (blue: compress, orange: mergekit / llm-compressor)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tool_version(name: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-c", f"import importlib.metadata as m; print(m.version('{name}'))"],
                       env=env, capture_output=True, text=True)
    return r.stdout.strip() or "not installed"


def run(sizes: list[str], *, jobs: list[str], device: str = "cpu", out: Path = Path("checkpoints/bench/scale"),
        workdir: Path = Path("checkpoints/bench-scale"), pairs: int | None = None, tools_path: str | None = None,
        compare: bool = True, finetunes: int | None = None, seed: int = 0, keep: bool = True,
        isolate: bool = True, side: str = "both") -> dict:
    """Run the jobs for each size; ``isolate=False`` (Python API only: quick checks) runs every job in this process,
    without the side-by-side tools, and its peaks are this process's. ``side``: both (A B A B), compress or tool
    (one side only, for runs split over several calls; the ratio is then of medians, labelled unpaired)."""
    from compress.bench import publish, save_results

    out, workdir = Path(out), Path(workdir)
    json_path = out / "scale.json"
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    kept = list(previous.get("rows", []))
    report = {"benchmark": "scale", "device": device, "rows": [], "sizes": dict(previous.get("sizes", {})),
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                          "platform": platform.platform()}}
    tool_env = None

    def assemble() -> dict:
        report["rows"] = unpaired(kept + fresh)
        report["estimate"] = estimate(report["rows"])
        if "tools" not in report:
            report["tools"] = {t: _tool_version(t, tool_env) if compare and isolate else "not compared"
                               for t in ("mergekit", "llmcompressor")}
        report["rss_method"] = next((r["runs"][0].get("rss_method") for r in report["rows"] if r["status"] == "ok"),
                                    "?")
        return report

    fresh: list[dict] = []
    for size in sizes:
        n_ft, nsamples, seqlen = DEFAULTS[size]
        n_ft = finetunes or n_ft
        size_pairs = pairs or (1 if size == "7b" else 3)
        root = workdir / size
        root.mkdir(parents=True, exist_ok=True)
        runner = Runner(size, root, device=device, pairs=size_pairs, tools_path=tools_path,
                        compare=compare and isolate, finetunes=n_ft, nsamples=nsamples, seqlen=seqlen, seed=seed,
                        isolate=isolate, side=side)
        tool_env = runner.tool_env
        shape = SIZES[size]
        _log(f"{size}: {shape.params() / 1e9:.2f} B parameters, {2 * shape.params() / GB:.1f} GB a model; writing "
             f"checkpoints on {device} into {root} ...")
        write_s = runner.prepare(jobs)
        _log(f"{size}: checkpoints ready in {write_s:.1f} s")
        report["sizes"][size] = {"params": shape.params(), "bytes": 2 * shape.params(), "shape": asdict(shape),
                                 "finetunes": n_ft, "nsamples": nsamples, "seqlen": seqlen, "pairs": size_pairs,
                                 "write_seconds": write_s,
                                 "calibration_modes": [m or "default" for m in runner.calibration_modes]}
        for job in jobs:
            _log(f"{size}: {job} ...")
            rows = runner.job(job)
            for r in rows:
                _log(f"  {r['tool']} {r['mode'] or ''}: {r['status']} "
                     + (f"{r['seconds']:.1f} s, GPU {_gb(r['gpu_peak_bytes'])} GB, RSS {_gb(r['peak_rss_bytes'])} GB"
                        if r["status"] == "ok" else r.get("error", "")))
            produced = {_key(r) for r in rows}
            kept = [r for r in kept if _key(r) not in produced]
            fresh += rows
            save_results(out, "scale", assemble(), markdown(report))  # a run cut short keeps what it measured
        if not keep:
            _clear(root)
    publish(out, "scale", assemble(), markdown(report), plot, label="bench scale")
    return report
