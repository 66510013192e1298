"""llama2.c stories260K -> Hugging Face Llama: logits, greedy text and token ids against readable re-implementations
of llama2.c's run.c (forward, encode, decode) written here from the C source, not from the converter."""

import json
import struct

import numpy as np
import pytest
import torch

from compress.data import stories260k_files
from compress.errors import CompressError
from compress.io.llama2c import convert_llama2c

BIN, TOK = stories260k_files()


# ---------------------------------------------------------------- run.c, re-implemented in numpy (float64)

def load_llama2c(path):
    """run.c read_checkpoint + memory_map_weights (legacy export)."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, dtype=np.int32, count=7).tolist()
    flat = np.fromfile(path, dtype=np.float32, offset=28).astype(np.float64)
    hs = dim // n_heads
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos:pos + n].reshape(shape)
        pos += n
        return out

    w = dict(tok=take(abs(vocab), dim), rms_att=take(n_layers, dim), wq=take(n_layers, dim, dim),
             wk=take(n_layers, n_kv * hs, dim), wv=take(n_layers, n_kv * hs, dim), wo=take(n_layers, dim, dim),
             rms_ffn=take(n_layers, dim), w1=take(n_layers, hidden, dim), w2=take(n_layers, dim, hidden),
             w3=take(n_layers, hidden, dim), rms_final=take(dim))
    take(seq_len, hs // 2)  # freq_cis_real
    take(seq_len, hs // 2)  # freq_cis_imag
    w["wcls"] = w["tok"] if vocab > 0 else take(abs(vocab), dim)
    assert pos == flat.size
    cfg = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, hs=hs)
    return cfg, w


def rmsnorm(x, weight):
    return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))


def rope(vec, pos, hs):
    """run.c: rotate each consecutive pair (v[i], v[i+1]) by pos * 10000^(-(i % hs) / hs)."""
    out = vec.copy()
    for i in range(0, len(vec), 2):
        angle = pos * 10000.0 ** (-(i % hs) / hs)
        c, s = np.cos(angle), np.sin(angle)
        out[i], out[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
    return out


def llama2c_forward(cfg, w, token, pos, cache):
    """run.c forward(): one token at position ``pos``; ``cache`` holds per-layer lists of keys and values."""
    hs, kv_mul = cfg["hs"], cfg["n_heads"] // cfg["n_kv"]
    x = w["tok"][token].copy()
    for l in range(cfg["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][l])
        q = rope(w["wq"][l] @ xb, pos, hs)
        k = rope(w["wk"][l] @ xb, pos, hs)
        cache[l][0].append(k)
        cache[l][1].append(w["wv"][l] @ xb)
        heads = []
        for h in range(cfg["n_heads"]):
            g = h // kv_mul  # the key/value head this query head shares
            qh = q[h * hs:(h + 1) * hs]
            keys = np.stack([kt[g * hs:(g + 1) * hs] for kt in cache[l][0]])
            values = np.stack([vt[g * hs:(g + 1) * hs] for vt in cache[l][1]])
            att = keys @ qh / np.sqrt(hs)
            att = np.exp(att - att.max())
            heads.append((att / att.sum()) @ values)
        x = x + w["wo"][l] @ np.concatenate(heads)
        xb = rmsnorm(x, w["rms_ffn"][l])
        gate = w["w1"][l] @ xb
        x = x + w["w2"][l] @ (gate / (1 + np.exp(-gate)) * (w["w3"][l] @ xb))
    return w["wcls"] @ rmsnorm(x, w["rms_final"])


def llama2c_logits(cfg, w, tokens):
    cache = [([], []) for _ in range(cfg["n_layers"])]
    return np.stack([llama2c_forward(cfg, w, t, p, cache) for p, t in enumerate(tokens)])


def load_llama2c_tokenizer(path, vocab_size=512):
    """run.c build_tokenizer: pieces as raw bytes (spaces as b' ') and scores."""
    data = open(path, "rb").read()
    pieces, scores, pos = [], [], 4
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return pieces, scores


def llama2c_encode(pieces, scores, text, bos=True):
    """run.c encode(): BOS, dummy ' ' prefix, code points (or their bytes + 3), then merge the best pair until none."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        tokens += [lookup[b]] if b in lookup else [byte + 3 for byte in b]
    while True:
        best_score, best_id, best_idx = -1e10, None, None
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and scores[j] > best_score:
                best_score, best_id, best_idx = scores[j], j, i
        if best_idx is None:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


