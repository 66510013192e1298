"""stories260k: the real pretrained llama2.c stories260K (karpathy/tinyllamas) converted to a Hugging Face
``LlamaForCausalLM`` folder by ``compress.io.llama2c.convert_llama2c``, with a ``build.json`` that names the
source files (and their SHA-256) and the perplexity on a bundled corpus as a sanity check. Seconds on a CPU;
``quick`` builds the same thing (there is nothing smaller to build)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from compress.config import Stories260kRecipe
from compress.data import corpus_path, data_dir, stories260k_files
from compress.errors import CompressError
from compress.io.files import load_recipe
from compress.io.llama2c import convert_llama2c
from compress.io.writer import atomic_dir, check_output
from compress.runtime import resolve_device

NAME = "stories260k"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source(given: Optional[Path], default: Path) -> Path:
    if given is None:
        return default
    path = given if given.is_absolute() else data_dir() / given
    if not path.is_file():
        raise CompressError(f"{path}: no such file (recipe paths are relative to the data folder {data_dir()})")
    return path


def build(out_dir: str | Path, *, recipe: str | Path, device: str = "cpu", quick: bool = False,
          overwrite: bool = False, quiet: bool = False, only: Optional[list[str]] = None) -> dict:
    """Convert stories260K into ``out_dir`` (a Hugging Face Llama folder plus build.json); returns the summary."""
    from compress.eval.classify import hf_quiet
    from compress.eval.perplexity import load_causal_lm, perplexity

    if only:
        raise CompressError("stories260k has no parts to choose from (--tasks/only applies to minilm-8task)")
    rec: Stories260kRecipe = load_recipe(recipe, Stories260kRecipe, quick=quick, require_quick=False)
    out_dir = check_output(out_dir, overwrite)
    device = resolve_device(device)
    default_bin, default_tok = stories260k_files()
    model_bin, tok_bin = _source(rec.model_bin, default_bin), _source(rec.tokenizer_bin, default_tok)
    t0 = time.perf_counter()
    with atomic_dir(out_dir, overwrite) as tmp:
        # convert_llama2c writes atomically itself: replace the empty temporary folder, then add build.json
        convert_llama2c(model_bin, tok_bin, tmp, overwrite=True)
        summary: dict = {"name": NAME, "format": "compress.zoo/1", "quick": quick, "recipe_path": str(recipe),
                         "recipe": rec.model_dump(mode="json"),
                         "source": {"model_bin": str(model_bin), "model_sha256": _sha256(model_bin),
                                    "tokenizer_bin": str(tok_bin), "tokenizer_sha256": _sha256(tok_bin)}}
        with hf_quiet():
            model, tok = load_causal_lm(tmp, device=device)
        summary["params"] = sum(p.numel() for p in model.parameters())
        if rec.check_corpus:
            ppl = perplexity(model, tok, corpus_path(rec.check_corpus), seqlen=256,
                             max_tokens=rec.check_max_tokens, device=device)
            summary["check"] = {"corpus": rec.check_corpus, "max_tokens": rec.check_max_tokens, "seqlen": 256,
                                "perplexity": ppl}
        summary["device"] = device
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        rows = [("parameters", f"{summary['params']:,}")]
        if "check" in summary:
            rows.append((f"perplexity ({rec.check_corpus}, {rec.check_max_tokens} tokens)", f"{ppl:.3f}"))
        summary["table"] = "| stories260k | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        (tmp / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
