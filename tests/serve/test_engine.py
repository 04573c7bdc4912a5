"""The engine: same output as lmforge.generate's text API, streamed pieces that add up,
top-k probabilities of the model's own distribution, cancellation, a bounded queue,
and a worker that survives failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.generate import generate_text
from lmforge.generate.detokenize import Detokenizer, TokenInfo, held_back
from lmforge.models import build, preset
from lmforge.serve.engine import Engine, EngineBusy, GenerationRequest
from lmforge.serve.protocol import bytes_of

from .conftest import UNICODE_LINE, tiny_gpt

PROMPT = "ROMEO: What light"

CASES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0, seed=7),
    "top-k-top-p": dict(temperature=0.8, top_k=20, top_p=0.9, seed=3),
    "n=3": dict(temperature=1.0, seed=11, n=3),
    "penalty": dict(temperature=0.0, repetition_penalty=1.5),
    "stop-unseen": dict(temperature=0.0, stop=["never seen"]),
}


@pytest.fixture(scope="module")
def engine(lm):
    eng = Engine(lm.model, lm.tokenizer, max_active=3)
    yield eng
    eng.close()


def request(tokenizer, prompt=PROMPT, max_tokens=24, **kw) -> GenerationRequest:
    return GenerationRequest(prompts=[tokenizer.encode(prompt)], max_tokens=max_tokens, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_generate_text(engine, lm, case):
    kw = CASES[case]
    result = engine.generate(request(lm.tokenizer, **kw))
    n = kw.get("n", 1)
    expected = generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=24, temperature=kw["temperature"],
                             top_k=kw.get("top_k"), top_p=kw.get("top_p"),
                             repetition_penalty=kw.get("repetition_penalty", 1.0), num_return_sequences=n,
                             stop=kw.get("stop"), seed=kw.get("seed"))
    expected = expected[0] if n > 1 else expected
    assert [c.text for c in result.choices] == expected
    assert [c.index for c in result.choices] == list(range(n))
    assert result.prompt_tokens == len(lm.tokenizer.encode(PROMPT))
    for c in result.choices:
        assert "".join(t.text for t in c.tokens) == c.text
        assert c.finish_reason in ("stop", "length")
    if case == "greedy":
        assert result.choices[0].finish_reason == "length" and result.completion_tokens == 24


def stop_inside(text: str) -> tuple[str, int]:
    """A two-character stop string that first occurs at index k >= 1 of text, and k."""
    k = next(i for i, ch in enumerate(text) if ch != text[0])  # text[1:k] repeat text[0], so it first occurs at k
    return text[k:k + 2], k


def test_stop_strings_cut_like_generate_text(engine, lm):
    sampled = dict(temperature=1.0, seed=1)  # (the random model's greedy text repeats one character)
    full = engine.generate(request(lm.tokenizer, **sampled)).choices[0].text
    stop, k = stop_inside(full)
    result = engine.generate(request(lm.tokenizer, stop=[stop, "never seen"], **sampled))
    assert result.choices[0].text == full[:k] and result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=24,
                                                   stop=[stop, "never seen"], **sampled)[0]
    assert "".join(t.text for t in result.choices[0].tokens) == full[:k]


def test_stream_pieces_add_up_to_the_result(engine, lm):
    req = request(lm.tokenizer, temperature=1.0, seed=5, n=2, top_logprobs=3)
    pieces = list(engine.stream(req))
    result = engine.generate(req)
    for choice in result.choices:
        mine = [p for p in pieces if p.index == choice.index]
        assert "".join(p.text for p in mine) == choice.text
        assert [t.id for p in mine for t in p.tokens] == [t.id for t in choice.tokens]
        assert all(p.finish_reason is None for p in mine[:-1]) and mine[-1].finish_reason == choice.finish_reason
        for p in mine:
            assert "".join(t.text for t in p.tokens) == p.text


def test_top_logprobs_are_the_models_next_token_distribution(engine, lm):
    ids = lm.tokenizer.encode(PROMPT)
    result = engine.generate(GenerationRequest(prompts=[ids], max_tokens=2, temperature=0.0, top_logprobs=5))
    first = result.choices[0].tokens[0]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0, -1, : lm.model.config.vocab_size]
    values, indices = logits.float().log_softmax(-1).topk(5)
    assert [i for i, _, _ in first.top] == indices.tolist()
    torch.testing.assert_close(torch.tensor([v for _, _, v in first.top]), values)
    assert first.id == indices[0].item()  # greedy picks the most likely token
    assert first.logprob == pytest.approx(values[0].item(), abs=1e-5)
    for i, s, _ in first.top:
        text = lm.tokenizer.decode([i], skip_special_tokens=False)
        assert s == text or ("\ufffd" in text and s.startswith("bytes:"))


def test_token_strings_name_the_bytes_of_partial_characters(engine, tokenizer):
    ids = tokenizer.encode("日本語 🙂", add_special_tokens=False)
    strings = [engine.token_string(i) for i in ids]
    assert any(s.startswith("bytes:\\x") for s in strings)
    assert b"".join(bytes(bytes_of(s)) for s in strings).decode() == "日本語 🙂"


def test_a_model_that_always_says_eos_stops_at_once(lm):
    model = tiny_gpt(lm.tokenizer.vocab_size)
    with torch.no_grad():  # the final norm outputs a constant vector e; only EOS's row of the head matches it
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[lm.tokenizer.eos_id] = 1.0
    eng = Engine(model, lm.tokenizer)
    try:
        result = eng.generate(request(lm.tokenizer, temperature=0.0))
    finally:
        eng.close()
    assert result.choices[0].text == "" and result.choices[0].finish_reason == "stop"
    assert result.completion_tokens == 1


def _feed(row: Detokenizer, ids: list[int]) -> list:
    pieces = [row.push(TokenInfo(i, "")) for i in ids]
    return [p for p in pieces if p is not None]


def test_detokenizer_waits_for_split_characters(tokenizer):
    ids = tokenizer.encode("日本語 🙂 ☃ ok", add_special_tokens=False)
    row = Detokenizer(0, tokenizer, tokenizer.eos_id, [])
    pieces = _feed(row, ids) + [row.finish("length")]
    assert "".join(p.text for p in pieces) == "日本語 🙂 ☃ ok"
    assert not any("\ufffd" in p.text for p in pieces)
    tokens = [t for p in pieces for t in p.tokens]
    assert [t.id for t in tokens] == ids
    assert any(t.text == "" for t in tokens)  # a character spread over several tokens was exercised


def test_detokenizer_cuts_a_stop_string_across_tokens(tokenizer):
    text = "hello world, and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    row = Detokenizer(0, tokenizer, tokenizer.eos_id, ["lo wor"])
    pieces = _feed(row, ids)
    assert "".join(p.text for p in pieces) == "hel" and pieces[-1].finish_reason == "stop"
    assert all(p.finish_reason is None for p in pieces[:-1])
    # Text that could be the start of a stop string is held back until it is ruled out.
    row = Detokenizer(0, tokenizer, tokenizer.eos_id, ["d, x"])
    released, held = "", 0
    for i in range(len(ids)):
        piece = row.push(TokenInfo(ids[i], ""))
        released += piece.text if piece else ""
        decoded = tokenizer.decode(ids[: i + 1])
        assert decoded.startswith(released) and len(released) <= len(decoded) - held_back(decoded, ["d, x"])
        held += held_back(decoded, ["d, x"]) > 0
    released += row.finish("length").text
    assert released == text and held >= 2  # "d" and "d," were held back


def test_cancel_stops_generation_and_frees_the_slot(lm):
    eng = Engine(lm.model, lm.tokenizer, max_active=1)
    try:
        stream = eng.stream(request(lm.tokenizer, max_tokens=100, temperature=0.0))
        next(stream), next(stream)
        stream.close()
        deadline = time.monotonic() + 10
        while eng.load()["accepted"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.load() == {"queued": 0, "running": 0, "accepted": 0, "requests": 0}
        assert eng.stats["cancelled"] == 1 and eng.stats["tokens"] < 100
        assert eng.generate(request(lm.tokenizer, max_tokens=3)).choices[0].finish_reason == "length"
    finally:
        eng.close()


def test_full_queue_raises_busy_until_a_request_ends(lm):
    eng = Engine(lm.model, lm.tokenizer, max_active=1, max_queue=2)
    entered, release = threading.Event(), threading.Event()

    def blocking_sink(event):  # holds the worker inside the first request's first event
        entered.set()
        release.wait(10)

    try:
        eng.submit(request(lm.tokenizer, max_tokens=2), blocking_sink)
        assert entered.wait(10)
        waiting = eng.submit(request(lm.tokenizer, max_tokens=2), lambda e: None)
        with pytest.raises(EngineBusy):
            eng.submit(request(lm.tokenizer, max_tokens=2), lambda e: None)
        waiting.cancel()  # a waiting request that is cancelled frees its place at once
        eng.submit(request(lm.tokenizer, max_tokens=2), lambda e: None)
        release.set()
        deadline = time.monotonic() + 10
        while eng.load()["accepted"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.load()["accepted"] == 0
    finally:
        release.set()
        eng.close()


def test_interleaved_requests_equal_each_request_alone(lm):
    reqs = [request(lm.tokenizer, prompt=f"{name}: speak", **kw) for name, kw in
            zip(["A", "BB", "CCC", "D", "E", "F"], CASES.values())]
    alone = Engine(lm.model, lm.tokenizer, max_active=1)
    together = Engine(lm.model, lm.tokenizer, max_active=6)
    try:
        expected = [alone.generate(r) for r in reqs]
        results: list = [None] * len(reqs)

        def run(i):
            results[i] = together.generate(reqs[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        alone.close()
        together.close()
    assert [[c.text for c in r.choices] for r in results] == [[c.text for c in r.choices] for r in expected]


class _Flaky:
    """A tokenizer whose decode fails while `broken` is set."""

    def __init__(self, tokenizer):
        self.tok, self.broken = tokenizer, False

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, skip_special_tokens=True):
        if self.broken:
            raise RuntimeError("decoder exploded")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_a_failing_request_fails_alone(lm):
    flaky = _Flaky(lm.tokenizer)
    eng = Engine(lm.model, flaky)
    try:
        flaky.broken = True
        with pytest.raises(RuntimeError, match="decoder exploded"):
            eng.generate(request(lm.tokenizer, max_tokens=4))
        flaky.broken = False
        assert len(eng.generate(request(lm.tokenizer, max_tokens=4)).choices) == 1
        assert eng.stats["failed"] == 1 and eng.stats["completed"] == 1
    finally:
        eng.close()


def test_rejects_what_it_cannot_run(lm):
    with pytest.raises(ValueError, match="GPT or an encoder-decoder"):
        Engine(build(preset("bert-tiny", vocab_size=320)), lm.tokenizer)
    eng = Engine(lm.model, lm.tokenizer)
    try:
        with pytest.raises(ValueError, match="context"):
            eng.submit(request(lm.tokenizer, max_tokens=200), lambda e: None)
        with pytest.raises(ValueError, match="token ids"):
            eng.submit(GenerationRequest(prompts=[[10**6]]), lambda e: None)
        with pytest.raises(ValueError, match="temperature"):
            eng.submit(request(lm.tokenizer, temperature=-1.0), lambda e: None)
    finally:
        eng.close()


def test_encoder_decoder_matches_generate_text(lm):
    torch.manual_seed(0)
    model = build(preset("bart-tiny", vocab_size=lm.tokenizer.vocab_size, max_seq_len=64)).eval()
    eng = Engine(model, lm.tokenizer)
    try:
        result = eng.generate(request(lm.tokenizer, prompt=UNICODE_LINE, max_tokens=12, temperature=0.0))
    finally:
        eng.close()
    expected = generate_text(model, lm.tokenizer, UNICODE_LINE, max_new_tokens=12)
    assert [c.text for c in result.choices] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantised_model_serves_what_it_generates(lm, dtype):
    """Serving uses the same path: the engine's batch decode of an int8 model (cache in the
    compute dtype) gives what generate_text gives with that model, alone and interleaved."""
    import copy

    from lmforge.nn.quant import quantize

    model = quantize(copy.deepcopy(lm.model).to(dtype), "int8")
    cases = [("A: speak", dict(temperature=0.0)), ("BBB: what", dict(temperature=1.0, seed=7))]
    reqs = [request(lm.tokenizer, prompt=p, max_tokens=12, **kw) for p, kw in cases]
    eng = Engine(model, lm.tokenizer, max_active=2)
    try:
        results: list = [None] * len(reqs)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, eng.generate(reqs[i])))
                   for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        eng.close()
    for (prompt, kw), r in zip(cases, results):
        assert [r.choices[0].text] == generate_text(model, lm.tokenizer, prompt, max_new_tokens=12, **kw)
