"""One configuration model for every entry point (DESIGN principle 3).

The CLI builds these from flags, recipes from YAML, the API from keyword arguments and the server from request
bodies; all validate here, so an error reads the same everywhere (``format_validation_error``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import CompressError

# dtype names a schema accepts, each with its torch name (``compress.runtime.torch_dtype`` maps them)
# defaults many configs (and their commands) share
SHARD_SIZE = "5GB"  # largest shard of a written model
CALIB_CACHE = Path("checkpoints/cache/calib")  # calibration statistics cache

DTYPE_NAMES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


def _density(v: float) -> float:
    if not (0.0 < v <= 1.0):
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


def _dtype(v: Optional[str]) -> Optional[str]:
    if v is not None and v.lower() not in DTYPE_NAMES:
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


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


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
    """`compress apply`: rebuild a model from a base and a compact delta file (or from a sparse weight file alone)."""

    base: Optional[Path] = None
    delta: Path
    out: Path
    shard_size: str = SHARD_SIZE
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


class ZooBuildConfig(Compute):
    """`compress zoo build NAME`: build a benchmark model from its recipe into ``out_root/NAME``."""

    name: str
    out_root: Path = Path("checkpoints/zoo")
    recipe: Optional[Path] = None
    quick: bool = False
    only: Optional[list[str]] = None
    overwrite: bool = False


EVALUATORS = ("task", "perplexity", "kl_to", "recall")


class EvalConfig(Compute):
    """`compress eval MODEL`: exactly one evaluator flag (``task``: classification accuracy with a task head;
    ``perplexity``: a causal LM on a text file or bundled corpus; ``kl_to``: KL(reference ‖ model) on ``calib``
    text; ``recall``: context-recall accuracy and hallucination rate on a recall jsonl). A new evaluator is one
    more optional field here, its name in ``EVALUATORS`` and one function in ``compress.eval.run``."""

    model: Path
    task: Optional[str] = None
    perplexity: Optional[str] = None
    kl_to: Optional[Path] = None
    recall: Optional[Path] = None
    calib: Optional[str] = None
    head: Optional[Path] = None
    split: Literal["train", "dev", "test"] = "test"
    limit: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    seqlen: int = Field(256, ge=2)
    max_tokens: Optional[int] = Field(None, ge=2)
    blockwise: Optional[bool] = Field(None, description="perplexity and KL: run the model(s) block by block (only "
                                      "the embeddings and one block on the device); None: when the weights take "
                                      "more than half the device's free memory")

    @model_validator(mode="after")
    def _one_evaluator(self):
        chosen = [name for name in EVALUATORS if getattr(self, name) is not None]
        if len(chosen) != 1:
            flags = " or ".join(f"--{n.replace('_', '-')}" for n in EVALUATORS)
            got = "none" if not chosen else ", ".join(f"--{n.replace('_', '-')}" for n in chosen)
            raise ValueError(f"choose exactly one evaluator: {flags} (got {got})")
        if self.head is not None and self.task is None:
            raise ValueError("--head goes with --task (a classification head for that task)")
        if self.kl_to is not None and self.calib is None:
            raise ValueError("--kl-to needs --calib (a text file or bundled corpus to compare the models on)")
        return self


# --- zoo recipes (recipes/zoo/*.yml) --------------------------------------------------------------------------

def _task_name(v: str) -> str:
    # a task of the data root by name, or a task folder by path: which exist, and whether a folder is a valid
    # task, is the data layer's to say (compress.data.task_dir)
    if not v.strip():
        raise ValueError("a task is a name (sst2) or the path of a task folder, not an empty string")
    return v


TaskName = Annotated[str, AfterValidator(_task_name)]


class ClassifierTrain(_Config):
    """Full fine-tuning of an encoder with a linear head on mean pooling (AdamW, linear warmup then decay)."""

    epochs: int = Field(3, ge=1)
    lr: float = Field(3e-5, gt=0)
    head_lr: Optional[float] = Field(None, gt=0, description="learning rate of the head (default: lr)")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8, le=512)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    train_limit: Optional[int] = Field(None, ge=1, description="first N training rows (the files are shuffled)")


class ClassifierEval(_Config):
    batch_size: int = Field(256, ge=1)
    dev_limit: Optional[int] = Field(None, ge=1)
    test_limit: Optional[int] = Field(None, ge=1)


class MiniLMRecipe(_Config):
    """recipes/zoo/minilm-8task.yml: all-MiniLM-L6-v2 fully fine-tuned per task, one head per task."""

    name: Literal["minilm-8task"]
    description: str = ""
    seed: int = 0
    tasks: list[TaskName] = Field(min_length=1)
    train: ClassifierTrain = ClassifierTrain()
    eval: ClassifierEval = ClassifierEval()
    per_task: dict[TaskName, dict[str, Any]] = Field(default_factory=dict,
                                                      description="per-task overrides of train fields")
    targets: dict[TaskName, float] = Field(default_factory=dict, description="test accuracy to reach, in [0, 1]")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks: a task is listed twice")
        for task in self.per_task:
            self.train_for(task)
        for task, t in self.targets.items():
            if not 0 <= t <= 1:
                raise ValueError(f"targets.{task}: {t} is not an accuracy in [0, 1]")
        return self

    def train_for(self, task: str) -> ClassifierTrain:
        """``train`` with the task's ``per_task`` overrides applied."""
        override = self.per_task.get(task)
        if not override:
            return self.train
        try:
            return ClassifierTrain(**{**self.train.model_dump(), **override})
        except ValidationError as e:
            raise ValueError(f"per_task.{task}: {format_validation_error(e)}") from None


