"""The parity cases: every merge method mergekit 0.1.5 registers, with the YAML parameters its case runs.

Models are named, not pathed: ``base`` and two fine-tunes ``a`` and ``b`` (the benchmark fills in the folders).
``random`` cases draw random masks (DARE, DELLA): they are compared against mergekit's seed-to-seed spread.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    method: str
    parameters: dict = field(default_factory=dict)  # the recipe's shared parameters
    models: tuple = (("a", {"weight": 0.6}), ("b", {"weight": 0.4}))  # (model, its parameters)
    base: bool = True  # whether the recipe names base_model
    random: bool = False
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.method

    def recipe(self, paths: dict[str, str], dtype: str | None = None) -> dict:
        """The mergekit YAML (as a dict) of this case on ``paths`` ({'base': …, 'a': …, 'b': …})."""
        data: dict = {"merge_method": self.method,
                      "models": [{"model": paths[m], **({"parameters": dict(p)} if p else {})}
                                 for m, p in self.models]}
        if self.base:
            data["base_model"] = paths["base"]
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        if dtype is not None:
            data["dtype"] = dtype
        return data


W = (("a", {"weight": 0.7}), ("b", {"weight": 0.5}))
CASES: tuple[Case, ...] = (
    Case("linear", base=False),
    Case("slerp", {"t": [0.0, 0.3, 1.0]}, (("a", {}),)),
    Case("task_arithmetic", {"lambda": 0.9}, W),
    Case("ties", {"normalize": True}, (("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.5, "density": 0.3}))),
    Case("dare_ties", {}, (("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.5, "density": 0.3})),
         random=True),
    Case("dare_linear", {}, (("a", {"weight": 0.7, "density": 0.5}), ("b", {"weight": 0.5, "density": 0.3})),
         random=True),
    Case("breadcrumbs", {}, (("a", {"weight": 0.7, "density": 0.8, "gamma": 0.05}),
                             ("b", {"weight": 0.5, "density": 0.9, "gamma": 0.02}))),
    Case("breadcrumbs_ties", {}, (("a", {"weight": 0.7, "density": 0.8, "gamma": 0.05}),
                                  ("b", {"weight": 0.5, "density": 0.9, "gamma": 0.02}))),
    Case("della", {"lambda": 1.0}, (("a", {"weight": 0.7, "density": 0.5, "epsilon": 0.1}),
                                    ("b", {"weight": 0.5, "density": 0.4, "epsilon": 0.1})), random=True),
    Case("della_linear", {}, (("a", {"weight": 0.7, "density": 0.5, "epsilon": 0.1}),
                              ("b", {"weight": 0.5, "density": 0.4, "epsilon": 0.1})), random=True),
    Case("nuslerp", {}, (("a", {"weight": 0.6}), ("b", {"weight": 0.4}))),
    Case("model_stock", {}, (("a", {}), ("b", {}))),
    Case("sce", {"select_topk": 0.5}, (("a", {}), ("b", {}))),
    Case("karcher", {}, (("a", {}), ("b", {})), base=False),
    Case("multislerp", {}, (("a", {"weight": 0.6}), ("b", {"weight": 0.4}))),
    Case("passthrough", {}, (("a", {}),), base=False),
    Case("nearswap", {"t": 0.5}, (("a", {}),)),
    Case("arcee_fusion", {}, (("a", {}),)),
    Case("ram", {}, (("a", {}), ("b", {}))),
    Case("ramplus_tl", {}, (("a", {}), ("b", {}))),
)
