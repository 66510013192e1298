"""``compress bench calibration``: the two calibration modes of Wanda and SparseGPT, side by side, over seeds.

For each model (stories260k, bundled; lm-zoo's base), each method (Wanda, SparseGPT), each sparsity (50%, 70%,
80% unstructured and 2:4) and each calibration seed (the seed draws the calibration windows), the model is pruned
twice from the same windows:

- **sequential** (``Pruner.prune_blocks(calibration="sequential")``, the CLI default): each block is calibrated on
  the outputs of the blocks already pruned;
- **shared** (today's numbers: the in-memory ``Pruner.prune`` of the old whole-model path, one dense calibration
  for every row), or ``prune_blocks(calibration="shared")`` when the model is run block by block.

Texts (all bundled, ``compress.data``), three roles kept apart:

- calibration windows: **wikitext2.valid** (lm-zoo's base was pretrained on it; stories260K never saw it);
- dev, the only text that chooses: **ptb.valid** (neither model pretrained on it; lm-zoo's tokenizer and its ptb
  fine-tune saw it, its base did not), the first ``max_tokens`` tokens;
- test, reported apart and never used to choose: **wikitext2.test** (held out from the whole zoo).

Perplexity is ``compress.eval.perplexity`` on the model in memory, or ``compress.eval.blockwise`` on the pruned
folder when the model does not fit the device (``compress.io.fit.should_stream``, or ``blockwise``). For each
sequential row the share of entries whose kept/pruned state agrees with the shared row of the same seed is kept
per block: block 0 sees the same dense inputs in both modes, so it agrees fully; the later blocks drift apart.

The verdict, per method and sparsity: the mode with the lower mean dev perplexity, whether the gap exceeds the
larger of the two standard deviations over seeds, and in how many seeds (paired: same windows) it wins.

Saves ``calibration_<zoo>.json``, ``.md`` and ``.png`` into ``results``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.progress import console
from compress.prune import Pruner

CALIB, DEV, TEST = "wikitext2.valid", "ptb.valid", "wikitext2.test"
ZOOS = ("stories260k", "lm-zoo")
METHODS = ("wanda", "sparsegpt")
MODES = ("sequential", "shared")
SPARSITIES = {"50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"), "80%": (0.8, "unstructured"),
              "2:4": (0.5, "2:4")}  # label: (sparsity, pattern)
DEFAULTS = {"nsamples": 128, "seqlen": 256, "eval_seqlen": 256}
QUICK = {"nsamples": 8, "seqlen": 64, "eval_seqlen": 128, "max_tokens": 2048}


class EncodeOnce:
    """A tokenizer that encodes each text once: the calibration text of every seed and the dev and test texts of
    every row are the same strings, and encoding them (seconds each) would otherwise dominate a small model's run."""

    def __init__(self, tokenizer):
        self.tokenizer, self._ids = tokenizer, {}

    def __call__(self, text: str, **kw) -> dict:
        if text not in self._ids:
            self._ids[text] = self.tokenizer(text, **kw)
        return self._ids[text]

    def keep_first(self, text: str, n: Optional[int]) -> None:
        """Later calls on ``text`` give its first ``n`` tokens only: all that a perplexity over ``max_tokens=n``
        reads, without turning the whole text into a tensor each time."""
        if n is None:
            return
        # a prefix that ends before a line break, past the first n tokens, encodes them as the whole text does (the
        # tokenizers split words first), at a fraction of the cost of encoding megabytes
        cut, ids = 0, []
        while cut < len(text) and len(ids) <= n + 1:
            cut = text.find("\n", max(cut * 2, 16 * n))
            cut = len(text) if cut < 0 else cut
            ids = self.tokenizer(text[:cut], verbose=False)["input_ids"]
        self._ids[text] = {"input_ids": ids[:n]}


class _Pruner(Pruner):
    """A ``Pruner`` whose tokenizer is one ``EncodeOnce`` shared by every seed."""

    def __init__(self, *args, encoder: EncodeOnce, **kw):
        super().__init__(*args, **kw)
        self._encoder = encoder

    def tokenizer(self):
        return self._encoder


