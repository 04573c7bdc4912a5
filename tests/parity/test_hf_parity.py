"""lmforge models against transformers on the same random weights, fp32 on CPU."""

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

from lmforge.interop.hf import ConversionError, from_hf, from_transformers, to_hf

V = 97  # not a multiple of 128: exercises vocabulary padding


def _gpt2(**kw):
    cfg = hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2, **kw)
    return hf.GPT2LMHeadModel(cfg).eval()


def _llama(**kw):
    cfg = hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, **kw)
    return hf.LlamaForCausalLM(cfg).eval()


def _bert_config(**kw):
    return hf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, **kw)


def _bart(**kw):
    cfg = hf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, init_std=0.2, **kw)
    model = hf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()  # non-zero so that the map is really checked
    return model


def _batch(B=3, T=11, pad_rows=(1, 2)):
    ids = torch.randint(3, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for r, row in enumerate(pad_rows):
        mask[row, T - 2 - 3 * r:] = 0  # right padding of different lengths
    return ids, mask


def _close_on_real(ours, theirs, mask):
    keep = mask.bool()
    assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_gpt2, _llama, lambda: _llama(tie_word_embeddings=True)],
                         ids=["gpt2", "llama-gqa", "llama-tied"])
def test_causal_lm_logits(make):
    theirs = make()
    ours = from_transformers(theirs).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
        _close_on_real(ours(ids, mask), theirs(ids, attention_mask=mask).logits, mask)
        # encode() is the final-norm hidden state
        hidden = theirs(ids, output_hidden_states=True).hidden_states[-1]
        assert_close(ours.encode(ids), hidden, atol=1e-4, rtol=1e-4)


def test_bert_pretraining_and_hidden_states():
    theirs = hf.BertForPreTraining(_bert_config()).eval()
    ours = from_transformers(theirs).eval()
    ids, mask = _batch()
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        out = theirs(ids, attention_mask=mask, token_type_ids=types)
        _close_on_real(ours(ids, mask, types), out.prediction_logits, mask)
        hidden = ours.encode(ids, mask, types)
        assert_close(ours.nsp_logits(hidden), out.seq_relationship_logits, atol=1e-4, rtol=1e-4)
        base = theirs.bert(ids, attention_mask=mask, token_type_ids=types)
        _close_on_real(hidden, base.last_hidden_state, mask)
        assert_close(ours.pool(hidden), base.pooler_output, atol=1e-4, rtol=1e-4)


def test_bert_without_heads_loads_encoder_and_reports_fresh_heads():
    base = hf.BertModel(_bert_config()).eval()
    cfg = {**base.config.to_dict(), "architectures": ["BertModel"]}
    ours, head, fresh = from_hf(cfg, dict(base.state_dict()))
    assert head is None
    assert {"lm_head.dense.weight", "nsp_head.weight", "lm_head.decoder.bias"} <= set(fresh)
    assert not any(name.startswith("blocks.") for name in fresh)
    ids, mask = _batch()
    with torch.no_grad():
        _close_on_real(ours.eval().encode(ids, mask), base(ids, attention_mask=mask).last_hidden_state, mask)


def test_bart_logits_with_padding():
    theirs = _bart()
    ours = from_transformers(theirs).eval()
    src, src_mask = _batch(T=13)
    tgt = torch.randint(3, V, (3, 7))
    with torch.no_grad():
        want = theirs(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
        assert_close(ours(src, tgt, src_mask), want, atol=1e-4, rtol=1e-4)
        memory = theirs.model.encoder(src, attention_mask=src_mask).last_hidden_state
        _close_on_real(ours.encode(src, src_mask), memory, src_mask)


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForTokenClassification",
                                 "BertForQuestionAnswering"])
def test_bert_task_heads(cls):
    n_labels = 2 if cls == "BertForQuestionAnswering" else 5  # QA: a start and an end score
    theirs = getattr(hf, cls)(_bert_config(num_labels=n_labels)).eval()
    ours = from_transformers(theirs).eval()
    ids, mask = _batch()
    with torch.no_grad():
        out = theirs(ids, attention_mask=mask)
        got = ours(ids, mask)
    if cls == "BertForQuestionAnswering":
        _close_on_real(got[0], out.start_logits, mask)
        _close_on_real(got[1], out.end_logits, mask)
    elif cls == "BertForTokenClassification":
        _close_on_real(got, out.logits, mask)
    else:
        assert_close(got, out.logits, atol=1e-4, rtol=1e-4)


def test_gpt2_sequence_classification_pools_last_real_token():
    cfg = hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=3,
                        pad_token_id=0, initializer_range=0.2)
    theirs = hf.GPT2ForSequenceClassification(cfg).eval()
    ours = from_transformers(theirs).eval()
    ids, mask = _batch()
    ids = ids.masked_fill(mask == 0, 0)  # transformers finds the last token through pad ids
    with torch.no_grad():
        assert_close(ours(ids, mask), theirs(ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [_gpt2, _llama, _bart, lambda: hf.BertForPreTraining(_bert_config()),
                                  lambda: hf.BertForSequenceClassification(_bert_config(num_labels=4))],
                         ids=["gpt2", "llama", "bart", "bert", "bert-cls"])
def test_round_trip_reproduces_every_tensor(make):
    theirs = make()
    ours, head, _ = from_hf({**theirs.config.to_dict(), "architectures": [type(theirs).__name__]},
                            dict(theirs.state_dict()))
    cfg, tensors = to_hf(ours, head)
    assert cfg["architectures"] == [type(theirs).__name__]
    rebuilt = type(theirs)(type(theirs.config).from_dict(cfg)).eval()
    missing, unexpected = rebuilt.load_state_dict(tensors, strict=False)
    assert not unexpected
    rebuilt.tie_weights()
    original = theirs.state_dict()
    for name, value in rebuilt.state_dict().items():
        assert_close(value, original[name], atol=0, rtol=0, msg=f"tensor {name} differs after the round trip")


def test_bad_checkpoints_raise_naming_the_tensor():
    theirs = _gpt2()
    cfg = {**theirs.config.to_dict(), "architectures": ["GPT2LMHeadModel"]}
    state = dict(theirs.state_dict())
    with pytest.raises(ConversionError, match="unsupported model_type 'gptj'"):
        from_hf({**cfg, "model_type": "gptj"}, state)
    with pytest.raises(ConversionError, match="t5 config: the field 'd_model' is missing"):
        from_hf({**cfg, "model_type": "t5"}, state)
    with pytest.raises(ConversionError, match=r"missing tensor.*h\.1\.mlp\.c_fc\.weight"):
        from_hf(cfg, {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}, "model.safetensors")
    with pytest.raises(ConversionError, match="unexpected tensor.*extra.weight"):
        from_hf(cfg, {**state, "extra.weight": torch.zeros(1)})
    bad = {**state, "transformer.wpe.weight": torch.zeros(10, 32)}
    with pytest.raises(ConversionError, match=r"model.safetensors: tensor transformer.wpe.weight has shape \(10, 32\)"):
        from_hf(cfg, bad, "model.safetensors")
    with pytest.raises(ConversionError, match="unsupported architecture"):
        from_hf({**cfg, "architectures": ["GPT2DoubleHeadsModel"]}, state)
