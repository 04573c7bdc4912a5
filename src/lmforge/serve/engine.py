"""The model side of the server: one worker thread that runs every generation.

    HTTP handlers --submit(request, sink)--> waiting line of requests --admit--> running prompts
                                                                      |  one decode step each,
    sink(Piece) ... sink(Done) <-- detokenize, stop strings, top-k <--+  request by request in turn

Why one thread and no cross-request batching: lmforge.generate decodes a batch under
one GenerationConfig and one random generator, so requests with their own temperature,
top-k/top-p and seed cannot share a batch without changing what each would produce
alone; and a batched matmul rounds differently from an unbatched one, which can flip a
greedy argmax. Here every prompt keeps its own KV cache and generator (`iter_generate`
over its n rows), so a request returns exactly what it returns alone, whatever else is
running.

Work is counted in sequences: a request of P prompts with n choices each is P x n
sequences. `max_queue` bounds the sequences accepted (running or waiting; more raise
EngineBusy), `max_active` the sequences running at once (their KV caches). Scheduling
is fair across requests, not across prompts: each request runs one prompt at a time,
and the worker advances every running request by one step in turn, so a request of 16
prompts x n=8 gets the same share of the worker as a 5-token request, and the 5-token
request's first token waits one round, not for the big one to finish. A request whose
prompt ends goes to the back of the waiting line if others wait, so a full
`max_active` rotates between requests at prompt boundaries; `max_active=1` runs one
prompt at a time, first in, first out. A cancelled request (a client that went away)
is dropped before its next step.

Only this module touches the model; the HTTP layer sees GenerationRequest in and
Piece / Done / Failed events out.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.generate import GenerationConfig, iter_generate
from lmforge.generate.detokenize import INCOMPLETE, Detokenizer, Piece, TokenInfo, token_bytes
from lmforge.generate.text import end_ids
from lmforge.models.encdec import EncoderDecoder
from lmforge.models.gpt import GPT

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """The queue is full: the request was not accepted (HTTP 503)."""


@dataclass
class GenerationRequest:
    """One request: prompts (token ids, each non-empty), n completions of each.

    temperature 0 is greedy. top_logprobs = k also reports, for every generated token,
    the k most likely tokens under the model's unprocessed distribution (temperature,
    top-k/top-p and penalties are not applied to reported log-probs).
    """

    prompts: list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Done:
    """The request finished: token counts for `usage`."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """Generation raised: the request ends with this error."""

    error: Exception


Event = Piece | Done | Failed


@dataclass
class Choice:
    """One finished choice: its text, the tokens that made it, and why it ended."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: str


