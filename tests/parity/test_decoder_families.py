"""The Llama-style families as transformers writes and reads them: Llama, Qwen2 (q/k/v
biases), Qwen3 (per-head q/k RMS norms), Mistral (a sliding window). Each is saved by
transformers' save_pretrained and read by lmforge.load, written back by LM.save and read
by transformers; logits and greedy and beam-search tokens equal, fp32 on CPU."""

import json

import pytest
import torch
import transformers as hf
from torch.testing import assert_close

import lmforge
from lmforge.generate.decode import generate

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
FAMILIES = {
    "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(**COMMON)),
    "qwen2": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen3": lambda: hf.Qwen3ForCausalLM(hf.Qwen3Config(**COMMON, head_dim=16)),
    "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(**COMMON, sliding_window=5)),
}


def _model(name):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    with torch.no_grad():  # biases and norm gains away from their init, so the maps are really checked
        for key, value in model.state_dict().items():
            if key.endswith(("bias", "norm.weight")):
                value.normal_(1.0 if "norm" in key else 0.0, 0.3)
    return model


def _batch():
    ids = torch.randint(3, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for generation
    mask[2, :6] = 0
    return ids, mask


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path):
    theirs = _model(request.param)
    theirs.save_pretrained(tmp_path / "hf")
    return request.param, theirs, tmp_path


def test_lmforge_reads_what_transformers_writes(family):
    name, theirs, tmp = family
    lm = lmforge.load(tmp / "hf")
    ids, mask = _batch()
    keep = mask.bool()
    with torch.no_grad():
        assert_close(lm.model(ids, mask)[keep], theirs(ids, attention_mask=mask).logits[keep], atol=1e-4, rtol=1e-4)
        long = torch.randint(3, V, (1, 40))  # past Mistral's window of 5
        assert_close(lm.model(long), theirs(long).logits, atol=1e-4, rtol=1e-4)


def test_transformers_reads_what_lmforge_writes(family):
    name, theirs, tmp = family
    lmforge.load(tmp / "hf").save(tmp / "out", format="hf")
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["model_type"] == name and cfg["architectures"] == [type(theirs).__name__]
    again = hf.AutoModelForCausalLM.from_pretrained(tmp / "out").eval()
    ids = torch.randint(3, V, (2, 30))
    with torch.no_grad():
        assert_close(again(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
    assert again.config.tie_word_embeddings == theirs.config.tie_word_embeddings


@pytest.mark.parametrize("beams", [1, 3])
def test_greedy_and_beam_search_tokens_equal_transformers(family, beams):
    name, theirs, tmp = family
    ours = lmforge.load(tmp / "hf").model
    ids, mask = _batch()
    kw = dict(max_new_tokens=8, num_beams=beams)
    tokens = generate(ours, ids, mask, eos_token_id=None, pad_token_id=0, **kw).tokens
    with torch.no_grad():
        ref = theirs.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0,
                              **kw)[:, ids.size(1):]
    assert torch.equal(tokens, ref)
