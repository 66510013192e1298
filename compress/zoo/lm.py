"""lm-zoo: a small Llama pretrained from scratch on the bundled corpora and fully fine-tuned into task models.

Built by ``build_lm_zoo(out_dir, device, quick)`` from ``recipes/zoo/lm-zoo.yml`` (validated by ``LmZooRecipe``;
its ``quick:`` section overrides fields for the small CPU version). Steps, top to bottom:

1. **Data.** Training text: ``pretrain_corpora`` (shakespeare without its held-out tail) and the training splits
   of ``task_texts``, plus sentences stating the memorized recall facts (``compress.zoo.recall_task``). Held out
   from everything but evaluation: wikitext2.test, ptb.test and the last ``shakespeare_heldout`` of shakespeare.
2. **Tokenizer.** Byte-level BPE trained with ``tokenizers`` on the training text (digits split one by one),
   ``<pad>``/``<s>``/``</s>``, ``<s>`` added in front of every text; saved as a fast tokenizer that
   ``AutoTokenizer.from_pretrained`` loads.
3. **base.** ``LlamaForCausalLM`` from scratch, trained on random ``seqlen`` windows of the token stream: AdamW,
   linear warmup then cosine decay, bf16 autocast on CUDA, gradient clipping at 1.
4. **Fine-tunes** (every weight, same tensor names as base, so ``TaskVector`` works on θ_ft − θ_base):
   ``shakespeare`` (its training part), ``ptb`` (ptb.valid), ``recall`` (generated prompts, loss on the answer).
5. **Evaluation** of every model: perplexity on the three held-out texts, recall accuracy / hallucination rate on
   ``recall_eval.jsonl`` (held-out seed), KL of each fine-tune to base on wikitext2.test; ``build.json``,
   ``README.md`` and a printed table.

Everything goes into a temporary folder beside ``out_dir`` that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from compress.config import Compute, format_validation_error
from compress.config import build as build_config
from compress.data import corpus_path, data_dir, read_text
from compress.errors import CompressError
from compress.eval.kl import kl_divergence
from compress.eval.perplexity import perplexity
from compress.eval.recall import recall_eval
from compress.io.models import save_module
from compress.io.writer import atomic_dir, check_output
from compress.progress import console as progress_console
from compress.progress import quiet_default
from compress.runtime import resolve_device
from compress.zoo.recall_task import RecallSpec, RecallTask

RECIPE_PATH = Path(__file__).resolve().parent.parent.parent / "recipes" / "zoo" / "lm-zoo.yml"
HELDOUT_CORPORA = ("wikitext2.test", "ptb.test")
FINETUNES = ("shakespeare", "ptb", "recall")
RECALL_KINDS = ("novel", "counterfactual", "consistent", "closed_book")
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
console = Console(soft_wrap=True)


# --------------------------------------------------------------------------------------------------- recipe
class _Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerRecipe(_Recipe):
    vocab_size: int = Field(8192, ge=300)


class ModelRecipe(_Recipe):
    hidden_size: int = Field(512, ge=8)
    num_hidden_layers: int = Field(8, ge=1)
    num_attention_heads: int = Field(8, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1376, ge=1)
    tie_word_embeddings: bool = False
    seqlen: int = Field(256, ge=8)
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), which must be a multiple of num_key_value_heads "
                             f"({self.num_key_value_heads})")
        return self


class TrainRecipe(_Recipe):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class FinetuneRecipes(_Recipe):
    shakespeare: TrainRecipe
    ptb: TrainRecipe
    recall: TrainRecipe


def _mix(v: dict[str, float]) -> dict[str, float]:
    bad = [k for k in v if k not in RECALL_KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {', '.join(bad)} (choose from {', '.join(RECALL_KINDS)})")
    if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return v


class RecallRecipe(_Recipe):
    facts_min: int = Field(4, ge=1)
    facts_max: int = Field(8, ge=1)
    value_digits: int = Field(4, ge=1, le=9)
    memorized_keys: int = Field(16, ge=1)
    name_pool: int = Field(2000, ge=4, le=4900)
    pretrain_repeats: int = Field(200, ge=0)
    pretrain_restate_fraction: float = Field(0.05, ge=0, lt=1)
    lm_fraction: float = Field(0.25, ge=0, lt=1)
    train_mix: dict[str, float] = {"novel": 0.7, "closed_book": 0.15, "consistent": 0.1, "counterfactual": 0.05}
    eval_size: int = Field(1000, ge=1)
    eval_mix: dict[str, float] = {"novel": 0.5, "counterfactual": 0.5}
    train_seed: int = 1
    eval_seed: int = 2

    _check_train = field_validator("train_mix")(_mix)

    @field_validator("eval_mix")
    @classmethod
    def _check_eval(cls, v: dict[str, float]) -> dict[str, float]:
        _mix(v)
        if v.get("closed_book", 0) > 0:
            raise ValueError("closed_book items have no context to recall from; leave them out of eval_mix")
        return v

    @model_validator(mode="after")
    def _sizes(self):
        if self.facts_min > self.facts_max:
            raise ValueError(f"facts_min ({self.facts_min}) must be <= facts_max ({self.facts_max})")
        if self.train_seed == self.eval_seed:
            raise ValueError("eval_seed must differ from train_seed (the evaluation prompts are held out)")
        if self.memorized_keys + self.facts_max >= self.name_pool:
            raise ValueError(f"name_pool ({self.name_pool}) must exceed memorized_keys + facts_max")
        return self

    def spec(self, seed: int) -> RecallSpec:
        return RecallSpec(facts_min=self.facts_min, facts_max=self.facts_max, value_digits=self.value_digits,
                          memorized_keys=self.memorized_keys, name_pool=self.name_pool, seed=seed)


class EvalRecipe(_Recipe):
    seqlen: int = Field(256, ge=2)
    max_tokens: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(16, ge=1)
    recall_batch_size: int = Field(64, ge=1)
    kl_max_tokens: Optional[int] = Field(65536, ge=2)


class LmZooRecipe(_Recipe):
    """The lm-zoo recipe (``recipes/zoo/lm-zoo.yml``)."""

    seed: int = 0
    shakespeare_heldout: float = Field(0.1, gt=0, lt=1)
    pretrain_corpora: list[str] = ["wikitext2.valid", "shakespeare", "ptb.valid"]
    task_texts: list[str] = []
    tokenizer: TokenizerRecipe = TokenizerRecipe()
    model: ModelRecipe = ModelRecipe()
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pretrain: TrainRecipe
    finetune: FinetuneRecipes
    recall: RecallRecipe = RecallRecipe()
    eval: EvalRecipe = EvalRecipe()

    @field_validator("pretrain_corpora")
    @classmethod
    def _no_heldout(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c in HELDOUT_CORPORA]
        if bad:
            raise ValueError(f"{', '.join(bad)} is held out for evaluation and cannot be trained on")
        if not v:
            raise ValueError("name at least one corpus")
        return v

    @model_validator(mode="after")
    def _eval_fits(self):
        if self.eval.seqlen > self.model.seqlen:
            raise ValueError(f"eval.seqlen ({self.eval.seqlen}) exceeds model.seqlen ({self.model.seqlen}), "
                             f"the longest context the model was trained on")
        return self


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path | None = None, quick: bool = False) -> LmZooRecipe:
    """The recipe at ``path`` (default ``recipes/zoo/lm-zoo.yml``), with its ``quick:`` section applied when
    ``quick``. Both versions are validated, so a broken quick section fails the full build too."""
    from compress.io.files import read_mapping

    path = Path(path) if path is not None else RECIPE_PATH
    raw = read_mapping(path)
    over = raw.pop("quick", None) or {}
    if not isinstance(over, dict):
        raise CompressError(f"{path}: quick: must be a mapping of fields to override")
    recipes = {}
    for label, fields in (("full", raw), ("quick", _merge(raw, over))):
        try:
            recipes[label] = LmZooRecipe(**fields)
        except ValidationError as e:
            prefix = "" if label == "full" else "quick: "
            raise CompressError(f"{path}: {prefix}{format_validation_error(e)}") from None
    return recipes["quick" if quick else "full"]


# ----------------------------------------------------------------------------------------------------- data
def _task_text(name: str) -> str:
    path = data_dir() / "tasks" / name / "train.jsonl.gz"
    if not path.is_file():
        raise CompressError(f"task '{name}' has no {path}")
    lines = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            lines.append(row["text"] + (f" {row['text_pair']}" if row.get("text_pair") else ""))
    return "\n".join(lines) + "\n"


def corpora(recipe: LmZooRecipe) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(pretraining texts, held-out texts, domain fine-tuning texts), each by name. The last
    ``shakespeare_heldout`` of shakespeare is held out (as in ``compress demo``); the rest trains."""
    shakespeare = read_text(corpus_path("shakespeare"))
    cut = int(len(shakespeare) * (1 - recipe.shakespeare_heldout))
    train = {}
    for name in recipe.pretrain_corpora:
        train[name] = shakespeare[:cut] if name == "shakespeare" else read_text(corpus_path(name))
    for name in recipe.task_texts:
        train[f"task:{name}"] = _task_text(name)
    heldout = {"wikitext2": read_text(corpus_path("wikitext2.test")), "shakespeare": shakespeare[cut:],
               "ptb": read_text(corpus_path("ptb.test"))}
    domains = {"shakespeare": shakespeare[:cut], "ptb": read_text(corpus_path("ptb.valid"))}
    return train, heldout, domains


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (digits split one by one) as a ``PreTrainedTokenizerFast`` with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def chunks():
        for text in texts:
            for i in range(0, len(text), 1 << 16):
                yield text[i:i + (1 << 16)]

    tok.train_from_iterator(chunks(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """<s> doc </s> for every document, concatenated."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc_ids in tokenizer(docs, verbose=False)["input_ids"]:
        ids += doc_ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def restatement_stream(task: RecallTask, tokenizer, fraction: float, text_tokens: int,
                       rng: random.Random) -> torch.Tensor:
    """Restatement documents (``RecallTask.restatement_document``) making up ``fraction`` of the pretraining
    tokens once appended to ``text_tokens`` tokens of text."""
    target = round(fraction / (1 - fraction) * text_tokens)
    parts, n = [], 0
    while n < target:
        ids = token_stream(tokenizer, [task.restatement_document(rng) for _ in range(256)])
        parts.append(ids)
        n += ids.numel()
    return torch.cat(parts)[:target] if parts else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------------- training
Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # input_ids, labels, attention_mask


def window_sampler(ids: torch.Tensor, seqlen: int, batch_size: int, seed: int) -> Callable[[int], Batch]:
    """Random ``seqlen`` windows of a token stream, from a generator seeded once (labels = inputs)."""
    if ids.numel() <= seqlen:
        raise CompressError(f"training text has {ids.numel()} tokens; seqlen {seqlen} needs more")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seqlen)

    def sample(step: int) -> Batch:
        starts = torch.randint(0, ids.numel() - seqlen + 1, (batch_size,), generator=gen)
        batch = ids[starts[:, None] + offsets]
        return batch, batch, None

    return sample


def recall_sampler(task: RecallTask, tokenizer, batch_size: int, seed: int, mix: dict[str, float],
                   max_len: int, lm_stream: torch.Tensor | None = None, lm_fraction: float = 0.0,
                   exclude: frozenset[str] = frozenset()) -> Callable[[int], Batch]:
    """Fresh recall items every step (seeded by ``seed`` and the step; none whose prompt is in ``exclude``),
    right-padded, loss on answer + </s>; plus ``round(lm_fraction·batch_size)`` rows of ``lm_stream`` windows as
    wide as the recall rows (loss on every token), so that the fine-tune keeps some of the language model."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_lm = round(lm_fraction * batch_size) if lm_stream is not None else 0
    n_items = batch_size - n_lm
    if n_items < 1:
        raise CompressError(f"recall batch_size {batch_size} leaves no room for recall items at lm_fraction "
                            f"{lm_fraction}")
    gen = torch.Generator().manual_seed(seed)

    def sample(step: int) -> Batch:
        items = task.items(n_items, seed=seed * 1_000_003 + step, mix=mix, exclude=exclude)
        prompts = tokenizer([it["prompt"] for it in items])["input_ids"]
        answers = tokenizer([" " + it["answer"] for it in items], add_special_tokens=False)["input_ids"]
        seqs = [(p, a + [eos]) for p, a in zip(prompts, answers)]
        width = max(len(p) + len(a) for p, a in seqs)
        if width > max_len:
            raise CompressError(f"a recall training prompt has {width} tokens, more than model.seqlen {max_len}; "
                                f"lower recall.facts_max")
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (p, a) in enumerate(seqs):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[i, :len(p) + len(a)] = 1
        if n_lm:
            starts = torch.randint(0, lm_stream.numel() - width + 1, (n_lm,), generator=gen)
            windows = lm_stream[starts[:, None] + torch.arange(width)]
            ids[n_items:], labels[n_items:], mask[n_items:] = windows, windows, 1
        return ids, labels, mask

    return sample


def train(model, sample: Callable[[int], Batch], cfg: TrainRecipe, device: str, label: str,
          quiet: bool = False) -> dict:
    """AdamW (decay on matrices only), linear warmup then cosine to ``min_lr_ratio·lr``, bf16 autocast on CUDA,
    gradient clipping. Returns steps, tokens (non-padding inputs), seconds, tokens/s and the losses."""
    model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    cuda = str(device).startswith("cuda")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            **({"fused": True} if cuda else {}))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    tokens = 0
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with Progress(*columns, console=progress_console, disable=quiet or quiet_default()) as bar:
        task = bar.add_task(label, total=cfg.steps, loss="-", tps="-")
        for step in range(cfg.steps):
            ids, labels, mask = sample(step)
            tokens += ids.numel() if mask is None else int(mask.sum())  # counted on the CPU: no GPU sync
            ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True) if mask is not None else None
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if step % 10 == 0 or step == cfg.steps - 1:  # .item() syncs the GPU; not every step
                losses.append(round(loss.item(), 4))
                bar.update(task, loss=f"{losses[-1]:.3f}", tps=f"{tokens / (time.perf_counter() - t0):,.0f}")
            bar.advance(task)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.eval()
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "loss_first": losses[0], "loss_last": losses[-1],
            "losses_every_10": losses}


