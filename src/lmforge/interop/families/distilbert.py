"""DistilBERT (model_type distilbert): BERT's post-LN encoder, six layers in its released
form, without segments or a pooler; positions learned or a fixed sinusoidal table
(sinusoidal_pos_embds); LayerNorm epsilon fixed at 1e-12; its own config names (dim,
n_layers, n_heads, hidden_dim, activation); a masked-LM head (vocab_transform, activation,
vocab_layer_norm, vocab_projector tied to the token embedding) and a classification head
of its own on [CLS] (pre_classifier, ReLU, dropout, classifier)."""

from __future__ import annotations

from torch import Tensor

from lmforge.interop.convert import Rule
from lmforge.interop.families.base import LM_ACT, Family, act, hf_arg, layer_norm, linear, optional, without_mlm_head
from lmforge.models import BertConfig, HeadSpec
from lmforge.nn.position import sinusoidal_table

NORM_EPS = 1e-12  # DistilBERT's LayerNorms do not read a config value


def read_config(cfg: dict) -> BertConfig:
    return BertConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 512),
                      dim=hf_arg(cfg, "dim", "hidden_size"), n_layers=hf_arg(cfg, "n_layers", "num_hidden_layers"),
                      n_heads=hf_arg(cfg, "n_heads", "num_attention_heads"), hidden_dim=cfg["hidden_dim"],
                      type_vocab_size=0, norm_eps=NORM_EPS, act=act(cfg.get("activation", "gelu")),
                      dropout=cfg.get("dropout", 0.1), attn_dropout=cfg.get("attention_dropout", 0.1),
                      pad_token_id=cfg.get("pad_token_id") or 0,
                      positions="sinusoidal" if cfg.get("sinusoidal_pos_embds") else "learned",
                      pooler=False, nsp=False)


def write_config(c: BertConfig) -> dict:
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len,
                sinusoidal_pos_embds=c.positions == "sinusoidal", dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                hidden_dim=c.hidden_dim, activation=LM_ACT[c.act], dropout=c.dropout,
                attention_dropout=c.attn_dropout, pad_token_id=c.pad_token_id, tie_word_embeddings=True)


def matches(c) -> bool:
    return (isinstance(c, BertConfig) and c.positions in ("learned", "sinusoidal") and c.type_vocab_size == 0
            and not c.pooler and not c.nsp and c.norm_eps == NORM_EPS and c.act in LM_ACT)


def rules(c: BertConfig, p: str) -> list[Rule]:
    e = f"{p}embeddings."
    out = [Rule("tok_emb.weight", (f"{e}word_embeddings.weight",), vocab=True)]
    if c.positions == "learned":
        out.append(Rule("pos_emb.weight", (f"{e}position_embeddings.weight",)))
    out += layer_norm("emb_norm", f"{e}LayerNorm")
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}transformer.layer.{i}."
        out += linear(f"{b}attn.wqkv", tuple(f"{h}attention.{x}_lin" for x in "qkv"), True)
        out += linear(f"{b}attn.wo", (f"{h}attention.out_lin",), True)
        out += layer_norm(f"{b}attn_norm", f"{h}sa_layer_norm")
        out += linear(f"{b}mlp.up", (f"{h}ffn.lin1",), True)
        out += linear(f"{b}mlp.down", (f"{h}ffn.lin2",), True)
        out += layer_norm(f"{b}mlp_norm", f"{h}output_layer_norm")
    return out


MLM_RULES = [*linear("lm_head.dense", ("vocab_transform",), True), *layer_norm("lm_head.norm", "vocab_layer_norm"),
             Rule("lm_head.decoder.bias", ("vocab_projector.bias",), vocab=True)]


def class_rules(out: list[Rule], c: BertConfig, head: HeadSpec | None, arch: str) -> list[Rule]:
    """The masked-LM head (optional: a checkpoint may lack it) where the class has it."""
    return out + optional(MLM_RULES) if head is None and arch != "DistilBertModel" else out


def fixed(c: BertConfig, p: str) -> dict[str, Tensor]:
    """A sinusoidal table is a buffer in lmforge and a tensor in the checkpoint."""
    if c.positions != "sinusoidal":
        return {}
    return {f"{p}embeddings.position_embeddings.weight": sinusoidal_table(c.max_seq_len, c.dim)}


DISTILBERT = Family(
    "distilbert", read_config, write_config, matches, rules,
    classes={None: "DistilBertForMaskedLM", "sequence-classification": "DistilBertForSequenceClassification",
             "token-classification": "DistilBertForTokenClassification", "span": "DistilBertForQuestionAnswering"},
    base_class="DistilBertModel",
    head_tensors={"DistilBertForSequenceClassification": "classifier",
                  "DistilBertForTokenClassification": "classifier", "DistilBertForQuestionAnswering": "qa_outputs"},
    prefixes=("distilbert.", ""), probe="embeddings.word_embeddings.weight", pooling="cls",
    tied_copies=("vocab_projector.weight",), class_rules=class_rules, export_class=without_mlm_head("DistilBertModel"),
    hidden="relu", hidden_tensors={"DistilBertForSequenceClassification": "pre_classifier"}, fixed=fixed)
