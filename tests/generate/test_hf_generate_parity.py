"""lmforge generation against `transformers.generate` on the same random weights (fp32, CPU):
greedy and beam search must produce identical tokens for GPT-2, Llama with grouped-query
attention, BART and T5 (v1.0, and the untied, gated v1.1 of Flan-T5), including left-padded
batches, EOS, length penalties, the three early-stopping rules, n-gram and repetition penalties,
and BART's forced BOS/EOS."""

import pytest
import torch
import transformers as hf

from lmforge.generate import generate
from lmforge.interop.hf import from_transformers

V = 97
PAD, BOS, START = 1, 0, 2
MAX_NEW = 16

SETTINGS = {
    "greedy": dict(),
    "greedy-repetition": dict(repetition_penalty=1.3),
    "greedy-ngram-min-new": dict(no_repeat_ngram_size=2, min_new_tokens=4),
    "beam4": dict(num_beams=4),
    "beam4-lp0.5-early": dict(num_beams=4, length_penalty=0.5, early_stopping=True),
    "beam3-never-lp1.5": dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    "beam3-ngram-repetition-return2": dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.2,
                                           num_return_sequences=2),
}


# initializer_range 0.2 instead of 0.02: clear argmax margins, so that float rounding
# differences between the two implementations cannot flip a near-tie.
def _gpt2():
    return hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            initializer_range=0.2, bos_token_id=BOS, eos_token_id=START,
                                            pad_token_id=PAD))


def _llama():
    return hf.LlamaForCausalLM(hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, initializer_range=0.2, bos_token_id=BOS,
                                              pad_token_id=PAD))


def _bart():
    cfg = hf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, init_std=0.2, bos_token_id=BOS, pad_token_id=PAD,
                        decoder_start_token_id=START)
    model = hf.BartForConditionalGeneration(cfg)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def _t5(v11: bool):
    """T5's decoder starts from its padding token."""
    cfg = hf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=PAD,
                      decoder_start_token_id=PAD, feed_forward_proj="gated-gelu" if v11 else "relu",
                      tie_word_embeddings=not v11)
    model = hf.T5ForConditionalGeneration(cfg)
    if v11:  # transformers 5 ties a fresh model's head whatever the config says
        torch.manual_seed(3)  # a head whose picked EOS ends most hypotheses (test_eos_really_ends_hypotheses)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
    return model


MODELS = {"gpt2": _gpt2, "llama-gqa": _llama, "bart": _bart, "t5": lambda: _t5(False), "flan-t5": lambda: _t5(True)}
ENCDEC = ("bart", "t5", "flan-t5")


def _batch(encdec):
    """Three prompts of lengths 9, 6 and 4: left-padded for decoders, right-padded sources for BART."""
    ids = torch.randint(3, V, (3, 9))
    mask = torch.ones_like(ids)
    for row, n in ((1, 6), (2, 4)):
        if encdec:
            mask[row, n:] = 0
        else:
            mask[row, : 9 - n] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _theirs(model, ids, mask, encdec, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD,
                         forced_bos_token_id=kw.pop("forced_bos_token_id", None),
                         forced_eos_token_id=kw.pop("forced_eos_token_id", None), **kw)
    return out[:, 1:] if encdec else out[:, ids.size(1):]  # new tokens only


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    torch.manual_seed(0)
    theirs = MODELS[request.param]().eval()
    ours = from_transformers(theirs).eval()
    encdec = request.param in ENCDEC
    torch.manual_seed(2)  # the batch does not depend on how many numbers building the models drew
    ids, mask = _batch(encdec)
    # An EOS the models really emit: the 4th token of the first prompt's beam search.
    eos = _theirs(theirs, ids, mask, encdec, num_beams=3, eos_token_id=None)[0, 3].item()
    return theirs, ours, ids, mask, encdec, eos


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_tokens_as_transformers(pair, setting):
    theirs, ours, ids, mask, encdec, eos = pair
    kw = SETTINGS[setting]
    want = _theirs(theirs, ids, mask, encdec, eos_token_id=eos, **kw)
    got = generate(ours, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, **kw)
    assert got.tokens.shape == want.shape, (got.tokens, want)
    assert torch.equal(got.tokens, want), (got.tokens, want)


def test_eos_really_ends_hypotheses(pair):
    """Guards the parity test's strength: with the chosen EOS, some outputs end early."""
    _, ours, ids, mask, _, eos = pair
    ended = [(generate(ours, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, **kw).lengths < MAX_NEW).any()
             for kw in SETTINGS.values()]
    assert sum(ended) >= len(ended) // 2


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bart_forced_bos_and_eos(num_beams):
    torch.manual_seed(1)
    theirs = _bart().eval()
    ours = from_transformers(theirs).eval()
    ids, mask = _batch(encdec=True)
    kw = dict(num_beams=num_beams, forced_bos_token_id=BOS, forced_eos_token_id=START, eos_token_id=START)
    want = _theirs(theirs, ids, mask, True, **dict(kw))
    got = generate(ours, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=PAD, **kw).tokens
    assert torch.equal(got, want), (got, want)
    assert (got[:, 0] == BOS).all()
