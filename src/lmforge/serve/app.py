"""The HTTP layer: an OpenAI-compatible API and the playground page, as a FastAPI app.

    GET  /                     the playground (serve/static)
    GET  /health               liveness and queue depth (no key needed)
    GET  /v1/models            the models served
    POST /v1/completions       prompt(s) -> text; stream=true for server-sent events
    POST /v1/chat/completions  messages -> the assistant's reply; stream=true likewise

Chat messages are rendered with the tokenizer's chat template; a tokenizer without one
(e.g. trained from scratch) gets lmforge.generate's DEFAULT_CHAT_TEMPLATE:
"<|role|>\ncontent\n" per message, then "<|assistant|>\n" for the reply. The request's
"model" names one of the models served (as /v1/models lists them); another name is
answered 404 model_not_found, as OpenAI's API does, and a request without one goes to
the first model.

Every request is bounded before it reaches the model: the body size and the time it
takes to arrive (see http.py), the JSON (strictly typed, see schemas.py), the prompt
length and max_tokens, the number of choices, and the queue, counted in sequences
(prompts x n; 503 when full). Errors come back in OpenAI's shape {"error": {"message",
"type", "param", "code"}} with the offending field named. Generation runs on each
model's engine thread, so the event loop keeps serving; a client that disconnects
cancels its request before the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.api import LM
from lmforge.eval.arena_store import ArenaStore
from lmforge.generate.chat import chat_prompt
from lmforge.serve import protocol
from lmforge.serve.arena import Arena, Study
from lmforge.serve.backends import Backend
from lmforge.serve.engine import Done, Engine, EngineBusy, Event, Failed, GenerationRequest, Piece, collect
from lmforge.serve.http import APIError, read_json, validate
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest
from lmforge.serve.study import load_study

log = logging.getLogger(__name__)

STATIC = resources.files("lmforge.serve") / "static"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask, and on the queue.

    max_tokens: new tokens per choice; max_prompt_tokens: tokens per prompt (the model's
    context bounds prompt + max_tokens as well); max_body_bytes: request body size;
    max_queue: sequences (prompts x n) accepted at once per model, running or waiting
    (more get 503; a request bigger than that gets 400);
    max_active: sequences running at once per model, decoded request by request in turn;
    max_n: choices per prompt; max_prompts: prompts per completion request;
    body_timeout_s: seconds a request body may take to arrive (then 408).
    """

    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    max_active: int = 64
    max_n: int = 8
    max_prompts: int = 16
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" or f.type is float:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                    raise ValueError(f"Limits.{f.name} must be a positive number of seconds, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive integer, got {value!r}")


# ---- the app ----------------------------------------------------------------------------------

