"""Decoding loops: prefill, one-token decode steps into a preallocated KV cache, beam search.

    prompt (B, P) --prefill--> KV cache slots 0..P-1, logits of the last position
    repeat: pick a token (greedy / sample / beams) -> decode step: one token in, its
            keys and values written at the next cache slot, next logits out

Batches of prompts are left-padded: every row's last prompt token then sits in the
same column, so one decode step serves the whole batch. Each row's position ids
count its real tokens only (cumsum of the attention mask - 1, as transformers does),
and the cache-slot mask (N, S_max) hides the padding, so a padded row generates
exactly what it would alone.

The decode step (`gpt_decode_step`, `encdec_decode_step`) has static shapes -- the
cache is sized once, the slot to write is a tensor, nothing branches on tensor
values -- so that on CUDA it can be captured once as a CUDA graph and replayed
(`CompiledDecodeStep`); on CPU it runs eagerly. The loops read one value back per
step at most: whether every row has finished (`# host sync`).

Beam search follows transformers' vectorised beam search, so that with the same
weights both return the same tokens: beam scores are sums of log-probabilities;
a finished hypothesis scores sum_logprobs / generated_length ** length_penalty;
early_stopping is True, False (transformers' default heuristic) or "never".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lmforge.generate import sampling
from lmforge.generate.direct_attributes import direct_attributes
from lmforge.models.encdec import EncoderDecoderBase
from lmforge.models.gpt import GPT
from lmforge.nn.quant import compute_dtype

BIG = 1.0e9  # transformers' "impossible" beam score offset; kept equal for identical rankings


@dataclass
class GenerationConfig:
    """How to decode. temperature 0 is greedy (argmax); > 0 samples.

    Args:
        max_new_tokens: tokens to generate at most (EOS included).
        min_new_tokens: EOS is impossible before this many new tokens.
        temperature: 0 for greedy / beam search, > 0 to sample from softmax(logits / T).
        top_k: sample among the k most likely tokens (0 or None: all).
        top_p: sample among the smallest set of tokens reaching probability p (None or 1: all).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1: off).
        no_repeat_ngram_size: no n-gram of this size occurs twice (0: off).
        num_beams: beam search width (1: no beam search).
        length_penalty: finished beams score sum_logprobs / length ** length_penalty.
        early_stopping: beam search stop rule, as transformers: True, False or "never".
        num_return_sequences: outputs per prompt (samples, or the best beams).
        eos_token_id: a row stops after emitting it, or any of a list of them (an instruct model's
            end of text and end of turn; None: only max_new_tokens stops).
        pad_token_id: emitted by finished rows (None: eos_token_id, else 0).
        decoder_start_token_id: first decoder token of an EncoderDecoder (None: from its config).
        forced_bos_token_id: force the first generated token (BART-style configs).
        forced_eos_token_id: force this token as the last one when max_new_tokens is reached.
        logprobs: also return the log-probability of each generated token (not in beam search).
        top_logprobs: also return the k most likely tokens and their log-probs at each step.
        sync_every: check "all rows finished" every this many steps (the only host sync).
        prompt_lookup: speculative decoding without a draft model, for greedy decoding of one
            prompt (GPT): up to this many tokens that followed an earlier occurrence of the
            latest n-gram (in the prompt or the output so far) are proposed and checked in one
            forward pass; the output is what greedy decoding gives (0: off).
        prefill_chunk: run the prompt through the model this many tokens at a time (GPT), each
            chunk attending to the cache of those before: long prompts need attention scores of
            (chunk x prompt) rather than (prompt x prompt), and activations of one chunk (None: at once).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    sync_every: int = 1
    prompt_lookup: int = 0
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "num_return_sequences", "sync_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be a positive integer, got {value!r}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ValueError(f"GenerationConfig.prefill_chunk must be a positive integer or None, "
                             f"got {self.prefill_chunk!r}")
        for name in ("min_new_tokens", "no_repeat_ngram_size", "top_logprobs", "prompt_lookup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"GenerationConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"GenerationConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"GenerationConfig.early_stopping must be True, False or 'never', "
                             f"got {self.early_stopping!r}")
        if self.num_beams > 1 and self.prompt_lookup:
            raise ValueError("GenerationConfig: prompt_lookup speeds up greedy decoding, not beam search")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("GenerationConfig: beam search (num_beams > 1) is deterministic; set temperature=0")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"GenerationConfig.num_return_sequences ({self.num_return_sequences}) must be "
                             f"<= num_beams ({self.num_beams})")

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (empty for None)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def is_eos(self, tokens: Tensor) -> Tensor:
        """tokens (...) -> bool (...): which are an end-of-sequence id (all False without one)."""
        ids = self.eos_ids
        if len(ids) <= 1:
            return tokens == ids[0] if ids else torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, torch.tensor(ids, device=tokens.device))