@dataclass
class GenerationResult:
    """A whole request: choices in index order, and the token counts for `usage`."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


class _Job:
    """A submitted request: its prompts, run one at a time, and where its events go."""

    def __init__(self, request: GenerationRequest, sink: Callable[[Event], None]) -> None:
        self.request, self.sink = request, sink
        self.cancelled = False
        self.failed = False
        self.finished = False  # Done, Failed or cancelled: nothing more happens to it
        self.next_prompt = 0  # prompts started so far
        self.remaining = len(request.prompts) * request.n  # sequences not finished (they count in the queue)
        self.completion_tokens = 0


class _Sequence:
    """One prompt of a job (its n rows), decoded by its own iter_generate (own KV cache, own generator)."""

    def __init__(self, job: _Job, prompt_index: int, steps: Iterator, rows: list[Detokenizer]) -> None:
        self.job, self.prompt_index, self.steps, self.rows = job, prompt_index, steps, rows


class Handle:
    """What submit returns: cancel() stops the request before its next decoding step."""

    def __init__(self, engine: Engine, job: _Job) -> None:
        self._engine, self._job = engine, job

    def cancel(self) -> None:
        self._engine._cancel(self._job)


class Engine:
    """Runs generation requests of a GPT or EncoderDecoder on one worker thread.

    model: a GPT or EncoderDecoder (eval mode); tokenizer: encode/decode, eos_id, pad_id.
    max_active: sequences (prompts x n) running at once, their KV caches held; a request
    runs one prompt at a time, requests take steps in turn (1 = first in, first out);
    max_queue: sequences accepted at once (running or waiting) before submit raises EngineBusy.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_active: int = 64, max_queue: int = 256) -> None:
        if not isinstance(model, GPT | EncoderDecoder):
            raise ValueError(f"serving needs a GPT or EncoderDecoder model, got {type(model).__name__}")
        if max_active < 1 or max_queue < 1:
            raise ValueError(f"max_active and max_queue must be >= 1, got {max_active} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_active, self.max_queue = max_active, max_queue
        self.device = next(model.parameters()).device
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()  # requests with a prompt to start, in turn
        self._running: list[_Sequence] = []  # at most one per request
        self._jobs = 0  # requests accepted and not finished
        self._sequences = 0  # their sequences not finished
        self._closed = False
        self._thread: threading.Thread | None = None
        self._token_strings: dict[int, str] = {}
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "tokens": 0, "peak_running": 0}

    @property
    def max_context(self) -> int:
        """Longest prompt + new tokens the model takes."""
        return self.model.config.max_seq_len

    def room(self, prompt_tokens: int) -> int:
        """Most new tokens a prompt of this length leaves room for."""
        if isinstance(self.model, EncoderDecoder):  # the decoder has its own positions
            return self.max_context
        return self.max_context - prompt_tokens

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _running_sequences(self) -> int:
        return sum(s.job.request.n for s in self._running)

    def load(self) -> dict[str, int]:
        """Sequences waiting, running and accepted, and requests accepted (for /health and the tests)."""
        with self._cond:
            running = self._running_sequences()
            return {"queued": self._sequences - running, "running": running, "accepted": self._sequences,
                    "requests": self._jobs}

    # ---- submitting -------------------------------------------------------------------------

    def config_for(self, request: GenerationRequest) -> GenerationConfig:
        """The GenerationConfig of a request (raises ValueError naming a bad field)."""
        tok = self.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
        return GenerationConfig(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                top_k=request.top_k or None, top_p=request.top_p,
                                repetition_penalty=request.repetition_penalty, num_return_sequences=request.n,
                                eos_token_id=end_ids(tok) or None, pad_token_id=pad,
                                logprobs=request.logprobs or request.top_logprobs > 0,
                                top_logprobs=request.top_logprobs)

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Handle:
        """Queue a request; `sink` receives its events from the worker thread.

        Raises ValueError for a request the model cannot run (or bigger than the whole
        queue), EngineBusy when the queue has no room for its sequences now."""
        self.config_for(request)
        if not request.prompts or any(not p for p in request.prompts):
            raise ValueError("every prompt needs at least one token")
        for p in request.prompts:
            if len(p) > self.max_context or request.max_tokens > self.room(len(p)):
                raise ValueError(f"prompt ({len(p)} tokens) + max_tokens ({request.max_tokens}) do not fit the "
                                 f"model's context of {self.max_context} tokens")
            if max(p) >= self.vocab_size or min(p) < 0:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        job = _Job(request, sink)
        if job.remaining > self.max_queue:
            raise ValueError(f"n: the request asks for {job.remaining} sequences ({len(request.prompts)} prompts x "
                             f"n={request.n}); this server takes at most {self.max_queue} at once")
        with self._cond:
            if self._closed:
                raise EngineBusy("the engine is shut down")
            if self._sequences + job.remaining > self.max_queue:
                raise EngineBusy(f"{self._sequences} sequences are queued or running and this request adds "
                                 f"{job.remaining} (limit {self.max_queue})")
            self._jobs += 1
            self._sequences += job.remaining
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return Handle(self, job)

    def _cancel(self, job: _Job) -> None:
        with self._cond:
            if job.cancelled or job.finished or job.failed:
                return
            job.cancelled = True
            if job in self._waiting:  # no prompt running: free its place now
                self._waiting.remove(job)
                self._finish(job, "cancelled")

    def _finish(self, job: _Job, outcome: str) -> None:
        """Account for a job that is over (the lock is held)."""
        job.finished = True
        self._jobs -= 1
        self._sequences -= job.remaining
        job.remaining = 0
        self.stats[outcome] += 1

    def close(self) -> None:
        """Stop the worker thread; requests still queued or running are dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- blocking helpers (the Python API and the tests) -------------------------------------

    def stream(self, request: GenerationRequest) -> Iterator[Piece]:
        """Pieces of a request as they are produced (blocking); closing the iterator cancels it."""
        events: queue.Queue[Event] = queue.Queue()
        handle = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Done):
                    return
                yield event
        finally:
            handle.cancel()

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to the end (blocking)."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(request, events.put)
        return collect(iter(events.get, None))

    # ---- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._running and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    dropped = {id(s.job): s.job for s in self._running} | {id(j): j for j in self._waiting}
                    self._running.clear()
                    self._waiting.clear()
                    break
                self._admit()
                running = list(self._running)
            for seq in running:  # one round: every running request advances one step
                self._advance(seq)
        for job in dropped.values():
            self._emit(job, Failed(EngineBusy("the server is shutting down")))

    def _admit(self) -> None:
        """Start the next prompt of waiting requests, in turn, while their sequences fit in
        max_active (one always runs, however many rows it has). The lock is held."""
        rows = self._running_sequences()
        while self._waiting:
            n = self._waiting[0].request.n
            if self._running and rows + n > self.max_active:
                break
            self._start(self._waiting.popleft())
            rows += n
        self.stats["peak_running"] = max(self.stats["peak_running"], rows)

    def _start(self, job: _Job) -> None:
        req, p = job.request, job.next_prompt
        job.next_prompt += 1
        cfg = self.config_for(req)
        generator = None if req.seed is None else torch.Generator(self.device).manual_seed(req.seed)
        input_ids = torch.tensor([req.prompts[p]], dtype=torch.long, device=self.device)
        steps = iter_generate(self.model, input_ids, torch.ones_like(input_ids), cfg, generator=generator)
        rows = [Detokenizer(p * req.n + j, self.tokenizer, end_ids(self.tokenizer), req.stop) for j in range(req.n)]
        self._running.append(_Sequence(job, p, steps, rows))

    def _advance(self, seq: _Sequence) -> None:
        """One decoding step of one prompt, its events sent; drops it when it ends."""
        job = seq.job
        if job.cancelled or job.failed:
            self._drop(seq, None)
            return
        try:
            step = next(seq.steps, None)
            pieces = self._pieces(seq, step)
        except Exception as e:  # a failing request must not stop the worker
            log.exception("generation failed")
            job.failed = True
            self._drop(seq, e)
            return
        for piece in pieces:
            self._emit(job, piece)
        if all(row.finish_reason for row in seq.rows):
            self._drop(seq, None)

    def _pieces(self, seq: _Sequence, step) -> list[Piece]:
        if step is None:  # max_tokens reached (or every row ended in EOS)
            return [row.finish("length") for row in seq.rows if not row.finish_reason]
        tokens = step.tokens.tolist()  # host sync: text is made on the host
        logprobs = step.logprobs.tolist() if step.logprobs is not None else [None] * len(tokens)
        top_ids = step.top_ids.tolist() if step.top_ids is not None else [[]] * len(tokens)
        top_lps = step.top_logprobs.tolist() if step.top_logprobs is not None else [[]] * len(tokens)
        pieces = []
        for row, tok, lp, ids, lps in zip(seq.rows, tokens, logprobs, top_ids, top_lps):
            if row.finish_reason:
                continue
            top = [(i, self.token_string(i), v) for i, v in zip(ids, lps)]
            piece = row.push(TokenInfo(tok, "", lp, top))
            if piece is None and not row.finish_reason and row.count == seq.job.request.max_tokens:
                piece = row.finish("length")
            if piece is not None:
                pieces.append(piece)
        return pieces

    def _drop(self, seq: _Sequence, error: Exception | None) -> None:
        """A prompt is over (finished, cancelled or failed): free it, then queue the job's
        next prompt at the back of the line, or end the job."""
        seq.steps.close()  # frees the KV cache now
        job = seq.job
        tokens = sum(row.count for row in seq.rows)
        with self._cond:
            self._running.remove(seq)
            job.completion_tokens += tokens
            self.stats["tokens"] += tokens
            if not (job.cancelled or job.failed) and job.next_prompt < len(job.request.prompts):
                job.remaining -= job.request.n
                self._sequences -= job.request.n
                self._waiting.append(job)
                return
            self._finish(job, "failed" if job.failed else "cancelled" if job.cancelled else "completed")
        if error is not None:
            self._emit(job, Failed(error))
        elif not job.cancelled:
            self._emit(job, Done(sum(map(len, job.request.prompts)), job.completion_tokens))

    def _emit(self, job: _Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # a receiver that is gone (e.g. its event loop closed) cancels its request
            log.warning("dropping a request whose receiver failed", exc_info=True)
            job.cancelled = True

    def token_string(self, token_id: int) -> str:
        """How one token reads on its own (special tokens included), cached. A token that is
        only part of a UTF-8 character reads "bytes:\\xe2\\x80" (OpenAI's convention) when its
        bytes can be recovered (byte-level BPE, SentencePiece byte fallback)."""
        text = self._token_strings.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = token_bytes(self.tokenizer, token_id) if INCOMPLETE in text else None
            if raw is not None:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_strings[token_id] = text
        return text


def collect(events: Iterator[Event]) -> GenerationResult:
    """Assemble a result from a request's events (up to Done; Failed raises)."""
    choices: dict[int, Choice] = {}
    for event in events:
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Done):
            return GenerationResult([choices[i] for i in sorted(choices)], event.prompt_tokens,
                                    event.completion_tokens)
        choice = choices.setdefault(event.index, Choice(event.index, "", [], ""))
        choice.text += event.text
        choice.tokens += event.tokens
        choice.finish_reason = event.finish_reason or choice.finish_reason
    raise RuntimeError("the request's events ended before it finished")