def new_model(recipe: LmZooRecipe, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = recipe.model
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                      num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                      intermediate_size=m.intermediate_size, max_position_embeddings=m.seqlen,
                      tie_word_embeddings=m.tie_word_embeddings, rope_theta=m.rope_theta, rms_norm_eps=1e-5,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    return model


def _save(model, tokenizer, folder: Path, dtype: str, title: str, method: str, inputs: dict, params: dict) -> None:
    save_module(model, folder, tokenizer=tokenizer, dtype=getattr(torch, dtype),
                card={"title": title, "method": method, "inputs": inputs, "params": params})


# ---------------------------------------------------------------------------------------------------- build
def _evaluate(model, tokenizer, base, texts: dict[str, str], recall_path: Path, recipe: LmZooRecipe,
              device: str) -> dict:
    e = recipe.eval
    out = {"perplexity": {k: round(perplexity(model, tokenizer, texts[k], seqlen=e.seqlen, max_tokens=e.max_tokens,
                                              batch_size=e.batch_size, device=device), 4)
                          for k in ("wikitext2", "shakespeare", "ptb")}}
    r = recall_eval(model, tokenizer, recall_path, batch_size=e.recall_batch_size, device=device)
    out["recall"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "by_kind"}
    out["recall"]["by_kind"] = {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in d.items()}
                                for k, d in r["by_kind"].items()}
    if base is not None and base is not model:
        out["kl_to_base_wikitext2"] = round(kl_divergence(model, base, tokenizer, texts["wikitext2"],
                                                          seqlen=e.seqlen, max_tokens=e.kl_max_tokens,
                                                          batch_size=e.batch_size, device=device), 5)
    return out


