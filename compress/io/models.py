"""The one model loader: every command that runs a model (prune, perplexity and KL, head scores, classification,
NPS, the zoo) loads it through ``load_model``, so each meets the same checks and the same one-line errors.

The weight files are validated first (``check_weight_files``: headers as strictly as safetensors reads them),
because ``from_pretrained`` answers a truncated or lying file with a traceback; transformers' progress bars and
info logs are silenced while loading (``hf_quiet``). transformers is imported when a function runs, not on import.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.io.files import read_model_config
from compress.io.reader import check_weight_files

KINDS = ("auto", "causal", "encoder", "llava")


@contextmanager
def hf_quiet():
    """Silence transformers' loading progress bars and info logs for the duration (stderr stays for our own)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def model_class(path: str | os.PathLike, kind: str = "auto"):
    """(config, the class to load it with, kind): ``auto`` takes LLaVA when the config's model_type says so, a
    causal LM head when its architectures name one, else the bare encoder (``AutoModel``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise CompressError(f"model kind '{kind}' is not one of {', '.join(KINDS)}")
    path = Path(path)
    if read_model_config(path) is None:  # a broken config.json is one line naming it, before transformers reads it
        raise CompressError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        with hf_quiet():
            cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CompressError(f"{path}: cannot read config.json ({_first_line(e)})") from None
    if kind == "auto":
        archs = getattr(cfg, "architectures", None) or []
        if cfg.model_type == "llava":
            kind = "llava"
        else:
            kind = "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
    if kind == "llava":
        from transformers import LlavaForConditionalGeneration

        return cfg, LlavaForConditionalGeneration, kind
    return cfg, AutoModelForCausalLM if kind == "causal" else AutoModel, kind


def _torch_dtype(dtype):
    if isinstance(dtype, str) and dtype != "auto":
        name, dtype = dtype, getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CompressError(f"dtype '{name}' is not a torch dtype (examples: float32, bfloat16, auto)")
    return dtype


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, kind: str = "auto"):
    """The model of a local Hugging Face folder on ``device``, in eval mode (``dtype``: a torch dtype, its name,
    or ``"auto"`` for the config's); ``kind`` as in ``model_class``."""
    path = Path(path)
    dtype = _torch_dtype(dtype)
    cfg, cls, _ = model_class(path, kind)
    check_weight_files(path)
    try:
        with hf_quiet():
            model = cls.from_pretrained(path, config=cfg, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise CompressError(_shape_mismatch(path, cfg, cls) or
                            f"{path}: cannot load the model ({_first_line(e)})") from None
    return model.to(device).eval()


def _shape_mismatch(path: Path, cfg, cls) -> str | None:
    """The line naming the first weight whose shape the config does not describe (transformers reports it in a
    log this module silences, and raises a line that points to that log)."""
    from compress.io.reader import open_checkpoint

    with hf_quiet(), torch.device("meta"):
        state = cls.from_config(cfg).state_dict()
    prefix = getattr(cls, "base_model_prefix", "") or ""
    with open_checkpoint(path) as ck:
        for name in ck.names():
            for cand in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
                if cand in state and tuple(state[cand].shape) != tuple(ck.info(name).shape):
                    return (f"{path}: tensor '{name}' has shape {list(ck.info(name).shape)} but config.json "
                            f"describes {list(state[cand].shape)}; the weights and the config do not match")
    return None


def load_tokenizer(path: str | os.PathLike, *, processor: bool = False, why: str = "cannot load the tokenizer"):
    """The tokenizer (``processor=True``: the multimodal processor) of a local folder; a one-line error that
    starts with ``why`` when it has none."""
    from transformers import AutoProcessor, AutoTokenizer

    cls = AutoProcessor if processor else AutoTokenizer
    try:
        with hf_quiet():
            return cls.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CompressError(f"{path}: {why} ({_first_line(e)})") from None


def save_module(model, out: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype | None = None,
                card: dict | None = None, overwrite: bool = False) -> Path:
    """Write an in-memory transformers model (and its tokenizer) as a Hugging Face folder through the one folder
    writer (``write_folder``: atomic, header reserved, each byte written once), the layout ``save_pretrained``
    gives. Tied parameters are written once under their first name, as ``save_pretrained`` drops the tied copies
    (``lm_head.weight`` of a model with tied embeddings)."""
    from compress.io.writer import write_folder

    seen: set[int] = set()
    names = []
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        names.append(name)
    state = model.state_dict()

    def tensors():
        for name in names:
            t = state[name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, t.to("cpu").contiguous()

    import copy

    config = copy.deepcopy(model.config)
    # as save_pretrained records it: a loader picks the class (the LM head) from this field
    config.architectures = [type(model).__name__]
    files = {"config.json": config.to_json_string()}
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        files["generation_config.json"] = gen.to_json_string()
    finish = None if tokenizer is None else (lambda folder: tokenizer.save_pretrained(folder))
    return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(names), files=files,
                        finish=finish, card=card)
