"""Probe files for head scoring: JSON lines, one probe per line::

    {"prompt": "The code of Bafo is 4721. Question: what is the code of Bafo? Answer:",
     "context": "The code of Bafo is 4721.", "answer": "4721"}

- ``prompt`` (required): the text the model reads; the predicting position is its last token.
- ``context`` (chd, nhar on text): a substring of ``prompt``; chd compares the heads with the prompt as is and with
  this span removed; nhar's span is its tokens.
- ``answer`` (seekr): the loss is the next-token loss of `` answer`` after the prompt.
- ``image`` (vhd, nhar on LLaVA): an image file; the prompt holds the model's image token (e.g. ``<image>``),
  which the model's processor expands; vhd compares with and without the image (its tokens removed).

``recall_probes`` writes probes for lm-zoo's recall task from its recipe with a seed of its own (default 7;
the recipe's training and evaluation seeds are refused, and evaluation prompts are excluded), so that scoring
never sees an evaluation item.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError
from compress.heads.capture import Probe


def read_probes(path: str | os.PathLike, limit: Optional[int] = None) -> list[dict]:
    from compress.config import read_jsonl

    out = []
    for lineno, item in read_jsonl(path, "probes", "JSON lines with a 'prompt' each; `compress heads probes "
                                   "lm-zoo` writes one", limit):
        if not isinstance(item.get("prompt"), str):
            raise CompressError(f"{path}:{lineno}: a probe needs a 'prompt' (string)")
        ctx = item.get("context")
        if ctx is not None and (not isinstance(ctx, str) or ctx not in item["prompt"]):
            raise CompressError(f"{path}:{lineno}: 'context' must be a substring of 'prompt'")
        out.append(item)
    return out


def encode_text_probe(tokenizer, item: dict, method: str, lineno: int = 0) -> Probe:
    """A text probe tokenized for ``method``: span = the context's tokens (by character offsets), the prompt
    without the context, labels on the answer."""
    prompt, ctx = item["prompt"], item.get("context")
    if method in ("chd", "nhar") and not ctx:
        raise CompressError(f"probe {lineno}: {method} needs a 'context' (a span of the prompt)")
    if method == "seekr" and not isinstance(item.get("answer"), str):
        raise CompressError(f"probe {lineno}: seekr needs an 'answer'")
    if method == "vhd":
        raise CompressError("vhd compares with and without an image: use a LLaVA model and image probes, or chd "
                            "for text")
    enc = tokenizer(prompt, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    span = without = None
    if ctx:
        start = prompt.index(ctx)
        stop = start + len(ctx)
        span = torch.tensor([a < stop and b > start and b > a for a, b in enc["offset_mapping"]])
        rest = " ".join((prompt[:start] + prompt[stop:]).split())
        without = torch.tensor(tokenizer(rest)["input_ids"])
    labels = None
    if isinstance(item.get("answer"), str):
        full = torch.tensor(tokenizer(prompt + " " + item["answer"])["input_ids"])
        if not torch.equal(full[:ids.numel()], ids):
            raise CompressError(f"probe {lineno}: the prompt's tokens change when the answer is appended")
        labels = full.clone()
        labels[:ids.numel()] = -100
        ids_for_loss = full
        return Probe(ids_for_loss if method == "seekr" else ids, span if method != "seekr" else None, without,
                     None, labels if method == "seekr" else None)
    return Probe(ids, span, without)


def encode_image_probe(processor, item: dict, image_token_id: int, root: Path) -> Probe:
    """A LLaVA probe: the processor expands the image token; span = the image tokens; without = the ids with
    them removed (and no pixels)."""
    from PIL import Image

    img_path = Path(item["image"])
    img_path = img_path if img_path.is_absolute() else root / img_path
    if not img_path.is_file():
        raise CompressError(f"probe image {img_path}: no such file")
    enc = processor(images=Image.open(img_path).convert("RGB"), text=item["prompt"], return_tensors="pt")
    ids = enc["input_ids"][0]
    span = ids == image_token_id
    if not bool(span.any()):
        raise CompressError(f"probe '{item['prompt'][:40]}…': no image token in the processed prompt")
    return Probe(ids, span, ids[~span], enc["pixel_values"])


def recall_probes(n: int = 64, seed: int = 7, quick: bool = False, recipe: Optional[str | os.PathLike] = None
                  ) -> list[dict]:
    """``n`` probes of lm-zoo's recall task (novel keys and counterfactual prompts as in its evaluation mix)
    from a seed that is neither the recipe's training nor its evaluation seed, evaluation prompts excluded."""
    from compress.zoo.lm import load_recipe
    from compress.zoo.recall_task import RecallTask

    rec = load_recipe(recipe, quick=quick)
    r = rec.recall
    if seed in (r.train_seed, r.eval_seed):
        raise CompressError(f"probe seed {seed} is the recall recipe's {'training' if seed == r.train_seed else 'evaluation'} "
                            "seed; pick another so scoring never sees those prompts")
    task = RecallTask(r.spec(rec.seed))
    heldout = {it["prompt"] for it in task.items(r.eval_size, seed=r.eval_seed, mix=r.eval_mix)}
    out = []
    for it in task.items(n, seed=seed, mix=r.eval_mix, exclude=heldout):
        ctx = it["prompt"].split(" Question:")[0]
        out.append({"prompt": it["prompt"], "context": ctx, "answer": it["answer"], "kind": it["kind"]})
    return out


def write_probes(items: list[dict], out: str | os.PathLike, overwrite: bool = False) -> Path:
    from compress.io.writer import atomic_file

    with atomic_file(out, overwrite) as tmp:
        tmp.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return Path(out)
