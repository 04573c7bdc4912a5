"""BART (model_type bart): post-LN encoder-decoder with learned positions offset by 2, a
LayerNorm on each side's embeddings, and a bias on the logits (final_logits_bias)."""

from __future__ import annotations

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import LM_ACT, Family, act, hf_arg, layer_norm, linear
from lmforge.models import EncoderDecoderConfig, HeadSpec


def read_config(cfg: dict) -> EncoderDecoderConfig:
    if cfg["encoder_attention_heads"] != cfg["decoder_attention_heads"] or \
            cfg["encoder_ffn_dim"] != cfg["decoder_ffn_dim"]:
        raise ConversionError("bart: encoder and decoder must have the same heads and FFN width")
    return EncoderDecoderConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"],
                                dim=cfg["d_model"], n_layers=cfg["encoder_layers"],
                                n_decoder_layers=cfg["decoder_layers"], n_heads=cfg["encoder_attention_heads"],
                                hidden_dim=cfg["encoder_ffn_dim"], norm_style="post", positions="learned",
                                position_offset=2, act=act(cfg.get("activation_function", "gelu")),
                                embed_scale=cfg.get("scale_embedding", False), embed_norm=True,
                                dropout=cfg.get("dropout", 0.1), attn_dropout=cfg.get("attention_dropout", 0.0),
                                act_dropout=cfg.get("activation_dropout", 0.0),
                                pad_token_id=hf_arg(cfg, "pad_token_id", default=1),
                                decoder_start_token_id=hf_arg(cfg, "decoder_start_token_id", default=2))


def write_config(c: EncoderDecoderConfig) -> dict:
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, d_model=c.dim,
                encoder_layers=c.n_layers, decoder_layers=c.n_decoder_layers, encoder_attention_heads=c.n_heads,
                decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.hidden_dim, decoder_ffn_dim=c.hidden_dim,
                activation_function=LM_ACT[c.act], scale_embedding=c.embed_scale, dropout=c.dropout,
                attention_dropout=c.attn_dropout, activation_dropout=c.act_dropout, pad_token_id=c.pad_token_id,
                decoder_start_token_id=c.decoder_start_token_id, is_encoder_decoder=True, tie_word_embeddings=True)


def matches(c) -> bool:
    return (isinstance(c, EncoderDecoderConfig) and c.norm_style == "post" and c.positions == "learned"
            and c.embed_norm and c.position_offset == 2)


def rules(c: EncoderDecoderConfig, p: str) -> list[Rule]:
    out = [Rule("tok_emb.weight", (f"{p}shared.weight",), vocab=True)]
    for side in ("encoder", "decoder"):
        s = f"{p}{side}."
        out += [Rule(f"{side}.pos_emb.weight", (f"{s}embed_positions.weight",)),
                *layer_norm(f"{side}.emb_norm", f"{s}layernorm_embedding")]
        n = c.n_layers if side == "encoder" else c.n_decoder_layers
        for i in range(n):
            b, h = f"{side}.blocks.{i}.", f"{s}layers.{i}."
            out += linear(f"{b}attn.wqkv", tuple(f"{h}self_attn.{x}_proj" for x in "qkv"), True)
            out += linear(f"{b}attn.wo", (f"{h}self_attn.out_proj",), True)
            out += layer_norm(f"{b}attn_norm", f"{h}self_attn_layer_norm")
            if side == "decoder":
                out += linear(f"{b}cross.wq", (f"{h}encoder_attn.q_proj",), True)
                out += linear(f"{b}cross.wkv", (f"{h}encoder_attn.k_proj", f"{h}encoder_attn.v_proj"), True)
                out += linear(f"{b}cross.wo", (f"{h}encoder_attn.out_proj",), True)
                out += layer_norm(f"{b}cross_norm", f"{h}encoder_attn_layer_norm")
            out += linear(f"{b}mlp.up", (f"{h}fc1",), True)
            out += linear(f"{b}mlp.down", (f"{h}fc2",), True)
            out += layer_norm(f"{b}mlp_norm", f"{h}final_layer_norm")
    return out


def class_rules(out: list[Rule], c: EncoderDecoderConfig, head: HeadSpec | None, arch: str) -> list[Rule]:
    """The logits bias (optional: BartModel checkpoints have none)."""
    return out + [Rule("lm_bias", ("final_logits_bias",), vocab=True, optional=True)] if head is None else out


BART = Family(
    "bart", read_config, write_config, matches, rules,
    classes={None: "BartForConditionalGeneration"}, base_class="BartModel", head_tensors={},
    prefixes=("model.", ""), probe="shared.weight",
    tied_copies=("{p}encoder.embed_tokens.weight", "{p}decoder.embed_tokens.weight", "lm_head.weight"),
    class_rules=class_rules)
