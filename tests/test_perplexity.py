"""Perplexity (non-overlapping windows) against a token-by-token reference, the data helpers, and the short
fine-tune, all on the real stories260K model converted from llama2.c."""

import copy
import gzip
import math

import pytest
import torch

from compress.data import corpus_path, data_dir, read_text, stories260k_files
from compress.errors import CompressError
from compress.eval import load_causal_lm, perplexity
from compress.finetune import finetune_causal_lm
from compress.io.llama2c import convert_llama2c

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
         "ball. One day, she saw a big dog. The dog was very friendly and wanted to play too. Lily and the dog "
         "played all day. When the sun went down, Lily went home and told her mom about her new friend. ")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    out = convert_llama2c(*stories260k_files(), tmp_path_factory.mktemp("ppl") / "stories260K")
    return load_causal_lm(out)


def reference_perplexity(model, tokenizer, text, seqlen, max_tokens):
    """GPTQ-style: consecutive seqlen windows, incomplete tail dropped, every next token scored one by one."""
    ids = tokenizer(text, verbose=False)["input_ids"][:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seqlen + 1, seqlen):
        window = ids[start:start + seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)
        for t in range(seqlen - 1):
            nll -= logp[t, window[t + 1]].item()
            count += 1
    return math.exp(nll / count)


def test_matches_reference_and_batching(lm):
    model, tok = lm
    text = read_text(corpus_path("shakespeare"))[:3000]
    expected = reference_perplexity(model, tok, text, seqlen=64, max_tokens=300)
    got = perplexity(model, tok, text, seqlen=64, max_tokens=300, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, tok, text, seqlen=64, max_tokens=300, batch_size=1) == pytest.approx(got, rel=1e-6)
    # 300 tokens = 4 windows of 64 + a tail of 44 that is dropped, so 256 tokens give the same number
    assert perplexity(model, tok, text, seqlen=64, max_tokens=256) == pytest.approx(got, rel=1e-6)
    assert perplexity(model, tok, text, seqlen=64, max_tokens=320) != pytest.approx(got, rel=1e-6)


def test_short_text_is_one_window(lm):
    model, tok = lm
    n = len(tok(STORY)["input_ids"])
    assert n < 256
    assert perplexity(model, tok, STORY, seqlen=256) == pytest.approx(
        reference_perplexity(model, tok, STORY, seqlen=n, max_tokens=n), rel=1e-6)
    with pytest.raises(CompressError, match="at least 2"):
        perplexity(model, tok, "", seqlen=256)


def test_path_input_and_domain(lm):
    model, tok = lm
    path = corpus_path("ptb.valid")
    ptb = perplexity(model, tok, path, seqlen=128, max_tokens=2048)
    assert ptb == perplexity(model, tok, str(path), seqlen=128, max_tokens=2048)
    assert ptb == perplexity(model, tok, read_text(path), seqlen=128, max_tokens=2048)
    story = perplexity(model, tok, STORY, seqlen=128)
    print(f"\nstories260K perplexity: story {story:.2f}, ptb.valid {ptb:.2f}")
    # a TinyStories model knows stories and not newswire: a broken conversion scores both near the vocab size
    assert story < 6 < 50 < ptb < 400
    assert model.training is False


def test_finetune_lowers_loss_and_heldout_perplexity(lm):
    model, tok = lm
    text = read_text(corpus_path("shakespeare"))
    train, heldout = text[:200_000], text[-20_000:]
    before = perplexity(model, tok, heldout, seqlen=64, max_tokens=2048)
    tuned = copy.deepcopy(model)
    losses = finetune_causal_lm(tuned, tok, train, steps=30, seqlen=64, batch_size=8, seed=0, progress=False)
    after = perplexity(tuned, tok, heldout, seqlen=64, max_tokens=2048)
    print(f"\nshakespeare held-out perplexity {before:.1f} -> {after:.1f} after 30 steps; "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert after < 0.7 * before
    # the batches come from the seeded generator, not global RNG state
    torch.manual_seed(123)
    again = finetune_causal_lm(copy.deepcopy(model), tok, train, steps=3, seqlen=64, batch_size=8, seed=0,
                               progress=False)
    other = finetune_causal_lm(copy.deepcopy(model), tok, train, steps=3, seqlen=64, batch_size=8, seed=1,
                               progress=False)
    assert again == losses[:3] and other[0] != losses[0]


def test_data_helpers(tmp_path, monkeypatch):
    assert (data_dir() / "corpus").is_dir()
    assert [p.name for p in stories260k_files()] == ["stories260K.bin", "tok512.bin"]
    assert read_text(corpus_path("wikitext2.valid")).startswith(" \n = Homarus gammarus = \n")
    (tmp_path / "corpus").mkdir()
    with gzip.open(tmp_path / "corpus" / "mine.txt.gz", "wt", encoding="utf-8") as f:
        f.write("héllo\n")
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path))
    assert data_dir() == tmp_path and read_text(corpus_path("mine")) == "héllo\n"
    with pytest.raises(CompressError, match="corpus 'nope' not found.*available: mine"):
        corpus_path("nope")
    with pytest.raises(CompressError, match="stories260K.bin: missing"):
        stories260k_files()
    monkeypatch.setenv("COMPRESS_DATA", str(tmp_path / "absent"))
    with pytest.raises(CompressError, match="COMPRESS_DATA=.*absent: not a folder"):
        data_dir()
    with pytest.raises(CompressError, match="not a Hugging Face model folder"):
        load_causal_lm(tmp_path)
