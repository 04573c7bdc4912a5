"""RoBERTa, XLM-RoBERTa and DistilBERT against transformers, fp32 on CPU, on random weights:
lmforge reads what save_pretrained writes (every class with a head, hidden states and
logits within 1e-4), transformers reads what lmforge writes (the same class, nothing missing
or unexpected, the same outputs), and the planner counts what transformers counts."""

import json

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import lmforge
import lmforge.plan
from lmforge.interop.hf import ConversionError, config_from_hf, from_hf, to_hf
from lmforge.models import HeadSpec, attach_head, build, preset
from lmforge.models.arch import arch_of

hf.logging.set_verbosity_error()
V = 97  # not a multiple of 128: exercises vocabulary padding
CLASSES = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def _config(family: str, **kw):
    if family in ("Roberta", "XLMRoberta"):
        cls = hf.RobertaConfig if family == "Roberta" else hf.XLMRobertaConfig
        return cls(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5, initializer_range=0.2, **kw)
    return hf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                               initializer_range=0.2, sinusoidal_pos_embds=family == "DistilBertSinusoidal", **kw)


def _model(family: str, cls: str, **kw):
    name = "DistilBert" if family.startswith("DistilBert") else family
    torch.manual_seed(0)
    model = getattr(hf, f"{name}{cls}")(_config(family, num_labels=2 if cls == "ForQuestionAnswering" else 3, **kw))
    with torch.no_grad():  # non-zero biases and norms, so that every map is really checked
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.normal_(0, 0.2)
    return model.eval()


