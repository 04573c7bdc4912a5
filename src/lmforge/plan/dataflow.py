"""The forward pass of each family, op by op, as `Walk` calls (see trace.py).

Each function mirrors the module it names — keep them in step with src/lmforge/nn/
and src/lmforge/models/ (the tests fail when they drift). The training objective is
the training engine's (lmforge.train.objectives, which `verify` runs): next-token
cross-entropy over every target position for GPT and encoder-decoder models through the
chunked `linear_cross_entropy` (`ce_chunk` rows per chunk; 0: plain cross-entropy over
all logits); for Bert, masked-LM cross-entropy on `mlm_rows` positions per sequence
plus next-sentence prediction on the pooled [CLS] vector.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.models.arch import Arch, Linear, Stack
from lmforge.plan.trace import FP32, INT64, Segment, Sym, Walk


@dataclass(frozen=True)
class Shape:
    """Token counts of one micro-batch: batch, (source) sequence length, target length
    (encoder-decoder), masked positions per sequence (Bert)."""

    batch: int
    seq_len: int
    target_len: int
    mlm_rows: int


def _lin(stack: Stack, name: str, where: str) -> Linear:
    return next(lin for lin in stack.linears() if lin.name == name and lin.where == where)


def self_attention(w: Walk, x: Sym, st: Stack, T: int, rope: Sym | None) -> Sym:
    """SelfAttention.forward: fused QKV, optional RoPE, SDPA (T5: with its position bias, kept
    once per stack by `position_bias`), output projection."""
    s, B = st.spec, w.o.batch
    H, Hkv, Dh = s.n_heads, s.n_kv_heads, s.head_dim
    qkv = w.linear(x, _lin(st, "wqkv", "attn"))
    q = Sym(B * T * H * Dh, qkv.itemsize, qkv.rg, base=qkv)  # views of the QKV output
    k = Sym(B * T * Hkv * Dh, qkv.itemsize, qkv.rg, base=qkv)
    v = Sym(B * T * Hkv * Dh, qkv.itemsize, qkv.rg, base=qkv)
    if rope is not None:
        q, k = w.rope(q, rope, T, Dh), w.rope(k, rope, T, Dh)
    y = w.sdpa(q, k, v, H, Hkv, Dh, T, T, s.attn_dropout, bias=st.position_bias and w.o.trainable_base)
    return w.linear(y, _lin(st, "wo", "attn"))


def cross_attention(w: Walk, x: Sym, memory: Sym, st: Stack, T: int, S: int) -> Sym:
    """CrossAttention.forward: wq on x, wkv on the encoder output, SDPA, wo."""
    s, B = st.spec, w.o.batch
    H, Dh = s.n_heads, s.head_dim
    q = w.linear(x, _lin(st, "wq", "cross"))
    kv = w.linear(memory, _lin(st, "wkv", "cross"))
    k, v = Sym(B * S * H * Dh, kv.itemsize, kv.rg, base=kv), Sym(B * S * H * Dh, kv.itemsize, kv.rg, base=kv)
    y = w.sdpa(q, k, v, H, H, Dh, T, S, s.attn_dropout)
    return w.linear(y, _lin(st, "wo", "cross"))


def mlp(w: Walk, x: Sym, st: Stack) -> Sym:
    """MLP: down(dropout(act(up(x)))); gated (SwiGLU, T5's gated GELU): down(dropout(act(gate(x)) * up(x)))."""
    s = st.spec
    if s.mlp in ("swiglu", "gated"):
        g = w.linear(x, _lin(st, "gate", "mlp"))
        u = w.linear(x, _lin(st, "up", "mlp"))
        h = w.mul(w.activation(g, "silu" if s.mlp == "swiglu" else s.act), u)
    else:
        h = w.activation(w.linear(x, _lin(st, "up", "mlp")), s.act)
    return w.linear(w.dropout(h, s.act_dropout), _lin(st, "down", "mlp"))


def block(w: Walk, x: Sym, st: Stack, T: int, rope: Sym | None = None,
          memory: Sym | None = None, S: int = 0) -> Sym:
    """PreNormBlock / PostNormBlock / their decoder versions: (B, T, D) -> (B, T, D)."""
    s = st.spec
    norm = lambda t: w.norm(t, s.norm, s.dim)
    if st.order == "pre":
        x = w.add(x, w.dropout(self_attention(w, norm(x), st, T, rope), s.dropout))
        if st.cross:
            x = w.add(x, w.dropout(cross_attention(w, norm(x), memory, st, T, S), s.dropout))
        return w.add(x, w.dropout(mlp(w, norm(x), st), s.dropout))
    x = norm(w.add(x, w.dropout(self_attention(w, x, st, T, rope), s.dropout)))
    if st.cross:
        x = norm(w.add(x, w.dropout(cross_attention(w, x, memory, st, T, S), s.dropout)))
    return norm(w.add(x, w.dropout(mlp(w, x, st), s.dropout)))


def _blocks(w: Walk, x: Sym, st: Stack, T: int, **kw) -> Sym:
    for i in range(st.n_layers):
        w.begin(f"{st.name}.{i}")
        x = block(w, x, st, T, **kw)
    return x


def _lm_loss(w: Walk, arch: Arch, h: Sym, rows: int, ce_chunk: int) -> None:
    """LM head + summed cross-entropy on `rows` positions of h (B, T, D).

    Chunked (train.objectives.linear_cross_entropy): forward computes each chunk's fp32
    logits, and from softmax - onehot both gradients right away; it keeps only the
    gradient of the hidden states (rows x D, h's dtype) and of the unpadded LM head
    weight (V x D fp32), and backward just scales them. Unchunked: logits over the padded
    vocabulary, then F.cross_entropy, which keeps the fp32 log-softmax (rows x V)."""
    D, Vp, V = arch.dim, arch.padded_vocab, arch.vocab_size
    if ce_chunk:
        need_w = w.o.trainable_base
        if h.rg or need_w:
            w.gemm(rows, D, V, h.rg, need_w)  # the "backward" GEMMs run inside forward, chunk by chunk
            w.keep(rows * D * h.itemsize, "loss gradients")
            w.keep(V * D * FP32 if need_w else 0, "loss gradients")
        return
    w.linear(h, Linear("lm_head", D, Vp, False, "head"))
    w.keep(rows * V * FP32, "logits (log-softmax)")


def gpt(w: Walk, arch: Arch, shape: Shape, ce_chunk: int) -> list[Segment]:
    c, B, T = arch.config, shape.batch, shape.seq_len
    tr = w.o.trainable_base
    w.begin("embed")
    x = w.embedding(B * T, c.dim, tr, arch.padded_vocab)
    rope = None
    if c.positions == "learned":
        x = w.add(x, w.embedding(T, c.dim, tr, c.max_seq_len))
    elif c.positions == "sinusoidal":
        x = w.add(x, Sym(T * c.dim, FP32, False))
    else:
        rope = Sym(2 * T * c.head_dim, FP32, False)  # cos, sin (1, T, Dh) for this forward
    x = _blocks(w, w.dropout(x, c.dropout), arch.stacks[0], T, rope=rope)
    w.begin("head")
    _lm_loss(w, arch, w.norm(x, c.norm, c.dim), B * T, ce_chunk)
    return w.segments


def bert(w: Walk, arch: Arch, shape: Shape, ce_chunk: int) -> list[Segment]:
    c, B, T = arch.config, shape.batch, shape.seq_len
    D, tr = c.dim, w.o.trainable_base
    w.begin("embed")
    x = w.embedding(B * T, D, tr, arch.padded_vocab)
    x = w.add(x, w.embedding(T, D, tr, c.n_positions) if c.positions != "sinusoidal" else Sym(T * D, FP32, False))
    if c.type_vocab_size:
        x = w.add(x, w.embedding(B * T, D, tr, c.type_vocab_size))
    x = _blocks(w, w.dropout(w.norm(x, "layernorm", D), c.dropout), arch.stacks[0], T)
    w.begin("head")  # train.objectives.mlm_nsp (mlm): the MLM head on the masked rows only, never chunked
    rows = B * shape.mlm_rows
    w.keep(3 * rows * INT64, "indices")  # hidden[mask]: (batch, position) indices; the targets
    g = Sym(rows * D, FP32, x.rg)
    h = w.activation(w.linear(g, Linear("dense", D, D, True, "head")), c.act)
    h = w.norm(h, "layernorm", D)
    w.linear(h, Linear("decoder", D, arch.padded_vocab, True, "head"))
    w.keep(rows * c.vocab_size * FP32, "logits (log-softmax)")
    if c.nsp:
        pooled = w.activation(w.linear(Sym(B * D, FP32, x.rg, base=x), Linear("pooler", D, D, True, "head")), "tanh")
        w.linear(pooled, Linear("nsp_head", D, 2, True, "head"))
    return w.segments


def encdec(w: Walk, arch: Arch, shape: Shape, ce_chunk: int) -> list[Segment]:
    c, B, S, T = arch.config, shape.batch, shape.seq_len, shape.target_len
    D, tr = c.dim, w.o.trainable_base
    enc, dec = arch.stacks

    def embed(n: int) -> Sym:  # token embedding (* sqrt(D)) + positions, emb_norm, dropout
        x = w.embedding(B * n, D, tr, arch.padded_vocab)
        pos = w.embedding(n, D, tr, c.max_seq_len + c.position_offset) if c.positions == "learned" else \
            Sym(n * D, FP32, False)
        x = w.add(x, pos)
        if c.embed_norm:
            x = w.norm(x, "layernorm", D)
        return w.dropout(x, c.dropout)

    w.begin("encoder.embed")
    memory = _blocks(w, embed(S), enc, S)
    if c.norm_style == "pre":
        w.begin("encoder.norm_f")
        memory = w.norm(memory, "layernorm", D)
    w.begin("decoder.embed")
    x = _blocks(w, embed(T), dec, T, memory=memory, S=S)
    w.begin("head")
    if c.norm_style == "pre":
        x = w.norm(x, "layernorm", D)
    _lm_loss(w, arch, x, B * T, ce_chunk)
    return w.segments


def position_bias(w: Walk, st: Stack, n_buckets: int, T: int, S: int) -> None:
    """_T5Stack.attention_bias for a batch without padding: (T, S) bucket ids looked up in the
    (buckets, H) table -> the (1, H, T, S) float mask every layer's attention adds, -inf where
    a decoder's causal mask (kept by masked_fill, 1 byte a slot) forbids. Fused attention
    (CUDA) keeps the mask once for all layers; CPU runs such attention on the math path."""
    H = st.spec.n_heads
    trainable = w.o.trainable_base
    w.embedding(T * S, H, trainable, n_buckets)
    if trainable and st.causal:
        w.keep(T * S, "position bias")
    if trainable and w.o.backend == "cuda":
        w.keep(H * T * S * w.act_dtype(), "position bias")


def t5(w: Walk, arch: Arch, shape: Shape, ce_chunk: int) -> list[Segment]:
    """T5: embeddings without positions, a relative position bias per stack, pre-norm RMS blocks,
    final norm and dropout on each side (and the decoder output scaled before a tied head)."""
    c, B, S, T = arch.config, shape.batch, shape.seq_len, shape.target_len
    D, tr = c.dim, w.o.trainable_base
    enc, dec = arch.stacks

    def embed(n: int) -> Sym:
        return w.dropout(w.embedding(B * n, D, tr, arch.padded_vocab), c.dropout)

    w.begin("encoder.embed")
    position_bias(w, enc, c.relative_buckets, S, S)
    memory = _blocks(w, embed(S), enc, S)
    w.begin("encoder.norm_f")
    memory = w.dropout(w.norm(memory, "rmsnorm", D), c.dropout)
    w.begin("decoder.embed")
    position_bias(w, dec, c.relative_buckets, T, T)
    x = _blocks(w, embed(T), dec, T, memory=memory, S=S)
    w.begin("head")
    x = w.dropout(w.norm(x, "rmsnorm", D), c.dropout)
    _lm_loss(w, arch, x, B * T, ce_chunk)
    return w.segments


WALKS = {"gpt": gpt, "bert": bert, "encdec": encdec, "t5": t5}


def walk(arch: Arch, w: Walk, shape: Shape, ce_chunk: int) -> list[Segment]:
    """Segments of one micro-batch's forward pass, in order."""
    return WALKS[arch.family](w, arch, shape, ce_chunk)
