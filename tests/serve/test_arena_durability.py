"""A study survives its server being killed: `lmforge serve` with two models and a study,
two raters voting at once, SIGKILL while a third rater's answers are streaming; every
acknowledged vote is in the database, which is intact, and a restarted server resumes each
rater where they stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from lmforge.api import LM
from lmforge.eval.arena_store import read_votes

from .conftest import free_port, tiny_gpt, wait_until_up

ITEMS = 6


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args, "--port", str(port), "--device",
                                 "cpu", "--max-tokens", "16"], stdout=out, stderr=subprocess.STDOUT)
    return proc, wait_until_up(proc, port, timeout=90, log=log)


def battle(http: httpx.Client, rater: str) -> dict:
    """A battle streamed to its end: its first event (with the battle's id)."""
    with http.stream("POST", "/arena/api/battles", json={"rater": rater}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "ready"
    return events[0]


@pytest.mark.slow
def test_acknowledged_votes_survive_sigkill_and_the_study_resumes(tokenizer, tmp_path):
    for name, seed in (("alpha", 1), ("beta", 2)):
        LM(tiny_gpt(tokenizer.vocab_size, seed=seed), tokenizer).save(tmp_path / name)
    study = tmp_path / "study.jsonl"
    study.write_text("".join(json.dumps({"prompt": f"ITEM {k}: speak", "max_tokens": 6}) + "\n"
                             for k in range(ITEMS)))
    db = tmp_path / "ratings.db"
    args = ["--model", str(tmp_path / "alpha"), "--model", str(tmp_path / "beta"), "--arena-db", str(db),
            "--study", str(study)]
    proc, url = start(args, tmp_path / "server.log")
    acknowledged: dict[str, list[tuple[str, str]]] = {"alice": [], "bob": []}
    try:
        def rate(rater: str, choice: str) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(3):
                    head = battle(http, rater)
                    r = http.post("/arena/api/votes", json={"battle": head["battle"], "rater": rater,
                                                            "choice": choice})
                    assert r.status_code == 200, r.text
                    acknowledged[rater].append((head["battle"], choice))

        raters = [threading.Thread(target=rate, args=("alice", "a")),
                  threading.Thread(target=rate, args=("bob", "tie"))]
        for t in raters:
            t.start()
        for t in raters:
            t.join(120)
        with httpx.Client(base_url=url, timeout=60) as http, \
                http.stream("POST", "/arena/api/battles", json={"rater": "carol"}) as r:
            next(r.iter_lines())  # carol's battle is streaming ...
            os.kill(proc.pid, signal.SIGKILL)  # ... when the server is killed
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert all(len(v) == 3 for v in acknowledged.values())

    db_check = sqlite3.connect(db)
    assert db_check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db_check.close()
    stored = {(v["battle"], v["rater"], v["choice"]) for v in read_votes(db)}
    assert stored == {(b, rater, c) for rater, acked in acknowledged.items() for b, c in acked}  # all 6, no other

    proc, url = start(args, tmp_path / "server.log")  # the same database and study: each rater resumes
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/arena/api/info", params={"rater": "alice"}).json()["done"] == 3
            old = acknowledged["alice"][0][0]
            again = http.post("/arena/api/votes", json={"battle": old, "rater": "alice", "choice": "b"})
            assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
            seen = set()
            for _ in range(3):
                head = battle(http, "alice")
                seen.add(head["prompt"])
                assert http.post("/arena/api/votes", json={"battle": head["battle"], "rater": "alice",
                                                           "choice": "b"}).status_code == 200
            assert http.post("/arena/api/battles", json={"rater": "alice"}).status_code == 409  # complete
    finally:
        proc.terminate()
        proc.wait(30)
    prompts = [v["prompt"] for v in read_votes(db) if v["rater"] == "alice"]
    assert len(prompts) == len(set(prompts)) == ITEMS and seen <= set(prompts)
