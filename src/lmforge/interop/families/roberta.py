"""RoBERTa (model_type roberta) and XLM-RoBERTa (xlm-roberta, the same network over a
SentencePiece vocabulary of 100 languages).

BERT's encoder layers under `roberta.`, with positions numbered past the padding
(lmforge's "learned_skip_pad": max_position_embeddings = max_seq_len + pad_token_id + 1),
one segment, a pooler only in the backbone-only class, no next-sentence head, a masked-LM
head (lm_head: dense, gelu, layer_norm, a decoder tied to the token embedding, bias) and a
classification head of its own on <s> (classifier: dense, tanh, out_proj), not BERT's pooler.
"""

from __future__ import annotations

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import LM_ACT, Family, act, layer_norm, linear, optional, without_mlm_head
from lmforge.interop.families.bert import rules
from lmforge.models import BertConfig, HeadSpec


def _read(cfg: dict, kind: str) -> BertConfig:
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{kind}: only absolute position embeddings are supported")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ConversionError(f"{kind}: decoder configurations (is_decoder, add_cross_attention) are unsupported")
    hidden_act = act(cfg.get("hidden_act", "gelu"))
    if hidden_act != "gelu":
        raise ConversionError(f"{kind}: hidden_act {cfg.get('hidden_act')!r} unsupported: the masked-LM head always "
                              "applies gelu, lmforge's applies hidden_act")
    pad = cfg.get("pad_token_id")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ConversionError(f"{kind}: pad_token_id must be an id >= 0 (positions are numbered from it), got {pad!r}")
    n_positions = cfg.get("max_position_embeddings", 514)
    if n_positions <= pad + 1:
        raise ConversionError(f"{kind}: max_position_embeddings ({n_positions}) leaves no position after the "
                              f"pad_token_id + 1 = {pad + 1} rows positions start after")
    return BertConfig(vocab_size=cfg["vocab_size"], max_seq_len=n_positions - pad - 1, dim=cfg["hidden_size"],
                      n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                      hidden_dim=cfg["intermediate_size"], type_vocab_size=cfg.get("type_vocab_size", 2),
                      norm_eps=cfg.get("layer_norm_eps", 1e-12), act=hidden_act,
                      dropout=cfg.get("hidden_dropout_prob", 0.1),
                      attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1), pad_token_id=pad,
                      positions="learned_skip_pad", pooler=True, nsp=False)


def write_config(c: BertConfig) -> dict:
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, intermediate_size=c.hidden_dim,
                type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, hidden_act=LM_ACT[c.act],
                hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attn_dropout,
                pad_token_id=c.pad_token_id, position_embedding_type="absolute")


def matches(c) -> bool:
    return (isinstance(c, BertConfig) and c.positions == "learned_skip_pad" and c.type_vocab_size >= 1
            and c.pooler and not c.nsp and c.act == "gelu")


MLM_RULES = [*linear("lm_head.dense", ("lm_head.dense",), True), *layer_norm("lm_head.norm", "lm_head.layer_norm"),
             Rule("lm_head.decoder.bias", ("lm_head.bias",), vocab=True)]


def _family(model_type: str, name: str) -> Family:
    base = f"{name}Model"

    def class_rules(out: list[Rule], c: BertConfig, head: HeadSpec | None, arch: str) -> list[Rule]:
        """The pooler is the backbone-only class's (optional there); the masked-LM head the
        MLM class's (optional: a checkpoint may lack it)."""
        pooler = [r for r in out if r.ours.startswith("pooler.")]
        out = [r for r in out if not r.ours.startswith("pooler.")]
        if arch == base:
            return out + optional(pooler)
        return out + (optional(MLM_RULES) if head is None else [])

    def also_loads(c: BertConfig, p: str, arch: str) -> list[Rule]:
        """Masked-LM and task checkpoints converted from fairseq keep the pooler (roberta-base does)."""
        return [] if arch == base else optional(linear("pooler", (f"{p}pooler.dense",), True))

    return Family(
        model_type, lambda cfg: _read(cfg, model_type), write_config, matches, rules,
        classes={None: f"{name}ForMaskedLM", "sequence-classification": f"{name}ForSequenceClassification",
                 "token-classification": f"{name}ForTokenClassification", "span": f"{name}ForQuestionAnswering"},
        base_class=base,
        head_tensors={f"{name}ForSequenceClassification": "classifier.out_proj",
                      f"{name}ForTokenClassification": "classifier", f"{name}ForQuestionAnswering": "qa_outputs"},
        prefixes=("roberta.", ""), probe="embeddings.word_embeddings.weight", pooling="cls",
        tied_copies=("lm_head.decoder.weight", "lm_head.decoder.bias"), class_rules=class_rules,
        export_class=without_mlm_head(base), hidden="tanh",
        hidden_tensors={f"{name}ForSequenceClassification": "classifier.dense"}, also_loads=also_loads)


ROBERTA = _family("roberta", "Roberta")
# The same architecture: an lmforge config exports as roberta unless it was read as xlm-roberta.
XLM_ROBERTA = _family("xlm-roberta", "XLMRoberta")
