"""Shared fixtures: tiny random Hugging Face models built here, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COMPRESS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def save_llama(path: Path, seed: int, dtype=torch.float32, **kw) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).to(dtype)
    model.save_pretrained(path)
    return path


def finetune_like(base: Path, out: Path, scale: float = 0.01, seed: int = 1, dtype=None) -> Path:
    """A 'fine-tuned' copy of ``base``: every float weight moved by a small random delta."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = save_llama(root / "base", seed=0)
    ft = finetune_like(base, root / "ft")
    return base, ft


@pytest.fixture(scope="session")
def llama_pair_bf16(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama_bf16")
    base = save_llama(root / "base", seed=0, dtype=torch.bfloat16)
    ft = finetune_like(base, root / "ft", dtype=torch.bfloat16)
    return base, ft


def tiny_stories_llama(root: Path) -> Path:
    """A tiny random Llama (4 blocks, GQA) with stories260K's real 512-token tokenizer, in ``root/tiny``."""
    import shutil

    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    stories = convert_llama2c(*stories260k_files(), root / "stories") or root / "stories"
    path = save_llama(root / "tiny", seed=0, vocab_size=512, num_hidden_layers=4, hidden_size=48,
                      intermediate_size=96)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(stories) / f, path / f)
    return path


def run_cli(*args: str):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from compress.cli import main

    o, e = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main([str(a) for a in args])
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else 1
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def stories260k(tmp_path_factory) -> Path:
    """The real pretrained stories260K (llama2.c) as a Hugging Face Llama folder, with its 512-token tokenizer."""
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories") / "stories260k"
    convert_llama2c(*stories260k_files(), out)
    return out


@pytest.fixture(scope="module")
def calib_wikitext(tmp_path_factory) -> Path:
    """A short calibration text: the first 20,000 characters of the bundled wikitext2.valid."""
    from compress.data import corpus_path, read_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(read_text(corpus_path("wikitext2.valid"))[:20000])
    return path
