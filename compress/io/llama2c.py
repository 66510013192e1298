"""Convert a llama2.c checkpoint (Karpathy's legacy ``export`` format) and its ``tokenizer.bin`` into a Hugging Face
``LlamaForCausalLM`` folder.

Checkpoint layout (llama2.c ``run.c``, ``read_checkpoint``/``memory_map_weights``, version 0 / legacy): seven int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len; a negative vocab_size means the classifier
is not shared with the embedding), then fp32 arrays: token_embedding_table, rms_att_weight, wq, wk, wv, wo,
rms_ffn_weight, w1, w2, w3, rms_final_weight, freq_cis_real, freq_cis_imag, [wcls]. Every matrix is (out, in),
the layout ``nn.Linear`` uses.

Weights follow ``transformers``' ``convert_llama_weights_to_hf.py``: llama2.c rotates interleaved pairs
(q[2i], q[2i+1]) while HF rotates halves (q[i], q[i + head_dim/2]), so the rows of wq and wk are permuted per
head; values and outputs are unchanged.

Tokenizer layout (``run.c`` ``build_tokenizer``): int32 max_token_length, then per piece float32 score, int32
length, UTF-8 bytes. It is rebuilt as a sentencepiece-style BPE (``tokenizers``; the pipeline of transformers'
legacy Llama ``tokenizer.json``) that reproduces ``run.c``'s ``encode``: a dummy '▁' prefix, spaces as '▁',
code points missing from the vocabulary as ``<0xXX>`` byte pieces, then repeated merging of the adjacent pair
whose merged piece has the highest score. Special pieces written in the text stay text, as in run.c.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.io.writer import check_output, write_folder

_HEADER = struct.Struct("<7i")
_MAGIC_V1 = 0x616B3432  # "ak42": the newer llama2.c export versions, which this reader does not handle
ROPE_THETA = 10000.0  # hard-coded in run.c
RMS_EPS = 1e-5  # hard-coded in run.c's rmsnorm


def read_llama2c_header(path: str | os.PathLike) -> dict:
    """The hyper-parameters of a legacy llama2.c checkpoint, checked against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise CompressError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < _HEADER.size:
        raise CompressError(f"{path}: not a llama2.c checkpoint (shorter than its 28-byte header)")
    if struct.unpack("<I", head[:4])[0] == _MAGIC_V1:
        raise CompressError(f"{path}: llama2.c export version 1/2 (magic 'ak42'); re-export it with "
                            "`export.py --version 0` (legacy format)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = _HEADER.unpack(head)
    shared = vocab > 0
    vocab = abs(vocab)
    sane = (0 < dim <= 65536 and 0 < hidden <= 262144 and 0 < n_layers <= 1024 and 0 < n_heads <= dim
            and 0 < n_kv <= n_heads and n_heads % n_kv == 0 and dim % n_heads == 0
            and (dim // n_heads) % 2 == 0 and 0 < vocab <= 10**7 and 0 < seq <= 10**7)
    if not sane:
        raise CompressError(f"{path}: not a llama2.c checkpoint (implausible header "
                            f"{(dim, hidden, n_layers, n_heads, n_kv, vocab, seq)})")
    cfg = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
               vocab_size=vocab, max_seq_len=seq, shared_classifier=shared)
    expected = _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in _layout(cfg))
    if size != expected:
        raise CompressError(f"{path}: not a legacy llama2.c checkpoint: header {tuple(cfg.values())} needs "
                            f"{expected} bytes, the file has {size}")
    return cfg


def _layout(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The fp32 arrays of the file, in order (run.c ``memory_map_weights``)."""
    d, h, L, hs = c["dim"], c["hidden_dim"], c["n_layers"], c["dim"] // c["n_heads"]
    kv = c["n_kv_heads"] * hs
    arrays = [("tok", (c["vocab_size"], d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
              ("wv", (L, kv, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
              ("w3", (L, h, d)), ("rms_final", (d,)), ("freq_real", (c["max_seq_len"], hs // 2)),
              ("freq_imag", (c["max_seq_len"], hs // 2))]
    if not c["shared_classifier"]:
        arrays.append(("wcls", (c["vocab_size"], d)))
    return arrays


def _permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from interleaved-pair order to rotate-half order (convert_llama_weights_to_hf ``permute``)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _hf_tensors(arrays: dict[str, np.ndarray], c: dict):
    """(HF name, tensor) pairs, one at a time."""
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731 (copy out of the memmap)
    yield "model.embed_tokens.weight", t(arrays["tok"])
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", t(arrays["rms_att"][i])
        yield p + "self_attn.q_proj.weight", _permute_rope(t(arrays["wq"][i]), c["n_heads"])
        yield p + "self_attn.k_proj.weight", _permute_rope(t(arrays["wk"][i]), c["n_kv_heads"])
        yield p + "self_attn.v_proj.weight", t(arrays["wv"][i])
        yield p + "self_attn.o_proj.weight", t(arrays["wo"][i])
        yield p + "post_attention_layernorm.weight", t(arrays["rms_ffn"][i])
        yield p + "mlp.gate_proj.weight", t(arrays["w1"][i])
        yield p + "mlp.down_proj.weight", t(arrays["w2"][i])
        yield p + "mlp.up_proj.weight", t(arrays["w3"][i])
    yield "model.norm.weight", t(arrays["rms_final"])
    if not c["shared_classifier"]:
        yield "lm_head.weight", t(arrays["wcls"])


def _check_rope_table(arrays: dict[str, np.ndarray], c: dict, path: Path) -> None:
    # The legacy file stores the rotary table; HF recomputes it from rope_theta, so a model exported with another
    # theta would convert silently wrong unless we check.
    hs = c["dim"] // c["n_heads"]
    n = min(c["max_seq_len"], 64)
    freqs = 1.0 / ROPE_THETA ** (np.arange(0, hs, 2) / hs)
    angles = np.arange(n)[:, None] * freqs[None, :]
    if not (np.allclose(arrays["freq_real"][:n], np.cos(angles), atol=1e-4)
            and np.allclose(arrays["freq_imag"][:n], np.sin(angles), atol=1e-4)):
        raise CompressError(f"{path}: rotary table does not match rope theta {ROPE_THETA:g} used by llama2.c")


def read_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int) -> tuple[list[str], list[float]]:
    """Pieces (with ' ' as sentencepiece's '▁', special pieces named as in sentencepiece) and scores."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompressError(f"{path}: cannot read ({e.strerror})") from None
    pieces, scores, pos = [], [], 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, pos)
            if n < 0 or pos + 8 + n > len(data):
                raise struct.error
            pieces.append(data[pos + 8:pos + 8 + n].decode("utf-8"))
            scores.append(score)
            pos += 8 + n
    except (struct.error, UnicodeDecodeError):
        raise CompressError(f"{path}: not a llama2.c tokenizer with {vocab_size} pieces (as the model needs)") \
            from None
    if pos != len(data):
        raise CompressError(f"{path}: tokenizer has more than the model's {vocab_size} pieces")
    # llama2.c's exporter wrote '\n<s>\n' and '\n</s>\n' for readability when printing; restore the real names.
    pieces[:3] = ["<unk>", "<s>", "</s>"]
    if any(pieces[3 + b] != f"<0x{b:02X}>" for b in range(256)):
        raise CompressError(f"{path}: pieces 3..258 are not the byte pieces <0x00>..<0xFF> llama2.c expects")
    return [p.replace(" ", "▁") if i > 258 else p for i, p in enumerate(pieces)], scores


def build_tokenizer(pieces: list[str], scores: list[float], max_length: int | None = None):
    """A fast tokenizer equivalent to run.c's encode/decode for this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(pieces)}
    # run.c merges the adjacent pair whose concatenation is the best-scoring piece, so every way of splitting a
    # piece into two pieces is a merge ranked by that piece's score (what transformers' SentencePieceExtractor
    # does for sentencepiece BPE models).
    merges = []
    for i, p in enumerate(pieces[259:], start=259):
        for k in range(1, len(p)):
            if p[:k] in vocab and p[k:] in vocab:
                merges.append((-scores[i], i, (p[:k], p[k:])))
    merges = [m for *_, m in sorted(merges)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # A normalizer rather than transformers' Metaspace pre-tokenizer: Metaspace skips the dummy prefix when the
    # text already starts with a space, run.c (and sentencepiece) always add it. No splitting into words.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces[:3]])
    # split_special_tokens: '<unk>' written in a text (WikiText and PTB are full of it) is text, as for run.c and
    # sentencepiece, not the unknown-token id. BOS is prepended by the post-processor stored in tokenizer.json
    # (transformers 5 treats that, not tokenizer_config's add_bos_token, as the source of truth when reloading).
    # The generic class, not LlamaTokenizer: transformers 5 rebuilds LlamaTokenizer's pipeline from its own
    # defaults on load, which would drop the normalizer above; the generic class loads tokenizer.json as written.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   add_bos_token=True, add_eos_token=False, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False, split_special_tokens=True)


def save_tokenizer(pieces: list[str], scores: list[float], folder: Path, max_length: int | None = None) -> None:
    """Write the tokenizer files of ``build_tokenizer`` into ``folder``, loadable by transformers 4 and 5."""
    build_tokenizer(pieces, scores, max_length).save_pretrained(folder)
    # transformers 5 names the class TokenizersBackend, which transformers 4 cannot resolve; both resolve the
    # older alias to the class that loads tokenizer.json verbatim.
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))


def llama_config(c: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["dim"], intermediate_size=c["hidden_dim"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
        head_dim=c["dim"] // c["n_heads"], max_position_embeddings=c["max_seq_len"], rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA, hidden_act="silu", tie_word_embeddings=c["shared_classifier"],
        bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], dtype="float32")


def convert_llama2c(model_bin: str | os.PathLike, tokenizer_bin: str | os.PathLike, out_dir: str | os.PathLike,
                    overwrite: bool = False) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` folder (config, generation config, model.safetensors, tokenizer)
    converted from a llama2.c checkpoint and tokenizer; returns the folder. Atomic: nothing appears at
    ``out_dir`` unless the whole conversion succeeds."""
    from transformers import GenerationConfig

    model_bin, tokenizer_bin = Path(model_bin), Path(tokenizer_bin)
    check_output(out_dir, overwrite, (model_bin, tokenizer_bin))
    c = read_llama2c_header(model_bin)
    pieces, scores = read_llama2c_tokenizer(tokenizer_bin, c["vocab_size"])
    raw = np.memmap(model_bin, dtype="<f4", mode="r", offset=_HEADER.size)
    arrays, pos = {}, 0
    for name, shape in _layout(c):
        n = int(np.prod(shape))
        arrays[name] = raw[pos:pos + n].reshape(shape)
        pos += n
    _check_rope_table(arrays, c, model_bin)

    def tensors():
        for name, tensor in _hf_tensors(arrays, c):
            if not bool(torch.isfinite(tensor).all()):
                raise CompressError(f"{model_bin}: weights for '{name}' contain NaN or Inf")
            yield name, tensor

    def finish(tmp: Path) -> None:
        llama_config(c).save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        save_tokenizer(pieces, scores, tmp, c["max_seq_len"])

    n_tensors = 3 + 9 * c["n_layers"] - bool(c["shared_classifier"])
    write_folder(out_dir, tensors(), overwrite=overwrite, expected_tensors=n_tensors,
                 metadata={"source": "llama2.c"}, finish=finish)
    del raw
    return Path(out_dir)
