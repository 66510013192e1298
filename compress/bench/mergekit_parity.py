"""``compress bench mergekit-parity``: every mergekit method and configuration form through mergekit and
``compress merge``, tensor by tensor.

1. mergekit is installed into the benchmark's own virtual environment (``merge_speed.mergekit_env``).
2. Tiny Llama, Qwen2, Mistral and GPT-2 checkpoints (4 layers, stories260K's 512-token tokenizer) are built in
   float32 and bfloat16: a base, fine-tunes ``a``, ``b`` and ``d`` (base + seeded noise), ``c`` and ``e`` (fine-tunes
   whose tokenizers add two tokens each, one of them shared at another id; embeddings resized) and a PEFT LoRA
   adapter on the base.
3. Every case of ``mergekit_cases.PARITY_CASES`` (every method mergekit registers, no ``dtype:``) and every planned
   form (slices, modules, model+lora, LoRA base, tokenizer sections, chat_template; ``dtype:`` the checkpoints')
   is written as one mergekit YAML per architecture and dtype, and merged by mergekit
   (``mergekit.merge.run_merge``, all jobs in one process of the venv, as ``mergekit-yaml`` runs it) and by compress
   (``load_recipe`` + run, in this process). mergekit's CLI flags are checked once through ``mergekit-yaml`` and
   ``compress merge`` themselves.
4. Deterministic rows must be bit-exact; random rows (DARE, DELLA) are compared with mergekit's own spread
   between two seeds, and the random masks themselves are checked bit for bit in one process (mergekit's
   ``sparsify`` after ``torch.manual_seed(s)`` against compress's ``sparsify_delta`` with a generator seeded s).

Results: ``mergekit_parity.json`` and ``mergekit_parity.md`` under the results folder; the table is printed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from compress.bench import save_results
from compress.bench.merge_speed import mergekit_env, mergekit_version
from compress.bench.mergekit_cases import PARITY_CASES, Case, render_all

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
DTYPES = ("float32", "bfloat16")
SEEDS = (11, 12)
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"

# runs in mergekit's venv: every job through mergekit's own run_merge, one process (mergekit-yaml's start-up is
# half a minute on two cores); then the in-process same-seed checks of the random masks
DRIVER = r'''
import json, sys, time, traceback
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

jobs = json.load(open(sys.argv[1]))
out = {"jobs": [], "masks": []}
for job in jobs["jobs"]:
    start = time.perf_counter()
    try:
        text = open(job["yaml"]).read()
        cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(cfg, job["out"], MergeOptions(random_seed=job.get("seed"), quiet=True,
                                                lora_merge_cache=jobs["lora_cache"]), config_source=text)
        res = {"ok": True}
    except Exception as e:
        res = {"ok": False, "error": (str(e).strip().splitlines() or [type(e).__name__])[0][:200]}
    res["seconds"] = time.perf_counter() - start
    out["jobs"].append(res)
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
from compress.merge.methods import sparsify_delta
for dtype in ("float32", "bfloat16", "float16"):
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(64, 300, generator=g) * 0.01).to(getattr(torch, dtype))
    for name, method, kw, ours in (
            ("random (DARE)", SparsificationMethod.random, {}, "random"),
            ("della (MAGPRUNE)", SparsificationMethod.della_magprune, {"epsilon": 0.1}, "della")):
        torch.manual_seed(5)
        mk = sparsify(delta, density=0.3, method=method, rescale_norm=RescaleNorm.l1, **kw)
        try:
            cp = sparsify_delta(delta, ours, 0.3, rescale="l1", generator=torch.Generator().manual_seed(5),
                                **({"epsilon": 0.1} if kw else {}))
            same = bool(torch.equal(mk, cp.to(mk.dtype))) and cp.dtype == mk.dtype
            worst = float((mk.float() - cp.float()).abs().max() / mk.float().abs().max())
        except Exception as e:
            same, worst = False, str(e).splitlines()[0]
        out["masks"].append({"sparsify": name, "dtype": dtype, "bit_exact": same, "worst_rel_diff": worst})
json.dump(out, open(sys.argv[2], "w"), indent=1)
'''


def _log(msg: str) -> None:
    print(f"[bench mergekit-parity] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ checkpoints

def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=512, num_hidden_layers=4, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=512, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, **common)


def build_models(root: Path, arch: str, dtype: str) -> dict[str, str]:
    """base, a, b, c (two added tokens), d and a LoRA adapter of one architecture in one dtype (built once)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    folder = root / f"{arch}-{dtype}"
    names = {k: str(folder / k) for k in ("base", "a", "b", "c", "d", "e", "lora")}
    if (folder / "done").is_file() and all(Path(v).is_dir() for v in names.values()):
        return names
    shutil.rmtree(folder, ignore_errors=True)
    tok_dir = root / "stories"
    if not (tok_dir / "tokenizer.json").is_file():
        convert_llama2c(*stories260k_files(), tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(arch))
    dt = getattr(torch, dtype)
    base.to(dt).save_pretrained(names["base"])
    tok.save_pretrained(names["base"])
    for i, k in enumerate(("a", "b", "c", "d", "e")):
        m = AutoModelForCausalLM.from_pretrained(names["base"], dtype=torch.float32)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        t = AutoTokenizer.from_pretrained(tok_dir)
        if k in ("c", "e"):  # e shares <tool> with c at another id, and adds <x>
            t.add_tokens(["<tool>", "<done>"] if k == "c" else ["<x>", "<tool>"])
            m.resize_token_embeddings(len(t), mean_resizing=False)
            with torch.no_grad():
                emb = m.get_input_embeddings().weight
                emb[512:] = 0.02 * torch.randn(2, emb.shape[1], generator=g)
        m.to(dt).save_pretrained(names[k])
        t.save_pretrained(names[k])
    m = AutoModelForCausalLM.from_pretrained(names["base"], dtype=dt)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    torch.manual_seed(3)
    get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
                   ).save_pretrained(names["lora"])
    (folder / "done").write_text("")
    return names