@dataclass
class Step:
    """One decoding step of every row: tokens (N,); logprobs (N,) of those tokens under the
    model's (unprocessed) distribution when asked for; top_ids / top_logprobs (N, k) when
    GenerationConfig.top_logprobs = k."""

    tokens: Tensor
    logprobs: Tensor | None = None
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


@dataclass
class GenerationOutput:
    """tokens (N, T): generated ids only, pad_token_id after each row's end; N = prompts x
    num_return_sequences (a prompt's outputs are adjacent). lengths (N,): tokens up to
    and including EOS. logprobs (N, T), top_ids / top_logprobs (N, T, k) when computed
    (not for beam search). scores (N,): beam search hypothesis scores."""

    tokens: Tensor
    lengths: Tensor
    logprobs: Tensor | None = None
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    scores: Tensor | None = None


# ---- the one-token decode steps: static shapes, no host syncs ----------------------------------

def gpt_decode_step(model: GPT, cache: nn.ModuleList, tokens: Tensor, cache_pos: Tensor, position_ids: Tensor,
                    cache_mask: Tensor) -> Tensor:
    """One token per row through a GPT with a KV cache.

    tokens (N, 1); cache_pos (1,) the slot to write; position_ids (N, 1); cache_mask
    (N, S_max) real cache slots (this one included), or in eager decoding the ready
    (N, 1, 1, S) attention mask over the first S slots -> next-token logits (N, V) fp32.
    """
    hidden = model.encode(tokens, cache_mask, position_ids=position_ids, cache=cache, cache_pos=cache_pos)
    return model.logits(hidden[:, -1]).float()


def encdec_decode_step(model: EncoderDecoderBase, cache: nn.ModuleList, tokens: Tensor, cache_pos: Tensor,
                       cache_mask: Tensor, memory_kv: list[tuple[Tensor, Tensor]],
                       memory_mask: Tensor | None) -> Tensor:
    """One decoder token per row, attending to precomputed cross-attention keys/values.

    tokens (N, 1); cache_pos (1,); cache_mask as in gpt_decode_step; memory_kv: per layer (k, v)
    (N, H, S_src, Dh); memory_mask (N, S_src) or None -> next-token logits (N, V) fp32.
    """
    hidden = model.decode(tokens, None, memory_mask, decoder_attention_mask=cache_mask, memory_kv=memory_kv,
                          cache=cache, cache_pos=cache_pos)
    return model.logits(hidden[:, -1]).float()


class CompiledDecodeStep:
    """A decode step compiled with torch.compile -- on CUDA with mode="reduce-overhead",
    i.e. captured as a CUDA graph -- plus the KV cache its graph was recorded against.

    A CUDA graph replays fixed memory addresses, so the cache buffers are marked static
    and the latest cache is kept for the next call of the same shape (no re-recording).
    Pass it explicitly: `generate(model, ids, decode_step=compile_decode_step(model))`.
    """

    def __init__(self, step_fn: Callable[..., Tensor], mode: str = "reduce-overhead") -> None:
        self.fn = torch.compile(step_fn, mode=mode, fullgraph=True, dynamic=False)
        self._cache_key: tuple | None = None
        self._cache: nn.ModuleList | None = None

    def make_cache(self, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype,
                   device: torch.device) -> nn.ModuleList:
        key = (id(model), batch, max_len, dtype, str(device))
        if key != self._cache_key:
            self._cache = model.make_cache(batch, max_len, dtype, device)
            if device.type == "cuda":
                for layer in self._cache:
                    torch._dynamo.mark_static_address(layer.k)
                    torch._dynamo.mark_static_address(layer.v)
            self._cache_key = key
        return self._cache

    def __call__(self, *args) -> Tensor:
        if args[2].is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return self.fn(*args)


