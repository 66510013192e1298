"""Head protection: the protected slices of chosen heads come through pruning (magnitude, Wanda, SparseGPT) and
merging (TIES, DARE, magnitude) bit for bit, and the requested sparsity/density is still met exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import finetune_like, run_cli, save_llama

from compress.data import corpus_path, read_text
from compress.heads import attention_layout, head_protect
from compress.prune import Pruner
from compress.prune.methods import allot_zeros, split_counts

HEADS = [(0, 1), (1, 0), (1, 3)]  # block 1: both KV groups


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama (2 blocks, 4 heads, 2 KV heads) with stories260K's real tokenizer."""
    from compress.data import stories260k_files
    from compress.io.llama2c import convert_llama2c

    root = tmp_path_factory.mktemp("heads")
    stories = root / "stories"
    convert_llama2c(*stories260k_files(), stories)
    path = save_llama(root / "llama", seed=0, vocab_size=512)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories / f, path / f)
    calib = root / "calib.txt"
    calib.write_text(read_text(corpus_path("wikitext2.valid"))[:20000])
    return path


def _slices(layout, heads):
    """{tensor name: bool mask} of every protected entry, written out from the head geometry by hand."""
    d, g = layout.head_dim, layout.n_heads // layout.n_kv_heads
    out = {}
    for layer, h in heads:
        n = layout.layers[layer]
        for name, shape, rows, cols in ((n.q, (32, 32), (h * d, h * d + d), None),
                                        (n.k, (16, 32), (h // g * d, h // g * d + d), None),
                                        (n.v, (16, 32), (h // g * d, h // g * d + d), None),
                                        (n.o, (32, 32), None, (h * d, h * d + d))):
            m = out.setdefault(name, torch.zeros(shape, dtype=torch.bool))
            if rows:
                m[rows[0]:rows[1]] = True
            else:
                m[:, cols[0]:cols[1]] = True
    return out


def test_split_counts_and_allot():
    assert split_counts(7, torch.tensor([2, 2, 4])).tolist() == [2, 2, 3]  # 1.75, 1.75, 3.5: floors, then .75s
    assert split_counts(3, torch.tensor([0, 5, 1])).tolist() == [0, 3, 0]  # 2.5 → 3 (floors 2, 0; one more)
    # layer 0 can take only 4 of its 8 zeros (4 protected of 12): the other layer of its block takes 4 more;
    # the block total stays 8 + 6
    z = allot_zeros([12, 10, 10], [8, 0, 0], [0, 0, 1], [8 / 12, 0.6, 0.5])
    assert z == [(4, 0), (10, 0), (5, 0)]
    assert allot_zeros([10], [4], [0], [0.5], protect_sparsity=0.5) == [(3, 2)]
    # half of layer 0 protected at s = 0.5: the block's 100 zeros spread evenly over its 150 free entries
    # (33/50 and 67/100), instead of all 50 free entries of layer 0 being pruned
    assert allot_zeros([100, 100], [50, 0], [0, 0], [0.5, 0.5]) == [(33, 0), (67, 0)]
    with pytest.raises(Exception, match="fewer than"):
        allot_zeros([10], [8], [0], [0.5])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_protected_heads_bit_identical_and_sparsity_exact(tiny, tmp_path, method):
    p = Pruner(tiny, tiny.parent / "calib.txt", nsamples=4, seqlen=32, cache_dir=tmp_path / "c", quiet=True)
    layout = attention_layout(p.model)
    protect = head_protect(p.model, HEADS)
    plain = p.prune(0.6, method)
    prot = p.prune(0.6, method, protect=protect)
    masks = _slices(layout, HEADS)
    for name, m in masks.items():
        dense = p._dense[name]
        assert torch.equal(prot.weights[name][m], dense[m]), name  # bit for bit
        assert not torch.equal(plain.weights[name][m], dense[m])  # pruning would have touched them
    # the same zeros per block as unprotected pruning: the request is met over the pruned parameters
    assert p.layer_sparsity(prot) == p.layer_sparsity(plain)
    total = sum(prot.numel.values())
    assert total - sum(prot.kept.values()) == sum(round(n * 0.6) for n in prot.numel.values())
    # k_proj of block 1 holds both KV groups protected: nothing of it is pruned. In block 0 (one head of four
    # protected) the block's zeros spread evenly over its free entries: the other heads of q/k/v/o are pruned
    # like the MLP, not harder (before, k/v's free entries took 0.8 where the MLP took 0.6)
    k1 = layout.layers[1].k
    assert prot.kept[k1] == prot.numel[k1]
    rates = {}
    for m in p.modules:
        if m.block == 0:
            free = prot.numel[m.name] - (int(masks[m.name].sum()) if m.name in masks else 0)
            rates[m.name] = (prot.numel[m.name] - prot.kept[m.name]) / free
    assert max(rates.values()) - min(rates.values()) < 0.01, rates
    assert min(rates.values()) > 0.6 + 1e-3  # free entries take the protected entries' share of the zeros


def test_protect_sparsity_prunes_protected_slices(tiny, tmp_path):
    p = Pruner(tiny, tiny.parent / "calib.txt", nsamples=4, seqlen=32, cache_dir=tmp_path / "c", quiet=True)
    protect = head_protect(p.model, [(0, 1)], sparsity=0.25)
    r = p.prune(0.6, "wanda", protect=protect)
    for name, m in _slices(attention_layout(p.model), [(0, 1)]).items():
        assert int((r.weights[name][m] == 0).sum()) == round(int(m.sum()) * 0.25), name
    assert abs(r.sparsity - 0.6) < 1e-4


def test_cli_prune_protect_heads(tiny, tmp_path):
    from compress.heads.scorefile import save_scores

    layout = attention_layout(tiny)
    scores = torch.arange(layout.n_layers * layout.n_heads, dtype=torch.float32).reshape(layout.n_layers, -1)
    save_scores(tmp_path / "s.safetensors", scores, layout, {"method": "test"})
    code, out, err = run_cli("prune", tiny, "--sparsity", "0.5", "--calib", tiny.parent / "calib.txt",
                             "--nsamples", "4", "--seqlen", "32", "--cache-dir", tmp_path / "c",
                             "--protect-heads", tmp_path / "s.safetensors", "--protect-top", "0.25",
                             "--out", tmp_path / "pruned", "--quiet")
    assert code == 0, err
    from compress.io.reader import open_checkpoint

    ck, dense = open_checkpoint(tmp_path / "pruned"), open_checkpoint(tiny)
    # the top 25% of 8 heads by score: (1, 3) and (1, 2)
    for name, m in _slices(layout, [(1, 3), (1, 2)]).items():
        w = f"{name}.weight"
        assert torch.equal(ck.get(w)[m], dense.get(w)[m])
    assert "sparsity 0.5000" in out + err


@pytest.mark.parametrize("method,extra", [("ties", []), ("dare_ties", []), ("magnitude_prune", []),
                                          ("ties", ["--variant", "mergekit"])])
def test_merge_protected_slices_bit_identical(tmp_path, method, extra):
    """Protected entries skip step 1 (trim/drop/rescale): they equal the same merge at density 1."""
    base = save_llama(tmp_path / "base", seed=0)
    a = finetune_like(base, tmp_path / "a", seed=1)
    b = finetune_like(base, tmp_path / "b", seed=2)
    layout = attention_layout(base)
    protect = head_protect(base, HEADS)
    protect.save(tmp_path / "protect.json")
    args = ["merge", "--base", base, "--models", a, b, "--method", method, "--quiet", *extra]
    assert run_cli(*args, "--density", "0.2", "--protect", tmp_path / "protect.json", "--out", tmp_path / "p")[0] == 0
    assert run_cli(*args, "--density", "1.0", "--out", tmp_path / "d")[0] == 0
    assert run_cli(*args, "--density", "0.2", "--out", tmp_path / "n")[0] == 0
    from compress.io.reader import open_checkpoint

    P, D, N = (open_checkpoint(tmp_path / x) for x in "pdn")
    for name, m in _slices(layout, HEADS).items():
        w = f"{name}.weight"
        assert torch.equal(P.get(w)[m], D.get(w)[m]), name
        assert not torch.equal(N.get(w)[m], D.get(w)[m])


def test_merge_sparsify_counts_protected_entries_as_kept():
    from compress.merge.methods import sparsify_delta
    from compress.sparsify.masks import keep_count
    from compress.sparsify.topk import GlobalThreshold

    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 50, generator=g)
    prot = torch.zeros(40, 50, dtype=torch.bool)
    prot[:, 10:20] = True  # 400 protected, many of them small
    out = sparsify_delta(d, "magnitude", 0.3, protect=prot)
    assert int((out != 0).sum()) == keep_count(2000, 0.3, "floor")  # 600 = the 400 protected + the 200 largest free
    assert torch.equal(out[prot], d[prot])
    free_kept = out[~prot] != 0
    assert d[~prot].abs()[free_kept].min() >= d[~prot].abs()[~free_kept].max()
    # protect sparsity 0.5: the 200 largest protected entries, the 400 largest free ones
    out = sparsify_delta(d, "magnitude", 0.3, protect=prot, protect_sparsity=0.5)
    assert int((out[prot] != 0).sum()) == 200 and int((out[~prot] != 0).sum()) == 400
    # DARE: free entries kept with p' = (0.3·2000 − 400)/1600 and rescaled by 1/p'; protected untouched
    out = sparsify_delta(d, "random", 0.3, rescale="inverse_keep", protect=prot,
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[prot], d[prot])
    kept = out[~prot] != 0
    assert torch.allclose(out[~prot][kept], d[~prot][kept] / 0.125)
    assert abs(int(kept.sum()) - 200) < 45  # binomial(1600, 0.125): sd 13
    # global top-k: the threshold is the (⌊0.3·N⌋ − protected)-th largest free magnitude over two tensors
    t2 = torch.randn(30, 30, generator=g)
    gt = GlobalThreshold(0.3)
    for fn in (GlobalThreshold.add, GlobalThreshold.refine):
        fn(gt, d, prot, 400)
        fn(gt, t2)
    n_free = int(gt.mask(d, prot).sum()) + int(gt.mask(t2).sum())
    assert n_free == int(0.3 * 2900) - 400
