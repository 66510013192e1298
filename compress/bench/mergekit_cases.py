"""The mergekit recipes that parity checks run through both tools: one place, so the unit tests' fixture
(tests/data/mergekit_reference.json), the ``tests/test_merge_mergekit_methods.py`` cases and ``compress bench
mergekit-parity`` all use the same list.

A case names a method, how many fine-tuned models it takes, whether ``base_model`` is given (and listed again
under ``models:``), and its parameters. ``mergekit_recipe`` writes the mergekit YAML for real paths.
``CASES`` are the fixture's (every method mergekit 0.1.5 registers but the random ones are there);
``PARITY_CASES`` adds the forms the benchmark also runs (per-model densities, the linear variants of DARE,
breadcrumbs and DELLA), on its checkpoints ``base`` and the fine-tunes ``FINE_TUNES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    models: int = 2
    base: bool = True
    list_base: bool = False
    parameters: dict = field(default_factory=dict)
    model_parameters: tuple = ()
    random: bool = False  # draws random numbers: equal only in distribution (or with one seed in one process)

    def recipe(self, paths: dict[str, str], dtype: Optional[str] = None) -> dict:
        """The mergekit YAML (as a dict) on the benchmark's checkpoints ``paths`` ({'base': …, 'a': …, …})."""
        return mergekit_recipe(self, paths["base"], [paths[k] for k in FINE_TUNES], dtype)


