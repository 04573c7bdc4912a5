"""Chat templates come with model directories from anyone: they render sandboxed, bounded
in time and size, and a failing template is one clear line."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest
import torch

from lmforge.generate.text import chat_prompt
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
