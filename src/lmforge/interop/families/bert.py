"""BERT (model_type bert): post-LN encoder with token-type embeddings, a pooler, and the
pretraining heads (masked LM: cls.predictions, next sentence: cls.seq_relationship)."""

from __future__ import annotations

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import LM_ACT, Family, act, layer_norm, linear
from lmforge.models import BertConfig, HeadSpec


def read_config(cfg: dict) -> BertConfig:
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("bert: only absolute position embeddings are supported")
    return BertConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 512),
                      dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                      hidden_dim=cfg["intermediate_size"], type_vocab_size=cfg.get("type_vocab_size", 2),
                      norm_eps=cfg.get("layer_norm_eps", 1e-12), act=act(cfg.get("hidden_act", "gelu")),
                      dropout=cfg.get("hidden_dropout_prob", 0.1),
                      attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
                      pad_token_id=cfg.get("pad_token_id") or 0)


def write_config(c: BertConfig) -> dict:
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.hidden_dim,
                type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, hidden_act=LM_ACT[c.act],
                hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attn_dropout,
                pad_token_id=c.pad_token_id, position_embedding_type="absolute")


def rules(c: BertConfig, p: str) -> list[Rule]:
    e = f"{p}embeddings."
    out = [Rule("tok_emb.weight", (f"{e}word_embeddings.weight",), vocab=True),
           Rule("pos_emb.weight", (f"{e}position_embeddings.weight",)),
           Rule("type_emb.weight", (f"{e}token_type_embeddings.weight",)), *layer_norm("emb_norm", f"{e}LayerNorm")]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        out += linear(f"{b}attn.wqkv", tuple(f"{h}attention.self.{x}" for x in ("query", "key", "value")), True)
        out += linear(f"{b}attn.wo", (f"{h}attention.output.dense",), True)
        out += layer_norm(f"{b}attn_norm", f"{h}attention.output.LayerNorm")
        out += linear(f"{b}mlp.up", (f"{h}intermediate.dense",), True)
        out += linear(f"{b}mlp.down", (f"{h}output.dense",), True)
        out += layer_norm(f"{b}mlp_norm", f"{h}output.LayerNorm")
    out += linear("pooler", (f"{p}pooler.dense",), True)
    return out


# The pretraining heads live outside the `bert.` prefix.
MLM_RULES = [*linear("lm_head.dense", ("cls.predictions.transform.dense",), True),
             *layer_norm("lm_head.norm", "cls.predictions.transform.LayerNorm"),
             Rule("lm_head.decoder.bias", ("cls.predictions.bias",), vocab=True)]
NSP_RULES = linear("nsp_head", ("cls.seq_relationship",), True)
WITH_POOLER = ("BertForPreTraining", "BertModel", "BertForSequenceClassification")


def class_rules(out: list[Rule], c: BertConfig, head: HeadSpec | None, arch: str) -> list[Rule]:
    """The pooler where the class has one (optional: a checkpoint may lack it), the pretraining
    heads (optional) where the class has them."""
    if arch not in WITH_POOLER:
        out = [r for r in out if not r.ours.startswith("pooler.")]
    else:
        out = [Rule(r.ours, r.theirs, optional=True) if r.ours.startswith("pooler.") else r for r in out]
    if head is None and arch != "BertModel":
        heads = MLM_RULES + (NSP_RULES if arch == "BertForPreTraining" else [])
        out += [Rule(r.ours, r.theirs, r.transpose, r.vocab, optional=True) for r in heads]
    return out


def export_class(head: HeadSpec | None, missing: frozenset[str]) -> str | None:
    """Without a task head: BertModel when the MLM head was never loaded nor trained,
    BertForMaskedLM when only the NSP head was not."""
    if head is not None:
        return None
    if "lm_head.dense.weight" in missing:
        return "BertModel"
    if "nsp_head.weight" in missing:
        return "BertForMaskedLM"
    return None


def matches(c) -> bool:
    """BERT's layout: learned positions from 0, segments and a pooler (the NSP head may be absent)."""
    return isinstance(c, BertConfig) and c.positions == "learned" and c.type_vocab_size >= 1 and c.pooler


BERT = Family(
    "bert", read_config, write_config, matches, rules,
    classes={None: "BertForPreTraining", "sequence-classification": "BertForSequenceClassification",
             "token-classification": "BertForTokenClassification", "span": "BertForQuestionAnswering"},
    base_class="BertModel",
    head_tensors={"BertForSequenceClassification": "classifier", "BertForTokenClassification": "classifier",
                  "BertForQuestionAnswering": "qa_outputs"},
    prefixes=("bert.", ""), probe="embeddings.word_embeddings.weight",
    tied_copies=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    class_rules=class_rules, export_class=export_class, also_reads=("BertForMaskedLM",))