class Stories260kRecipe(_Config):
    """recipes/zoo/stories260k.yml: the real llama2.c stories260K converted to a Hugging Face Llama."""

    name: Literal["stories260k"]
    description: str = ""
    model_bin: Optional[Path] = Field(None, description="default: <data>/stories260K/stories260K.bin")
    tokenizer_bin: Optional[Path] = Field(None, description="default: <data>/stories260K/tok512.bin")
    check_corpus: Optional[str] = Field("shakespeare", description="bundled corpus to report perplexity on")
    check_max_tokens: int = Field(4096, ge=2)


# -- merging ---------------------------------------------------------------------------------------------------

Scalar = Union[float, int, bool, str]


class Conditional(_Config):
    """A value that applies to tensors whose name contains ``filter`` (mergekit's conditional parameter)."""

    value: Union[Scalar, list[Scalar]]
    filter: Optional[str] = None


# the whole-tensor methods' own parameters (compress.merge.methods.WEIGHT_METHODS says which method takes which)
WEIGHT_METHOD_PARAMS = ("nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "eps", "max_iter", "tol",
                        "filter_wise", "select_topk", "int8_mask", "r", "alpha")
SHARED_PARAMS = ("weight", "density", "gamma", "epsilon", "lambda", "t", "normalize") + WEIGHT_METHOD_PARAMS
SHARED_PARAMS += ("rank", "common", "steps", "lr")  # TSV-M, Iso-CTS, WUDI, AdaMerging (compress.merge.subspace)
MODEL_PARAMS = ("weight", "density", "gamma", "epsilon", "scale")
# true/false (rescale and int8_mask: mergekit recipes only)
FLAG_PARAMS = ("normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights",
               "filter_wise")
_SETTING_FORMS = "a number, a list of numbers (a gradient over the layers) or a list of {filter, value}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _setting_value(v: Any) -> Any:
    if isinstance(v, bool) or _is_number(v):
        return v
    if isinstance(v, list) and v and all(_is_number(x) for x in v):
        return v
    raise ValueError(f"must be {_SETTING_FORMS}, got {v!r}")


def _conditional(c: Any) -> Conditional:
    if isinstance(c, Conditional):
        return c
    extra = sorted(set(c) - {"filter", "value"})
    if extra or "value" not in c:
        raise ValueError(f"a conditional value is {{filter, value}}, got {c!r}")
    if c.get("filter") is not None and not isinstance(c["filter"], str):
        raise ValueError(f"filter must be a substring of tensor names, got {c['filter']!r}")
    return Conditional(filter=c.get("filter"), value=_setting_value(c["value"]))


