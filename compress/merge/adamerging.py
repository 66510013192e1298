"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024): merging
coefficients learned at test time by entropy minimisation on unlabeled inputs.

θ = θ_0 + Σ_i λ_i^g τ_i^g, with one λ per task ("task": task-wise AdaMerging) or one per task and tensor
("layer": layer-wise; the reference code gives every parameter tensor its own λ, and so does this). The λ are
learned by Adam on the mean prediction entropy of the merged model, through ``torch.func.functional_call`` over
base + Σ λ τ (the model's own weights are never touched):

- classifiers (an encoder and one head per task): the entropy of each task head's class distribution on a few
  unlabeled rows of that task, summed over the tasks; rows are texts only, labels are never read;
- causal LMs: the mean next-token entropy of a small unlabeled text sample.

Switches the paper leaves open, named: ``init`` (0.3, the paper's), ``bounds`` (λ clamped to [0, 1] after each
step, as the reference code does), ``steps`` and ``lr`` (the paper runs 500 steps at 1e-3; the default here is
50 steps at 1e-2, about the same distance in λ for a tenth of the forward passes), ``granularity``.

Learning holds the base and every task vector in memory (it runs the model); writing the merge afterwards
streams tensor by tensor through ``compress.merge.executor`` with the learned λ as per-tensor weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from compress.errors import CompressError

Granularity = Literal["task", "layer"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over every leading position, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaMergingResult:
    """The learned coefficients: ``coefficients[i, g]`` is task i's λ on group g; ``groups[name]`` is g."""

    coefficients: torch.Tensor  # [n_tasks, n_groups], on the CPU
    groups: dict[str, int]
    history: list[float] = field(default_factory=list)  # the objective before each step, and after the last

    def weights(self, name: str) -> list[float]:
        """Each task's λ for tensor ``name``."""
        return self.coefficients[:, self.groups[name]].tolist()

    def as_dict(self) -> dict:
        return {"coefficients": {n: self.weights(n) for n in self.groups}, "history": self.history}


def merged_params(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], lam: torch.Tensor,
                  groups: dict[str, int]) -> dict[str, torch.Tensor]:
    """{name: θ_0 + Σ_i λ[i, g(name)] τ_i} (differentiable in ``lam``)."""
    out = {}
    for name, d in deltas.items():
        coef = lam[:, groups[name]].reshape((-1,) + (1,) * (d.dim() - 1))
        out[name] = base[name] + (coef * d).sum(0)
    return out


def learn_coefficients(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                       objective: Callable[[dict[str, torch.Tensor], int], torch.Tensor], *,
                       granularity: Granularity = "layer", steps: int = 50, lr: float = 1e-2, init: float = 0.3,
                       bounds: Optional[tuple[float, float]] = (0.0, 1.0)) -> AdaMergingResult:
    """AdaMerging's λ for stacked task vectors ``deltas`` ({name: [n_tasks, *shape]}) over ``base``, by Adam on
    ``objective(params, step)`` (the entropy of the model run with ``params``, a dict of merged tensors)."""
    if not deltas:
        raise CompressError("adamerging: no tensor differs between the base and the models")
    if granularity not in ("task", "layer"):
        raise CompressError(f"adamerging: granularity must be task or layer, got {granularity!r}")
    steps = int(steps)
    if steps < 0 or not lr > 0:
        raise CompressError(f"adamerging: steps must be >= 0 and lr > 0 (got steps {steps}, lr {lr})")
    names = list(deltas)
    n = next(iter(deltas.values())).shape[0]
    groups = {nm: (i if granularity == "layer" else 0) for i, nm in enumerate(names)}
    like = next(iter(deltas.values()))
    lam = torch.full((n, len(names) if granularity == "layer" else 1), float(init), dtype=like.dtype,
                     device=like.device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    history = []
    with torch.enable_grad():
        for step in range(steps + 1):
            loss = objective(merged_params(base, deltas, lam, groups), step)
            history.append(float(loss.detach()))
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bounds is not None:
                with torch.no_grad():
                    lam.clamp_(*bounds)
    return AdaMergingResult(lam.detach().cpu(), groups, history)


# -- objectives ----------------------------------------------------------------------------------------------

def unlabeled_batches(tokenizer, texts: list[dict], max_length: int, batch_size: int, device) -> list[dict]:
    """Tokenized batches of rows that hold only ``text`` (and ``text_pair``): nothing else is looked at."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        pairs = [r.get("text_pair") for r in chunk]
        enc = tokenizer([r["text"] for r in chunk], pairs if all(p is not None for p in pairs) else None,
                        truncation=True, max_length=max_length, padding=True, return_token_type_ids=True,
                        return_tensors="pt")
        out.append({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "token_type_ids",
                                                                     "attention_mask")})
    if not out:
        raise CompressError("adamerging: no unlabeled rows to adapt on")
    return out


def classifier_objective(encoder, heads: list, batches: list[list[dict]]):
    """Σ over tasks of the entropy of task i's head on its unlabeled batch (one batch per step, cycling)."""
    from torch.func import functional_call

    from compress.eval.classify import mean_pool

    def objective(params, step):
        total = 0.0
        for head, task_batches in zip(heads, batches):
            batch = task_batches[step % len(task_batches)]
            hidden = functional_call(encoder, params, args=(), kwargs=batch).last_hidden_state
            total = total + entropy(head.logits(mean_pool(hidden, batch["attention_mask"])))
        return total
    return objective


def lm_objective(model, windows: torch.Tensor, batch_size: int = 8):
    """Mean next-token entropy of a causal LM on unlabeled token windows ``[N, L]`` (a batch per step)."""
    from torch.func import functional_call

    batches = windows.split(batch_size)

    def objective(params, step):
        ids = batches[step % len(batches)]
        return entropy(functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits)
    return objective


def text_windows(tokenizer, text: str, seqlen: int = 128, max_windows: int = 16) -> torch.Tensor:
    """The first ``max_windows`` windows of ``seqlen`` tokens of ``text`` ([N, seqlen] long)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(max_windows, ids.numel() // seqlen)
    if n < 1:
        raise CompressError(f"adamerging: the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


# -- for the executor: learn from the models a MergeConfig names -----------------------------------------------

def learn_for_merger(merger, quiet: Optional[bool] = None, rows: int = 64, batch_size: int = 16,
                     seqlen: int = 128) -> AdaMergingResult:
    """λ for a ``compress.merge.executor.Merger`` whose method is ``adamerging``: with a classification head in
    every model folder (``head.safetensors``), the entropy of each head on ``rows`` unlabeled rows of its
    task's dev split; otherwise the token entropy of the config's ``text`` (a causal LM)."""
    from compress.eval.classify import Head, has_head, load_encoder
    from compress.progress import track

    cfg, device = merger.cfg, merger.device
    root = merger.ref.root if merger.ref.root is not None else Path(merger.ref.path)
    folders = [Path(m.model) for m in cfg.models]
    classifier = all(has_head(f) for f in folders)
    if classifier:
        from compress.data import load_task

        model, tok = load_encoder(root, device=device)
        heads = [Head.load(f) for f in folders]
        if tok is None:
            from compress.eval.classify import load_tokenizer

            tok = load_tokenizer(folders[0])
        texts = [[{k: r[k] for k in ("text", "text_pair") if k in r} for r in load_task(h.task_ref, "dev", rows)]
                 for h in heads]
        batches = [unlabeled_batches(tok, t, h.max_length, batch_size, device) for t, h in zip(texts, heads)]
        objective = classifier_objective(model, heads, batches)
    else:
        if cfg.text is None:
            raise CompressError("adamerging: the models have no classification heads, so it adapts a causal LM "
                                "on unlabeled text: pass --text FILE")
        from compress.eval.perplexity import load_causal_lm

        model, tok = load_causal_lm(root, device=device)
        text = Path(cfg.text).read_text(encoding="utf-8", errors="replace")
        objective = lm_objective(model, text_windows(tok, text, seqlen).to(device))
    for p in model.parameters():
        p.requires_grad_(False)
    state = dict(model.state_dict())
    base, deltas = {}, {}
    for name in track([n for n in merger.ref.names() if merger.ref.info(n).is_float], "adamerging: task vectors",
                      quiet=quiet):
        if name not in state:
            continue  # not a weight of the loaded model (e.g. a classification head kept beside the encoder)
        b = merger._base_tensor(name)
        stacked = merger._stacked_deltas(name, b)
        if stacked is not None:
            base[name], deltas[name] = b.to(state[name].dtype), stacked.to(state[name].dtype)
    steps, lr = merger.param("steps", ""), merger.param("lr", "")
    return learn_coefficients(base, deltas, objective, granularity=cfg.granularity,
                              steps=50 if steps is None else steps, lr=1e-2 if lr is None else lr)
