"""GPT: the decoder-only Transformer (GPT-2 and Llama-style models by configuration).

tokens -> token embedding (+ learned/sinusoidal positions, or RoPE inside attention)
       -> n_layers x pre-LN block (causal self-attention, MLP)
       -> final norm -> LM head (tied to the token embedding by default) -> logits
       (-> cap * tanh(logits / cap) with logit_softcap)

Causal self-attention lets position t see positions <= t only, so one forward pass
predicts every next token of the sequence at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.config import ArchConfig
from lmforge.nn.attention import causal_self_mask
from lmforge.nn.block import BlockSpec, PreNormBlock
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norm import make_norm
from lmforge.nn.position import LearnedPositions, RotaryPositions, SinusoidalPositions
from lmforge.nn.quant import compute_dtype


@dataclass
class GPTConfig(ArchConfig):
    """Architecture of a decoder-only model.

    Args:
        vocab_size: tokens in the vocabulary (V).
        max_seq_len: longest sequence, in tokens.
        dim: model width (D).
        n_layers: number of blocks.
        n_heads: query heads (H).
        n_kv_heads: key/value heads; fewer than n_heads is grouped-query attention. None: n_heads.
        head_dim: width of one head. None: dim // n_heads.
        hidden_dim: MLP width (F). None: 4 * dim.
        norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
        norm_eps: epsilon of the norms.
        positions: "learned" (GPT-2), "rope" (Llama) or "sinusoidal".
        rope_theta: RoPE base.
        rope_scaling: Llama 3 long-context RoPE scaling parameters, or None.
        mlp: "mlp" (GELU MLP) or "swiglu" (Llama).
        act: activation of the plain MLP ("gelu_tanh" is GPT-2's).
        bias: biases in linear layers and LayerNorms.
        qkv_bias: biases on the query/key/value projections only (Qwen2); None: as `bias`.
        qk_norm: RMS-normalise each head's queries and keys before RoPE (Qwen3).
        sliding_window: each token attends to this many newest tokens at most (Mistral); None: all.
        tie_embeddings: share the token embedding with the LM head.
        dropout: dropout on embeddings and residual branches.
        vocab_multiple: pad embedding rows to a multiple of this.
        logit_softcap: logits <- cap * tanh(logits / cap), smoothly bounded in (-cap, cap)
            (Gemma 2, modded-nanogpt); None: off.
        zero_init_proj: start the projections that write into the residual stream (attn.wo,
            mlp.down) at zero, so every block is the identity at init (modded-nanogpt); an
            initialisation only, not part of the architecture an export carries.
        value_embeds: value-embedding tables (modded-nanogpt), each (V, Hkv * Dh); table i
            feeds layer i and layer n_layers - value_embeds + i (at most n_layers / 2 tables). 0: none.
    """

    vocab_size: int = 50257
    max_seq_len: int = 1024
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    mlp: str = "mlp"
    act: str = "gelu_tanh"
    bias: bool = True
    qkv_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    vocab_multiple: int = 128
    logit_softcap: float | None = None
    zero_init_proj: bool = False
    value_embeds: int = 0

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "vocab_multiple")
        self._check_heads()
        self._check_choice("norm", ("layernorm", "rmsnorm"))
        self._check_choice("positions", ("learned", "rope", "sinusoidal"))
        self._check_choice("mlp", ("mlp", "swiglu"))
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.hidden_dim = self.hidden_dim or 4 * self.dim
        self._check_positive("n_kv_heads", "head_dim", "hidden_dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"GPTConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.head_dim ({self.head_dim}) must be even for rope")
        if self.sliding_window is not None:
            self._check_positive("sliding_window")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"GPTConfig.logit_softcap must be positive or None, got {self.logit_softcap!r}")
        if not (isinstance(self.value_embeds, int) and 0 <= 2 * self.value_embeds <= self.n_layers):
            raise ValueError(f"GPTConfig.value_embeds must be an integer from 0 to n_layers / 2 "
                             f"({self.n_layers // 2}), got {self.value_embeds!r}")

    def block_spec(self, value_embed: bool = False) -> BlockSpec:
        return BlockSpec(self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim,
                         self.norm, self.norm_eps, self.mlp, self.act, self.bias, self.dropout,
                         qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, value_embed=value_embed)

    def value_table(self, layer: int) -> int | None:
        """The value-embedding table layer `layer` reads, or None: the first and the last
        value_embeds layers read tables 0, 1, ... in order (modded-nanogpt's 012...012)."""
        k = self.value_embeds
        if layer < k:
            return layer
        if layer >= self.n_layers - k:
            return layer - (self.n_layers - k)
        return None


# Presets: the config fields each one sets; derived fields (head_dim, ...) follow overrides.
PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(),
    "gpt2-355m": dict(dim=1024, n_layers=24, n_heads=16),
    "gpt-tiny": dict(vocab_size=4096, max_seq_len=256, dim=128, n_layers=4, n_heads=4),
    # A SmolLM-135M-shaped Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.
    "llama-small": dict(vocab_size=49152, max_seq_len=2048, dim=576, n_layers=30, n_heads=9,
                             n_kv_heads=3, hidden_dim=1536, norm="rmsnorm", positions="rope",
                             mlp="swiglu", bias=False, norm_eps=1e-5),
    "llama-tiny": dict(vocab_size=4096, max_seq_len=256, dim=128, n_layers=4, n_heads=4,
                            n_kv_heads=2, hidden_dim=352, norm="rmsnorm", positions="rope",
                            mlp="swiglu", bias=False),
}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.padded_vocab_size, c.dim)
        self.pos_emb: nn.Module | None = None
        self.rope: RotaryPositions | None = None
        if c.positions == "learned":
            self.pos_emb = LearnedPositions(c.max_seq_len, c.dim)
        elif c.positions == "sinusoidal":
            self.pos_emb = SinusoidalPositions(c.max_seq_len, c.dim)
        else:
            self.rope = RotaryPositions(c.max_seq_len, c.head_dim, c.rope_theta, c.rope_scaling)
        self.drop = nn.Dropout(c.dropout)
        self.value_tables = [c.value_table(i) for i in range(c.n_layers)]
        self.value_emb = nn.ModuleList(nn.Embedding(c.padded_vocab_size, c.n_kv_heads * c.head_dim)
                                       for _ in range(c.value_embeds))
        self.blocks = nn.ModuleList(PreNormBlock(c.block_spec(value_embed=t is not None)) for t in self.value_tables)
        self.norm_f = make_norm(c.norm, c.dim, c.norm_eps, c.bias)
        self.lm_head = nn.Linear(c.dim, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, 0.02) everywhere; the projections that write into the residual stream
        scaled by 1/sqrt(2 * n_layers) (GPT-2), so that the stream's variance does
        not grow with depth; with zero_init_proj, those projections start at zero instead."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            for proj in (block.attn.wo, block.mlp.down):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> nn.ModuleList:
        """One preallocated KVCache per block, for up to max_len (default max_seq_len) tokens."""
        c = self.config
        dtype = dtype or compute_dtype(self)  # not the weights' own: they may be int8
        device = device or self.tok_emb.weight.device
        max_len = max_len or c.max_seq_len
        return nn.ModuleList(KVCache(batch_size, c.n_kv_heads, max_len, c.head_dim, dtype, device)
                             for _ in range(c.n_layers))

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: nn.ModuleList | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> hidden states after the final norm (B, T, D).

        attention_mask: (B, T) 1 for tokens, 0 for padding (without a cache), or
            (B, S) over the first S <= max_len cache slots (with one): attention reads
            only those slots, so eager decoding passes the slots written so far. Or a
            ready bool mask (B or 1, 1, T, S), used as is: a decoding loop that knows
            its query is the newest slot passes its slot mask as one, and the step
            builds nothing.
        position_ids: (B, T) or (1, T); default 0..T-1, or cache_pos with a cache.
        cache, cache_pos: from `make_cache`; this call's tokens go to slots cache_pos (T,).
        """
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids has {T} tokens, more than max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = (cache_pos if cache is not None else
                            torch.arange(T, device=input_ids.device))[None]  # (1, T)
        x = self.tok_emb(input_ids)  # (B, T, D)
        rope = self.rope(position_ids) if self.rope is not None else None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        mask = causal_self_mask(T, attention_mask, cache, cache_pos, x.device, self.config.sliding_window)
        ve = self.value_embeddings(input_ids)
        # zip, not cache[i]: indexing a ModuleList costs microseconds per layer in a decode step.
        for block, layer_cache, layer_ve in zip(self.blocks, cache if cache is not None else [None] * len(self.blocks),
                                                ve):
            x = block(x, mask, mask is None, rope, layer_cache, cache_pos, layer_ve)
        return self.norm_f(x)

    def value_embeddings(self, input_ids: Tensor) -> list[Tensor | None]:
        """Per layer, its value embeddings of the tokens (B, T, Hkv * Dh), or None (no table)."""
        if not self.value_emb:
            return [None] * len(self.blocks)
        tables = [emb(input_ids) for emb in self.value_emb]
        return [None if t is None else tables[t] for t in self.value_tables]

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) after the final norm -> logits (..., V): the LM head, without the
        padded rows, soft-capped when logit_softcap is set."""
        return soft_cap(self.lm_head(hidden)[..., : self.config.vocab_size], self.config.logit_softcap)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> Tensor:
        """input_ids (B, T) -> next-token logits (B, T, V). Keywords as `encode`."""
        return self.logits(self.encode(input_ids, attention_mask, **kw))


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(logits / cap): about the logits themselves while |logits| << cap, never beyond
    +-cap (Gemma 2's final_logit_softcapping); the logits unchanged when cap is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)

