"""`compress heads score|reinforce|probes`: glue between the CLI's configs and ``compress.heads``."""

from __future__ import annotations

from pathlib import Path

from compress.errors import CompressError


def load_model(path: Path, device: str, tokenizer: bool = True):
    """(model, tokenizer or processor, is_llava) in float32, eval mode: LLaVA, a causal LM, or an encoder.
    ``tokenizer=False`` (seekr's base model: weights only): no tokenizer/processor is looked for (None)."""
    from compress.io.models import load_tokenizer
    from compress.prune.pruner import _load_model

    model = _load_model(Path(path), device)
    llava = model.config.model_type == "llava"
    if not tokenizer:
        return model, None, llava
    if llava:
        return model, load_tokenizer(path, processor=True, why="LLaVA probes need the model's processor"), True
    return model, load_tokenizer(path, why="no tokenizer to encode the probes"), False


def run_score(cfg) -> dict:
    from compress.heads.layout import attention_layout
    from compress.heads.probes import encode_probes, read_probes
    from compress.heads.score import score_heads
    from compress.heads.scorefile import save_scores
    from compress.io.writer import check_output, config_inputs
    from compress.progress import console
    from compress.runtime import resolve_device

    device = resolve_device(cfg.device)
    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    items = read_probes(cfg.probes, cfg.limit)
    model, tok, llava = load_model(cfg.model, device)
    image_token = None
    if llava:
        image_token = getattr(model.config, "image_token_id", None)
        image_token = image_token if image_token is not None else model.config.image_token_index
    probes = encode_probes(tok, items, cfg.method, cfg.probes, image_token)
    base = load_model(cfg.base, device, tokenizer=False)[0] if cfg.base is not None else None
    layout = attention_layout(model)
    scores, meta = score_heads(model, probes, cfg.method, layout=layout, base_model=base, epsilon=cfg.epsilon,
                               n_anchors=cfg.anchors, quiet=cfg.quiet)
    meta_s = {k: v for k, v in meta.items() if not isinstance(v, list)}
    save_scores(cfg.out, scores, layout, {**meta_s, "model": str(cfg.model), "probes": str(cfg.probes),
                                          **({"base": str(cfg.base)} if cfg.base else {})}, overwrite=cfg.overwrite)
    top = scores.flatten().argmax()
    console.print(f"heads {cfg.method}: {layout.n_layers} layers × {layout.n_heads} heads on {len(probes)} probes; "
                  f"highest layer {int(top) // layout.n_heads} head {int(top) % layout.n_heads} "
                  f"({float(scores.flatten()[top]):.4g})" + (f"; sink rate {meta['sink_rate']:.3f}"
                                                              if "sink_rate" in meta else ""), highlight=False)
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}")
    return {"scores": scores.tolist(), **meta}


def run_reinforce(cfg) -> dict:
    from compress.heads.layout import attention_layout
    from compress.heads.reinforce import reinforce, reinforce_heads
    from compress.heads.scorefile import load_scores
    from compress.io.writer import check_output, config_inputs

    check_output(cfg.out, cfg.overwrite, config_inputs(cfg))
    layout = attention_layout(cfg.model)
    sf = load_scores(cfg.scores)
    if tuple(sf.scores.shape) != (layout.n_layers, layout.n_heads):
        raise CompressError(f"{cfg.scores}: scores are {list(sf.scores.shape)} but {cfg.model} has "
                            f"{layout.n_layers} layers of {layout.n_heads} heads")
    heads = reinforce_heads(layout, sf.scores, cfg.top_per_layer, cfg.layers)
    reinforce(cfg.model, heads, cfg.alpha, cfg.out, overwrite=cfg.overwrite, quiet=cfg.quiet,
              extra={"scores": str(cfg.scores), "top_per_layer": cfg.top_per_layer})
    print(f"wrote {cfg.out}: {len(heads)} heads scaled by {cfg.alpha:g} in their output projection")
    return {"heads": heads}
