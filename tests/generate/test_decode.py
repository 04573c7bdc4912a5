"""Decoding with the KV cache against full recomputation, padding invariance, EOS and
stopping, sampling reproducibility, beam scores, the compiled step, and the text API."""

import time

import pytest
import torch
from torch.testing import assert_close

from lmforge.generate import (
    CompiledDecodeStep,
    GenerationConfig,
    beam_search,
    chat_prompt,
    detokenize_stream,
    generate,
    generate_text,
    gpt_decode_step,
    iter_generate,
    stream_text,
)
from lmforge.models import GPT, EncoderDecoder, EncoderDecoderConfig, GPTConfig

V = 97
PAD = 0


def _sharpen(model):
    """Random init gives near-uniform logits; larger weights give clear argmax margins."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model.eval()


def _gpt(kind="learned", vocab=V):
    extra = dict(positions="rope", n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False) if kind == "rope" else {}
    cfg = GPTConfig(vocab_size=vocab, max_seq_len=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                    tie_embeddings=False, **extra)
    return _sharpen(GPT(cfg))


def _encdec():
    cfg = EncoderDecoderConfig(vocab_size=V, max_seq_len=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                               dropout=0.0, position_offset=2, pad_token_id=1, decoder_start_token_id=2)
    return _sharpen(EncoderDecoder(cfg))


PROMPTS = [[5, 17, 33, 8, 41], [60, 2, 9, 71, 13, 22, 86, 30], [44, 3, 90]]


def _batch(prompts=PROMPTS, left=True):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), PAD)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(P - len(p), P) if left else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def _greedy_reference(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence every step (no cache, no padding)."""
    if isinstance(model, EncoderDecoder):
        src, seq = torch.tensor([prompt]), torch.tensor([[model.config.decoder_start_token_id]])
        for _ in range(n):
            seq = torch.cat([seq, model(src, seq)[:, -1].argmax(-1, keepdim=True)], 1)
        return seq[0, 1:].tolist()
    seq = torch.tensor([prompt])
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


@torch.no_grad()
def _sequence_logprob(model, prompt, tokens):
    """Sum of log p(token | prefix) by full recomputation."""
    if isinstance(model, EncoderDecoder):
        dec = torch.tensor([[model.config.decoder_start_token_id] + tokens[:-1]])
        logp = model(torch.tensor([prompt]), dec)[0].log_softmax(-1)
    else:
        logp = model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:].log_softmax(-1)
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()


MODELS = {"gpt-learned": lambda: _gpt("learned"), "llama-rope-gqa": lambda: _gpt("rope"), "encdec": _encdec}


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_equals_recompute_and_padding_changes_nothing(name):
    model = MODELS[name]()
    ids, mask = _batch(left=name != "encdec")
    out = generate(model, ids, mask, max_new_tokens=12)
    assert out.tokens.shape == (3, 12) and out.lengths.tolist() == [12] * 3
    for row, prompt in enumerate(PROMPTS):
        want = _greedy_reference(model, prompt, 12)
        assert out.tokens[row].tolist() == want, f"row {row}"
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=12).tokens[0].tolist()
        assert alone == want


def test_eos_stops_rows_pads_them_and_trims_the_output():
    model = _gpt("rope")
    ids, mask = _batch()
    free = generate(model, ids, mask, max_new_tokens=16).tokens.tolist()
    eos = free[0][4]
    out = generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD)
    want = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    T = max(map(len, want))
    assert out.tokens.shape == (3, T)
    assert out.lengths.tolist() == [len(w) for w in want]
    for row, w in zip(out.tokens.tolist(), want):
        assert row == w + [PAD] * (T - len(w))


def test_generation_stops_as_soon_as_every_row_finished():
    model = _gpt("learned")
    prompt = torch.tensor([PROMPTS[0]])
    eos = generate(model, prompt, max_new_tokens=6).tokens[0, 2].item()
    calls = []

    def counting_step(*args):
        calls.append(1)
        return gpt_decode_step(*args)

    out = generate(model, prompt, max_new_tokens=30, eos_token_id=eos, decode_step=counting_step)
    n = out.lengths.item()
    assert n <= 3 and out.tokens[0, n - 1] == eos
    assert len(calls) == n - 1  # prefill gives the first token; no step after EOS
    # checking every 4 steps runs a little longer but returns the same tokens
    late = generate(model, prompt, max_new_tokens=30, eos_token_id=eos, sync_every=4)
    assert torch.equal(late.tokens, out.tokens)


def test_min_new_tokens_and_forced_tokens():
    model = _gpt("learned")
    prompt = torch.tensor([PROMPTS[1]])
    first = generate(model, prompt, max_new_tokens=1).tokens[0, 0].item()
    out = generate(model, prompt, max_new_tokens=10, eos_token_id=first, min_new_tokens=4)
    assert first not in out.tokens[0, :4].tolist() and out.lengths.item() >= 4
    forced = generate(model, prompt, max_new_tokens=6, forced_bos_token_id=7, forced_eos_token_id=9).tokens[0]
    assert forced[0] == 7 and forced[-1] == 9 and len(forced) == 6


