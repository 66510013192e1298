"""`compress bench ...`: each command parses its options and calls its benchmark's ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from compress.config import build
from compress.errors import CompressError
from compress.extras import require
from compress.options import CALIB_CACHE, DEVICE, QUIET, RESULTS, RESULTS_DIR, ZOO_ROOT, csv, pair
from compress.runtime import resolve_device, torch_dtype

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print and save what they measure.")


@bench_app.command("io-memory")
def bench_io_memory(
    size_gb: float = typer.Option(1.0, help="Size of each random checkpoint."),
    workdir: Path = typer.Option(Path("checkpoints/bench-io-memory"), help="Scratch folder (removed after)."),
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON and markdown results go."),
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
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON and markdown results go."),
):
    """Bytes `compress apply` writes (/proc/self/io) against the size of the folder it writes."""
    from compress.bench.write_once import run

    run(size_gb=size_gb, workdir=workdir, results=results, before=before)


@bench_app.command("devices")
def bench_devices(
    size_gb: float = typer.Option(0.5, help="Size of each random checkpoint."),
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON and markdown results go."),
    device: str = typer.Option("cuda", help="The device compared with the CPU."),
):
    """extract / apply / extract-lora on the CPU and on the GPU: same outputs? how much faster?"""
    from compress.bench.devices import run

    run(size_gb=size_gb, results=results, device=resolve_device(device))


@bench_app.command("scale")
def bench_scale(
    sizes: str = typer.Option("1b,7b", help="Comma-separated: tiny (CPU test), 1b (TinyLlama 1.1B shape), 7b."),
    jobs: str = typer.Option("merge,extract,apply,prune,batch", help="Comma-separated: merge, prune (both methods), "
                                                                      "or merge_ties, merge_task_arithmetic, extract, "
                                                                      "apply, prune_wanda, prune_sparsegpt, batch."),
    out: Path = typer.Option(Path("checkpoints/bench/scale"), help="Where scale.json, .md and .png go (rows "
                                                                   "already there for other jobs are kept)."),
    workdir: Path = typer.Option(Path("checkpoints/bench-scale"), help="Random checkpoints (reused when they match) "
                                                                       "and job outputs."),
    pairs: Optional[int] = typer.Option(None, help="A B A B pairs against mergekit / llm-compressor (default 3; 1 "
                                                   "for 7b)."),
    tools_path: Optional[str] = typer.Option(None, help="PYTHONPATH entry where mergekit and llm-compressor are "
                                                        "installed (default: this environment)."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Run mergekit and llm-compressor beside."),
    side: str = typer.Option("both", help="both (A B A B), compress or tool: one side only, to split a run over "
                                          "several calls (the ratio is then unpaired)."),
    finetunes: Optional[int] = typer.Option(None, help="Fine-tunes per size (default 3; 2 for 7b)."),
    keep: bool = typer.Option(True, "--keep/--no-keep", help="Keep the checkpoints for the next run."),
    seed: int = typer.Option(0, help="Seed of the random checkpoints."),
    device: str = DEVICE,
):
    """Wall time, peak GPU memory, peak RSS and GB/s of merge, extract, apply, prune and batch on 1B/7B-shaped
    random Llamas, beside mergekit and llm-compressor, with a 70B-class estimate."""
    from compress.bench.scale import parse_jobs, parse_sizes, run

    if pairs is not None and pairs < 1:
        raise CompressError(f"--pairs {pairs}: need at least 1")
    if side not in ("both", "compress", "tool"):
        raise CompressError(f"--side {side}: choose both, compress or tool")
    if finetunes is not None and finetunes < 1:
        raise CompressError(f"--finetunes {finetunes}: need at least 1")
    run(parse_sizes(sizes), jobs=parse_jobs(jobs), device=resolve_device(device), out=out, workdir=workdir,
        pairs=pairs, tools_path=tools_path, compare=compare, finetunes=finetunes, seed=seed, keep=keep, side=side)


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


@bench_app.command("merge")
def bench_merge(
    zoo: str = typer.Argument("minilm-8task", help="minilm-8task or lm-zoo (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    dev_limit: Optional[int] = typer.Option(500, help="Dev rows per task for choosing λ (0: all)."),
    test_limit: Optional[int] = typer.Option(None, help="Test rows per task (default: all)."),
    quick: bool = typer.Option(False, help="3 λ, no setting grid, few WUDI/AdaMerging steps: a CPU smoke run."),
    rows: Optional[str] = typer.Option(None, help="Comma-separated merge rows to run (default: all); the other rows "
                                       "of an earlier run in --results with the same settings are kept."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Zero-shot, individual, average, task arithmetic, TIES, DARE-TIES, TSV-M, Iso-C, Iso-CTS, WUDI and AdaMerging
    on the zoo's fine-tuned models."""
    from compress.bench.merge import chosen_rows, run

    require("bench", "compress bench merge", ("matplotlib",))
    chosen_rows(rows)  # an unknown row fails before the device is touched

    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), dev_limit=dev_limit or None,
        test_limit=test_limit, quiet=quiet, quick=quick, rows=rows)


