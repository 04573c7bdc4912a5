"""Hugging Face checkpoints in and out: config maps and state-dict maps.

This is the only module where Hugging Face's names appear. Each supported
model_type has a config translation (both ways) and a list of `Rule`s pairing an
lmforge tensor with the Hugging Face tensor(s) it is made of. Conversion is strict:
every tensor of the checkpoint must be used and every tensor of the model filled
(except heads that a checkpoint may lack, which are reported as freshly
initialised); a shape mismatch names the tensor and the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor, nn

from lmforge.files import atomic_write_bytes, atomic_write_json
from lmforge.interop.convert import ConversionError, Rule, gather, scatter
from lmforge.models import (
    BertConfig,
    EncoderDecoderConfig,
    GPTConfig,
    HeadSpec,
    ModelConfig,
    attach_head,
    build,
)
from lmforge.models.arch import check_fits
from lmforge.models.provenance import set_untrained, untrained
from lmforge.models.weights import read_safetensors, unique_state_dict

SUPPORTED = ("gpt2", "llama", "bert", "bart")

# Buffers some checkpoints carry that hold no learned state (causal masks, cached
# position ids, RoPE frequencies): skipped on load.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "rotary_emb.inv_freq")

HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
          "silu": "silu", "swish": "silu"}
LM_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _hf_arg(cfg: dict, *names: str, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


# ----------------------------------------------------------------------------- configs


def config_from_hf(cfg: dict) -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> the lmforge architecture config."""
    kind = cfg.get("model_type")
    if kind == "gpt2":
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ConversionError("gpt2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported")
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["n_positions"], dim=cfg["n_embd"],
                         n_layers=cfg["n_layer"], n_heads=cfg["n_head"], hidden_dim=cfg.get("n_inner"),
                         norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), positions="learned",
                         mlp="mlp", act=_act(cfg.get("activation_function", "gelu_new")), bias=True,
                         tie_embeddings=cfg.get("tie_word_embeddings", True),
                         dropout=cfg.get("resid_pdrop", 0.1))
    if kind == "llama":
        if cfg.get("attention_bias", False) != cfg.get("mlp_bias", False):
            raise ConversionError("llama: attention_bias and mlp_bias must agree for lmforge's GPT")
        if _act(cfg.get("hidden_act", "silu")) != "silu":
            raise ConversionError(f"llama: hidden_act {cfg.get('hidden_act')!r} unsupported (only silu)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConversionError(f"llama: rope type {rope_type!r} unsupported (default, llama3)")
        scaling = None
        if rope_type == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
                         dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                         n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                         head_dim=cfg.get("head_dim"), hidden_dim=cfg["intermediate_size"], norm="rmsnorm",
                         norm_eps=cfg.get("rms_norm_eps", 1e-6), positions="rope",
                         rope_theta=_hf_arg(rope, "rope_theta", default=cfg.get("rope_theta", 10000.0)),
                         rope_scaling=scaling, mlp="swiglu", act="silu", bias=cfg.get("attention_bias", False),
                         tie_embeddings=cfg.get("tie_word_embeddings", False),
                         dropout=cfg.get("attention_dropout", 0.0))
    if kind == "bert":
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("bert: only absolute position embeddings are supported")
        return BertConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 512),
                          dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                          n_heads=cfg["num_attention_heads"], hidden_dim=cfg["intermediate_size"],
                          type_vocab_size=cfg.get("type_vocab_size", 2), norm_eps=cfg.get("layer_norm_eps", 1e-12),
                          act=_act(cfg.get("hidden_act", "gelu")), dropout=cfg.get("hidden_dropout_prob", 0.1),
                          attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
                          pad_token_id=cfg.get("pad_token_id") or 0)
    if kind == "bart":
        if cfg["encoder_attention_heads"] != cfg["decoder_attention_heads"] or \
                cfg["encoder_ffn_dim"] != cfg["decoder_ffn_dim"]:
            raise ConversionError("bart: encoder and decoder must have the same heads and FFN width")
        return EncoderDecoderConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"],
                                    dim=cfg["d_model"], n_layers=cfg["encoder_layers"],
                                    n_decoder_layers=cfg["decoder_layers"], n_heads=cfg["encoder_attention_heads"],
                                    hidden_dim=cfg["encoder_ffn_dim"], norm_style="post", positions="learned",
                                    position_offset=2, act=_act(cfg.get("activation_function", "gelu")),
                                    embed_scale=cfg.get("scale_embedding", False), embed_norm=True,
                                    dropout=cfg.get("dropout", 0.1), attn_dropout=cfg.get("attention_dropout", 0.0),
                                    act_dropout=cfg.get("activation_dropout", 0.0),
                                    pad_token_id=_hf_arg(cfg, "pad_token_id", default=1),
                                    decoder_start_token_id=_hf_arg(cfg, "decoder_start_token_id", default=2))
    raise ConversionError(f"unsupported model_type {kind!r}; supported: {', '.join(SUPPORTED)}")