def _setting(v: Any) -> Any:
    # checked by hand: as a pydantic Union, a bad value was one error per branch of the union on one long line
    if isinstance(v, (dict, Conditional)):
        return _conditional(v)
    if isinstance(v, list) and v and all(isinstance(c, (dict, Conditional)) for c in v):
        return [_conditional(c) for c in v]
    return _setting_value(v)


# A number; a list of numbers is a gradient over the layers; a list of {filter, value} picks by tensor name.
Setting = Annotated[Any, AfterValidator(_setting)]


def _leaves(setting: Any) -> list:
    """Every plain value a (checked) setting can take."""
    conds = [setting] if isinstance(setting, Conditional) else setting if isinstance(setting, list) else None
    if conds and all(isinstance(c, Conditional) for c in conds):
        return [x for c in conds for x in _leaves(c.value)]
    return list(setting) if isinstance(setting, list) else [setting]


def setting_problem(key: str, setting: Any, zero_density: bool = False) -> Optional[str]:
    """Why ``setting`` is no value for parameter ``key`` (None when it is one): a flag takes true or false, the
    others numbers; densities lie in (0, 1], or [0, 1] with ``zero_density`` (mergekit's rule: 0 keeps nothing)."""
    if key in FLAG_PARAMS:
        return None if isinstance(setting, bool) else f"must be true or false, got {setting!r}"
    try:
        leaves = _leaves(_setting(setting))
    except ValueError as e:
        return str(e)
    if not all(_is_number(x) for x in leaves):
        return f"must be {_SETTING_FORMS}, got {setting!r}"
    if key == "density" and zero_density:
        if not all(0.0 <= x <= 1.0 for x in leaves):
            return f"must be in [0, 1], got {setting!r}"
    elif key in ("density", "rank", "common") and not all(0.0 < x <= 1.0 for x in leaves):
        return f"must be in (0, 1], got {setting!r}"
    if key in ("steps", "lr") and not all(x >= 0 for x in leaves):
        return f"must be >= 0, got {setting!r}"
    return None


def _param_names(allowed: tuple[str, ...], zero_density: bool = False):
    def check(v: dict) -> dict:
        bad = [k for k in v if k not in allowed]
        if bad:
            raise ValueError(f"unknown parameter '{bad[0]}' (known: {', '.join(allowed)})")
        for k, setting in v.items():
            problem = setting_problem(k, setting, zero_density)
            if problem:
                raise ValueError(f"'{k}' {problem}")
        return v
    return check


class ProtectOptions(_Config):
    """What stays dense (or is pruned to ``protect_sparsity``) in pruning, merging and NPS: a ``Protect`` JSON
    (``protect``), and/or the heads a scores file (``compress heads score``) ranks highest (``protect_heads``:
    the top ``protect_top`` fraction of all heads, or of each layer's with ``protect_per_layer``)."""

    protect: Optional[Path] = None
    protect_heads: Optional[Path] = None
    protect_top: float = Field(0.1, gt=0, le=1)
    protect_per_layer: bool = False
    protect_sparsity: Annotated[Optional[float], AfterValidator(lambda v: _sparsity(v))] = None


class MergeModel(_Config):
    """One input: a full checkpoint or a PEFT LoRA adapter folder, with its own parameters."""

    model: Path
    parameters: Annotated[dict[str, Setting], AfterValidator(_param_names(MODEL_PARAMS, True))] = Field(
        default_factory=dict)