@bench_app.command("prune")
def bench_prune(
    zoo: str = typer.Argument("stories260k", help="stories260k or lm-zoo (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Calibration window (default min(512, max positions))."),
    max_tokens: Optional[int] = typer.Option(None, help="Score the first N held-out tokens only (default: all on "
                                                        "CUDA, 65536 on a CPU)."),
    k: int = typer.Option(16, help="Strategies in the shared-calibration timing."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Perplexity of magnitude / Wanda / SparseGPT (50%, 2:4, 4:8, 70% ± OWL), shared-calibration time, sizes."""
    from compress.bench.prune import run

    require("bench", "compress bench prune", ("matplotlib",))

    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), nsamples=nsamples, seqlen=seqlen,
        max_tokens=max_tokens, k=k, quiet=quiet)


@bench_app.command("calibration")
def bench_calibration(
    zoos: Optional[list[str]] = typer.Argument(None, help="stories260k (bundled) and/or lm-zoo (built by "
                                                          "`compress zoo build lm-zoo`); default both."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = RESULTS,
    seeds: int = typer.Option(3, help="Calibration seeds 0..N-1 (each draws its own windows)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration windows (default 128; 8 with --quick)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default 256, at most the "
                                                    "model's positions; 64 with --quick)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score the first N dev and test tokens (default: all on "
                                                        "CUDA, 65536 on a CPU, 2048 with --quick)."),
    methods: str = typer.Option("wanda,sparsegpt", help="Comma-separated: wanda, sparsegpt."),
    sparsities: str = typer.Option("50%,70%,80%,2:4", help="Comma-separated: 50%, 70%, 80%, 2:4."),
    blockwise: Optional[bool] = typer.Option(None, "--blockwise/--in-memory",
                                             help="Prune to a folder and score it block by block, or in memory "
                                                  "(default: block by block when the weights take over half the "
                                                  "free device memory)."),
    quick: bool = typer.Option(False, "--quick", help="CI size: few short windows, 2048 scored tokens."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """Wanda and SparseGPT at 50/70/80% and 2:4, sequential against shared calibration, over seeds; dev decides."""
    from compress.bench.calibration import run

    require("bench", "compress bench calibration", ("matplotlib",))
    run(zoos, zoo_root=zoo_root, results=results, seeds=seeds, nsamples=nsamples, seqlen=seqlen,
        max_tokens=max_tokens, device=resolve_device(device), quick=quick, blockwise=blockwise,
        methods=tuple(v.strip() for v in methods.split(",") if v.strip()),
        sparsities=tuple(v.strip() for v in sparsities.split(",") if v.strip()), quiet=quiet)


@bench_app.command("prune-memory")
def bench_prune_memory(
    params: float = typer.Option(3e8, help="Parameters of the random float32 Llama."),
    methods: str = typer.Option("wanda", help="Comma-separated pruning methods to measure."),
    calibrations: str = typer.Option("sequential,shared", help="Comma-separated calibration modes to measure."),
    nsamples: int = typer.Option(8, help="Calibration windows."),
    seqlen: int = typer.Option(128, help="Tokens per calibration window."),
    workdir: Path = typer.Option(Path("checkpoints/bench-prune-memory"), help="Scratch folder (removed after)."),
    results: Path = RESULTS,
):
    """Peak RSS of `compress prune` (block by block, CPU) against the weight bytes, each case in its own process."""
    from compress.bench.prune_memory import run
    from compress.prune.registry import get_prune_method

    names = tuple(v.strip() for v in methods.split(",") if v.strip())
    modes = tuple(v.strip() for v in calibrations.split(",") if v.strip())
    for name in names:
        get_prune_method(name)
    bad = [m for m in modes if m not in ("sequential", "shared")]
    if not names or not modes or bad:
        raise CompressError(f"--methods / --calibrations: give comma-separated names (calibrations: sequential, "
                            f"shared{'; got ' + bad[0] if bad else ''})")
    run(params=params, workdir=workdir, results=results, methods=names, calibrations=modes, nsamples=nsamples,
        seqlen=seqlen)


@bench_app.command("nps")
def bench_nps(
    zoo: str = typer.Argument("minilm-8task", help="minilm-8task (built by `compress zoo build`)."),
    zoo_root: Path = ZOO_ROOT,
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON, markdown and the plot go (results "
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
    merge_objective: str = typer.Option("accuracy", help="Merge search objective: accuracy (mean dev accuracy, "
                                                         "as λ is chosen for TIES), kl or loss."),
    merge_density: float = typer.Option(0.2, help="Density of each task vector in the NPS merge (TIES' trim)."),
    merge_grouping: str = typer.Option("layer", help="Merge protocol candidates: part weights per none, layer or "
                                                     "module (comma-separated; chosen on the validation half)."),
    merge_parts: str = typer.Option("1", "--merge-m", help="Merge protocol candidates: M (comma-separated)."),
    merge_strength: str = typer.Option("0,1", help="Merge protocol candidates: strength of the penalty on the "
                                                   "distance from TIES (comma-separated)."),
    merge_budget: int = typer.Option(200, help="Evaluations of each merge search (the largest budget)."),
    merge_checkpoints: str = typer.Option("50,100", help="Smaller budgets whose best point is validated too "
                                                         "(the budget is chosen on the validation half)."),
    merge_seeds: str = typer.Option("0,1,2", help="Seeds of the merge protocol (dev split and search)."),
    merge_margin: float = typer.Option(0.0, help="NPS is kept if it beats TIES on validation by more than this."),
    merge_lambdas: Optional[str] = typer.Option(None, help="TIES' λ grid in the merge protocol, comma-separated "
                                                "(default 0.1 … 2.0, 13 values)."),
    cost_budgets: str = typer.Option("30,60,120,240", help="Budgets of the cost sweep."),
    cost_ms: str = typer.Option("2,4,8,16", help="M values of the cost sweep."),
    dev_limit: int = typer.Option(500, help="Dev rows per task for the search (0: all)."),
    test_limit: Optional[int] = typer.Option(None, help="Test rows per task (default: all)."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """NPS against magnitude top-k and DARE (compression), TIES and task arithmetic (merging), and search cost."""
    from compress.bench.nps import MergeProtocol, run
    from compress.config import NpsSearch

    require("search", "compress bench nps")
    require("bench", "compress bench nps", ("matplotlib",))
    if zoo != "minilm-8task":
        raise CompressError(f"bench nps runs on minilm-8task, not '{zoo}'")
    floats = lambda s, flag: [float(v) for v in csv(s, flag)]  # noqa: E731
    search = build(NpsSearch, budget=budget, parts=nps_parts, grouping=grouping, objective=objective,
                   dev_limit=dev_limit or None, select=select)
    merge_search = build(NpsSearch, **{**search.model_dump(), "select": "topk", "objective": merge_objective,
                                       "task_weights": "per_task", "combine": "ties"})
    proto = MergeProtocol(seeds=tuple(int(v) for v in floats(merge_seeds, "--merge-seeds")),
                          groupings=tuple(v.strip() for v in merge_grouping.split(",") if v.strip()),
                          ms=tuple(int(v) for v in floats(merge_parts, "--merge-m")),
                          strengths=tuple(floats(merge_strength, "--merge-strength")), budget=merge_budget,
                          checkpoints=tuple(int(v) for v in floats(merge_checkpoints, "--merge-checkpoints")),
                          margin=merge_margin,
                          **({"lambdas": tuple(floats(merge_lambdas, "--merge-lambdas"))} if merge_lambdas else {}))
    run(zoo_root, results, device=resolve_device(device), tasks=csv(tasks, "--tasks") if tasks else None,
        densities=floats(densities, "--densities"), parts=tuple(csv(parts, "--parts")), search=search,
        merge_search=merge_search,
        merge_density=merge_density, merge_protocol=proto,
        cost_budgets=[int(v) for v in floats(cost_budgets, "--cost-budgets")],
        cost_ms=[int(v) for v in floats(cost_ms, "--cost-ms")], dev_limit=dev_limit or None,
        test_limit=test_limit, quiet=quiet)


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
    kappa: float = typer.Option(0.0, help="StratNet trains through the GP's mean + kappa · posterior std (0: the "
                                          "mean, as the paper)."),
    optimizer: str = typer.Option("cma", help="Per-request search: cma or bayes."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    eval_windows: int = typer.Option(32, help="Held-out windows the KL runs on."),
    seed: int = typer.Option(0, help="Seed."),
    streaming: Optional[bool] = typer.Option(None, "--streaming/--in-memory",
                                             help="Evaluate block by block (only the embeddings and one block on "
                                                  "the device) or with the model in memory (default: block by "
                                                  "block when the float32 weights take over half the free device "
                                                  "memory)."),
    dtype: str = typer.Option("float32", help="--streaming: the dtype blocks run in (float32, bfloat16)."),
    host_cache: bool = typer.Option(False, "--host-cache", help="--streaming: keep each block's weights in pinned "
                                                                "host memory after the first read (the model's size "
                                                                "in host RAM; no file reads per evaluation)."),
    search_requests: Optional[int] = typer.Option(None, help="Time the per-request search on this many of the "
                                                             "requests (evenly spread) and scale it to all; both "
                                                             "figures are printed (default: every request)."),
    device: str = DEVICE, quiet: bool = QUIET,
):
    """UniCuCo (StratNet through a GP) against a search per request: total time, KL, sparsity error, Pareto plot.
    ZOO may be any causal LM folder with a tokenizer (a 7B-class random Llama: --streaming --search-requests 4)."""
    from compress.bench.unicuco import run

    require("search", "compress bench unicuco")
    require("bench", "compress bench unicuco", ("matplotlib",))

    if optimizer not in ("cma", "bayes"):
        raise CompressError(f"--optimizer {optimizer}: choose cma or bayes")
    if not kappa >= 0 or kappa == float("inf"):
        raise CompressError(f"--kappa {kappa:g}: must be a finite number >= 0")
    if requests < 1 or budget < 2 or train_budget < 8 or (search_requests is not None and search_requests < 1):
        raise CompressError("--requests >= 1, --budget >= 2, --train-budget >= 8 and --search-requests >= 1")
    lo, hi = pair(sparsity_range, "--sparsity-range")
    if not 0 < lo < hi < 0.95:
        raise CompressError(f"--sparsity-range {sparsity_range}: need 0 < low < high < 0.95")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CompressError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    run(zoo, zoo_root=zoo_root, results=results, device=resolve_device(device), requests=requests,
        sparsity_range=(lo, hi), budget=budget, train_budget=train_budget, rounds=rounds, steps=steps, kappa=kappa,
        optimizer=optimizer, nsamples=nsamples, eval_windows=eval_windows, seed=seed, streaming=streaming,
        dtype=torch_dtype(dtype), host_cache=host_cache, search_requests=search_requests, quiet=quiet)


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
    cache_dir: Path = CALIB_CACHE,
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


@bench_app.command("mergekit-parity")
def bench_mergekit_parity(
    workdir: Path = typer.Option(Path("checkpoints/bench-mergekit-parity"), help="Models, venv and outputs."),
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON and markdown results go."),
    mergekit: str = typer.Option("mergekit", help="What follows `pip install` to get mergekit."),
    venv: Optional[Path] = typer.Option(None, help="Virtual environment for mergekit (default: "
                                                   "WORKDIR/mergekit-venv)."),
    archs: str = typer.Option("llama,qwen2,mistral,gpt2", help="Architectures, comma-separated."),
    dtypes: str = typer.Option("float32,bfloat16", help="dtypes of the checkpoints, comma-separated."),
    methods: Optional[str] = typer.Option(None, help="Only these cases (comma-separated method names)."),
    forms: bool = typer.Option(True, "--forms/--no-forms", help="Also the slices, modules, LoRA and tokenizer "
                                                                "forms."),
):
    """Every mergekit method and form through mergekit and `compress merge`: accepted, tensors equal, worst
    relative difference, per architecture and dtype."""
    from compress.bench.mergekit_cases import PARITY_CASES
    from compress.bench.mergekit_parity import ARCHS, DTYPES, run

    def names(text: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in text.split(",") if v.strip())

    a, d = names(archs), names(dtypes)
    for v, known, flag in ((a, ARCHS, "--archs"), (d, DTYPES, "--dtypes")):
        bad = [x for x in v if x not in known]
        if bad:
            raise CompressError(f"{flag}: '{bad[0]}' is not one of {', '.join(known)}")
    cases = PARITY_CASES
    if methods:
        wanted, known = names(methods), list(dict.fromkeys(c.method for c in PARITY_CASES))
        bad = [m for m in wanted if m not in known]
        if bad:
            raise CompressError(f"--methods: '{bad[0]}' is not one of {', '.join(known)}")
        cases = tuple(c for c in PARITY_CASES if c.method in wanted)
    run(workdir=workdir, results=results, mergekit=mergekit, venv=venv, archs=a, dtypes=d, cases=cases,
        with_forms=forms)


@bench_app.command("merge-speed")
def bench_merge_speed(
    params: float = typer.Option(0.5e9, help="Parameters per model (three bf16 Llama checkpoints)."),
    workdir: Path = typer.Option(Path("checkpoints/bench-merge-speed"), help="Models, venv and outputs."),
    results: Path = typer.Option(RESULTS_DIR, help="Where JSON and markdown results go."),
    mergekit: str = typer.Option("mergekit", help="What follows `pip install` to get mergekit (a requirement, or "
                                                             "wheel files and flags offline)."),
    venv: Optional[Path] = typer.Option(None, help="Virtual environment for mergekit (default: "
                                                   "WORKDIR/mergekit-venv)."),
    rounds: int = typer.Option(3, help="Rounds of mergekit then compress (A B A B ...; at least 3)."),
    before: Optional[str] = typer.Option(None, help="Also time this git revision (or a folder holding an older "
                                                    "compress/) in each round."),
    methods: str = typer.Option("ties,task_arithmetic", help="Comma-separated: ties, task_arithmetic."),
    device: str = DEVICE,
):
    """TIES and task arithmetic through `compress merge` and mergekit, in turn: time ratio (median of the rounds),
    peak RSS, max |difference|."""
    from compress.bench.merge_speed import METHODS, run

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise CompressError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(METHODS)}")
    run(params=params, workdir=workdir, results=results, device=resolve_device(device), mergekit=mergekit,
        venv=venv, rounds=rounds, before=before, methods=chosen)
