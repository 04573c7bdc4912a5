"""Every endpoint through FastAPI's TestClient: outputs equal lmforge.generate's, the
OpenAI shapes (bodies, stream chunks, errors), auth, limits, and bad requests."""

from __future__ import annotations

import copy
import json
import random
import threading
import time

import pytest
from fastapi.testclient import TestClient

from lmforge.api import LM
from lmforge.generate import chat_prompt, generate_text
from lmforge.serve import GenerationRequest, Limits, create_app
from lmforge.serve.engine import EngineBusy

PROMPT = "ROMEO: What light"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def client(lm):
    app = create_app(lm, model_name="tiny", limits=Limits(max_tokens=64, max_prompt_tokens=100, max_body_bytes=20_000))
    with TestClient(app) as c:
        yield c


def sse_events(response) -> list:
    """The data of each server-sent event: dicts, and the final "[DONE]"."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ")
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---- endpoints --------------------------------------------------------------------------------

def test_health_models_and_page(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "queued": 0, "running": 0,
                                            "accepted": 0, "requests": 0}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_context"] == 128
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert error_of(client.get("/v1/models/gpt-4"), 404)["code"] == "model_not_found"
    page = client.get("/")
    assert page.status_code == 200 and "lmforge playground" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "/static/app.js" in page.text and client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_completion_equals_generate_text(client, lm):
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 20,
                                                "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["text"] == generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=20)[0]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = len(lm.tokenizer.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 20, "total_tokens": n_prompt + 20}


def test_sampling_with_a_seed_is_reproducible(client, lm):
    req = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    first = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=req).json()["choices"][0]["text"] == first
    assert first == generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=16, temperature=0.9, top_k=50,
                                  top_p=0.95, seed=1234)[0]
    other = client.post("/v1/completions", json={**req, "seed": 99}).json()["choices"][0]["text"]
    assert other != first


def test_prompt_forms_and_choices(client, lm):
    single = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    ids = lm.tokenizer.encode(PROMPT)
    as_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    assert as_ids["choices"][0]["text"] == single["choices"][0]["text"]
    many = client.post("/v1/completions", json={"prompt": [PROMPT, "JULIET: O"], "n": 2, "max_tokens": 8,
                                                "temperature": 0}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in many["choices"][:2]] == [single["choices"][0]["text"]] * 2
    assert many["usage"]["prompt_tokens"] == len(ids) + len(lm.tokenizer.encode("JULIET: O"))
    assert many["usage"]["completion_tokens"] == 4 * 8


def test_logprobs_line_up_with_the_text(client):
    body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                                "logprobs": 3}).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 10
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(10)]
    for token_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and token_lp <= 0
        assert token_lp == pytest.approx(max(top.values()))  # greedy takes the most likely token


def test_stop_strings(client, lm):
    req = {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 1}  # (greedy text repeats a character)
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    k = next(i for i, ch in enumerate(full) if ch != full[0])  # full[k:k+2] first occurs at k
    stop = full[k:k + 2]
    choice = client.post("/v1/completions", json={**req, "stop": stop}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[:k]
    assert choice["text"] == generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=20, temperature=1.0, seed=1,
                                           stop=[stop])[0]


def test_streaming_completion_equals_the_plain_one(client):
    req = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.7, "seed": 5, "n": 2, "logprobs": 2}
    plain = client.post("/v1/completions", json=req).json()
    with client.stream("POST", "/v1/completions", json={**req, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == plain["usage"] and events[-2]["choices"] == []
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    for plain_choice in plain["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == plain_choice["index"]]
        assert "".join(c["text"] for c in mine) == plain_choice["text"]
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == plain_choice["logprobs"]["tokens"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [plain_choice["finish_reason"]]


def test_chat_completion_plain_and_streamed(client, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    req = {"messages": messages, "max_tokens": 10, "temperature": 0}
    body = client.post("/v1/chat/completions", json=req).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    expected = generate_text(lm.model, lm.tokenizer, chat_prompt(lm.tokenizer, messages), max_new_tokens=10)[0]
    assert message == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(lm.tokenizer.encode(chat_prompt(lm.tokenizer, messages)))
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             messages[1]]
    assert client.post("/v1/chat/completions", json={**req, "messages": parts}).json()["choices"] == body["choices"]
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True, "logprobs": True,
                                                             "top_logprobs": 2}) as r:
        r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("content", "") for d in deltas) == expected
    assert deltas[-1]["finish_reason"] == body["choices"][0]["finish_reason"]
    tokens = [t for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]]
    assert "".join(t["token"] for t in tokens) == expected and all(len(t["top_logprobs"]) == 2 for t in tokens)


def test_unknown_fields_nulls_and_unicode_are_fine(client):
    ok = {"prompt": "x", "max_tokens": 2, "foo": {"bar": [1, 2]}, "user": "u", "temperature": None,
          "frequency_penalty": 0}
    assert client.post("/v1/completions", json=ok).status_code == 200
    for prompt in ["", " ", "日本語 🙂 ☃ \u200b \u202e שלום \x00", "\n" * 50]:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), prompt
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}], "max_tokens": 2})
    assert chat.status_code == 200


# ---- auth -------------------------------------------------------------------------------------

def test_api_key(lm):
    with TestClient(create_app(lm, api_key=KEY)) as c:
        req = {"prompt": "hi", "max_tokens": 2}
        assert error_of(c.post("/v1/completions", json=req), 401)["code"] == "invalid_api_key"
        assert error_of(c.post("/v1/completions", json=req, headers={"Authorization": "Bearer nope"}), 401)
        assert error_of(c.get("/v1/models", headers={"Authorization": KEY}), 401)  # no "Bearer"
        assert c.post("/v1/completions", json=req, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # the page asks for the key


# ---- limits and bad requests ------------------------------------------------------------------

def test_body_size_is_checked_before_parsing(client):
    big = json.dumps({"prompt": "a" * 30_000}).encode()
    assert error_of(client.post("/v1/completions", content=big), 413)["code"] == "request_too_large"
    chunked = client.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * 15_000, b"a" * 15_000, b'"}']))
    assert error_of(chunked, 413)
    assert error_of(client.post("/v1/completions", content=b"{", headers={"Content-Length": "abc"}), 400)


@pytest.mark.parametrize("content", [b"", b"{", b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe\x00garbage",
                                     b'{"prompt": "x", "max_tokens": NaN}', b"[" * 5000 + b"]" * 5000,
                                     b'{"prompt": "\\ud800"}', b"null", b'{"prompt": 1e400}'])
def test_malformed_bodies_get_400(client, content):
    assert error_of(client.post("/v1/completions", content=content), 400)["type"] == "invalid_request_error"


BAD_FIELDS = [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", 10**30), ("max_tokens", 1.5),
    ("max_tokens", True), ("max_tokens", 65), ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"),
    ("temperature", [1]), ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("n", 0), ("n", 100),
    ("stop", 5), ("stop", [1]), ("stop", ["a"] * 5), ("stop", "s" * 1000), ("seed", "x"), ("seed", 2**70),
    ("logprobs", 50), ("logprobs", -1), ("prompt", 5), ("prompt", []), ("prompt", [[]]), ("prompt", [1, "a"]),
    ("prompt", {"a": 1}), ("prompt", [10**6]), ("prompt", [-1]), ("prompt", "word " * 300), ("stream", "yes"),
    ("presence_penalty", 0.5), ("echo", True), ("logit_bias", {"1": 5}), ("repetition_penalty", 0),
    ("stream_options", {"include_usage": "yes"}), ("prompt", ["x"] * 17), ("best_of", 3),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={str(v)[:12]}" for f, v in BAD_FIELDS])
def test_bad_parameters_get_400_naming_the_field(client, field, value):
    body = {"prompt": PROMPT, "max_tokens": 4, field: value}
    err = error_of(client.post("/v1/completions", json=body), 400)
    assert field in err["message"] or err["param"] == field, err


BAD_CHAT = [[], "hi", [{"content": "x"}], [{"role": "user", "content": 5}], [{"role": 1, "content": "x"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [None]]


@pytest.mark.parametrize("messages", BAD_CHAT, ids=range(len(BAD_CHAT)))
def test_bad_chat_messages_get_400(client, messages):
    err = error_of(client.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert "messages" in err["message"]


def test_context_overflow_and_unknown_routes(client):
    err = error_of(client.post("/v1/completions", json={"prompt": [70] * 90, "max_tokens": 60}), 400)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert error_of(client.get("/v1/nothing"), 404)
    assert error_of(client.get("/v1/completions"), 405)


def test_garbage_never_takes_the_server_down(client):
    rng = random.Random(0)
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs", "messages",
              "stream"]
    values = [None, True, -1, 0, 1, 2**64, -(2**70), 1e308, -1e-308, "", "🙂" * 50, [], [1, [2]], {"a": None},
              "\ud83d", [[0, 1], [2]], 0.5]
    for i in range(150):
        if i % 3 == 0:
            content = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:
            content = json.dumps({rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(1, 5))}).encode()
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        r = client.post(path, content=content)
        assert r.status_code in (200, 400), (content, r.text)
        if r.status_code == 400:
            error_of(r, 400)
    assert client.get("/health").json()["accepted"] == 0
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_full_queue_answers_503(lm):
    app = create_app(lm, limits=Limits(max_queue=1, max_active=1))
    entered, release = threading.Event(), threading.Event()

    def blocking_sink(event):  # holds the worker so the queue stays full
        entered.set()
        release.wait(10)

    with TestClient(app) as c:
        engine = app.state.engine
        try:
            engine.submit(engine_request(lm), blocking_sink)
            assert entered.wait(10)
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert error_of(r, 503)["code"] == "server_busy" and r.headers["retry-after"] == "1"
        finally:
            release.set()
        deadline = time.monotonic() + 10
        while engine.load()["accepted"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    with pytest.raises(EngineBusy, match="shut down"):  # the app's shutdown stopped the engine
        engine.submit(engine_request(lm), lambda e: None)


def engine_request(lm) -> GenerationRequest:
    return GenerationRequest(prompts=[lm.tokenizer.encode("hi")], max_tokens=2)


def test_chat_uses_the_tokenizers_own_template(lm):
    tok = copy.copy(lm.tokenizer)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system messages') }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n"
                         "{% endfor %}[assistant] ")
    with TestClient(create_app(LM(lm.model, tok))) as c:
        messages = [{"role": "user", "content": "Hi"}]
        body = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0}).json()
        rendered = "<|endoftext|>[user] Hi\n[assistant] "
        assert chat_prompt(tok, messages) == rendered
        ids = tok.encode(rendered, add_special_tokens=False)  # the template placed BOS itself
        assert body["usage"]["prompt_tokens"] == len(ids)
        expected = generate_text(lm.model, tok, rendered, max_new_tokens=5, add_special_tokens=False)[0]
        assert body["choices"][0]["message"]["content"] == expected
        err = error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]}), 400)
        assert "no system messages" in err["message"] and err["param"] == "messages"
