"""Probe files for head scoring: JSON lines, one probe per line::

    {"prompt": "The code of Bafo is 4721. Question: what is the code of Bafo? Answer:",
     "context": "The code of Bafo is 4721.", "answer": "4721"}

- ``prompt`` (required): the text the model reads; the predicting position is its last token.
- ``context`` (chd, nhar on text): a substring of ``prompt``; chd compares the heads with the prompt as is and with
  this span removed; nhar's span is its tokens.
- ``answer`` (seekr): the loss is the next-token loss of `` answer`` after the prompt.
- ``image`` (LLaVA: vhd, nhar, sink, seekr): an image file, relative paths taken from the probes file's folder;
  the prompt holds the processor's image token once (e.g. ``<image>``), which the model's processor expands to
  the model's count of image tokens; vhd compares with and without the image (its tokens removed, no pixels),
  nhar's span is the image tokens. On LLaVA, probes without an image are text probes (chd, nhar with a context).

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


def read_probes(path: str | os.PathLike, limit: Optional[int] = None) -> list[tuple[int, dict]]:
    """(line number, probe) of each probe of a JSON-lines file, ``prompt`` and ``context`` checked."""
    from compress.io.files import read_jsonl

    out = []
    for lineno, item in read_jsonl(path, "probes", "JSON lines with a 'prompt' each; `compress heads probes "
                                   "lm-zoo` writes one", limit):
        if not isinstance(item.get("prompt"), str):
            raise CompressError(f"{path}:{lineno}: a probe needs a 'prompt' (string)")
        ctx = item.get("context")
        if ctx is not None and (not isinstance(ctx, str) or ctx not in item["prompt"]):
            raise CompressError(f"{path}:{lineno}: 'context' must be a substring of 'prompt'")
        if "image" in item and not isinstance(item["image"], str):
            raise CompressError(f"{path}:{lineno}: 'image' must be a file path (string)")
        out.append((lineno, item))
    return out


def encode_probes(tokenizer_or_processor, items: list[tuple[int, dict]], method: str, path: str | os.PathLike,
                  image_token_id: Optional[int] = None) -> list[Probe]:
    """``read_probes``'s items tokenized for ``method``; errors name ``path:line``. ``image_token_id`` given (a
    LLaVA model): items with an ``image`` go through the processor (relative image paths are taken from the
    probes file's folder), the others through its tokenizer; without it (a text model) an ``image`` is refused."""
    root = Path(path).parent
    if image_token_id is None and method == "vhd":
        raise CompressError("vhd compares with and without an image: use a LLaVA model and image probes, or chd "
                            "for text")
    out = []
    for lineno, item in items:
        where = f"{path}:{lineno}"
        if image_token_id is None:
            if "image" in item:
                raise CompressError(f"{where}: an image probe needs a LLaVA model "
                                    "(LlavaForConditionalGeneration with its processor)")
            out.append(encode_text_probe(tokenizer_or_processor, item, method, where))
        elif "image" in item:
            out.append(encode_image_probe(tokenizer_or_processor, item, image_token_id, root, method, where))
        elif method == "vhd":
            raise CompressError(f"{where}: vhd needs an 'image' (a file; the prompt holds the image token)")
        else:
            out.append(encode_text_probe(getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor),
                                         item, method, where))
    return out


def _answer_labels(prompt_ids: torch.Tensor, full: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.equal(full[:prompt_ids.numel()], prompt_ids):
        raise CompressError(f"{where}: the prompt's tokens change when the answer is appended")
    labels = full.clone()
    labels[:prompt_ids.numel()] = -100
    return labels


def encode_text_probe(tokenizer, item: dict, method: str, where: str | int = "probe") -> Probe:
    """A text probe tokenized for ``method``: span = the context's tokens (by character offsets), the prompt
    without the context, labels on the answer. ``where`` prefixes errors (``path:line``)."""
    where = f"probe {where}" if isinstance(where, int) else where
    prompt, ctx = item["prompt"], item.get("context")
    if method in ("chd", "nhar") and not ctx:
        raise CompressError(f"{where}: {method} needs a 'context' (a span of the prompt)")
    if method == "seekr" and not isinstance(item.get("answer"), str):
        raise CompressError(f"{where}: seekr needs an 'answer'")
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
    if method == "seekr":
        full = torch.tensor(tokenizer(prompt + " " + item["answer"])["input_ids"])
        return Probe(full, None, without, None, _answer_labels(ids, full, where))
    return Probe(ids, span, without)


def encode_image_probe(processor, item: dict, image_token_id: int, root: Path, method: str = "vhd",
                       where: str = "probe") -> Probe:
    """A LLaVA probe: the processor expands the prompt's image token to the model's count of image tokens;
    span = those tokens; without = the ids with them removed (and no pixels); seekr: labels on the answer."""
    from PIL import Image, UnidentifiedImageError

    img_path = Path(item["image"])
    img_path = img_path if img_path.is_absolute() else Path(root) / img_path
    if not img_path.is_file():
        raise CompressError(f"{where}: image {img_path}: no such file")
    try:
        with Image.open(img_path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CompressError(f"{where}: image {img_path}: cannot read it ({str(e).splitlines()[0]})") from None
    if method == "seekr" and not isinstance(item.get("answer"), str):
        raise CompressError(f"{where}: seekr needs an 'answer'")

    def encode(text):
        try:
            return processor(images=image, text=text, return_tensors="pt")
        except ValueError as e:  # e.g. the prompt's image tokens do not match one image
            raise CompressError(f"{where}: the processor refused the probe ({str(e).splitlines()[0]})") from None

    enc = encode(item["prompt"])
    ids = enc["input_ids"][0]
    span = ids == image_token_id
    if not bool(span.any()):
        tok = getattr(processor, "image_token", "the image token")
        raise CompressError(f"{where}: no image token ({image_token_id}, the model's image_token_id) in the "
                            f"processed prompt; the prompt needs {tok} and the processor's token id must match")
    if method == "seekr":
        full = encode(item["prompt"] + " " + item["answer"])["input_ids"][0]
        return Probe(full, None, ids[~span], enc["pixel_values"], _answer_labels(ids, full, where))
    return Probe(ids, span, ids[~span], enc["pixel_values"])


def write_probes(items: list[dict], out: str | os.PathLike, overwrite: bool = False) -> Path:
    from compress.io.writer import atomic_file

    with atomic_file(out, overwrite) as tmp:
        tmp.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return Path(out)
