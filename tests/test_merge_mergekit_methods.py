"""The ten mergekit methods compress lacked (hand-computed cases), mergekit's semantics for its YAMLs, and the whole
path `compress merge <mergekit yaml>` bit for bit against mergekit 0.1.5's own output, recorded in
tests/data/mergekit_reference.json (``compress.bench.mergekit_cases.write_reference`` wrote it from mergekit in its
venv; the checkpoints are rebuilt here from seeded draws)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from compress.bench import mergekit_cases as mc
from compress.bench.mergekit_cases import CASES, MASKS, build_checkpoints, digest, mergekit_recipe
from compress.merge import elementwise, geometric
from compress.merge.methods import SLERP_CHUNK, della_keep_prob, magnitude_keep, outlier_keep, slerp, sparsify_delta
from compress.sparsify.masks import keep_count
from compress.sparsify.topk import sort_first_mask, sort_order_first

REFERENCE = json.loads((Path(__file__).parent / "data" / "mergekit_reference.json").read_text())
H = math.sqrt(0.5)
NEW = {"nuslerp", "model_stock", "sce", "karcher", "multislerp", "passthrough", "nearswap", "arcee_fusion", "ram",
       "ramplus_tl"}


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# -- each new method on a case worked out by hand ---------------------------------------------------------------

def test_nuslerp_by_hand():
    # orthogonal unit vectors at t = 1/(1+1): sin(π/4)·(v0 + v1) / sin(π/2)
    got = geometric.nuslerp(None, T([1.0, 0.0], [0.0, 1.0]), [1, 1])
    assert torch.allclose(got, torch.tensor([H, H]))
    # with a base the task vectors are interpolated: base + the same midpoint
    got = geometric.nuslerp(torch.tensor([1.0, 1.0]), T([2.0, 1.0], [1.0, 2.0]), [1, 1])
    assert torch.allclose(got, torch.tensor([1 + H, 1 + H]))
    # collinear: linear at t = 3/(1+3): 0.25·v + 0.75·2v = 1.75 v; row-wise rows are independent
    v = T([1.0, 2.0], [3.0, -1.0])
    got = geometric.nuslerp(None, torch.stack([v, 2 * v]), [1, 3], flatten=False, row_wise=False)
    assert torch.allclose(got, 1.75 * v)


def test_multislerp_and_karcher_by_hand():
    # two orthogonal unit vectors, equal weights: the tangent steps cancel, the result is the bisector
    assert torch.allclose(geometric.multislerp(None, T([1.0, 0.0], [0.0, 1.0]), [1, 1]), torch.tensor([H, H]))
    # Karcher: the bisector's direction, scaled by the mean norm (2 + 4)/2 = 3
    assert torch.allclose(geometric.karcher(T([2.0, 0.0], [0.0, 4.0])), torch.tensor([3 * H, 3 * H]), atol=1e-6)


def test_model_stock_by_hand():
    # offsets [1, 0] and [1, 1] from a zero base: cos θ = 1/√2, t = 2c/(1 + c) = 2(√2 − 1), average [1, 0.5]
    got = geometric.model_stock(torch.zeros(2), T([1.0, 0.0], [1.0, 1.0]))
    t = 2 * (math.sqrt(2) - 1)
    assert torch.allclose(got, torch.tensor([t, 0.5 * t]))


def test_sce_by_hand():
    base = torch.zeros(4)
    tv = T([2.0, 1.0, 0.0, -1.0], [2.0, -3.0, 0.0, 1.0])
    # weights ∝ mean squares 1.5 and 3.5; elected signs + − + +; a zero never agrees, so entry 2 stays 0
    assert torch.allclose(elementwise.sce(base, tv), torch.tensor([2.0, -3.0, 0.0, 1.0]))
    # select_topk 0.5 of the two entries that vary (variances 4 and 1): only entry 1; the sign − keeps model 2
    assert torch.allclose(elementwise.sce(base, tv, select_topk=0.5), torch.tensor([0.0, -3.0, 0.0, 0.0]))


def test_ram_and_ramplus_by_hand():
    base = torch.zeros(3)
    tv = T([1.0, 0.05, 2.0], [3.0, 0.0, 0.0])
    # |τ| > 0.1: entry 0 both (mean 2), entry 1 none, entry 2 model 1 alone (kept whole)
    assert torch.allclose(elementwise.ram(base, tv, epsilon=0.1), torch.tensor([2.0, 0.0, 2.0]))
    # RAM+: model 1 has 1 shared and 1 unique entry, ρ = 1, λ = 1 + 0.5·min(1, 0.3) = 1.15 on its unique entry
    got = elementwise.ramplus_tl(base, tv, r=0.5, alpha=0.3, epsilon=0.1)
    assert torch.allclose(got, torch.tensor([2.0, 0.0, 2.3]))


def test_nearswap_arcee_fusion_passthrough_by_hand():
    # weight clamp(0.1/|Δ|, 0, 1) = [1, 0.2, 0.1] towards the model
    got = elementwise.nearswap(torch.zeros(3), T([0.01, 0.5, -1.0]), t=0.1)
    assert torch.allclose(got, torch.tensor([0.01, 0.1, -0.1]))
    # importance ∝ |Δ| (one row, one KL): quantiles at places 1, 3, 5 of 8 → 2k, 4k, 6k; threshold 4k + 1.5·4k = 10k
    diff = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 40]])
    got = elementwise.arcee_fusion(torch.zeros(1, 8), diff.unsqueeze(0))
    assert got.tolist() == [[0, 0, 0, 0, 0, 0, 0, 40]]
    assert elementwise.passthrough(T([1.0, 2.0]), scale=0.5).tolist() == [0.5, 1.0]


# -- mergekit's selection order and counts ----------------------------------------------------------------------

@pytest.mark.parametrize("descending", [True, False])
def test_sort_order_first_is_torch_sort_s_first_places(descending):
    import shutil

    from compress.sparsify.topk import _replay_lib

    assert (_replay_lib() is not None) == bool(shutil.which("cc") or shutil.which("gcc"))  # the replay, not a sort
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 5000 if trial < 50 else 70000, (), generator=g))
        x = torch.randn(n, generator=g)
        x = [x.to(torch.bfloat16).abs().float(), torch.randint(0, 4, (n,), generator=g).float(), x][trial % 3]
        k = int(torch.randint(0, n + 1, (), generator=g))
        ref = torch.sort(x, descending=descending).indices[:k]  # unstable: libstdc++'s introsort
        assert set(sort_order_first(x, k, descending).tolist()) == set(ref.tolist()), (n, k)
    # bf16 read in place and |x| taken inside the replay, NaN included (torch's sort puts NaN above every number)
    for trial in range(30):
        n = int(torch.randint(17, 40000, (), generator=g))
        x = (torch.randn(n, generator=g) * 3).round().to(torch.bfloat16)  # few distinct values: ties everywhere
        if trial % 3 == 0:
            x[torch.randint(0, n, (5,), generator=g)] = float("nan")
        k = int(torch.randint(1, n, (), generator=g))
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.sort(x.float().abs(), descending=descending).indices[:k]] = True
        got = sort_first_mask(x.reshape(-1, 1), k, descending, absolute=True)
        assert got.shape == (n, 1) and torch.equal(got.reshape(-1), want), (n, k)
        assert torch.equal(sort_first_mask(x.float(), k, descending, absolute=True), want)


def test_argsort_tie_break_is_mergekit_s_magnitude_and_breadcrumbs():
    g = torch.Generator().manual_seed(1)
    d = (torch.randn(64, 48, generator=g) * 4).round() / 256  # bf16-like: many equal magnitudes
    ref = torch.zeros(d.numel(), dtype=torch.bool)
    ref[torch.argsort(d.abs().reshape(-1), descending=True)[: int(0.3 * d.numel())]] = True
    assert torch.equal(magnitude_keep(d, 0.3, "argsort").reshape(-1), ref)
    assert not torch.equal(magnitude_keep(d, 0.3).reshape(-1), ref)  # the index rule picks other ties
    n, keep, top = d.numel(), int(0.5 * d.numel()), int(0.05 * d.numel())
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.sort(d.abs().reshape(-1)).indices[n - keep - top: n - top]] = True
    assert torch.equal(outlier_keep(d, 0.5, 0.05, "argsort").reshape(-1), ref)


def test_density_rounding_and_della_rules():
    assert keep_count(10, 0.05, "floor") == 0 and keep_count(10, 0.05) == 1  # PEFT's floor; round keeps one
    d = torch.tensor([0.3, -0.1, 0.2])
    assert magnitude_keep(d, 0.2).sum() == 0 and magnitude_keep(d, 0.2, "argsort").tolist() == [True, False, False]
    assert torch.equal(sparsify_delta(d, "della", 1.0, epsilon=0.15), d)  # mergekit passes deltas through at 1
    # 3-D: ranks along dim 1 (mergekit's axis): column 0 is [1, 2, 3], column 1 is [10, 20, 5]
    p = della_keep_prob(torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 5.0]]]), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([[[0.4, 0.5], [0.5, 0.6], [0.6, 0.4]]]))


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_random_masks_are_mergekit_s_with_one_seed(name, dtype):
    # mergekit draws from the global generator after torch.manual_seed; ours from a generator seeded alike; bf16
    # ranks and probabilities stay in bf16 as in mergekit (DELLA's ranks past 256 round there)
    method, density, epsilon = MASKS[name]
    ours = {k: sparsify_delta(d, {"random": "random", "della_magprune": "della"}[method], density, rescale="l1",
                              epsilon=epsilon, generator=torch.Generator().manual_seed(mc.MASK_SEED))
            for k, d in mc.mask_deltas(dtype).items()}
    assert all(v.dtype == dtype for v in ours.values())
    assert mc.tensors_digest(ours) == REFERENCE["masks"][name][str(dtype).removeprefix("torch.")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_slerp_is_mergekit_s_kernel_over_several_chunks(dtype):
    v0, v1 = mc.slerp_pair(dtype)
    assert v0.numel() > SLERP_CHUNK  # norms and dot summed chunk by chunk, as mergekit sums them
    # the reference was recorded with one torch thread: a sum over a 1M-entry chunk is split among threads, so
    # its last bits (mergekit's as ours) depend on their number
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = slerp(mc.SLERP_T, v0, v1)
    finally:
        torch.set_num_threads(threads)
    want = REFERENCE["slerp"][str(dtype).removeprefix("torch.")]
    assert out.dtype == dtype and mc.tensors_digest({"out": out}) == want


# -- mergekit YAMLs: accepted forms, refusals, and bit-exactness against mergekit --------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(tmp_path_factory.mktemp("mk"))


def _merge(tmp_path, recipe, name="out"):
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
    return run_cli("merge", tmp_path / f"{name}.yml", "--out", tmp_path / name)


def test_cases_cover_the_ten_methods():
    assert NEW <= {c.method for c in CASES}
    assert set(REFERENCE["cases"]) == {c.name for c in CASES if not c.random}


# arcee_fusion thresholds importance scores made of float32 softmax / KL row sums, and torch sums a row in vector
# lanes as wide as the CPU's kernels: its reference (mergekit's output) was recorded with AVX2 kernels, and on an
# AVX-512 machine entries at the threshold flip (mergekit's own output moves with them). So it merges in a child
# process with torch's kernels pinned to AVX2, which every x86-64 machine that runs this suite has.
AVX2_RECORDED = {"arcee_fusion"}


def _merge_avx2(tmp_path, recipe, name):
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, "-m", "compress.cli", "merge", str(tmp_path / f"{name}.yml"), "--out",
                        str(tmp_path / name)], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2",
                                                    "COMPRESS_QUIET": "1"}, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("case", [c for c in CASES if not c.random], ids=lambda c: c.name)
def test_bit_exact_with_mergekit(case, ckpts, tmp_path):
    merge = _merge_avx2 if case.name in AVX2_RECORDED else _merge
    for tag, (base, models) in ckpts.items():
        code, _, err = merge(tmp_path, mergekit_recipe(case, base, models), tag)
        assert code == 0, err
        assert digest(tmp_path / tag) == REFERENCE["cases"][case.name][tag], f"{case.name} {tag}"


def _sd(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_no_dtype_merges_in_the_inputs_dtype_and_config_names_what_is_written(ckpts, tmp_path):
    base, models = ckpts["bfloat16"]
    r = {"merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": models[0], "parameters": {"weight": 0.7}}]}
    assert _merge(tmp_path, r, "bf")[0] == 0
    out, B, F = _sd(tmp_path / "bf"), _sd(base), _sd(models[0])
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[k], B[k] + (F[k] - B[k]) * torch.tensor(0.7, dtype=torch.bfloat16))  # bf16 arithmetic
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert _merge(tmp_path, {**r, "dtype": "float32"}, "f32")[0] == 0
    assert _sd(tmp_path / "f32")[k].dtype == torch.float32
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_linear_keeps_a_listed_base_in_the_average(ckpts, tmp_path):
    base, models = ckpts["float32"]
    r = {"merge_method": "linear", "base_model": base, "models": [
        {"model": base, "parameters": {"weight": 0.3}}, {"model": models[0], "parameters": {"weight": 0.5}}]}
    assert _merge(tmp_path, r)[0] == 0
    k = "model.norm.weight"
    assert torch.allclose(_sd(tmp_path / "out")[k], (0.3 * _sd(base)[k] + 0.5 * _sd(models[0])[k]) / 0.8)
    assert "mergekit 0.1.5's semantics" in (tmp_path / "out" / "README.md").read_text()  # the card says so


W = {"weight": 1}


@pytest.mark.parametrize("change, culprit", [
    ({"models": [{"model": "M0", "parameters": W}, {"model": "M1"}]}, "models[1]"),
    ({"merge_method": "linear", "models": [{"model": "M0", "parameters": W}]}, "base_model"),
    ({"merge_method": "nearswap", "models": [{"model": "M0"}]}, "parameters.t"),
    ({"merge_method": "nuslerp", "models": [{"model": f"M{i}", "parameters": W} for i in range(3)]}, "exactly 2"),
    ({"merge_method": "model_stock", "models": [{"model": "M0"}]}, "at least 2"),
    ({"merge_method": "sce", "parameters": {"select_topk": 2}}, "parameters.select_topk"),
    ({"merge_method": "model_stock", "parameters": {"filter_wise": 1}}, "parameters.filter_wise"),
    ({"merge_method": "karcher", "parameters": {"max_iter": 0.5}}, "parameters.max_iter"),
    ({"merge_method": "passthrough", "models": [{"model": "M0"}]}, "base_model"),
    ({"merge_method": "sce", "parameters": {"select_topk": 0.5, "filter_wsie": True}}, "filter_wsie"),
])
def test_refused_forms_name_the_field(ckpts, tmp_path, change, culprit):
    base, models = ckpts["float32"]
    r = {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": "M0"}, {"model": "M1"}]}
    r.update(change)
    for m in r["models"]:
        m["model"] = models[int(m["model"][1:])]
    code, _, err = _merge(tmp_path, r)
    assert code == 2 and len(err.strip().splitlines()) == 1 and culprit in err, err
    assert not (tmp_path / "out").exists()


def test_parameters_a_method_does_not_read_are_ignored_as_mergekit_does_and_named(ckpts, tmp_path):
    base, models = ckpts["float32"]
    plain = {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in models[:2]]}
    extra = {**plain, "parameters": {"filter_wise": True},
             "models": [{"model": models[0], "parameters": {"weight": 0.5}}, {"model": models[1]}]}
    assert _merge(tmp_path, plain, "plain")[0] == 0
    code, _, err = _merge(tmp_path, extra, "extra")
    assert code == 0 and "filter_wise" in err and "models[0]: sce does not read weight" in " ".join(err.split())
    assert digest(tmp_path / "plain") == digest(tmp_path / "extra")


def test_native_recipe_runs_a_new_method_in_float32(ckpts, tmp_path):
    base, models = ckpts["bfloat16"]
    r = {"method": "model_stock", "base": base, "models": [{"model": m} for m in models],
         "parameters": {"filter_wise": True}}
    (tmp_path / "n.yml").write_text(yaml.safe_dump(r))
    code, _, err = run_cli("merge", tmp_path / "n.yml", "--out", tmp_path / "n")
    assert code == 0, err
    k = "model.layers.1.self_attn.o_proj.weight"
    stack = torch.stack([_sd(m)[k].float() for m in models])
    want = geometric.model_stock(_sd(base)[k].float(), stack, filter_wise=True).to(torch.bfloat16)
    assert torch.equal(_sd(tmp_path / "n")[k], want)  # the native schema merges in float32, writes the stored dtype


@pytest.mark.parametrize("tag", ["float32", "bfloat16"])
def test_passthrough_is_the_same_from_a_mergekit_yaml_and_a_native_recipe(ckpts, tmp_path, tag):
    # a mergekit YAML goes through the slice planner, a native recipe through methods.WEIGHT_METHODS
    _, models = ckpts[tag]
    code, _, err = _merge(tmp_path, {"merge_method": "passthrough",
                                     "models": [{"model": models[0], "parameters": {"scale": 0.3}}]}, "mk")
    assert code == 0, err
    (tmp_path / "n.yml").write_text(yaml.safe_dump({"method": "passthrough",
                                                    "models": [{"model": models[0], "parameters": {"scale": 0.3}}]}))
    code, _, err = run_cli("merge", tmp_path / "n.yml", "--out", tmp_path / "n")
    assert code == 0, err
    assert digest(tmp_path / "mk") == digest(tmp_path / "n")
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(_sd(tmp_path / "n")[k], (_sd(models[0])[k].float() * 0.3).to(_sd(models[0])[k].dtype))


def test_passthrough_with_a_base_is_refused_the_same_way_in_both_schemas(ckpts, tmp_path):
    base, models = ckpts["float32"]
    mk = {"merge_method": "passthrough", "base_model": base, "models": [{"model": models[0]}]}
    native = {"method": "passthrough", "base": base, "models": [{"model": models[0]}]}
    for name, r in (("mk", mk), ("n", native)):
        code, _, err = _merge(tmp_path, r, name)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "no base model" in err, err
        assert not (tmp_path / name).exists()


def test_parity_bench_covers_every_case_and_refuses_an_unknown_method(tmp_path):
    from compress.bench.mergekit_cases import PARITY_CASES
    from compress.merge.recipe import MERGEKIT_METHODS

    assert PARITY_CASES[: len(CASES)] == CASES and {c.method for c in PARITY_CASES} == set(MERGEKIT_METHODS)
    assert len({c.name for c in PARITY_CASES}) == len(PARITY_CASES)
    code, _, err = run_cli("bench", "mergekit-parity", "--methods", "ties,nope", "--workdir", tmp_path / "w",
                           "--results", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'nope'" in err, err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["parameters", "models"])
def test_density_0_is_a_mergekit_rule_the_native_schema_refuses(ckpts, tmp_path, where):
    base, models = ckpts["float32"]
    p = {"density": 0.0, "weight": 1.0}
    entry = {"model": models[0], **({"parameters": p} if where == "models" else {})}
    native = {"method": "ties", "base": base, "models": [entry], **({"parameters": p} if where == "parameters" else {})}
    (tmp_path / "n.yml").write_text(yaml.safe_dump(native))
    code, _, err = run_cli("merge", tmp_path / "n.yml", "--out", tmp_path / "n")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "density 0 keeps nothing" in err, err
    assert f"{'parameters' if where == 'parameters' else 'models.0.parameters'}.density" in err
    assert not (tmp_path / "n").exists()
    # the same merge as a mergekit YAML is the base itself
    mk = {"merge_method": "ties", "base_model": base, "models": [{"model": models[0], "parameters": p}]}
    assert _merge(tmp_path, mk, "mk")[0] == 0
    out, want = _sd(tmp_path / "mk"), _sd(base)
    assert out.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in out.items())
