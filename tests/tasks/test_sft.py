"""sft: the loss mask (exactly the assistant tokens and their EOS), learning to answer and stop,
the added pad token, the chat template shared with transformers, export parity, bad input."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import transformers as hf

from lmforge.api import LM
from lmforge.generate import chat_prompt, generate
from lmforge.interop.model_dir import load_model_dir
from lmforge.models import GPTConfig, build, preset
from lmforge.tasks import evaluate, finetune
from lmforge.tasks.base import load_base
from lmforge.tasks.sft import PAD_TOKEN, SFT_CHAT_TEMPLATE, Sft, chat_pieces, conversation_tokens
from lmforge.tokenizer import train_tokenizer

SFT = Sft()
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Chile", "Santiago")]
MULTI_TURN = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello!"},
              {"role": "assistant", "content": "Hi! How can I help?"},
              {"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima."}]


def _records() -> list[dict]:
    """A small chat set in the three record shapes read_chat accepts."""
    rows: list[dict] = [{"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                                      {"role": "assistant", "content": f"The capital of {country} is {city}."}]}
                        for country, city in CAPITALS]
    rows.append({"messages": MULTI_TURN})
    rows.append({"prompt": "Say hello.", "response": "Hello there!"})
    rows.append({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _texts() -> list[str]:
    shakespeare = (files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chats = [m["content"] for r in _records() for m in r.get("messages", [])]
    return shakespeare[:100_000].split("\n\n") + chats * 20


@pytest.fixture
def chat_model(tmp_path) -> Path:
    """A random-init tiny GPT-2 whose BPE tokenizer has <|endoftext|> (BOS and EOS) but no pad
    token and no chat template; the model's vocab_size equals the tokenizer's (no spare id)."""
    tok = train_tokenizer(texts=_texts(), kind="bpe", vocab_size=500, special_tokens=["<|endoftext|>"])
    assert tok.pad_id is None and tok.chat_template is None and tok.vocab_size % 128
    torch.manual_seed(0)
    model = build(GPTConfig(vocab_size=tok.vocab_size, max_seq_len=128, dim=64, n_layers=2, n_heads=2))
    return LM(model, tok).save(tmp_path / "base", format="hf")


def test_loss_mask_is_exactly_the_assistant_tokens_and_their_eos(chat_model):
    base = load_base(chat_model)
    base.tokenizer.chat_template = SFT_CHAT_TEMPLATE
    tok = base.tokenizer
    ids, trained = conversation_tokens(tok, MULTI_TURN)
    eos = tok.eos_token
    # The pieces join to the rendered conversation; the trained tokens spell the assistant turns.
    assert "".join(text for text, _ in chat_pieces(tok, MULTI_TURN)) == chat_prompt(tok, MULTI_TURN, False)
    assert tok.decode(ids, skip_special_tokens=False) == chat_prompt(tok, MULTI_TURN, False)
    assert tok.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False) == \
        f"Hi! How can I help?{eos}Lima.{eos}"
    assert tok.decode([i for i, t in zip(ids, trained) if not t], skip_special_tokens=False) == \
        "<|system|>\nAnswer briefly.\n<|user|>\nHello!\n<|assistant|>\n\n<|user|>\nWhat is the capital of " \
        "Peru?\n<|assistant|>\n\n"
    # Each turn's prompt tokens are those LM.chat feeds the model (the prefix tokenized whole).
    for turn in (2, 4):
        prompt = tok.encode(chat_prompt(tok, MULTI_TURN[:turn]), add_special_tokens=False)
        assert ids[:len(prompt)] == prompt and trained[len(prompt) - 1:len(prompt) + 1] == [False, True]


def test_learns_replies_stops_at_eos_and_exports(chat_model, fast, tmp_path):
    """A tiny GPT learns the 13 conversations' assistant replies (greedy, exact) and ends each
    with EOS. The tokenizer had no pad token: one is added (distinct from EOS) and the model's
    vocab_size grows into its padded rows; the chat template is installed and saved, so
    transformers renders prompts identically, and its GPT2LMHeadModel generates the same replies."""
    data = _write(tmp_path / "chat.jsonl", _records())
    out = tmp_path / "run"
    untrained = evaluate(SFT, chat_model, data, options={"n_samples": 0})
    metrics = finetune(SFT, chat_model, data, data, out, epochs=60, lr=5e-3, batch_size=8, warmup=0.05,
                       eval_every=1000, **fast)
    assert untrained["loss"] > 5.5 and metrics["loss"] < 0.1  # ln V = 6.2 at init
    assert metrics["token_accuracy"] > 0.97 and metrics["perplexity"] < 1.1
    assert [s["stopped"] for s in metrics["samples"]] == [True] * 3
    assert metrics["samples"][0] == {"prompt": "What is the capital of France?",
                                     "reference": "The capital of France is Paris.",
                                     "reply": "The capital of France is Paris.", "stopped": True}
    report = (out / "report.md").read_text()
    assert "## sample replies (greedy)" in report and f"added pad token '{PAD_TOKEN}' (id 500)" in report
    assert "vocab_size grew from 500 to 501" in report and "installed lmforge's" in report

    lm_model, _, tok, special = load_model_dir(out / "model")
    assert tok.pad_token == PAD_TOKEN and tok.pad_id == 500 != tok.eos_id and lm_model.config.vocab_size == 501
    assert tok.chat_template == SFT_CHAT_TEMPLATE and special["pad_token_id"] == 500
    theirs_tok = hf.AutoTokenizer.from_pretrained(out / "model")
    theirs = hf.GPT2LMHeadModel.from_pretrained(out / "model").eval()
    assert theirs_tok.pad_token == PAD_TOKEN and theirs.config.vocab_size == 501
    lm = LM(lm_model.eval(), tok)
    for record in _records():
        messages = record.get("messages") or []
        if not messages:
            continue
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = chat_prompt(tok, messages[:last])
        assert prompt == theirs_tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        assert chat_prompt(tok, messages, False) == theirs_tok.apply_chat_template(messages, tokenize=False)
        assert lm.chat(messages[:last], max_new_tokens=24) == messages[last]["content"]
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        a = generate(lm.model, ids, max_new_tokens=24, eos_token_id=tok.eos_id).tokens[0].tolist()
        b = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, ids.size(1):].tolist()
        assert a[-1] == tok.eos_id and a == b[:len(a)]


def test_own_template_is_kept_and_checked(chat_model, tmp_path):
    """A tokenizer's own template is used as is; one whose assistant turns do not end in EOS is
    refused (the model could not learn to stop)."""
    base = load_base(chat_model)
    base.tokenizer.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
                                    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                                    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    ids, trained = conversation_tokens(base.tokenizer, MULTI_TURN)
    assert base.tokenizer.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False) == \
        "Hi! How can I help?<|endoftext|>Lima.<|endoftext|>"
    base.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="does not end assistant turns with the EOS token"):
        conversation_tokens(base.tokenizer, MULTI_TURN)


def test_bad_input_raises_clear_errors(chat_model, make_model, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [_records()[0], {"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: message 0: role 'bot' is not one of"):
        evaluate(SFT, chat_model, bad)
    first = _write(tmp_path / "first.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."}]}])
    with pytest.raises(ValueError, match=r"first\.jsonl: conversation 1: an assistant message must follow a user"):
        evaluate(SFT, chat_model, first)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        evaluate(SFT, chat_model, empty)
    with pytest.raises(ValueError, match="unknown option.*n_sample\\b"):
        evaluate(SFT, chat_model, bad, options={"n_sample": 1})
    bert = make_model(tmp_path / "bert", _texts()[:200], "bert")
    with pytest.raises(ValueError, match="sft trains decoder-only language models.*this is a model of the bert family"):
        finetune(SFT, bert, bad, bad, tmp_path / "run")
    tok = load_base(chat_model).tokenizer
    LM(build(preset("bart-tiny", vocab_size=tok.vocab_size, dim=32, n_heads=2, n_layers=1)), tok).save(
        tmp_path / "bart", format="hf")
    with pytest.raises(ValueError, match="this is a model of the encdec family"):
        finetune(SFT, tmp_path / "bart", bad, bad, tmp_path / "run")


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("pad", ["eos", "none"])
def test_pad_is_eos_with_no_spare_row_trains_and_stops(tmp_path, fast, pad):
    """A SmolLM2-class instruct model: pad = eos = <|im_end|> (or no pad at all) and a
    vocabulary of exactly 384 rows (no spare padded row). It trains (the masks keep padding
    out), learns to end its turns, and the tokenizer and vocabulary are left as they were."""
    specials = ["<|im_start|>", "eos=<|im_end|>"] + (["pad=<|im_end|>"] if pad == "eos" else [])
    tok = train_tokenizer(texts=_texts(), kind="bpe", vocab_size=384, special_tokens=specials)
    assert tok.vocab_size == 384 and (tok.pad_id == tok.eos_id if pad == "eos" else tok.pad_id is None)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = build(GPTConfig(vocab_size=384, max_seq_len=128, dim=64, n_layers=2, n_heads=2))
    base = LM(model, tok).save(tmp_path / "base", format="hf")
    data = _write(tmp_path / "chat.jsonl", _records()[:10])
    metrics = finetune(SFT, base, data, data, tmp_path / "run", epochs=60, lr=5e-3, batch_size=4, warmup=0.05,
                       eval_every=1000, **fast)
    assert metrics["loss"] < 0.2 and [s["stopped"] for s in metrics["samples"]] == [True] * 3
    out, _, out_tok, _ = load_model_dir(tmp_path / "run" / "model")
    assert out.config.vocab_size == 384 and out_tok.vocab_size == 384 and out_tok.eos_token == "<|im_end|>"
