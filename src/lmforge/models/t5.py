"""T5: the encoder-decoder of "Exploring the Limits of Transfer Learning" (T5 v1.0), and its
v1.1 layout (T5 v1.1, Flan-T5, mT5) by configuration.

source tokens -> embedding -> encoder blocks (bidirectional; relative position bias)  = memory
target tokens -> embedding -> decoder blocks: causal self-attention (causal relative
                 position bias), cross-attention to the memory, MLP
              -> final RMS norm (x D^-0.5 when the head is the tied embedding) -> LM head

What makes it a dataflow of its own, beside BART's `EncoderDecoder`:
- no position is added to the embeddings: each stack learns a scalar per head and per
  bucket of distance (`RelativePositionBias`), computed once per forward and added to the
  attention scores of all its layers (cross-attention has none);
- scores are not divided by sqrt(d_k) (the initialisation folds it into the queries);
- pre-norm blocks with RMS norms (no centring, no bias) and no biases anywhere;
- the MLP is ReLU (v1.0) or gated GELU (v1.1: "gated-gelu", act(x W_gate) * x W_up);
- v1.0 ties the LM head to the embedding and rescales the decoder output by D^-0.5 first;
  v1.1 has a head of its own and no rescaling;
- the decoder starts from the padding token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.models.config import ArchConfig
from lmforge.models.encdec import EncoderDecoderBase
from lmforge.nn.attention import causal_mask
from lmforge.nn.block import BlockSpec, PreNormBlock, PreNormDecoderBlock
from lmforge.nn.mlp import activation
from lmforge.nn.norm import RMSNorm
from lmforge.nn.position import RelativePositionBias


@dataclass
class T5Config(ArchConfig):
    """Architecture of a T5 model.

    Args:
        vocab_size: tokens in the shared vocabulary (V).
        max_seq_len: longest source or target lmforge accepts (relative positions set no
            limit of their own; this sizes the KV cache).
        dim: model width (D).
        n_layers: encoder blocks.
        n_decoder_layers: decoder blocks. None: n_layers.
        n_heads: attention heads (H).
        head_dim: width of one head (T5's d_kv; H * head_dim need not be D). None: dim // n_heads.
        hidden_dim: MLP width (F).
        mlp: "mlp" (v1.0: ReLU) or "gated" (v1.1, Flan-T5, mT5: gated GELU).
        act: the MLP's activation ("relu"; "gelu_tanh" for gated-gelu).
        norm_eps: RMS norm epsilon.
        relative_buckets: buckets of relative distance per stack.
        relative_max_distance: distances beyond this share the last bucket.
        tie_embeddings: the LM head is the token embedding (v1.0).
        scale_head_input: multiply the decoder output by D^-0.5 before the LM head (v1.0,
            whose head is the N(0, 1) embedding).
        dropout: dropout on embeddings, attention weights, the MLP and residual branches.
        pad_token_id: id of the padding token.
        decoder_start_token_id: first decoder input token (T5: the padding token).
        vocab_multiple: pad embedding rows to a multiple of this.
    """

    vocab_size: int = 32128
    max_seq_len: int = 512
    dim: int = 512
    n_layers: int = 6
    n_decoder_layers: int | None = None
    n_heads: int = 8
    head_dim: int | None = None
    hidden_dim: int = 2048
    mlp: str = "mlp"
    act: str = "relu"
    norm_eps: float = 1e-6
    relative_buckets: int = 32
    relative_max_distance: int = 128
    tie_embeddings: bool = True
    scale_head_input: bool = True
    dropout: float = 0.1
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    vocab_multiple: int = 128

    def __post_init__(self) -> None:
        self._check_positive("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "hidden_dim",
                             "relative_buckets", "relative_max_distance", "vocab_multiple")
        self._check_heads()
        self._check_choice("mlp", ("mlp", "gated"))
        activation(self.act)  # ValueError naming the known ones
        self.n_decoder_layers = self.n_decoder_layers or self.n_layers
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self._check_positive("n_decoder_layers", "head_dim")
        if self.relative_buckets < 4:  # half for each direction, half of that exact
            raise ValueError(f"T5Config.relative_buckets must be >= 4, got {self.relative_buckets}")

    def block_spec(self) -> BlockSpec:
        d = self.dropout
        return BlockSpec(self.dim, self.n_heads, self.n_heads, self.head_dim, self.hidden_dim, "rmsnorm",
                         self.norm_eps, self.mlp, self.act, False, d, d, d, attn_scale=1.0)


# Presets: the config fields each one sets (the published models' shapes; vocabularies of the
# released SentencePiece models).
_V11 = dict(mlp="gated", act="gelu_tanh", tie_embeddings=False, scale_head_input=False)
PRESETS: dict[str, dict] = {
    "t5-small": dict(head_dim=64),
    "t5-base": dict(dim=768, n_layers=12, n_heads=12, head_dim=64, hidden_dim=3072),
    "flan-t5-small": dict(n_layers=8, n_heads=6, head_dim=64, hidden_dim=1024, **_V11),
    "flan-t5-base": dict(dim=768, n_layers=12, n_heads=12, head_dim=64, hidden_dim=2048, **_V11),
    "mt5-small": dict(vocab_size=250112, n_layers=8, n_heads=6, head_dim=64, hidden_dim=1024, **_V11),
    "t5-tiny": dict(vocab_size=4096, max_seq_len=256, dim=128, n_layers=2, n_heads=4, head_dim=32,
                    hidden_dim=256, **_V11),
}


class _T5Stack(nn.Module):
    """What encoder and decoder share: embedding dropout, the relative position bias, the
    blocks, the final RMS norm and its dropout."""

    def __init__(self, c: T5Config, block: type[nn.Module], n_layers: int, causal: bool) -> None:
        super().__init__()
        self.pos_bias = RelativePositionBias(c.relative_buckets, c.relative_max_distance, c.n_heads,
                                             bidirectional=not causal)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(block(c.block_spec()) for _ in range(n_layers))
        self.norm_f = RMSNorm(c.dim, c.norm_eps)

    def attention_bias(self, mask: Tensor | None, query_pos: Tensor, S: int) -> Tensor:
        """The float mask every block's self-attention adds to its scores: the relative position
        bias of queries at query_pos (T,) over keys 0..S-1, (1, H, T, S), with -inf where the
        bool `mask` (B or 1, 1, T, S) forbids -> (B or 1, H, T, S). Computed once per forward:
        the first layer's bias serves them all."""
        bias = self.pos_bias(query_pos, torch.arange(S, device=query_pos.device))  # (1, H, T, S)
        device = query_pos.device.type
        if torch.is_autocast_enabled(device):  # once here, rather than in every layer's attention
            bias = bias.to(torch.get_autocast_dtype(device))
        return bias if mask is None else bias.masked_fill(~mask, float("-inf"))


class T5Encoder(_T5Stack):
    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """embedded source (B, S, D), padding mask (B, 1, 1, S) or None -> memory (B, S, D)."""
        S = x.size(1)
        bias = self.attention_bias(mask, torch.arange(S, device=x.device), S)  # (B or 1, H, S, S)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, bias)
        return self.drop(self.norm_f(x))


class T5Decoder(_T5Stack):
    def __init__(self, c: T5Config, n_layers: int) -> None:
        super().__init__(c, PreNormDecoderBlock, n_layers, causal=True)
        self.out_scale = c.dim**-0.5 if c.scale_head_input else 1.0

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
        """embedded target (B, T, D) attending to memory (B, S_src, D) -> what the LM head reads
        (B, T, D). self_mask: bool (B or 1, 1, T, S) over the S cache slots (or the T targets);
        None: plain causal; position_ids (1, T): the targets' positions (their cache slots)."""
        T = x.size(1)
        if self_mask is None:
            self_mask = causal_mask(T, T, x.device)[None, None]  # (1, 1, T, T)
        bias = self.attention_bias(self_mask, position_ids[0], self_mask.size(-1))  # (B or 1, H, T, S)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, memory, bias, False, memory_mask, memory_kv[i] if memory_kv is not None else None,
                      cache[i] if cache is not None else None, cache_pos)
        return self.drop(self.norm_f(x)) * self.out_scale