@pytest.mark.parametrize("name", MODELS)
def test_sampling_reproducible_by_seed_and_cold_or_top1_equals_greedy(name):
    model = MODELS[name]()
    ids, mask = _batch(left=name != "encdec")
    kw = dict(max_new_tokens=10, temperature=1.5)
    a = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw).tokens
    b = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw).tokens
    c = generate(model, ids, mask, generator=torch.Generator().manual_seed(4), **kw).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, mask, max_new_tokens=10).tokens
    assert torch.equal(generate(model, ids, mask, max_new_tokens=10, temperature=1e-5).tokens, greedy)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=1).tokens, greedy)


def test_num_return_sequences_expands_each_prompt():
    model = _gpt("rope")
    ids, mask = _batch()
    out = generate(model, ids, mask, max_new_tokens=8, temperature=2.0, num_return_sequences=3,
                   generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (9, 8)
    for p in range(3):
        group = out.tokens[3 * p: 3 * p + 3]
        assert len({tuple(r) for r in group.tolist()}) > 1  # different samples of the same prompt


def test_logprobs_match_recomputation():
    model = _gpt("rope")
    prompt = PROMPTS[0]
    out = generate(model, torch.tensor([prompt]), max_new_tokens=6, logprobs=True, top_logprobs=3)
    tokens = out.tokens[0].tolist()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1: -1].log_softmax(-1)
    assert_close(out.logprobs[0], logp[torch.arange(6), out.tokens[0]], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.top_ids[0, :, 0], out.tokens[0])  # greedy picks the top-1
    assert_close(out.top_logprobs[0], logp.topk(3).values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_beam_scores_are_length_normalised_logprobs_and_padding_changes_nothing(name):
    model = MODELS[name]()
    ids, mask = _batch(left=name != "encdec")
    free = generate(model, ids, mask, max_new_tokens=10, num_beams=3).tokens
    eos = free[0, 3].item()  # make some hypotheses finish early
    kw = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD,
              length_penalty=0.7)
    out = beam_search(model, ids, mask, **kw)
    assert out.tokens.shape[0] == 6 and (out.lengths < 10).any()
    for r in range(6):
        prompt, n = PROMPTS[r // 2], out.lengths[r].item()
        tokens = out.tokens[r, :n].tolist()
        assert_close(out.scores[r].item(), _sequence_logprob(model, prompt, tokens) / n ** 0.7, atol=1e-4, rtol=1e-4)
        assert out.tokens[r, n:].eq(PAD).all()
    assert (out.scores[0::2] >= out.scores[1::2]).all()  # best hypothesis first
    for p, prompt in enumerate(PROMPTS):
        alone = beam_search(model, torch.tensor([prompt]), **kw)
        T = alone.tokens.shape[1]
        assert torch.equal(alone.tokens, out.tokens[2 * p: 2 * p + 2, :T])


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens():
    model = _gpt("rope")
    ids, mask = _batch()
    eager = generate(model, ids, mask, max_new_tokens=8)
    step = CompiledDecodeStep(gpt_decode_step, mode="default")
    start = time.perf_counter()
    compiled = generate(model, ids, mask, max_new_tokens=8, decode_step=step)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert time.perf_counter() - start < 300
    again = generate(model, ids, mask, max_new_tokens=8, decode_step=step)  # cache reused, no recompile
    assert torch.equal(again.tokens, eager.tokens)


def test_bad_requests_raise_clear_errors():
    model = _gpt("learned")
    ids, mask = _batch(left=False)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=70)
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="deterministic"):
        GenerationConfig(num_beams=2, temperature=0.5)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        generate(model, ids[:2], torch.tensor([[1] * 8, [0] * 8]), max_new_tokens=3)
    with pytest.raises(ValueError, match="beam search"):
        next(iter_generate(model, ids, num_beams=2))


# ---- the text API, with a byte-level stand-in tokenizer -----------------------------------------

