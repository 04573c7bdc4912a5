"""Prompt lookup (n-gram drafts from the context, verified in one forward pass) emits exactly
what plain greedy decoding emits, in fewer passes when the context predicts the output; a
prompt run through the model in chunks gives the logits and tokens of the whole prompt at once."""

import pytest
import torch
from torch.testing import assert_close

from lmforge.generate import generate, generate_text, stream_text
from lmforge.generate.decode import GenerationConfig, lookup_draft
from lmforge.models import GPT, GPTConfig
from lmforge.nn.quant import quantize

V = 97
EXTRA = {"gpt-learned": {}, "llama-rope-gqa": dict(positions="rope", n_kv_heads=2, norm="rmsnorm", mlp="swiglu",
                                                   bias=False),
         "sliding-window": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, sliding_window=6)}


def _gpt(kind: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, max_seq_len=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                          tie_embeddings=False, **EXTRA[kind]))
    with torch.no_grad():  # clear argmax margins (random init is near-uniform)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model.eval()


PROMPTS = [[5, 17, 33, 8, 41, 5, 17, 33, 8, 41, 5, 17],  # repeats itself: drafts from the prompt
           [60, 2, 9, 71, 13, 22, 86, 30, 60, 2, 9],
           [44, 3, 90],  # too short to repeat: drafts only from the output
           list(range(10, 40))]


def test_lookup_draft_takes_the_latest_longest_match():
    seq = [1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    assert lookup_draft(seq, 2) == [9, 9]  # the 3-gram "1 2 3" first, at its one earlier place
    assert lookup_draft([4, 5, 6, 4, 5], 3) == [6, 4, 5]
    assert lookup_draft([4, 5, 6, 4, 5], 1) == [6]
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([7], 4) == [] and lookup_draft([1, 1], 0) == []


class _Passes:
    """Counts forward passes through the LM head."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.lm_head.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("kind", list(EXTRA))
@pytest.mark.parametrize("k", [1, 4, 10])
def test_prompt_lookup_equals_plain_greedy(kind, k):
    model = _gpt(kind)
    saved = 0
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        want = generate(model, ids, max_new_tokens=40).tokens
        passes = _Passes(model)
        got = generate(model, ids, max_new_tokens=40, prompt_lookup=k).tokens
        passes.handle.remove()
        assert torch.equal(got, want), prompt
        saved += 40 - passes.n
    assert saved > 0  # drafts were accepted: fewer passes than tokens


def test_prompt_lookup_with_eos_padding_and_an_int8_model():
    model = _gpt("llama-rope-gqa")
    ids = torch.tensor([PROMPTS[0]])
    plain = generate(model, ids, max_new_tokens=30).tokens[0].tolist()
    eos = plain[7]  # a token greedy emits: both stop at its first occurrence
    out = generate(model, ids, max_new_tokens=30, eos_token_id=eos, prompt_lookup=5)
    assert out.tokens[0].tolist() == plain[:plain.index(eos) + 1]
    # a left-padded single prompt: positions count real tokens only
    padded, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.tensor([[0] * 3 + [1] * 12])
    assert generate(model, padded, mask, max_new_tokens=30, prompt_lookup=5).tokens[0].tolist() == plain
    q = quantize(_gpt("llama-rope-gqa"), "int8")
    assert torch.equal(generate(q, ids, max_new_tokens=30, prompt_lookup=4).tokens,
                       generate(q, ids, max_new_tokens=30).tokens)


def test_prompt_lookup_in_the_text_api(tokenizer_and_model):
    tok, model = tokenizer_and_model
    prompt = "the cat sat on the mat. the cat sat on the"
    want = generate_text(model, tok, prompt, max_new_tokens=24)
    assert generate_text(model, tok, prompt, max_new_tokens=24, prompt_lookup=6) == want
    assert "".join(stream_text(model, tok, prompt, max_new_tokens=24, prompt_lookup=6)) == want[0]


def test_prompt_lookup_refuses_what_it_cannot_keep_exact():
    model = _gpt("gpt-learned")
    ids = torch.tensor([PROMPTS[0]])
    for bad in (dict(temperature=0.8), dict(repetition_penalty=1.3), dict(logprobs=True)):
        with pytest.raises(ValueError, match="plain greedy"):
            generate(model, ids, max_new_tokens=4, prompt_lookup=3, **bad)
    with pytest.raises(ValueError, match="one prompt at a time"):
        generate(model, ids.repeat(2, 1), max_new_tokens=4, prompt_lookup=3)
    with pytest.raises(ValueError, match="prompt_lookup"):
        GenerationConfig(prompt_lookup=-1)


# ---- chunked prefill ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(EXTRA))
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_the_whole_prompt(kind, chunk):
    model = _gpt(kind)
    ids = torch.tensor([PROMPTS[3], [0] * 18 + PROMPTS[0]])  # the second row left-padded
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [18]])).long()
    whole = generate(model, ids, mask, max_new_tokens=20, logprobs=True, top_logprobs=5)
    chunked = generate(model, ids, mask, max_new_tokens=20, logprobs=True, top_logprobs=5, prefill_chunk=chunk)
    assert torch.equal(chunked.tokens, whole.tokens)
    assert_close(chunked.top_logprobs, whole.top_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(model, ids[:1], max_new_tokens=20, prefill_chunk=chunk, prompt_lookup=4).tokens,
                       whole.tokens[:1])


def test_prefill_chunk_must_be_positive():
    with pytest.raises(ValueError, match="prefill_chunk"):
        GenerationConfig(prefill_chunk=0)


@pytest.fixture(scope="module")
def tokenizer_and_model():
    from lmforge.tokenizer import train_tokenizer

    text = "the cat sat on the mat. the dog ran in the park. a bird sang in the tree. " * 30
    tok = train_tokenizer(texts=[text], kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    return tok, model.eval()
