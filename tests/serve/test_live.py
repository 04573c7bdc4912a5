"""Against a real uvicorn server on loopback: the official `openai` client (plain and
streaming, completions and chat), 24 concurrent mixed requests that each return what
they return alone, and clients that disconnect mid-request freeing their slot."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from lmforge.api import LM
from lmforge.generate import chat_prompt, generate_text
from lmforge.serve import Limits, create_app
from lmforge.serve.launch import adapters_for, served_names

from .conftest import LiveServer, free_port, tiny_gpt, wait_until_up

PROMPT = "ROMEO: What light"


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_openai_client_completions(client, lm):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    expected = generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=12)[0]
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and "".join(out.choices[0].logprobs.tokens) == expected
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_openai_client_chat(client, lm):
    messages = [{"role": "user", "content": "Good morrow"}]
    expected = generate_text(lm.model, lm.tokenizer, chat_prompt(lm.tokenizer, messages), max_new_tokens=10,
                             temperature=0.8, seed=3)[0]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=3)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=-3)


def _load_requests() -> list[tuple[str, dict]]:
    """24 requests: completions and chat, greedy and sampled (seeded), plain and streamed, n up to 2."""
    reqs = []
    for i in range(24):
        body = {"max_tokens": 8 + (i % 5) * 4, "seed": 100 + i}
        body["temperature"] = 0.0 if i % 3 == 0 else 0.7 + 0.1 * (i % 4)
        if i % 4 == 1:
            body.update(top_k=30, top_p=0.9)
        if i % 6 == 5:
            body["n"] = 2
        body["stream"] = i % 2 == 1
        if i % 5 == 4:
            reqs.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"line {i}"}]}))
        else:
            reqs.append(("/v1/completions", {**body, "prompt": f"{'ABCDEFGH'[i % 8]}{i}: speak {'o' * (i % 7)}"}))
    return reqs


async def _ask(http: httpx.AsyncClient, path: str, body: dict) -> list[str]:
    """The texts of a request's choices, from the JSON body or from its stream."""
    if not body["stream"]:
        r = await http.post(path, json=body)
        r.raise_for_status()
        return [c["text"] if "text" in c else c["message"]["content"] for c in r.json()["choices"]]
    texts: dict[int, str] = {}
    async with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in httpx.Response(200, content=line[6:]).json()["choices"]:
                    piece = c["text"] if "text" in c else c["delta"].get("content", "")
                    texts[c["index"]] = texts.get(c["index"], "") + piece
    return [texts[i] for i in sorted(texts)]


def test_concurrent_requests_each_equal_their_answer_alone(live):
    reqs = _load_requests()

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            alone = [await _ask(http, path, body) for path, body in reqs]
            together = await asyncio.gather(*(_ask(http, path, body) for path, body in reqs))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert 2 <= live.app.state.engine.stats["peak_running"] <= 4  # decoded side by side, within max_active
    assert [len(t) for t in alone] == [b.get("n", 1) for _, b in reqs]
    assert sum(bool(text) for texts in alone for text in texts) >= 12  # not trivially empty


def _wait_cancelled(engine, before: int, timeout: float = 20) -> None:
    """Until the engine has cancelled one more request (the handler may not even have
    submitted it when the client leaves) and nothing runs any more."""
    deadline = time.monotonic() + timeout
    while (engine.stats["cancelled"] == before or engine.load()["accepted"]) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def long_server(tokenizer):
    """A server whose model has room for 1000 new tokens and takes at least a millisecond per
    token without ever choosing EOS: a request for 1000 tokens lasts a second or more, long
    enough to leave mid-way however fast the machine."""
    model = tiny_gpt(tokenizer.vocab_size, max_seq_len=1040)

    def slow_and_endless(module, inputs, logits):
        time.sleep(0.001)
        logits[..., tokenizer.eos_id] = float("-inf")
        return logits

    model.lm_head.register_forward_hook(slow_and_endless)
    app = create_app(LM(model, tokenizer), limits=Limits(max_tokens=1000, max_active=1))
    with LiveServer(app) as server:
        yield server


