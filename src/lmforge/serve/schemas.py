"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Types are strict (a string is not a number, true is not 1), floats must be finite, and
fields this server does not know are accepted and ignored, as OpenAI's API does; null
means "the default".
Known OpenAI fields that would change the output but are not implemented (echo,
suffix, logit_bias, best_of > n, tools, non-zero presence/frequency penalties) are
rejected rather than silently ignored. Extensions: top_k, repetition_penalty.

Bounds that depend on the server (max tokens, prompt length) are checked by the app,
which knows its Limits; these models check what holds for every server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20


def _utf8(text: str, name: str) -> str:
    """Reject strings that cannot be encoded (lone surrogates from JSON escapes like \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid unicode (lone surrogate)") from None
    return text


def _prompts(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of
    lists of token ids -> a list of strings or a list of token-id lists."""
    if isinstance(value, str):
        return [_utf8(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                         "non-empty lists of token ids")
    if all(isinstance(v, str) for v in value):
        return [_utf8(v, f"prompt[{i}]") for i, v in enumerate(value)]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [list(value)]
    if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
           for v in value):
        return [list(v) for v in value]
    raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                     "non-empty lists of token ids")


class _Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # extension: 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)  # extension
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: dict[str, Any] | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI clients may send null for "use the default".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] is longer than {MAX_STOP_CHARS} characters")
            _utf8(s, f"stop[{i}]")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _unsupported(self) -> _Request:
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; use repetition_penalty "
                             "(> 1 discourages repeats)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not isinstance(self.stream_options.get("include_usage", False), bool):
            raise ValueError("stream_options.include_usage must be a boolean")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions. logprobs = k reports the k most likely tokens at each step."""

    prompt: list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> list[str] | list[list[int]]:
        return _prompts(value)

    @model_validator(mode="after")
    def _unsupported_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (candidates are not ranked)")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class Message(BaseModel):
    """A chat message; content is a string or a list of {"type": "text", "text": ...} parts."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    @model_validator(mode="after")
    def _check(self) -> Message:
        _utf8(self.role, "role")
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text":
                    raise ValueError(f"content: parts of type {part.type!r} are not supported (only 'text')")
        _utf8(self.text(), "content")
        return self


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. logprobs: report each token's log-prob; top_logprobs = k
    also the k most likely tokens."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self
