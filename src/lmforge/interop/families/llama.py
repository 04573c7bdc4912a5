"""Llama's layout and the model types that vary it: RMSNorm, RoPE, SwiGLU, grouped-query
attention, q/k/v/o and gate/up/down projections.

    llama     the plain layout (Llama 2 / 3 with its rope scaling, SmolLM)
    mistral   + a sliding attention window
    qwen2     + biases on q/k/v only (Qwen2, Qwen2.5)
    qwen3     + per-head RMSNorm of queries and keys (q_norm, k_norm)
"""

from __future__ import annotations

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import Family, act, hf_arg, linear, without_lm_head
from lmforge.models import GPTConfig


def _rope(cfg: dict, kind: str) -> tuple[float, dict | None]:
    """(rope_theta, lmforge's rope_scaling) from either config layout (rope_parameters, rope_scaling)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConversionError(f"{kind}: rope type {rope_type!r} unsupported (default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    return hf_arg(rope, "rope_theta", default=cfg.get("rope_theta", 10000.0)), scaling


def _read(cfg: dict, kind: str, **variant) -> GPTConfig:
    if act(cfg.get("hidden_act", "silu")) != "silu":
        raise ConversionError(f"{kind}: hidden_act {cfg.get('hidden_act')!r} unsupported (only silu)")
    theta, scaling = _rope(cfg, kind)
    fields = dict(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
                  dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                  n_kv_heads=cfg.get("num_key_value_heads"), head_dim=cfg.get("head_dim"),
                  hidden_dim=cfg["intermediate_size"], norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
                  positions="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu", act="silu", bias=False,
                  tie_embeddings=cfg.get("tie_word_embeddings", False), dropout=cfg.get("attention_dropout", 0.0))
    return GPTConfig(**{**fields, **variant})


def _write(c: GPTConfig, **variant) -> dict:
    rope = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else {"rope_type": "default"}
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.head_dim, intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps, hidden_act="silu",
                rope_theta=c.rope_theta, rope_scaling=c.rope_scaling and rope,
                rope_parameters={**rope, "rope_theta": c.rope_theta}, attention_dropout=c.dropout,
                tie_word_embeddings=c.tie_embeddings, **variant)


def _layout(c) -> bool:
    return (isinstance(c, GPTConfig) and c.positions == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu"
            and c.logit_softcap is None and not c.value_embeds)


def rules(c: GPTConfig, p: str) -> list[Rule]:
    qkv_bias = c.bias if c.qkv_bias is None else c.qkv_bias
    out = [Rule("tok_emb.weight", (f"{p}embed_tokens.weight",), vocab=True),
           Rule("norm_f.weight", (f"{p}norm.weight",))]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}layers.{i}."
        out += [Rule(f"{b}attn_norm.weight", (f"{h}input_layernorm.weight",)),
                Rule(f"{b}mlp_norm.weight", (f"{h}post_attention_layernorm.weight",))]
        qkv = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
        out += linear(f"{b}attn.wqkv", tuple(f"{h}self_attn.{x}_proj" for x in "qkv"), qkv_bias, qkv)
        out += linear(f"{b}attn.wo", (f"{h}self_attn.o_proj",), c.bias)
        if c.qk_norm:
            out += [Rule(f"{b}attn.{x}_norm.weight", (f"{h}self_attn.{x}_norm.weight",)) for x in "qk"]
        for x in ("gate", "up", "down"):
            out += linear(f"{b}mlp.{x}", (f"{h}mlp.{x}_proj",), c.bias)
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",), vocab=True))
    return out


def _family(model_type: str, prefix: str, read, write, matches) -> Family:
    return Family(
        model_type, read, write, matches, rules,
        classes={None: f"{prefix}ForCausalLM", "sequence-classification": f"{prefix}ForSequenceClassification",
                 "token-classification": f"{prefix}ForTokenClassification"},
        base_class=f"{prefix}Model",
        head_tensors={f"{prefix}ForSequenceClassification": "score", f"{prefix}ForTokenClassification": "score"},
        prefixes=("model.", ""), probe="embed_tokens.weight", pooling="last", tied_copies=("lm_head.weight",),
        export_class=without_lm_head(f"{prefix}Model"))


def _read_llama(cfg: dict) -> GPTConfig:
    if cfg.get("attention_bias", False) != cfg.get("mlp_bias", False):
        raise ConversionError("llama: attention_bias and mlp_bias must agree for lmforge's GPT")
    return _read(cfg, "llama", bias=cfg.get("attention_bias", False))


def _read_mistral(cfg: dict) -> GPTConfig:
    return _read(cfg, "mistral", sliding_window=cfg.get("sliding_window"))


def _read_qwen2(cfg: dict) -> GPTConfig:
    if cfg.get("use_sliding_window") and cfg.get("max_window_layers", 0) < cfg["num_hidden_layers"]:
        raise ConversionError("qwen2: use_sliding_window (a window on some layers only) is unsupported")
    return _read(cfg, "qwen2", qkv_bias=True)


def _read_qwen3(cfg: dict) -> GPTConfig:
    if cfg.get("use_sliding_window"):
        raise ConversionError("qwen3: use_sliding_window is unsupported")
    return _read(cfg, "qwen3", qk_norm=True, bias=cfg.get("attention_bias", False))


def _plain(c) -> bool:
    return c.qkv_bias in (None, c.bias) and not c.qk_norm


FAMILIES = [
    _family("qwen3", "Qwen3", _read_qwen3,
            lambda c: _write(c, attention_bias=c.bias, use_sliding_window=False),
            lambda c: _layout(c) and c.qk_norm and c.qkv_bias in (None, c.bias) and c.sliding_window is None),
    _family("qwen2", "Qwen2", _read_qwen2,
            lambda c: _write(c, use_sliding_window=False),
            lambda c: _layout(c) and c.qkv_bias is True and not c.bias and not c.qk_norm and c.sliding_window is None),
    _family("mistral", "Mistral", _read_mistral,
            lambda c: _write(c, sliding_window=c.sliding_window),
            lambda c: _layout(c) and _plain(c) and not c.bias and c.sliding_window is not None),
    _family("llama", "Llama", _read_llama,
            lambda c: _write(c, attention_bias=c.bias, mlp_bias=c.bias),
            lambda c: _layout(c) and _plain(c) and c.sliding_window is None),
]