def model_dirs(zoos: list[str], zoo_root: Path, work: Path) -> dict[str, Path]:
    """{zoo: model folder}, every one checked before any work: stories260k from ``zoo_root`` when built there,
    else converted from the bundled files into ``work``; lm-zoo's base must be built."""
    from compress.bench.prune import _model_dir
    from compress.io.files import read_model_config
    from compress.io.models import model_class

    out = {}
    for zoo in zoos:
        if zoo not in ZOOS:
            raise CompressError(f"bench calibration runs on {' or '.join(ZOOS)}, not '{zoo}'")
        if zoo == "stories260k" and not (zoo_root / zoo / "config.json").is_file():
            from compress.data import stories260k_files
            from compress.io.llama2c import convert_llama2c

            out[zoo] = work / zoo
            convert_llama2c(*stories260k_files(), out[zoo])
        else:
            out[zoo] = _model_dir(zoo, zoo_root)
        if model_class(out[zoo])[2] != "causal":  # perplexity needs the LM head: refused before any work
            raise CompressError(f"{out[zoo] / 'config.json'}: names no causal-LM architecture (architectures: "
                                f"{read_model_config(out[zoo]).get('architectures')}), so the model would load "
                                "without its LM head; add \"architectures\": [\"LlamaForCausalLM\"] to it")
    return out


def run(zoos: Optional[list[str]] = None, zoo_root: Path = Path("checkpoints/zoo"),
        results: Path = Path("checkpoints/bench"), *, seeds: int = 3, nsamples: Optional[int] = None,
        seqlen: Optional[int] = None, max_tokens: Optional[int] = None, device: str = "cpu", quick: bool = False,
        blockwise: Optional[bool] = None, methods: tuple[str, ...] = METHODS,
        sparsities: tuple[str, ...] = tuple(SPARSITIES), batch_size: int = 8,
        quiet: bool = True) -> dict[str, dict]:
    """Measure every zoo of ``zoos`` (default both); {zoo: report}, each saved as it is done. ``methods`` and
    ``sparsities`` (labels of ``SPARSITIES``) choose rows."""
    from compress.bench import publish

    bad = [m for m in methods if m not in METHODS] + [x for x in sparsities if x not in SPARSITIES]
    if bad or not methods or not sparsities:
        raise CompressError(f"{bad[0] if bad else 'nothing'}: choose methods among {', '.join(METHODS)} and "
                            f"sparsities among {', '.join(SPARSITIES)}")
    if seeds < 1:
        raise CompressError(f"--seeds {seeds}: need at least 1")
    for flag, v in (("--nsamples", nsamples), ("--seqlen", seqlen), ("--max-tokens", max_tokens)):
        if v is not None and v < (2 if flag == "--seqlen" else 1):
            raise CompressError(f"{flag} {v}: too small")
    size = QUICK if quick else DEFAULTS
    if max_tokens is None:
        from compress.bench.prune import CPU_MAX_TOKENS

        max_tokens = size.get("max_tokens", None if device.startswith("cuda") else CPU_MAX_TOKENS)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="compress-bench-calibration-") as work:
        for zoo, folder in model_dirs(list(zoos or ZOOS), zoo_root, Path(work)).items():
            report = measure(zoo, folder, Path(work), seeds=seeds, nsamples=nsamples or size["nsamples"],
                             seqlen=seqlen or size["seqlen"], eval_seqlen=size["eval_seqlen"], max_tokens=max_tokens,
                             device=device, blockwise=blockwise, batch_size=batch_size, quiet=quiet,
                             methods=tuple(methods), sparsities=tuple(sparsities))
            report["quick"] = quick
            publish(results, f"calibration_{zoo}", report, markdown(report), plot, "bench calibration")
            reports[zoo] = report
    return reports