def llama2c_decode(pieces, tokens):
    """run.c decode() over a sequence: drop the space after BOS, byte pieces '<0xXX>' become the raw byte."""
    out, prev = b"", None
    for t in tokens:
        piece = pieces[t]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if 3 <= t <= 258:
            piece = bytes([t - 3])
        if t not in (1, 2):
            out += piece
        prev = t
    return out.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return convert_llama2c(BIN, TOK, tmp_path_factory.mktemp("conv") / "stories260K")


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ref():
    return load_llama2c(BIN)


@pytest.fixture(scope="module")
def ref_tok():
    return load_llama2c_tokenizer(TOK)


# ---------------------------------------------------------------- tests

def test_config_and_files(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 172, 5)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 8)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (512, 512)
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["dtype"] == "float32"
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    from safetensors import safe_open

    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert len(names) == 2 + 9 * 5 and "lm_head.weight" not in names  # tied: stored once, as the embedding
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_logits_match_llama2c_forward(hf, ref):
    model, _ = hf
    torch.manual_seed(0)
    tokens = [1] + torch.randint(3, 512, (11,)).tolist()
    expected = llama2c_logits(*ref, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double().numpy()
    assert np.abs(expected).max() > 1.0  # the comparison below is not between two near-zero arrays
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_tied_classifier(hf):
    model, _ = hf
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom's dog said: \"Let's play!\" and ran to the park.",
    "  two  spaces,\ttab\nnew line ",
    " leading space",
    "Héllo wörld — café ™ 🙂 日本",
    "",
]


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_matches_llama2c_encode(hf, ref_tok, text):
    _, tok = hf
    expected = llama2c_encode(*ref_tok, text)
    assert tok(text)["input_ids"] == expected
    assert tok.decode(expected, skip_special_tokens=True) == llama2c_decode(ref_tok[0], expected)


def test_tokenizer_matches_llama2c_encode_on_corpus_text(hf, ref_tok):
    from compress.data import corpus_path, read_text

    _, tok = hf
    text = read_text(corpus_path("shakespeare"))[:500] + read_text(corpus_path("wikitext2.valid"))[:300]
    expected = llama2c_encode(*ref_tok, text)
    assert tok(text)["input_ids"] == expected
    assert tok.decode(expected, skip_special_tokens=True) == text


def test_greedy_generation_matches_llama2c(hf, ref):
    model, tok = hf
    prompt = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)[0].tolist()
    # run.c with temperature 0: argmax, one token at a time with the KV cache
    cfg, w = ref
    cache = [([], []) for _ in range(cfg["n_layers"])]
    tokens = prompt[0].tolist()
    for pos in range(len(tokens) + 40 - 1):
        logits = llama2c_forward(cfg, w, tokens[pos], pos, cache)
        if pos + 1 >= len(tokens):
            tokens.append(int(np.argmax(logits)))
    assert out == tokens
    text = tok.decode(out, skip_special_tokens=True)
    print(f"\ngreedy: {text!r}")
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    assert text.startswith("Once upon a time") and text.isascii() and "<0x" not in text
    assert len(words & {"there", "was", "a", "the", "she", "he", "to", "and", "little", "girl", "named"}) >= 5


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CompressError, match="tok512.bin.*not a llama2.c checkpoint"):
        convert_llama2c(TOK, TOK, tmp_path / "out")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(BIN.read_bytes()[:-100])
    with pytest.raises(CompressError, match="truncated.bin.*needs 1056540 bytes"):
        convert_llama2c(truncated, TOK, tmp_path / "out")
    short_tok = tmp_path / "short_tok.bin"
    short_tok.write_bytes(TOK.read_bytes()[:3000])
    with pytest.raises(CompressError, match="short_tok.bin.*512 pieces"):
        convert_llama2c(BIN, short_tok, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short_tok.bin", "truncated.bin"]


def test_existing_output(hf_dir):
    with pytest.raises(CompressError, match="already exists"):
        convert_llama2c(BIN, TOK, hf_dir)
