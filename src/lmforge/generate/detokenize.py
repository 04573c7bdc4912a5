"""Incremental detokenization: generated token ids in, final text pieces out.

Text is released token by token, and only when it is final:
- a character whose UTF-8 bytes are split across tokens decodes to U+FFFD until its last
  byte arrives: the tokens before it carry no text, the one that completes it all of it;
- text that could be the start of a stop string is held back until it is ruled out;
- at a stop string the text and the token list are cut before it, as
  lmforge.generate's `generate_text` cuts them, so that the pieces join to its output.

The one incremental detokenizer: `stream_text` and the server's engine both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

INCOMPLETE = "\ufffd"  # what a partial UTF-8 character decodes to


def find_stop(text: str, stop: list[str] | None) -> int | None:
    """Index of the earliest occurrence of any stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return min(hits) if hits else None


@dataclass
class TokenInfo:
    """A generated token: id; text it added to the output ("" while a multi-byte
    character is incomplete: the token that completes it carries the whole character);
    logprob under the model; top: [(id, token string, logprob)], most likely first."""

    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """New output of one choice (index = prompt * n + sample): text and the tokens that
    produced it. finish_reason ("stop": EOS or a stop string; "length": max_tokens) is
    set on the last piece of the choice."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None


def held_back(text: str, stop: list[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    for k in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0


class Detokenizer:
    """Incremental detokenizer of one choice: token ids in, released pieces out.

    Text is released token by token once it decodes cleanly and cannot be the start of a
    stop string; at a stop string the text (and the token list) is cut before it, as
    `generate_text` cuts it.
    """

    def __init__(self, index: int, tokenizer: Any, eos: int | list[int] | None, stop: list[str]) -> None:
        self.index, self.tokenizer, self.stop = index, tokenizer, stop
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)  # ids that end it
        self.ids: list[int] = []
        self.infos: list[TokenInfo] = []
        self.text = ""  # decoded text at the last clean point
        self.clean = 0  # tokens covered by self.text
        self.released = 0  # tokens already handed out
        self.released_chars = 0
        self.count = 0  # tokens generated, EOS included
        self.finish_reason: str | None = None

    def push(self, info: TokenInfo) -> Piece | None:
        """Add the next generated token; returns the text that became final, if any."""
        if self.finish_reason:
            return None
        self.count += 1
        if info.id in self.eos:
            return self.finish("stop")
        self.ids.append(info.id)
        self.infos.append(info)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(INCOMPLETE) or not text.startswith(self.text):
            return None  # wait for the rest of the character
        info.text, self.text, self.clean = text[len(self.text):], text, len(self.infos)
        cut = find_stop(text, self.stop)
        if cut is not None:
            return self.finish("stop", cut)
        safe = len(text) - (held_back(text, self.stop) if self.stop else 0)
        return self._release(safe)

    def _release(self, safe: int, reason: str | None = None) -> Piece | None:
        start, chars = self.released, self.released_chars
        end = start
        while end < self.clean and chars + len(self.infos[end].text) <= safe:
            chars += len(self.infos[end].text)
            end += 1
        if end == start and reason is None:
            return None
        tokens = self.infos[start:end]
        self.released, self.released_chars = end, chars
        return Piece(self.index, "".join(t.text for t in tokens), tokens, reason)

    def finish(self, reason: str, cut: int | None = None) -> Piece:
        """End the choice: flush what is held back (cut before a stop string at `cut`)."""
        self.finish_reason = reason
        if cut is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if self.infos and text.startswith(self.text):  # incomplete tail goes to the last token
                self.infos[-1].text += text[len(self.text):]
                self.text = text
            self.clean = len(self.infos)
            return self._release(len(self.text), reason)
        kept, chars = [], 0
        for info in self.infos[: self.clean]:
            if chars >= cut:
                break
            info.text = info.text[: cut - chars]
            chars += len(info.text)
            kept.append(info)
        self.infos, self.clean, self.text = kept, len(kept), self.text[:cut]
        return self._release(cut, reason)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The raw bytes of a token of a byte-level BPE ("\u0120the") or a SentencePiece byte
    token ("<0xE2>"); None for other tokenizers."""
    piece = tokenizer.id_to_token(token_id) if hasattr(tokenizer, "id_to_token") else None
    if not piece:
        return None
    if all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    match = _BYTE_FALLBACK.fullmatch(piece)
    return bytes([int(match.group(1), 16)]) if match else None