def _act(name: str) -> str:
    if name not in HF_ACT:
        raise ConversionError(f"unsupported activation {name!r}")
    return HF_ACT[name]


def model_type_of(config: ModelConfig) -> str:
    """Which Hugging Face model_type an lmforge config exports to."""
    if isinstance(config, GPTConfig):
        if config.positions == "learned" and config.norm == "layernorm" and config.mlp == "mlp" and config.bias \
                and config.n_kv_heads == config.n_heads:
            return "gpt2"
        if config.positions == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
            return "llama"
        raise ConversionError("this GPT mixes GPT-2 and Llama features; transformers has no matching class")
    if isinstance(config, BertConfig):
        return "bert"
    if config.norm_style == "post" and config.positions == "learned" and config.embed_norm \
            and config.position_offset == 2:
        return "bart"
    raise ConversionError("this encoder-decoder (e.g. the original Transformer) has no transformers equivalent")


def config_to_hf(config: ModelConfig, special: dict[str, int | None] | None = None) -> dict:
    """The lmforge config -> a Hugging Face config.json dict (without `architectures`)."""
    special = {k: v for k, v in (special or {}).items() if v is not None}
    kind = model_type_of(config)
    c = config
    if kind == "gpt2":
        d = dict(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.dim, n_layer=c.n_layers,
                 n_head=c.n_heads, n_inner=c.hidden_dim, activation_function=LM_ACT[c.act],
                 layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                 tie_word_embeddings=c.tie_embeddings)
    elif kind == "llama":
        rope = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else {"rope_type": "default"}
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.dim,
                 num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                 head_dim=c.head_dim, intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps, hidden_act="silu",
                 rope_theta=c.rope_theta, rope_scaling=c.rope_scaling and rope,
                 rope_parameters={**rope, "rope_theta": c.rope_theta}, attention_bias=c.bias, mlp_bias=c.bias,
                 attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings)
    elif kind == "bert":
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.dim,
                 num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.hidden_dim,
                 type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, hidden_act=LM_ACT[c.act],
                 hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attn_dropout,
                 pad_token_id=c.pad_token_id, position_embedding_type="absolute")
    else:
        d = dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, d_model=c.dim,
                 encoder_layers=c.n_layers, decoder_layers=c.n_decoder_layers, encoder_attention_heads=c.n_heads,
                 decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.hidden_dim, decoder_ffn_dim=c.hidden_dim,
                 activation_function=LM_ACT[c.act], scale_embedding=c.embed_scale, dropout=c.dropout,
                 attention_dropout=c.attn_dropout, activation_dropout=c.act_dropout, pad_token_id=c.pad_token_id,
                 decoder_start_token_id=c.decoder_start_token_id, is_encoder_decoder=True,
                 tie_word_embeddings=True)
        special.setdefault("forced_eos_token_id", special.get("eos_token_id"))
    d.update({k: v for k, v in special.items() if v is not None})
    d["model_type"] = kind
    return d


# ----------------------------------------------------------------------------- tensor maps


def backbone_rules(config: ModelConfig, prefix: str) -> list[Rule]:
    """Rules for the backbone (and its LM/pretraining heads) of a `model_type_of(config)` model."""
    kind = model_type_of(config)
    return {"gpt2": _gpt2_rules, "llama": _llama_rules, "bert": _bert_rules, "bart": _bart_rules}[kind](config, prefix)


