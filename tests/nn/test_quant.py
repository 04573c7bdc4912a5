"""Weight-only quantisation: the int8 / int4 layers compute what their dequantised weights
do, a tied embedding reads the head's table, and the quality guard: a model trained a
little on real text keeps its held-out perplexity within 1% (int8) and 0.3% (bf16)."""

import copy
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generate import generate
from lmforge.models import GPTConfig, build
from lmforge.nn.lora import apply_lora
from lmforge.nn.quant import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    compute_dtype,
    quantization_of,
    quantize,
)


def test_int8_per_channel_symmetric():
    lin = nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127  # the largest |w| of a row maps to 127
    torch.testing.assert_close(q.scale, w.abs().amax(1) / 127)
    # round-to-nearest: each weight within half a step of its channel's grid
    assert ((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 40])  # the kernel path (decoding) and the dequantised product (a prompt)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_its_dequantised_weight(rows, dtype):
    lin = nn.Linear(64, 48).to(dtype)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, rows, 64).to(dtype)
    want = F.linear(x.float(), q.dequantized(torch.float32), lin.bias.float())
    got = q(x)
    assert got.dtype == dtype and got.shape == (2, rows, 48)
    # bf16 activations on the kernel path (and in a bf16 model): bf16's 8 mantissa bits
    tol = 2e-5 if dtype == torch.float32 and rows * 2 > 16 else 3e-2
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=0)


def test_int4_groupwise_matches_its_dequantised_weight():
    lin = nn.Linear(64, 32, bias=False)
    q = Int4Linear.from_linear(lin, group_size=32)
    w = lin.weight.detach().view(32, 2, 32)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    deq = (((w - low) / step).round().clamp(0, 15) * step + low).view(32, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ deq.T, atol=1e-4, rtol=1e-4)
    assert (deq - lin.weight).abs().max() <= step.max() / 2 + 1e-6


def _model(**kw) -> nn.Module:
    return build(GPTConfig(vocab_size=256, max_seq_len=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           hidden_dim=128, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False,
                           vocab_multiple=64, **kw)).eval()


def test_quantize_replaces_every_linear_and_ties_the_embedding():
    model = quantize(_model(), "int8")
    assert quantization_of(model) == "int8"
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.tok_emb, Int8Embedding) and model.tok_emb.weight is model.lm_head.weight
    ids = torch.tensor([[3, 7, 250]])
    torch.testing.assert_close(model.tok_emb(ids)[0], model.lm_head.dequantized()[ids[0]])
    # one int8 table: the embedding adds no buffer of its own
    assert sum(b.numel() for b in model.buffers()) == sum(b.numel() for _, b in model.named_buffers())
    assert compute_dtype(model) == torch.float32
    assert compute_dtype(quantize(_model().bfloat16(), "int8")) == torch.bfloat16


def test_quantize_refuses_lora_and_unknown_kinds():
    model = _model()
    apply_lora(model, ["wqkv"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="merge LoRA"):
        quantize(model, "int8")
    with pytest.raises(ValueError, match="unknown kind 'int3'"):
        quantize(_model(), "int3")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cached_decoding_of_a_quantised_model_equals_recomputation(kind):
    """The decode path (kernel, few rows) and the prompt path (dequantised product) are the
    same function of the weights: greedy tokens from the KV cache equal argmax of a full forward."""
    model = quantize(_model(tie_embeddings=kind == "int8").bfloat16() if kind == "int4" else _model(), kind)
    ids = torch.randint(0, 256, (1, 5))
    out = generate(model, ids, max_new_tokens=6).tokens
    seq = ids
    with torch.inference_mode():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].float().argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])
    cache = model.make_cache(1, 8)
    assert cache[0].k.dtype == compute_dtype(model)


# ---- the quality guard: a model trained a little on real text ---------------------------------

def _shakespeare() -> torch.Tensor:
    text = resources.files("lmforge").joinpath("corpus/tinyshakespeare.txt").read_bytes()
    return torch.tensor(list(text[:300_000]), dtype=torch.long)  # bytes as tokens


def _perplexity(model: nn.Module, data: torch.Tensor, T: int = 64) -> float:
    rows = data[: (len(data) - 1) // T * T + 1]
    x, y = rows[:-1].view(-1, T), rows[1:].view(-1, T)
    with torch.inference_mode():
        logits = model(x).float()
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())


@pytest.fixture(scope="module")
def trained():
    """A 2-layer Llama-style byte model trained for 120 steps on Tiny Shakespeare (a few seconds)."""
    torch.manual_seed(0)
    data = _shakespeare()
    train, held_out = data[:-20_000], data[-20_000:]
    model = _model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(train) - 65, (16,), generator=g)
        batch = torch.stack([train[s: s + 65] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out


def test_quantised_perplexity_within_the_guard(trained):
    model, held_out = trained
    base = _perplexity(model, held_out)
    assert base < 16  # it learned something (bytes at random: 256; unigram frequencies: ~20)
    bf16 = _perplexity(copy.deepcopy(model).bfloat16(), held_out)
    int8 = _perplexity(quantize(copy.deepcopy(model), "int8"), held_out)
    int8_bf16 = _perplexity(quantize(copy.deepcopy(model).bfloat16(), "int8"), held_out)
    assert abs(bf16 / base - 1) < 0.003, (base, bf16)
    assert abs(int8 / base - 1) < 0.01, (base, int8)
    assert abs(int8_bf16 / base - 1) < 0.01, (base, int8_bf16)
