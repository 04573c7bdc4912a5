"""OpenAI's wire format: response bodies, stream chunks and error bodies as plain dicts.

Log-probabilities are those of the model's own next-token distribution (before
temperature, top-k/top-p and penalties). JSON has no -inf or NaN: a log-prob below
-9999 is reported as -9999.0 (OpenAI's convention), a NaN as null.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

from lmforge.serve.engine import Done, GenerationResult, Piece, TokenInfo

MIN_LOGPROB = -9999.0


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _lp(value: float | None) -> float | None:
    if value is None or value != value:  # NaN
        return None
    return max(value, MIN_LOGPROB)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- /v1/completions --------------------------------------------------------------------------

def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    """The legacy completions logprobs object; text_offset counts from the start of the
    generated text (offset: characters of this choice already sent)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": [{s: _lp(v) for _, s, v in t.top} for t in tokens], "text_offset": offsets}


def completion_body(result: GenerationResult, id: str, model: str, logprobs: bool) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": now(), "model": model,
            "choices": [{"index": c.index, "text": c.text,
                         "logprobs": completion_logprobs(c.tokens, 0) if logprobs else None,
                         "finish_reason": c.finish_reason} for c in result.choices],
            "usage": usage(result.prompt_tokens, result.completion_tokens)}


class CompletionChunks:
    """Stream chunks of one completion request."""

    def __init__(self, model: str, logprobs: bool, include_usage: bool) -> None:
        self.id, self.created, self.model = new_id("cmpl"), now(), model
        self.logprobs, self.include_usage = logprobs, include_usage
        self.sent: dict[int, int] = {}  # choice -> characters sent

    def _chunk(self, choices: list[dict[str, Any]], **extra) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def piece(self, piece: Piece) -> list[str]:
        offset = self.sent.get(piece.index, 0)
        self.sent[piece.index] = offset + len(piece.text)
        logprobs = completion_logprobs(piece.tokens, offset) if self.logprobs else None
        return [sse(self._chunk([{"index": piece.index, "text": piece.text, "logprobs": logprobs,
                                   "finish_reason": piece.finish_reason}]))]

    def done(self, done: Done) -> list[str]:
        tail = [sse(self._chunk([], usage=usage(done.prompt_tokens, done.completion_tokens)))] \
            if self.include_usage else []
        return [*tail, sse("[DONE]")]


# ---- /v1/chat/completions ---------------------------------------------------------------------

def bytes_of(token: str) -> list[int]:
    """UTF-8 bytes of a token string; "bytes:\\xe2\\x80" strings (part of a character) -> their bytes."""
    if token.startswith("bytes:"):
        with contextlib.suppress(ValueError):
            return list(bytes.fromhex(token[len("bytes:"):].replace("\\x", "")))
    return list(token.encode("utf-8", "replace"))


def _chat_token(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": _lp(logprob), "bytes": bytes_of(token)}


def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {"content": [{**_chat_token(t.text, t.logprob), "top_logprobs": [_chat_token(s, v) for _, s, v in t.top]}
                        for t in tokens]}


def chat_body(result: GenerationResult, id: str, model: str, logprobs: bool) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c.tokens) if logprobs else None,
                         "finish_reason": c.finish_reason} for c in result.choices],
            "usage": usage(result.prompt_tokens, result.completion_tokens)}


class ChatChunks:
    """Stream chunks of one chat request: a first delta with the role, content deltas,
    the finish reason, optionally a usage chunk, then [DONE]."""

    def __init__(self, model: str, logprobs: bool, include_usage: bool) -> None:
        self.id, self.created, self.model = new_id("chatcmpl"), now(), model
        self.logprobs, self.include_usage = logprobs, include_usage
        self.started: set[int] = set()

    def _chunk(self, choices: list[dict[str, Any]], **extra) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def piece(self, piece: Piece) -> list[str]:
        out = []
        if piece.index not in self.started:
            self.started.add(piece.index)
            out.append(sse(self._chunk([{"index": piece.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}])))
        delta = {"content": piece.text} if piece.text or not piece.finish_reason else {}
        logprobs = chat_logprobs(piece.tokens) if self.logprobs and piece.tokens else None
        out.append(sse(self._chunk([{"index": piece.index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": piece.finish_reason}])))
        return out

    def done(self, done: Done) -> list[str]:
        tail = [sse(self._chunk([], usage=usage(done.prompt_tokens, done.completion_tokens)))] \
            if self.include_usage else []
        return [*tail, sse("[DONE]")]
