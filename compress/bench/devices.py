"""`compress bench devices`: the same commands with ``--device cpu`` and ``--device cuda``, side by side.

Checks that the GPU path gives the same files (delta files byte for byte, rebuilt models tensor for tensor, LoRA
errors to float tolerance) and measures how long each takes on each device, in one run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.bench.io_memory import model_spec, write_pair
from compress.bench.timing import MIN_ROUNDS, alternate, ratios, summary
from compress.errors import CompressError


def _cli(*args: str) -> float:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "compress.cli", *args, "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise CompressError(f"`compress {' '.join(args)}` failed: {r.stderr.strip()}")
    return time.time() - t


def _same_checkpoint(a: Path, b: Path) -> bool:
    from compress.io.reader import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    return sorted(ca.names()) == sorted(cb.names()) and all(torch.equal(ca.get(n), cb.get(n)) for n in ca.names())


def _same_lora(a: Path, b: Path, base: Path, ft: Path) -> bool:
    """Both adapters are equally good rank-r approximations: per module, ‖Δ − B·A‖/‖Δ‖ agrees to 1e-4.

    The factors themselves need not agree: a random Δ has near-equal singular values around rank r, so the kept
    subspace is ill-conditioned and CPU and GPU SVDs may pick different, equally optimal, ones.
    """
    from compress.io.reader import open_checkpoint

    ca, cb = open_checkpoint(a / "adapter_model.safetensors"), open_checkpoint(b / "adapter_model.safetensors")
    cbase, cft = open_checkpoint(base), open_checkpoint(ft)
    for n in ca.names():
        if ".lora_A." not in n:
            continue
        tensor = n.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = cft.get(tensor).double() - cbase.get(tensor).double()
        errs = []
        for c in (ca, cb):
            approx = c.get(n.replace(".lora_A.", ".lora_B.")).double() @ c.get(n).double()
            errs.append(float((delta - approx).norm() / delta.norm()))
        if abs(errs[0] - errs[1]) > 1e-4:
            return False
    return True


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def run(size_gb: float = 0.5, results: str | Path = "checkpoints/bench", device: str = "cuda",
        rounds: int = MIN_ROUNDS) -> dict:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("bench devices compares cpu with cuda, and CUDA is not available here")
    results = Path(results)
    rows = []
    with tempfile.TemporaryDirectory(dir=results.parent if results.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        spec = model_spec(int(size_gb * 1e9), max_hidden=2048)
        write_pair(tmp / "base", tmp / "ft", spec, shard_size=int(1e9))
        b, f = str(tmp / "base"), str(tmp / "ft")
        for label, args, out in (
            ("extract d=1.0", ["extract", "--base", b, "--finetuned", f, "--density", "1.0"], "d1.safetensors"),
            ("extract d=0.1", ["extract", "--base", b, "--finetuned", f, "--density", "0.1"], "d01.safetensors"),
            ("extract d=0.1 random", ["extract", "--base", b, "--finetuned", f, "--density", "0.1",
                                      "--method", "random"], "dr.safetensors"),
            ("apply d=0.1", ["apply", "--base", b, "--delta", None], "rec"),
            ("extract-lora r=16", ["extract-lora", "--base", b, "--finetuned", f, "--rank", "16"], "lora"),
        ):
            a = [x if x is not None else str(tmp / "cpu-d01.safetensors") for x in args]
            paths = {side: tmp / f"{side}-{out}" for side in ("cpu", "dev")}

            def case(side: str, dev: str):
                return lambda i: {"seconds": _cli(*a, "--out", str(paths[side]), "--device", dev)}

            # cpu and device in turn, `rounds` times: the speed-up is the median of the per-round ratios
            got = alternate({"cpu": case("cpu", "cpu"), "dev": case("dev", device)}, rounds,
                            before=lambda side, i: _remove(paths[side]))
            speedup = ratios(got["cpu"], got["dev"])
            secs = {side: summary(got[side])["seconds"]["median"] for side in got}
            if out.endswith(".safetensors"):
                same = paths["cpu"].read_bytes() == paths["dev"].read_bytes()
            elif out == "rec":
                same = _same_checkpoint(paths["cpu"], paths["dev"])
            else:
                same = _same_lora(paths["cpu"], paths["dev"], tmp / "base", tmp / "ft")
            rows.append({"case": label, "cpu_s": round(secs["cpu"], 2), "device_s": round(secs["dev"], 2),
                         "speedup": round(speedup["median"], 2), "speedup_min": round(speedup["min"], 2),
                         "speedup_max": round(speedup["max"], 2), "rounds": rounds, "same_output": bool(same)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"size_gb": size_gb, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else device,
              "cpu_threads": torch.get_num_threads(), "rows": rows,
              "note": "seconds include process start and imports (about 2-5 s)"}
    results.mkdir(parents=True, exist_ok=True)
    (results / "devices.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"| case | cpu s (median) | {device} s (median) | cpu/{device}: median (min–max of {rounds} rounds) "
          "| same output |", "|---|---:|---:|---:|---|"]
    md += [f"| {r['case']} | {r['cpu_s']} | {r['device_s']} | {r['speedup']} ({r['speedup_min']}–{r['speedup_max']}) "
           f"| {r['same_output']} |" for r in rows]
    (results / "devices.md").write_text(f"# compress bench devices ({report['device']}, {size_gb} GB checkpoints)\n\n"
                                        + "\n".join(md) + "\n")
    print("\n".join(md))
    return report
