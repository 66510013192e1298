"""`compress heads score|reinforce|probes`: options into configs, then ``compress.heads`` does the work."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from compress.config import build
from compress.errors import CompressError
from compress.options import DEVICE, OVERWRITE, QUIET, int_list

heads_app = typer.Typer(no_args_is_help=True, help="Attention-head importance: score, reinforce, probes.")


@heads_app.command("score")
def heads_score(
    model: Path = typer.Argument(..., help="Model folder (Llama-like, GPT-2, BERT, LLaVA)."),
    method: str = typer.Option(..., help="vhd (LLaVA: with/without the image), chd (with/without the context), "
                                         "nhar, seekr (needs --base), sink."),
    probes: Path = typer.Option(..., help="Probes JSON lines (prompt, context, answer, image); see the README."),
    out_path: Path = typer.Option(..., "--out", help="Scores file to write (.safetensors; a .png heatmap beside)."),
    base: Optional[Path] = typer.Option(None, help="seekr: the model before fine-tuning."),
    limit: Optional[int] = typer.Option(None, help="Use the first N probes."),
    epsilon: float = typer.Option(0.3, help="sink: ε of the sink-head rate."),
    anchors: int = typer.Option(3, help="nhar: anchor words per layer (most frequent logit-lens decodings)."),
    blockwise: Optional[bool] = typer.Option(None, "--blockwise/--whole-model",
                                             help="Run the probes block by block (only one block on the device; "
                                                  "text probes) or whole (default: block by block when the "
                                                  "weights take more than half the free device memory)."),
    device: str = DEVICE, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """One importance score per attention head ([layers, heads] + KV-group scores) and a heatmap."""
    from compress.config import HeadsScoreConfig

    run_score(build(HeadsScoreConfig, model=model, method=method, probes=probes, out=out_path, base=base,
                    limit=limit, epsilon=epsilon, anchors=anchors, blockwise=blockwise, device=device,
                    overwrite=overwrite, quiet=quiet))


@heads_app.command("reinforce")
def heads_reinforce(
    model: Path = typer.Argument(..., help="Model folder."),
    scores: Path = typer.Option(..., help="Scores file from `compress heads score`."),
    out_path: Path = typer.Option(..., "--out", help="Folder to write."),
    alpha: float = typer.Option(2.0, help="Scale of the chosen heads' outputs."),
    top_per_layer: float = typer.Option(0.5, help="Fraction of each chosen layer's heads, by score."),
    layers: Optional[str] = typer.Option(None, help="Layers to reinforce: 0,1,2 or 2-5 (default: all)."),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
):
    """VHR: scale the top heads' outputs by α, baked into the output projection's columns."""
    from compress.config import HeadsReinforceConfig

    run_reinforce(build(HeadsReinforceConfig, model=model, scores=scores, out=out_path, alpha=alpha,
                        top_per_layer=top_per_layer, layers=int_list(layers, "--layers") if layers else None,
                        overwrite=overwrite, quiet=quiet))


@heads_app.command("probes")
def heads_probes(
    zoo: str = typer.Argument("lm-zoo", help="lm-zoo (recall task probes from its recipe)."),
    out_path: Path = typer.Option(..., "--out", help="Probes file to write (.jsonl)."),
    n: int = typer.Option(64, help="Number of probes."),
    seed: int = typer.Option(7, help="Probe seed (must differ from the recipe's training and evaluation seeds)."),
    quick: bool = typer.Option(False, "--quick", help="The recipe's quick: section (the CPU zoo)."),
    recipe: Optional[Path] = typer.Option(None, help="Zoo recipe (default recipes/zoo/lm-zoo.yml)."),
    overwrite: bool = OVERWRITE,
):
    """Write head-scoring probes (with a context span and an answer) from a zoo recipe, held out from eval."""
    from compress.heads.probes import write_probes
    from compress.io.writer import check_output
    from compress.zoo.lm import recall_probes

    if zoo != "lm-zoo":
        raise CompressError(f"probes for '{zoo}': only lm-zoo (its recall task) has a probe generator")
    check_output(out_path, overwrite, [recipe])
    write_probes(recall_probes(n, seed, quick, recipe), out_path, overwrite)
    print(f"wrote {n} probes to {out_path}")


def load_model(path: Path, device: str, tokenizer: bool = True):
    """(model, tokenizer or processor, is_llava) in float32, eval mode: LLaVA, a causal LM, or an encoder.
    ``tokenizer=False`` (seekr's base model: weights only): no tokenizer/processor is looked for (None)."""
    from compress.io.models import load_model as load
    from compress.io.models import load_tokenizer

    model = load(path, device=device)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
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
    blockwise = cfg.blockwise
    if blockwise is None:
        from compress.io.fit import should_stream, weight_bytes

        blockwise = should_stream(sum(weight_bytes(m) for m in (cfg.model, cfg.base) if m is not None), device)
    with contextlib.ExitStack() as stack:
        if blockwise:
            from compress.heads.blockwise import BlockCapture
            from compress.io.models import load_tokenizer

            model = stack.enter_context(BlockCapture(cfg.model, device=device, quiet=cfg.quiet))
            llava = model.config.model_type == "llava"
            if llava and cfg.method == "vhd":
                raise CompressError(f"{cfg.model}: vhd compares probes with and without their image, which needs "
                                    "the vision tower; score it with --whole-model")
            tok = load_tokenizer(cfg.model, processor=llava, why="no tokenizer to encode the probes")
            base = (stack.enter_context(BlockCapture(cfg.base, device=device, quiet=cfg.quiet))
                    if cfg.base is not None else None)
            layout = model.layout
        else:
            model, tok, llava = load_model(cfg.model, device)
            base = load_model(cfg.base, device, tokenizer=False)[0] if cfg.base is not None else None
            layout = attention_layout(model)
        image_token = None
        if llava:
            image_token = getattr(model.config, "image_token_id", None)
            image_token = image_token if image_token is not None else model.config.image_token_index
        probes = encode_probes(tok, items, cfg.method, cfg.probes, image_token)
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


def register(app: typer.Typer) -> None:
    app.add_typer(heads_app, name="heads")
