"""The evaluators of `compress eval`, one function per evaluator field of ``EvalConfig``: each returns the
result as a dict and as one line."""

from __future__ import annotations

from pathlib import Path

from compress.config import EvalConfig
from compress.errors import CompressError
from compress.runtime import resolve_device, torch_dtype


def _eval_task(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.data import load_task
    from compress.eval.classify import evaluate

    if cfg.task is not None:
        load_task(cfg.task, cfg.split)  # an unknown or malformed task fails here, before any model is loaded
    res = evaluate(cfg.model, head=cfg.head, task=cfg.task, split=cfg.split, limit=cfg.limit,
                   batch_size=cfg.batch_size, device=resolve_device(cfg.device), dtype=torch_dtype(cfg.dtype))
    info = {"evaluator": "task", "model": str(cfg.model), "head": str(cfg.head or cfg.model), "limit": cfg.limit,
            **res.as_dict()}
    return info, res.summary()


def text_or_corpus(value: str, flag: str) -> Path:
    from compress.data import corpus_names, corpus_path

    text = Path(value)
    if not text.is_file():
        if value not in corpus_names():
            raise CompressError(f"{flag} {value}: neither a file nor a bundled corpus "
                                f"(corpora: {', '.join(corpus_names())})")
        text = corpus_path(value)
    return text


def _blockwise(cfg: EvalConfig, models: list[Path], device: str) -> bool:
    """``cfg.blockwise``, or (None) whether the weights of ``models`` are too big to run whole on ``device``."""
    if cfg.blockwise is not None:
        return cfg.blockwise
    from compress.io.fit import should_stream, weight_bytes

    dtype = torch_dtype(cfg.dtype or "float32")
    return should_stream(sum(weight_bytes(m, dtype) for m in models), device)


def _eval_perplexity(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.perplexity import load_causal_lm, perplexity

    text = text_or_corpus(cfg.perplexity, "--perplexity")
    device = resolve_device(cfg.device)
    blockwise = _blockwise(cfg, [cfg.model], device)
    kw = dict(seqlen=cfg.seqlen, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, device=device)
    if blockwise:
        from compress.eval.blockwise import blockwise_perplexity
        from compress.io.models import load_tokenizer

        dtype = torch_dtype(cfg.dtype or "float32")
        ppl = blockwise_perplexity(cfg.model, load_tokenizer(cfg.model), text, dtype=dtype, **kw)
    else:
        with hf_quiet():
            model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
        ppl = perplexity(model, tok, text, **kw)
    info = {"evaluator": "perplexity", "model": str(cfg.model), "text": str(text), "seqlen": cfg.seqlen,
            "max_tokens": cfg.max_tokens, "blockwise": blockwise, "perplexity": ppl}
    return info, f"perplexity {ppl:.4f} on {text} (windows of {cfg.seqlen} tokens)"


def _eval_kl(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.kl import kl_divergence
    from compress.eval.perplexity import load_causal_lm

    text = text_or_corpus(cfg.calib, "--calib")
    device = resolve_device(cfg.device)
    blockwise = _blockwise(cfg, [cfg.model, cfg.kl_to], device)
    kw = dict(seqlen=cfg.seqlen, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, device=device)
    if blockwise:
        from compress.eval.blockwise import blockwise_kl
        from compress.io.models import load_tokenizer

        kl = blockwise_kl(cfg.model, cfg.kl_to, load_tokenizer(cfg.model), text,
                          dtype=torch_dtype(cfg.dtype or "float32"), **kw)
    else:
        with hf_quiet():
            model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
            ref, _ = load_causal_lm(cfg.kl_to, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
        kl = kl_divergence(model, ref, tok, text, **kw)
    info = {"evaluator": "kl_to", "model": str(cfg.model), "reference": str(cfg.kl_to), "text": str(text),
            "seqlen": cfg.seqlen, "max_tokens": cfg.max_tokens, "blockwise": blockwise, "kl_nats_per_token": kl}
    return info, f"KL(reference ‖ model) {kl:.6f} nats/token on {text}"


def _eval_recall(cfg: EvalConfig) -> tuple[dict, str]:
    from compress.eval.classify import hf_quiet
    from compress.eval.perplexity import load_causal_lm
    from compress.eval.recall import recall_eval

    device = resolve_device(cfg.device)
    with hf_quiet():
        model, tok = load_causal_lm(cfg.model, device=device, dtype=torch_dtype(cfg.dtype) or "float32")
    r = recall_eval(model, tok, cfg.recall, limit=cfg.limit, batch_size=cfg.batch_size, device=device)
    info = {"evaluator": "recall", "model": str(cfg.model), "prompts": str(cfg.recall), **r}
    return info, (f"context recall on {r['n']} prompts: accuracy {r['accuracy']:.4f}, hallucination rate "
                  f"{r['hallucination_rate']:.4f}, confusion {r['confusion_rate']:.4f} (chance {r['chance']:.4f})")


# One function per evaluator flag of `compress eval` (the flag names are EvalConfig fields; see config.EVALUATORS).
EVALUATOR_RUNNERS = {"task": _eval_task, "perplexity": _eval_perplexity, "kl_to": _eval_kl, "recall": _eval_recall}


def run_eval(cfg: EvalConfig) -> tuple[dict, str]:
    """The evaluator the config names (EvalConfig admits exactly one)."""
    name = next(n for n in EVALUATOR_RUNNERS if getattr(cfg, n) is not None)
    return EVALUATOR_RUNNERS[name](cfg)
