"""The head-scores file written by ``compress heads score``: a safetensors file with

- ``scores`` [layers, heads] float32: one importance score per query head (higher = more important);
- ``kv_scores`` [layers, kv_heads]: the mean score of each key/value group's query heads (GQA; equal to
  ``scores`` without GQA), what protecting a KV group is worth;
- metadata ``compress.format = heads/1``, ``method``, ``model``, ``probes``, ``n_probes``, ``family``,
  ``n_heads``, ``n_kv_heads``, ``head_dim`` and method-specific entries (e.g. ``epsilon`` of the sink score).

``save_scores`` also draws ``<file>.png``, a heatmap of ``scores`` (layers down, heads across), when matplotlib (the
``bench`` extra) is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from compress.errors import CompressError

FORMAT = "heads/1"


@dataclass
class ScoreFile:
    scores: torch.Tensor
    kv_scores: torch.Tensor
    metadata: dict[str, str]


def kv_group_scores(scores: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[layers, kv_heads]: the mean score of each key/value group's query heads."""
    L, H = scores.shape
    return scores.reshape(L, n_kv_heads, H // n_kv_heads).mean(-1)


def save_scores(path: str | os.PathLike, scores: torch.Tensor, layout, metadata: dict, overwrite: bool = True,
                heatmap: bool = True) -> Path:
    from safetensors.torch import save_file

    from compress.io.writer import atomic_file

    path = Path(path)
    scores = scores.detach().float().cpu().contiguous()
    meta = {"compress.format": FORMAT, "family": layout.family, "n_heads": str(layout.n_heads),
            "n_kv_heads": str(layout.n_kv_heads), "head_dim": str(layout.head_dim),
            **{k: str(v) for k, v in metadata.items()}}
    with atomic_file(path, overwrite) as tmp:
        save_file({"scores": scores, "kv_scores": kv_group_scores(scores, layout.n_kv_heads).contiguous()},
                  str(tmp), metadata=meta)
    if heatmap:
        draw_heatmap(scores, path.with_suffix(".png"), f"{meta.get('method', '')} head scores "
                                                       f"({Path(str(meta.get('model', ''))).name})")
    return path


def load_scores(path: str | os.PathLike) -> ScoreFile:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such head-scores file (write one with `compress heads score`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("compress.format") != FORMAT or "scores" not in f.keys():
                raise CompressError(f"{path}: not a head-scores file (compress.format {FORMAT} with a 'scores' "
                                    "tensor)")
            scores = f.get_tensor("scores")
            kv = f.get_tensor("kv_scores") if "kv_scores" in f.keys() else scores
    except CompressError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise CompressError(f"{path}: cannot read as safetensors ({e})") from None
    return ScoreFile(scores, kv, dict(meta))


def draw_heatmap(scores: torch.Tensor, out: Path, title: str = "", marked=None) -> Optional[Path]:
    """A [layers, heads] heatmap PNG; ``marked`` (layer, head) pairs get a box (e.g. the protected heads). None,
    with a note, without matplotlib: the scores file is the result, the picture a view of it."""
    try:
        import matplotlib
    except ImportError:
        from compress.progress import console

        console.print(f"[yellow]no heatmap {out}: matplotlib is not installed (pip install 'compress[bench]')")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scores.detach().float().cpu().numpy()
    L, H = s.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * H, 1.0 + 0.4 * L))
    im = ax.imshow(s, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    for l, h in marked or []:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