def measure(zoo: str, model_dir: Path, work: Path, *, seeds: int, nsamples: int, seqlen: int, eval_seqlen: int,
            max_tokens: Optional[int], device: str, blockwise: Optional[bool], batch_size: int, quiet: bool,
            methods: tuple[str, ...] = METHODS, sparsities: tuple[str, ...] = tuple(SPARSITIES)
            ) -> dict:
    """Dense, then every (seed, method, sparsity, mode) row of one model: its dev and test perplexity."""
    from compress.data import corpus_path, read_text
    from compress.eval.blockwise import blockwise_perplexity
    from compress.eval.perplexity import perplexity
    from compress.io.fit import should_stream, weight_bytes
    from compress.io.models import load_tokenizer

    max_pos = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or seqlen
    seqlen, eval_seqlen = min(seqlen, max_pos), min(eval_seqlen, max_pos)
    if blockwise is None:
        blockwise = should_stream(weight_bytes(model_dir), device)
    encoder = EncodeOnce(load_tokenizer(model_dir))
    texts = {"dev": read_text(corpus_path(DEV)), "test": read_text(corpus_path(TEST))}
    for t in texts.values():
        encoder.keep_first(t, max_tokens)
    eval_kw = dict(seqlen=eval_seqlen, max_tokens=max_tokens, batch_size=32, device=device)

    def scores(model=None, folder=None) -> dict[str, float]:
        if folder is not None:
            return {k: blockwise_perplexity(folder, encoder, t, **eval_kw) for k, t in texts.items()}
        return {k: perplexity(model, encoder, t, **eval_kw) for k, t in texts.items()}

    t_start = time.perf_counter()
    report: dict = {"zoo": zoo, "model": str(model_dir), "device": device, "calib": CALIB, "dev": DEV,
                    "test": TEST, "seeds": seeds, "nsamples": nsamples, "seqlen": seqlen, "eval_seqlen": eval_seqlen,
                    "max_tokens": max_tokens, "blockwise": blockwise, "methods": list(methods),
                    "sparsities": list(sparsities)}
    if device.startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(device)
    rows = []
    out = work / "pruned"
    for seed in range(seeds):
        pruner = _Pruner(model_dir, CALIB, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                         batch_size=batch_size, quiet=True, calibration="shared", encoder=encoder,
                         cache_dir=work / f"stats-{zoo}" if blockwise else None)
        if seed == 0:
            report["dense"] = scores(folder=model_dir) if blockwise else scores(pruner.model)
            _say(quiet, f"{zoo} dense: dev {report['dense']['dev']:.2f}, test {report['dense']['test']:.2f}")
        for method in methods:
            for label in sparsities:
                sparsity, pattern = SPARSITIES[label]
                shared_masks = None
                for mode in ("shared", "sequential"):  # shared first: the sequential row is compared with it
                    t0 = time.perf_counter()
                    if blockwise:
                        r = pruner.prune_blocks(sparsity, method, pattern, calibration=mode, out=out, overwrite=True)
                        seconds = time.perf_counter() - t0
                        got = scores(folder=out)
                    else:
                        r = (pruner.prune(sparsity, method, pattern) if mode == "shared" else
                             pruner.prune_blocks(sparsity, method, pattern, calibration=mode))
                        seconds = time.perf_counter() - t0
                        pruner.load(r)
                        got = scores(pruner.model)
                        pruner.load(None)
                    # seconds: the prune call, calibration included where it runs (shared: the seed's first row)
                    row = {"seed": seed, "method": method, "sparsity": label, "mode": mode,
                           "measured_sparsity": r.sparsity, "prune_seconds": seconds, **got}
                    if not blockwise:
                        masks = {name: (w != 0).cpu() for name, w in r.weights.items()}
                        if mode == "shared":
                            shared_masks = masks
                        else:
                            row["agreement_with_shared"] = block_agreement(pruner, masks, shared_masks)
                    rows.append(row)
                    _say(quiet, f"{zoo} seed {seed} {method} {label} {mode}: dev {got['dev']:.2f}, "
                                f"test {got['test']:.2f}")
                    del r
    report["rows"] = rows
    report["summary"] = summarize(rows, methods, sparsities)
    report["verdicts"] = verdicts(report["summary"], methods, sparsities)
    report["seconds"] = time.perf_counter() - t_start
    return report


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        console.print(f"[bench calibration] {text}")