def compile_decode_step(model: nn.Module, mode: str = "reduce-overhead") -> CompiledDecodeStep:
    """The family's decode step compiled (CUDA graphs with the default mode)."""
    return CompiledDecodeStep(encdec_decode_step if isinstance(model, EncoderDecoderBase) else gpt_decode_step, mode)


# ---- per-family sessions: cache, masks and positions of one generation ------------------------

class _SlotMask:
    """Which KV-cache slots hold tokens, (N, S_max) bool, and what a decode step sees of it.

    A compiled step (a CUDA graph) needs fixed shapes: it gets the whole (N, S_max) mask and
    the model builds the attention mask inside the graph. An eager step gets only the
    `length` slots written so far, so that attention reads as many keys as the sequences
    have rather than the whole preallocated cache, and gets them as the ready
    (N, 1, 1, length) attention mask: its one query is the newest slot, which sees every
    earlier slot that is not padding. That is a narrowed view: nothing is built per step."""

    def __init__(self, N: int, max_len: int, device: torch.device, static: bool, prompt: Tensor | None = None,
                 window: int | None = None):
        self.slots = torch.zeros(N, max_len, dtype=torch.bool, device=device)  # (N, S_max)
        self.window = window  # sliding-window attention: slots older than the window leave the mask for good
        self._as_attention = self.slots[:, None, None, :]  # (N, 1, 1, S_max), a view
        self.static = static
        self.length = 0  # slots written so far, known on the host (no sync)
        if prompt is not None:  # (N, P) bool: the prompt fills the first P slots, padding included
            self.slots[:, : prompt.size(1)] = prompt
            self.length = prompt.size(1)

    def add(self, slot: Tensor) -> Tensor:
        """Mark slot (1,) as written (the next one, in order); return the step's mask."""
        self.slots.index_fill_(1, slot, True)
        self.length += 1
        if self.window is not None and self.length > self.window:
            self.slots[:, : self.length - self.window] = False  # queries only move on: what left stays out
        return self.slots if self.static else self._as_attention.narrow(-1, 0, self.length)


def _new_cache(model: nn.Module, decode_step, batch: int, max_len: int, device: torch.device) -> nn.ModuleList:
    """A KV cache for max_len slots; for a CUDA graph, always max_seq_len slots, so that one
    captured graph serves every prompt length (only the batch size changes its shapes)."""
    dtype = compute_dtype(model)  # the KV cache in the compute dtype (weights may be int8)
    if isinstance(decode_step, CompiledDecodeStep):
        max_len = model.config.max_seq_len if device.type == "cuda" else max_len
        return decode_step.make_cache(model, batch, max_len, dtype, device)
    return model.make_cache(batch, max_len, dtype, device)


