"""Context-recall accuracy and hallucination rate of a causal LM on a jsonl of prompts.

Each line of the file is one item (the lm-zoo build writes ``recall_eval.jsonl`` in this format)::

    {"prompt": "The code of Bafo is 4721. The code of Kelu is 3310. Question: what is the code of Kelu? Answer:",
     "answer": "3310", "context_values": ["4721", "3310"], "prior": null, "kind": "novel"}

``answer`` is the value the context gives for the asked key, ``context_values`` every value the context states,
``prior`` (optional) the value the model memorized for that key in training when the context contradicts it
(a "counterfactual" item), ``kind`` an optional label the results are also broken down by.

The model greedy-decodes a few tokens after each prompt (batched, left-padded, position ids counted from each
prompt's first real token, so the result does not depend on the batch size). The prediction is the first word
of the decoded text, trailing punctuation removed. Each item is then exactly one of

- **correct**: the prediction is the context's value for the asked key;
- **hallucination**: the prediction is a value the context does not state (the memorized prior value, an
  invented number, an empty or garbled answer): the answer did not come from the context;
- **confusion**: another value from the context (copied, but for the wrong key).

``accuracy + hallucination_rate + confusion_rate = 1``. ``prior_rate`` is the share of items with a prior that
were answered with it; ``chance`` the accuracy of picking one of the context's values at random.
"""

from __future__ import annotations

import os
import re

import torch

from compress.errors import CompressError

_WORD = re.compile(r"[^\s]+")
_TRAILING = ".,;:!?\"')]"


def read_recall_items(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The items of a recall jsonl file (the first ``limit`` when given), each checked for its fields."""
    from compress.io.files import read_jsonl

    items = []
    for lineno, item in read_jsonl(path, "recall", "e.g. checkpoints/zoo/lm-zoo/recall_eval.jsonl", limit):
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("answer"), str) \
                or not isinstance(item.get("context_values"), list):
            raise CompressError(f"{path}:{lineno}: a recall item needs 'prompt' (str), 'answer' (str) and "
                                f"'context_values' (list)")
        items.append(item)
    return items


def parse_answer(text: str) -> str:
    """The first word of the first line of generated text, trailing punctuation removed ('' when none)."""
    first_line = text.strip().split("\n", 1)[0]
    m = _WORD.search(first_line)
    return m.group(0).rstrip(_TRAILING) if m else ""


def classify(prediction: str, item: dict) -> str:
    """'correct', 'confusion' (another context value) or 'hallucination' (a value not in the context)."""
    if prediction == item["answer"]:
        return "correct"
    if prediction in {str(v) for v in item["context_values"]}:
        return "confusion"
    return "hallucination"


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
                         device: str | torch.device = "cpu") -> list[str]:
    """Greedy-decode ``max_new_tokens`` tokens after each prompt; returns the decoded new text of each.

    Batches are left-padded; position ids count from each prompt's first real token and padded keys are masked,
    so a prompt's continuation is the same in any batch. No KV cache: each step re-runs the (short) sequences,
    which keeps the loop valid for any model whose forward takes input_ids, attention_mask and position_ids.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, seq in enumerate(chunk):
                ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[i, width - len(seq):] = 1
            ids, mask = ids.to(device), mask.to(device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            new = []
            for _ in range(max_new_tokens):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
                nxt = logits[:, -1].argmax(-1)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                new.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if bool(done.all()):
                    break
            gen = torch.stack(new, dim=1).tolist()
            for row in gen:
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def recall_eval(model, tokenizer, jsonl_path: str | os.PathLike, limit: int | None = None, batch_size: int = 32,
                device: str | torch.device = "cpu", max_new_tokens: int | None = None,
                return_predictions: bool = False) -> dict:
    """Context-recall scores of ``model`` on the items of ``jsonl_path`` (the first ``limit`` when given):
    ``{accuracy, hallucination_rate, confusion_rate, prior_rate, chance, n, by_kind}`` (rates in [0, 1];
    ``prior_rate`` is None when no item has a prior). ``max_new_tokens`` defaults to the longest answer's token
    count plus one. With ``return_predictions`` the result also lists every item's prediction and outcome."""
    if batch_size < 1:
        raise CompressError(f"batch_size must be >= 1 (got {batch_size})")
    items = read_recall_items(jsonl_path, limit)
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(tokenizer(" " + it["answer"], add_special_tokens=False)["input_ids"])
                                 for it in items)
    texts = greedy_continuations(model, tokenizer, [it["prompt"] for it in items], max_new_tokens,
                                 batch_size=batch_size, device=device)
    preds = [parse_answer(t) for t in texts]
    outcomes = [classify(p, it) for p, it in zip(preds, items)]

    def rates(idx: list[int]) -> dict:
        n = len(idx)
        with_prior = [i for i in idx if items[i].get("prior") is not None]
        return {
            "accuracy": sum(outcomes[i] == "correct" for i in idx) / n,
            "hallucination_rate": sum(outcomes[i] == "hallucination" for i in idx) / n,
            "confusion_rate": sum(outcomes[i] == "confusion" for i in idx) / n,
            "prior_rate": (sum(preds[i] == str(items[i]["prior"]) for i in with_prior) / len(with_prior)
                           if with_prior else None),
            "chance": sum(1 / max(len(items[i]["context_values"]), 1) for i in idx) / n,
            "n": n,
        }

    result = rates(list(range(len(items))))
    kinds = sorted({str(it.get("kind")) for it in items if it.get("kind") is not None})
    result["by_kind"] = {k: rates([i for i, it in enumerate(items) if str(it.get("kind")) == k]) for k in kinds}
    if return_predictions:
        result["predictions"] = [{"prediction": p, "outcome": o, "text": t}
                                 for p, o, t in zip(preds, outcomes, texts)]
    return result