def _gpt2_rules(c: GPTConfig, p: str) -> list[Rule]:
    rules = [Rule("tok_emb.weight", (f"{p}wte.weight",), vocab=True), Rule("pos_emb.weight", (f"{p}wpe.weight",)),
             Rule("norm_f.weight", (f"{p}ln_f.weight",)), Rule("norm_f.bias", (f"{p}ln_f.bias",))]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [Rule(f"{b}{ours}.{w}", (f"{h}{theirs}.{w}",)) for w in ("weight", "bias")]
        for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            rules += [Rule(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), transpose=True),
                      Rule(f"{b}{ours}.bias", (f"{h}{theirs}.bias",))]
    if not c.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), vocab=True))
    return rules


def _linear(ours: str, theirs: tuple[str, ...], bias: bool, split: tuple[int, ...] | None = None) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), split=split)]
    return rules + [Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), split=split)] if bias else rules


def _llama_rules(c: GPTConfig, p: str) -> list[Rule]:
    rules = [Rule("tok_emb.weight", (f"{p}embed_tokens.weight",), vocab=True),
             Rule("norm_f.weight", (f"{p}norm.weight",))]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}layers.{i}."
        rules += [Rule(f"{b}attn_norm.weight", (f"{h}input_layernorm.weight",)),
                  Rule(f"{b}mlp_norm.weight", (f"{h}post_attention_layernorm.weight",))]
        qkv = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
        rules += _linear(f"{b}attn.wqkv", tuple(f"{h}self_attn.{x}_proj" for x in "qkv"), c.bias, qkv)
        rules += _linear(f"{b}attn.wo", (f"{h}self_attn.o_proj",), c.bias)
        for x in ("gate", "up", "down"):
            rules += _linear(f"{b}mlp.{x}", (f"{h}mlp.{x}_proj",), c.bias)
    if not c.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), vocab=True))
    return rules


