"""Strings in, strings out: the tokenizer-level generation API.

`generate_text` tokenizes prompts (left-padded for a GPT, right-padded sources for an
EncoderDecoder), generates, and decodes only the new tokens, cut at EOS and at the
first stop string. `stream_text` yields the text of one prompt piece by piece as it is
produced. (Chat templates: lmforge.generate.chat.)

The tokenizer needs: encode(text, add_special_tokens=True) -> list[int],
decode(ids, skip_special_tokens=True) -> str, and the ids eos_id, pad_id, bos_id
(each may be None) and chat_template (None or a jinja2 string).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.generate.decode import GenerationConfig, generate, iter_generate
from lmforge.generate.detokenize import Detokenizer, TokenInfo, find_stop
from lmforge.models.gpt import GPT


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_id", "eos_id"):
        if getattr(tokenizer, name, None) is not None:
            return getattr(tokenizer, name)
    return 0  # any id: padded positions are masked out


def encode_prompts(model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                   add_special_tokens: bool = True, max_prompt_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Tokenize and pad a batch: -> input_ids (B, P), attention_mask (B, P).

    Left padding for a GPT (the last prompt tokens line up for decoding), right padding
    for an EncoderDecoder's sources (its encoder counts positions from the first column).
    max_prompt_tokens: keep only the last that many ids of a longer prompt.
    """
    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
    P, pad, left = max(map(len, encoded)), _pad_id(tokenizer), isinstance(model, GPT)
    input_ids = torch.full((len(encoded), P), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), P, dtype=torch.long)
    for i, ids in enumerate(encoded):
        cols = slice(P - len(ids), P) if left else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids, dtype=torch.long)
        mask[i, cols] = 1
    return input_ids.to(device), mask.to(device)


def _row_text(tokenizer: Any, ids: list[int], eos: list[int], stop: list[str] | None) -> str:
    """New token ids of one row -> text, cut at the first EOS and at the first stop string."""
    ids = next((ids[:i] for i, token in enumerate(ids) if token in eos), ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = find_stop(text, stop)
    return text if cut is None else text[:cut]


def end_ids(tokenizer: Any) -> list[int]:
    """The ids that end generation: the tokenizer's eos_ids (EOS and, for instruct models,
    the end-of-turn ids of generation_config.json), else its eos_id."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None:
        ids = [] if getattr(tokenizer, "eos_id", None) is None else [tokenizer.eos_id]
    return list(ids)


def _config(tokenizer: Any, **options) -> GenerationConfig:
    return GenerationConfig(eos_token_id=end_ids(tokenizer) or None, pad_token_id=_pad_id(tokenizer), **options)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
    stop: list[str] | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    *,
    min_new_tokens: int = 0,
    early_stopping: bool | str = False,
    add_special_tokens: bool = True,
    max_prompt_tokens: int | None = None,
    decode_step: Callable[..., Tensor] | None = None,
    prompt_lookup: int = 0,
    prefill_chunk: int | None = None,
) -> list[str] | list[list[str]]:
    """Continue each prompt (GPT) or transform each source (EncoderDecoder).

    temperature 0 is greedy (or beam search with num_beams > 1); > 0 samples, with
    top_k / top_p filtering, reproducibly when `seed` is given. Returns one string per
    prompt, or per prompt a list of num_return_sequences strings. Only the new text is
    returned, cut at EOS and before the first stop string; with stop strings, greedy
    and sampled generation end as soon as every row has hit one (beam search cuts after).
    max_prompt_tokens: left-truncate longer prompts to their last that many ids.
    prompt_lookup, prefill_chunk: as GenerationConfig (n-gram speculative greedy decoding of
    one prompt; the prompt in chunks).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate_text: no prompts given")
    device = _device_of(model, device)
    cfg = _config(tokenizer, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                  no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping, num_return_sequences=num_return_sequences, prompt_lookup=prompt_lookup,
                  prefill_chunk=prefill_chunk)
    input_ids, mask = encode_prompts(model, tokenizer, prompts, device, add_special_tokens, max_prompt_tokens)
    if stop and num_beams == 1:
        rows = _generate_until_stop(model, tokenizer, input_ids, mask, cfg, stop, _generator(seed, device),
                                    decode_step)
    else:
        out = generate(model, input_ids, mask, cfg, generator=_generator(seed, device), decode_step=decode_step)
        rows = out.tokens.tolist()
    texts = [_row_text(tokenizer, ids, cfg.eos_ids, stop) for ids in rows]
    if num_return_sequences == 1:
        return texts
    R = num_return_sequences
    return [texts[i * R:(i + 1) * R] for i in range(len(prompts))]


def _generate_until_stop(model: nn.Module, tokenizer: Any, input_ids: Tensor, mask: Tensor, cfg: GenerationConfig,
                         stop: list[str], generator: torch.Generator | None,
                         decode_step: Callable[..., Tensor] | None) -> list[list[int]]:
    """Greedy/sampled generation that ends once every row has emitted EOS or a stop string."""
    rows: list[list[int]] = []
    done: list[bool] = []
    for step in iter_generate(model, input_ids, mask, cfg, generator=generator, decode_step=decode_step):
        tokens = step.tokens.tolist()  # host sync: stop strings are found in text
        if not rows:
            rows, done = [[] for _ in tokens], [False] * len(tokens)
        for i, tok in enumerate(tokens):
            if done[i]:
                continue
            rows[i].append(tok)
            done[i] = tok in cfg.eos_ids or find_stop(tokenizer.decode(rows[i]), stop) is not None
        if all(done):
            break
    return rows


def stream_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop: list[str] | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    *,
    min_new_tokens: int = 0,
    add_special_tokens: bool = True,
    decode_step: Callable[..., Tensor] | None = None,
    prompt_lookup: int = 0,
    prefill_chunk: int | None = None,
) -> Iterator[str]:
    """Yield the new text of one prompt in pieces as tokens are generated (greedy or sampled).

    Pieces come from `detokenize_stream`: only cleanly decoded text, nothing that might
    still turn into a stop string. They join to what `generate_text` returns with the
    same arguments.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"stream_text takes one prompt string, got {type(prompt).__name__}")
    device = _device_of(model, device)
    cfg = _config(tokenizer, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                  no_repeat_ngram_size=no_repeat_ngram_size, prompt_lookup=prompt_lookup, prefill_chunk=prefill_chunk)
    input_ids, mask = encode_prompts(model, tokenizer, [prompt], device, add_special_tokens)
    steps = iter_generate(model, input_ids, mask, cfg, generator=_generator(seed, device), decode_step=decode_step)
    # host sync: streaming hands every token to the host as soon as it exists
    yield from detokenize_stream(tokenizer, (int(step.tokens[0]) for step in steps), eos_id=cfg.eos_ids,
                                 stop=stop)


def detokenize_stream(tokenizer: Any, token_ids: Iterable[int], *, eos_id: int | list[int] | None = None,
                      stop: list[str] | None = None) -> Iterator[str]:
    """Turn a stream of token ids into a stream of text pieces (lmforge.generate.detokenize's
    Detokenizer): a piece is yielded once the text decodes cleanly and cannot still turn into
    a stop string; the stream ends at eos_id or before the first stop string. The pieces
    join to the decoded text, cut at EOS and at the first stop string."""
    rows = Detokenizer(0, tokenizer, eos_id, stop or [])
    for token_id in token_ids:
        piece = rows.push(TokenInfo(token_id, ""))
        if piece is not None and piece.text:
            yield piece.text
        if rows.finish_reason:
            return
    piece = rows.finish("length")
    if piece.text:
        yield piece.text
