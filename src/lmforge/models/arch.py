"""A family-agnostic view of a model config, and its exact parameter count.

The planner (and the check that a model fits in memory before it is built) never builds
the model: it reads the config, describes every stack of blocks (`Stack`), every linear
layer (`Linear`) and every norm, and counts parameters from those — the same tensors
`lmforge.models.count_params` walks, each shared tensor (the tied embedding / LM head)
once. The tests check equality with a model built on the meta device for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.models import ENCODER_DECODERS, BertConfig, EncoderDecoderConfig, GPTConfig, ModelConfig, T5Config
from lmforge.nn.block import BlockSpec

#: The linear layers LoRA may target, by their module name (the last path component).
LORA_TARGETS = ("wqkv", "wo", "wq", "wkv", "up", "down", "gate")


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a block: name, in -> out features, bias, and which sublayer."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    where: str  # "attn" | "cross" | "mlp"

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class Stack:
    """n_layers identical blocks: a GPT's or Bert's blocks, an encoder's or a decoder's.

    order: "pre" (x + f(norm(x))) or "post" (norm(x + f(x))); causal: causal self-
    attention; cross: cross-attention to the encoder output (decoder blocks);
    position_bias: a learned bias added to the self-attention scores, one for the stack (T5).
    """

    name: str
    n_layers: int
    spec: BlockSpec
    order: str
    causal: bool
    cross: bool = False
    position_bias: bool = False

    def linears(self) -> list[Linear]:
        s = self.spec
        qkv = (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        qkv_bias = s.bias if s.qkv_bias is None else s.qkv_bias
        out = [Linear("wqkv", s.dim, qkv, qkv_bias, "attn"),
               Linear("wo", s.n_heads * s.head_dim, s.dim, s.bias, "attn")]
        if self.cross:  # CrossAttention: H heads of head_dim (H * head_dim = dim but in T5)
            inner = s.n_heads * s.head_dim
            out += [Linear("wq", s.dim, inner, s.bias, "cross"), Linear("wkv", s.dim, 2 * inner, s.bias, "cross"),
                    Linear("wo", inner, s.dim, s.bias, "cross")]
        if s.mlp in ("swiglu", "gated"):
            out.append(Linear("gate", s.dim, s.hidden_dim, s.bias, "mlp"))
        out += [Linear("up", s.dim, s.hidden_dim, s.bias, "mlp"), Linear("down", s.hidden_dim, s.dim, s.bias, "mlp")]
        return out

    @property
    def n_norms(self) -> int:
        return 3 if self.cross else 2

    def norm_params(self) -> int:
        return norm_params(self.spec.norm, self.spec.dim, self.spec.bias)

    def block_params(self) -> int:
        """Parameters of one block (QK-norm: a gain per head dimension for queries and keys)."""
        qk_norm = 2 * self.spec.head_dim if self.spec.qk_norm else 0
        return sum(lin.params for lin in self.linears()) + self.n_norms * self.norm_params() + qk_norm


def norm_params(kind: str, dim: int, bias: bool = True) -> int:
    """LayerNorm: weight (+ bias); RMSNorm: weight."""
    return dim * (2 if kind == "layernorm" and bias else 1)


@dataclass(frozen=True)
class Arch:
    """Everything the planner needs about a model, for every family.

    Parameter groups outside the blocks are listed in `extra` as name -> count, with
    the embedding tables (token, learned positions, segments) named in `embedding_names`.
    """

    family: str
    config: ModelConfig
    stacks: tuple[Stack, ...]
    dim: int
    vocab_size: int
    padded_vocab: int
    extra: dict[str, int] = field(default_factory=dict)
    position_names: tuple[str, ...] = ()
    embedding_names: tuple[str, ...] = ()
    tied_head: bool = True

    @property
    def n_layers(self) -> int:
        return sum(s.n_layers for s in self.stacks)

    @property
    def block_params(self) -> int:
        return sum(s.n_layers * s.block_params() for s in self.stacks)

    @property
    def total_params(self) -> int:
        return self.block_params + sum(self.extra.values())

    @property
    def embedding_params(self) -> int:
        """Token, learned-position and segment embedding tables (input-side lookups)."""
        return sum(self.extra[n] for n in self.embedding_names)

    @property
    def position_params(self) -> int:
        return sum(self.extra[n] for n in self.position_names)

    @property
    def encoder_decoder(self) -> bool:
        """An encoder stack and a decoder stack reading it (EncoderDecoder, T5)."""
        return self.family in ENCODER_DECODERS

    def linears(self) -> list[tuple[Stack, Linear]]:
        """(stack, linear) for one block of each stack."""
        return [(s, lin) for s in self.stacks for lin in s.linears()]


def arch_of(c: ModelConfig) -> Arch:
    """The planner's view of a model config."""
    if isinstance(c, GPTConfig):
        return _gpt(c)
    if isinstance(c, BertConfig):
        return _bert(c)
    if isinstance(c, EncoderDecoderConfig):
        return _encdec(c)
    if isinstance(c, T5Config):
        return _t5(c)
    raise TypeError(f"not a model config: {type(c).__name__}")