def _ln(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{theirs}.weight",)), Rule(f"{ours}.bias", (f"{theirs}.bias",))]


def _bert_rules(c: BertConfig, p: str) -> list[Rule]:
    e = f"{p}embeddings."
    rules = [Rule("tok_emb.weight", (f"{e}word_embeddings.weight",), vocab=True),
             Rule("pos_emb.weight", (f"{e}position_embeddings.weight",)),
             Rule("type_emb.weight", (f"{e}token_type_embeddings.weight",)), *_ln("emb_norm", f"{e}LayerNorm")]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        rules += _linear(f"{b}attn.wqkv", tuple(f"{h}attention.self.{x}" for x in ("query", "key", "value")), True)
        rules += _linear(f"{b}attn.wo", (f"{h}attention.output.dense",), True)
        rules += _ln(f"{b}attn_norm", f"{h}attention.output.LayerNorm")
        rules += _linear(f"{b}mlp.up", (f"{h}intermediate.dense",), True)
        rules += _linear(f"{b}mlp.down", (f"{h}output.dense",), True)
        rules += _ln(f"{b}mlp_norm", f"{h}output.LayerNorm")
    rules += _linear("pooler", (f"{p}pooler.dense",), True)
    return rules


# The BERT pretraining heads live outside the `bert.` prefix.
BERT_HEAD_RULES = [*_linear("lm_head.dense", ("cls.predictions.transform.dense",), True),
                   *_ln("lm_head.norm", "cls.predictions.transform.LayerNorm"),
                   Rule("lm_head.decoder.bias", ("cls.predictions.bias",), vocab=True)]
BERT_NSP_RULES = _linear("nsp_head", ("cls.seq_relationship",), True)


def _bart_rules(c: EncoderDecoderConfig, p: str) -> list[Rule]:
    rules = [Rule("tok_emb.weight", (f"{p}shared.weight",), vocab=True)]
    for side in ("encoder", "decoder"):
        s = f"{p}{side}."
        rules += [Rule(f"{side}.pos_emb.weight", (f"{s}embed_positions.weight",)),
                  *_ln(f"{side}.emb_norm", f"{s}layernorm_embedding")]
        n = c.n_layers if side == "encoder" else c.n_decoder_layers
        for i in range(n):
            b, h = f"{side}.blocks.{i}.", f"{s}layers.{i}."
            rules += _linear(f"{b}attn.wqkv", tuple(f"{h}self_attn.{x}_proj" for x in "qkv"), True)
            rules += _linear(f"{b}attn.wo", (f"{h}self_attn.out_proj",), True)
            rules += _ln(f"{b}attn_norm", f"{h}self_attn_layer_norm")
            if side == "decoder":
                rules += _linear(f"{b}cross.wq", (f"{h}encoder_attn.q_proj",), True)
                rules += _linear(f"{b}cross.wkv", (f"{h}encoder_attn.k_proj", f"{h}encoder_attn.v_proj"), True)
                rules += _linear(f"{b}cross.wo", (f"{h}encoder_attn.out_proj",), True)
                rules += _ln(f"{b}cross_norm", f"{h}encoder_attn_layer_norm")
            rules += _linear(f"{b}mlp.up", (f"{h}fc1",), True)
            rules += _linear(f"{b}mlp.down", (f"{h}fc2",), True)
            rules += _ln(f"{b}mlp_norm", f"{h}final_layer_norm")
    return rules


# ----------------------------------------------------------------------------- architectures and heads

# (model_type, head kind) -> the transformers class that holds that model.
ARCHITECTURES = {
    ("gpt2", None): "GPT2LMHeadModel",
    ("gpt2", "sequence-classification"): "GPT2ForSequenceClassification",
    ("gpt2", "token-classification"): "GPT2ForTokenClassification",
    ("llama", None): "LlamaForCausalLM",
    ("llama", "sequence-classification"): "LlamaForSequenceClassification",
    ("bert", None): "BertForPreTraining",
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("bert", "token-classification"): "BertForTokenClassification",
    ("bert", "span"): "BertForQuestionAnswering",
    ("bart", None): "BartForConditionalGeneration",
}
HEAD_OF_ARCH = {arch: head for (_, head), arch in ARCHITECTURES.items()}
# The backbone-only classes (and BERT with its MLM head only): read, and written when the
# heads of the full class were never loaded nor trained (see lmforge.models.provenance).
BASE_ARCHITECTURES = {"gpt2": "GPT2Model", "llama": "LlamaModel", "bert": "BertModel", "bart": "BartModel"}
HEAD_OF_ARCH.update({arch: None for arch in (*BASE_ARCHITECTURES.values(), "BertForMaskedLM")})
# The name of each head's final linear layer in transformers.
HEAD_TENSOR = {"GPT2ForSequenceClassification": "score", "LlamaForSequenceClassification": "score",
               "GPT2ForTokenClassification": "classifier", "BertForSequenceClassification": "classifier",
               "BertForTokenClassification": "classifier", "BertForQuestionAnswering": "qa_outputs"}
# Backbone attribute prefixes, tried in order against the checkpoint's tensor names.
PREFIXES = {"gpt2": ("transformer.", ""), "llama": ("model.", ""), "bert": ("bert.", ""), "bart": ("model.", "")}
PROBE = {"gpt2": "wte.weight", "llama": "embed_tokens.weight", "bert": "embeddings.word_embeddings.weight",
         "bart": "shared.weight"}


def head_from_hf(cfg: dict) -> HeadSpec | None:
    arch = (cfg.get("architectures") or [None])[0]
    if arch is not None and arch not in HEAD_OF_ARCH:
        raise ConversionError(f"unsupported architecture {arch!r}; supported: {', '.join(sorted(HEAD_OF_ARCH))}")
    kind = HEAD_OF_ARCH.get(arch)
    if kind is None:
        return None
    id2label = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(cfg.get("num_labels", 2))}
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    pooling = "last" if cfg["model_type"] in ("gpt2", "llama") else "pooler"
    return HeadSpec(kind, labels if kind != "span" else [], pooling,
                    cfg.get("problem_type") == "multi_label_classification", bias=HEAD_TENSOR[arch] != "score")