class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256 = BOS, 257 = EOS, 258 = PAD."""

    def __init__(self, eos_id=257, chat_template=None):
        self.bos_id, self.eos_id, self.pad_id, self.chat_template = 256, eos_id, 258, chat_template

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        names = {256: "<s>", 257: "</s>", 258: "<pad>"}
        out, run = [], []
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if not skip_special_tokens:
                out.append(names[i])
        return "".join(out) + bytes(run).decode("utf-8", errors="replace")


TEXT_PROMPTS = ["Once upon a time", "The"]


def test_generate_text_decodes_new_tokens_and_batches_like_single_prompts():
    model, tok = _gpt("rope", vocab=259), ByteTokenizer()
    texts = generate_text(model, tok, TEXT_PROMPTS, max_new_tokens=12)
    ids = torch.tensor([tok.encode(TEXT_PROMPTS[1])])
    assert texts[1] == tok.decode(generate(model, ids, max_new_tokens=12).tokens[0].tolist())
    assert texts == [generate_text(model, tok, p, max_new_tokens=12)[0] for p in TEXT_PROMPTS]
    many = generate_text(model, tok, TEXT_PROMPTS, max_new_tokens=5, temperature=1.0, num_return_sequences=2,
                         seed=0)
    assert [len(m) for m in many] == [2, 2]
    assert many == generate_text(model, tok, TEXT_PROMPTS, max_new_tokens=5, temperature=1.0,
                                 num_return_sequences=2, seed=0)
    beams = generate_text(model, tok, TEXT_PROMPTS, max_new_tokens=6, num_beams=3)
    assert beams == [tok.decode(generate(model, torch.tensor([tok.encode(p)]), max_new_tokens=6,
                                         num_beams=3).tokens[0].tolist()) for p in TEXT_PROMPTS]


def test_generate_text_stops_at_eos_and_at_stop_strings():
    model = _gpt("rope", vocab=259)
    tok = ByteTokenizer()
    new = generate(model, torch.tensor([tok.encode("Once")]), max_new_tokens=24).tokens[0].tolist()
    full = tok.decode(new)
    # EOS: a tokenizer whose EOS is a byte the model emits cuts there
    eos = new[6]
    assert generate_text(model, ByteTokenizer(eos_id=eos), "Once", max_new_tokens=24) == [
        tok.decode(new[: new.index(eos)])]
    # stop string: cut before its first occurrence, and generation ends early
    clean = [i for i in range(len(full) - 1) if "\ufffd" not in full[i: i + 2]]
    stop = full[clean[len(clean) // 2]: clean[len(clean) // 2] + 2]
    want = full[: full.find(stop)]
    assert want
    calls = []

    def counting_step(*args):
        calls.append(1)
        return gpt_decode_step(*args)

    assert generate_text(model, tok, "Once", max_new_tokens=24, stop=[stop, "never-there"],
                         decode_step=counting_step) == [want]
    assert len(calls) < 23
    assert "".join(stream_text(model, tok, "Once", max_new_tokens=24, stop=[stop])) == want


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.2, top_p=0.9, seed=5), dict(repetition_penalty=1.5)])
def test_stream_text_joins_to_generate_text(kw):
    model, tok = _gpt("rope", vocab=259), ByteTokenizer()
    pieces = list(stream_text(model, tok, "Hello", max_new_tokens=20, **kw))
    assert "".join(pieces) == generate_text(model, tok, "Hello", max_new_tokens=20, **kw)[0]
    assert len(pieces) > 1


def test_detokenize_stream_waits_for_whole_characters_and_holds_back_stop_prefixes():
    tok = ByteTokenizer()
    text = "héllo wörld 😀!"
    pieces = list(detokenize_stream(tok, tok.encode(text, add_special_tokens=False)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "😀" in pieces  # its four bytes came out as one piece
    assert "".join(detokenize_stream(tok, tok.encode(text, False), stop=["wö"])) == "héllo "
    assert list(detokenize_stream(tok, tok.encode("xxabc", False), stop=["abd"])) == ["x", "x", "abc"]
    assert "".join(detokenize_stream(tok, tok.encode("abc", False) + [257] + [100], eos_id=257)) == "abc"


def test_encoder_decoder_generate_text_batches_like_single_sources():
    model, tok = _encdec(), ByteTokenizer()
    tok.pad_id = 1  # the model's vocabulary is 97 ids: ASCII sources, its own pad id
    small = [chr(c) for c in range(40, 90)]
    sources = ["".join(small[:12]), "".join(small[20:25])]
    texts = generate_text(model, tok, sources, max_new_tokens=8, add_special_tokens=False)
    assert texts == [generate_text(model, tok, s, max_new_tokens=8, add_special_tokens=False)[0] for s in sources]
    ids = torch.tensor([list(sources[0].encode())])
    assert texts[0] == tok.decode(generate(model, ids, max_new_tokens=8).tokens[0].tolist())


def test_chat_prompt_renders_templates():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(ByteTokenizer(), messages) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert chat_prompt(ByteTokenizer(), messages, add_generation_prompt=False).endswith("Hi\n")
    custom = ByteTokenizer(chat_template="{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                                         "{{ eos_token }}{% endfor %}")
    assert chat_prompt(custom, messages) == "<s>[system] Be brief.</s>[user] Hi</s>"
    strict = ByteTokenizer(chat_template="{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}"
                                         "{% endif %}")
    with pytest.raises(ValueError, match="user first"):
        chat_prompt(strict, messages)
    with pytest.raises(ValueError, match=r"line 1"):
        chat_prompt(ByteTokenizer(chat_template="{% for %}"), messages)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        chat_prompt(ByteTokenizer(), [messages[0], {"role": "user"}])
