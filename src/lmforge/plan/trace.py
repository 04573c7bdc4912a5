"""A symbolic walk of the model's forward pass: matmul FLOPs and the tensors autograd saves.

`Walk` replays, op by op, the dataflow of lmforge's blocks (src/lmforge/nn/block.py,
attention.py, mlp.py, norm.py) on symbolic tensors (`Sym`: element count, bytes per
element, requires-grad) and records, per segment (embeddings, each block, the loss head):

- forward and backward matmul FLOPs (2·m·n·k per GEMM; backward is one GEMM for the
  input gradient when the input requires grad and one for the weight gradient when the
  weight is trainable, so frozen LoRA bases cost half);
- the tensors autograd keeps for backward, each storage counted once, by dtype, with
  the rules PyTorch follows: a linear saves its input only if its weight needs a
  gradient and its weight only if its input needs one; under autocast each linear
  saves its own bf16 copy of its input and of its weight (casts of activations are
  not shared; weight casts are cached per forward); LayerNorm and RMSNorm run in fp32
  and save their fp32 input and statistics; GELU and SiLU save their input, ReLU its
  output; dropout with p > 0 saves its mask (a float tensor on CPU, a bool on CUDA);

Attention follows the SDPA kernel PyTorch picks: a fused kernel (flash / memory-
efficient) saves q, k, v, the output and the fp32 log-sum-exp — never the T x S
scores; the math fallback (CPU with attention dropout, CUDA fp32 with grouped-query
attention) saves scaled q and k, v, the softmax and, with dropout, its mask and the
dropped weights. On CPU the math path computes bf16/fp16 inputs in fp32.
The tests compare every number with `saved_tensors_hooks` on real models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.models.arch import Linear

FP32 = 4
INT64 = 8


@dataclass(eq=False)
class Sym:
    """One symbolic tensor of a micro-batch: numel elements of `itemsize` bytes.
    `base` is the tensor whose storage a view shares (saving a view keeps the base)."""

    numel: int
    itemsize: int
    rg: bool
    base: Sym | None = None
    saved: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Segment:
    """Costs of one part of the forward pass (a block, the embeddings, the loss head)."""

    name: str
    fwd_flops: int = 0
    bwd_flops: int = 0
    attn_fwd_flops: int = 0  # the part of fwd_flops in attention scores and mixing (no weights)
    saved: dict[str, int] = field(default_factory=dict)  # what -> bytes
    recompute_flops: int = 0  # forward FLOPs run again in backward (checkpointed loss chunks)

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())


@dataclass(frozen=True)
class WalkOptions:
    """What decides the dataflow: batch shape, precision, backend, trainability."""

    batch: int
    lowp: int | None  # bytes of the autocast dtype (2), or None for fp32
    backend: str  # "cpu" | "cuda"
    trainable_base: bool  # False under LoRA: base weights, embeddings and norms frozen
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()


class Walk:
    """Records costs into the current segment while the family walks call its ops."""

    def __init__(self, opts: WalkOptions) -> None:
        self.o = opts
        self.segments: list[Segment] = []
        self.seg = Segment("start")

    # -- bookkeeping -------------------------------------------------------------
    def begin(self, name: str) -> Segment:
        self.seg = Segment(name)
        self.segments.append(self.seg)
        return self.seg

    def save(self, t: Sym, what: str) -> None:
        t = t.base or t
        if not t.saved:
            t.saved = True
            self.seg.saved[what] = self.seg.saved.get(what, 0) + t.nbytes

    def keep(self, nbytes: int, what: str) -> None:
        """A saved tensor that no other op can share (statistics, masks, weight copies)."""
        self.seg.saved[what] = self.seg.saved.get(what, 0) + nbytes

    def act_dtype(self) -> int:
        return self.o.lowp or FP32

    # -- ops ---------------------------------------------------------------------
    def gemm(self, m: int, k: int, n: int, input_rg: bool, weight_rg: bool) -> None:
        self.seg.fwd_flops += 2 * m * k * n
        self.seg.bwd_flops += 2 * m * k * n * (int(input_rg) + int(weight_rg))

    def cast(self, x: Sym) -> Sym:
        """Autocast's cast of an fp32 activation to the low-precision dtype (a new tensor)."""
        if self.o.lowp is None or x.itemsize != FP32:
            return x
        return Sym(x.numel, self.o.lowp, x.rg)

    def linear(self, x: Sym, lin: Linear) -> Sym:
        """y = x W^T + b for x (tokens, d_in); LoRA adds B(A(x)) * alpha / r when targeted."""
        tokens = x.numel // lin.d_in
        trainable = self.o.trainable_base
        xc = self.cast(x)
        if trainable:
            self.save(xc, "activations")
        if self.o.lowp is not None and xc.rg:  # autocast's low-precision weight copy
            self.keep(lin.d_in * lin.d_out * self.o.lowp, "autocast weight copies")
        self.gemm(tokens, lin.d_in, lin.d_out, xc.rg, trainable)
        out = Sym(tokens * lin.d_out, self.act_dtype(), xc.rg or trainable)
        if self.o.lora_rank and lin.name in self.o.lora_targets:
            out = self._lora(x, lin, tokens, out)
        return out

    def _lora(self, x: Sym, lin: Linear, tokens: int, base_out: Sym) -> Sym:
        """nn.lora.LoRALinear: base(x) + (alpha / r) * B(A(dropout(x))), dropout 0 (the
        default) returning x itself; A and B train, so A keeps its input (its own cast of x
        under autocast) and B keeps the r-wide A(x)."""
        r = self.o.lora_rank
        xa = self.cast(x)  # a second cast: autocast does not share activation casts
        self.save(xa, "activations")
        self.gemm(tokens, lin.d_in, r, xa.rg, True)
        a = Sym(tokens * r, self.act_dtype(), True)
        self.save(a, "activations")
        self.gemm(tokens, r, lin.d_out, True, True)
        if self.o.lowp is not None:  # the adapters' cached low-precision copies, kept for input gradients
            self.keep((lin.d_in * r * int(xa.rg) + lin.d_out * r) * self.o.lowp, "autocast weight copies")
        return Sym(base_out.numel, base_out.itemsize, True)

    def norm(self, x: Sym, kind: str, dim: int) -> Sym:
        """LayerNorm / lmforge's RMSNorm over the last `dim` features (statistics in fp32;
        output fp32 under autocast, which runs norms in fp32)."""
        trainable = self.o.trainable_base
        tokens = x.numel // dim
        if kind == "layernorm":  # CUDA autocast runs layer_norm in fp32, CPU autocast in the input's dtype
            xf = Sym(x.numel, FP32, x.rg) if x.itemsize != FP32 and self.o.backend == "cuda" else x
            if x.rg or trainable:
                self.save(xf, "activations")
                self.keep(2 * tokens * FP32, "norm statistics")  # mean, rstd
            return Sym(x.numel, xf.itemsize, x.rg or trainable)
        xf = Sym(x.numel, FP32, x.rg) if x.itemsize != FP32 else x  # RMSNorm.forward: x.float()
        if xf.rg:  # F.rms_norm saves its input and rstd
            self.save(xf, "activations")
            self.keep(tokens * FP32, "norm statistics")
        y = Sym(x.numel, FP32, xf.rg)
        if trainable:  # weight * y keeps y for the weight's gradient
            self.save(y, "activations")
        return Sym(x.numel, FP32, xf.rg or trainable)

    def activation(self, x: Sym, act: str) -> Sym:
        out = Sym(x.numel, x.itemsize, x.rg)
        if x.rg:
            self.save(out if act in ("relu", "tanh") else x, "activations")  # these keep their output
        return out

    def dropout(self, x: Sym, p: float) -> Sym:
        if p <= 0.0:
            return x
        out = Sym(x.numel, x.itemsize, x.rg)
        if x.rg:  # CPU: x * (bernoulli mask / (1-p)) keeps the float mask; CUDA: a bool mask
            self.keep(x.numel * (x.itemsize if self.o.backend == "cpu" else 1), "dropout masks")
        return out

    def add(self, x: Sym, y: Sym) -> Sym:
        return Sym(max(x.numel, y.numel), max(x.itemsize, y.itemsize), x.rg or y.rg)

    def mul(self, x: Sym, y: Sym) -> Sym:
        if x.rg:
            self.save(y, "activations")
        if y.rg:
            self.save(x, "activations")
        return Sym(x.numel, max(x.itemsize, y.itemsize), x.rg or y.rg)

    def embedding(self, rows: int, dim: int, trainable: bool, table: int) -> Sym:
        """A lookup of `rows` rows in a (table, dim) table; backward keeps the int64
        indices and writes a dense, zero-filled gradient of the whole table."""
        if trainable:
            self.keep(rows * INT64, "indices")
        return Sym(rows * dim, FP32, trainable)

    def rope(self, x: Sym, tables: Sym, T: int, Dh: int) -> Sym:
        """apply_rope: x * cos + rotate_half(x) * sin. The multiplies keep cos and sin: the
        per-forward fp32 tables themselves, or under autocast a fresh copy per call."""
        if x.rg:
            if self.o.lowp is None:
                self.save(tables, "rope tables")
            else:
                self.keep(2 * T * Dh * self.o.lowp, "rope tables")
        return Sym(x.numel, x.itemsize, x.rg)

    def sdpa(self, q: Sym, k: Sym, v: Sym, H: int, Hkv: int, Dh: int, T: int, S: int, p: float,
             bias: bool = False) -> Sym:
        """scaled_dot_product_attention over B sequences: q (B, H, T, Dh), k/v (B, Hkv, S, Dh);
        bias: a float mask that needs a gradient (T5's position bias).

        Returns the (B, T, H*Dh) input of wo (a view of the kernel's output for fused
        kernels, a copy from the math path)."""
        B = self.o.batch
        attn = 4 * B * H * T * S * Dh
        self.seg.fwd_flops += attn
        self.seg.attn_fwd_flops += attn
        self.seg.bwd_flops += 2 * attn if q.rg else 0
        it = q.itemsize
        scores = B * H * T * S
        if not self._math_attention(p, H != Hkv, it, bias):
            out = Sym(B * T * H * Dh, it, q.rg)
            if q.rg:
                for t in (q, k, v, out):
                    self.save(t, "activations")
                lse_len = T if self.o.backend == "cpu" or self.o.lowp else -(-T // 32) * 32
                self.keep(B * H * lse_len * FP32, "attention log-sum-exp")
            return out
        # Math path: q*s, k^T*s, softmax, [dropout], @ v; on CPU in fp32 even under autocast.
        mit = FP32 if self.o.backend == "cpu" else it
        if q.rg:
            self.keep(B * H * T * Dh * mit + 2 * B * H * S * Dh * mit, "attention q, k, v copies")
            self.keep(scores * mit, "attention scores")
            if p > 0.0:
                self.keep(scores * (mit if self.o.backend == "cpu" else 1) + scores * mit, "attention scores")
        out = Sym(B * T * H * Dh, it, q.rg)  # transpose(1, 2).reshape copies the (B, H, T, Dh) output
        return out

    def _math_attention(self, p: float, gqa: bool, itemsize: int, bias: bool = False) -> bool:
        if self.o.backend == "cpu":
            return p > 0.0 or bias  # CPU flash attention has no dropout, nor a gradient for its mask
        return itemsize == FP32 and gqa  # CUDA fp32 goes to memory-efficient attention, which has no GQA
