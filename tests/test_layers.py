"""The package's layers point one way (issue 18): every module's imports, those inside functions included, go
to its own layer or below, and no group of modules imports itself in a cycle.

errors → config (schemas: no torch, nothing of the package but errors) → runtime → io → taskvec · sparsify →
heads → merge · prune · search · eval → strategy → serve → each stage's commands (and compress.options) → bench
(with zoo, demo, finetune, and the heads commands: `heads probes` reads a zoo recipe) → cli (which assembles them).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compress"

# lowest first; a module takes the layer of the longest name that is it or a package above it
LAYERS = [
    ["compress", "compress.errors", "compress.extras", "compress.lazy", "compress.native"],
    ["compress.config"],
    ["compress.runtime", "compress.progress"],
    ["compress.io", "compress.data"],
    ["compress.taskvec", "compress.sparsify", "compress.delta"],
    ["compress.heads"],
    ["compress.merge", "compress.prune", "compress.search", "compress.eval"],
    ["compress.strategy"],
    ["compress.serve"],
    # each stage's commands: options parsed into configs (compress.options holds the shared ones)
    ["compress.inspect", "compress.options", "compress.io.commands", "compress.merge.commands",
     "compress.prune.commands", "compress.search.commands", "compress.eval.commands", "compress.strategy.commands",
     "compress.serve.commands"],
    # `heads probes` writes its probes from a zoo recipe, so the heads commands sit with the zoo
    ["compress.bench", "compress.zoo", "compress.demo", "compress.finetune", "compress.heads.commands"],
    ["compress.cli"],
]
# what the schema layer may import: the standard library, pydantic, and errors
CONFIG_MAY_IMPORT = {"__future__", "math", "re", "pathlib", "typing", "pydantic", "compress.errors"}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every compress module ``name`` imports, at any depth of its code; ``from pkg import sub`` counts ``sub``."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            found.update(subs if subs and len(subs) == len(node.names) else [mod, *subs])
    out = set()
    for m in found:
        if not (m == "compress" or m.startswith("compress.")):
            continue
        while m not in known:
            m = m.rpartition(".")[0]
        if m != name:
            out.add(m)
    return out


def third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module)
    return out


def layer(name: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            matches = name == n or (n != "compress" and name.startswith(n + "."))
            if matches and (best is None or len(n) > best[1]):
                best = (i, len(n))
    if best is None:
        raise AssertionError(f"module {name} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(root: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    return bad + [f"cycle: {' ↔ '.join(c)}" for c in cycles(graph)]


def test_imports_point_down_and_close_no_cycle():
    assert violations(graph_of()) == []


def test_config_imports_no_torch_and_nothing_of_the_package_but_errors():
    extra = {m for m in third_party(PACKAGE / "config.py") if m.split(".")[0] not in CONFIG_MAY_IMPORT
             and m not in CONFIG_MAY_IMPORT}
    assert extra == set()


@pytest.mark.parametrize("files,expected", [
    # the cycles issue 18 found, rebuilt in a scratch package: each must be reported
    ({"config.py": "def f():\n    from compress.search.nps import x\n",
      "search/nps.py": "from compress.config import y\n"},
     ["compress.config (layer 1) imports compress.search.nps (layer 6)",
      "cycle: compress.config ↔ compress.search.nps"]),
    ({"prune/owl.py": "from compress.prune.strategy import S\n",
      "prune/strategy.py": "def g():\n    from compress.prune.owl import recenter\n"},
     ["cycle: compress.prune.owl ↔ compress.prune.strategy"]),
    ({"io/sparse.py": "from compress.delta import FORMAT\n", "delta.py": "x = 1\n"},
     ["compress.io.sparse (layer 3) imports compress.delta (layer 4)"]),
    ({"heads/probes.py": "def r():\n    from compress.zoo.lm import load_recipe\n", "zoo/lm.py": "x = 1\n"},
     ["compress.heads.probes (layer 5) imports compress.zoo.lm (layer 10)"]),
    ({"prune/__init__.py": "from compress.prune.pruner import P\n",
      "prune/pruner.py": "from compress.prune import calib\n", "prune/calib.py": "x = 1\n"}, []),
])
def test_the_checker_reports_upward_imports_and_cycles(tmp_path, files, expected):
    root = tmp_path / "compress"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not (p.parent / "__init__.py").exists():
            (p.parent / "__init__.py").write_text("")
        p.write_text(text)
    assert violations(graph_of(root)) == expected
