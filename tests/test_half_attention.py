"""compress.runtime.half_attention: float32 attention computed in float16 where asked, float32 where not safe."""

import torch
import torch.nn.functional as F

from compress.runtime import HALF_ATTENTION_BOUND, half_attention


def _qkv(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 32, 16, generator=g) * scale for _ in range(3)]


def test_float32_attention_runs_in_float16_on_the_devices_named():
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with half_attention(("cpu",)):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # the float16 kernel ran
    exact = F.scaled_dot_product_attention(q.half(), k.half(), v.half(), is_causal=True).float()
    assert torch.equal(out, exact)
    assert (out - ref).abs().max() < 5e-3


def test_other_devices_and_large_inputs_keep_the_float32_kernel():
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with half_attention():  # CUDA only by default
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref)
    big = [t.clone() for t in (q, k, v)]
    big[1][0, 0, 0, 0] = HALF_ATTENTION_BOUND  # one key entry at the bound: float16 could overflow
    ref_big = F.scaled_dot_product_attention(*big, is_causal=True)
    with half_attention(("cpu",)):
        assert torch.equal(F.scaled_dot_product_attention(*big, is_causal=True), ref_big)
        bf = [t.bfloat16() for t in (q, k, v)]  # not float32: left alone
        assert torch.equal(F.scaled_dot_product_attention(*bf, is_causal=True),
                           torch.nn.functional.scaled_dot_product_attention(*bf, is_causal=True))


def test_a_float32_additive_mask_with_its_lowest_value_stays_finite():
    q, k, v = _qkv(seed=1)
    mask = torch.zeros(32, 32)
    mask[:, 20:] = torch.finfo(torch.float32).min  # what transformers writes for masked positions
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    padded = mask.clone()
    padded[5] = torch.finfo(torch.float32).min  # a row with every key masked (padding): float32 makes it uniform
    ref_padded = F.scaled_dot_product_attention(q, k, v, attn_mask=padded)
    with half_attention(("cpu",)):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        positional = F.scaled_dot_product_attention(q, k, v, mask)
        dropout_too = F.scaled_dot_product_attention(q, k, v, mask, 0.0)  # attn_mask and dropout_p by position
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=padded), ref_padded)
    assert torch.isfinite(out).all()
    assert torch.equal(out, positional) and torch.equal(out, dropout_too)
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 5e-3
