"""The arena: human raters compare two anonymised answers to the same prompt.

    GET  /arena                 the page (serve/static/arena.html)
    GET  /arena/api/info        mode (study or free prompts), models, a rater's progress
    POST /arena/api/battles     {rater, prompt?} -> server-sent events: the battle, then both
                                answers streamed side by side, then "ready" once stored
    POST /arena/api/votes       {battle, rater, choice: a|b|tie|both_bad, reason?} -> the models revealed ("revealed")

Anonymity is kept by the server: the page only ever learns a battle's id and the text
of answer "a" (left) and "b" (right); which model wrote which is stored with the battle
and revealed after the vote. A study serves its items (see study.py) in each rater's
own balanced order; without one, a rater types prompts and each battle pairs two
models at random, on random sides.

What the server refuses (see eval/arena_store.py, which enforces it in one transaction
per vote): a vote on a battle that does not exist or is another rater's, or whose
pairing is not served here; a vote before both answers are stored; a second vote of a
rater on an item; a choice outside the four; and anything too big (rater ids, reasons,
prompts, bodies). A vote is acknowledged only once it is on disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lmforge.eval.arena_store import CHOICES, ArenaStore, Battle, StudyItem, VoteRefused
from lmforge.serve import protocol
from lmforge.serve.http import APIError, read_json, validate
from lmforge.serve.study import DEFAULT_OPTIONS, rater_order, swapped

log = logging.getLogger(__name__)

# A model's answer: chat messages and sampling options in, text pieces out (raises on failure).
Answerer = Callable[[list[dict[str, str]], dict[str, Any]], AsyncIterator[str]]

MAX_BODY_BYTES = 64 << 10
MAX_REASON_CHARS = 1000
MAX_FREE_PROMPT_CHARS = 8000
KEEP_OPEN = 8  # unvoted battles a rater may hold; older ones are replaced
RATER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class _BattleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rater: str = Field(pattern=RATER_PATTERN)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_FREE_PROMPT_CHARS)


class _VoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    battle: str = Field(min_length=1, max_length=64)
    rater: str = Field(pattern=RATER_PATTERN)
    choice: str = Field(max_length=16)
    reason: str = Field("", max_length=MAX_REASON_CHARS)


@dataclass
class Study:
    """A study as stored: its items in file order and its digest."""

    items: list[StudyItem]
    digest: str


class Arena:
    """Battles and votes over `answerers` ({model name: Answerer}, two or more), stored in
    `store`, with an optional study (already loaded into the store)."""

    def __init__(self, store: ArenaStore, answerers: Mapping[str, Answerer], study: Study | None,
                 max_tokens: int) -> None:
        if len(answerers) < 2:
            raise ValueError("the arena compares models: serve two or more (--model, --backend)")
        self.store, self.answerers, self.study = store, dict(answerers), study
        self.max_tokens = max_tokens
        self.pairs = {frozenset(p) for p in itertools.combinations(self.answerers, 2)}
        if study is not None:
            for item in study.items:
                if frozenset((item.model_1, item.model_2)) not in self.pairs:
                    raise ValueError(f"study item {item.item!r} compares {item.model_1} and {item.model_2}, which "
                                     f"are not both served here")

    # ---- choosing what a rater sees -----------------------------------------------------------

    def progress(self, rater: str | None) -> dict[str, Any]:
        done = len(self.store.voted_items(rater)) if rater else 0
        out: dict[str, Any] = {"mode": "study" if self.study else "free", "models": len(self.answerers), "done": done}
        if self.study:
            out["total"] = len(self.study.items)
        return out

    def next_battle(self, rater: str, prompt: str | None) -> tuple[Battle, dict[str, Any]]:
        """A new battle for the rater, with its sampling options (runs in a worker thread)."""
        ordinal = self.store.rater_ordinal(rater)
        battle_id = secrets.token_hex(16)
        if self.study is None:
            if prompt is None or not prompt.strip():
                raise APIError(400, "prompt: type a prompt for the two models", param="prompt")
            model_a, model_b = random.sample(sorted(self.answerers), 2)
            item, options = f"free:{battle_id}", dict(DEFAULT_OPTIONS)
        else:
            if prompt is not None:
                raise APIError(400, "prompt: this arena runs a study; its items are the prompts", param="prompt")
            voted = self.store.voted_items(rater)
            order = rater_order(len(self.study.items), ordinal, self.study.digest)
            left = [self.study.items[p] for p in order if self.study.items[p].item not in voted]
            if not left:
                raise APIError(409, "this rater has rated every item of the study", code="study_complete")
            chosen = left[0]
            model_a, model_b = chosen.model_1, chosen.model_2
            if swapped(self.study.digest, rater, chosen.item):
                model_a, model_b = model_b, model_a
            item, prompt = chosen.item, chosen.prompt
            options = {**DEFAULT_OPTIONS, **json.loads(chosen.options)}
        options["max_tokens"] = min(options["max_tokens"], self.max_tokens)
        battle = Battle(battle_id, rater, item, prompt, model_a, model_b, "open")
        self.store.add_battle(battle, KEEP_OPEN)
        return battle, options

    # ---- the answers, streamed side by side ---------------------------------------------------

    async def answers(self, battle: Battle, options: dict[str, Any]) -> AsyncIterator[str]:
        """Server-sent events: the battle, both answers' pieces as they come, each side's end
        (with an error message if it failed), then "ready" once both answers are stored."""
        progress = await run_in_threadpool(self.progress, battle.rater)
        yield protocol.sse({"type": "battle", "battle": battle.battle, "prompt": battle.prompt, **progress})
        events: asyncio.Queue[tuple[str, str, str | None]] = asyncio.Queue()
        messages = [{"role": "user", "content": battle.prompt}]

        async def run(side: str, model: str) -> None:
            parts = []
            try:
                async for piece in self.answerers[model](messages, dict(options)):
                    parts.append(piece)
                    await events.put(("piece", side, piece))
            except Exception as e:  # noqa: BLE001 -- a failed answer is reported, never raised
                message = e.message if isinstance(e, APIError) else str(e) or type(e).__name__
                log.warning("arena: %s failed to answer: %s", model, message)
                await events.put(("error", side, message))
                return
            await events.put(("end", side, "".join(parts)))

        tasks = [asyncio.create_task(run("a", battle.model_a)), asyncio.create_task(run("b", battle.model_b))]
        try:
            ended: dict[str, tuple[str, str | None]] = {}
            while len(ended) < 2:
                kind, side, value = await events.get()
                if kind == "piece":
                    yield protocol.sse({"type": "piece", "side": side, "text": value})
                    continue
                ended[side] = (kind, value)
                yield protocol.sse({"type": "end", "side": side, "error": value if kind == "error" else None})
            if all(kind == "end" for kind, _ in ended.values()):
                await run_in_threadpool(self.store.store_answers, battle.battle, ended["a"][1], ended["b"][1])
                yield protocol.sse({"type": "ready"})
        finally:
            for task in tasks:
                task.cancel()

    def vote(self, body: _VoteBody) -> dict[str, Any]:
        """Record a vote (runs in a worker thread); the models revealed and the rater's progress."""
        try:
            vote_id = self.store.vote(body.battle, body.rater, body.choice, body.reason, self.pairs)
        except VoteRefused as e:
            raise APIError(e.status, e.message, param="choice" if e.code == "invalid_choice" else "battle",
                           code=e.code) from None
        battle = self.store.battle(body.battle)
        return {**self.progress(body.rater), "vote": vote_id, "revealed": {"a": battle.model_a, "b": battle.model_b}}

    # ---- routes -------------------------------------------------------------------------------

    def router(self, authorize: Callable, page: Callable[[], FileResponse], body_timeout_s: float) -> APIRouter:
        api = APIRouter(prefix="/arena/api", dependencies=[Depends(authorize)])

        @api.get("/info")
        async def info(rater: str | None = None) -> dict[str, Any]:
            if rater is not None:
                validate(_BattleBody, {"rater": rater})
            return {**await run_in_threadpool(self.progress, rater), "choices": list(CHOICES)}

        @api.post("/battles")
        async def battles(request: Request) -> StreamingResponse:
            body = validate(_BattleBody, await read_json(request, MAX_BODY_BYTES, body_timeout_s))
            battle, options = await run_in_threadpool(self.next_battle, body.rater, body.prompt)
            return StreamingResponse(self.answers(battle, options), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        @api.post("/votes")
        async def votes(request: Request) -> dict[str, Any]:
            body = validate(_VoteBody, await read_json(request, MAX_BODY_BYTES, body_timeout_s))
            return await run_in_threadpool(self.vote, body)

        pages = APIRouter()
        pages.add_api_route("/arena", page, methods=["GET"], include_in_schema=False)
        pages.include_router(api)
        return pages
