"""Chat templates come with model directories from anyone: they render sandboxed, bounded
in time and size, and a failing template is one clear line."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest
import torch

from lmforge.generate.chat import chat_prompt
from lmforge.interop.model_dir import save_model_dir
from lmforge.models import GPTConfig, build
from lmforge.tokenizer import train_tokenizer

HI = [{"role": "user", "content": "hi"}]


def _tok(template: str):
    return types.SimpleNamespace(eos_id=None, bos_id=None, chat_template=template)


def test_a_runaway_loop_is_stopped():
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"chat_template: rendering took longer than 2 s"):
        chat_prompt(_tok("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"), HI)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 100000000 }}", "a repeated value would be too large"),
    ("{{ 10 ** 100000 }}", "exponent too large"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "exceeds 4,000,000 characters"),
    ("{{ raise_exception('system messages are not supported') }}", "^chat_template: system messages are not"),
    ("{{ messages[3]['content'] }}", r"rendering failed \(UndefinedError"),
    ("{{ ().__class__.__base__.__subclasses__() }}", r"rendering failed \(SecurityError"),
])
def test_bad_templates_are_one_line_value_errors(template, match):
    with pytest.raises(ValueError, match=match):
        chat_prompt(_tok(template), HI)


def test_a_plain_template_still_renders():
    assert chat_prompt(_tok("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"), HI) == "[user]hi"


def test_generate_chat_with_a_raising_template_is_one_line_exit_2(tmp_path):
    tok = train_tokenizer(texts=["hello there friend"] * 20, kind="bpe", vocab_size=300, min_frequency=1)
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    torch.manual_seed(0)
    model = build(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=32, dim=32, n_layers=1, n_heads=2))
    path = save_model_dir(tmp_path / "m", model, tokenizer=tok, format="hf")
    done = subprocess.run([sys.executable, "-m", "lmforge", "generate", "--model", str(path), "--chat"],
                          input="hello\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["lmforge: error: chat_template: only user turns"]


# Templates written for these tests in the styles real instruct models ship (ChatML with tools,
# a dated header style, an alternation-checking [INST] style, one with {% generation %} and
# loop controls): lmforge must render each exactly as transformers' apply_chat_template does.
CHATML_TOOLS = """{%- if tools %}
{{- '<|im_start|>system\\n' }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{%- else %}You are helpful.{% endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'system' and tools) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

DATED = """{{- bos_token }}
{%- set date = strftime_now("%d %b %Y") %}
{%- set ns = namespace(system="Cutting Knowledge Date: " + date) %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = ns.system + "\\n\\n" + messages[0]['content'] %}{% endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}
{%- for m in messages if m['role'] != 'system' %}
{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""

INST = """{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}
{%- set rest = messages[1:] %}
{%- else %}{% set system = '' %}{% set rest = messages %}{% endif %}
{{- bos_token }}
{%- for message in rest %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' + (system + '\\n\\n' if loop.first and system else '') + message['content'] + ' [/INST]' }}
{%- else %}{{ ' ' + message['content'] + eos_token }}{% endif %}
{%- endfor %}"""

GENERATION = """{%- for message in messages %}
{%- if message['role'] == 'tool' %}{% continue %}{% endif %}
{{- '<|' + message['role'] + '|>' }}
{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
{%- else %}{{ message['content'] }}{% endif %}
{%- if loop.index >= 6 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "  Héllo — how are you?  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Times 3?"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "ignored"}, {"role": "assistant", "content": "b"}],
]
WEATHER = {"name": "get_weather", "description": "Wetter in Zürich",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    tok = train_tokenizer(texts=["hello there friend, how are you"] * 20, kind="bpe", vocab_size=300,
                          min_frequency=1, special_tokens=["bos=<s>", "eos=</s>", "<|im_start|>", "<|im_end|>"])
    return tok, tmp_path_factory.mktemp("tok")


@pytest.mark.parametrize("template", [CHATML_TOOLS, DATED, INST, GENERATION], ids=["chatml", "dated", "inst", "gen"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_templates_render_exactly_as_transformers_does(chat_tokenizer, template, generation_prompt):
    import transformers

    tok, root = chat_tokenizer
    tok.chat_template = template
    path = tok.save(root / f"t{abs(hash(template)) % 10_000}")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            try:
                want = theirs.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
            except Exception as e:  # noqa: BLE001 (the template's own error: ours must refuse too)
                with pytest.raises(ValueError, match="chat_template"):
                    chat_prompt(tok, messages, generation_prompt, tools=tools)
                assert "alternate" in str(e)
                continue
            assert chat_prompt(tok, messages, generation_prompt, tools=tools) == want


def test_a_namespace_cannot_hold_underscore_names():
    with pytest.raises(ValueError, match="underscore"):
        chat_prompt(_tok("{% set ns = namespace(__class__=1) %}{{ ns }}"), HI)
