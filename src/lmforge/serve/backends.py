"""Models behind other OpenAI-compatible servers, for the arena: another `lmforge serve`,
vLLM, llama.cpp's server, OpenAI's API.

    --backend NAME=URL      URL is the API's base (e.g. http://127.0.0.1:8001/v1)

The arena asks a backend for a chat completion, streamed, and shows the text as it
comes. At start the server reads URL/models once: the backend must answer, and the
model it is asked for is NAME when it serves a model of that name, else the one model
it serves (so a second lmforge server whose model is called "model" can be named
anything here). A backend whose model card gives its limits (lmforge's do: max_tokens,
max_context) gets answers of at most max_tokens, and at most half its context, which
leaves the other half to the prompt.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

MAX_ANSWER_CHARS = 200_000  # an answer is cut there, whatever the backend sends
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


class BackendError(Exception):
    """A backend failed to answer (its message names the backend)."""


class Backend:
    """A model behind an OpenAI-compatible server: `answer` streams a chat reply's text."""

    def __init__(self, name: str, url: str, model: str, api_key: str | None = None,
                 max_tokens: int | None = None) -> None:
        self.name, self.url, self.model, self.api_key = name, url.rstrip("/"), model, api_key
        self.max_tokens = max_tokens

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def connect(cls, name: str, url: str, api_key: str | None = None) -> Backend:
        """Check that the backend answers and find the model to ask for (see the module's docstring)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend {name}: {url!r} is not an http(s) URL")
        try:
            r = httpx.get(url.rstrip("/") + "/models", headers=cls(name, url, "", api_key).headers, timeout=10)
            r.raise_for_status()
            cards = {m["id"]: m for m in r.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"backend {name}: {url}/models did not list models ({e})") from None
        model = name if name in cards else next(iter(cards)) if len(cards) == 1 else None
        if model is None:
            raise ValueError(f"backend {name}: {url} serves {', '.join(cards) or 'no model'}; name the backend after "
                             "one")
        return cls(name, url, model, api_key, _limit(cards[model]))

    async def answer(self, messages: list[dict[str, str]], options: dict[str, Any]) -> AsyncIterator[str]:
        """The reply's text, piece by piece, as the backend streams it."""
        body = {"model": self.model, "messages": messages, "stream": True, **options}
        if self.max_tokens is not None and "max_tokens" in body:
            body["max_tokens"] = min(body["max_tokens"], self.max_tokens)
        sent = 0
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            try:
                async with http.stream("POST", self.url + "/chat/completions", json=body,
                                       headers=self.headers) as r:
                    if r.status_code != 200:
                        raise BackendError(f"backend {self.name}: HTTP {r.status_code}: {_message(await r.aread())}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            return
                        for piece in _pieces(self.name, line[6:]):
                            piece = piece[:MAX_ANSWER_CHARS - sent]
                            sent += len(piece)
                            if piece:
                                yield piece
                            if sent >= MAX_ANSWER_CHARS:
                                return
            except httpx.HTTPError as e:
                raise BackendError(f"backend {self.name}: {type(e).__name__}: {e}") from None


def _limit(card: dict) -> int | None:
    """The longest answer a model card allows: its max_tokens, at most half its max_context."""
    limits = [v for v in (card.get("max_tokens"), (card.get("max_context") or 0) // 2 or None)
              if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(limits) if limits else None


def _pieces(name: str, data: str) -> list[str]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise BackendError(f"backend {name}: a stream chunk is not JSON") from None
    if not isinstance(chunk, dict):
        raise BackendError(f"backend {name}: a stream chunk is not a JSON object")
    if chunk.get("error"):
        raise BackendError(f"backend {name}: {_message(data.encode())}")
    out = []
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
        if isinstance(content, str) and content:
            out.append(content)
    return out


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode("utf-8", "replace")
