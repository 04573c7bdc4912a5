"""The arena's HTTP side: battles stream two anonymous answers that equal each model's own
chat completion, raters follow their balanced study order, the server refuses every vote
it should (unknown or another rater's battle, unknown pairing, a second vote, bad or
oversized fields), free prompts pair models at random, and a model behind another
OpenAI-compatible server (a second lmforge server) takes part like a local one."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from lmforge.api import LM
from lmforge.eval.arena_store import read_votes
from lmforge.serve import create_app
from lmforge.serve.backends import Backend
from lmforge.serve.study import rater_order, swapped

from .conftest import LiveServer, serve_cli, tiny_gpt

PROMPTS = ["ROMEO: speak", "JULIET: O", "Who art thou?", "HAMLET: To be"]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"alpha": LM(tiny_gpt(tokenizer.vocab_size, seed=1), tokenizer),
            "beta": LM(tiny_gpt(tokenizer.vocab_size, seed=2), tokenizer)}


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": f"q{k}", "max_tokens": 8}) + "\n"
                            for k, p in enumerate(PROMPTS)))
    return path


@pytest.fixture
def study(models, study_file, tmp_path):
    app = create_app(models, arena_db=tmp_path / "arena.db", study=study_file)
    with TestClient(app) as c:
        yield c


def battle(c: TestClient, rater: str, prompt: str | None = None) -> list[dict]:
    """The events of one battle (raises for an error status)."""
    body = {"rater": rater} if prompt is None else {"rater": rater, "prompt": prompt}
    with c.stream("POST", "/arena/api/battles", json=body) as r:
        r.read()
        assert r.status_code == 200, r.text
        assert "alpha" not in r.text and "beta" not in r.text  # nothing tells which model wrote which
        return [json.loads(block[6:]) for block in r.text.split("\n\n") if block.startswith("data: ")]


def texts(events: list[dict]) -> dict[str, str]:
    return {side: "".join(e["text"] for e in events if e["type"] == "piece" and e["side"] == side) for side in "ab"}


def vote(c: TestClient, battle_id: str, rater: str, choice: str, **extra):
    return c.post("/arena/api/votes", json={"battle": battle_id, "rater": rater, "choice": choice, **extra})


def test_the_page_and_info(study):
    page = study.get("/arena")
    assert page.status_code == 200 and "lmforge arena" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert study.get("/static/arena.js").status_code == 200 and study.get("/static/arena.css").status_code == 200
    assert study.get("/arena/api/info").json() == {"mode": "study", "models": 2, "done": 0, "total": 4,
                                                   "choices": ["a", "b", "tie", "both_bad"]}
    assert study.get("/arena/api/info", params={"rater": "bad id!"}).status_code == 400


def test_a_battle_streams_both_answers_anonymously(study, tmp_path):
    events = battle(study, "alice")
    head = events[0]
    assert head["type"] == "battle" and head["done"] == 0 and head["total"] == 4
    assert events[-1] == {"type": "ready"}
    for side in "ab":  # each side: pieces, then its end, without error
        mine = [e for e in events if e.get("side") == side]
        assert [e["type"] for e in mine] == ["piece"] * (len(mine) - 1) + ["end"] and mine[-1]["error"] is None
    item = next(i for i, p in enumerate(PROMPTS) if p == head["prompt"])
    digest = study.app.state.arena.study.digest
    left, right = ("beta", "alpha") if swapped(digest, "alice", f"q{item}") else ("alpha", "beta")
    seed = json.loads(study.app.state.arena.study.items[item].options)["seed"]
    shown = texts(events)
    for side, model in (("a", left), ("b", right)):  # each side is that model's own chat completion
        own = study.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0.7,
                                                       "seed": seed, "messages": [{"role": "user",
                                                                                   "content": head["prompt"]}]})
        assert shown[side] == own.json()["choices"][0]["message"]["content"]
    out = vote(study, head["battle"], "alice", "b", reason="more Shakespearean").json()
    assert out["revealed"] == {"a": left, "b": right} and out["done"] == 1 and out["vote"] == 1
    [stored] = read_votes(tmp_path / "arena.db")
    assert (stored["model_a"], stored["model_b"], stored["choice"], stored["reason"]) == \
        (left, right, "b", "more Shakespearean")
    assert (stored["answer_a"], stored["answer_b"]) == (shown["a"], shown["b"])


def test_raters_follow_their_balanced_order(study):
    digest = study.app.state.arena.study.digest
    for ordinal, rater in enumerate(["alice", "bob"]):
        seen = []
        for _ in PROMPTS:
            events = battle(study, rater)
            seen.append(events[0]["prompt"])
            assert vote(study, events[0]["battle"], rater, "tie").status_code == 200
        assert seen == [PROMPTS[p] for p in rater_order(4, ordinal, digest)]
        r = study.post("/arena/api/battles", json={"rater": rater})
        assert r.status_code == 409 and r.json()["error"]["code"] == "study_complete"
        assert study.get("/arena/api/info", params={"rater": rater}).json()["done"] == 4


def test_votes_the_server_refuses(study):
    events = battle(study, "alice")
    b = events[0]["battle"]

    def error(r, status):
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert error(vote(study, b, "bob", "a"), 404)["code"] == "unknown_battle"  # another rater's battle
    assert error(vote(study, "f" * 32, "alice", "a"), 404)["code"] == "unknown_battle"
    assert error(vote(study, b, "alice", "left"), 400)["param"] == "choice"
    assert error(vote(study, b, "alice", "a", reason="x" * 1001), 400)["param"] == "reason"
    assert error(vote(study, b, "alice", "a", models={"a": "alpha"}), 400)  # no say in the pairing
    assert error(vote(study, b, "not a rater id", "a"), 400)["param"] == "rater"
    too_big = study.post("/arena/api/votes", content=json.dumps({"battle": b, "reason": "x" * 70_000}))
    assert error(too_big, 413)["code"] == "request_too_large"
    assert error(study.post("/arena/api/battles", json={"rater": "alice", "prompt": "mine"}), 400)["param"] == "prompt"
    assert vote(study, b, "alice", "a").status_code == 200
    assert error(vote(study, b, "alice", "b"), 409)["code"] == "already_voted"
    arena = study.app.state.arena
    unanswered, _ = arena.next_battle("alice", None)  # answers never streamed
    assert error(vote(study, unanswered.battle, "alice", "a"), 409)["code"] == "battle_not_ready"


def test_free_prompts_pair_models_at_random(models, tmp_path):
    with TestClient(create_app(models, arena_db=tmp_path / "free.db")) as c:
        assert c.get("/arena/api/info").json()["mode"] == "free"
        assert c.post("/arena/api/battles", json={"rater": "alice"}).status_code == 400  # a prompt is needed
        assert c.post("/arena/api/battles", json={"rater": "alice", "prompt": "x" * 8001}).status_code == 400
        revealed = set()
        for k in range(8):
            events = battle(c, "alice", prompt=f"ROMEO {k}:")
            assert events[0]["prompt"] == f"ROMEO {k}:" and events[-1]["type"] == "ready"
            revealed.add(tuple(vote(c, events[0]["battle"], "alice", "a").json()["revealed"].values()))
        assert revealed == {("alpha", "beta"), ("beta", "alpha")}  # both sides, at random (p = 1 - 2/256)
        assert {v["item"][:5] for v in read_votes(tmp_path / "free.db")} == {"free:"}


def test_a_failed_answer_cannot_be_voted_on(models, tmp_path):
    async def broken(messages, options):
        raise RuntimeError("backend down")
        yield ""  # pragma: no cover (an async generator)

    app = create_app(models, arena_db=tmp_path / "a.db")
    app.state.arena.answerers["beta"] = broken
    with TestClient(app) as c:
        events = battle(c, "alice", prompt="ROMEO:")
        ends = {e["side"]: e["error"] for e in events if e["type"] == "end"}
        assert set(ends.values()) == {"backend down", None} and events[-1]["type"] == "end"
        assert vote(c, events[0]["battle"], "alice", "a").json()["error"]["code"] == "battle_not_ready"


def test_a_pairing_no_longer_served_is_refused(models, tokenizer, tmp_path):
    db = tmp_path / "a.db"
    with TestClient(create_app(models, arena_db=db)) as c:
        events = battle(c, "alice", prompt="ROMEO:")
    others = {"alpha": models["alpha"], "gamma": LM(tiny_gpt(tokenizer.vocab_size, seed=3), tokenizer)}
    with TestClient(create_app(others, arena_db=db)) as c:  # restarted with other models
        assert vote(c, events[0]["battle"], "alice", "a").json()["error"]["code"] == "unknown_pairing"


def test_the_api_key_guards_the_arena(models, tmp_path):
    with TestClient(create_app(models, api_key="k", arena_db=tmp_path / "a.db")) as c:
        assert c.get("/arena").status_code == 200  # the page asks for the key
        assert c.get("/arena/api/info").status_code == 401
        assert c.get("/arena/api/info", headers={"Authorization": "Bearer k"}).status_code == 200


def test_no_arena_without_two_models(models, tmp_path):
    with TestClient(create_app(models["alpha"])) as c:
        assert c.get("/arena").status_code == 404 and c.get("/arena/api/info").status_code == 404
    with pytest.raises(ValueError, match="two or more"):
        create_app(models["alpha"], arena_db=tmp_path / "a.db")


def test_a_model_behind_another_server_takes_part(models, tokenizer, tmp_path):
    remote = LM(tiny_gpt(tokenizer.vocab_size, seed=3), tokenizer)
    study_file = tmp_path / "one.jsonl"
    study_file.write_text(json.dumps({"prompt": "ROMEO:", "max_tokens": 8}) + "\n")
    with LiveServer(create_app(remote, model_name="model")) as other:
        backend = Backend.connect("gamma", other.url + "/v1")  # it serves one model, "model": that one
        assert backend.model == "model"
        app = create_app({"alpha": models["alpha"]}, backends=[backend], arena_db=tmp_path / "a.db",
                         study=study_file)
        with TestClient(app) as c:
            events = battle(c, "alice")
            out = vote(c, events[0]["battle"], "alice", "both_bad").json()
            assert sorted(out["revealed"].values()) == ["alpha", "gamma"]
            side = "a" if out["revealed"]["a"] == "gamma" else "b"
            seed = json.loads(app.state.arena.study.items[0].options)["seed"]
        own = httpx.post(other.url + "/v1/chat/completions", json={
            "model": "model", "messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 8,
            "temperature": 0.7, "seed": seed}).json()["choices"][0]["message"]["content"]
        assert texts(events)[side] == own and own  # what the other server answers, streamed through
        both_remote = [backend, Backend.connect("delta", other.url + "/v1")]
        with TestClient(create_app({}, backends=both_remote, arena_db=tmp_path / "b.db")) as c:  # no local model
            assert c.get("/v1/models").json()["data"] == [] and c.get("/health").json()["arena"]
            r = c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 404 and "no model of its own" in r.json()["error"]["message"]
            events = battle(c, "alice", prompt="ROMEO:")
            assert events[-1]["type"] == "ready" and all(texts(events).values())
    with pytest.raises(ValueError, match="backend gamma: .* did not list models"):
        Backend.connect("gamma", other.url + "/v1")  # that server is gone
    with pytest.raises(ValueError, match="not an http"):
        Backend.connect("gamma", "ftp://example")


def test_bad_arena_options_are_one_line(no_serving, model_dir, tmp_path, capsys):
    study = tmp_path / "s.jsonl"
    study.write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    two = ["--model", str(model_dir), "--model", str(model_dir), "--served-model-name", "x", "--served-model-name", "y"]
    cases = [
        (two + ["--study", str(study), "--arena-db", str(tmp_path / "a.db")], f"{study}:2: prompt must be"),
        (two + ["--study", str(tmp_path / "missing.jsonl"), "--arena-db", str(tmp_path / "b.db")], "missing.jsonl"),
        (["--model", str(model_dir), "--study", str(study)], "the arena compares models: serve two or more"),
        (["--model", str(model_dir), "--backend", "nonsense"], "--backend 'nonsense': expected NAME=URL"),
        (["--model", str(model_dir), "--backend-key", "x=k"], "--backend-key x: there is no --backend x=URL"),
        (["--model", str(model_dir), "--backend", "x=http://127.0.0.1:9/v1"], "backend x: http://127.0.0.1:9/v1"),
        (two + ["--arena-db", str(tmp_path)], "is a directory"),
    ]
    for args, says in cases:
        code, err = serve_cli(capsys, *args)
        assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
