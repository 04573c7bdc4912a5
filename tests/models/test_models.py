import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmforge.models import (
    PRESETS,
    Bert,
    BertConfig,
    EncoderDecoder,
    GPTConfig,
    HeadSpec,
    attach_head,
    build,
    count_params,
    preset,
)

TINY = {
    "gpt": dict(vocab_size=200, max_seq_len=32, dim=32, n_layers=2, n_heads=4),
    "llama": dict(vocab_size=200, max_seq_len=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                  norm="rmsnorm", positions="rope", mlp="swiglu", bias=False),
}


def _gpt(kind="gpt"):
    return build(GPTConfig(**TINY[kind])).eval()


def _bert():
    return build(preset("bert-tiny", vocab_size=200, dim=32, n_heads=4, max_seq_len=32)).eval()


def _bart():
    return build(preset("bart-tiny", vocab_size=200, dim=32, n_heads=4, max_seq_len=32)).eval()


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_gpt_forward_contract_and_causality(kind):
    model = _gpt(kind)
    ids = torch.randint(0, 200, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 200)
    assert model.encode(ids).shape == (2, 10, 32)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 200
    # the future cannot change the past
    assert_close(model(changed)[:, :6], logits[:, :6])


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_gpt_padding_does_not_change_real_positions(kind):
    model = _gpt(kind)
    ids = torch.randint(0, 200, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    assert_close(model(padded, mask)[:, :7], model(ids), atol=1e-5, rtol=1e-5)


def test_bert_padding_does_not_change_real_positions():
    model = _bert()
    ids = torch.randint(5, 200, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    assert_close(model.encode(padded, mask)[:, :7], model.encode(ids), atol=1e-5, rtol=1e-5)
    hidden = model.encode(ids)
    assert model(ids).shape == (1, 7, 200) and model.nsp_logits(hidden).shape == (1, 2)
    # a bidirectional encoder: changing the last token changes the first position
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 200
    assert not torch.allclose(model.encode(changed)[:, 0], hidden[:, 0])


def _roberta():
    return build(preset("bert-tiny", vocab_size=200, dim=32, n_heads=4, max_seq_len=32, positions="learned_skip_pad",
                        type_vocab_size=1, pad_token_id=1, nsp=False)).eval()


def test_roberta_positions_skip_padding_on_either_side():
    """RoBERTa numbers real tokens from pad_id + 1 and gives padding pad_id, so a sequence
    encodes the same with padding on the right or on the left."""
    model = _roberta()
    assert model.pos_emb.weight.shape == (32 + 2, 32)
    ids = torch.randint(5, 200, (1, 7))
    pad = torch.ones(1, 3, dtype=torch.long)
    right, left = torch.cat([ids, pad], 1), torch.cat([pad, ids], 1)
    assert model.position_ids(right).tolist() == [[2, 3, 4, 5, 6, 7, 8, 1, 1, 1]]
    assert model.position_ids(left).tolist() == [[1, 1, 1, 2, 3, 4, 5, 6, 7, 8]]
    mask = right.ne(1).long()
    alone = model.encode(ids)
    assert_close(model.encode(right, mask)[:, :7], alone, atol=1e-5, rtol=1e-5)
    assert_close(model.encode(left, left.ne(1).long())[:, 3:], alone, atol=1e-5, rtol=1e-5)
    # one segment: token types (a RoBERTa tokenizer's pairs may mark 1s) change nothing
    assert_close(model.encode(ids, token_type_ids=torch.ones_like(ids)), alone)
    assert model.nsp_head is None and model.pooler is not None
    with pytest.raises(ValueError, match="no next-sentence head"):
        model.nsp_logits(alone)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_distilbert_shape_encoder_has_no_segments_nor_pooler(positions):
    model = build(preset("bert-tiny", vocab_size=200, dim=32, n_heads=4, max_seq_len=32, type_vocab_size=0,
                         pooler=False, nsp=False, positions=positions)).eval()
    assert model.type_emb is None and model.pooler is None
    assert ("pos_emb.weight" in model.state_dict()) == (positions == "learned")
    ids = torch.randint(5, 200, (2, 9))
    assert_close(model.encode(ids, token_type_ids=torch.ones_like(ids)), model.encode(ids))
    assert model(ids).shape == (2, 9, 200)
    with pytest.raises(ValueError, match="pooler"):
        attach_head(model, HeadSpec("sequence-classification", ["a", "b"], "pooler"))
    head = attach_head(model, HeadSpec("sequence-classification", ["a", "b"], "cls", hidden="relu")).eval()
    assert head(ids).shape == (2, 2) and head.hidden.dense.weight.shape == (32, 32)


def test_encoder_config_checks_name_the_field():
    with pytest.raises(ValueError, match="nsp"):
        BertConfig(pooler=False)
    with pytest.raises(ValueError, match="positions"):
        BertConfig(positions="rope")
    with pytest.raises(ValueError, match="type_vocab_size"):
        BertConfig(type_vocab_size=-1)
    with pytest.raises(ValueError, match="HeadSpec.hidden"):
        HeadSpec("span", hidden="tanh")


def test_encdec_padding_and_contract():
    model = _bart()
    src = torch.randint(3, 200, (1, 9))
    tgt = torch.randint(3, 200, (1, 5))
    padded = torch.cat([src, torch.ones(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 9 + [0] * 4])
    assert model(src, tgt).shape == (1, 5, 200)
    assert_close(model(padded, tgt, mask), model(src, tgt), atol=1e-5, rtol=1e-5)
    assert model.encode(src).shape == (1, 9, 32)


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "bart", "transformer"])
def test_loss_at_init_is_about_ln_vocab(name):
    torch.manual_seed(0)
    V = 1000
    if name in ("gpt", "llama"):
        model = build(GPTConfig(**{**TINY[name], "vocab_size": V}))
        logits = model(torch.randint(0, V, (4, 32)))
    elif name == "bert":
        model = build(preset("bert-tiny", vocab_size=V, dim=32, n_heads=4, max_seq_len=32))
        logits = model(torch.randint(0, V, (4, 32)))
    else:
        model = build(preset(f"{name}-tiny", vocab_size=V, dim=32, n_heads=4, max_seq_len=32))
        logits = model(torch.randint(3, V, (4, 32)), torch.randint(3, V, (4, 16)))
    loss = F.cross_entropy(logits.flatten(0, 1), torch.randint(0, V, (logits.shape[0] * logits.shape[1],)))
    assert abs(loss.item() - math.log(V)) < 0.1 * math.log(V)


def test_preset_parameter_counts_match_the_published_models():
    with torch.device("meta"):
        gpt2 = build(preset("gpt2-124m", vocab_multiple=1))
        bert = build(preset("bert-base", vocab_multiple=1))
    assert count_params(gpt2) == 124_439_808  # GPT-2 small, tied embeddings
    assert count_params(bert) == 110_106_428  # BertForPreTraining (pooler, MLM and NSP heads)
    assert count_params(gpt2, positions=False) == 124_439_808 - 1024 * 768


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        with torch.device("meta"):
            assert count_params(build(preset(name))) > 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="GPTConfig.dim"):
        GPTConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="GPTConfig.positions"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig(n_heads=12, n_kv_heads=5)
    with pytest.raises(ValueError, match="BertConfig: unknown field"):
        BertConfig.from_dict({"dimension": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")


def test_heads_shapes_and_last_token_pooling():
    gpt = _gpt()
    clf = attach_head(gpt, HeadSpec("sequence-classification", ["a", "b", "c"], pooling="last")).eval()
    ids = torch.randint(0, 200, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = clf(ids, mask)
    assert out.shape == (2, 3)
    # row 1 pools its 4th token: same as classifying the unpadded prefix
    assert_close(out[1], clf(ids[1:, :4])[0], atol=1e-5, rtol=1e-5)
    tok = attach_head(_bert(), HeadSpec("token-classification", ["O", "B-X"]))
    assert tok(ids).shape == (2, 6, 2)
    start, end = attach_head(_bert(), HeadSpec("span"))(ids)
    assert start.shape == end.shape == (2, 6)
    assert isinstance(_bert(), Bert) and isinstance(_bart(), EncoderDecoder)
