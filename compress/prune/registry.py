"""The registry of whole-weight pruning methods: every entry point (``Pruner``, the strategy evaluator, the
configuration's consumers, the CLI help) reads ``METHODS`` here, so a new method is its tensor functions in one
file plus one ``PruneMethod`` entry (or one ``register`` call from outside the package).

A method is either a **mask** (``mask(layer, sparsity, zeros) -> keep-mask``; the pruned weight is
``W·mask``) or an **update** that also changes the surviving weights, solving the K strategies of a layer at once
(``update(layer, sparsities, zeros) -> (weights [K, out, in], keep-masks [K, out, in])``). Both follow the
conventions of ``compress.prune.methods``: ``layer.nm`` is an N:M pattern or None, ``layer.keep`` the protected
entries (kept unless ``zeros`` says otherwise), ``zeros`` the layer's ``(z_free, z_protected)`` budget or None.

This module imports no torch, so the CLI can list the names without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence

from compress.errors import CompressError

if TYPE_CHECKING:
    import torch

Stats = Literal["none", "norms", "hessian"]
STATS = ("none", "norms", "hessian")
GROUPS = ("layer", "row", "block")


@dataclass
class Layer:
    """One layer's pruning problem as ``Pruner`` hands it to a method."""

    name: str  # the module's name: what seeds a random method's generator, so results do not depend on order
    weight: "torch.Tensor"  # dense [out, in], float32, on the pruner's device
    stats: Any = None  # calib.LayerStats (col_norm, hessian) when the method asks for statistics
    nm: Optional[tuple[int, int]] = None
    keep: "torch.Tensor | None" = None  # True where protected, [out, in]
    protect_sparsity: float = 0.0
    blocksize: int = 128
    percdamp: float = 0.01
    # the pruner's, emptied whenever its statistics change: what a method may reuse across strategies and calls
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PruneMethod:
    """A pruning method: its name, the paper or tool it matches (``paper``), the calibration statistics it reads
    (``stats``: none, per-input column norms, or the Hessian XᵀX), its comparison group (``group``: the whole
    layer, each output row, or column blocks) and exactly one of ``mask`` / ``update``.

    ``scores(layer) -> [out, in]``, optional, promises that without protection or a pattern the mask prunes the
    lowest scores of each group (``methods.tensor_mask`` for ``layer``, ``methods.row_mask`` for ``row``) and that
    their order does not depend on the sparsity: the strategy evaluator then ranks each weight once and answers
    every strategy by comparing ranks (``compress.strategy.evaluate.RankedWeights``)."""

    name: str
    paper: str
    stats: Stats
    group: str
    mask: Optional[Callable[[Layer, float, Any], "torch.Tensor"]] = None
    update: Optional[Callable[[Layer, Sequence[float], Sequence[Any]], tuple]] = None
    scores: Optional[Callable[[Layer], "torch.Tensor"]] = None

    def __post_init__(self):
        what = f"pruning method '{self.name}'"
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise CompressError(f"{what}: a name is letters, digits, '_' and '-'")
        if self.stats not in STATS:
            raise CompressError(f"{what}: stats '{self.stats}' (choose one of {', '.join(STATS)})")
        if self.group not in GROUPS:
            raise CompressError(f"{what}: group '{self.group}' (choose one of {', '.join(GROUPS)})")
        if (self.mask is None) == (self.update is None):
            raise CompressError(f"{what}: give exactly one of mask and update")
        if self.scores is not None and self.group not in ("layer", "row"):
            raise CompressError(f"{what}: ranked scores need a layer or row comparison group")

    @property
    def calibrated(self) -> bool:
        """Whether the method reads calibration statistics (and so needs a calibration pass or its cache)."""
        return self.stats != "none"

    @property
    def hessian(self) -> bool:
        return self.stats == "hessian"


# -- the built-in methods: glue from a ``Layer`` to the pure functions of ``methods.py`` ------------------------

def _magnitude_mask(layer: Layer, sparsity: float, zeros):
    from compress.prune.methods import magnitude_mask

    return magnitude_mask(layer.weight, sparsity, layer.nm, layer.keep, zeros)


def _magnitude_scores(layer: Layer):
    from compress.prune.methods import magnitude_scores

    return magnitude_scores(layer.weight)


def _wanda_mask(layer: Layer, sparsity: float, zeros):
    from compress.prune.methods import wanda_mask

    return wanda_mask(layer.weight, layer.stats.col_norm, sparsity, layer.nm, layer.keep, zeros)


def _wanda_scores(layer: Layer):
    from compress.prune.methods import wanda_scores

    return wanda_scores(layer.weight, layer.stats.col_norm)


def _sparsegpt_update(layer: Layer, sparsities: Sequence[float], zeros: Sequence):
    import torch

    from compress.prune import methods as M

    w, keep, nm, st = layer.weight, layer.keep, layer.nm, layer.stats
    fixed = keep.all(0) if keep is not None and nm is None and layer.protect_sparsity == 0 else None
    if fixed is not None and bool(fixed.any()):
        # wholly protected input columns (a kept head's o_proj columns) are held fixed: OBS over the free columns
        # alone, with H restricted to them
        free = ~fixed
        fkey = (id(st), free.cpu().numpy().tobytes())  # each request of a batch reuses it
        if fkey not in layer.cache:
            layer.cache[fkey] = M.inverse_hessian_factor(st.hessian[free][:, free], layer.percdamp)
        new_f, masks_f = M.sparsegpt_prune_many(w[:, free], None, sparsities, nm, blocksize=layer.blocksize,
                                                keep=keep[:, free], hinv=layer.cache[fkey], zeros=zeros)
        new = w.unsqueeze(0).repeat(len(sparsities), 1, 1)
        masks = torch.ones_like(new, dtype=torch.bool)
        new[:, :, free], masks[:, :, free] = new_f, masks_f
        return new, masks
    hkey = id(st)  # the factor depends only on the layer's H (q/k/v share one): once per layer
    if hkey not in layer.cache:
        layer.cache[hkey] = M.inverse_hessian_factor(st.hessian, layer.percdamp)
    return M.sparsegpt_prune_many(w, None, sparsities, nm, blocksize=layer.blocksize, keep=keep,
                                  hinv=layer.cache[hkey], zeros=None if keep is None or nm is not None else zeros)


METHODS: dict[str, PruneMethod] = {m.name: m for m in (
    PruneMethod("magnitude", "|W| per layer: the magnitude baseline of Sun et al. 2023 (prune_magnitude in "
                "locuslab/wanda)", "none", "layer", mask=_magnitude_mask, scores=_magnitude_scores),
    PruneMethod("wanda", "|W_ij|·‖X_j‖₂ per output row: Sun et al. 2023, Wanda (prune_wanda in locuslab/wanda)",
                "norms", "row", mask=_wanda_mask, scores=_wanda_scores),
    PruneMethod("sparsegpt", "OBS reconstruction in column blocks: Frantar & Alistarh 2023, SparseGPT "
                "(fasterprune in IST-DASLab/sparsegpt)", "hessian", "block", update=_sparsegpt_update),
)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_prune_method(name: str) -> PruneMethod:
    """The registered method ``name``, else the one-line error every entry point gives."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise CompressError(f"unknown pruning method '{name}' (choose one of {', '.join(METHODS)})") from None


def register(method: PruneMethod) -> PruneMethod:
    """Add ``method`` to the registry (every entry point then accepts its name); a taken name is an error."""
    if method.name in METHODS:
        raise CompressError(f"pruning method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> PruneMethod:
    """Remove a registered method (a plugin's or a test's); returns it."""
    get_prune_method(name)
    return METHODS.pop(name)