# ------------------------------------------------------------------------------------------------ the rows

def _src(model: str, a: int, b: int, **params) -> dict:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


def forms(p: dict[str, str], dtype: Optional[str] = None) -> dict[str, dict]:
    """The planned configuration forms (issue 20), each a mergekit YAML on the paths ``p``; ``dtype`` named in
    each (the method cases leave it out, so that they test mergekit's default)."""
    ta = {"merge_method": "task_arithmetic", "base_model": p["base"]}
    return {k: {**v, **({"dtype": dtype} if dtype else {})} for k, v in {
        "slices: frankenmerge (passthrough)": {"merge_method": "passthrough", "slices": [
            {"sources": [_src(p["a"], 0, 3)]}, {"sources": [_src(p["b"], 1, 4)]}]},
        "slices: slerp, t per slice": {"merge_method": "slerp", "base_model": p["base"], "slices": [
            {"sources": [_src(p["base"], 0, 2), _src(p["a"], 0, 2)], "parameters": {"t": [0.0, 1.0]}},
            {"sources": [_src(p["base"], 2, 4), _src(p["a"], 2, 4)],
             "parameters": {"t": [{"filter": "attn", "value": [0.2, 0.7]}, {"value": 0.4}]}}]},
        "slices: per-source parameters": {**ta, "parameters": {"lambda": 0.9}, "slices": [
            {"sources": [_src(p["base"], 0, 2), _src(p["a"], 0, 2, weight=0.5), _src(p["b"], 0, 2, weight=0.3)]},
            {"sources": [_src(p["base"], 2, 4), _src(p["a"], 2, 4, weight=1.0),
                         _src(p["b"], 2, 4, weight=[{"filter": "mlp", "value": 0.2}, {"value": 0.8}])],
             "parameters": {"lambda": 0.7}}]},
        "modules: default (ties)": {"merge_method": "ties", "base_model": p["base"], "modules": {"default": {
            "parameters": {"density": 0.5},
            "models": [{"model": p["a"], "parameters": {"weight": 0.7}},
                       {"model": p["b"], "parameters": {"weight": 0.5}}]}}},
        "model+lora": {**ta, "models": [{"model": f"{p['a']}+{p['lora']}", "parameters": {"weight": 0.5}},
                                        {"model": p["b"], "parameters": {"weight": 0.5}}]},
        "LoRA as base_model": {**ta, "base_model": f"{p['base']}+{p['lora']}",
                               "models": [{"model": p["a"], "parameters": {"weight": 0.6}}]},
        "tokenizer_source: union": {**ta, "tokenizer_source": "union", "models": [
            {"model": p["c"], "parameters": {"weight": 0.8}}, {"model": p["a"], "parameters": {"weight": 0.3}}]},
        "tokenizer_source: union, two new vocabularies": {**ta, "tokenizer_source": "union", "models": [
            {"model": p["c"], "parameters": {"weight": 0.8}}, {"model": p["e"], "parameters": {"weight": 0.5}},
            {"model": p["a"], "parameters": {"weight": 0.3}}]},
        "tokenizer_source: base": {**ta, "tokenizer_source": "base", "models": [
            {"model": p["c"], "parameters": {"weight": 0.8}}]},
        "tokenizer_source: <model>": {**ta, "tokenizer_source": p["c"], "models": [
            {"model": p["c"], "parameters": {"weight": 0.8}}]},
        "tokenizer: tokens overrides": {**ta, "tokenizer": {
            "source": "union", "pad_to_multiple_of": 64, "tokens": {
                "<done>": {"source": {"kind": "zero"}, "force": True},
                "<tool>": {"source": {"kind": "model_token", "model": p["base"], "token_id": 7}},
                "<new>": {"source": {"kind": "model_token", "model": p["a"], "token": "</s>"}},
                "<s>": {"source": p["a"], "force": True}}},
            "models": [{"model": p["c"], "parameters": {"weight": 0.8}},
                       {"model": p["a"], "parameters": {"weight": 0.3}}]},
        "chat_template": {**ta, "chat_template": TEMPLATE, "models": [
            {"model": p["a"], "parameters": {"weight": 0.5}}]},
        **{f"chat_template: {name}": {**ta, "chat_template": name, "models": [
            {"model": p["a"], "parameters": {"weight": 0.5}}]} for name in ("chatml", "llama3")},
    }.items()}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(mk: Path, ours: Path) -> dict:
    """Names, dtypes and values tensor by tensor; worst relative difference max|x − y| / max|y| (y: mergekit's)."""
    x, y = _tensors(ours), _tensors(mk)
    order = _token_order(mk, ours)
    if order is not None:  # the same tokens at other ids: mergekit's rows moved to ours, token by token
        y = {n: t[order] if t.dim() and t.shape[0] == len(order) else t for n, t in y.items()}
    if set(x) != set(y):
        diff = sorted(set(x) ^ set(y))
        return {"same_names": False, "equal": 0, "tensors": len(y), "worst_rel_diff": float("inf"),
                "name_differences": diff[:3]}
    equal, worst, worst_name, rel_l2 = 0, 0.0, "", 0.0
    for n, b in y.items():
        a = x[n]
        if a.dtype == b.dtype and torch.equal(a, b):
            equal += 1
            continue
        a, b = a.double(), b.double()
        r = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        rel_l2 = max(rel_l2, float((a - b).norm() / b.norm().clamp(min=1e-30)))
        if r > worst:
            worst, worst_name = r, n
    return {"same_names": True, "equal": equal, "tensors": len(y), "worst_rel_diff": worst,
            "worst_tensor": worst_name, "worst_rel_l2": rel_l2,
            "dtypes_equal": all(x[n].dtype == y[n].dtype for n in y), "token_order_differs": order is not None,
            **_aux(mk, ours)}


