import math

import pytest
import torch
from torch.testing import assert_close

from lmforge.nn import KVCache, RotaryPositions, SelfAttention, build_mask, causal_mask, reference_attention, sdpa
from lmforge.nn.position import apply_rope, sinusoidal_table


def _qkv(B=2, H=4, Hkv=4, T=7, S=7, Dh=8):
    return torch.randn(B, H, T, Dh), torch.randn(B, Hkv, S, Dh), torch.randn(B, Hkv, S, Dh)


def test_reference_is_the_formula():
    q, k, v = _qkv()
    out, w = reference_attention(q, k, v)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert_close(w, by_hand)
    assert_close(out, by_hand @ v)
    assert_close(w.sum(-1), torch.ones(2, 4, 7))


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_sdpa_equals_reference(Hkv):
    q, k, v = _qkv(Hkv=Hkv)
    assert_close(sdpa(q, k, v), reference_attention(q, k, v)[0], atol=1e-5, rtol=1e-5)
    assert_close(sdpa(q, k, v, is_causal=True), reference_attention(q, k, v, is_causal=True)[0], atol=1e-5,
                 rtol=1e-5)
    pad = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    mask = build_mask(7, 7, causal=True, key_padding=pad)
    assert_close(sdpa(q, k, v, mask), reference_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)


def test_causal_reference_weights_are_lower_triangular():
    q, k, v = _qkv()
    _, w = reference_attention(q, k, v, is_causal=True)
    assert torch.all(w.triu(diagonal=1) == 0)


def test_build_mask_semantics():
    assert build_mask(4, 4, causal=False) is None
    m = build_mask(3, 3, causal=True)
    assert m.shape == (1, 1, 3, 3) and torch.equal(m[0, 0], causal_mask(3))
    pad = torch.tensor([[0, 1, 1]])  # left padding
    m = build_mask(3, 3, causal=True, key_padding=pad)[0, 0]
    # a padded query still sees itself (no all -inf row); real queries never see the pad key
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # decoding: 1 query at cache slot 2 of a 5-slot cache sees slots 0..2 only
    m = build_mask(1, 5, causal=True, query_pos=torch.tensor([2]))[0, 0]
    assert m.tolist() == [[True, True, True, False, False]]


def test_rope_scores_depend_only_on_distance():
    rope = RotaryPositions(64, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        qi = apply_rope(q, *rope(torch.tensor([[i]])))
        kj = apply_rope(k, *rope(torch.tensor([[j]])))
        return (qi * kj).sum()

    assert_close(score(5, 2), score(40, 37), atol=1e-4, rtol=1e-4)
    assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)  # position 0: no rotation
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_sinusoidal_table_matches_the_paper():
    pe = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert_close(pe[pos, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 * i / 16))))
    assert_close(pe[pos, 2 * i + 1], torch.tensor(math.cos(pos / 10000 ** (2 * i / 16))))


def test_kv_cache_decode_equals_full_attention():
    torch.manual_seed(0)
    attn = SelfAttention(32, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(2, 6, 32)
    full = attn(x, is_causal=True)
    cache = KVCache(2, 2, 10, 8)
    pos = torch.arange(4)
    out = [attn(x[:, :4], build_mask(4, 10, causal=True, query_pos=pos), cache=cache, cache_pos=pos)]
    for t in (4, 5):
        p = torch.tensor([t])
        out.append(attn(x[:, t:t + 1], build_mask(1, 10, causal=True, query_pos=p), cache=cache, cache_pos=p))
    assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def test_reference_switch_records_weights():
    attn = SelfAttention(32, n_heads=4).eval()
    x = torch.randn(1, 5, 32)
    fast = attn(x, is_causal=True)
    attn.use_reference = True
    slow = attn(x, is_causal=True)
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert attn.last_weights.shape == (1, 4, 5, 5)