def _batch(pad: int, B: int = 3, T: int = 11):
    ids = torch.randint(5, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding: RoBERTa's positions skip it
    return ids.masked_fill(mask == 0, pad), mask


def _outputs(model, cls: str, ids, mask) -> list[torch.Tensor]:
    """A transformers model's outputs in lmforge's order: hidden states, then the head's."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    head = {"Model": [], "ForMaskedLM": ["logits"], "ForSequenceClassification": ["logits"],
            "ForTokenClassification": ["logits"], "ForQuestionAnswering": ["start_logits", "end_logits"]}[cls]
    return [out.hidden_states[-1]] + [getattr(out, k) for k in head]


def _ours(lm, ids, mask) -> list[torch.Tensor]:
    model = lm.model.eval()
    with torch.no_grad():
        hidden = lm.backbone.encode(ids, mask)
        if lm.head is None:
            return [hidden, lm.backbone.mlm_logits(hidden)]
        out = model(ids, mask)
    return [hidden, *(out if isinstance(out, tuple) else (out,))]


def _close(ours, theirs, mask):
    keep = mask.bool()
    for a, b in zip(ours, theirs):
        if a.dim() >= 2 and a.shape[:2] == mask.shape:  # per token: padding positions are anyone's
            a, b = a[keep], b[keep]
        else:  # read from the first token: a padding one in the left-padded row
            a, b = a[keep[:, 0]], b[keep[:, 0]]
        assert_close(a, b, atol=1e-4, rtol=1e-4)


FAMILIES = ("Roberta", "XLMRoberta", "DistilBert", "DistilBertSinusoidal")


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("family", FAMILIES)
def test_reads_and_writes_what_transformers_reads_and_writes(family, cls, tmp_path):
    theirs = _model(family, cls)
    theirs.save_pretrained(tmp_path / "theirs")
    lm = lmforge.load(tmp_path / "theirs")
    pad = theirs.config.pad_token_id
    ids, mask = _batch(pad)
    want = _outputs(theirs, cls, ids, mask)
    got = _ours(lm, ids, mask)
    if cls == "Model":
        got = got[:1]  # the backbone-only class has no MLM head
    _close(got, want, mask)
    if cls == "Model" and not family.startswith("DistilBert"):
        with torch.no_grad():
            pooled = theirs(input_ids=ids, attention_mask=mask).pooler_output
        real = mask[:, 0].bool()  # the pooler reads the first token, a padding one in the left-padded row
        assert_close(lm.backbone.pool(got[0])[real], pooled[real], atol=1e-4, rtol=1e-4)

    lm.save(tmp_path / "ours", format="hf")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [type(theirs).__name__]
    assert written["model_type"] == theirs.config.model_type  # xlm-roberta stays xlm-roberta
    back, info = type(theirs).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _close(_outputs(back.eval(), cls, ids, mask), want, mask)
    tensors = load_file(tmp_path / "ours" / "model.safetensors")
    original = load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(tensors) == set(original)
    for name, value in tensors.items():
        assert_close(value, original[name], atol=1e-6, rtol=0, msg=f"{name} changed on the way through lmforge")


def test_roberta_positions_are_transformers_position_ids():
    """Positions count real tokens from padding_idx + 1 (create_position_ids_from_input_ids),
    with padding on either side; the table is max_seq_len + 2 rows."""
    theirs = _model("Roberta", "Model")
    model, _, _ = from_hf({**theirs.config.to_dict(), "architectures": ["RobertaModel"]}, theirs.state_dict())
    assert model.config.max_seq_len == 32 and model.pos_emb.weight.shape[0] == 34
    ids, _ = _batch(pad=1)
    want = theirs.embeddings.create_position_ids_from_input_ids(ids, padding_idx=1)
    assert torch.equal(model.position_ids(ids), want)
    assert want[2, :4].eq(1).all() and want[2, 4].item() == 2


def test_a_masked_lm_checkpoint_with_a_pooler_keeps_it(tmp_path):
    """roberta-base's RobertaForMaskedLM checkpoint carries the pooler of the model it was
    converted from: lmforge reads it (transformers' RobertaModel would use it) and writes it
    back into a RobertaModel, never into the MLM class, which has no pooler."""
    base, mlm = _model("Roberta", "Model"), _model("Roberta", "ForMaskedLM")
    mlm.save_pretrained(tmp_path / "mlm")
    state = load_file(tmp_path / "mlm" / "model.safetensors")
    state.update({f"roberta.pooler.dense.{k}": v.contiguous() for k, v in base.pooler.dense.state_dict().items()})
    save_file(state, tmp_path / "mlm" / "model.safetensors", metadata={"format": "pt"})
    lm = lmforge.load(tmp_path / "mlm")
    assert_close(lm.model.pooler.weight, base.pooler.dense.weight)
    lm.save(tmp_path / "out", format="hf")
    assert not any("pooler" in k for k in load_file(tmp_path / "out" / "model.safetensors"))
    cfg, tensors = to_hf(lm.model)
    assert cfg["architectures"] == ["RobertaForMaskedLM"]


def test_a_model_lmforge_builds_exports_as_its_family(tmp_path):
    """Fresh lmforge encoders of each layout export to the matching transformers classes;
    one read as xlm-roberta stays xlm-roberta through lmforge's own format too."""
    configs = {"roberta": dict(positions="learned_skip_pad", type_vocab_size=1, pad_token_id=1, nsp=False),
               "distilbert": dict(type_vocab_size=0, pooler=False, nsp=False, positions="sinusoidal")}
    for model_type, over in configs.items():
        head = HeadSpec("sequence-classification", ["a", "b"], "cls",
                        hidden="tanh" if model_type == "roberta" else "relu")
        model = attach_head(build(preset("bert-tiny", vocab_size=V, dim=32, n_heads=4, max_seq_len=30, **over)),
                            head).eval()
        lmforge.LM(model, head=head).save(tmp_path / model_type, format="hf")
        theirs = hf.AutoModelForSequenceClassification.from_pretrained(tmp_path / model_type).eval()
        assert theirs.config.model_type == model_type
        ids, mask = _batch(pad=1 if model_type == "roberta" else 0)
        with torch.no_grad():
            assert_close(model(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
    xlmr = _model("XLMRoberta", "ForTokenClassification")
    xlmr.save_pretrained(tmp_path / "xlmr")
    lmforge.load(tmp_path / "xlmr").save(tmp_path / "lmforge-format")
    lmforge.load(tmp_path / "lmforge-format").save(tmp_path / "back", format="hf")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == \
        ["XLMRobertaForTokenClassification"]


def test_heads_transformers_computes_differently_are_refused():
    model = build(preset("bert-tiny", vocab_size=V, dim=32, n_heads=4, max_seq_len=30, positions="learned_skip_pad",
                         type_vocab_size=1, pad_token_id=1, nsp=False))
    head = HeadSpec("sequence-classification", ["a", "b"], "mean")
    with pytest.raises(ConversionError, match="pools with 'cls' through a tanh hidden layer; this head pools with"):
        to_hf(attach_head(model, head), head)
    with pytest.raises(ConversionError, match="pad id 0 is not the model's pad_token_id 1"):
        to_hf(model, special={"pad_token_id": 0})


def test_bad_configs_and_tables_name_the_field():
    cfg = {**_config("Roberta").to_dict(), "architectures": ["RobertaModel"]}
    with pytest.raises(ConversionError, match="roberta: hidden_act 'relu' unsupported"):
        config_from_hf({**cfg, "hidden_act": "relu"})
    with pytest.raises(ConversionError, match="xlm-roberta: pad_token_id must be an id"):
        config_from_hf({**cfg, "model_type": "xlm-roberta", "pad_token_id": None})
    with pytest.raises(ConversionError, match="leaves no position"):
        config_from_hf({**cfg, "max_position_embeddings": 2})
    theirs = _model("DistilBertSinusoidal", "Model")
    state = dict(theirs.state_dict())
    state["embeddings.position_embeddings.weight"] = state["embeddings.position_embeddings.weight"] + 0.5
    dcfg = {**theirs.config.to_dict(), "architectures": ["DistilBertModel"]}
    with pytest.raises(ConversionError, match="embeddings.position_embeddings.weight differs from the fixed table"):
        from_hf(dcfg, state, "model.safetensors")
    model, _, _ = from_hf({**dcfg, "sinusoidal_pos_embds": False}, state)  # read as learned positions instead
    assert model.config.positions == "learned"


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_counts_what_transformers_counts(family):
    """arch.py's exact count against num_parameters(): lmforge's encoder holds the MLM class's
    tensors, plus RoBERTa's pooler (the backbone-only class's); a sinusoidal table is a buffer in
    lmforge. vocab_size 256 needs no padding rows."""
    cfg = _config(family)
    cfg.vocab_size = 256
    name = "DistilBert" if family.startswith("DistilBert") else family
    mlm = getattr(hf, f"{name}ForMaskedLM")(cfg)
    config = config_from_hf(cfg.to_dict())
    want = mlm.num_parameters()
    if name != "DistilBert":
        want += getattr(hf, f"{name}Model")(cfg).pooler.dense.weight.numel() + cfg.hidden_size
    if family == "DistilBertSinusoidal":
        want -= cfg.max_position_embeddings * cfg.dim
    assert arch_of(config).total_params == want
    assert lmforge.plan.make_plan(config, seq_len=16).params["total"] == want