class MergeConfig(Compute, ProtectOptions):
    """`compress merge`: one recipe for the CLI, YAML recipes (ours and mergekit's) and the API.

    Variant switches left unset take the method's default in ``variant`` (see ``compress.merge.methods``).
    ``dtype`` is the output's (default: the base's); ``compute_dtype`` the one tensors are merged in (default
    float32; with ``variant: mergekit`` the inputs' own dtype, as mergekit; a mergekit recipe's ``dtype`` sets it,
    since mergekit merges in that dtype).
    """

    method: str = Field(description="a merge method's name (the registry: compress.merge.methods)")
    base: Optional[Path] = None
    models: list[MergeModel] = Field(min_length=1)
    parameters: Annotated[dict[str, Setting], AfterValidator(_param_names(SHARED_PARAMS, True))] = Field(
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
    shard_size: str = SHARD_SIZE
    overwrite: bool = False
    # adamerging (compress.merge.adamerging): λ per task ("task") or per task and tensor ("layer"); unlabeled text
    # for causal LMs (classifiers adapt on their heads' unlabeled dev rows)
    granularity: Literal["task", "layer"] = "layer"
    text: Optional[Path] = None
    copy_tokenizer: bool = True

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.method == "slerp" and (self.base is None or len(self.models) != 1):
            raise ValueError("slerp interpolates a base and exactly one model (give base and one model)")
        if self.variant != "mergekit":
            # density 0 keeps nothing (the merge is the base): mergekit accepts it, the papers' ranges do not
            for where, params in [("parameters", self.parameters)] + [
                    (f"models.{i}.parameters", m.parameters) for i, m in enumerate(self.models)]:
                if "density" in params and 0.0 in _leaves(_setting(params["density"])):
                    raise ValueError(f"{where}.density: must be in (0, 1], got {params['density']!r} (density 0 "
                                     "keeps nothing: only a mergekit recipe or variant: mergekit accepts it)")
        return self  # which other methods need a base: compress.merge.methods.check_config

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("topk", "sign_on", "consensus", "disjoint", "rescale",
                                             "tie_break")}


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {v}")
    return v


class InterpolateConfig(Compute):
    """`compress interpolate`: θ_base + α·τ for one or several α (one output each), or evaluation only."""

    base: Path
    finetuned: Path
    alphas: list[Annotated[float, AfterValidator(_finite)]] = Field(min_length=1)
    out: Optional[Path] = None
    shard_size: str = SHARD_SIZE
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


def _sparsity(v: Optional[float]) -> Optional[float]:
    if v is not None and not (0.0 <= v < 1.0):
        raise ValueError(f"must be in [0, 1), got {v}")
    return v


class PruneConfig(Compute, ProtectOptions):
    """`compress prune MODEL` (whole-weight pruning; ``compress.prune``): one source of sparsity (``sparsity``
    uniform or with ``owl``, ``layer_sparsity``, ``strategy``), a method and a pattern. Shared by the CLI, recipes
    (``recipes/prune/``) and ``compress.prune.run_prune``."""

    model: Path
    out: Optional[Path] = None
    sparsity: Annotated[Optional[float], AfterValidator(_sparsity)] = None
    method: str = Field("wanda", description="a pruning method's name (the registry: compress.prune.registry)")
    pattern: str = "unstructured"
    layer_sparsity: Optional[list[float]] = None
    strategy: Optional[Path] = None
    owl: bool = False
    owl_m: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    calib: Optional[str] = None
    nsamples: int = Field(128, ge=1)
    seqlen: Optional[int] = Field(None, ge=2)  # None: min(512, the model's max_position_embeddings)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    targets: Optional[str] = None
    ignore: Optional[str] = None
    calibration: Literal["sequential", "shared"] = Field(
        "sequential", description="sequential: each block calibrated on the outputs of the blocks already pruned "
        "(the SparseGPT/Wanda reference code, llm-compressor); shared: every block on the dense model's "
        "activations (one calibration serves many strategies)")
    cache_dir: Optional[Path] = Field(None, description="opt-in cache of the shared calibration's statistics "
                                      "(its size is printed before it is written); none by default")
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0)
    sparse_out: Optional[Path] = None
    no_sparse: bool = False
    shard_size: str = SHARD_SIZE
    eval_perplexity: Optional[str] = None
    eval_seqlen: int = Field(256, ge=2)
    eval_max_tokens: Optional[int] = Field(None, ge=2)
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        sources = [n for n, v in (("--layer-sparsity", self.layer_sparsity), ("--strategy", self.strategy))
                   if v is not None] + (["--owl"] if self.owl else [])
        if len(sources) > 1:
            raise ValueError(f"choose one of --layer-sparsity, --strategy, --owl (got {', '.join(sources)})")
        if self.pattern != "unstructured":
            parts = self.pattern.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
                raise ValueError(f"pattern '{self.pattern}': use unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)")
            want = 1 - int(parts[0]) / int(parts[1])
            if sources:
                raise ValueError(f"pattern {self.pattern} prunes every layer to {want:g}; it does not take "
                                 f"{sources[0]}")
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", want)
            elif abs(self.sparsity - want) > 1e-9:
                raise ValueError(f"pattern {self.pattern} keeps {parts[0]} of every {parts[1]} weights: sparsity "
                                 f"must be {want:g}, got {self.sparsity}")
        if self.owl and self.sparsity is None:
            raise ValueError("--owl needs a target --sparsity")
        if not sources and self.sparsity is None:
            raise ValueError("no sparsity: give --sparsity, --layer-sparsity, --strategy or a pattern such as 2:4")
        if self.layer_sparsity is not None:
            bad = [v for v in self.layer_sparsity if not 0.0 <= v < 1.0]
            if bad:
                raise ValueError(f"layer sparsity {bad[0]} is outside [0, 1)")
        return self

