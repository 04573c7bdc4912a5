"""GPT-2 (model_type gpt2): learned positions, LayerNorm, GELU MLP, Conv1D weights stored (in, out)."""

from __future__ import annotations

from lmforge.interop.convert import ConversionError, Rule
from lmforge.interop.families.base import LM_ACT, Family, act, without_lm_head
from lmforge.models import GPTConfig


def read_config(cfg: dict) -> GPTConfig:
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise ConversionError("gpt2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn unsupported")
    return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["n_positions"], dim=cfg["n_embd"],
                     n_layers=cfg["n_layer"], n_heads=cfg["n_head"], hidden_dim=cfg.get("n_inner"),
                     norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), positions="learned",
                     mlp="mlp", act=act(cfg.get("activation_function", "gelu_new")), bias=True,
                     tie_embeddings=cfg.get("tie_word_embeddings", True), dropout=cfg.get("resid_pdrop", 0.1))


def write_config(c: GPTConfig) -> dict:
    return dict(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.dim, n_layer=c.n_layers,
                n_head=c.n_heads, n_inner=c.hidden_dim, activation_function=LM_ACT[c.act],
                layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                tie_word_embeddings=c.tie_embeddings)


def matches(c) -> bool:
    return (isinstance(c, GPTConfig) and c.positions == "learned" and c.norm == "layernorm" and c.mlp == "mlp"
            and c.bias and c.qkv_bias in (None, True) and not c.qk_norm and c.sliding_window is None
            and c.n_kv_heads == c.n_heads and c.logit_softcap is None and not c.value_embeds)


def rules(c: GPTConfig, p: str) -> list[Rule]:
    out = [Rule("tok_emb.weight", (f"{p}wte.weight",), vocab=True), Rule("pos_emb.weight", (f"{p}wpe.weight",)),
           Rule("norm_f.weight", (f"{p}ln_f.weight",)), Rule("norm_f.bias", (f"{p}ln_f.bias",))]
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"{p}h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out += [Rule(f"{b}{ours}.{w}", (f"{h}{theirs}.{w}",)) for w in ("weight", "bias")]
        for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            out += [Rule(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), transpose=True),
                    Rule(f"{b}{ours}.bias", (f"{h}{theirs}.bias",))]
    if not c.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",), vocab=True))
    return out


GPT2 = Family(
    "gpt2", read_config, write_config, matches, rules,
    classes={None: "GPT2LMHeadModel", "sequence-classification": "GPT2ForSequenceClassification",
             "token-classification": "GPT2ForTokenClassification"},
    base_class="GPT2Model",
    head_tensors={"GPT2ForSequenceClassification": "score", "GPT2ForTokenClassification": "classifier"},
    prefixes=("transformer.", ""), probe="wte.weight", pooling="last", tied_copies=("lm_head.weight",),
    export_class=without_lm_head("GPT2Model"))