def block_agreement(pruner, masks: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[float]:
    """Per block: the share of its prunable entries kept (or pruned) in both ``masks`` and ``ref``."""
    out = []
    for b in range(pruner.n_blocks):
        names = [p.name for p in pruner.modules if p.block == b]
        same = sum(int((masks[n] == ref[n]).sum()) for n in names)
        total = sum(masks[n].numel() for n in names)
        out.append(same / total if total else 1.0)
    return out


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(rows: list[dict], methods, sparsities) -> list[dict]:
    """Per method, sparsity and mode: dev and test perplexity, mean and sd over seeds."""
    out = []
    for method in methods:
        for label in sparsities:
            for mode in MODES:
                mine = sorted((r for r in rows if (r["method"], r["sparsity"], r["mode"]) == (method, label, mode)),
                              key=lambda r: r["seed"])
                if mine:
                    out.append({"method": method, "sparsity": label, "mode": mode,
                                "dev": _mean_sd([r["dev"] for r in mine]), "test": _mean_sd([r["test"] for r in mine])})
    return out


def verdicts(summary: list[dict], methods, sparsities) -> list[dict]:
    """Per method and sparsity, on dev only: the winning mode, the gap against the larger sd, the seeds it wins
    (paired), shared's change over sequential per seed, and the default that supports."""
    by = {(s["method"], s["sparsity"], s["mode"]): s for s in summary}
    out = []
    for method in methods:
        for label in sparsities:
            seq, sh = by[(method, label, "sequential")]["dev"], by[(method, label, "shared")]["dev"]
            winner = "sequential" if seq["mean"] <= sh["mean"] else "shared"
            gap, sd = abs(seq["mean"] - sh["mean"]), max(seq["sd"], sh["sd"])
            change = [b / a - 1 for a, b in zip(seq["values"], sh["values"])]
            wins = sum((c > 0) == (winner == "sequential") and c != 0 for c in change)
            clear = gap > sd
            out.append({"method": method, "sparsity": label, "winner": winner, "gap": gap, "sd": sd,
                        "exceeds_sd": clear, "seeds_won": wins, "seeds": len(change),
                        "shared_over_sequential": change, "supports": winner if clear else "either"})
    return out


def _cell(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def markdown(report: dict) -> str:
    by = {(s["method"], s["sparsity"], s["mode"]): s for s in report["summary"]}
    dense = report["dense"]
    ev = (f"first {report['max_tokens']:,} tokens, " if report["max_tokens"] else "") + \
        f"windows of {report['eval_seqlen']}"
    lines = [f"# compress bench calibration — {report['zoo']}", "",
             f"Calibration: {report['nsamples']} windows × {report['seqlen']} tokens of {report['calib']}, drawn by "
             f"seeds 0–{report['seeds'] - 1}. Dev (chooses): {report['dev']}; test (reported, never used to "
             f"choose): {report['test']}; perplexity over the {ev}, "
             f"{'block by block' if report['blockwise'] else 'model in memory'}. Mean ± sd over seeds. "
             f"Shared is today's numbers (dense statistics). Device: {report.get('device_name', report['device'])}.",
             "", f"Dense: dev {dense['dev']:.2f}, test {dense['test']:.2f}.", "",
             "| method | sparsity | dev sequential | dev shared (today) | test sequential | test shared (today) |",
             "|---|---|---:|---:|---:|---:|"]
    for method in report["methods"]:
        for label in report["sparsities"]:
            seq, sh = by[(method, label, "sequential")], by[(method, label, "shared")]
            lines.append(f"| {method} | {label} | {_cell(seq['dev'])} | {_cell(sh['dev'])} | {_cell(seq['test'])} | "
                         f"{_cell(sh['test'])} |")
    agree = [r["agreement_with_shared"] for r in report["rows"] if "agreement_with_shared" in r]
    if agree:
        n = len(agree[0])
        lines += ["", "Masks of sequential agreeing with shared (same seed), mean over rows, per block: "
                  + ", ".join(f"{sum(a[b] for a in agree) / len(agree):.4f}" for b in range(n)) + "."]
    lines += ["", f"Total {report['seconds']:.0f} s.", "", "## Which mode wins on dev", ""]
    for v in report["verdicts"]:
        change = ", ".join(f"{c:+.1%}" for c in v["shared_over_sequential"])
        lines.append(f"- {v['method']} {v['sparsity']}: **{v['winner']}** (gap {v['gap']:.2f} "
                     f"{'>' if v['exceeds_sd'] else '<='} sd {v['sd']:.2f}; wins {v['seeds_won']}/{v['seeds']} seeds; "
                     f"shared vs sequential {change}) → supports "
                     + (f"{v['supports']}" if v["exceeds_sd"] else "either (within the sd)") + ".")
    common = [v for v in report["verdicts"] if v["sparsity"] == "50%"]
    against = [v["method"] for v in common if v["supports"] == "shared"]
    lines.append("- Default (`compress prune --calibration`, 50% the common case): "
                 + (f"dev favours shared for {', '.join(against)} beyond the sd; the default sequential is left as it "
                    "is here, for a decision." if against else
                    "dev does not favour shared beyond the sd at 50%: the default sequential stands."))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    from compress.bench import pyplot

    plt = pyplot()
    if plt is None:
        return None
    by = {(s["method"], s["sparsity"], s["mode"]): s["dev"] for s in report["summary"]}
    labels, methods = report["sparsities"], report["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, method in zip(axes, methods):
        for j, mode in enumerate(MODES):
            xs = [i + (j - 0.5) * 0.2 for i in range(len(labels))]
            ax.errorbar(xs, [by[(method, x, mode)]["mean"] for x in labels],
                        yerr=[by[(method, x, mode)]["sd"] for x in labels], fmt="o", capsize=3, label=mode)
        ax.axhline(report["dense"]["dev"], color="gray", linestyle="--", label="dense")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_title(method)
    axes[0].set_ylabel(f"dev perplexity ({report['dev']}, log), mean ± sd")
    axes[0].legend()
    fig.suptitle(f"compress bench calibration — {report['zoo']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