def _rules(config: ModelConfig, head: HeadSpec | None, arch: str, prefix: str) -> list[Rule]:
    """Every rule of one architecture, with the lmforge names as seen from the (wrapped) model."""
    kind = model_type_of(config)
    rules = backbone_rules(config, prefix)
    if arch == BASE_ARCHITECTURES[kind]:  # a backbone-only class has no LM head of its own
        rules = [Rule(r.ours, r.theirs, r.transpose, r.vocab, optional=True) if r.ours == "lm_head.weight" else r
                 for r in rules]
    has_pooler = arch in ("BertForPreTraining", "BertModel", "BertForSequenceClassification")
    if kind == "bert":
        if not has_pooler:
            rules = [r for r in rules if not r.ours.startswith("pooler.")]
        else:
            rules = [Rule(r.ours, r.theirs, optional=True) if r.ours.startswith("pooler.") else r for r in rules]
        if head is None and arch != "BertModel":
            heads = BERT_HEAD_RULES + (BERT_NSP_RULES if arch == "BertForPreTraining" else [])
            rules += [Rule(r.ours, r.theirs, r.transpose, r.vocab, optional=True) for r in heads]
    if kind == "bart" and head is None:
        rules.append(Rule("lm_bias", ("final_logits_bias",), vocab=True, optional=True))
    if head is None:
        return rules
    rules = [Rule(f"backbone.{r.ours}", r.theirs, r.transpose, r.vocab, r.split, r.optional) for r in rules]
    return rules + _linear("head", (HEAD_TENSOR[arch],), head.bias)


def export_architecture(kind: str, head: HeadSpec | None, missing: frozenset[str] = frozenset()) -> str:
    """The transformers class to export as: the task head's, else the full pretraining class
    unless its heads were never loaded nor trained (`missing`, lmforge.models.provenance):
    then the class without them (BertModel, BertForMaskedLM, GPT2Model, LlamaModel)."""
    if head is not None:
        return ARCHITECTURES[(kind, head.kind)]
    if kind == "bert" and "lm_head.dense.weight" in missing:
        return "BertModel"
    if kind == "bert" and "nsp_head.weight" in missing:
        return "BertForMaskedLM"
    if kind in ("gpt2", "llama") and "lm_head.weight" in missing:
        return BASE_ARCHITECTURES[kind]
    return ARCHITECTURES[(kind, None)]


def export_prefix(kind: str, arch: str) -> str:
    """The prefix of the backbone's tensors in class `arch` ("" for the backbone-only classes)."""
    return "" if arch == BASE_ARCHITECTURES[kind] else PREFIXES[kind][0]


def _tied_duplicates(config: ModelConfig, prefix: str) -> set[str]:
    """Checkpoint tensors that are copies of tied ones and carry nothing new."""
    names = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
             f"{prefix}encoder.embed_tokens.weight", f"{prefix}decoder.embed_tokens.weight"}
    if getattr(config, "tie_embeddings", True):
        names.add("lm_head.weight")
    return names


