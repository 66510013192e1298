"""Hostile configuration (issue 17, item 9): a model folder's config.json that is not JSON, not a JSON object or
not UTF-8; recipes nested too deeply or not UTF-8; mergekit parameters of the wrong type. Each is one line on
stderr naming the file (and the field), exit code 2, and nothing at the target: no output, no temporary."""

import shutil

import pytest
import yaml

from tests.conftest import run_cli

BROKEN_JSON = {
    "truncated": b'{"model_type": "llama", "hidden_size": ',
    "list": b"[1, 2, 3]",
    "latin1": '{"model_type": "llama", "name": "café"}'.encode("latin-1"),
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def delta(llama_pair, tmp_path_factory):
    base, ft = llama_pair
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", path)[0] == 0
    return path


def _broken_copy(src, dst, content: bytes, name: str = "config.json"):
    shutil.copytree(src, dst)
    (dst / name).write_bytes(content)
    return dst


COMMANDS = {
    "extract base": lambda b, ft, bad, d, w: ["extract", "--base", bad, "--finetuned", ft, "--out",
                                              w / "d.safetensors"],
    "extract finetuned": lambda b, ft, bad, d, w: ["extract", "--base", b, "--finetuned", bad, "--out",
                                                   w / "d.safetensors"],
    "extract-lora": lambda b, ft, bad, d, w: ["extract-lora", "--base", b, "--finetuned", bad, "--out", w / "lora"],
    "apply base": lambda b, ft, bad, d, w: ["apply", "--base", bad, "--delta", d, "--out", w / "o"],
    "apply config-from": lambda b, ft, bad, d, w: ["apply", "--base", b, "--delta", d, "--config-from", bad,
                                                   "--out", w / "o"],
    "merge": lambda b, ft, bad, d, w: ["merge", "--base", b, "--models", ft, bad, "--method", "ties", "--out",
                                       w / "m"],
    "interpolate": lambda b, ft, bad, d, w: ["interpolate", "--base", b, "--finetuned", bad, "--alpha", "0.5",
                                             "--out", w / "i"],
    "prune": lambda b, ft, bad, d, w: ["prune", bad, "--sparsity", "0.5", "--method", "magnitude", "--out", w / "p"],
    "eval": lambda b, ft, bad, d, w: ["eval", bad, "--perplexity", "shakespeare", "--max-tokens", "64"],
}


@pytest.mark.parametrize("kind", BROKEN_JSON)
@pytest.mark.parametrize("command", COMMANDS)
def test_broken_config_json_is_one_line_naming_it(llama_pair, delta, tmp_path, command, kind):
    base, ft = llama_pair
    bad = _broken_copy(ft, tmp_path / "bad", BROKEN_JSON[kind])
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run_cli(*COMMANDS[command](base, ft, bad, delta, work))
    assert code == 2, err
    line = _one_line(err)
    assert str(bad / "config.json") in line
    assert ("JSON object" if kind == "list" else "not valid JSON") in line
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("kind", ["list", "latin1"])
def test_broken_adapter_config_is_one_line_naming_it(llama_pair, tmp_path, kind):
    base, ft = llama_pair
    lora = tmp_path / "lora"
    assert run_cli("extract-lora", "--base", base, "--finetuned", ft, "--out", lora, "--rank", "2")[0] == 0
    (lora / "adapter_config.json").write_bytes(BROKEN_JSON[kind])
    code, _, err = run_cli("inspect", lora)
    assert code == 2 and str(lora / "adapter_config.json") in _one_line(err)
    code, _, err = run_cli("extract", "--base", base, "--finetuned", lora, "--out", tmp_path / "d.safetensors")
    assert code == 2 and str(lora / "adapter_config.json") in _one_line(err)
    assert not (tmp_path / "d.safetensors").exists()


BROKEN_YAML = {
    "deep flow lists": ("models: " + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
    "deep block lists": ("models:\n" + "".join("  " * i + "-\n" for i in range(300))).encode(),
    "deep mappings": ("a: " + "{b: " * 100_000 + "1" + "}" * 100_000 + "\n").encode(),
    "latin1": "method: ties\nname: café\n".encode("latin-1"),
}

RECIPE_COMMANDS = {
    "merge": lambda r, w: ["merge", r, "--out", w / "m"],
    "interpolate": lambda r, w: ["interpolate", r, "--out", w / "i"],
    "prune": lambda r, w: ["prune", r, "--out", w / "p"],
    "strategy train": lambda r, w: ["strategy", "train", r, "--out", w / "s.pt"],
    "zoo build": lambda r, w: ["zoo", "build", "stories260k", "--recipe", r, "--out-root", w],
    "serve": lambda r, w: ["serve", "--registry", r, "--db", w / "jobs.db", "--artifacts", w / "art"],
}


# Nesting on one line costs PyYAML's scanner about a second before the depth check stops it (its simple-key
# lookahead), so that case runs once; the others show that every recipe command reads through the one loader.
YAML_CASES = [(c, k) for c in RECIPE_COMMANDS for k in BROKEN_YAML if k != "deep flow lists"] + [
    ("merge", "deep flow lists")]


@pytest.mark.parametrize("command,kind", YAML_CASES)
def test_broken_yaml_is_one_line_naming_the_file(tmp_path, command, kind):
    recipe = tmp_path / "r.yml"
    recipe.write_bytes(BROKEN_YAML[kind])
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run_cli(*RECIPE_COMMANDS[command](recipe, work))
    assert code == 2, err
    line = _one_line(err)
    assert str(recipe) in line
    assert ("nest deeper than" if kind.startswith("deep") else "utf-8") in line
    assert list(work.iterdir()) == []


def _mergekit(base, ft, **change):
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(base)}, {"model": str(ft), "parameters": {"weight": 1.0, "density": 0.5}}],
              "parameters": {"normalize": True}}
    for path, value in change.items():
        *parents, key = path.split("__")
        node = recipe
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[key] = value
    return recipe


