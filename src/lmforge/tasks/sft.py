"""sft: supervised instruction / chat tuning of a decoder-only model (GPT-2, Llama).

    data            JSONL chat records (lmforge.data.readers.read_chat): {"messages": [{"role",
                    "content"}, ...]}, {"prompt", "response"} or {"instruction", "input",
                    "output"}, each with an optional "system"
    chat template   the tokenizer's own (Hugging Face `chat_template`, Jinja2: messages,
                    add_generation_prompt, bos_token, eos_token); a tokenizer without one gets
                    SFT_CHAT_TEMPLATE below. The template travels with the model
                    (tokenizer_config.json), so transformers' `apply_chat_template` and
                    `lmforge.generate.text.chat_prompt` render the same text
    tokens          each conversation is cut into pieces by rendering its prefixes: the text
                    up to an assistant turn (generation prompt included) and that turn's own
                    text; pieces are tokenized separately (no special tokens added: the
                    template writes them), so the prompt tokens the model trains on are those
                    `LM.chat` feeds it at inference
    loss mask       labels only on assistant tokens, up to and including the EOS that ends
                    each assistant turn (the model learns to stop); system, user, template
                    text and padding are -100. A template whose assistant turns do not end
                    in the EOS token is refused
    pad token       the tokenizer's own, even when it is its EOS (pad = eos: the attention
                    mask and the -100 labels keep padding out of the loss). A tokenizer with
                    none gets PAD_TOKEN, its id the next free one; the model's vocab_size grows
                    by one when the id falls past it, which needs no new tensor: the embedding
                    (and LM head) already have padded_vocab_size rows (a multiple of 128); the
                    new row starts at the mean embedding. With no spare row, EOS pads
    metrics         validation loss, perplexity = exp(loss) and token_accuracy (argmax hits),
                    all on assistant tokens; report.md shows greedy replies to the first
                    validation conversations (stopped: whether the model emitted EOS)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.data.batching import IGNORE_INDEX, collate_lm
from lmforge.data.readers import ChatData, read_chat
from lmforge.eval.metrics import perplexity
from lmforge.generate.chat import DEFAULT_CHAT_TEMPLATE, chat_prompt
from lmforge.generate.decode import GenerationConfig
from lmforge.tasks.base import Base, FinetuneConfig, Outputs, Setup, log_truncation, task_options
from lmforge.tasks.perplexity import row_token_stats
from lmforge.tasks.seq2seq import generate_ids
from lmforge.train.objectives import ObjectiveOutput, clm

log = logging.getLogger("lmforge.tasks")

SFT_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE  # EOS closes each assistant turn: the model learns to stop
PAD_TOKEN = "<|pad|>"


@dataclass
class SftOptions:
    """Options of sft (FinetuneConfig.options).

    Args:
        n_samples: validation conversations answered in report.md (0: none).
        max_new_tokens: reply length limit of those samples.
    """

    n_samples: int = 3
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.n_samples < 0 or self.max_new_tokens < 1:
            raise ValueError("n_samples must be >= 0 and max_new_tokens >= 1")


# ----------------------------------------------------------------------------- tokenizer and model


def ensure_chat_template(base: Base, notes: list[str]) -> None:
    """Install SFT_CHAT_TEMPLATE on a tokenizer that has no chat template."""
    if not base.tokenizer.chat_template:
        base.tokenizer.chat_template = SFT_CHAT_TEMPLATE
        notes.append("the tokenizer had no chat template: installed lmforge's (<|role|>\\ncontent, EOS after "
                     "assistant turns)")


def ensure_pad_token(base: Base, notes: list[str]) -> None:
    """A pad token for batches (see the module docstring): the tokenizer's own, even when it is
    its EOS (padding is masked by the attention mask and the labels, so pad = eos trains and
    generates correctly, as SmolLM2-class instruct models are trained); a tokenizer with none
    gets PAD_TOKEN in a spare (padded) embedding row, or, with no spare row, pads with EOS."""
    tok, config = base.tokenizer, base.config
    if tok.pad_id is not None:
        return
    existing = tok.token_to_id(PAD_TOKEN)
    new_id = existing if existing is not None else tok.vocab_size
    if new_id >= config.padded_vocab_size:
        base.special["pad_token_id"] = tok.eos_id
        notes.append(f"padding with the EOS token {tok.eos_token!r}: the tokenizer has no pad token and the model "
                     f"no spare embedding row (the attention mask and the labels keep padding out)")
        return
    if existing is None:
        tok.backend.add_special_tokens([PAD_TOKEN])
    tok.special_tokens["pad"] = PAD_TOKEN
    base.special["pad_token_id"] = new_id
    grown = ""
    if new_id >= config.vocab_size:
        model = base.model
        with torch.no_grad():
            for weight in {id(w): w for w in (model.tok_emb.weight, model.lm_head.weight)}.values():
                weight[config.vocab_size:new_id + 1] = weight[:config.vocab_size].mean(0)
        grown = f"; the model's vocab_size grew from {config.vocab_size} to {new_id + 1} (a spare padded row)"
        config.vocab_size = new_id + 1
    notes.append(f"added pad token {PAD_TOKEN!r} (id {new_id}): the tokenizer had none distinct from EOS{grown}")


# ----------------------------------------------------------------------------- conversations -> features


def chat_pieces(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_turn) pieces that join to the whole.

    Rendering the prefixes messages[:i] (with the generation prompt) and messages[:i + 1]
    finds where each assistant turn's text starts and ends, for any template that renders
    a conversation as the extension of its prefixes."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0 or all(m["role"] == "system" for m in messages[:i]):
            raise ValueError("an assistant message must follow a user message")
        prompt = chat_prompt(tokenizer, messages[:i], add_generation_prompt=True)
        full = chat_prompt(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as the extension of its prefixes, "
                             "so the assistant turns cannot be located")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = chat_prompt(tokenizer, messages, add_generation_prompt=False)
    if not whole.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its prefixes")
    pieces.append((whole[len(done):], False))
    return [(text, assistant) for text, assistant in pieces if text]


def conversation_tokens(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it is trained on: the
    assistant turns' tokens up to and including their EOS."""
    eos = tokenizer.eos_id
    ids: list[int] = []
    trained: list[bool] = []
    for text, assistant in chat_pieces(tokenizer, messages):
        piece = tokenizer.encode(text, add_special_tokens=False)
        if assistant:
            if eos not in piece:
                raise ValueError(f"the chat template does not end assistant turns with the EOS token "
                                 f"{tokenizer.eos_token!r} (rendered turn: {text!r}), so the model could not "
                                 "learn to stop")
            end = piece.index(eos) + 1
            trained += [True] * end + [False] * (len(piece) - end)
        else:
            trained += [False] * len(piece)
        ids += piece
    return ids, trained


