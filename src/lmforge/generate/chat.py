"""Chat templates: a conversation rendered into one prompt string, as transformers'
`apply_chat_template` renders it.

A chat template is a jinja2 program that comes with a model directory (tokenizer_config.json's
chat_template or chat_template.jinja). It runs in the environment transformers gives it: a
sandbox with trim_blocks and lstrip_blocks, loop controls ({% break %}, {% continue %}), the
{% generation %} tag, a tojson that leaves non-ASCII alone, raise_exception, strftime_now, and
dict / namespace that cannot reach Python's internals; it sees `messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens (bos_token, eos_token, ...) and any
extra keywords (enable_thinking, ...).

Templates from anyone's model directory are untrusted code: besides the sandbox, a render is
bounded in time (TEMPLATE_SECONDS) and size (TEMPLATE_CHARS), and any failure is one
ValueError line.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.tokenizer import SPECIAL_ROLES

# Used when the tokenizer has no chat template of its own (a tokenizer trained from scratch).
# lmforge's chat format for tokenizers without one: "<|role|>\ncontent" per message, the
# EOS token closing each assistant turn (so a chat-tuned model learns to stop), and
# "<|assistant|>\n" as the generation prompt. `lmforge finetune sft` installs it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEMPLATE_SECONDS = 2.0
TEMPLATE_CHARS = 4_000_000


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat_template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """jinja2's tojson escapes HTML characters; templates expect plain JSON (as transformers gives them)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` for templates, without the type's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names (no way to CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's own signature trick: `self` may be a key)
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace may not hold underscore names, got {name!r}")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: marks assistant text (for masks); renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` bounded so that no expression builds a giant value."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("chat_template: exponent too large")
        if operator == "*":
            size = next((len(x) * y for x, y in ((left, right), (right, left))
                         if isinstance(x, str | list | tuple) and isinstance(y, int)), 0)
            if size > TEMPLATE_CHARS:
                raise jinja2.exceptions.SecurityError("chat_template: a repeated value would be too large")
        return super().call_binop(context, operator, left, right)


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _OutOfTime inside any Python code this thread runs past `seconds` (a trace
    function: a template's loops are Python lines, each one checked)."""
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OutOfTime
        return trace

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


@functools.lru_cache(maxsize=16)
def compiled_template(source: str) -> jinja2.Template:
    """A chat template compiled once, in transformers' environment (sft renders every
    conversation prefix through it)."""
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template line {e.lineno}: {e.message}") from e


def render_template(template: jinja2.Template, **context: Any) -> str:
    """Render within TEMPLATE_SECONDS and TEMPLATE_CHARS; any failure of the template (its own
    raise_exception, a type error, a bound) is a ValueError saying so in one line."""
    parts, size = [], 0
    try:
        with _time_limit(TEMPLATE_SECONDS):
            for part in template.generate(**context):
                parts.append(part)
                size += len(part)
                if size > TEMPLATE_CHARS:
                    raise ValueError(f"chat_template: the rendered prompt exceeds {TEMPLATE_CHARS:,} characters")
    except _OutOfTime:
        raise ValueError(f"chat_template: rendering took longer than {TEMPLATE_SECONDS:g} s (a runaway loop?)") \
            from None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith("chat_template") else f"chat_template: {e}") from None
    except Exception as e:  # noqa: BLE001 (a template can raise anything; each means "this template failed")
        message = str(e).removeprefix("chat_template: ")
        raise ValueError(f"chat_template: rendering failed ({type(e).__name__}: {message})") from None
    return "".join(parts)


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """bos_token, eos_token, ... as a template sees them (transformers passes its special tokens map)."""
    out = {}
    for role in SPECIAL_ROLES:
        token_id = getattr(tokenizer, f"{role}_id", None)
        if token_id is not None:
            out[f"{role}_token"] = tokenizer.decode([token_id], skip_special_tokens=False)
    return out


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                tools: list[dict] | None = None, documents: list[dict] | None = None, **template_kwargs: Any) -> str:
    """Render chat messages [{"role": ..., "content": ...}, ...] into one prompt string with the
    tokenizer's chat template (or DEFAULT_CHAT_TEMPLATE when it has none), exactly as
    transformers' apply_chat_template(..., tokenize=False) renders it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat_prompt: messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"chat_prompt: messages[{i}] must be a dict with a string 'role' and a 'content', "
                             f"got {m!r}")
    template = compiled_template(getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE)
    return render_template(template, messages=messages, tools=tools, documents=documents,
                           add_generation_prompt=add_generation_prompt,
                           **{**special_tokens(tokenizer), **template_kwargs})