# (change to a valid mergekit recipe, the field path the error must name, what it must say). models[0] is the
# base, which the translation drops: the error still names the file's index, models[1].
MERGEKIT_CASES = {
    "density string": ({"models__1__parameters__density": "abc"}, "models[1].parameters.density", "'abc'"),
    # a mergekit recipe may say density 0 (mergekit keeps nothing); 5 is out of its [0, 1]
    "density out of range": ({"models__1__parameters__density": 5}, "models[1].parameters.density", "[0, 1]"),
    "density filter value": ({"models__1__parameters__density": [{"filter": "mlp", "value": "x"}, {"value": 0.5}]},
                             "models[1].parameters.density", "'x'"),
    "weight nested list": ({"models__1__parameters__weight": [[1], 2]}, "models[1].parameters.weight", "[[1], 2]"),
    "normalize list": ({"parameters__normalize": [1, 2]}, "parameters.normalize", "true or false"),
    "rescale string": ({"parameters__rescale": "maybe"}, "parameters.rescale", "true or false"),
    "lambda string": ({"parameters__lambda": "big"}, "parameters.lambda", "'big'"),
    "parameters scalar": ({"parameters": 5}, "parameters", "mapping"),
    "model parameters scalar": ({"models__1__parameters": 5}, "models[1].parameters", "mapping"),
    "models mapping": ({"models": {}}, "models", "list"),
    "models string": ({"models": "ft"}, "models", "list"),
    "model path list": ({"models__1__model": ["a"]}, "models[1].model", "model path"),
    "base_model list": ({"base_model": ["a"]}, "base_model", "model path"),
}


@pytest.mark.parametrize("case", MERGEKIT_CASES)
def test_wrong_typed_mergekit_parameters_name_the_field(llama_pair, tmp_path, case):
    base, ft = llama_pair
    change, field, says = MERGEKIT_CASES[case]
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_mergekit(base, ft, **change)))
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run_cli("merge", recipe, "--out", work / "m")
    assert code == 2, err
    line = _one_line(err)
    assert line.startswith(f"error: {recipe}: ") and f" {field} " in line and says in line, line
    assert list(work.iterdir()) == []


def test_the_valid_recipe_the_cases_start_from_merges(llama_pair, tmp_path):
    base, ft = llama_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_mergekit(base, ft, models__1__parameters__weight=[1, 2])))  # a gradient
    code, _, err = run_cli("merge", recipe, "--out", tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "config.json").is_file()


NATIVE_CASES = {
    "density string": ({"density": "abc"}, "models.0.parameters.density", "'abc'"),
    "weight nested list": ({"weight": [[1], 2]}, "models.0.parameters.weight", "[[1], 2]"),
    "density gradient under a global top-k": ({"density": [0.2, 0.5]}, "models.0.parameters.density",
                                              "one density per model"),
}


@pytest.mark.parametrize("case", NATIVE_CASES)
def test_wrong_typed_native_parameters_name_the_field(llama_pair, tmp_path, case):
    base, ft = llama_pair
    params, field, says = NATIVE_CASES[case]
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(base),
                                      "models": [{"model": str(ft), "parameters": params}]}))
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run_cli("merge", recipe, "--out", work / "m")
    assert code == 2, err
    line = _one_line(err)
    assert line.startswith(f"error: {recipe}: ") and field in line and says in line, line
    assert list(work.iterdir()) == []