def encode(base: Base, data: ChatData, path: Path, max_length: int, skip_bad: bool,
           notes: list[str]) -> list[dict[str, Any]]:
    """Conversations -> features {input_ids, labels (next token where it is trained on, else
    -100), conversation (its index)}; cut to max_length tokens."""
    features, cut, empty = [], 0, 0
    for n, messages in enumerate(data.conversations):
        try:
            ids, trained = conversation_tokens(base.tokenizer, messages)
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{path}: conversation {n + 1}: {e}") from None
            empty += 1
            continue
        if len(ids) > max_length:
            ids, trained, cut = ids[:max_length], trained[:max_length], cut + 1
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids[1:], trained[1:])] + [IGNORE_INDEX]
        if all(label == IGNORE_INDEX for label in labels):
            empty += 1
            continue
        features.append({"input_ids": ids, "labels": labels, "conversation": n})
    log_truncation(str(path), cut, len(data), max_length, notes)
    if empty:
        notes.append(f"{path}: left out {empty} conversations with no assistant token within max_length "
                     "(or, with skip_bad, that the template could not render)")
    if not features:
        raise ValueError(f"{path}: no conversation has an assistant token within max_length {max_length}")
    return features


def step(model: nn.Module, batch: dict[str, Tensor]) -> tuple[ObjectiveOutput, tuple[Tensor, ...] | None]:
    """Summed cross-entropy on the assistant tokens. Training: the chunked causal-LM objective;
    validation: per conversation (nll_sum, correct, tokens) for `score`."""
    if model.training:
        return clm(model, batch), None
    nll, correct, count = row_token_stats(model, batch)
    return ObjectiveOutput(nll.sum(), count.sum(), {}), (nll, correct, count)


