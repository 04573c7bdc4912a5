"""Bert: the encoder-only Transformer, pretrained by masked LM (+ next sentence prediction).

tokens + positions (+ segment / token type) embeddings -> LayerNorm -> dropout
       -> n_layers x post-LN block (bidirectional self-attention, MLP)
       -> hidden states, read by: the MLM head (every position, or only the masked
          ones), the pooler (tanh(W h_[CLS])) and the NSP head on the pooled vector.

The encoders that followed BERT keep this dataflow and change its parts, which the
config names:
    BERT        positions "learned", 2 segments, pooler, NSP head
    RoBERTa     positions "learned_skip_pad" (numbered from pad_id + 1, padding skipped),
                1 segment, pooler, no NSP head (XLM-RoBERTa: the same, another vocabulary)
    DistilBERT  positions "learned" or "sinusoidal", no segments, no pooler, no NSP head
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.config import ArchConfig
from lmforge.nn.attention import build_mask
from lmforge.nn.block import BlockSpec, PostNormBlock
from lmforge.nn.mlp import activation
from lmforge.nn.position import LearnedPositions, PaddingSkippingPositions, SinusoidalPositions

POSITIONS = {"learned": LearnedPositions, "learned_skip_pad": PaddingSkippingPositions,
             "sinusoidal": SinusoidalPositions}


@dataclass
class BertConfig(ArchConfig):
    """Architecture of a BERT encoder.

    Args:
        vocab_size: tokens in the vocabulary (V).
        max_seq_len: longest sequence, in tokens.
        dim: model width (D).
        n_layers: number of blocks.
        n_heads: attention heads (H).
        hidden_dim: MLP width (F). None: 4 * dim.
        type_vocab_size: number of segment (token type) embeddings; 0: none (DistilBERT).
            With 1 (RoBERTa) its one row is added everywhere and token_type_ids are ignored.
        norm_eps: LayerNorm epsilon.
        act: MLP activation.
        dropout: dropout on embeddings and residual branches.
        attn_dropout: dropout on attention weights.
        pad_token_id: id of [PAD] (its embedding row starts at zero; "learned_skip_pad"
            positions count from it).
        positions: "learned" (BERT: a row per position 0, 1, ...), "learned_skip_pad"
            (RoBERTa: real tokens numbered from pad_token_id + 1, padding skipped; the table
            has max_seq_len + pad_token_id + 1 rows) or "sinusoidal" (a fixed table).
        pooler: BERT's pooler tanh(W h_[CLS]) (DistilBERT has none).
        nsp: the next-sentence head on the pooler (BERT; RoBERTa and DistilBERT have none).
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
    positions: str = "learned"
    pooler: bool = True
    nsp: bool = True
    vocab_multiple: int = 128

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads")
        self._check_heads()
        self._check_choice("positions", tuple(POSITIONS))
        activation(self.act)
        self.hidden_dim = self.hidden_dim or 4 * self.dim
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"BertConfig.type_vocab_size must be an integer >= 0, got {self.type_vocab_size!r}")
        if self.nsp and not self.pooler:
            raise ValueError("BertConfig.nsp: the next-sentence head reads the pooler; set pooler=True or nsp=False")
        if self.positions == "learned_skip_pad" and not (isinstance(self.pad_token_id, int) and self.pad_token_id >= 0):
            raise ValueError(f"BertConfig.pad_token_id must be an id >= 0 for learned_skip_pad positions, "
                             f"got {self.pad_token_id!r}")

    @property
    def n_positions(self) -> int:
        """Rows of the position table: max_seq_len, plus the pad_token_id + 1 rows that
        "learned_skip_pad" numbering starts after."""
        return self.max_seq_len + (self.pad_token_id + 1 if self.positions == "learned_skip_pad" else 0)

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
    "roberta-base": dict(vocab_size=50265, positions="learned_skip_pad", type_vocab_size=1, pad_token_id=1,
                         norm_eps=1e-5, nsp=False),
    "distilbert-base": dict(n_layers=6, type_vocab_size=0, pooler=False, nsp=False),
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
        if c.positions == "learned_skip_pad":
            self.pos_emb: nn.Module = PaddingSkippingPositions(c.max_seq_len, c.dim, c.pad_token_id)
        else:
            self.pos_emb = POSITIONS[c.positions](c.max_seq_len, c.dim)
        # Absent parts are None, so that every encoder has the same attributes.
        self.type_emb = nn.Embedding(c.type_vocab_size, c.dim) if c.type_vocab_size else None
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(PostNormBlock(c.block_spec()) for _ in range(c.n_layers))
        self.pooler = nn.Linear(c.dim, c.dim) if c.pooler else None
        self.lm_head = MLMHead(c, self.tok_emb)
        self.nsp_head = nn.Linear(c.dim, 2) if c.nsp else None
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, 0.02) weights, zero biases, the [PAD] embedding row at zero (BERT), and the
        padding tokens' position row too for learned_skip_pad positions (RoBERTa)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        pad = self.config.pad_token_id
        with torch.no_grad():
            if 0 <= pad < self.config.vocab_size:
                self.tok_emb.weight[pad].zero_()
            if isinstance(self.pos_emb, PaddingSkippingPositions):
                self.pos_emb.weight[pad].zero_()

    def position_ids(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, T) -> position ids: (1, T) 0 .. T-1, or (B, T) numbered past the
        padding for learned_skip_pad positions."""
        if isinstance(self.pos_emb, PaddingSkippingPositions):
            return self.pos_emb.position_ids(input_ids)
        return torch.arange(input_ids.size(1), device=input_ids.device)[None]

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = token / 0 = padding, token_type_ids
        (B, T) segment A = 0 / B = 1 -> hidden states (B, T, D). Segments are read only by a
        model with two or more of them."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids has {T} tokens, more than max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(input_ids) + self.pos_emb(self.position_ids(input_ids))  # (B, T, D)
        if self.type_emb is not None:
            if token_type_ids is None or self.config.type_vocab_size == 1:
                token_type_ids = torch.zeros_like(input_ids)  # every token in segment 0
            x = x + self.type_emb(token_type_ids)
        x = self.drop(self.emb_norm(x))
        mask = build_mask(T, T, causal=False, key_padding=attention_mask, device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, D): tanh(W h_[CLS] + b), the sentence vector NSP reads."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (BertConfig.pooler is False)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V). Pass only the masked positions to skip the rest of the vocab GEMM."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def nsp_logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, 2): logit 0 = B follows A, 1 = B is random (BERT's convention)."""
        if self.nsp_head is None:
            raise ValueError("this encoder has no next-sentence head (BertConfig.nsp is False): "
                             "pretrain it with objective mlm")
        return self.nsp_head(self.pool(hidden))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """-> MLM logits (B, T, V)."""
        return self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids))
