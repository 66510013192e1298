"""Protection masks: parts of tensors that a pruner or sparsifier must keep dense.

Head scores (the head-importance stage) decide *which* attention heads matter; this module only says *where*
they sit. A ``Protect`` names whole tensors (regexes searched in the tensor name) and row or column ranges of 2-D
weights (Hugging Face ``nn.Linear`` layout, ``[out_features, in_features]``): a head ``h`` of size ``d`` is rows
``[h·d, (h+1)·d)`` of ``q_proj``/``k_proj``/``v_proj`` and columns ``[h·d, (h+1)·d)`` of ``o_proj``.

Every consumer (whole-weight pruning, NPS, task-vector sparsification) asks ``keep(name, shape)`` for a bool
tensor that is True where entries must survive, and ORs it into its own keep-mask; the protected entries count
towards the kept total, so a requested density is still met over the tensor, not exceeded.

``sparsity`` (optional, ``--protect-sparsity``): the protected entries are not kept whole but pruned to this
sparsity by the consumer's own rule, separately from the rest (``keep`` still marks where they are). A 1-D
tensor (a bias) takes ``rows`` ranges as index ranges, so a head's q/k/v bias entries can be protected too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import CompressError

Ranges = dict[str, list[tuple[int, int]]]


def _check_ranges(kind: str, ranges: Ranges) -> Ranges:
    out: Ranges = {}
    for name, spans in ranges.items():
        fixed = []
        for span in spans:
            if len(span) != 2 or not 0 <= int(span[0]) < int(span[1]):
                raise CompressError(f"protect: {kind} range {list(span)} of '{name}' must be [start, stop) "
                                    f"with 0 <= start < stop")
            fixed.append((int(span[0]), int(span[1])))
        out[name] = fixed
    return out


@dataclass(frozen=True)
class Protect:
    """Which tensors, rows and columns stay dense. Empty by default (nothing protected)."""

    tensors: tuple[str, ...] = ()
    rows: Ranges = field(default_factory=dict)
    cols: Ranges = field(default_factory=dict)
    sparsity: float | None = None

    def __post_init__(self):
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) < 1.0:
            raise CompressError(f"protect: sparsity of the protected entries must be in [0, 1), got {self.sparsity}")
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", float(self.sparsity) or None)
        for pattern in self.tensors:
            try:
                re.compile(pattern)
            except re.error as e:
                raise CompressError(f"protect: tensor pattern '{pattern}' is not a valid regex ({e})") from None
        object.__setattr__(self, "rows", _check_ranges("row", self.rows))
        object.__setattr__(self, "cols", _check_ranges("column", self.cols))

    def __bool__(self) -> bool:
        return bool(self.tensors or self.rows or self.cols)

    def whole(self, name: str) -> bool:
        """True when the tensor is protected entirely."""
        return any(re.search(p, name) for p in self.tensors)

    def keep(self, name: str, shape: tuple[int, ...] | torch.Size, device=None) -> torch.Tensor | None:
        """Bool tensor of ``shape``, True where entries must be kept; None when nothing of ``name`` is protected."""
        shape = tuple(shape)
        if self.whole(name):
            return torch.ones(shape, dtype=torch.bool, device=device)
        rows, cols = self.rows.get(name), self.cols.get(name)
        if not rows and not cols:
            return None
        if len(shape) == 1 and not cols:
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            for start, stop in rows:
                if stop > shape[0]:
                    raise CompressError(f"protect: range [{start}, {stop}) is outside '{name}' of shape {list(shape)}")
                mask[start:stop] = True
            return mask
        if len(shape) != 2:
            raise CompressError(f"protect: row/column ranges need a 2-D weight, but '{name}' has shape {list(shape)}")
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        for axis, spans in ((0, rows or []), (1, cols or [])):
            for start, stop in spans:
                if stop > shape[axis]:
                    raise CompressError(f"protect: {'row' if axis == 0 else 'column'} range [{start}, {stop}) "
                                        f"is outside '{name}' of shape {list(shape)}")
                if axis == 0:
                    mask[start:stop, :] = True
                else:
                    mask[:, start:stop] = True
        return mask

    def union(self, other: "Protect") -> "Protect":
        rows = {k: list(self.rows.get(k, [])) + list(other.rows.get(k, [])) for k in {*self.rows, *other.rows}}
        cols = {k: list(self.cols.get(k, [])) + list(other.cols.get(k, [])) for k in {*self.cols, *other.cols}}
        if self.sparsity is not None and other.sparsity is not None and self.sparsity != other.sparsity:
            raise CompressError(f"protect: cannot combine protections of sparsity {self.sparsity} and "
                                f"{other.sparsity}")
        sparsity = self.sparsity if self.sparsity is not None else other.sparsity
        return Protect(tuple(dict.fromkeys(self.tensors + other.tensors)), rows, cols, sparsity)

    def count(self, name: str, shape) -> int:
        """How many entries of ``name`` are protected."""
        keep = self.keep(name, shape)
        return 0 if keep is None else int(keep.sum())

    def to_dict(self) -> dict:
        return {"tensors": list(self.tensors),
                "rows": {k: [list(s) for s in v] for k, v in self.rows.items()},
                "cols": {k: [list(s) for s in v] for k, v in self.cols.items()},
                **({"sparsity": self.sparsity} if self.sparsity is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "Protect":
        unknown = set(data) - {"tensors", "rows", "cols", "sparsity"}
        if unknown:
            raise CompressError(f"protect: unknown field(s) {sorted(unknown)}; expected tensors, rows, cols, sparsity")
        return cls(tuple(data.get("tensors", ())), dict(data.get("rows", {})), dict(data.get("cols", {})),
                   data.get("sparsity"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Protect":
        from compress.io.files import read_json

        data = read_json(path, "protect")
        if not isinstance(data, dict):
            raise CompressError(f"protect file '{path}' must hold a JSON object with tensors/rows/cols")
        return cls.from_dict(data)


def apply_protect(mask: torch.Tensor, name: str, protect: Protect | None) -> torch.Tensor:
    """``mask`` with every protected entry of ``name`` set (in place when anything is protected)."""
    if not protect:
        return mask
    keep = protect.keep(name, mask.shape, device=mask.device)
    return mask if keep is None else mask.logical_or_(keep)
