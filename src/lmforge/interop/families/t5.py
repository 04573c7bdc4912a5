"""T5 (model_type t5: T5 v1.0, T5 v1.1, Flan-T5) and mT5 (model_type mt5, read only: it is
T5 v1.1's layout, and exports as t5, which transformers runs identically).

Each stack keeps its relative position bias in its first layer's self-attention
(block.0.layer.0.SelfAttention.relative_attention_bias); a block's sublayers are layer.0
(self-attention), layer.1 (the decoder's cross-attention, EncDecAttention) and the last one
(DenseReluDense: wi, wo; gated: wi_0 the gate, wi_1 the linear branch, wo).

Head and rescaling: transformers 4 rescales the decoder output by d_model^-0.5 exactly when
tie_word_embeddings; transformers 5 says so in scale_decoder_outputs and always writes
tie_word_embeddings: true, keeping an untied lm_head.weight as a tensor of its own. So the
config gives the rescaling, and the checkpoint says whether the head is tied: it is unless
lm_head.weight is there and differs from the embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import HF_ACT, LM_ACT, Family, hf_arg, linear
from lmforge.models import T5Config


def _feed_forward(proj: str, kind: str) -> tuple[str, str]:
    """feed_forward_proj ("relu", "gated-gelu", ...) -> (lmforge mlp, act)."""
    gated, _, name = proj.rpartition("-")
    if gated not in ("", "gated") or name not in HF_ACT:
        raise ConversionError(f"{kind}: feed_forward_proj {proj!r} unsupported (e.g. 'relu', 'gated-gelu')")
    if gated:  # transformers' gated-gelu is the tanh approximation ("gelu_new")
        return "gated", "gelu_tanh" if name == "gelu" else HF_ACT[name]
    return "mlp", HF_ACT[name]


def _read(cfg: dict, kind: str, scale: bool) -> T5Config:
    mlp, act = _feed_forward(cfg.get("feed_forward_proj", "relu" if kind == "t5" else "gated-gelu"), kind)
    return T5Config(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("n_positions", 512), dim=cfg["d_model"],
                    n_layers=cfg["num_layers"], n_decoder_layers=cfg.get("num_decoder_layers"),
                    n_heads=cfg["num_heads"], head_dim=cfg["d_kv"], hidden_dim=cfg["d_ff"], mlp=mlp, act=act,
                    norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
                    relative_buckets=cfg.get("relative_attention_num_buckets", 32),
                    relative_max_distance=cfg.get("relative_attention_max_distance", 128),
                    # a first guess from config.json alone (the planner's); `tied_from_tensors` decides
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", True)) and scale, scale_head_input=scale,
                    dropout=cfg.get("dropout_rate", 0.1), pad_token_id=hf_arg(cfg, "pad_token_id", default=0),
                    decoder_start_token_id=hf_arg(cfg, "decoder_start_token_id", "pad_token_id", default=0))


def read_t5(cfg: dict) -> T5Config:
    return _read(cfg, "t5", bool(hf_arg(cfg, "scale_decoder_outputs", "tie_word_embeddings", default=True)))


def read_mt5(cfg: dict) -> T5Config:
    # transformers 5's MT5 never rescales (4 did when tie_word_embeddings, which mT5 checkpoints leave false).
    return _read(cfg, "mt5", False)


def tied_from_tensors(c: T5Config, tensors: Mapping[str, Tensor]) -> T5Config:
    """Whether the head is tied, from the checkpoint: it is unless lm_head.weight is a tensor of
    its own (transformers 5 writes tie_word_embeddings: true for untied T5s too)."""
    head, emb = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    tied = head is None or (emb is not None and head.shape == emb.shape and torch.equal(head, emb))
    return dataclasses.replace(c, tie_embeddings=tied)


def _proj(c: T5Config) -> str | None:
    """lmforge's mlp and act -> feed_forward_proj, or None when transformers has no name for them
    ("gated-gelu" is the tanh GELU, so an exact-GELU gated MLP has none)."""
    if c.mlp != "gated":
        return LM_ACT[c.act]
    return "gated-gelu" if c.act == "gelu_tanh" else None if c.act == "gelu" else f"gated-{LM_ACT[c.act]}"


def write_t5(c: T5Config) -> dict:
    proj = _proj(c)
    if proj is None:
        raise ConversionError(f"t5: transformers has no feed_forward_proj for mlp={c.mlp!r} with act={c.act!r}")
    # is_encoder_decoder is T5Config's default; not writing it keeps BART's forced EOS out of T5's config.
    return dict(vocab_size=c.vocab_size, n_positions=c.max_seq_len, d_model=c.dim, num_layers=c.n_layers,
                num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads, d_kv=c.head_dim, d_ff=c.hidden_dim,
                feed_forward_proj=proj, layer_norm_epsilon=c.norm_eps,
                relative_attention_num_buckets=c.relative_buckets,
                relative_attention_max_distance=c.relative_max_distance, dropout_rate=c.dropout,
                tie_word_embeddings=c.tie_embeddings, scale_decoder_outputs=c.scale_head_input,
                pad_token_id=c.pad_token_id, decoder_start_token_id=c.decoder_start_token_id)


def rules(c: T5Config, p: str) -> list[Rule]:
    out = [Rule("tok_emb.weight", (f"{p}shared.weight",), vocab=True)]
    for side, n in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
        s = f"{p}{side}."
        out += [Rule(f"{side}.pos_bias.weight", (f"{s}block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
                Rule(f"{side}.norm_f.weight", (f"{s}final_layer_norm.weight",))]
        for i in range(n):
            b, h = f"{side}.blocks.{i}.", f"{s}block.{i}.layer."
            out += linear(f"{b}attn.wqkv", tuple(f"{h}0.SelfAttention.{x}" for x in "qkv"), False)
            out += linear(f"{b}attn.wo", (f"{h}0.SelfAttention.o",), False)
            out.append(Rule(f"{b}attn_norm.weight", (f"{h}0.layer_norm.weight",)))
            ff = f"{h}2." if side == "decoder" else f"{h}1."
            if side == "decoder":
                out += linear(f"{b}cross.wq", (f"{h}1.EncDecAttention.q",), False)
                out += linear(f"{b}cross.wkv", (f"{h}1.EncDecAttention.k", f"{h}1.EncDecAttention.v"), False)
                out += linear(f"{b}cross.wo", (f"{h}1.EncDecAttention.o",), False)
                out.append(Rule(f"{b}cross_norm.weight", (f"{h}1.layer_norm.weight",)))
            out.append(Rule(f"{b}mlp_norm.weight", (f"{ff}layer_norm.weight",)))
            if c.mlp == "gated":
                out += linear(f"{b}mlp.gate", (f"{ff}DenseReluDense.wi_0",), False)
                out += linear(f"{b}mlp.up", (f"{ff}DenseReluDense.wi_1",), False)
            else:
                out += linear(f"{b}mlp.up", (f"{ff}DenseReluDense.wi",), False)
            out += linear(f"{b}mlp.down", (f"{ff}DenseReluDense.wo",), False)
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",), vocab=True))
    return out


def _family(model_type: str, prefix: str, read, write, matches) -> Family:
    return Family(
        model_type, read, write, matches, rules,
        classes={None: f"{prefix}ForConditionalGeneration"}, base_class=f"{prefix}Model", head_tensors={},
        prefixes=("",), probe="shared.weight",
        tied_copies=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
        from_tensors=tied_from_tensors)


def _no_write(c: T5Config) -> dict:
    raise ConversionError("mt5 is written as t5")


T5 = _family("t5", "T5", read_t5, write_t5, lambda c: isinstance(c, T5Config) and _proj(c) is not None)
MT5 = _family("mt5", "MT5", read_mt5, _no_write, lambda c: False)
FAMILIES = [T5, MT5]