def _table(models: dict[str, dict], title: str) -> tuple[Table, str]:
    cols = ["model", "ppl wikitext2", "ppl shakespeare", "ppl ptb", "recall acc", "hallucination", "prior",
            "KL→base", "train s"]
    rows = []
    for name, m in models.items():
        p, r = m["perplexity"], m["recall"]
        rows.append([name, f"{p['wikitext2']:.2f}", f"{p['shakespeare']:.2f}", f"{p['ptb']:.2f}",
                     f"{r['accuracy']:.3f}", f"{r['hallucination_rate']:.3f}",
                     "-" if r["prior_rate"] is None else f"{r['prior_rate']:.3f}",
                     f"{m['kl_to_base_wikitext2']:.4f}" if "kl_to_base_wikitext2" in m else "-",
                     f"{m['train']['seconds']:.1f}"])
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    for row in rows:
        table.add_row(*row)
    md = "\n".join(["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    return table, md + "\n"


def build_lm_zoo(out_dir: str | Path, device: str = "cpu", quick: bool = False,
                 recipe_path: str | Path | None = None, *, overwrite: bool = False,
                 quiet: bool | None = None) -> dict:
    """Build lm-zoo into ``out_dir`` (e.g. ``checkpoints/zoo/lm-zoo``): ``base/``, ``shakespeare/``, ``ptb/``,
    ``recall/`` (Hugging Face folders with the tokenizer), ``recall_eval.jsonl``, ``recall_facts.json``,
    ``build.json`` and ``README.md``. Returns what ``build.json`` holds. ``quick`` applies the recipe's ``quick:``
    section (a small model that builds on 2 CPU cores in a minute or two)."""
    import transformers
    from transformers.utils import logging as hf_logging

    t_start = time.perf_counter()
    recipe = load_recipe(recipe_path, quick=quick)
    device = resolve_device(build_config(Compute, device=str(device)).device)
    out_dir = check_output(out_dir, overwrite)
    quiet = bool(quiet) or quiet_default()
    hf_logging.disable_progress_bar()
    seconds: dict[str, float] = {}
    console.print(f"[bold]lm-zoo[/] ({'quick' if quick else 'full'}) on {device} → {out_dir}")

    t = time.perf_counter()
    train_texts, texts, domains = corpora(recipe)
    task = RecallTask(recipe.recall.spec(recipe.seed))
    fact_docs = task.fact_documents(recipe.recall.pretrain_repeats, seed=recipe.seed)
    restate_rng = random.Random(recipe.seed + 2)
    eval_items = task.items(recipe.recall.eval_size, seed=recipe.recall.eval_seed, mix=recipe.recall.eval_mix)
    seconds["data"] = time.perf_counter() - t

    with atomic_dir(out_dir, overwrite) as tmp:
        recall_path = tmp / "recall_eval.jsonl"
        recall_path.write_text("".join(json.dumps({"id": i, **it}) + "\n" for i, it in enumerate(eval_items)))
        (tmp / "recall_facts.json").write_text(json.dumps(
            {"memorized": task.memorized, "template": {"fact": task.fact("KEY", "VALUE"),
                                                       "question": task.question("KEY")},
             "spec": recipe.recall.model_dump(), "seed": recipe.seed}, indent=2) + "\n")

        # tokenizer
        t = time.perf_counter()
        # the tokenizer sees every training text (the domain fine-tuning texts too); pretraining does not
        tokenizer = train_tokenizer(list(train_texts.values()) + list(domains.values()), recipe.tokenizer.vocab_size)
        seconds["tokenizer"] = time.perf_counter() - t
        stream = token_stream(tokenizer, list(train_texts.values()) + fact_docs)
        restate = restatement_stream(task, tokenizer, recipe.recall.pretrain_restate_fraction, stream.numel(),
                                     restate_rng)
        lm_stream = stream
        stream = torch.cat([stream, restate])
        domain_ids = {d: token_stream(tokenizer, [text]) for d, text in domains.items()}
        console.print(f"tokenizer: {len(tokenizer)} tokens in {seconds['tokenizer']:.1f}s; pretraining stream "
                      f"{stream.numel():,} tokens ({len(fact_docs)} memorized-fact documents, {restate.numel():,} "
                      f"tokens of restatement documents)")
        longest = max(len(tokenizer(it["prompt"])["input_ids"]) for it in eval_items)
        if longest + recipe.recall.value_digits + 2 > recipe.model.seqlen:
            raise CompressError(f"recall prompts reach {longest} tokens, too long for model.seqlen "
                                f"{recipe.model.seqlen}; lower recall.facts_max")

        # base
        seqlen = recipe.model.seqlen
        base = new_model(recipe, len(tokenizer), recipe.seed)
        n_params = sum(p.numel() for p in base.parameters())
        console.print(f"base: LlamaForCausalLM, {n_params:,} parameters")
        runs = {"base": train(base, window_sampler(stream, seqlen, recipe.pretrain.batch_size, recipe.seed),
                              recipe.pretrain, device, "pretrain base", quiet)}
        seconds["pretrain"] = runs["base"]["seconds"]
        _report("base", runs["base"])
        models = {"base": base}

        # fine-tunes
        t_ft = time.perf_counter()
        for name in FINETUNES:
            cfg: TrainRecipe = getattr(recipe.finetune, name)
            model = copy.deepcopy(base)
            if name == "recall":
                sample = recall_sampler(task, tokenizer, cfg.batch_size, recipe.recall.train_seed,
                                        recipe.recall.train_mix, seqlen, lm_stream, recipe.recall.lm_fraction,
                                        exclude=frozenset(it["prompt"] for it in eval_items))
            else:
                sample = window_sampler(domain_ids[name], seqlen, cfg.batch_size, recipe.seed + 1)
            runs[name] = train(model, sample, cfg, device, f"fine-tune {name}", quiet)
            _report(name, runs[name])
            models[name] = model
        seconds["finetune"] = time.perf_counter() - t_ft

        # save
        t = time.perf_counter()
        common = {"recipe": str(recipe_path or RECIPE_PATH), "quick": quick, "save_dtype": recipe.save_dtype}
        for name, model in models.items():
            method = ("pretrained from scratch on the bundled corpora" if name == "base"
                      else f"full fine-tune of base on {name}")
            _save(model, tokenizer, tmp / name, recipe.save_dtype, f"lm-zoo {name}", method,
                  {"base": "../base"} if name != "base" else {"data": ", ".join(train_texts)},
                  {**common, **{k: v for k, v in runs[name].items() if k != "losses_every_10"}})
        seconds["save"] = time.perf_counter() - t

        # evaluate
        t = time.perf_counter()
        results = {}
        for name, model in track_models(models, quiet):
            results[name] = {"path": name, "train": runs[name],
                             **_evaluate(model, tokenizer, models["base"], texts, recall_path, recipe, device)}
        seconds["eval"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t_start
        device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
        build = {
            "zoo": "lm-zoo", "quick": quick, "device": device, "device_name": device_name,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "params": n_params, "vocab_size": len(tokenizer),
            "recipe_path": str(recipe_path or RECIPE_PATH), "recipe": recipe.model_dump(),
            "data": {"pretrain_tokens": stream.numel(), "pretrain_texts": list(train_texts),
                     "memorized_fact_documents": len(fact_docs), "restatement_tokens": restate.numel(),
                     "finetune_tokens": {d: ids.numel() for d, ids in domain_ids.items()},
                     "heldout": {"wikitext2": "wikitext2.test",
                                 "shakespeare": f"last {recipe.shakespeare_heldout:.0%} of shakespeare",
                                 "ptb": "ptb.test"},
                     "recall_eval": "recall_eval.jsonl",
                     # accuracy of guessing a value of the right length without reading the context
                     "recall_guess_chance": 1 / (9 * 10 ** (recipe.recall.value_digits - 1))},
            "eval": recipe.eval.model_dump(),
            "models": results,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        table, md = _table(results, f"lm-zoo ({'quick' if quick else 'full'}, {device}, {n_params:,} parameters)")
        (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# lm-zoo{' (quick)' if quick else ''}\n\nBuilt by `compress.zoo.lm.build_lm_zoo` on {device} "
            f"({device_name}) in {seconds['total']:.0f} s from `{build['recipe_path']}`. Perplexity on held-out "
            f"text (windows of {recipe.eval.seqlen}), recall on `recall_eval.jsonl` ({len(eval_items)} prompts), "
            f"KL to base on wikitext2.test. Every number is in `build.json`.\n\n" + md)
    Console(width=max(console.width, 120)).print(table)  # 9 columns: wider than a pipe's default 80
    console.print(f"wrote {out_dir} in {seconds['total']:.1f}s (pretrain {seconds['pretrain']:.1f}s, fine-tunes "
                  f"{seconds['finetune']:.1f}s, eval {seconds['eval']:.1f}s)")
    return build


def track_models(models: dict, quiet: bool):
    from compress.progress import track

    return track(list(models.items()), "evaluate", quiet=quiet)


def _report(name: str, run: dict) -> None:
    console.print(f"{name}: {run['steps']} steps, {run['tokens']:,} tokens in {run['seconds']:.1f}s "
                  f"({run['tokens_per_s']:,} tokens/s), loss {run['loss_first']:.3f} → {run['loss_last']:.3f}")


def build(out_dir: str | Path, *, recipe: str | Path | None = None, device: str = "cpu", quick: bool = False,
          overwrite: bool = False, quiet: bool = False, only: Optional[list[str]] = None) -> dict:
    """The zoo registry's entry point (``compress zoo build lm-zoo``): ``build_lm_zoo`` with the shared signature."""
    if only:
        raise CompressError("lm-zoo has no --tasks subset; it builds base, shakespeare, ptb and recall together")
    summary = build_lm_zoo(out_dir, device=device, quick=quick, recipe_path=recipe, overwrite=overwrite,
                           quiet=quiet)
    return summary


def recall_probes(n: int = 64, seed: int = 7, quick: bool = False, recipe: Optional[str | os.PathLike] = None
                  ) -> list[dict]:
    """``n`` probes of lm-zoo's recall task (novel keys and counterfactual prompts as in its evaluation mix)
    from a seed that is neither the recipe's training nor its evaluation seed, evaluation prompts excluded."""
    rec = load_recipe(recipe, quick=quick)
    r = rec.recall
    if seed in (r.train_seed, r.eval_seed):
        which = "training" if seed == r.train_seed else "evaluation"
        raise CompressError(f"probe seed {seed} is the recall recipe's {which} seed; pick another so scoring never "
                            "sees those prompts")
    task = RecallTask(r.spec(rec.seed))
    heldout = {it["prompt"] for it in task.items(r.eval_size, seed=r.eval_seed, mix=r.eval_mix)}
    out = []
    for it in task.items(n, seed=seed, mix=r.eval_mix, exclude=heldout):
        ctx = it["prompt"].split(" Question:")[0]
        out.append({"prompt": it["prompt"], "context": ctx, "answer": it["answer"], "kind": it["kind"]})
    return out
