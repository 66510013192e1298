"""The true evaluation of a strategy: prune with the cached-calibration ``Pruner``, then measure the pruned
model's KL divergence to the dense model on held-out windows of the calibration text.

*Held out*: the windows are cut from the calibration text where no calibration window (``calib.calibration_starts``)
reaches, consecutive and non-overlapping, then ``eval_windows`` of them are taken evenly spread over the text. The
dense model's next-token log-probabilities on them are computed once, kept on the device, and reused by every
evaluation, so one evaluation is one pruning pass (masks from the cached statistics) and one forward pass of the
pruned model. The KL is ``compress.eval.kl``'s: mean over positions of KL(p_dense ‖ p_pruned) in nats, over the
first ``eval_seqlen − 1`` positions of every window.

*Fast masks.* For a method whose registry entry has ``scores`` (Wanda's per-row |W_ij|·‖X_j‖₂, magnitude's
per-layer |W|) the order of the scores does not depend on the sparsity, so the evaluator ranks every weight's
entries once (``RankedWeights``) and an evaluation only compares ranks with each group's prune count: the very
masks ``Pruner.prune`` computes (``methods.row_mask``/``tensor_mask``, same counts, same stable tie order; tested
equal), without a sort per evaluation. Other methods (SparseGPT) and protected heads go through ``Pruner.prune``.
Every evaluation is logged (strategy, mean sparsity, KL, seconds) in ``Evaluator.history`` and, when a log path
is given, appended to a JSON lines file.

*Streaming* (``StreamedModel``), for a model that does not fit on the device: nothing of the model is kept; every
evaluation runs the held-out windows block by block (``compress.io.blocks.BlockRunner``: the embeddings and one
block on the device), each block read from the checkpoint, its layers masked by the method's own ``mask`` from
the block's dense weights and the dense calibration statistics (collected block by block on the calibration
windows, as ``shared`` calibration does: a few floats per input feature), then the KL is summed at the LM head.
The masks are those of ``Pruner.prune``, so both ways give the same KL. ``streaming=None`` chooses by size: the
in-memory path (today's, what makes small models fast) unless the float32 weights take more than
``compress.io.fit.STREAM_SHARE`` of the device's free memory. Mask methods only (magnitude, Wanda), and
no protected heads (chosen by size, the others stay in memory).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from compress.errors import CompressError
from compress.eval.kl import next_token_logprobs, token_kl


def heldout_windows(ids: torch.Tensor, calib_starts: torch.Tensor, calib_seqlen: int, seqlen: int,
                    n: int) -> torch.Tensor:
    """[k, seqlen] windows of ``ids`` that share no token with any calibration window, k = min(n, available),
    evenly spread over the text; an error when none fits."""
    covered = torch.zeros(ids.numel() + 1, dtype=torch.int64)
    for s in calib_starts.tolist():
        covered[s] += 1
        covered[s + calib_seqlen] -= 1
    covered = covered.cumsum(0)[: ids.numel()] > 0
    prefix = torch.cat([torch.zeros(1, dtype=torch.int64), covered.long().cumsum(0)])
    starts, i = [], 0
    while i + seqlen <= ids.numel():
        if prefix[i + seqlen] - prefix[i] == 0:
            starts.append(i)
            i += seqlen
        else:
            # jump past the last covered token of this span
            span = covered[i:i + seqlen].nonzero()
            i += int(span[-1]) + 1
    if not starts:
        raise CompressError(f"the calibration text has no {seqlen}-token stretch outside the calibration windows; "
                            "give a longer --calib text, fewer --nsamples or a smaller --eval-seqlen")
    if len(starts) > n:
        pick = torch.linspace(0, len(starts) - 1, n).round().long().tolist()
        starts = [starts[j] for j in pick]
    return torch.stack([ids[s:s + seqlen] for s in starts])


class RankedWeights:
    """Every prunable weight's entries ranked once in the order a ranked method (its registry entry's ``scores``)
    prunes them, per row or per layer; ``load(strategy)`` writes the pruned weights into ``pruner.model`` and
    returns the sparsity."""

    def __init__(self, pruner, method: str):
        from compress.prune.registry import Layer, get_prune_method

        self.pruner, self.method = pruner, method
        self.spec = spec = get_prune_method(method)
        if spec.scores is None:
            raise CompressError(f"pruning method '{method}' has no ranked scores; evaluate it through Pruner.prune")
        stats = pruner.stats(hessian=spec.hessian) if spec.calibrated else None
        self.ranks: dict[str, torch.Tensor] = {}
        for p in pruner.modules:
            w = pruner._dense[p.name]
            scores = spec.scores(Layer(p.name, w, stats[p.name] if stats is not None else None))
            if spec.group == "row":
                order = torch.sort(scores, dim=1, stable=True).indices
                pos = torch.arange(w.shape[1], device=w.device, dtype=torch.int32).expand_as(order)
                ranks = torch.empty(order.shape, dtype=torch.int32, device=w.device)
                self.ranks[p.name] = ranks.scatter_(1, order, pos)
            else:
                order = torch.sort(scores.reshape(-1), stable=True).indices
                pos = torch.arange(w.numel(), device=w.device, dtype=torch.int32)
                self.ranks[p.name] = torch.empty(order.shape, dtype=torch.int32,
                                                 device=w.device).scatter_(0, order, pos).reshape(w.shape)

    @torch.no_grad()
    def load(self, strategy: Sequence[float]) -> float:
        pr = self.pruner
        mean = sum(v * n for v, n in zip(strategy, pr.block_params)) / sum(pr.block_params)
        pruned = total = 0
        for p in pr.modules:
            s = strategy[p.block] if p.block is not None else mean
            w, rank = pr._dense[p.name], self.ranks[p.name]
            rows, cols = w.shape
            if self.spec.group == "row":  # methods.row_counts: int(cols·s) a row, one more in the first rows
                base = int(cols * s)
                extra = min(max(int(round(rows * cols * s)) - rows * base, 0), rows)
                mask = rank >= base
                if extra:
                    mask[:extra] = rank[:extra] >= base + 1
                pruned += rows * base + extra
            else:
                k = int(round(w.numel() * s))
                mask = rank >= k
                pruned += k
            total += w.numel()
            pr._weight(p).copy_(w * mask)
        return pruned / total


class StreamedModel:
    """The model of ``pruner.model_dir`` run block by block over ``windows``, pruned on the fly (see the module
    docstring): ``logprobs(strategy)`` yields each batch's next-token log-probabilities (``strategy`` None: the
    dense model) and sets ``sparsity``."""

    def __init__(self, pruner, method: str, windows: torch.Tensor, batch_size: int,
                 dtype: torch.dtype = torch.float32, host_cache: bool | dict = False):
        from compress.io.blocks import BlockRunner
        from compress.prune.registry import get_prune_method

        self.spec = spec = get_prune_method(method)
        if spec.mask is None:
            raise CompressError(f"pruning method '{method}' changes the surviving weights; the streaming evaluator "
                                "takes mask methods (magnitude, wanda)")
        outside = [p.name for p in pruner.modules if p.block is None]
        if outside:
            raise CompressError(f"layer '{outside[0]}' lies outside the blocks; the streaming evaluator prunes the "
                                "layers inside them (check --targets/--ignore)")
        self.pruner, self.batch_size = pruner, batch_size
        self.runner = BlockRunner(pruner.model_dir, device=pruner.device, dtype=dtype)
        self.numel = sum(p.numel for p in pruner.modules)
        self.stats = self._dense_stats(pruner) if spec.calibrated else None
        self.start = self.runner.start(windows.split(batch_size))
        self.sparsity = 0.0
        self.resident: list[int] = []  # parameters on the device while each block ran (the last pass)
        # host_cache: each block's dense weights kept in (pinned) host memory after their first read, so that an
        # evaluation copies them to the device instead of reading the files again (host memory: the model); a
        # dict is another StreamedModel's ``host`` of the same model, shared
        self.host: dict[int, dict[str, torch.Tensor]] | None = (
            host_cache if isinstance(host_cache, dict) else {} if host_cache else None)

    def _load(self, i: int):
        from compress.io.blocks import load_block_from

        if self.host is None:
            return self.runner.load_block(i)
        if i in self.host:
            return load_block_from(self.runner, i, self.host[i])
        block = self.runner.load_block(i)
        pin = self.runner.device.type == "cuda"
        self.host[i] = {n: (p.detach().cpu().pin_memory() if pin else p.detach().clone())
                        for n, p in block.named_parameters()}
        return block

    @staticmethod
    def _dense_stats(pruner) -> dict:
        """Σx² per input feature of every prunable layer on the dense model's activations (shared calibration):
        the pruner's own (in memory or its cache), else from one block-wise pass (``Pruner._dense_pass``), kept as
        the pruner's (the same numbers its whole-model pass gives), so a second evaluator does no pass."""
        if pruner._stats is not None:
            return pruner._stats
        got = pruner._cached_stats(pruner.modules, False)
        stats: dict = got[0] if got is not None else {}
        if got is None:
            pruner._dense_pass(lambda i, layers, weights, block_stats: stats.update(block_stats))
        pruner._stats, pruner._has_hessian = stats, got is not None and got[1]
        pruner._hinv.clear()
        return stats

    @torch.no_grad()
    def logprobs(self, strategy: Sequence[float] | None = None):
        from compress.eval.kl import logprobs
        from compress.io.blocks import Activations
        from compress.prune.registry import Layer

        runner, start = self.runner, self.start
        acts = Activations([h.clone() for h in start.hidden], start.calls, start.on_device)
        pruned, self.resident = 0, []
        for i in range(runner.n_blocks):
            block = self._load(i)
            if strategy is not None and strategy[i] > 0:
                for name, w in self.pruner._block_layers(runner, i, block)[1].items():
                    layer = Layer(name, w.float(), self.stats[name] if self.stats is not None else None)
                    mask = self.spec.mask(layer, float(strategy[i]), None)
                    w.mul_(mask)
                    pruned += mask.numel() - int(mask.sum())
            self.resident.append(sum(p.numel() for p in runner.model.parameters() if p.device.type != "meta"))
            runner.run(i, block, acts)
            runner.free_block(i)
        self.sparsity = pruned / self.numel
        for h in acts.hidden:
            yield logprobs(runner.head(h))

    def close(self) -> None:
        self.runner.close()


