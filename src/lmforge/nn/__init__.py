"""Family-agnostic Transformer layers: attention, positions, norms, MLPs, blocks, KV cache."""

from lmforge.nn.attention import (
    CrossAttention,
    SelfAttention,
    build_mask,
    causal_mask,
    reference_attention,
    sdpa,
)
from lmforge.nn.block import BlockSpec, PostNormBlock, PostNormDecoderBlock, PreNormBlock, PreNormDecoderBlock
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.mlp import MLP, SwiGLU
from lmforge.nn.norm import RMSNorm
from lmforge.nn.position import LearnedPositions, RotaryPositions, SinusoidalPositions

__all__ = [
    "BlockSpec", "CrossAttention", "KVCache", "LearnedPositions", "MLP", "PostNormBlock",
    "PostNormDecoderBlock", "PreNormBlock", "PreNormDecoderBlock", "RMSNorm", "RotaryPositions",
    "SelfAttention", "SinusoidalPositions", "SwiGLU", "build_mask", "causal_mask",
    "reference_attention", "sdpa",
]
