"""EncoderDecoder: BART and the original Transformer ("Attention Is All You Need").

source tokens -> embedding (+ positions) -> encoder blocks (bidirectional)  = memory
target tokens -> embedding (+ positions) -> decoder blocks: causal self-attention,
                 cross-attention to the memory, MLP -> LM head -> logits

The decoder is trained with teacher forcing: its input is the target shifted right
behind a start token, and it predicts the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.config import IGNORE_INDEX, ArchConfig
from lmforge.nn.attention import build_mask, causal_self_mask
from lmforge.nn.block import BlockSpec, PostNormBlock, PostNormDecoderBlock, PreNormBlock, PreNormDecoderBlock
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.norm import make_norm
from lmforge.nn.position import LearnedPositions, SinusoidalPositions
from lmforge.nn.quant import compute_dtype


@dataclass
class EncoderDecoderConfig(ArchConfig):
    """Architecture of an encoder-decoder model.

    Args:
        vocab_size: tokens in the shared vocabulary (V).
        max_seq_len: longest source or target sequence.
        dim: model width (D).
        n_layers: encoder blocks.
        n_decoder_layers: decoder blocks. None: n_layers.
        n_heads: attention heads (H).
        hidden_dim: MLP width (F). None: 4 * dim.
        norm_style: "post" (BART, the original Transformer) or "pre" (with final norms).
        norm_eps: LayerNorm epsilon.
        positions: "learned" (BART) or "sinusoidal" (the original Transformer).
        position_offset: learned-position rows reserved before position 0 (BART keeps 2).
        act: MLP activation ("gelu" for BART, "relu" for the original Transformer).
        bias: biases in linear layers.
        embed_scale: multiply token embeddings by sqrt(dim) (the original Transformer).
        embed_norm: LayerNorm after the embeddings (BART).
        init: "normal" (N(0, 0.02), BART) or "xavier" (the original Transformer).
        dropout: dropout on embeddings and residual branches.
        attn_dropout: dropout on attention weights.
        act_dropout: dropout after the MLP activation.
        pad_token_id: id of the padding token.
        decoder_start_token_id: first decoder input token.
        vocab_multiple: pad embedding rows to a multiple of this.
    """

    vocab_size: int = 50265
    max_seq_len: int = 1024
    dim: int = 768
    n_layers: int = 6
    n_decoder_layers: int | None = None
    n_heads: int = 12
    hidden_dim: int | None = None
    norm_style: str = "post"
    norm_eps: float = 1e-5
    positions: str = "learned"
    position_offset: int = 0
    act: str = "gelu"
    bias: bool = True
    embed_scale: bool = False
    embed_norm: bool = True
    init: str = "normal"
    dropout: float = 0.1
    attn_dropout: float = 0.0
    act_dropout: float = 0.0
    pad_token_id: int = 1
    decoder_start_token_id: int = 2
    vocab_multiple: int = 128

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads")
        self._check_heads()
        self._check_choice("norm_style", ("post", "pre"))
        self._check_choice("positions", ("learned", "sinusoidal"))
        self._check_choice("init", ("normal", "xavier"))
        self.n_decoder_layers = self.n_decoder_layers or self.n_layers
        self.hidden_dim = self.hidden_dim or 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def block_spec(self) -> BlockSpec:
        return BlockSpec(self.dim, self.n_heads, self.n_heads, self.head_dim, self.hidden_dim, "layernorm",
                         self.norm_eps, "mlp", self.act, self.bias, self.dropout, self.attn_dropout,
                         self.act_dropout)


# Presets: the config fields each one sets; derived fields (head_dim, ...) follow overrides.
PRESETS: dict[str, dict] = {
    "bart-base": dict(position_offset=2),
    "bart-large": dict(dim=1024, n_layers=12, n_heads=16, position_offset=2),
    "bart-tiny": dict(dim=128, n_layers=2, n_heads=4, position_offset=2),
    "transformer-base": dict(vocab_size=37000, max_seq_len=1024, dim=512, n_heads=8,
                                             hidden_dim=2048, positions="sinusoidal", act="relu",
                                             embed_scale=True, embed_norm=False, init="xavier",
                                             pad_token_id=0, decoder_start_token_id=1),
    "transformer-tiny": dict(vocab_size=4096, max_seq_len=256, dim=128, n_layers=2, n_heads=4,
                                             positions="sinusoidal", act="relu", embed_scale=True,
                                             embed_norm=False, init="xavier", pad_token_id=0,
                                             decoder_start_token_id=1),
}


class _Stack(nn.Module):
    """What encoder and decoder share: positions, embedding norm, dropout, blocks, final norm."""

    def __init__(self, c: EncoderDecoderConfig, block: type[nn.Module], n_layers: int) -> None:
        super().__init__()
        self.offset = c.position_offset
        if c.positions == "learned":
            self.pos_emb: nn.Module = LearnedPositions(c.max_seq_len + c.position_offset, c.dim)
        else:
            self.pos_emb = SinusoidalPositions(c.max_seq_len, c.dim)
        self.emb_norm = make_norm("layernorm", c.dim, c.norm_eps) if c.embed_norm else nn.Identity()
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(block(c.block_spec()) for _ in range(n_layers))
        self.norm_f = make_norm("layernorm", c.dim, c.norm_eps) if c.norm_style == "pre" else nn.Identity()

    def embed(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """token embeddings (B, T, D) + positions (B or 1, T) -> block input (B, T, D)."""
        x = self.emb_norm(x + self.pos_emb(position_ids + self.offset))
        return self.drop(x)


class Encoder(_Stack):
    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """embedded source (B, S, D), padding mask (B, 1, 1, S) -> memory (B, S, D)."""
        x = self.embed(x, torch.arange(x.size(1), device=x.device)[None])
        for block in self.blocks:
            x = block(x, mask)
        return self.norm_f(x)


class Decoder(_Stack):
    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        self_mask: Tensor | None,
        position_ids: Tensor,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
        cache: nn.ModuleList | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """embedded target (B, T, D) attending to memory (B, S, D) -> hidden (B, T, D)."""
        x = self.embed(x, position_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, memory, self_mask, self_mask is None, memory_mask,
                      memory_kv[i] if memory_kv is not None else None,
                      cache[i] if cache is not None else None, cache_pos)
        return self.norm_f(x)


class EncoderDecoderBase(nn.Module):
    """What every encoder-decoder model (EncoderDecoder, T5) offers generation, the seq2seq
    tasks and the denoising objective: encode a source once, project its cross-attention
    keys and values once, decode with a preallocated KV cache, score with the LM head.

    A subclass builds `tok_emb`, `encoder` (forward(x, mask)), `decoder` (forward as
    `Decoder`'s), `lm_head` and `lm_bias` (a logits offset or None), and sets `emb_scale`.
    """

    config: ArchConfig
    emb_scale: float = 1.0

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """source ids (B, S), mask (B, S) 1 = token -> encoder output ("memory") (B, S, D)."""
        S = input_ids.size(1)
        if S > self.config.max_seq_len:
            raise ValueError(f"input_ids has {S} tokens, more than max_seq_len={self.config.max_seq_len}")
        mask = build_mask(S, S, causal=False, key_padding=attention_mask, device=input_ids.device)
        return self.encoder(self.tok_emb(input_ids) * self.emb_scale, mask)

    def project_memory(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every decoder layer's cross-attention keys and values, computed once per
        source for the whole generation: [(k, v), ...], each (B, H, S, Dh)."""
        return [block.cross.project_memory(memory) for block in self.decoder.blocks]

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> nn.ModuleList:
        """One preallocated self-attention KVCache per decoder block."""
        c = self.config
        dtype = dtype or compute_dtype(self)  # not the weights' own: they may be int8
        device = device or self.tok_emb.weight.device
        return nn.ModuleList(KVCache(batch_size, c.n_heads, max_len or c.max_seq_len, c.head_dim, dtype, device)
                             for _ in range(c.n_decoder_layers))

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor | None,
        attention_mask: Tensor | None = None,
        *,
        decoder_attention_mask: Tensor | None = None,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
        cache: nn.ModuleList | None = None,
        cache_pos: Tensor | None = None,
    ) -> Tensor:
        """Target ids (B, T) attending to memory (B, S, D) -> what the LM head reads (B, T, D):
        the decoder's hidden states.

        attention_mask: (B, S) source padding; decoder_attention_mask: (B, T) target
        padding (or (B, S_cache) over the first S_cache cache slots, which are all that
        self-attention reads, or a ready (B, 1, T, S_cache) bool mask, as in GPT.encode);
        memory_kv: `project_memory` output; cache/cache_pos as in GPT.encode.
        """
        T = decoder_input_ids.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"decoder_input_ids has {T} tokens, more than max_seq_len={self.config.max_seq_len}")
        device = decoder_input_ids.device
        memory_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B,1,1,S)
        self_mask = causal_self_mask(T, decoder_attention_mask, cache, cache_pos, device)
        position_ids = (cache_pos if cache is not None else torch.arange(T, device=device))[None]  # (1, T)
        x = self.tok_emb(decoder_input_ids) * self.emb_scale
        return self.decoder(x, memory, memory_mask, self_mask, position_ids, memory_kv, cache, cache_pos)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V)."""
        out = self.lm_head(hidden)
        return (out if self.lm_bias is None else out + self.lm_bias)[..., : self.config.vocab_size]

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None) -> Tensor:
        """source (B, S), target-side input (B, T) -> logits (B, T, V)."""
        memory = self.encode(input_ids, attention_mask)
        return self.logits(self.decode(decoder_input_ids, memory, attention_mask,
                                       decoder_attention_mask=decoder_attention_mask))

    def shift_right(self, labels: Tensor) -> Tensor:
        """Teacher forcing: targets (B, T) -> decoder inputs (B, T) (see `shift_right`)."""
        return shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


class EncoderDecoder(EncoderDecoderBase):
    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        pre = c.norm_style == "pre"
        self.tok_emb = nn.Embedding(c.padded_vocab_size, c.dim)
        self.encoder = Encoder(c, PreNormBlock if pre else PostNormBlock, c.n_layers)
        self.decoder = Decoder(c, PreNormDecoderBlock if pre else PostNormDecoderBlock, c.n_decoder_layers)
        self.lm_head = nn.Linear(c.dim, c.padded_vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        # A fixed per-token logit offset (BART's final_logits_bias), zero unless loaded.
        self.register_buffer("lm_bias", torch.zeros(c.padded_vocab_size))
        self.emb_scale = math.sqrt(c.dim) if c.embed_scale else 1.0
        self.init_weights()

    def init_weights(self) -> None:
        """BART: N(0, 0.02). The original Transformer: Xavier-uniform linear layers and
        N(0, D^-1/2) embeddings (they are scaled back up by sqrt(D))."""
        xavier = self.config.init == "xavier"
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight) if xavier else nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, self.config.dim**-0.5 if xavier else 0.02)
        nn.init.normal_(self.tok_emb.weight, 0.0, self.config.dim**-0.5 if xavier else 0.02)
        with torch.no_grad():
            self.tok_emb.weight[self.config.pad_token_id].zero_()


def shift_right(labels: Tensor, pad_id: int, start_id: int) -> Tensor:
    """Teacher forcing: targets (B, T) -> decoder inputs (B, T), the targets shifted right
    behind start_id (the decoder start token); ignored labels become pad_id."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_id)
    shifted[:, 0] = start_id
    return shifted