class _GPTSession:
    """Left-padded prompts (B, P), each repeated `n_rep` times (beams or samples)."""

    def __init__(self, model: GPT, input_ids: Tensor, attention_mask: Tensor, n_rep: int, max_new: int,
                 decode_step) -> None:
        ids, mask = input_ids.repeat_interleave(n_rep, 0), attention_mask.repeat_interleave(n_rep, 0).bool()
        N, P = ids.shape
        if P + max_new - 1 > model.config.max_seq_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"max_seq_len ({model.config.max_seq_len})")
        self.model, self.ids, self.step_fn = model, ids, decode_step or gpt_decode_step
        self.cache = _new_cache(model, decode_step, N, P + max_new, ids.device)
        self.slot_mask = _SlotMask(N, self.cache[0].max_len, ids.device, static=decode_step is not None, prompt=mask,
                                   window=model.config.sliding_window)
        self.position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, P): real tokens count from 0
        self.next_pos = self.position_ids[:, -1:] + 1  # (N, 1)
        self.slot = torch.tensor([P], device=ids.device)  # (1,) next cache slot
        self.context, self.context_mask = ids, mask

    def prefill(self, chunk: int | None = None) -> Tensor:
        return gpt_prefill(self.model, self.cache, self.ids, self.slot_mask.slots, self.position_ids, chunk)

    def step(self, tokens: Tensor) -> Tensor:
        logits = self.step_fn(self.model, self.cache, tokens[:, None], self.slot, self.next_pos,
                              self.slot_mask.add(self.slot))
        self.slot += 1
        self.next_pos += 1
        return logits

    def reorder(self, index: Tensor) -> None:
        # Beams of one prompt share positions and mask; only their keys/values differ.
        for layer in self.cache:
            layer.reorder(index)


def gpt_prefill(model: GPT, cache: nn.ModuleList, ids: Tensor, slots: Tensor, position_ids: Tensor,
                chunk: int | None = None) -> Tensor:
    """The prompt ids (N, P) into cache slots 0..P-1 -> logits of its last position (N, V) fp32.
    Always eager. slots (N, >= P): which slots hold tokens (left padding is not);
    position_ids (N, P). chunk: that many tokens per forward pass, each chunk's queries
    attending to the cache slots before them and to their own (causally): the same
    attention as all at once, with (chunk x P) scores and one chunk's activations."""
    P = ids.size(1)
    chunk = chunk or P
    for start in range(0, P, chunk):
        end = min(start + chunk, P)
        hidden = model.encode(ids[:, start:end], slots[:, :end], position_ids=position_ids[:, start:end],
                              cache=cache, cache_pos=torch.arange(start, end, device=ids.device))
    return model.logits(hidden[:, -1]).float()


class _EncDecSession:
    """Source ids (B, S_src) encoded once; the decoder starts from decoder_start_token_id."""

    def __init__(self, model: EncoderDecoderBase, input_ids: Tensor, attention_mask: Tensor, n_rep: int,
                 max_new: int, decode_step, start_id: int) -> None:
        if max_new > model.config.max_seq_len:
            raise ValueError(f"max_new_tokens ({max_new}) exceeds the model's max_seq_len ({model.config.max_seq_len})")
        memory = model.encode(input_ids, attention_mask).repeat_interleave(n_rep, 0)  # (N, S_src, D)
        self.memory_mask = attention_mask.repeat_interleave(n_rep, 0).bool()  # (N, S_src)
        self.memory_kv = model.project_memory(memory)
        N, device = memory.size(0), memory.device
        self.model, self.step_fn = model, decode_step or encdec_decode_step
        self.cache = _new_cache(model, decode_step, N, max_new, device)
        self.slot_mask = _SlotMask(N, self.cache[0].max_len, device, static=decode_step is not None)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # transformers' penalties see the decoder input, start token included.
        self.context = torch.full((N, 1), start_id, dtype=torch.long, device=device)
        self.context_mask = torch.ones(N, 1, dtype=torch.bool, device=device)

    def prefill(self, chunk: int | None = None) -> Tensor:  # the source is encoded whole; one start token
        return self.step(self.context[:, 0])

    def step(self, tokens: Tensor) -> Tensor:
        logits = self.step_fn(self.model, self.cache, tokens[:, None], self.slot, self.slot_mask.add(self.slot),
                              self.memory_kv, self.memory_mask)
        self.slot += 1
        return logits

    def reorder(self, index: Tensor) -> None:
        # Beams of one source share its memory; only the self-attention cache is reordered.
        for layer in self.cache:
            layer.reorder(index)


def _eager_attributes(model: nn.Module, session, decode_step) -> contextlib.AbstractContextManager:
    """Eager decoding reads the model's and the cache's submodules, parameters and buffers
    through plain attributes while it runs (see lmforge.generate.direct_attributes: ~100 slow
    nn.Module lookups per step of a small model); a compiled step is left untouched."""
    return direct_attributes(model, session.cache) if decode_step is None else contextlib.nullcontext()


