"""AdaMerging (compress.merge.adamerging): entropy minimisation lowers the merged model's entropy, never reads a
label, and runs through `compress merge` on tiny encoders with heads (real task rows) and on a tiny causal LM."""

import shutil

import pytest
import torch
from conftest import finetune_like, run_cli, tiny_stories_llama

from compress.config import MergeConfig, build
from compress.data import load_task, task_info
from compress.errors import CompressError
from compress.eval.classify import Head, load_encoder
from compress.io import open_checkpoint
from compress.merge.adamerging import (
    classifier_objective,
    entropy,
    learn_coefficients,
    unlabeled_batches,
)
from compress.merge.executor import Merger

TASKS = ("trec", "subj")


def test_entropy_of_uniform_and_certain_predictions():
    torch.testing.assert_close(entropy(torch.zeros(3, 4)), torch.log(torch.tensor(4.0)))
    assert float(entropy(torch.tensor([[50.0, 0.0, 0.0]]))) < 1e-6


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny BERT (MiniLM's real tokenizer) as base, and two 'fine-tuned' copies each with a task head."""
    from transformers import BertConfig, BertModel

    from compress.zoo.minilm import pretrained_dir

    root = tmp_path_factory.mktemp("ada")
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=64))
    folders = []
    for i, name in enumerate(("base", *TASKS)):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(pretrained_dir() / f, root / name / f)
        if i:
            labels = task_info(name)["labels"]
            g = torch.Generator().manual_seed(i)
            Head(torch.randn(len(labels), 32, generator=g), torch.zeros(len(labels)), name, labels,
                 max_length=32).save(root / name)
            folders.append(root / name)
    return root / "base", folders


def _deltas(base, folders):
    b, fts = open_checkpoint(base), [open_checkpoint(f) for f in folders]
    names = [n for n in b.names() if b.info(n).is_float]
    return ({n: b.get(n).float() for n in names},
            {n: torch.stack([f.get(n).float() - b.get(n).float() for f in fts]) for n in names})


def _objective(base, folders, rows):
    encoder, tok = load_encoder(base)
    for p in encoder.parameters():
        p.requires_grad_(False)
    heads = [Head.load(f) for f in folders]
    return classifier_objective(encoder, heads, [unlabeled_batches(tok, r, 32, 8, "cpu") for r in rows])


def test_entropy_goes_down_and_labels_are_never_read(encoders):
    base, folders = encoders
    texts = [[{"text": r["text"]} for r in load_task(t, "dev", 16)] for t in TASKS]  # no label column at all
    base_sd, deltas = _deltas(base, folders)
    res = learn_coefficients(base_sd, deltas, _objective(base, folders, texts), steps=15, lr=0.05)
    assert res.history[-1] < res.history[0] - 1e-3
    assert res.coefficients.shape == (2, len(deltas))  # layer-wise: one λ per task and tensor
    assert float(res.coefficients.min()) >= 0 and float(res.coefficients.max()) <= 1
    # the same rows with (any) labels give the same λ, bit for bit
    labelled = [[{**r, "label": 99} for r in t] for t in texts]
    again = learn_coefficients(base_sd, deltas, _objective(base, folders, labelled), steps=15, lr=0.05)
    assert torch.equal(again.coefficients, res.coefficients)
    task_wise = learn_coefficients(base_sd, deltas, _objective(base, folders, texts), granularity="task", steps=3)
    assert task_wise.coefficients.shape == (2, 1) and task_wise.weights(next(iter(deltas))) == \
        task_wise.coefficients[:, 0].tolist()
    with pytest.raises(CompressError, match="granularity"):
        learn_coefficients(base_sd, deltas, lambda p, s: torch.zeros(()), granularity="block")


def test_compress_merge_adamerging_writes_base_plus_learned_task_arithmetic(encoders, tmp_path):
    base, folders = encoders
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", "--base", base, "--models", *folders, "--method", "adamerging",
                           "--granularity", "task", "--param", "steps=4", "--out", out)
    assert code == 0, err
    cfg = build(MergeConfig, method="adamerging", base=base, models=[{"model": f} for f in folders],
                granularity="task", parameters={"steps": 4})
    merger = Merger(cfg)
    merger.prepare(quiet=True)
    lam = merger._ada.coefficients[:, 0]
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # it moved off the paper's initial 0.3
    base_sd, deltas = _deltas(base, folders)
    name = "encoder.layer.1.intermediate.dense.weight"
    want = base_sd[name] + (lam.reshape(2, 1, 1) * deltas[name]).sum(0)
    torch.testing.assert_close(open_checkpoint(out).get(name), want, atol=1e-6, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "entropy" in card and str(round(float(lam[0]), 4)) in card


def test_causal_lm_adapts_on_unlabeled_text_and_needs_it(tmp_path):
    base = tiny_stories_llama(tmp_path)
    models = [finetune_like(base, tmp_path / f"ft{i}", scale=0.05, seed=i + 1) for i in range(2)]
    for m in models:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / f, m / f)
    text = tmp_path / "sample.txt"
    text.write_text("Once upon a time there was a little girl who liked to play in the park with her dog. " * 40)
    code, _, err = run_cli("merge", "--base", base, "--models", *models, "--method", "adamerging", "--out",
                           tmp_path / "none")
    assert code == 2 and "--text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
    cfg = build(MergeConfig, method="adamerging", base=base, models=[{"model": m} for m in models], text=text,
                parameters={"steps": 10, "lr": 0.05})
    merger = Merger(cfg)
    merger.prepare(quiet=True)
    assert merger._ada.history[-1] < merger._ada.history[0]
    code, _, err = run_cli("merge", "--base", base, "--models", *models, "--method", "adamerging", "--text", text,
                           "--param", "steps=2", "--out", tmp_path / "out")
    assert code == 0, err and (tmp_path / "out" / "config.json").is_file()
