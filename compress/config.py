"""One configuration model for every entry point (DESIGN principle 3).

The CLI builds these from flags, recipes from YAML, the API from keyword arguments and the server from request
bodies; all validate here, so an error reads the same everywhere (``format_validation_error``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import CompressError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def _density(v: float) -> float:
    if not (0.0 < v <= 1.0):
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


def _dtype(v: Optional[str]) -> Optional[str]:
    if v is not None and v.lower() not in DTYPES:
        raise ValueError(f"unknown dtype '{v}' (choose one of float32, float16, bfloat16, float64)")
    return None if v is None else v.lower()


def _device(v: str) -> str:
    v = v.lower()
    if not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
        raise ValueError(f"unknown device '{v}' (choose cpu, cuda or cuda:N)")
    return v


Density = Annotated[float, AfterValidator(_density)]
DType = Annotated[Optional[str], AfterValidator(_dtype)]
Device = Annotated[str, AfterValidator(_device)]


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else DTYPES[name.lower()]


def resolve_device(device: str) -> str:
    """The device string, after checking it exists here (a one-line error otherwise)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"device '{device}' asked for, but CUDA is not available on this machine")
    return device


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Compute(_Config):
    device: Device = "cpu"
    dtype: DType = None
    quiet: bool = False


class ExtractConfig(Compute):
    """`compress extract`: a compact delta file from a base and a fine-tuned checkpoint (or LoRA adapter)."""

    base: Path
    finetuned: Path
    out: Path
    density: Density = 1.0
    method: Literal["magnitude", "random"] = "magnitude"
    seed: int = 0
    extra: Literal["error", "carry"] = "error"
    vocab: Literal["carry", "error"] = "carry"
    overwrite: bool = False


class ApplyConfig(Compute):
    """`compress apply`: rebuild a model from a base and a compact delta file."""

    base: Path
    delta: Path
    out: Path
    shard_size: str = "5GB"
    config_from: Optional[Path] = None
    overwrite: bool = False


class ExtractLoraConfig(Compute):
    """`compress extract-lora`: a dense task vector as a PEFT LoRA adapter of rank r (truncated SVD)."""

    base: Path
    finetuned: Path
    out: Path
    rank: int = Field(16, ge=1)
    targets: Optional[str] = None
    extra: Literal["error", "carry"] = "error"
    overwrite: bool = False


# -- merging ---------------------------------------------------------------------------------------------------

Scalar = Union[float, int, bool, str]


class Conditional(_Config):
    """A value that applies to tensors whose name contains ``filter`` (mergekit's conditional parameter)."""

    value: Union[Scalar, list[Scalar]]
    filter: Optional[str] = None


# A number; a list of numbers is a gradient over the layers; a list of {filter, value} picks by tensor name.
Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]

SHARED_PARAMS = ("weight", "density", "gamma", "epsilon", "lambda", "t", "normalize")
MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")


def _param_names(allowed: tuple[str, ...]):
    def check(v: dict) -> dict:
        bad = [k for k in v if k not in allowed]
        if bad:
            raise ValueError(f"unknown parameter '{bad[0]}' (known: {', '.join(allowed)})")
        return v
    return check


class MergeModel(_Config):
    """One input: a full checkpoint or a PEFT LoRA adapter folder, with its own parameters."""

    model: Path
    parameters: Annotated[dict[str, Setting], AfterValidator(_param_names(MODEL_PARAMS))] = Field(
        default_factory=dict)


def _methods() -> tuple[str, ...]:
    from compress.merge.methods import ALL_METHODS
    return ALL_METHODS


def _method(v: str) -> str:
    if v not in _methods():
        raise ValueError(f"unknown merge method '{v}' (choose one of {', '.join(_methods())})")
    return v


class MergeConfig(Compute):
    """`compress merge`: one recipe for the CLI, YAML recipes (ours and mergekit's) and the API.

    Variant switches left unset take the method's default in ``variant`` (see ``compress.merge.methods``).
    ``dtype`` is the output's (default: the base's); ``compute_dtype`` the one tensors are merged in (default
    float32; a mergekit recipe's ``dtype`` sets it, since mergekit merges in that dtype).
    """

    method: Annotated[str, AfterValidator(_method)]
    base: Optional[Path] = None
    models: list[MergeModel] = Field(min_length=1)
    parameters: Annotated[dict[str, Setting], AfterValidator(_param_names(SHARED_PARAMS))] = Field(
        default_factory=dict)
    variant: Literal["paper", "peft", "mergekit"] = "paper"
    topk: Optional[Literal["per_tensor", "global"]] = None
    sign_on: Optional[Literal["unweighted", "weighted"]] = None
    consensus: Optional[Literal["mass", "count"]] = None
    disjoint: Optional[Literal["mean", "weighted_mean", "sum"]] = None
    rescale: Optional[Literal["none", "inverse_keep", "l1"]] = None
    tie_break: Optional[Literal["index", "argsort"]] = None
    seed: int = 0
    compute_dtype: DType = None
    vocab: Literal["error", "base", "union"] = "error"
    out: Optional[Path] = None
    shard_size: str = "5GB"
    overwrite: bool = False

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.method == "slerp" and (self.base is None or len(self.models) != 1):
            raise ValueError("slerp interpolates a base and exactly one model (give base and one model)")
        if self.method != "linear" and self.base is None:
            raise ValueError(f"method '{self.method}' needs a base model")
        return self

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("topk", "sign_on", "consensus", "disjoint", "rescale",
                                             "tie_break")}


class InterpolateConfig(Compute):
    """`compress interpolate`: θ_base + α·τ for one or several α (one output each), or evaluation only."""

    base: Path
    finetuned: Path
    alphas: list[float] = Field(min_length=1)
    out: Optional[Path] = None
    shard_size: str = "5GB"
    overwrite: bool = False


def format_validation_error(e: ValidationError) -> str:
    """One line: 'field: message; field: message'."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def build(cls: type[_Config], **kwargs) -> _Config:
    """Validate into ``cls``, turning pydantic's multi-line error into a one-line CompressError."""
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise CompressError(format_validation_error(e)) from None