def _session(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, n_rep: int,
             cfg: GenerationConfig, decode_step):
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) int64 tensor, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    empty = (~mask.any(dim=1)).nonzero()  # host sync (once, before decoding)
    if len(empty):
        raise ValueError(f"prompt row {int(empty[0])} has no tokens (attention_mask all 0)")
    if isinstance(model, GPT):
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # host sync (once): padding after a token
            raise ValueError("GPT prompts must be left-padded: attention_mask has padding after a token")
        return _GPTSession(model, input_ids, mask, n_rep, cfg.max_new_tokens, decode_step)
    if isinstance(model, EncoderDecoderBase):
        start = cfg.decoder_start_token_id
        start = model.config.decoder_start_token_id if start is None else start
        return _EncDecSession(model, input_ids, mask, n_rep, cfg.max_new_tokens, decode_step, start)
    raise TypeError(f"generate needs a GPT or an encoder-decoder (EncoderDecoder, T5), got {type(model).__name__}")


# ---- logits processing shared by the loops ----------------------------------------------------

def _process(scores: Tensor, context: Tensor, context_mask: Tensor, length: int, t: int,
             cfg: GenerationConfig) -> Tensor:
    """Penalties and forced tokens, in transformers' order. scores (N, V); context (N, >= length),
    of which the first `length` columns are the tokens so far; t: step. (The context is cut
    here, only when a penalty reads it: two slicing ops per step are not free at batch 1.)"""
    if cfg.repetition_penalty != 1.0:
        scores = sampling.apply_repetition_penalty(scores, context[:, :length], context_mask[:, :length],
                                                   cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        scores = sampling.ban_repeated_ngrams(scores, context[:, :length], context_mask[:, :length],
                                              cfg.no_repeat_ngram_size)
    if cfg.eos_token_id is not None and t < cfg.min_new_tokens:
        scores = sampling.suppress_tokens(scores, cfg.eos_ids)
    if cfg.forced_bos_token_id is not None and t == 0:
        scores = sampling.force_token(scores, cfg.forced_bos_token_id)
    if cfg.forced_eos_token_id is not None and t == cfg.max_new_tokens - 1:
        scores = sampling.force_token(scores, cfg.forced_eos_token_id)
    return scores


def _choose(scores: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Greedy argmax (temperature 0) or a sample after temperature, top-k and top-p. (N, V) -> (N,)."""
    if cfg.temperature == 0:
        return sampling.greedy(scores)
    scores = sampling.apply_temperature(scores, cfg.temperature)
    if cfg.top_k:
        scores = sampling.top_k_filter(scores, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        scores = sampling.top_p_filter(scores, cfg.top_p)
    return sampling.sample(scores, generator)


def _resolve(config: GenerationConfig | None, options: dict) -> GenerationConfig:
    config = config or GenerationConfig()
    return replace(config, **options) if options else config


# ---- greedy and sampling -----------------------------------------------------------------------

@torch.inference_mode()
def iter_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                  config: GenerationConfig | None = None, *, generator: torch.Generator | None = None,
                  decode_step: Callable[..., Tensor] | None = None, **options) -> Iterator[Step]:
    """Greedy or sampled decoding, one `Step` per generated position.

    input_ids (B, P): left-padded prompts (GPT) or source ids (EncoderDecoder);
    attention_mask (B, P) 1 for tokens. Rows are prompts x num_return_sequences.
    Finished rows (after EOS) keep emitting pad_token_id; the iterator ends when every
    row has finished or max_new_tokens is reached. Options override `config` fields.
    """
    cfg = _resolve(config, options)
    if cfg.num_beams > 1:
        raise ValueError("iter_generate does not do beam search; use generate(num_beams=...)")
    if cfg.prompt_lookup:
        _check_prompt_lookup(model, input_ids, cfg, decode_step)
    was_training = model.training
    model.eval()
    fast = contextlib.ExitStack()
    try:
        session = _session(model, input_ids, attention_mask, cfg.num_return_sequences, cfg, decode_step)
        fast.enter_context(_eager_attributes(model, session, decode_step))
        L0, N = session.context.size(1), session.context.size(0)
        device = session.context.device
        context = torch.cat([session.context, session.context.new_full((N, cfg.max_new_tokens), cfg.pad_id)], 1)
        context_mask = torch.cat([session.context_mask, torch.ones(N, cfg.max_new_tokens, dtype=torch.bool,
                                                                     device=device)], 1)
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        needs_context = cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0
        if cfg.prompt_lookup:
            yield from _prompt_lookup_steps(session, cfg)
            return
        logits = session.prefill(cfg.prefill_chunk)
        for t in range(cfg.max_new_tokens):
            scores = _process(logits, context, context_mask, L0 + t, t, cfg)
            tokens = _choose(scores, cfg, generator)
            if cfg.eos_token_id is not None:
                tokens = tokens.masked_fill(finished, cfg.pad_id)
                finished |= cfg.is_eos(tokens)
            if needs_context:
                context[:, L0 + t] = tokens
            if cfg.logprobs or cfg.top_logprobs:
                yield Step(tokens, *sampling.token_logprobs(logits, tokens, cfg.top_logprobs))
            else:
                yield Step(tokens)
            if t == cfg.max_new_tokens - 1:
                break
            if cfg.eos_token_id is not None and (t + 1) % cfg.sync_every == 0 and bool(finished.all()):  # host sync
                break
            logits = session.step(tokens)
    finally:
        fast.close()
        model.train(was_training)


# ---- prompt lookup: speculative decoding with drafts from the context ------------------------

MAX_NGRAM = 3  # the longest n-gram looked up (then shorter ones)


def _check_prompt_lookup(model: nn.Module, input_ids: Tensor, cfg: GenerationConfig, decode_step) -> None:
    plain = (cfg.temperature == 0 and cfg.num_return_sequences == 1 and cfg.repetition_penalty == 1.0
             and not cfg.no_repeat_ngram_size and not cfg.min_new_tokens and cfg.forced_bos_token_id is None
             and cfg.forced_eos_token_id is None and not cfg.logprobs and not cfg.top_logprobs)
    if not plain:
        raise ValueError("prompt_lookup speeds up plain greedy decoding only (temperature 0, one sequence, no "
                         "penalties, forced tokens, min_new_tokens or logprobs)")
    if not isinstance(model, GPT) or input_ids.size(0) != 1 or decode_step is not None:
        raise ValueError("prompt_lookup decodes one prompt at a time with a GPT (eager decode step)")


def lookup_draft(seq: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n tokens, for
    the longest n <= max_ngram that occurs earlier ([] when none does)."""
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def _prompt_lookup_steps(session: _GPTSession, cfg: GenerationConfig) -> Iterator[Step]:
    """Greedy decoding of one prompt that emits what plain greedy decoding emits, several tokens
    per forward pass when the context predicts them.

    The newest token t (not yet in the cache) and a draft d_1..d_k go through the model in one
    pass at the next k+1 slots; its argmaxes g_0..g_k are greedy's choices after t, d_1, ...
    Drafts are accepted while d_i == g_(i-1); with m accepted, d_1..d_m, g_m are emitted. The
    cache then holds t, d_1..d_m; the rejected drafts' slots are written over next time (and
    attention reads only the slots before the newest token's)."""
    model, device = session.model, session.ids.device
    seq = session.ids[0].tolist()  # host sync: drafts are looked up on the host
    filled = session.slot_mask.slots  # (1, S_max): the prompt's slots, left padding not
    padding = len(seq) - 1 - int(session.position_ids[0, -1])  # slots before the first real token
    token = int(sampling.greedy(session.prefill(cfg.prefill_chunk))[0])
    eos, emitted = set(cfg.eos_ids), 0
    while True:
        yield Step(torch.tensor([token], device=device))
        emitted += 1
        seq.append(token)
        if emitted == cfg.max_new_tokens or token in eos:
            return
        draft = lookup_draft(seq, min(cfg.prompt_lookup, cfg.max_new_tokens - emitted - 1))
        L = len(seq) - 1  # slots in the cache; t goes to slot L
        block = torch.tensor([[token, *draft]], device=device)
        slots = torch.arange(L, L + block.size(1), device=device)
        filled[:, L:L + block.size(1)] = True
        hidden = model.encode(block, filled[:, :L + block.size(1)], position_ids=slots[None] - padding,
                              cache=session.cache, cache_pos=slots)
        greedy = model.logits(hidden[0]).float().argmax(-1).tolist()  # host sync, once per pass
        m = 0
        while m < len(draft) and draft[m] == greedy[m]:
            m += 1
        for tok in draft[:m]:
            yield Step(torch.tensor([tok], device=device))
            emitted += 1
            seq.append(tok)
            if tok in eos:
                return
        token = greedy[m]


def _stack_steps(steps: list[Step], cfg: GenerationConfig) -> GenerationOutput:
    tokens = torch.stack([s.tokens for s in steps], dim=1)  # (N, T)
    T = tokens.size(1)
    lengths = torch.full((tokens.size(0),), T, dtype=torch.long, device=tokens.device)
    if cfg.eos_token_id is not None:
        is_eos = cfg.is_eos(tokens)
        first = is_eos.long().argmax(dim=1)
        lengths = torch.where(is_eos.any(dim=1), first + 1, lengths)
        # sync_every > 1 may run a few steps past the end of the longest row: trim them.
        T = int(lengths.max())  # host sync (once, at the end)
    out = GenerationOutput(tokens[:, :T], lengths)
    if cfg.logprobs or cfg.top_logprobs:
        out.logprobs = torch.stack([s.logprobs for s in steps], 1)[:, :T]
    if cfg.top_logprobs:
        out.top_ids = torch.stack([s.top_ids for s in steps], 1)[:, :T]
        out.top_logprobs = torch.stack([s.top_logprobs for s in steps], 1)[:, :T]
    return out


def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             config: GenerationConfig | None = None, *, generator: torch.Generator | None = None,
             decode_step: Callable[..., Tensor] | None = None, **options) -> GenerationOutput:
    """Generate continuations of a batch: greedy, sampling or beam search (num_beams > 1).

    input_ids (B, P) left-padded prompts (GPT) or sources (EncoderDecoder), attention_mask
    (B, P). Options override fields of `config` (e.g. max_new_tokens=32, temperature=0.8).
    generator: a seeded torch.Generator on the model's device makes sampling reproducible.
    decode_step: a compiled step (`compile_decode_step`) for CUDA graphs; default eager.
    Returns GenerationOutput with tokens (B * num_return_sequences, T).
    """
    cfg = _resolve(config, options)
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, cfg, decode_step=decode_step)
    return _stack_steps(list(iter_generate(model, input_ids, attention_mask, cfg, generator=generator,
                                           decode_step=decode_step)), cfg)


