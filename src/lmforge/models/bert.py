"""Bert: the encoder-only Transformer, pretrained by masked LM + next sentence prediction.

tokens + positions + segment (token type) embeddings -> LayerNorm -> dropout
       -> n_layers x post-LN block (bidirectional self-attention, MLP)
       -> hidden states, read by: the MLM head (every position, or only the masked
          ones), the pooler (tanh(W h_[CLS])) and the NSP head on the pooled vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.config import ArchConfig
from lmforge.nn.attention import build_mask
from lmforge.nn.block import BlockSpec, PostNormBlock
from lmforge.nn.mlp import activation


@dataclass
class BertConfig(ArchConfig):
    """Architecture of a BERT encoder.

    Args:
        vocab_size: tokens in the vocabulary (V).
        max_seq_len: longest sequence (number of learned positions).
        dim: model width (D).
        n_layers: number of blocks.
        n_heads: attention heads (H).
        hidden_dim: MLP width (F). None: 4 * dim.
        type_vocab_size: number of segment (token type) embeddings.
        norm_eps: LayerNorm epsilon.
        act: MLP activation.
        dropout: dropout on embeddings and residual branches.
        attn_dropout: dropout on attention weights.
        pad_token_id: id of [PAD] (its embedding row starts at zero).
        vocab_multiple: pad embedding rows to a multiple of this.
    """

    vocab_size: int = 30522
    max_seq_len: int = 512
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int | None = None
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    act: str = "gelu"
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_token_id: int = 0
    vocab_multiple: int = 128

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "type_vocab_size")
        self._check_heads()
        activation(self.act)
        self.hidden_dim = self.hidden_dim or 4 * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def block_spec(self) -> BlockSpec:
        return BlockSpec(self.dim, self.n_heads, self.n_heads, self.head_dim, self.hidden_dim, "layernorm",
                         self.norm_eps, "mlp", self.act, True, self.dropout, self.attn_dropout)


# Presets: the config fields each one sets; derived fields (head_dim, ...) follow overrides.
PRESETS: dict[str, dict] = {
    "bert-base": dict(),
    "bert-large": dict(dim=1024, n_layers=24, n_heads=16),
    "bert-tiny": dict(dim=128, n_layers=2, n_heads=2),
    "bert-mini": dict(dim=256, n_layers=4, n_heads=4),
}


class MLMHead(nn.Module):
    """hidden (..., D) -> vocabulary logits (..., Vpad): dense -> act -> LayerNorm -> decoder.
    The decoder's weight is the token embedding (tied); its bias is its own."""

    def __init__(self, c: BertConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(c.dim, c.dim)
        self.act = activation(c.act)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.decoder = nn.Linear(c.dim, c.padded_vocab_size)
        self.decoder.weight = embedding.weight

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.padded_vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.dim)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.dim)
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(PostNormBlock(c.block_spec()) for _ in range(c.n_layers))
        self.pooler = nn.Linear(c.dim, c.dim)
        self.lm_head = MLMHead(c, self.tok_emb)
        self.nsp_head = nn.Linear(c.dim, 2)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, 0.02) weights, zero biases, the [PAD] embedding row at zero (BERT)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if 0 <= self.config.pad_token_id < self.config.vocab_size:
            with torch.no_grad():
                self.tok_emb.weight[self.config.pad_token_id].zero_()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = token / 0 = padding, token_type_ids
        (B, T) segment A = 0 / B = 1 -> hidden states (B, T, D)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids has {T} tokens, more than max_seq_len={self.config.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)  # (B, T, D)
        x = self.drop(self.emb_norm(x))
        mask = build_mask(T, T, causal=False, key_padding=attention_mask, device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, D): tanh(W h_[CLS] + b), the sentence vector NSP reads."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V). Pass only the masked positions to skip the rest of the vocab GEMM."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, 2): logit 0 = B follows A, 1 = B is random (BERT's convention)."""
        return self.nsp_head(self.pool(hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """-> MLM logits (B, T, V)."""
        return self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids))
