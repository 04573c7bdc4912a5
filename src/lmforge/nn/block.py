"""Transformer blocks: attention and MLP sublayers, each wrapped in a residual
connection and a normalisation, in the two orders the literature uses.

post-LN (the original Transformer, BERT, BART):  x = LayerNorm(x + Dropout(Sublayer(x)))
pre-LN  (GPT-2, Llama):                          x = x + Dropout(Sublayer(Norm(x)))

Pre-LN keeps an un-normalised residual stream from input to output, which makes
deep stacks train stably without warmup tricks; it then needs one final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmforge.nn.attention import CrossAttention, QKNormSelfAttention, SelfAttention
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.mlp import make_mlp
from lmforge.nn.norm import make_norm


@dataclass(frozen=True)
class BlockSpec:
    """What one block needs to know; each family's config builds one."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "mlp"
    act: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    act_dropout: float = 0.0
    qkv_bias: bool | None = None  # biases on q/k/v only (Qwen2); None: as `bias`
    qk_norm: bool = False  # RMS-normalised queries and keys (Qwen3): QKNormSelfAttention
    attn_scale: float | None = None  # the factor on Q K^T; None: 1/sqrt(head_dim) (T5: 1)
    value_embed: bool = False  # the self-attention mixes value embeddings into its values (SelfAttention)

    def norm_layer(self) -> nn.Module:
        return make_norm(self.norm, self.dim, self.norm_eps, self.bias)

    def self_attention(self) -> SelfAttention:
        if self.qk_norm:
            return QKNormSelfAttention(self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.bias,
                                       self.attn_dropout, self.qkv_bias, self.norm_eps, self.value_embed)
        return SelfAttention(self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.bias, self.attn_dropout,
                             self.qkv_bias, self.attn_scale, self.value_embed)

    def cross_attention(self) -> CrossAttention:
        return CrossAttention(self.dim, self.n_heads, self.bias, self.attn_dropout, self.head_dim, self.attn_scale)

    def mlp_layer(self) -> nn.Module:
        return make_mlp(self.mlp, self.dim, self.hidden_dim, self.act, self.bias, self.act_dropout)


class PreNormBlock(nn.Module):
    """x + Dropout(Attn(Norm(x))), then x + Dropout(MLP(Norm(x))). (B, T, D) -> (B, T, D)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.attn_norm, self.attn = spec.norm_layer(), spec.self_attention()
        self.mlp_norm, self.mlp = spec.norm_layer(), spec.mlp_layer()
        self.drop = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
        ve: Tensor | None = None,
    ) -> Tensor:
        """ve: (B, T, Hkv * Dh) value embeddings for the attention (see SelfAttention), or None."""
        x = x + self.drop(self.attn(self.attn_norm(x), mask, is_causal, rope, cache, cache_pos, ve))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class PostNormBlock(nn.Module):
    """LayerNorm(x + Dropout(Attn(x))), then LayerNorm(x + Dropout(MLP(x))). (B, T, D) -> (B, T, D)."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.attn, self.attn_norm = spec.self_attention(), spec.norm_layer()
        self.mlp, self.mlp_norm = spec.mlp_layer(), spec.norm_layer()
        self.drop = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask, is_causal, rope, cache, cache_pos)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class PreNormDecoderBlock(nn.Module):
    """A pre-LN block with cross-attention to the encoder output between its two sublayers."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.attn_norm, self.attn = spec.norm_layer(), spec.self_attention()
        self.cross_norm = spec.norm_layer()
        self.cross = spec.cross_attention()
        self.mlp_norm, self.mlp = spec.norm_layer(), spec.mlp_layer()
        self.drop = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        memory_mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D), memory: (B, S, D) (or its projected memory_kv) -> (B, T, D)."""
        x = x + self.drop(self.attn(self.attn_norm(x), mask, is_causal, None, cache, cache_pos))
        x = x + self.drop(self.cross(self.cross_norm(x), memory, memory_mask, memory_kv))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class PostNormDecoderBlock(PreNormDecoderBlock):
    """The post-LN decoder block of the original Transformer and BART (same layers, other order)."""

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        memory_mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask, is_causal, None, cache, cache_pos)))
        x = self.cross_norm(x + self.drop(self.cross(x, memory, memory_mask, memory_kv)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))
