"""What the commands share: option declarations whose defaults and help texts appear once, the console, and the
small parsers of comma-separated flags. No torch: `compress request` imports this."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from compress import config
from compress.errors import CompressError

out = Console(soft_wrap=True)

DEVICE = typer.Option("cpu", help="cpu, cuda or cuda:N")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
OVERWRITE = typer.Option(False, help="Replace OUT if it exists.")
# the schema's defaults, so that a command's cannot drift from its config's
SHARD_SIZE_DEFAULT = config.SHARD_SIZE
CALIB_CACHE_DIR = config.CALIB_CACHE
SHARD_SIZE = typer.Option(SHARD_SIZE_DEFAULT, help="Largest shard, e.g. 5GB, 500MB.")
CALIB_CACHE = typer.Option(CALIB_CACHE_DIR, help="Calibration statistics cache.")
ZOO_ROOT_DIR = Path("checkpoints/zoo")
ZOO_ROOT = typer.Option(ZOO_ROOT_DIR, help="Where the zoo models are.")
RESULTS_DIR = Path("checkpoints/bench")
RESULTS = typer.Option(RESULTS_DIR, help="Where JSON, markdown and the plot go.")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


# the head-protection flags of prune, merge and NPS (protect_flags turns them into config fields)
PROTECT_HEADS = typer.Option(None, help="Head scores file (`compress heads score`): keep its top heads' q/k/v rows "
                                        "and o_proj columns.")
PROTECT_TOP = typer.Option(None, help="--protect-heads: fraction of heads to protect (default 0.1).")
PER_LAYER = typer.Option(False, "--per-layer", help="--protect-heads: the top fraction of each layer.")
PROTECT_SPARSITY = typer.Option(None, help="Prune the protected slices to this sparsity instead of keeping them "
                                           "dense.")


def protect_flags(protect_heads, protect_top, per_layer, protect_sparsity) -> dict:
    """The head-protection flags shared by prune, merge and NPS, as config fields (None: not given)."""
    if protect_heads is None and (protect_top is not None or per_layer):
        raise CompressError("--protect-top/--per-layer choose among the heads of --protect-heads SCORES; give it")
    return dict(protect_heads=protect_heads, protect_top=protect_top, protect_per_layer=per_layer or None,
                protect_sparsity=protect_sparsity)


def prune_methods(default: str | None = None) -> str:
    """The registry's pruning methods for a help text: 'magnitude, wanda (default) or sparsegpt'."""
    from compress.prune.registry import method_names  # no torch: the names only

    names = [f"{n} (default)" if n == default else n for n in method_names()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def csv(text: str, flag: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise CompressError(f"{flag}: give a comma-separated list")
    for v in items:
        if flag not in ("--tasks", "--parts") and not is_number(v):
            raise CompressError(f"{flag}: '{v}' is not a number")
    return items


def pair(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    vals = csv(text, flag)
    if len(vals) != 2:
        raise CompressError(f"{flag}: give two comma-separated numbers, e.g. 0.3,0.7")
    return [float(v) for v in vals]


def int_list(text: str, flag: str) -> list[int]:
    res: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-")
                res += list(range(int(a), int(b) + 1))
            elif part.strip():
                res.append(int(part))
    except ValueError:
        raise CompressError(f"{flag} '{text}': give layer numbers like 0,1,2 or 2-5") from None
    return res