class _Server:
    """What the routes share: the engine, the tokenizer, the limits, the model's name."""

    def __init__(self, engine: Engine, tokenizer: Any, limits: Limits, model_name: str) -> None:
        self.engine, self.tokenizer, self.limits, self.model_name = engine, tokenizer, limits, model_name

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]  # an empty prompt starts from BOS
        if not ids:
            raise APIError(400, f"{field} is empty (encodes to no tokens)", param=field)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered with the tokenizer's chat template (or lmforge's default one) -> ids.
        A template of the tokenizer's own places any special tokens itself (Hugging Face's
        convention), so the tokenizer adds none; the default template has none, so it does."""
        try:
            text = chat_prompt(self.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        return self.encode(text, "messages", add_special_tokens=not getattr(self.tokenizer, "chat_template", None))

    def check_prompt(self, ids: list[int], field: str) -> None:
        limit = min(self.limits.max_prompt_tokens, self.engine.max_context - 1)
        if len(ids) > limit:
            raise APIError(400, f"{field} has {len(ids)} tokens; at most {limit} are allowed", param=field,
                           code="context_length_exceeded")

    def max_tokens(self, requested: int | None, default: int, prompts: list[list[int]]) -> int:
        """max_tokens as asked (checked against the limit and the context), or the default
        capped to what fits."""
        longest = max(map(len, prompts))
        room = self.engine.room(longest)
        if requested is None:
            return max(1, min(default, self.limits.max_tokens, room))
        if requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens: {requested} is more than this server allows "
                                f"({self.limits.max_tokens})", param="max_tokens")
        if requested > room:
            raise APIError(400, f"max_tokens: prompt ({longest} tokens) + max_tokens "
                                f"({requested}) exceeds the model's context of {self.engine.max_context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def check_choices(self, n: int, prompts: int) -> None:
        if n > self.limits.max_n:
            raise APIError(400, f"n: at most {self.limits.max_n} choices per prompt, got {n}", param="n")
        if prompts > self.limits.max_prompts:
            raise APIError(400, f"prompt: at most {self.limits.max_prompts} prompts per request, got {prompts}",
                           param="prompt")
        if n * prompts > self.engine.max_queue:
            raise APIError(400, f"n: the request asks for {n * prompts} sequences ({prompts} prompts x n={n}); "
                                f"this server takes at most {self.engine.max_queue} at once", param="n")

    async def answer(self, messages: list[dict[str, str]], options: dict[str, Any]) -> AsyncIterator[str]:
        """A chat reply's text, piece by piece (the arena's view of a local model); options:
        max_tokens (capped to the limits and the context), temperature, seed."""
        ids = await run_in_threadpool(self.encode_chat, messages)
        self.check_prompt(ids, "prompt")
        gen = GenerationRequest(prompts=[ids], max_tokens=self.max_tokens(None, options["max_tokens"], [ids]),
                                temperature=options["temperature"], seed=options.get("seed"))
        async for event in self.submit(gen)():
            if isinstance(event, Failed):
                raise _failure(event.error)
            if isinstance(event, Piece) and event.text:
                yield event.text

    def submit(self, request: GenerationRequest) -> _Events:
        try:
            return _Events(self.engine, request)
        except EngineBusy as e:
            raise APIError(503, f"server busy: {e}; retry later", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None


class _Events:
    """A submitted request's events, delivered into the event loop from the worker thread."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.handle = engine.submit(request, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event))

    async def __call__(self, request: Request | None = None) -> AsyncIterator[Event]:
        """Events up to Done or Failed. With `request`, stops early when its client has gone
        (for non-streaming responses; a stream is cancelled by the server when its client goes)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                if request is None:
                    event = await self.queue.get()
                else:
                    try:
                        event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        event = None
                    if loop.time() - checked >= DISCONNECT_POLL_S:  # events may flow without a pause
                        checked = loop.time()
                        if await request.is_disconnected():
                            return
                    if event is None:
                        continue
                yield event
                if isinstance(event, Done | Failed):
                    return
        finally:
            self.handle.cancel()  # no-op when finished; frees the slot otherwise


def _failure(error: Exception) -> APIError:
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, "generation failed (see the server log)", type="server_error")


async def _respond(events: _Events, request: Request, stream: bool, chunks: Any, body: Any) -> Any:
    """A JSON body after the whole generation, or the chunks as server-sent events."""
    if not stream:
        got = [event async for event in events(request)]
        if not got or not isinstance(got[-1], Done | Failed):
            return JSONResponse(protocol.error_body("client disconnected"), 499)
        try:
            return JSONResponse(body(collect(iter(got))))
        except Exception as e:  # noqa: BLE001 -- a failed generation is answered, never raised
            return _failure(e).response()

    async def lines() -> AsyncIterator[str]:
        async for event in events():
            if isinstance(event, Failed):
                err = _failure(event.error)
                yield protocol.sse(protocol.error_body(err.message, err.type, err.param, err.code))
                yield protocol.sse("[DONE]")
            elif isinstance(event, Done):
                for line in chunks.done(event):
                    yield line
            else:
                for line in chunks.piece(event):
                    yield line

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(models: LM | Mapping[str, LM], *, api_key: str | None = None, limits: Limits | None = None,
               model_name: str = "lmforge", backends: Sequence[Backend] = (),
               arena_db: str | os.PathLike | None = None, study: str | os.PathLike | None = None) -> FastAPI:
    """The server app for loaded LMs (anything with .model, a GPT or EncoderDecoder, and
    .tokenizer): one LM, served as `model_name`, or {served name: LM}, each with its own
    engine; the first is the default. api_key: when set, /v1/* and the arena's API require
    `Authorization: Bearer <api_key>` (an empty key is refused: it would look set and check nothing).

    arena_db: an SQLite file for the arena's ratings (see arena.py), which compares the
    local models and the `backends` (models of other OpenAI-compatible servers); study: a
    JSONL file of prompts for it (see study.py; a database that holds a study resumes it)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a real key, or none to serve without one")
    named = dict(models) if isinstance(models, Mapping) else {model_name: models}
    if not named and not backends:
        raise ValueError("no model to serve")
    limits = limits or Limits()
    served = _Served(_servers(named, limits))
    arena = _arena(served.servers, backends, arena_db, study, limits) if arena_db is not None else None

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for srv in served.servers.values():
            srv.engine.close()  # requests still running get an error; the worker thread ends
        if arena is not None:
            arena.store.close()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = served.default.engine if served.default else None
    app.state.engines = {name: srv.engine for name, srv in served.servers.items()}
    app.state.arena = arena
    app.include_router(_openai_routes(served, limits, authorize))
    if arena is not None:
        app.include_router(arena.router(authorize, lambda: FileResponse(str(STATIC / "arena.html"),
                                                                        headers=_PAGE_HEADERS), limits.body_timeout_s))
    _pages_and_errors(app, served, arena is not None)
    return app


def _servers(named: Mapping[str, LM], limits: Limits) -> dict[str, _Server]:
    """An engine per served model, its name checked."""
    servers: dict[str, _Server] = {}
    for name, lm in named.items():
        if not name or name != name.strip() or len(name) > 256:
            raise ValueError(f"served model name {name!r} must be 1 to 256 characters without surrounding spaces")
        if getattr(lm, "tokenizer", None) is None:
            raise ValueError(f"model {name!r} has no tokenizer: serving needs one (tokenizer.json beside the weights)")
        engine = Engine(lm.model, lm.tokenizer, max_active=limits.max_active, max_queue=limits.max_queue)
        servers[name] = _Server(engine, lm.tokenizer, limits, name)
    return servers


class _Served:
    """The served models by name; the first answers requests that name none."""

    def __init__(self, servers: dict[str, _Server]) -> None:
        self.servers, self.default, self.created = servers, next(iter(servers.values()), None), protocol.now()

    def pick(self, name: str | None) -> _Server:
        if name is None and self.default is not None:
            return self.default
        if name not in self.servers:
            have = (f"it serves {', '.join(f'`{n}`' for n in self.servers)}" if self.servers
                    else "it has no model of its own")
            raise APIError(404, f"The model `{name}` does not exist on this server ({have})", param="model",
                           code="model_not_found")
        return self.servers[name]


def _openai_routes(served: _Served, limits: Limits, authorize: Callable[[Request], Any]) -> APIRouter:
    """/v1/models, /v1/completions, /v1/chat/completions."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    async def body(request: Request) -> dict[str, Any]:
        return await read_json(request, limits.max_body_bytes, limits.body_timeout_s)

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(srv, served.created) for srv in served.servers.values()]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return _model_card(served.pick(model_id), served.created)

    @api.post("/completions")
    async def completions(request: Request) -> Any:
        req = validate(CompletionRequest, await body(request))
        srv = served.pick(req.model)
        srv.check_choices(req.n, len(req.prompt))
        prompts = [p if isinstance(p, list) else await run_in_threadpool(srv.encode, p, "prompt")
                   for p in req.prompt]
        for ids in prompts:
            srv.check_prompt(ids, "prompt")
        top = req.logprobs or 0
        gen = _generation_request(req, prompts, srv.max_tokens(req.max_tokens, 16, prompts), req.logprobs is not None,
                                  top)
        events = srv.submit(gen)
        chunks = protocol.CompletionChunks(srv.model_name, req.logprobs is not None, req.include_usage)
        answer = lambda result: protocol.completion_body(result, protocol.new_id("cmpl"), srv.model_name,
                                                         req.logprobs is not None)
        return await _respond(events, request, req.stream, chunks, answer)

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = validate(ChatCompletionRequest, await body(request))
        srv = served.pick(req.model)
        srv.check_choices(req.n, 1)
        ids = await run_in_threadpool(srv.encode_chat, [{"role": m.role, "content": m.text()} for m in req.messages])
        srv.check_prompt(ids, "messages")
        gen = _generation_request(req, [ids], srv.max_tokens(req.max_tokens, limits.max_tokens, [ids]),
                                  req.logprobs, req.top_logprobs or 0)
        events = srv.submit(gen)
        chunks = protocol.ChatChunks(srv.model_name, req.logprobs, req.include_usage)
        answer = lambda result: protocol.chat_body(result, protocol.new_id("chatcmpl"), srv.model_name,
                                                   req.logprobs)
        return await _respond(events, request, req.stream, chunks, answer)

    return api


def _pages_and_errors(app: FastAPI, served: _Served, arena: bool) -> None:
    """/health, the playground, static files, and every error in OpenAI's shape."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok"}
        if served.default is not None:
            out.update(model=served.default.model_name, **served.default.engine.load())
        if len(served.servers) > 1:
            out["models"] = {name: srv.engine.load() for name, srv in served.servers.items()}
        if arena:
            out["arena"] = True  # (the playground links to it)
        return out

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal server error", type="server_error").response()


# The page loads only its own files: no third-party script can run in it.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:", "X-Frame-Options": "DENY"}


def _arena(servers: dict[str, _Server], backends: Sequence[Backend], db: str | os.PathLike,
           study: str | os.PathLike | None, limits: Limits) -> Arena:
    """The arena over the local models and the backends, its ratings in `db`."""
    answerers = {name: srv.answer for name, srv in servers.items()}
    for b in backends:
        if b.name in answerers:
            raise ValueError(f"backend {b.name}: a model of that name is already served")
        answerers[b.name] = b.answer
    store = ArenaStore(db)
    try:
        loaded = None
        if study is not None:
            items, digest = load_study(study, list(answerers))
            store.load_study(items, digest)
            loaded = Study(items, digest)
        elif store.has_study():  # resume the study this database holds
            loaded = Study(store.study(), store.study_digest())
        return Arena(store, answerers, loaded, limits.max_tokens)
    except BaseException:
        store.close()
        raise


def _model_card(srv: _Server, created: int) -> dict[str, Any]:
    return {"id": srv.model_name, "object": "model", "created": created, "owned_by": "lmforge",
            "max_context": srv.engine.max_context, "max_tokens": srv.limits.max_tokens}


def _generation_request(req: Any, prompts: list[list[int]], max_tokens: int, logprobs: bool,
                        top_logprobs: int) -> GenerationRequest:
    return GenerationRequest(prompts=prompts, max_tokens=max_tokens, temperature=req.temperature,
                             top_k=req.top_k or None, top_p=req.top_p if req.top_p < 1.0 else None,
                             repetition_penalty=req.repetition_penalty, n=req.n, stop=req.stop, seed=req.seed,
                             logprobs=logprobs, top_logprobs=top_logprobs)