class T5(EncoderDecoderBase):
    """T5 (see the module docstring); the interface is `EncoderDecoderBase`'s."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.padded_vocab_size, c.dim)
        self.encoder = T5Encoder(c, PreNormBlock, c.n_layers, causal=False)
        self.decoder = T5Decoder(c, c.n_decoder_layers)
        self.lm_head = nn.Linear(c.dim, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.lm_bias = None
        self.init_weights()

    def init_weights(self, factor: float = 1.0) -> None:
        """Mesh TensorFlow's (and transformers') T5 initialisation, each std times `factor`:
        embeddings N(0, 1), an untied head N(0, D^-1/2) (T5X's fan-in scaling: unit-variance logits
        from the unit-RMS decoder output, so the loss starts near ln V; transformers draws it
        N(0, 1)); queries N(0, (D Dh)^-1/2), which stands in for
        the missing 1/sqrt(d_k); keys, values N(0, D^-1/2); attention outputs N(0, (H Dh)^-1/2);
        MLP inputs N(0, D^-1/2), outputs N(0, F^-1/2); position biases N(0, D^-1/2); norms 1."""
        c = self.config
        D, F, inner = c.dim, c.hidden_dim, c.n_heads * c.head_dim
        normal = lambda w, std: nn.init.normal_(w, 0.0, factor * std)  # noqa: E731
        normal(self.tok_emb.weight, 1.0)
        if not c.tie_embeddings:
            normal(self.lm_head.weight, D**-0.5)
        for stack in (self.encoder, self.decoder):
            normal(stack.pos_bias.weight, D**-0.5)
            for block in stack.blocks:
                q, kv = block.attn.wqkv.weight.split([inner, 2 * inner])
                normal(q, (D * c.head_dim) ** -0.5)
                normal(kv, D**-0.5)
                normal(block.attn.wo.weight, inner**-0.5)
                if hasattr(block, "cross"):
                    normal(block.cross.wq.weight, (D * c.head_dim) ** -0.5)
                    normal(block.cross.wkv.weight, D**-0.5)
                    normal(block.cross.wo.weight, inner**-0.5)
                for name, lin in block.mlp.named_children():
                    if isinstance(lin, nn.Linear):
                        normal(lin.weight, F**-0.5 if name == "down" else D**-0.5)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
