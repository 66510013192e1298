"""VHR's head reinforcement baked into the weights (He et al. 2025, "Cracking the Code of Hallucination in LVLMs
with Vision-aware Head Divergence", §4): the outputs of a chosen set of heads are multiplied by α before the
output projection. Since o_proj is linear, scaling head h's output by α equals scaling its input columns
[h·d, (h+1)·d) of W_o by α (rows of GPT-2's Conv1D ``c_proj``), so the reinforced model is an ordinary
checkpoint that costs nothing at run time. VHR chooses the heads per generated token; here the set is fixed once
from the scores (the top ``top_per_layer`` fraction of each chosen layer), as the issue asks.

``scale_heads_tensor`` is the pure function on one output-projection weight; ``reinforce`` walks a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from compress.errors import CompressError
from compress.heads.layout import AttentionLayout, attention_layout


def scale_heads_tensor(w: torch.Tensor, heads: Sequence[int], head_dim: int, alpha: float,
                       transposed: bool = False) -> torch.Tensor:
    """A copy of output-projection weight ``w`` ([out, in]; [in, out] when ``transposed``) with the input slices
    of ``heads`` multiplied by ``alpha``."""
    w = w.clone()
    for h in heads:
        sl = slice(h * head_dim, (h + 1) * head_dim)
        if transposed:
            w[sl, :] *= alpha
        else:
            w[:, sl] *= alpha
    return w


def reinforce_heads(layout: AttentionLayout, scores: torch.Tensor, top_per_layer: float = 0.5,
                    layers: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """The heads to reinforce: the top fraction of each chosen layer by score."""
    from compress.heads.select import top_heads

    chosen = set(range(layout.n_layers) if layers is None else layers)
    bad = sorted(l for l in chosen if not 0 <= l < layout.n_layers)
    if bad:
        raise CompressError(f"--layers {bad[0]} is outside the model's {layout.n_layers} layers")
    return [(l, h) for l, h in top_heads(scores, top_per_layer, per_layer=True) if l in chosen]


def runtime_scaling(model, layout: AttentionLayout, heads: Sequence[tuple[int, int]], alpha: float):
    """Forward pre-hooks that scale the heads' outputs at run time (the reference the baked weights must match);
    returns the hook handles (``.remove()`` them)."""
    handles = []
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    for l, hs in by_layer.items():
        def hook(module, args, hs=hs):
            x = args[0].clone()
            for h in hs:
                x[..., h * layout.head_dim:(h + 1) * layout.head_dim] *= alpha
            return (x,) + tuple(args[1:])
        handles.append(model.get_submodule(layout.layers[l].o).register_forward_pre_hook(hook))
    return handles


def reinforce(model_dir: str | os.PathLike, heads: Sequence[tuple[int, int]], alpha: float, out: str | os.PathLike,
              overwrite: bool = False, quiet: Optional[bool] = None, extra: Optional[dict] = None) -> Path:
    """Write ``model_dir`` with the heads' output-projection slices scaled by ``alpha`` (streamed tensor by
    tensor, every other tensor copied unchanged)."""
    from compress.io.reader import open_checkpoint
    from compress.io.writer import check_output, write_folder
    from compress.progress import track

    check_output(out, overwrite)
    layout = attention_layout(model_dir)
    ck = open_checkpoint(model_dir)
    by_tensor: dict[str, list[int]] = {}
    for l, h in heads:
        layout.check(l, h)
        by_tensor.setdefault(f"{layout.layers[l].o}.weight", []).append(h)

    def tensors():
        for name in track(ck.names(), "reinforce", quiet=quiet):
            t = ck.get(name)
            if name in by_tensor:
                t = scale_heads_tensor(t.float(), by_tensor[name], layout.head_dim, alpha,
                                       transposed=layout.family == "gpt2").to(t.dtype)
            yield name, t.contiguous()

    card = {"title": f"{Path(model_dir).name} with reinforced heads", "method": "compress heads reinforce (VHR)",
            "inputs": {"model": str(model_dir)},
            "params": {"alpha": alpha, "heads": ", ".join(f"{l}.{h}" for l, h in sorted(heads)), **(extra or {})}}
    return write_folder(out, tensors(), overwrite=overwrite, expected_tensors=len(ck),
                        metadata={"compress": "heads reinforce"}, aux_from=ck.root or Path(model_dir), card=card)
