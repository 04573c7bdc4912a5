"""Shared fixtures of the server tests: a byte-level BPE tokenizer trained on a few hundred
lines of the bundled corpus, a random-init tiny GPT over its vocabulary, the app around
them, a real uvicorn server on a free loopback port, and headless Chromium (Debian's
package, driven by Playwright) for the pages."""

from __future__ import annotations

import importlib.resources
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from lmforge.api import LM
from lmforge.cli import main
from lmforge.models import build, preset
from lmforge.serve import Limits, create_app
from lmforge.tokenizer import Tokenizer, train_tokenizer

UNICODE_LINE = "héllo wörld ünïcode ☃ 日本語 🙂"


def make_tokenizer(vocab_size: int = 320) -> Tokenizer:
    lines = (importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text().splitlines()
    return train_tokenizer(texts=lines[:2000] + [UNICODE_LINE] * 5, kind="bpe", vocab_size=vocab_size)


def tiny_gpt(vocab_size: int, seed: int = 0, max_seq_len: int = 128) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = preset("gpt-tiny", vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                    max_seq_len=max_seq_len)
    return build(config).eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="session")
def lm(tokenizer: Tokenizer) -> LM:
    return LM(tiny_gpt(tokenizer.vocab_size), tokenizer)


class LiveServer:
    """A uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def live(lm: LM) -> Iterator[LiveServer]:
    app = create_app(lm, model_name="tiny", limits=Limits(max_queue=64, max_active=4))
    with LiveServer(app) as server:
        yield server


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/install-browser.sh installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def no_serving(monkeypatch):
    """Fails a test that gets as far as running a server, instead of serving forever."""
    def refuse(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)
    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.fixture(scope="module")
def model_dir(lm, tmp_path_factory):
    return lm.save(tmp_path_factory.mktemp("served") / "model")


def serve_cli(capsys, *argv) -> tuple[int, str]:
    """`lmforge serve ARGV` in-process: (exit status, stderr)."""
    try:
        main(["serve", *argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, port: int, timeout: float = 60, log: Path | None = None) -> str:
    """The URL of a `lmforge serve` subprocess once /health answers; it is killed (and its
    log's tail shown) when it exits or `timeout` seconds pass first."""
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "/health", timeout=1)
            return url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("the server did not start" + (f": {log.read_text()[-2000:]}" if log else "")
                                     ) from None
            time.sleep(0.1)