# -- NPS (compress.search) -------------------------------------------------------------------------------------

class NpsSearch(_Config):
    """How NPS searches (``compress.search.nps``): the partition, the mask rule, the optimizer and its objective.
    The one definition of these settings: ``NpsProblem`` takes this object as its search space."""

    partition: Literal["magnitude", "svd"] = "magnitude"
    parts: int = Field(8, ge=1, le=64, description="M, the number of subspaces of each task vector")
    edges: Literal["quantile", "linear", "log"] = "quantile"
    span: float = Field(4.0, gt=0, description="magnitude bins cover the top min(1, span·density) of |τ|")
    grouping: Literal["none", "layer", "module"] = "none"
    topk: Literal["global", "per_tensor"] = "global"
    values: Literal["weighted", "plain"] = "weighted"
    rescale: Literal["none", "inverse_keep", "l1"] = "none"
    select: Literal["topk", "random"] = "topk"
    task_weights: Literal["shared", "per_task"] = "shared"
    combine: Literal["sum", "ties"] = "sum"
    optimizer: Literal["cma", "bayes"] = "cma"
    budget: int = Field(120, ge=2, description="evaluations in all, the starting points included")
    popsize: Optional[int] = Field(None, ge=2)
    sigma0: float = Field(0.5, gt=0)
    objective: Literal["kl", "loss", "accuracy"] = "kl"
    dev_limit: Optional[int] = Field(500, ge=1, description="dev rows per task the objective runs on")
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    anchor: Literal["none", "ties"] = Field("none", description="merge: 'ties' runs the protocol that generalizes "
                                            "(compress.search.protocol): dev halves, TIES start, penalty toward "
                                            "TIES, TIES unless the search beats it on the validation half")
    regularize: float = Field(1.0, ge=0, allow_inf_nan=False, description="anchor ties: strength of the penalty "
                              "on the squared distance from the TIES merge, relative to its norm")

    @model_validator(mode="after")
    def _check_search(self):
        if self.task_weights == "per_task" and self.select == "random":
            raise ValueError("task_weights per_task needs select topk")
        if self.anchor == "ties" and (self.combine, self.select, self.rescale) != ("ties", "topk", "none"):
            raise ValueError("anchor ties starts from TIES: it needs combine ties, select topk, rescale none")
        return self


