"""The server never lies about itself and a client cannot wedge it: an unknown model is
404 model_not_found (OpenAI's shape, and the openai client's NotFoundError); an empty API
key or a bad flag stops `lmforge serve` with one line; a half-sent body gets 408 and its
connection closed; the queue counts sequences (prompts x n), and a short request is not
starved behind big ones."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lmforge.serve import GenerationRequest, Limits, create_app
from lmforge.serve.engine import Engine, EngineBusy, Piece

from .conftest import LiveServer, serve_cli

PROMPT = "ROMEO: What light"


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, model_name="tiny", limits=Limits(max_queue=40))) as c:
        yield c


# ---- the model a request names ---------------------------------------------------------------

NOT_FOUND = {"message": "The model `gpt-4-turbo` does not exist on this server (it serves `tiny`)",
             "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize(("path", "body"), [("/v1/completions", {"prompt": PROMPT}),
                                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})])
def test_an_unknown_model_is_404_in_openais_shape(client, path, body):
    r = client.post(path, json={**body, "model": "gpt-4-turbo", "max_tokens": 2})
    assert r.status_code == 404 and r.json() == {"error": NOT_FOUND}
    assert client.post(path, json={**body, "model": "tiny", "max_tokens": 2}).status_code == 200
    assert client.post(path, json={**body, "max_tokens": 2}).status_code == 200  # no name: the default model
    assert client.get("/v1/models/gpt-4-turbo").json() == {"error": NOT_FOUND}


def test_the_openai_client_raises_not_found(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4-turbo", prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert info.value.body == {**NOT_FOUND, "message": NOT_FOUND["message"]}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4-turbo", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).model == "tiny"


def test_several_models_are_served_by_name(lm):
    app = create_app({"first": lm, "second": lm}, limits=Limits(max_queue=8))
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["first", "second"]
        for name in ("first", "second"):
            out = c.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 3}).json()
            assert out["model"] == name
        assert c.post("/v1/completions", json={"model": "third", "prompt": PROMPT}).status_code == 404
        assert set(c.get("/health").json()["models"]) == {"first", "second"}


# ---- `lmforge serve` refuses bad options with one line ---------------------------------------

@pytest.mark.parametrize(("args", "says"), [
    (["--api-key", ""], "--api-key is empty"), (["--api-key", "  "], "--api-key is empty"),
    (["--port", "99999"], "port must be in 0..65535"), (["--port", "-1"], "port must be in 0..65535"),
    (["--host", "300.1.1.1"], "host '300.1.1.1'"), (["--max-queue", "0"], "max_queue"),
    (["--body-timeout", "0"], "body_timeout_s"), (["--body-timeout", "-5"], "body_timeout_s"),
    (["--served-model-name", ""], "served model name"), (["--served-model-name", "a", "--served-model-name", "b"],
                                                          "2 served model names for 1 models"),
])
def test_bad_serve_options_are_one_line(no_serving, model_dir, capsys, args, says):
    code, err = serve_cli(capsys, "--model", str(model_dir), *args)
    assert code == 2 and says in err, err
    assert err.startswith("lmforge: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_an_empty_key_in_the_environment_is_refused(no_serving, model_dir, capsys, monkeypatch, lm):
    monkeypatch.setenv("LMFORGE_API_KEY", "")
    code, err = serve_cli(capsys, "--model", str(model_dir))
    assert code == 2 and err == "lmforge: error: LMFORGE_API_KEY is empty: give a real key, or leave it unset to " \
                                "serve without one\n"
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(lm, api_key="")


def test_a_port_in_use_is_one_line(no_serving, model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve_cli(capsys, "--model", str(model_dir), "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_two_models_named_alike_are_refused(no_serving, model_dir, capsys):
    code, err = serve_cli(capsys, "--model", str(model_dir), "--model", str(model_dir))
    assert code == 2 and "two models would be served as 'model'" in err and "--served-model-name" in err


# ---- a client that stalls while sending its body ----------------------------------------------

def test_a_half_sent_body_gets_408_and_the_connection_closed(lm):
    app = create_app(lm, model_name="tiny", limits=Limits(body_timeout_s=0.5))
    with LiveServer(app) as server, socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.settimeout(10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n" + b'{"prompt": "ROMEO')
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # others are served meanwhile
        reply = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply
        assert b"connection: close" in reply.lower() and 0.4 < time.monotonic() - started < 8
        ok = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=10)
        assert ok.status_code == 200


# ---- the queue counts sequences; short requests are not starved ------------------------------

def test_the_queue_counts_sequences(lm):
    eng = Engine(lm.model, lm.tokenizer, max_active=64, max_queue=10)
    entered, release = threading.Event(), threading.Event()

    def hold(event):  # keeps the worker inside the first request so that nothing finishes
        entered.set()
        release.wait(10)

    ids = lm.tokenizer.encode(PROMPT)
    try:
        eng.submit(GenerationRequest(prompts=[ids, ids], n=4, max_tokens=2), hold)  # 8 sequences
        assert entered.wait(10)
        assert eng.load()["accepted"] == 8
        with pytest.raises(EngineBusy, match="8 sequences"):
            eng.submit(GenerationRequest(prompts=[ids], n=4, max_tokens=2), lambda e: None)
        eng.submit(GenerationRequest(prompts=[ids], n=2, max_tokens=2), lambda e: None)  # 10: just fits
        with pytest.raises(ValueError, match="12 sequences"):
            eng.submit(GenerationRequest(prompts=[ids] * 3, n=4, max_tokens=2), lambda e: None)
    finally:
        release.set()
        deadline = time.monotonic() + 20
        while eng.load()["accepted"] and time.monotonic() < deadline:
            time.sleep(0.01)
        eng.close()
    assert eng.stats["completed"] == 2


def test_the_app_answers_503_and_400_by_sequences(client):
    err = client.post("/v1/completions", json={"prompt": [PROMPT] * 6, "n": 8, "max_tokens": 2}).json()["error"]
    assert err["param"] == "n" and "48 sequences (6 prompts x n=8)" in err["message"] and "at most 40" in err["message"]


def test_a_short_request_is_not_starved_behind_big_ones(lm):
    """Three requests of 4 prompts x n=2 x 40 tokens are running when a 5-token request comes:
    it must start within a round (a step of each request), not after the big ones end."""
    eng = Engine(lm.model, lm.tokenizer, max_active=8)
    log: list[tuple[str, Piece | None]] = []  # every event, in the order the worker sent them
    lock = threading.Lock()
    ids = lm.tokenizer.encode(PROMPT)

    def sink(name):
        def put(event):
            with lock:
                log.append((name, event if isinstance(event, Piece) else None))
        return put

    try:
        for b in range(3):
            big = GenerationRequest(prompts=[ids] * 4, n=2, max_tokens=40, temperature=1.0, seed=b)
            eng.submit(big, sink(f"big{b}"))
        deadline = time.monotonic() + 20
        while not log and time.monotonic() < deadline:  # the big ones have started
            time.sleep(0.001)
        with lock:
            submitted = len(log)
        short = eng.generate(GenerationRequest(prompts=[ids], max_tokens=5, temperature=0.0))
        with lock:
            big_meanwhile = sum(1 for name, _ in log[submitted:] if name.startswith("big"))
        assert short.completion_tokens == 5
        # The short request took about six rounds, each a step of every big request (2 rows, so up
        # to 2 pieces each); queued behind them it would have waited for hundreds of their pieces.
        assert big_meanwhile <= 3 * 2 * 12, big_meanwhile
        assert {name for name, _ in log[:submitted + big_meanwhile]} == {"big0", "big1", "big2"}
    finally:
        eng.close()