class Evaluator:
    """``evaluator(strategy) -> KL`` for per-block strategies of ``pruner``'s model (see the module docstring)."""

    def __init__(self, pruner, method: str = "wanda", *, eval_windows: int = 32, eval_seqlen: int | None = None,
                 batch_size: int = 16, protect=None, log: str | os.PathLike | None = None,
                 windows: torch.Tensor | None = None, streaming: bool | None = None,
                 dtype: torch.dtype = torch.float32, host_cache: bool | dict = False):
        from compress.io.files import read_model_config
        from compress.prune import calib as C
        from compress.prune.pruner import resolve_text
        from compress.prune.registry import get_prune_method

        spec = get_prune_method(method)  # before any work
        self.pruner, self.method, self.protect, self.batch_size = pruner, method, protect, batch_size
        self.device = pruner.device
        if streaming is None:  # by size, where streaming can evaluate the method
            from compress.io.fit import should_stream, weight_bytes

            streaming = (spec.mask is not None and not protect
                         and should_stream(weight_bytes(pruner.model_dir), self.device))
        if streaming and protect:
            raise CompressError("the streaming evaluator prunes without protected heads; leave out the protection "
                                "or evaluate in memory")
        self.streaming = streaming
        max_pos = (read_model_config(pruner.model_dir) or {}).get("max_position_embeddings") or 256
        self.eval_seqlen = eval_seqlen or min(256, max_pos)
        if windows is None:
            text, label = resolve_text(pruner.calib)
            ids = torch.tensor(pruner.tokenizer()(text, verbose=False)["input_ids"], dtype=torch.long)
            if ids.numel() < pruner.seqlen:
                raise CompressError(f"{label} has {ids.numel()} tokens, fewer than one calibration window")
            starts = C.calibration_starts(ids.numel(), pruner.nsamples, pruner.seqlen, pruner.seed)
            windows = heldout_windows(ids, starts, pruner.seqlen, self.eval_seqlen, eval_windows)
        self.windows = windows
        self.history: list[dict] = []
        self.log_path = Path(log) if log is not None else None
        self.seconds = {"dense": 0.0, "prune": 0.0, "forward": 0.0}
        t0 = time.perf_counter()
        if streaming:
            self.ranked = None
            self.stream = StreamedModel(pruner, method, windows, batch_size, dtype, host_cache)
            self.ref = list(self.stream.logprobs(None))
        else:
            self.stream = None
            self.ranked = RankedWeights(pruner, method) if spec.scores is not None else None
            pruner.load(None)
            self.ref = self._logprobs().split(self.batch_size)
        self.seconds["dense"] = time.perf_counter() - t0

    @torch.no_grad()
    def _logprobs(self) -> torch.Tensor:
        model = self.pruner.model
        model.eval()
        out = [next_token_logprobs(model, b.to(self.device)) for b in self.windows.split(self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def kl(self, batches=None) -> float:
        """KL(dense ‖ the model as it is now in ``pruner.model``), or of the log-probabilities ``batches`` yields."""
        if batches is None:
            model = self.pruner.model
            batches = (next_token_logprobs(model, b.to(self.device)) for b in self.windows.split(self.batch_size))
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for logp, ref in zip(batches, self.ref):
            kl = token_kl(logp, ref)
            total += kl.double().sum()
            count += kl.numel()
        return float(total) / count

    def sync(self) -> None:
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()

    def evaluate(self, strategy: Sequence[float], phase: str = "", **info) -> dict:
        """Prune to ``strategy`` (one sparsity per block), load, measure KL, restore nothing (the next evaluation
        overwrites every pruned weight; ``pruner.load(None)`` gives the dense model back)."""
        from compress.prune.strategy import Strategy

        t0 = time.perf_counter()
        st = Strategy(tuple(float(v) for v in strategy), phase or "evaluation")
        if self.stream is not None:  # masks and forward are one pass over the blocks: all counted as forward
            t1 = t0
            kl = self.kl(self.stream.logprobs(st.layer_sparsity))
            sparsity = self.stream.sparsity
        else:
            if self.ranked is not None and not self.protect:
                sparsity = self.ranked.load(st.layer_sparsity)
            else:
                result = self.pruner.prune(st, self.method, protect=self.protect)
                self.pruner.load(result)
                sparsity = result.sparsity
            self.sync()
            t1 = time.perf_counter()
            kl = self.kl()
        self.sync()
        t2 = time.perf_counter()
        self.seconds["prune"] += t1 - t0
        self.seconds["forward"] += t2 - t1
        rec = {"i": len(self.history), "phase": phase, "strategy": [round(v, 6) for v in st.layer_sparsity],
               "mean": st.mean(self.pruner.block_params), "sparsity": sparsity, "kl": kl,
               "seconds": t2 - t0, **info}
        self.history.append(rec)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def __call__(self, strategy: Sequence[float], phase: str = "", **info) -> float:
        return self.evaluate(strategy, phase, **info)["kl"]

    @property
    def evaluations(self) -> int:
        return len(self.history)