def from_hf(cfg: dict, tensors: dict[str, Tensor], source: str = "checkpoint") -> tuple[nn.Module, HeadSpec | None,
                                                                                      list[str]]:
    """Hugging Face config dict + state dict -> (lmforge model, its head spec, freshly
    initialised tensor names). Strict: unknown or missing tensors raise ConversionError."""
    config = config_from_hf(cfg)
    head = head_from_hf(cfg)
    kind = cfg["model_type"]
    arch = (cfg.get("architectures") or [ARCHITECTURES[(kind, None)]])[0]
    prefix = next((p for p in PREFIXES[kind] if f"{p}{PROBE[kind]}" in tensors), None)
    if prefix is None:
        raise ConversionError(f"{source}: no {PROBE[kind]} tensor found: not a {kind} checkpoint?")
    model = attach_head(build(config), head)
    rules = _rules(config, head, arch, prefix)
    if "final_logits_bias" in tensors:
        tensors = {**tensors, "final_logits_bias": tensors["final_logits_bias"].reshape(-1)}
    state, _, used = gather(rules, tensors, model.state_dict(), source, config.vocab_size)
    ignored = _tied_duplicates(config, prefix)
    unexpected = sorted(n for n in tensors if n not in used and n not in ignored and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ConversionError(f"{source}: {len(unexpected)} unexpected tensor(s) for {arch}: {shown}")
    model.load_state_dict(state, strict=False)
    # Untrained: every tensor the checkpoint did not fill (optional heads, and those the class
    # lacks, e.g. the pooler of a BertForMaskedLM), tied copies aside.
    fresh = sorted(set(unique_state_dict(model)) - set(state))
    set_untrained(model.backbone if head is not None else model, (n.removeprefix("backbone.") for n in fresh))
    return model, head, fresh


def to_hf(model: nn.Module, head: HeadSpec | None = None,
          special: dict[str, int | None] | None = None) -> tuple[dict, dict[str, Tensor]]:
    """lmforge model (optionally wrapped in a head) -> (config.json dict, state dict) in
    transformers' names for the matching class."""
    backbone = model.backbone if head is not None else model
    config = backbone.config
    kind = model_type_of(config)
    if (kind, head.kind if head else None) not in ARCHITECTURES:
        raise ConversionError(f"transformers has no {kind} class for a {head.kind} head")
    missing = untrained(backbone)
    arch = export_architecture(kind, head, missing)
    cfg = config_to_hf(config, special)
    cfg["architectures"] = [arch]
    if head is not None and head.labels:
        cfg["id2label"] = {str(i): label for i, label in enumerate(head.labels)}
        cfg["label2id"] = {label: i for i, label in enumerate(head.labels)}
        cfg["num_labels"] = len(head.labels)
        if head.multi_label:
            cfg["problem_type"] = "multi_label_classification"
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rules = _rules(config, head, arch, export_prefix(kind, arch))
    # Export writes every tensor the class has, except pretraining heads that hold no learned
    # values (BART's logits bias of a BartModel checkpoint): transformers then says they are new.
    prefix = "backbone." if head is not None else ""
    rules = [Rule(r.ours, r.theirs, r.transpose, r.vocab, r.split) for r in rules
             if not (head is None and r.ours.removeprefix(prefix) in missing)]
    tensors = scatter(rules, state, config.vocab_size)
    if "final_logits_bias" in tensors:
        tensors["final_logits_bias"] = tensors["final_logits_bias"][None]  # (1, V) in transformers
    return cfg, tensors


def from_transformers(hf_model: nn.Module) -> nn.Module:
    """A live transformers model -> the equivalent lmforge model (used by parity tests)."""
    cfg = hf_model.config.to_dict()
    cfg.setdefault("architectures", [type(hf_model).__name__])
    cfg["architectures"] = [type(hf_model).__name__]
    model, _, _ = from_hf(cfg, dict(hf_model.state_dict()), source=type(hf_model).__name__)
    return model


# ----------------------------------------------------------------------------- files

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_hf_weights(directory: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """All tensors of a Hugging Face model directory (safetensors preferred; .bin files
    only through torch.load(weights_only=True), so no pickled code runs). Returns
    (tensors, the file name for messages)."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{path}: not a valid weight index ({e})") from None
            tensors: dict[str, Tensor] = {}
            for shard in shards:
                tensors.update(_read_one(directory / shard))
            return tensors, str(path)
        return _read_one(path), str(path)
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _read_one(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch file ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConversionError(f"{path}: does not hold a flat dict of tensors")
    return state


def read_hf_model(directory: str | os.PathLike) -> tuple[nn.Module, HeadSpec | None, list[str], dict]:
    """Load a Hugging Face model directory -> (model, head, freshly initialised tensor names,
    the config dict)."""
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    # An unsupported model says so, and one too big for memory too, before its weights are read.
    check_fits(config_from_hf(cfg), where=f"{directory / 'config.json'}: ")
    tensors, source = read_hf_weights(directory)
    model, head, fresh = from_hf(cfg, tensors, source)
    return model, head, fresh, cfg


def write_hf_model(model: nn.Module, head: HeadSpec | None, directory: str | os.PathLike,
                   special: dict[str, int | None] | None = None) -> str:
    """Write config.json and model.safetensors that transformers' Auto classes load; returns
    the architecture written."""
    directory = Path(directory)
    cfg, tensors = to_hf(model, head, special)
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_json(directory / "config.json", cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    return cfg["architectures"][0]