class NpsConfig(Compute, ProtectOptions):
    """`compress prune|interpolate|merge --method nps`: one model (prune, interpolate) or several (merge), each
    scored on the dev split of its task with its own head (``heads``: default the model folders); ``keep``: for
    interpolation, more tasks whose dev score the search also averages (their heads in ``keep_heads``)."""

    mode: Literal["prune", "interpolate", "merge"]
    base: Path
    models: list[Path] = Field(min_length=1)
    tasks: list[TaskName] = Field(min_length=1)
    heads: Optional[list[Path]] = None
    keep: list[TaskName] = Field(default_factory=list)
    keep_heads: list[Path] = Field(default_factory=list)
    density: Density = 0.1
    search: NpsSearch = NpsSearch()
    out: Optional[Path] = None
    shard_size: str = SHARD_SIZE
    overwrite: bool = False
    log: Optional[Path] = Field(None, description="JSON lines file: every evaluation of the search")

    @model_validator(mode="after")
    def _check(self):
        if self.mode in ("prune", "interpolate") and len(self.models) != 1:
            raise ValueError(f"{self.mode} takes exactly one fine-tuned model (got {len(self.models)})")
        if len(self.tasks) != len(self.models):
            raise ValueError(f"tasks: one task per model ({len(self.models)} models, {len(self.tasks)} tasks)")
        if self.heads is not None and len(self.heads) != len(self.models):
            raise ValueError(f"heads: one head folder per model ({len(self.models)} models, {len(self.heads)} heads)")
        if len(self.keep_heads) != len(self.keep):
            raise ValueError(f"keep_heads: one head folder per task in keep ({len(self.keep)} tasks, "
                             f"{len(self.keep_heads)} heads)")
        if self.keep and self.mode != "interpolate":
            raise ValueError("keep: tasks to keep go with interpolate")
        if self.keep and self.search.objective == "kl":
            raise ValueError("search.objective: kl needs a fine-tuned reference per task; with keep tasks use "
                             "loss or accuracy")
        return self


# -- head scores (compress.heads) -------------------------------------------------------------------------------

class HeadsScoreConfig(Compute):
    """`compress heads score MODEL`: one score per attention head from a probes file (``compress.heads``)."""

    model: Path
    method: Literal["vhd", "chd", "nhar", "seekr", "sink"]
    probes: Path
    out: Path
    base: Optional[Path] = Field(None, description="seekr: the model before fine-tuning")
    limit: Optional[int] = Field(None, ge=1)
    epsilon: float = Field(0.3, gt=0, lt=1, description="sink: first-token attention above ε marks a sink head")
    anchors: int = Field(3, ge=1, description="nhar: anchor words per layer")
    blockwise: Optional[bool] = Field(None, description="run the probes block by block (only one block on the "
                                      "device; text probes); None: when the weights take more than half the "
                                      "device's free memory")
    overwrite: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.method == "seekr" and self.base is None:
            raise ValueError("seekr needs --base (the model before fine-tuning) for its forgettability")
        if self.method != "seekr" and self.base is not None:
            raise ValueError("--base goes with --method seekr")
        return self


class HeadsReinforceConfig(Compute):
    """`compress heads reinforce MODEL`: VHR's head scaling baked into the output projection."""

    model: Path
    scores: Path
    out: Path
    alpha: float = Field(2.0, gt=0)
    top_per_layer: float = Field(0.5, gt=0, le=1)
    layers: Optional[list[int]] = None
    overwrite: bool = False


# -- strategy prediction (compress.strategy, UniCuCo) ---------------------------------------------------------

