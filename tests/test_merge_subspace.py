"""TSV-M, Iso-C, Iso-CTS and WUDI-merging (compress.merge.subspace): hand-computed cases, and the methods through
`compress merge` on tiny Llamas."""

import json

import pytest
import torch
from conftest import finetune_like, run_cli, save_llama

from compress.errors import CompressError
from compress.io import open_checkpoint
from compress.merge.subspace import iso_c, iso_cts, polar, subspace_merge, tsv_m, wudi, wudi_objective


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_iso_c_on_a_2x2_sum_has_equal_singular_values_at_their_mean():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    s_sum = torch.linalg.svdvals(a + b)
    out = iso_c(torch.stack([a, b]))
    s = torch.linalg.svdvals(out)
    assert s_sum[0] > s_sum[1] + 1  # an anisotropic sum ...
    torch.testing.assert_close(s, torch.full((2,), float(s_sum.mean()), dtype=torch.float64))  # ... made flat
    # and the sum's singular vectors: out = U (mean S) Vᵀ
    u, _, vh = torch.linalg.svd(a + b)
    torch.testing.assert_close(out, s_sum.mean() * u @ vh)


def test_tsv_with_orthogonal_task_matrices_is_their_sum():
    e = torch.eye(4, dtype=torch.float64)
    t1 = 3 * torch.outer(e[0], e[1]) + torch.outer(e[1], e[0])  # rank 2, columns e0 e1, rows e1 e0
    t2 = 2 * torch.outer(e[2], e[3]) + 0.5 * torch.outer(e[3], e[2])  # rank 2 in the other two directions
    torch.testing.assert_close(tsv_m(torch.stack([t1, t2])), t1 + t2)


def test_tsv_truncates_each_task_to_its_share_and_decorrelates():
    deltas = _randn(3, 12, 9)
    out = tsv_m(deltas)  # k = ⌊9 / 3⌋ = 3 per task, 9 directions in all
    assert out.shape == (12, 9)
    s = torch.linalg.svdvals(out)
    # the concatenated spectrum survives because the bases are orthogonalised, not re-summed
    kept = torch.linalg.svdvals(deltas)[:, :3].reshape(-1).sort(descending=True).values
    assert torch.allclose(s.sort(descending=True).values.sum(), kept.sum(), rtol=0.2)
    with pytest.raises(CompressError, match="rank"):
        tsv_m(deltas, rank=1.5)
    # a rank-1 truncation of one task is its top singular triplet
    u, sv, vh = torch.linalg.svd(deltas[0])
    torch.testing.assert_close(tsv_m(deltas[:1], rank=1 / 9), sv[0] * torch.outer(u[:, 0], vh[0]))


def test_polar_is_orthonormal_and_fixes_orthonormal_input():
    q = polar(_randn(7, 3))
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(polar(q), q)


def test_iso_cts_is_isotropic_keeps_task_directions_and_common_one_is_iso_c():
    deltas = _randn(2, 10, 8, seed=3)
    deltas[1] *= 0.05  # a weak task, drowned in the sum
    torch.testing.assert_close(iso_cts(deltas, common=1.0), iso_c(deltas))
    out = iso_cts(deltas, common=0.5)  # 4 common + 2 per task
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, torch.full_like(s, float(s[0])), rtol=1e-6, atol=1e-9)
    # the weak task's top direction outside the common subspace is in the merge's column space
    u, _, _ = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    uc = u[:, :4]
    resid = deltas[1] - uc @ (uc.T @ deltas[1])
    top = torch.linalg.svd(resid, full_matrices=False)[0][:, 0]
    q = torch.linalg.svd(out, full_matrices=False)[0]
    assert float((q.T @ top).norm()) > 0.99
    with pytest.raises(CompressError, match="common"):
        iso_cts(deltas, common=0.0)


