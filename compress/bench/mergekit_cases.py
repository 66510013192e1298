"""The mergekit recipes that parity checks run through both tools: one place, so the unit tests' fixture
(tests/data/mergekit_reference.json), the ``tests/test_merge_mergekit_methods.py`` cases and ``compress bench
mergekit-parity`` all use the same list.

A case names a method, how many fine-tuned models it takes, whether ``base_model`` is given (and listed again
under ``models:``), and its parameters. ``mergekit_recipe`` writes the mergekit YAML for real paths.
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