def _token_order(mk: Path, ours: Path) -> Optional[torch.Tensor]:
    """mergekit's id of each of our ids when both vocabularies hold the same tokens at other ids (None otherwise).
    mergekit's union adds the new tokens of its models in the order of a Python set of model references, so that
    order changes with PYTHONHASHSEED from one run to the next; compress takes the recipe's order."""
    if not ((mk / "tokenizer.json").is_file() and (ours / "tokenizer.json").is_file()):
        return None
    from transformers import AutoTokenizer

    va, vb = AutoTokenizer.from_pretrained(mk).get_vocab(), AutoTokenizer.from_pretrained(ours).get_vocab()
    if va == vb or set(va) != set(vb):
        return None
    return torch.tensor([va[t] for t, _ in sorted(vb.items(), key=lambda kv: kv[1])])


def _aux(mk: Path, ours: Path) -> dict:
    """The configs' layer and vocabulary counts, and the tokenizers (vocabulary, chat template)."""
    out = {}
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (mk, ours))
    keys = [k for k in ("num_hidden_layers", "n_layer", "vocab_size") if k in ca]
    out["config_equal"] = all(ca.get(k) == cb.get(k) for k in keys)
    if (mk / "tokenizer.json").is_file() and (ours / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        ta, tb = AutoTokenizer.from_pretrained(mk), AutoTokenizer.from_pretrained(ours)
        same = ta.get_vocab() == tb.get_vocab() or set(ta.get_vocab()) == set(tb.get_vocab())  # see _token_order
        template = ta.chat_template == tb.chat_template
        if not template and ta.chat_template and tb.chat_template:
            # a named template: compress ships its own text of it, which must render mergekit's strings
            template = render_all(ta.chat_template, ta) == render_all(tb.chat_template, ta)
            out["template_text_differs"] = True
        out["tokenizer_equal"] = same and template
    return out


def _run_ours(yml: Path, out: Path, seed: Optional[int] = None) -> dict:
    from compress.errors import CompressError
    from compress.merge import load_recipe, run_merge

    start = time.perf_counter()
    try:
        cfg = load_recipe(yml, out=out, overwrite=True, quiet=True, seed=seed)
        run_merge(cfg, quiet=True)
        res: dict = {"ok": True}
    except CompressError as e:
        res = {"ok": False, "error": str(e).replace(str(yml), "recipe")[:200]}
    except Exception as e:  # a bug is a row too, not the end of the benchmark
        res = {"ok": False, "error": f"crash: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    res["seconds"] = time.perf_counter() - start
    return res


def _cli_row(exe: Path, paths: dict[str, str], work: Path) -> dict:
    """mergekit's CLI flags through both command lines: positional OUT, --out-shard-size, --random-seed,
    --copy-tokenizer, --lazy-unpickle."""
    recipe = PARITY_CASES[[c.method for c in PARITY_CASES].index("ties")].recipe(paths, "float32")
    yml = work / "cli.yml"
    yml.write_text(yaml.safe_dump(recipe))
    flags = ["--out-shard-size", "20K", "--random-seed", "5", "--copy-tokenizer", "--lazy-unpickle"]
    runs = {}
    for tool, argv in (("mergekit", [str(exe), str(yml), str(work / "cli-mk"), *flags]),
                       ("compress", [sys.executable, "-m", "compress.cli", "merge", str(yml), str(work / "cli-ours"),
                                     "--overwrite", *flags])):
        shutil.rmtree(work / f"cli-{'mk' if tool == 'mergekit' else 'ours'}", ignore_errors=True)
        start = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COMPRESS_QUIET": "1"})
        runs[tool] = {"ok": r.returncode == 0, "seconds": time.perf_counter() - start,
                      "error": (r.stderr.strip().splitlines() or [""])[-1][:200] if r.returncode else None}
    row = {"name": "CLI: CONFIG OUT --out-shard-size 20K --random-seed 5 --copy-tokenizer --lazy-unpickle",
           "arch": "llama", "dtype": "float32", "random": False, "mergekit": runs["mergekit"],
           "compress": runs["compress"]}
    if runs["mergekit"]["ok"] and runs["compress"]["ok"]:
        row["compare"] = compare(work / "cli-mk", work / "cli-ours")
        row["shards"] = {t: len(list((work / d).glob("*.safetensors"))) for t, d in (("mergekit", "cli-mk"),
                                                                                      ("compress", "cli-ours"))}
        row["compare"]["shards_equal"] = row["shards"]["mergekit"] == row["shards"]["compress"]
    return row


def run(workdir: str | os.PathLike = "checkpoints/bench-mergekit-parity",
        results: str | os.PathLike = "checkpoints/bench", *, mergekit: str = "mergekit",
        venv: str | os.PathLike | None = None, archs: tuple[str, ...] = ARCHS, dtypes: tuple[str, ...] = DTYPES,
        cases: tuple[Case, ...] = PARITY_CASES, with_forms: bool = True, print_table: bool = True) -> dict:
    workdir, results = Path(workdir), Path(results)
    workdir.mkdir(parents=True, exist_ok=True)
    exe = mergekit_env(Path(venv) if venv else workdir / "mergekit-venv", mergekit)
    version = mergekit_version(exe)
    start = time.perf_counter()
    rows, jobs = [], []
    for arch in archs:
        for dtype in dtypes:
            _log(f"checkpoints: {arch} {dtype}")
            paths = build_models(workdir / "models", arch, dtype)
            recipes = [(c.name, c.recipe(paths), c.random) for c in cases]
            if with_forms:
                recipes += [(k, v, False) for k, v in forms(paths, dtype).items()]
            for name, recipe, random in recipes:
                tag = f"{arch}-{dtype}-{len(rows)}"
                yml = workdir / "recipes" / f"{tag}.yml"
                yml.parent.mkdir(exist_ok=True)
                yml.write_text(yaml.safe_dump(recipe, sort_keys=False))
                row = {"name": name, "arch": arch, "dtype": dtype, "random": random, "yaml": str(yml),
                       "outs": [str(workdir / "out" / f"{tag}-mk{s}") for s in (SEEDS if random else SEEDS[:1])],
                       "ours": str(workdir / "out" / f"{tag}-ours")}
                rows.append(row)
                for s, o in zip(SEEDS, row["outs"]):
                    shutil.rmtree(o, ignore_errors=True)
                    jobs.append({"yaml": str(yml), "out": o, "seed": s})
    (workdir / "jobs.json").write_text(json.dumps({"jobs": jobs, "lora_cache": str(workdir / "lora-cache")}))
    (workdir / "driver.py").write_text(DRIVER)
    _log(f"{len(jobs)} mergekit merges in one process of {exe.parent / 'python'} ...")
    r = subprocess.run([str(exe.parent / "python"), str(workdir / "driver.py"), str(workdir / "jobs.json"),
                        str(workdir / "mk-results.json")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"mergekit driver failed: {r.stderr.strip().splitlines()[-1:]}")
    mk = json.loads((workdir / "mk-results.json").read_text())
    it = iter(mk["jobs"])
    _log(f"{len(rows)} compress merges ...")
    for row in rows:
        row["mergekit"] = [next(it) for _ in row["outs"]]
        row["compress"] = _run_ours(Path(row["yaml"]), Path(row["ours"]), SEEDS[0])
        if row["mergekit"][0]["ok"] and row["compress"]["ok"]:
            row["compare"] = compare(Path(row["outs"][0]), Path(row["ours"]))
            if row["random"] and row["mergekit"][1]["ok"]:
                row["spread"] = compare(Path(row["outs"][0]), Path(row["outs"][1]))
        row["mergekit"] = row["mergekit"][0] | {"seconds": sum(j["seconds"] for j in row["mergekit"])}
    if "llama" in archs and "float32" in dtypes:
        _log("mergekit's CLI flags through mergekit-yaml and compress merge ...")
        rows.append(_cli_row(exe, build_models(workdir / "models", "llama", "float32"), workdir))
    for row in rows:
        row["verdict"] = verdict(row)
    report = {"benchmark": "mergekit-parity", "mergekit_version": version, "rows": rows, "masks": mk["masks"],
              "seconds": time.perf_counter() - start,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "platform": platform.platform()}}
    save_results(results, "mergekit_parity", report, markdown(report))
    _log(f"wrote {results / 'mergekit_parity.json'} and .md")
    if print_table:
        print(markdown(report))
    return report


def verdict(row: dict) -> str:
    mk, ours = row["mergekit"], row["compress"]
    if not mk["ok"]:
        return "mergekit refuses" + (" (compress too)" if not ours["ok"] else "")
    if not ours["ok"]:
        return "refused"
    c = row["compare"]
    if not c["same_names"]:
        return "tensor names differ"
    exact = c["equal"] == c["tensors"] and all(c.get(k, True) for k in ("config_equal", "tokenizer_equal",
                                                                        "shards_equal"))
    if exact:
        if c.get("token_order_differs"):
            return "bit-exact up to mergekit's token order"
        return "bit-exact (own template text, renders equal)" if c.get("template_text_differs") else "bit-exact"
    if row["random"] and "spread" in row:
        return "within seed spread" if c["worst_rel_l2"] <= 1.5 * row["spread"]["worst_rel_l2"] else "beyond spread"
    if not all(c.get(k, True) for k in ("config_equal", "tokenizer_equal", "shards_equal")):
        return "config/tokenizer/shards differ"
    return "float rounding" if c["worst_rel_diff"] < 1e-5 else "differs"


COLUMNS = ("method or form", "arch", "dtype", "accepted (mergekit / compress)", "tensors equal",
           "worst rel diff", "seed spread", "verdict")


def _cell(row: dict) -> list[str]:
    c, s = row.get("compare"), row.get("spread")
    acc = f"{'yes' if row['mergekit']['ok'] else 'no'} / {'yes' if row['compress']['ok'] else 'no'}"
    eq = f"{c['equal']}/{c['tensors']}" if c else "–"
    worst = "–" if not c else ("names differ" if not c["same_names"] else f"{c['worst_rel_diff']:.2g}")
    spread = f"{s['worst_rel_diff']:.2g}" if s and s["same_names"] else "–"
    return [row["name"], row["arch"], row["dtype"], acc, eq, worst, spread, row["verdict"]]


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# compress bench mergekit-parity (mergekit {report['mergekit_version']})", "",
             "Each row: one mergekit YAML through mergekit and `compress merge` on tiny 4-layer checkpoints; worst "
             "rel diff = max |compress − mergekit| / max |mergekit| over the tensors; seed spread = the same between "
             "two mergekit seeds (random methods). The method rows leave `dtype:` out (mergekit's default: merge "
             "in the checkpoints' dtype); the form rows (slices, modules, LoRA, tokenizer) name the checkpoints' "
             "dtype.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4 + ["---"]) + "|"]
    lines += ["| " + " | ".join(_cell(r)) + " |" for r in rows]
    lines += ["", "## Summary per method or form", "", "| method or form | rows | bit-exact | other verdicts |",
              "|---|---:|---:|---|"]
    by: dict[str, list[str]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r["verdict"])
    for name, vs in by.items():
        other = sorted({v for v in vs if v != "bit-exact"})
        lines.append(f"| {name} | {len(vs)} | {vs.count('bit-exact')} | {', '.join(other) or '–'} |")
    verdicts = sorted({r["verdict"] for r in rows}, key=lambda v: (not v.startswith("bit-exact"), v))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    lines += ["", "## Verdicts per architecture (rows, both dtypes)", "", "| verdict | " + " | ".join(archs) + " |",
              "|---|" + "---:|" * len(archs)]
    for v in verdicts:
        lines.append(f"| {v} | " + " | ".join(str(sum(r['verdict'] == v and r['arch'] == a for r in rows))
                                               for a in archs) + " |")
    lines += ["", "## Random masks in one process (mergekit's sparsify at density 0.3 after torch.manual_seed(5) vs "
              "compress's sparsify_delta with a generator seeded 5, on a 64×300 delta)", "",
              "| sparsify | dtype | bit-exact | worst rel diff |", "|---|---|---|---:|"]
    for m in report["masks"]:
        w = m["worst_rel_diff"]
        lines.append(f"| {m['sparsify']} | {m['dtype']} | {'yes' if m['bit_exact'] else 'no'} | "
                     f"{w if isinstance(w, str) else f'{w:.2g}'} |")
    errors = {(r["name"], r["compress"]["error"]) for r in rows if not r["compress"]["ok"] and r["mergekit"]["ok"]}
    if errors:
        lines += ["", "## Refused by compress (first line of the error)", ""]
        lines += [f"- {n}: {e}" for n, e in sorted(errors)]
    m = report["machine"]
    lines += ["", f"{len(rows)} rows in {report['seconds']:.0f} s; Python {m['python']}, torch {m['torch']}, "
              f"{m['cpus']} CPUs.", ""]
    return "\n".join(lines)
