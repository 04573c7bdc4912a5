"""Weight-only quantisation for decoding: fewer bytes read per token.

At batch 1 a decoder reads every weight once per generated token, so on a CPU the step
time is set by memory traffic. Storing the weights of the linear layers in fewer bits
cuts that traffic; activations, norms, embeddings and the KV cache stay in the compute
dtype (fp32, bf16), so that only the weights are approximated.

int8, per output channel, symmetric (LLM.int8's vector-wise, AWQ/GPTQ's int8 baseline):

    scale_n = max_k |W[n, k]| / 127        q[n, k] = round(W[n, k] / scale_n)  in [-127, 127]
    y = x W^T ~= (x q^T) * scale            (the scale factors out of the sum over k)

int4, groupwise, asymmetric (gpt-fast / torchao's layout): every `group_size` inputs of an
output channel share a scale and a zero point (the group's minimum),

    scale = (max - min) / 15               q = round((W - min) / scale)  in [0, 15]
    W ~= q * scale + min = (q - 8) * scale + (min + 8 * scale)

How the product runs on a CPU (`Int8Linear.forward`): a few rows (decoding) in bf16/fp16
go to torch's int8 matrix-vector kernel `torch._weight_int8pack_mm`; under torch.compile
the dequantise-multiply-sum is written out for the compiler to fuse into one loop that
reads each int8 weight once (exact in fp32; on an AVX2 CPU 8x slower than the kernel,
BENCHMARKS.md, so nothing compiles it by default there);
many rows (a prompt) dequantise the weight and run one matrix product, where arithmetic
rather than memory bounds the time. An fp32 input on the eager path is rounded to bf16
for the kernel (torch's fp32 path of it is ~10x slower), so an fp32-compute int8 model
decodes with bf16 activations inside its matrix products only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTIZATIONS = ("int8", "int4")
DECODE_ROWS = 16  # up to this many rows the product is a matrix-vector one, bound by reading the weight


def _rows(x: Tensor) -> int:
    return x.numel() // x.size(-1) if x.numel() else 0


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (out, in) and one scale per output channel.

    Built from an nn.Linear by `Int8Linear.from_linear`; weight and scale are buffers
    (nothing trains). bias and scale are kept in `dtype`, the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._kernel_scale: Tensor | None = None  # the scale in bf16, for the eager kernel of an fp32 model

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantise linear's weight per output channel (computed in fp32)."""
        w = linear.weight.detach().float()  # (out, in)
        dtype = dtype or linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, w.device)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        layer.weight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as it computes: q * scale, (out, in)."""
        dtype = dtype or self.scale.dtype
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out), in x's dtype."""
        if torch.compiler.is_compiling() and _rows(x) <= DECODE_ROWS:
            # written out for the compiler, which fuses it into one pass over the int8 weight
            y = (x[..., None, :] * self.weight.to(x.dtype)).sum(-1) * self.scale.to(x.dtype)
        elif _rows(x) <= DECODE_ROWS and x.device.type == "cpu":
            y = self._kernel(x)
        else:  # a prompt (or a GPU without the compiler): one dequantised matrix product
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _kernel(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.dtype in (torch.bfloat16, torch.float16):
            scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
            y = torch._weight_int8pack_mm(rows.contiguous(), self.weight, scale)
        else:
            if self._kernel_scale is None or self._kernel_scale.device != x.device:
                self._kernel_scale = self.scale.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self._kernel_scale).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """An embedding table read from an Int8Linear's weight (a tied LM head): row v is
    q[v] * scale[v], per output channel of the head = per row of the table. Shares the
    head's buffers, so a tied model keeps one int8 table."""

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are not listed twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> Tensor:
        return self.head[0].weight

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...) -> (..., D) in the compute dtype."""
        head = self.head[0]
        return F.embedding(ids, head.weight).to(head.scale.dtype) * head.scale[ids][..., None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 (tied to the LM head)"


class Int4Linear(nn.Module):
    """A linear layer with int4 weights, groupwise (group_size inputs share a scale and a
    zero point), packed for torch's CPU int4 kernel `_weight_int4pack_mm_for_cpu`.
    Needs in_features % group_size == 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4: in_features ({in_features}) must be a multiple of group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (in / group, out, 2): scale and zero point of each group, the kernel's layout
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=dtype,
                                                             device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype | None = None) -> Int4Linear:
        dtype = dtype or linear.weight.dtype
        w = linear.weight.detach().float()  # (out, in)
        N, K = w.shape
        layer = cls(K, N, linear.bias is not None, group_size, dtype, w.device)
        groups = w.view(N, K // group_size, group_size)  # (out, in / g, g)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-12) / 15
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(N, K)
        layer.weight.copy_(torch._convert_weight_to_int4pack_for_cpu(q, 1))
        zeros = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        layer.scales_and_zeros.copy_(torch.stack([scale, zeros], -1).view(N, K // group_size, 2).transpose(0, 1))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        rows = x.reshape(-1, self.in_features)
        sz = self.scales_and_zeros
        if sz.dtype != x.dtype:
            sz = sz.to(x.dtype)
        y = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight, self.group_size, sz)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group {self.group_size}")


QUANTIZED = (Int8Linear, Int4Linear)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def quantize(model: nn.Module, kind: str, *, group_size: int = 32, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear of `model` by its int8 (or int4) version, in place; returns model.

    kind: "int8" (per output channel, symmetric) or "int4" (groupwise, group_size inputs,
    CPU only). Layers whose last name component is in `skip` stay as they are, as do int4
    layers whose input width is not a multiple of group_size. An embedding tied to a
    quantised head (GPT's tok_emb and lm_head) reads the head's int8 table (int8), or keeps
    its own weight (int4). The model should already be in its compute dtype (`model.to(dtype)`);
    LoRA adapters must be merged first (lmforge.nn.lora.merge_lora).
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantize: unknown kind {kind!r} (expected one of {', '.join(QUANTIZATIONS)})")
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip}
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
    if others:
        raise ValueError(f"quantize: {others[0]} is a {type(model.get_submodule(others[0])).__name__}, not a plain "
                         "nn.Linear; merge LoRA adapters before quantising")
    embeddings = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, linear in linears.items():
        if kind == "int8":
            new = Int8Linear.from_linear(linear)
        elif linear.in_features % group_size == 0:
            new = Int4Linear.from_linear(linear, group_size)
        else:
            continue
        tied = embeddings.get(id(linear.weight))
        _replace(model, name, new)
        if tied is not None and isinstance(new, Int8Linear):
            _replace(model, tied, Int8Embedding(new))
    return model


def quantization_of(model: nn.Module) -> str | None:
    """"int8" / "int4" when the model holds quantised layers, else None."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, Int4Linear):
            return "int4"
    return None


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its first floating-point parameter's or buffer's
    (quantised weights are integer buffers; norms, embeddings and scales are not)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def head_weight(layer: nn.Module) -> Tensor:
    """The (out, in) weight a linear layer computes with, for code that multiplies by it
    directly (the chunked cross-entropy of evaluation): an nn.Linear's own, a quantised
    layer's dequantised (int4: its outputs for the identity, minus its bias)."""
    if isinstance(layer, Int8Linear):
        return layer.dequantized()
    if isinstance(layer, Int4Linear):
        dtype = layer.scales_and_zeros.dtype
        out = layer(torch.eye(layer.in_features, dtype=dtype, device=layer.weight.device))  # (in, out)
        return (out if layer.bias is None else out - layer.bias.to(dtype)).T
    return layer.weight