def _head_pairs(v: Optional[list]) -> Optional[list[tuple[int, int]]]:
    if v is None:
        return None
    out = []
    for pair in v:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair):
            raise ValueError(f"each protected head is a pair [layer, head] of non-negative integers, got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    return out


TARGETS = ("sparsity", "size_bytes", "preference")


class CompressionRequest(_Config):
    """One compression request (UniCuCo): exactly one target.

    * ``sparsity`` in (0, 1): zeros over the pruned parameters (the parameter-weighted mean of the per-block
      strategy equals it exactly);
    * ``size_bytes`` > 0: a budget for the sparse weight file (``compress.io.sparse``), turned into the sparsity
      whose encoded size meets it (``compress.strategy.project.sparsity_for_size``);
    * ``preference`` λ in [0, 1]: the Tchebycheff trade-off between size and quality loss (λ = 1: smallest model,
      λ = 0: best quality), answered within the StratNet's sparsity range.

    ``protect_heads``: attention heads ``[layer, head]`` kept dense (head-importance stage). ``id``/``name`` label
    the outputs. The CLI (``compress strategy search``, ``compress batch``), the recipes, the Python API and the
    HTTP server all validate requests through this class."""

    id: Optional[str] = None
    name: Optional[str] = None
    sparsity: Optional[float] = None
    size_bytes: Optional[int] = None
    preference: Optional[float] = None
    protect_heads: Annotated[Optional[list], AfterValidator(_head_pairs)] = None

    @model_validator(mode="after")
    def _one_target(self):
        given = [t for t in TARGETS if getattr(self, t) is not None]
        if not given:
            raise ValueError("no target: give exactly one of sparsity (0 < s < 1), size_bytes or preference (0..1)")
        if len(given) > 1:
            raise ValueError(f"give exactly one target, got {' and '.join(given)}")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"size_bytes must be a positive number of bytes, got {self.size_bytes}")
        if self.preference is not None and not 0.0 <= self.preference <= 1.0:
            raise ValueError(f"preference must be in [0, 1], got {self.preference}")
        if self.id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.id):
            raise ValueError(f"id '{self.id}' may hold only letters, digits, '_', '-' and '.' (it names files)")
        return self

    @property
    def target(self) -> str:
        return next(t for t in TARGETS if getattr(self, t) is not None)


def _range(v: tuple[float, float]) -> tuple[float, float]:
    lo, hi = v
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"sparsity range must satisfy 0 < low < high < 1, got {list(v)}")
    return v