def _gpt(c: GPTConfig) -> Arch:
    D, Vp = c.dim, c.padded_vocab_size
    extra = {"tok_emb": Vp * D, "norm_f": norm_params(c.norm, D, c.bias)}
    positions: tuple[str, ...] = ()
    if c.positions == "learned":  # sinusoidal and rotary tables are buffers, not parameters
        extra["pos_emb"] = c.max_seq_len * D
        positions = ("pos_emb",)
    if not c.tie_embeddings:
        extra["lm_head"] = Vp * D
    embeddings: tuple[str, ...] = ("tok_emb", *positions)
    if c.value_embeds:  # the tables, and two mixing scalars in each layer that reads one
        extra["value_emb"] = c.value_embeds * Vp * c.n_kv_heads * c.head_dim
        extra["value_mix"] = 2 * 2 * c.value_embeds
        embeddings += ("value_emb",)
    stack = Stack("blocks", c.n_layers, c.block_spec(), "pre", causal=True)
    return Arch("gpt", c, (stack,), D, c.vocab_size, Vp, extra, positions, embeddings, c.tie_embeddings)


def _bert(c: BertConfig) -> Arch:
    D, Vp = c.dim, c.padded_vocab_size
    extra = {"tok_emb": Vp * D}
    positions: tuple[str, ...] = ()
    if c.positions != "sinusoidal":  # a sinusoidal table is a buffer, not parameters
        extra["pos_emb"] = c.n_positions * D
        positions = ("pos_emb",)
    if c.type_vocab_size:
        extra["type_emb"] = c.type_vocab_size * D
    extra["emb_norm"] = 2 * D
    if c.pooler:
        extra["pooler"] = D * D + D
    extra["mlm_head"] = D * D + D + 2 * D + Vp  # dense, LayerNorm, decoder bias (decoder weight is tok_emb)
    if c.nsp:
        extra["nsp_head"] = 2 * D + 2
    stack = Stack("blocks", c.n_layers, c.block_spec(), "post", causal=False)
    embeddings = ("tok_emb", *positions, *(("type_emb",) if c.type_vocab_size else ()))
    return Arch("bert", c, (stack,), D, c.vocab_size, Vp, extra, positions, embeddings)


def _encdec(c: EncoderDecoderConfig) -> Arch:
    D, Vp = c.dim, c.padded_vocab_size
    extra = {"tok_emb": Vp * D}
    positions: tuple[str, ...] = ()
    for side in ("encoder", "decoder"):
        if c.positions == "learned":
            extra[f"{side}.pos_emb"] = (c.max_seq_len + c.position_offset) * D
            positions += (f"{side}.pos_emb",)
        if c.embed_norm:
            extra[f"{side}.emb_norm"] = 2 * D
        if c.norm_style == "pre":
            extra[f"{side}.norm_f"] = 2 * D
    order = c.norm_style
    stacks = (Stack("encoder", c.n_layers, c.block_spec(), order, causal=False),
              Stack("decoder", c.n_decoder_layers, c.block_spec(), order, causal=True, cross=True))
    return Arch("encdec", c, stacks, D, c.vocab_size, Vp, extra, positions, ("tok_emb", *positions))


def _t5(c: T5Config) -> Arch:
    """T5: no position tables; each stack has a (buckets, H) relative position bias and a final
    RMS norm; the LM head is its own matrix unless tied."""
    D, Vp = c.dim, c.padded_vocab_size
    extra = {"tok_emb": Vp * D}
    for side in ("encoder", "decoder"):
        extra[f"{side}.pos_bias"] = c.relative_buckets * c.n_heads
        extra[f"{side}.norm_f"] = D
    if not c.tie_embeddings:
        extra["lm_head"] = Vp * D
    stacks = (Stack("encoder", c.n_layers, c.block_spec(), "pre", causal=False, position_bias=True),
              Stack("decoder", c.n_decoder_layers, c.block_spec(), "pre", causal=True, cross=True,
                    position_bias=True))
    return Arch("t5", c, stacks, D, c.vocab_size, Vp, extra, (), ("tok_emb",), c.tie_embeddings)


def lora_params(arch: Arch, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters: A (rank x in) and B (out x rank) for every targeted linear."""
    if rank <= 0:
        return 0
    return sum(s.n_layers * rank * (lin.d_in + lin.d_out) for s, lin in arch.linears() if lin.name in targets)


def check_lora_targets(targets: tuple[str, ...]) -> None:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"lora_targets: unknown or empty {unknown or list(targets)}; choose from {LORA_TARGETS}")


def available_memory() -> int | None:
    """Bytes this process could still allocate on the CPU (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(config: ModelConfig, bytes_per_param: int = 4, where: str = "") -> None:
    """Refuse, before anything is allocated, a model whose weights alone exceed the free
    memory (a config.json with an impossible vocab_size would otherwise try for terabytes):
    ValueError giving the size and the fields to check."""
    arch = arch_of(config)
    need, free = arch.total_params * bytes_per_param, available_memory()
    if free is not None and need > free:
        raise ValueError(f"{where}{arch.total_params:,} parameters ({need / 2**30:,.1f} GiB of weights) do not fit "
                         f"in the {free / 2**30:,.1f} GiB of free memory: check vocab_size ({arch.vocab_size:,}), "
                         f"dim ({arch.dim:,}) and the layer counts in the config")