# ---- beam search -------------------------------------------------------------------------------

def _gather_beams(x: Tensor, index: Tensor) -> Tensor:
    """x (B, K, ...) -> (B, K', ...) picking index (B, K') along dim 1."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


@torch.inference_mode()
def beam_search(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                config: GenerationConfig | None = None, *, decode_step: Callable[..., Tensor] | None = None,
                **options) -> GenerationOutput:
    """Beam search with transformers' semantics (see the module docstring).

    Keeps num_beams running hypotheses per prompt, from the top 2 * num_beams
    continuations of all beams each step (so that enough remain unfinished when some
    end in EOS); a hypothesis ending in EOS, or reaching max_new_tokens, joins the
    prompt's finished set if it ranks among its num_beams best. Returns the
    num_return_sequences best finished hypotheses per prompt.
    """
    cfg = _resolve(config, options)
    nb, K, lp = cfg.num_beams, 2 * cfg.num_beams, cfg.length_penalty
    was_training = model.training
    model.eval()
    fast = contextlib.ExitStack()
    try:
        session = _session(model, input_ids, attention_mask, nb, cfg, decode_step)
        fast.enter_context(_eager_attributes(model, session, decode_step))
        N, L0 = session.context.shape
        B, device = N // nb, session.context.device
        L = L0 + cfg.max_new_tokens
        seqs = session.context.new_full((B, nb, L), cfg.pad_id)  # (B, nb, L) context + generated
        seqs[:, :, :L0] = session.context.view(B, nb, L0)
        mask = torch.cat([session.context_mask, torch.ones(N, cfg.max_new_tokens, dtype=torch.bool,
                                                             device=device)], 1)
        run_scores = torch.zeros(B, nb, device=device)
        run_scores[:, 1:] = -BIG  # all beams start equal: let only the first one expand
        fin_seqs, fin_scores = seqs.clone(), torch.full((B, nb), -BIG, device=device)
        fin_done = torch.zeros(B, nb, dtype=torch.bool, device=device)
        fin_len = torch.zeros(B, nb, dtype=torch.long, device=device)
        open_ = torch.ones(B, 1, dtype=torch.bool, device=device)  # can a running beam still improve?
        top_nb = torch.arange(K, device=device) < nb
        batch_offset = torch.arange(B, device=device)[:, None] * nb
        logits = session.prefill()
        for t in range(cfg.max_new_tokens):
            cur = L0 + t
            logp = _process(logits.log_softmax(-1), seqs.view(N, L), mask, cur, t, cfg)
            V = logp.size(-1)
            logp = (logp.view(B, nb, V) + run_scores[..., None]).view(B, nb * V)
            top_lp, top_idx = torch.topk(logp, K, dim=-1)  # (B, K)
            src, tok = top_idx // V, top_idx % V
            cand = _gather_beams(seqs, src)  # (B, K, L)
            cand[:, :, cur] = tok
            last = t == cfg.max_new_tokens - 1
            hits = torch.ones_like(tok, dtype=torch.bool) if last else cfg.is_eos(tok)
            # Running beams: the best nb candidates that did not just finish.
            run_lp = top_lp + hits.float() * -BIG
            keep = torch.topk(run_lp, nb, dim=-1).indices
            seqs, run_scores, run_src = _gather_beams(cand, keep), _gather_beams(run_lp, keep), _gather_beams(src, keep)
            # Finished set: merge the candidates that just finished among the top nb.
            fin_lp = top_lp / ((t + 1) ** lp)
            fin_lp = fin_lp + (fin_done.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * -BIG
            fin_lp = fin_lp + (~open_).float() * -BIG
            fin_lp = fin_lp + (~(hits & top_nb)).float() * -BIG
            m_idx = torch.topk(torch.cat([fin_scores, fin_lp], 1), nb, dim=-1).indices
            fin_seqs = _gather_beams(torch.cat([fin_seqs, cand], 1), m_idx)
            fin_scores = _gather_beams(torch.cat([fin_scores, fin_lp], 1), m_idx)
            fin_done = _gather_beams(torch.cat([fin_done, hits & top_nb], 1), m_idx)
            fin_len = _gather_beams(torch.cat([fin_len, torch.full_like(tok, t + 1)], 1), m_idx)
            if last:
                break
            session.reorder((run_src + batch_offset).view(N))
            best_len = cfg.max_new_tokens if cfg.early_stopping == "never" and lp > 0 else t + 1
            best_running = run_scores[:, :1] / (best_len ** lp)
            worst_finished = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, -BIG)
            open_ = open_ & (best_running > worst_finished).any(dim=-1, keepdim=True)
            go_on = open_.any() & ~(fin_done.all() & (cfg.early_stopping is True)) & ~hits.all()
            if not bool(go_on):  # host sync
                break
            logits = session.step(seqs[:, :, cur].reshape(N))
        R = cfg.num_return_sequences
        lengths = fin_len[:, :R].reshape(B * R)
        T = int(lengths.max())  # host sync (once, at the end)
        tokens = fin_seqs[:, :R, L0: L0 + T].reshape(B * R, T)
        return GenerationOutput(tokens, lengths, scores=fin_scores[:, :R].reshape(B * R))
    finally:
        fast.close()
        model.train(was_training)