class StrategyTrainConfig(Compute):
    """`compress strategy train MODEL` (``compress.strategy.train``): the evaluator (pruning method, calibration,
    held-out windows), the GP surrogate's budget of true evaluations and StratNet's training."""

    model: Path
    out: Optional[Path] = None
    calib: Optional[str] = None
    method: str = Field("wanda", description="a pruning method's name (the registry: compress.prune.registry)")
    nsamples: int = Field(128, ge=1)
    seqlen: Optional[int] = Field(None, ge=2)
    eval_windows: int = Field(32, ge=1, description="held-out windows of the calibration text the KL runs on")
    eval_seqlen: Optional[int] = Field(None, ge=2)
    sparsity_range: Annotated[tuple[float, float], AfterValidator(_range)] = (0.3, 0.7)
    spread: float = Field(0.2, gt=0, lt=1, description="each block's sparsity within mean ± spread")
    max_block_sparsity: float = Field(0.95, gt=0, lt=1)
    budget: int = Field(160, ge=8, description="true evaluations for the GP: design + active rounds")
    rounds: int = Field(2, ge=0, description="active rounds refining the GP with StratNet's proposals")
    active_fraction: float = Field(0.25, ge=0, lt=1, description="share of the budget spent in active rounds")
    steps: int = Field(400, ge=1, description="Adam steps of StratNet training per round")
    kappa: float = Field(0.0, ge=0, allow_inf_nan=False,
                         description="pessimism: StratNet minimizes the GP's mean + kappa * posterior std of log KL")
    hidden: int = Field(64, ge=4)
    lr: float = Field(0.01, gt=0)
    batch_requests: int = Field(64, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    cache_dir: Path = CALIB_CACHE
    log: Optional[Path] = Field(None, description="JSON lines file: every true evaluation")
    overwrite: bool = False


class StrategySearchConfig(Compute):
    """`compress strategy search MODEL`: one request answered by a per-request search (CMA-ES or BO) over the
    same evaluator and feasible set as StratNet (the UniCuCo baseline)."""

    model: Path
    request: CompressionRequest
    calib: Optional[str] = None
    method: str = Field("wanda", description="a pruning method's name (the registry: compress.prune.registry)")
    nsamples: int = Field(128, ge=1)
    seqlen: Optional[int] = Field(None, ge=2)
    eval_windows: int = Field(32, ge=1)
    eval_seqlen: Optional[int] = Field(None, ge=2)
    spread: float = Field(0.2, gt=0, lt=1)
    max_block_sparsity: float = Field(0.95, gt=0, lt=1)
    sparsity_range: Annotated[tuple[float, float], AfterValidator(_range)] = (0.3, 0.7)
    optimizer: Literal["cma", "bayes"] = "cma"
    budget: int = Field(100, ge=2)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    cache_dir: Path = CALIB_CACHE
    out: Optional[Path] = None
    log: Optional[Path] = None
    overwrite: bool = False


class BatchConfig(Compute):
    """`compress batch MODEL --stratnet FILE --requests FILE.jsonl --out DIR`: one pruned output per request."""

    model: Path
    stratnet: Path
    requests: Path
    out: Path
    format: Literal["sparse", "folder", "both"] = "sparse"
    calib: Optional[str] = None
    nsamples: Optional[int] = Field(None, ge=1)
    cache_dir: Path = CALIB_CACHE
    overwrite: bool = False


# -- serving ---------------------------------------------------------------------------------------------------

#: a registered model's name: what clients ask for; never a path (no '/', '\\', '..', no leading '.')
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def model_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a registered model's name (it looks like a path, or has other characters), or None."""
    if any(c in name for c in "/\\") or ".." in name or name.startswith(("~", ".")) or ":" in name:
        return f"model name '{name[:80]}' looks like a path; ask for a registered model by its name (GET /v1/models)"
    if not MODEL_NAME.fullmatch(name):
        return (f"model name '{name[:80]}' may hold only letters, digits, '_', '-' and '.' (at most 64, starting "
                "with a letter or digit)")
    return None


def _model_name(v: str) -> str:
    problem = model_name_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class ServeModel(_Config):
    """One entry of the server's registry (``models.yml``): a model folder, the StratNet trained for it
    (``compress strategy train``) and how to prune and measure. Paths are the operator's; clients only see the name."""

    model: Path
    stratnet: Path
    calib: Optional[str] = None          # default: the StratNet's calibration text
    nsamples: Optional[int] = Field(None, ge=1)
    dtype: DType = None                  # dtype of the artifacts (default: as stored)
    eval_windows: int = Field(16, ge=0)  # held-out windows for the measured KL (0: skip the measurement)
    description: str = ""


class ServeRegistry(_Config):
    """``compress serve --registry models.yml``: ``models: {name: ServeModel}``."""

    models: dict[Annotated[str, AfterValidator(_model_name)], ServeModel]

    @model_validator(mode="after")
    def _some(self):
        if not self.models:
            raise ValueError("the registry names no model")
        return self


class ServeRequest(CompressionRequest):
    """The body of ``POST /v1/requests``: a ``CompressionRequest`` for a registered ``model``, the artifact
    ``format`` (sparse: a sparse weight file, ``compress apply`` rebuilds the folder; dense: a tar of the pruned
    Hugging Face folder) and an optional ``idempotency_key`` (a repeat with the same key and body returns the
    same job)."""

    model: str
    format: Literal["sparse", "dense"] = "sparse"
    idempotency_key: Optional[str] = Field(None, min_length=1, max_length=128)


class ServeConfig(Compute):
    """`compress serve`: the HTTP API, the job store and the batching worker."""

    registry: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: Path = Path("checkpoints/serve.db")
    artifacts: Optional[Path] = None       # default: <db>.artifacts/ beside the database
    token: Optional[str] = None
    backend: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = None      # join this Ray cluster; a local Ray instance otherwise
    ray_gpus: Optional[float] = Field(None, ge=0)  # GPUs a group task asks for (default: 1 with --device cuda)
    workers: int = Field(1, ge=1)          # groups run at once (ray); the local backend runs one
    max_queue: int = Field(1000, ge=1)     # queued jobs beyond this: 429
    max_batch: int = Field(64, ge=1)       # jobs answered in one group
    max_body: int = Field(64 * 1024, ge=256)  # bytes: larger request bodies get 413
    cache_dir: Path = CALIB_CACHE

    @model_validator(mode="after")
    def _token(self):
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token: at least 8 characters")
        return self