# ----------------------------------------------------------------------------- metrics


def reply_samples(model: nn.Module, base: Base, data: ChatData, opts: SftOptions,
                  conversations: list[int]) -> list[dict[str, Any]]:
    """Greedy replies to the first validation conversations: everything before their last
    assistant message, rendered with the generation prompt."""
    tok = base.tokenizer
    prompts, cases = [], []
    for n in conversations[:opts.n_samples]:
        messages = data.conversations[n]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = chat_prompt(tok, messages[:last], add_generation_prompt=True)
        prompts.append(tok.encode(text, add_special_tokens=False))
        cases.append((messages[last - 1]["content"], messages[last]["content"]))
    if not prompts:
        return []
    limit = model.config.max_seq_len - max(map(len, prompts)) + 1
    if limit < 1:
        return []
    config = GenerationConfig(max_new_tokens=min(opts.max_new_tokens, limit), eos_token_id=tok.eos_id,
                              pad_token_id=base.pad_id)
    # generate_ids drops EOS and what follows; a reply shorter than the limit therefore stopped.
    replies = generate_ids(model, prompts, config, len(prompts), encdec=False)
    return [{"prompt": prompt, "reference": reference, "reply": tok.decode(ids, skip_special_tokens=True),
             "stopped": len(ids) < config.max_new_tokens}
            for (prompt, reference), ids in zip(cases, replies)]


def score(model: nn.Module, outputs: Outputs, *, base: Base, data: ChatData, opts: SftOptions,
          conversations: list[int]) -> dict[str, Any]:
    nll = sum(float(o[0]) for o in outputs.values())
    correct = sum(float(o[1]) for o in outputs.values())
    tokens = sum(float(o[2]) for o in outputs.values())
    return {"token_accuracy": correct / tokens, "perplexity": perplexity(nll / tokens),
            "assistant_tokens": int(tokens), "samples": reply_samples(model, base, data, opts, conversations)}


def report(metrics: dict[str, Any], out: Path) -> dict[str, object]:
    return {"sample replies (greedy)": metrics["samples"]} if metrics.get("samples") else {}


class Sft:
    """The sft task (see the module docstring)."""

    name = "sft"
    options_type = SftOptions
    evaluate_only = False
    metric = "loss"
    metrics = ("token_accuracy",)
    max_length = 1024

    def setup(self, base: Base, config: FinetuneConfig, train: Path | None, valid: Path) -> Setup:
        if base.head is not None or base.family != "gpt":
            what = f"a {base.head.kind} head" if base.head is not None else f"a model of the {base.family} family"
            raise ValueError(f"{base.path}: sft trains decoder-only language models (GPT / Llama family without a "
                             f"task head); this is {what}")
        if base.tokenizer.eos_id is None:
            raise ValueError(f"{base.path}: the tokenizer has no EOS token, so the model could not learn to stop")
        opts = task_options(self, config)
        notes: list[str] = []
        ensure_chat_template(base, notes)
        if train is not None:
            ensure_pad_token(base, notes)
        datasets = {}
        for path in (train, valid):
            if path is not None:
                datasets[path] = data = read_chat(path, skip_bad=config.skip_bad, columns=config.columns)
                if data.skipped:
                    notes.append(f"{path}: skipped {data.skipped} malformed records")
        features = {path: encode(base, data, path, config.max_length, config.skip_bad, notes)
                    for path, data in datasets.items()}
        valid_features = features[valid]
        return Setup(
            model=base.model, head=None, train=features[train] if train is not None else [], valid=valid_features,
            collate=functools.partial(collate_lm, pad_id=base.pad_id), step=step,
            score=functools.partial(score, base=base, data=datasets[valid], opts=opts,
                                    conversations=[f["conversation"] for f in valid_features]),
            report=report, notes=notes)
