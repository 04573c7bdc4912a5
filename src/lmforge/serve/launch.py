"""What `lmforge serve` does: check its options, listen, load the models, run uvicorn.

With two models or more (local --model ones and --backend ones, models of other
OpenAI-compatible servers) the server also runs the arena (serve/arena.py) at /arena,
its ratings in --arena-db (default arena.db in the working directory).

Everything a user can get wrong is checked before the models load, and raises
ValueError with one line (the CLI prints it and exits with status 2): the port
(0..65535), the host, an address already in use, an empty API key, served names that
collide. The listening socket is bound first and handed to uvicorn, so "address in
use" is found in a second, not after loading a model, and the port cannot be taken in
between.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from lmforge.api import load
from lmforge.serve.app import Limits, create_app
from lmforge.serve.backends import Backend
from lmforge.serve.study import load_study

log = logging.getLogger(__name__)


def served_names(model_dirs: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                 adapters: Sequence[str | os.PathLike | None] = ()) -> list[str]:
    """The name each model is served under: the given ones, or the last part of what the
    user passed (a directory's name; for a Hugging Face Hub id "org/name", "name"). A model
    with an adapter is named after the adapter's directory (its run's, when that directory
    is a run's adapter/)."""
    if names:
        if len(names) != len(model_dirs):
            raise ValueError(f"{len(names)} served model names for {len(model_dirs)} models: give one per --model")
        chosen = list(names)
    else:
        chosen = [_last_part(a if a is not None else d)
                  for d, a in zip(model_dirs, list(adapters) + [None] * (len(model_dirs) - len(adapters)))]
    for name in chosen:
        if not name or name != name.strip() or len(name) > 256:
            raise ValueError(f"served model name {name!r} must be 1 to 256 characters without surrounding spaces")
    seen: dict[str, str] = {}
    for name, d in zip(chosen, model_dirs):
        if name in seen:
            raise ValueError(f"two models would be served as {name!r} ({seen[name]} and {d}): name them with "
                             "--served-model-name")
        seen[name] = str(d)
    return chosen


def _last_part(path: str | os.PathLike) -> str:
    p = Path(path)
    name = p.name or p.resolve().name
    return p.resolve().parent.name if name == "adapter" and (p / "adapter_config.json").is_file() else name


def adapters_for(model_dirs: Sequence[str | os.PathLike], adapters: Sequence[str | None]) -> list[str | None]:
    """--adapter options -> one adapter (or None) per model: one per --model in order
    ("none" for a model served without one), or a single one with a single model."""
    if not adapters:
        return [None] * len(model_dirs)
    if len(adapters) != len(model_dirs):
        raise ValueError(f"{len(adapters)} --adapter for {len(model_dirs)} --model: give one per --model, "
                         "'none' for a model served as it is")
    out: list[str | None] = []
    for a in adapters:
        if a is None or str(a).lower() == "none":
            out.append(None)
        elif not (Path(a) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {a}: not a PEFT adapter directory (no adapter_config.json)")
        else:
            out.append(str(a))
    return out


def _pairs(specs: Sequence[str], flag: str, what: str) -> dict[str, str]:
    """NAME=VALUE options -> {NAME: VALUE}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{flag} {spec!r}: expected NAME={what}")
        if name in out:
            raise ValueError(f"{flag}: {name!r} is given twice")
        out[name] = value
    return out


def connect_backends(specs: Sequence[str], key_specs: Sequence[str] = ()) -> list[Backend]:
    """--backend NAME=URL and --backend-key NAME=KEY options -> backends that answered."""
    urls, keys = _pairs(specs, "--backend", "URL"), _pairs(key_specs, "--backend-key", "KEY")
    for name in keys:
        if name not in urls:
            raise ValueError(f"--backend-key {name}: there is no --backend {name}=URL")
    return [Backend.connect(name, url, keys.get(name)) for name, url in urls.items()]


def api_key_from(api_key: str | None) -> str | None:
    """The key given, else LMFORGE_API_KEY; an empty one (flag or variable) is refused, since
    it would look like a key was set while checking nothing."""
    source = "--api-key"
    if api_key is None and "LMFORGE_API_KEY" in os.environ:
        api_key, source = os.environ["LMFORGE_API_KEY"], "LMFORGE_API_KEY"
    if api_key is not None and not api_key.strip():
        raise ValueError(f"{source} is empty: give a real key, or leave it unset to serve without one")
    return api_key


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening): ValueError for a port outside
    0..65535, a host that does not resolve, or an address in use."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"host {host!r} is not an address this machine can listen on: {e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model_dirs: str | os.PathLike | Sequence[str | os.PathLike], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, *, served_model_names: Sequence[str] | None = None, max_tokens: int = 512,
          max_prompt_tokens: int = 2048, max_body_bytes: int = 1 << 20, max_queue: int = 256, max_active: int = 64,
          body_timeout_s: float = 30.0, device: str | None = None, dtype: str | None = None,
          quantize: str | None = None, backends: Sequence[str] = (), backend_keys: Sequence[str] = (),
          arena_db: str | os.PathLike | None = None, study: str | os.PathLike | None = None,
          adapters: Sequence[str | None] = (), log_level: str = "info") -> None:
    """Load model directories (lmforge or Hugging Face, with their tokenizers) and serve
    them until interrupted. Binds to loopback by default; api_key (or the LMFORGE_API_KEY
    environment variable) makes /v1/* require `Authorization: Bearer <key>`.

    backends: "NAME=URL" models of other OpenAI-compatible servers, for the arena, with
    keys as "NAME=KEY" in backend_keys; arena_db: where the arena keeps its ratings
    (default arena.db when two models or more are served); study: a JSONL file of prompts
    for it (serve/study.py); adapters: a PEFT LoRA adapter directory per model (None for
    none), merged into its model on load, the model served under the adapter's name.
    dtype, quantize: as lmforge.load (e.g. "bfloat16", "int8"): every request decodes in them."""
    dirs = [model_dirs] if isinstance(model_dirs, str | os.PathLike) else list(model_dirs or [])
    per_model = adapters_for(dirs, adapters)
    names = served_names(dirs, served_model_names, per_model) if dirs else []
    api_key = api_key_from(api_key)
    limits = Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                    max_queue=max_queue, max_active=max_active, body_timeout_s=body_timeout_s)
    sock = listen(host, port)
    try:
        remote = connect_backends(backends, backend_keys)
        total = len(dirs) + len(remote)
        if not dirs and total < 2:
            raise ValueError("give a model to serve (--model DIR), or two --backend NAME=URL for an arena")
        if (arena_db is not None or study is not None) and total < 2:
            raise ValueError("the arena compares models: serve two or more (--model, --backend)")
        if total >= 2 and arena_db is None:
            arena_db = "arena.db"
        if study is not None:
            load_study(study, names + [b.name for b in remote])  # its mistakes, before the models load
        app = create_app({name: load(d, device=device, dtype=dtype, quantize=quantize, adapter=a)
                          for name, d, a in zip(names, dirs, per_model)},
                         api_key=api_key, limits=limits, backends=remote, arena_db=arena_db, study=study)
        if api_key is None and not _is_loopback(host):
            log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                               timeout_graceful_shutdown=5))
        bound = sock.getsockname()
        url = f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
        say = logging.getLogger("uvicorn.error").info
        if app.state.arena is not None:
            study_size = len(app.state.arena.study.items) if app.state.arena.study else 0
            say("arena at %s/arena comparing %s; ratings in %s%s", url, ", ".join(app.state.arena.answerers),
                arena_db, f" (a study of {study_size} items)" if study_size else "")
        say("serving %s on %s (Press CTRL+C to quit)", ", ".join(names) or "no local model", url)
        server.run(sockets=[sock])
    finally:
        sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