CASES: tuple[Case, ...] = (
    # the ten methods mergekit 0.1.5 has and compress lacked
    Case("nuslerp", "nuslerp", model_parameters=({"weight": 0.4}, {"weight": 0.6})),
    Case("nuslerp row-wise", "nuslerp", parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
         model_parameters=({"weight": 1.0}, {"weight": 3.0})),
    Case("nuslerp no base", "nuslerp", base=False, model_parameters=({"weight": 0.5}, {"weight": 0.5})),
    Case("model_stock", "model_stock"),
    Case("model_stock filter-wise", "model_stock", models=3, parameters={"filter_wise": True}),
    Case("sce", "sce", parameters={"select_topk": 0.5}),
    Case("sce all", "sce", models=3),
    Case("karcher", "karcher"),
    Case("multislerp", "multislerp", model_parameters=({"weight": 0.3}, {"weight": 0.7})),
    Case("multislerp no base", "multislerp", base=False, models=3,
         model_parameters=({"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0})),
    Case("passthrough", "passthrough", models=1, base=False, model_parameters=({"scale": 0.5},)),
    Case("nearswap", "nearswap", models=1, parameters={"t": 0.02}),
    Case("arcee_fusion", "arcee_fusion", models=1),
    Case("ram", "ram", models=3, parameters={"epsilon": 0.012}),
    Case("ramplus_tl", "ramplus_tl", models=3, parameters={"epsilon": 0.012, "r": 0.5, "alpha": 0.3}),
    # mergekit's semantics for methods compress had: the silent differences of issue 20
    Case("linear, base listed", "linear", list_base=True,
         model_parameters=({"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3})),
    Case("linear, base added", "linear", parameters={"weight": 1.0}),
    Case("ties", "ties", models=3, parameters={"density": 0.3},
         model_parameters=({"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7})),
    Case("breadcrumbs", "breadcrumbs", parameters={"density": 0.5, "gamma": 0.05, "weight": 1.0}),
    Case("della at density 1", "della", parameters={"density": 1.0, "weight": 0.5}),
    # density 0 keeps nothing in mergekit (the merge is the base), the random methods included
    Case("ties at density 0", "ties", parameters={"density": 0.0, "weight": 1.0}),
    Case("dare_ties at density 0", "dare_ties", parameters={"density": 0.0, "weight": 1.0}),
    Case("della at density 0", "della", parameters={"density": 0.0, "epsilon": 0.1, "weight": 0.5}),
    # mergekit's slerp arithmetic (float32 t, chunked norms), and t as a gradient over the layers
    Case("slerp", "slerp", models=1, parameters={"t": 0.3}),
    Case("slerp gradient", "slerp", models=1, parameters={"t": [0.0, 0.3, 1.0]}),
    # random drops: equal to mergekit in distribution, not draw for draw
    Case("dare_ties", "dare_ties", parameters={"density": 0.5, "weight": 1.0}, random=True),
    Case("della", "della", parameters={"density": 0.5, "epsilon": 0.1, "weight": 1.0}, random=True),
)

FINE_TUNES = ("a", "b", "d")  # the benchmark's fine-tunes of the base's vocabulary (``c`` adds tokens)
_W = ({"weight": 0.7}, {"weight": 0.5})
_DENSE = ({"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.3})
_CRUMBS = ({"weight": 0.7, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.9, "gamma": 0.02})
_DELLA = ({"weight": 0.7, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.4, "epsilon": 0.1})
PARITY_CASES: tuple[Case, ...] = CASES + (
    Case("linear no base", "linear", base=False, model_parameters=({"weight": 0.6}, {"weight": 0.4})),
    Case("task_arithmetic", "task_arithmetic", parameters={"lambda": 0.9}, model_parameters=_W),
    Case("ties per-model density", "ties", parameters={"normalize": True}, model_parameters=_DENSE),
    Case("breadcrumbs per-model", "breadcrumbs", model_parameters=_CRUMBS),
    Case("breadcrumbs_ties", "breadcrumbs_ties", model_parameters=_CRUMBS),
    Case("karcher no base", "karcher", base=False),
    Case("dare_ties per-model density", "dare_ties", model_parameters=_DENSE, random=True),
    Case("dare_linear", "dare_linear", model_parameters=_DENSE, random=True),
    Case("della per-model", "della", parameters={"lambda": 1.0}, model_parameters=_DELLA, random=True),
    Case("della_linear", "della_linear", model_parameters=_DELLA, random=True),
)


def mergekit_recipe(case: Case, base: str, models: list[str], dtype: Optional[str] = None) -> dict:
    """The mergekit YAML (as a dict) for ``case`` with real paths: ``base`` and at least ``case.models`` models."""
    entries = []
    if case.list_base:
        entries.append({"model": base, **({"parameters": case.model_parameters[0]} if case.model_parameters else {})})
    per_model = case.model_parameters[1:] if case.list_base else case.model_parameters
    for i, path in enumerate(models[: case.models]):
        entries.append({"model": path, **({"parameters": per_model[i]} if i < len(per_model) else {})})
    recipe = {"merge_method": case.method, "models": entries}
    if case.base:
        recipe["base_model"] = base
    if case.parameters:
        recipe["parameters"] = dict(case.parameters)
    if dtype:
        recipe["dtype"] = dtype
    return recipe


# -- tiny checkpoints both tools read, built from seeded draws (not a model's init, which changes with versions) ---

# a Llama of 2 blocks, hidden 32, 4 heads (2 key/value heads), vocabulary 96: what mergekit and compress read
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}


def tiny_llama_shapes() -> dict[str, tuple[int, ...]]:
    c = TINY_LLAMA
    h, kv = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    block = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
             "self_attn.o_proj": (h, h), "mlp.gate_proj": (c["intermediate_size"], h),
             "mlp.up_proj": (c["intermediate_size"], h), "mlp.down_proj": (h, c["intermediate_size"]),
             "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in block.items()})
    return {**shapes, "model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}


def build_checkpoints(root, n_models: int = 3) -> dict:
    """A base and ``n_models`` fine-tuned tiny Llamas under ``root`` in float32 and bf16 (the bf16 ones are the
    float32 ones rounded): {"float32": (base, [models]), "bfloat16": (…)}. Values are seeded draws per tensor name,
    so every run and machine with this torch builds the same bytes."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from compress.sparsify.masks import seeded_generator

    base = {k: torch.randn(s, generator=seeded_generator(0, k)) * 0.02 for k, s in tiny_llama_shapes().items()}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=seeded_generator(i, k)) for k, v in base.items()}
              for i in range(1, n_models + 1)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).removeprefix("torch.")
        paths = []
        for i, sd in enumerate([base] + models):
            path = Path(root) / f"{'base' if i == 0 else f'ft{i}'}-{tag}"
            path.mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path / "model.safetensors"),
                      metadata={"format": "pt"})
            (path / "config.json").write_text(json.dumps({**TINY_LLAMA, "torch_dtype": tag}, indent=2) + "\n")
            paths.append(str(path))
        out[tag] = (paths[0], paths[1:])
    return out


def digest(folder) -> str:
    """sha256 over every tensor of a written model (name, dtype, shape, bytes), in name order."""
    from pathlib import Path

    from safetensors import safe_open

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors_digest(tensors)


def tensors_digest(tensors: dict) -> str:
    """sha256 over named tensors (name, dtype, shape, bytes), in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# the random masks recorded from mergekit's sparsify after torch.manual_seed(seed): name → (method, density, epsilon)
MASKS = {"dare": ("random", 0.3, 0.0), "della": ("della_magprune", 0.3, 0.2)}
MASK_SHAPES = ((64, 48), (16, 600), (300,), (4, 6, 20))
MASK_SEED = 5


def mask_deltas(dtype) -> dict:
    """The deltas the recorded masks are drawn on: seeded draws of ``MASK_SHAPES`` in ``dtype``."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {f"t{i}": (torch.randn(s, generator=g) * 0.01).to(dtype) for i, s in enumerate(MASK_SHAPES)}


SLERP_T = 0.3


def slerp_pair(dtype) -> tuple:
    """Two seeded tensors of 1.1 M entries (more than one of mergekit's slerp chunks), 40° or so apart."""
    import torch

    g = torch.Generator().manual_seed(1)
    v0 = torch.randn(1100, 1000, generator=g)
    return v0.to(dtype), (v0 + torch.randn(1100, 1000, generator=g)).to(dtype)


# conversations the named chat templates are rendered on (with and without a generation prompt): system, user,
# assistant and Alpaca's user_context turns, whitespace to trim, and orders the Mistral template refuses
_S, _U, _A = ({"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi  there\n"},
              {"role": "assistant", "content": "\nHello! "})
_U2, _C = {"role": "user", "content": "Why?"}, {"role": "user_context", "content": " ctx "}
CONVERSATIONS = ([_U], [_S, _U], [_U, _A], [_S, _U, _A, _U2], [_U, _A, _U2, _A], [_S], [_A], [_A, _U], [_S, _S, _U],
                 [_U, _C, _A], [_C], [_U, _U2], [_S, _U, _A], [], [{"role": "tool", "content": "x"}], [_S, _A])


def render_all(template: str, tokenizer) -> list[str]:
    """``template`` rendered by transformers on every conversation, without and with a generation prompt; a
    conversation the template refuses gives 'error: <exception type>'."""
    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False,
                                                         add_generation_prompt=gen))
            except Exception as e:  # the template's own raise_exception, or an undefined turn
                out.append(f"error: {type(e).__name__}")
    return out


def write_reference(path, workdir, tokenizer) -> dict:
    """Run every deterministic case through mergekit (importable in this interpreter: the venv of
    ``compress.bench.merge_speed.mergekit_env``) in float32 and bf16, and save {case: {dtype: digest}} to
    ``path``, with the digests of mergekit's random masks (``MASKS`` on ``mask_deltas``, one seed), of its slerp
    kernel on ``slerp_pair``, and its named chat templates rendered on ``CONVERSATIONS`` by ``tokenizer``
    (stories260K's): the fixture the unit tests compare ``compress merge``, ``sparsify_delta``, ``slerp`` and
    ``chat_templates.NAMED`` against without mergekit."""
    import json
    import logging
    from importlib.metadata import version
    from pathlib import Path

    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    logging.disable(logging.WARNING)
    ckpts = build_checkpoints(Path(workdir) / "ckpts")
    ref = {"mergekit": version("mergekit"), "cases": {}, "masks": {}}
    import mergekit
    from mergekit.merge_methods.slerp import slerp

    for dtype in (torch.float32, torch.bfloat16):
        v0, v1 = slerp_pair(dtype)
        ref.setdefault("slerp", {})[str(dtype).removeprefix("torch.")] = tensors_digest(
            {"out": slerp(torch.tensor([SLERP_T]), v0.unsqueeze(0), v1.unsqueeze(0))[0]})
    folder = Path(mergekit.__file__).parent / "_data" / "chat_templates"
    ref["chat_templates"] = {f.stem: render_all(f.read_text(), tokenizer) for f in sorted(folder.glob("*.jinja"))}
    for name, (method, density, epsilon) in MASKS.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = {}
            for k, delta in mask_deltas(dtype).items():
                torch.manual_seed(MASK_SEED)
                out[k] = sparsify(delta, density=density, method=SparsificationMethod(method), epsilon=epsilon,
                                  rescale_norm=RescaleNorm.l1)
            ref["masks"].setdefault(name, {})[str(dtype).removeprefix("torch.")] = tensors_digest(out)
    for case in CASES:
        if case.random:
            continue
        for tag, (base, models) in ckpts.items():
            out = Path(workdir) / f"{case.name}-{tag}".replace(" ", "_").replace(",", "")
            cfg = MergeConfiguration.model_validate(mergekit_recipe(case, base, models))
            run_merge(cfg, str(out), MergeOptions(lazy_unpickle=True, copy_tokenizer=False, quiet=True))
            ref["cases"].setdefault(case.name, {})[tag] = digest(out)
    Path(path).write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
    return ref