def test_wudi_objective_decreases_and_one_task_is_its_own_minimiser():
    deltas = _randn(3, 16, 6, seed=1).float()
    seen = []
    out = wudi(deltas, steps=200, lr=1e-2, history=seen)
    assert seen[-1] < 0.5 * seen[0]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(seen[20:], seen[21:]))  # settles into a steady descent
    assert out.shape == (16, 6) and not out.requires_grad
    # the closed-form gradient is autograd's: the same Adam steps on the objective itself land at the same place
    ref = deltas.sum(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        wudi_objective(ref, deltas).backward()
        opt.step()
    torch.testing.assert_close(wudi(deltas, steps=10, lr=1e-2), ref.detach(), atol=1e-5, rtol=1e-4)
    # the Gram form (out > in) and the direct form agree
    grams = torch.bmm(deltas.transpose(1, 2), deltas)
    torch.testing.assert_close(wudi_objective(out, deltas, grams), wudi_objective(out, deltas), rtol=1e-4, atol=1e-6)
    # one task: from anywhere the descent goes to τ (a full-rank square τ makes the minimiser unique; a well
    # conditioned one makes the descent quick)
    q = torch.linalg.qr(_randn(5, 5, seed=2))[0]
    tau = (q * torch.tensor([1.0, 1.2, 1.4, 1.6, 2.0], dtype=q.dtype)).float().unsqueeze(0)
    got = wudi(tau, steps=600, lr=2e-2, init=torch.zeros(5, 5))
    torch.testing.assert_close(got, tau[0], atol=5e-3, rtol=0)
    # and from the task-arithmetic sum it is already there
    torch.testing.assert_close(wudi(tau, steps=50), tau[0])


def test_subspace_merge_averages_non_matrices_and_lookups_and_scales():
    d2 = _randn(2, 6, 4)
    d1 = _randn(2, 6)
    torch.testing.assert_close(subspace_merge("iso_c", "layers.0.mlp.up_proj.weight", d2, lam=2.0), 2 * iso_c(d2))
    torch.testing.assert_close(subspace_merge("tsv", "layers.0.input_layernorm.weight", d1), d1.mean(0))
    torch.testing.assert_close(subspace_merge("tsv", "model.embed_tokens.weight", d2), d2.mean(0))
    torch.testing.assert_close(subspace_merge("tsv", "model.embed_tokens.weight", d2, embeddings="matrix"),
                               tsv_m(d2))
    torch.testing.assert_close(subspace_merge("iso_c", "x.weight", d2, [1.0, 0.5]),
                               iso_c(d2 * torch.tensor([1.0, 0.5], dtype=d2.dtype).reshape(2, 1, 1)))
    with pytest.raises(CompressError, match="unknown subspace merge"):
        subspace_merge("nope", "x", d2)


@pytest.fixture(scope="module")
def three_llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("sub")
    base = save_llama(root / "base", seed=0)
    return root, base, [finetune_like(base, root / f"ft{i}", seed=i + 1) for i in range(2)]


@pytest.mark.parametrize("method,params", [("tsv", {}), ("iso_c", {}), ("iso_cts", {"common": 0.5}),
                                           ("wudi", {"steps": 20, "lr": 1e-4})])
def test_each_method_through_compress_merge_matches_the_pure_function(three_llamas, method, params):
    root, base, models = three_llamas
    out = root / f"out-{method}"
    flags = [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    code, _, err = run_cli("merge", "--base", base, "--models", *models, "--method", method, "--lambda", "0.7",
                           *flags, "--out", out)
    assert code == 0, err
    b, fts = open_checkpoint(base), [open_checkpoint(m) for m in models]
    name = "model.layers.0.mlp.down_proj.weight"
    deltas = torch.stack([f.get(name).float() - b.get(name).float() for f in fts])
    want = b.get(name).float() + subspace_merge(method, name, deltas, lam=0.7, **params)
    torch.testing.assert_close(open_checkpoint(out).get(name), want, atol=1e-6, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert method in card


def test_a_bad_parameter_is_one_line_naming_it(three_llamas, tmp_path):
    root, base, models = three_llamas
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"method": "tsv", "base": str(base), "models": [{"model": str(m)} for m in models],
                                  "parameters": {"rank": 2.0}, "out": str(tmp_path / "o")}))
    code, _, err = run_cli("merge", recipe)
    assert code == 2 and "rank" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_shipped_recipes_load(tmp_path):
    from pathlib import Path

    from compress.merge import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes" / "merge"
    cfg = load_recipe(root / "subspace.yml")
    assert cfg.method == "iso_cts" and cfg.parameters["common"] == 0.8
    ada = load_recipe(root / "adamerging.yml")
    assert ada.method == "adamerging" and ada.granularity == "layer" and ada.parameters["steps"] == 50


def test_variant_mergekit_keeps_float32_for_the_subspace_merges(llama_pair_bf16, tmp_path):
    # mergekit's "merge in the inputs' dtype" is for mergekit's methods; TSV's SVD stays in float32 on bf16 inputs
    base, ft = llama_pair_bf16
    code, _, err = run_cli("merge", "--base", base, "--models", ft, "--method", "tsv", "--variant", "mergekit",
                           "--out", tmp_path / "o")
    assert code == 0, err
    name = "model.layers.0.mlp.down_proj.weight"
    b, f = open_checkpoint(base), open_checkpoint(ft)
    want = b.get(name).float() + subspace_merge("tsv", name, (f.get(name).float() - b.get(name).float())[None])
    got = open_checkpoint(tmp_path / "o").get(name)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