def test_streaming_client_that_leaves_frees_its_slot(long_server):
    engine = long_server.app.state.engine
    before = dict(engine.stats)
    body = {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=long_server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            started = time.monotonic()
            health = http.get("/health").json()  # the event loop answers while the model works
            assert health["running"] == 1 and time.monotonic() - started < 1.0
        _wait_cancelled(engine, before["cancelled"])
        assert engine.load()["accepted"] == 0 and engine.stats["cancelled"] == before["cancelled"] + 1
        assert engine.stats["tokens"] - before["tokens"] < 1000
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_waiting_client_that_leaves_frees_its_slot(long_server):
    engine = long_server.app.state.engine
    before = dict(engine.stats)
    with httpx.Client(base_url=long_server.url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
    # On a busy machine the server may see the client gone before it even submits the request;
    # either way the model must not go on generating for nobody.
    _wait_cancelled(engine, before["cancelled"], timeout=5)
    assert engine.load()["accepted"] == 0 and engine.stats["completed"] == before["completed"]
    assert engine.stats["tokens"] - before["tokens"] < 1000


def _start(command: list[str], port: int, **kw) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(command, **kw)
    return proc, wait_until_up(proc, port)


def test_lmforge_serve_loads_a_model_directory_and_binds_loopback(lm, tmp_path):
    model_dir = lm.save(tmp_path / "model")
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "shakespeare", "--device", "cpu"]
    proc, url = _start(command, port, env={**os.environ, "LMFORGE_API_KEY": "k1"})
    try:
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"}).json()
        assert [m["id"] for m in models["data"]] == ["shakespeare"]
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from LMFORGE_API_KEY
        out = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k1"},
                         json={"model": "shakespeare", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
        assert out["choices"][0]["text"] == generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=6)[0]
        wrong = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k1"},
                           json={"model": "model", "prompt": PROMPT, "max_tokens": 6})
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
        with socket.socket() as s:  # bound to loopback only
            s.settimeout(1)
            other = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")]
            if other:
                assert s.connect_ex((other[0], port)) != 0
    finally:
        proc.terminate()
        proc.wait(30)


def test_served_names_default_to_the_last_part_of_what_was_given(tmp_path):
    assert served_names(["runs/quickstart/model", "openai-community/gpt2", "runs/b/"]) == ["model", "gpt2", "b"]
    assert served_names(["a", "b"], ["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="two models would be served as 'model'"):
        served_names(["runs/a/model", "runs/b/model"])


def test_lmforge_serve_with_an_adapter_serves_the_adapted_model_under_its_runs_name(lm, tmp_path):
    from lmforge.api import load
    from lmforge.interop.peft import save_adapter
    from lmforge.nn.lora import apply_lora

    base = lm.save(tmp_path / "model")
    tuned = load(base)
    apply_lora(tuned.model, ["wqkv", "wo"], rank=2, alpha=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B away from its zero init
    adapter = save_adapter(tuned.model, None, tmp_path / "sft-run" / "adapter", base_model=str(base))
    expected = generate_text(load(base, adapter=adapter).model, lm.tokenizer, PROMPT, max_new_tokens=6)[0]
    assert expected != generate_text(lm.model, lm.tokenizer, PROMPT, max_new_tokens=6)[0]
    port = free_port()
    proc, url = _start([sys.executable, "-m", "lmforge", "serve", "--model", str(base), "--adapter", str(adapter),
                        "--port", str(port), "--device", "cpu"], port, cwd=tmp_path)
    try:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["sft-run"]
        out = httpx.post(url + "/v1/completions",
                         json={"model": "sft-run", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
        assert out["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.wait(30)


def test_adapters_pair_with_models_in_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert adapters_for(["m"], []) == [None]
    assert adapters_for(["m", "n"], ["none", str(tmp_path / "a")]) == [None, str(tmp_path / "a")]
    assert served_names(["runs/x/model", "runs/x/model"], None, [None, str(tmp_path / "a")]) == ["model", "a"]
    with pytest.raises(ValueError, match="1 --adapter for 2 --model"):
        adapters_for(["m", "n"], [str(tmp_path / "a")])
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        adapters_for(["m"], [str(tmp_path)])
