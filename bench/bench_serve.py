"""Serving throughput and latency: `lmforge serve` under concurrent load on loopback.

    python bench/bench_serve.py                                   # gpt-tiny, random init, CPU
    python bench/bench_serve.py --model runs/quickstart/model --new-tokens 64 --concurrency 1 4 16 32

The server runs in its own process (uvicorn, as `lmforge serve` runs it), so the load
generator does not share its interpreter. For each --max-active setting (sequences the
engine decodes in turn; 1 = first in, first out) and each --concurrency C, C clients
send --requests requests in total, back to back, over keep-alive connections: fixed
prompts (8, rotating), --new-tokens new tokens, greedy, non-streaming -- latency is
the whole request; then the same streamed, for the time to the first token (TTFT).
Requests/s and tokens/s count only the non-streaming pass. Peer row: the same requests
through `generate_text` in one process, one after another, with no server. A server per
--max-active setting runs throughout; the rows run interleaved, --rounds times in
rotating order, so that load from other processes on a shared machine hits every row
alike: req/s and tokens/s are medians over rounds, latency percentiles pool all rounds.

Without --model the model is a randomly initialised gpt-tiny (dim 128, 4 layers) over
a byte-level BPE of 4096 tokens trained on the bundled corpus (weights do not change
the speed; a random model rarely emits EOS, so almost every request produces exactly
--new-tokens tokens; usage says how many were produced); --size quickstart builds the
quickstart's CPU model instead (dim 192, 4 layers, vocab 2048, context 128).

--mixed measures fairness instead: --big requests of 16 prompts x n=8 (sampled,
--big-tokens new tokens each) are sent at once, then --shorts streamed requests of 5
new tokens arrive one every --interval seconds while the big ones run (open loop: each
is sent on time whatever the others are doing). Reported: the shorts' time to first
token (p50, p99, max, pooled over rounds) and the wall time of the big requests, per
round. The server runs with its default --max-active and a queue large enough to
accept everything (--max-queue 4096), so the scheduler, not the limit, decides.

    python bench/bench_serve.py --mixed --size quickstart
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import lmforge
from lmforge.api import LM, load
from lmforge.generate import generate_text
from lmforge.models import build, count_params, preset
from lmforge.quickstart import CPU as QUICKSTART
from lmforge.tokenizer import train_tokenizer

PROMPTS = [
    "ROMEO: What light through yonder window breaks?",
    "First Citizen: Before we proceed any further, hear me speak.",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "HAMLET: To be, or not to be, that is the question:",
    "KING RICHARD III: Now is the winter of our discontent",
    "MACBETH: Is this a dagger which I see before me,",
    "PORTIA: The quality of mercy is not strain'd,",
    "PROSPERO: We are such stuff as dreams are made on,",
]


SIZES = {"tiny": dict(vocab_size=4096, max_seq_len=256),  # gpt-tiny as it is
         "quickstart": dict(vocab_size=QUICKSTART.vocab_size, dim=QUICKSTART.dim, n_layers=QUICKSTART.n_layers,
                            n_heads=QUICKSTART.n_heads, max_seq_len=QUICKSTART.seq_len)}


def make_model(out: Path, size: str = "tiny") -> Path:
    corpus = (importlib.resources.files("lmforge") / "corpus" / "tinyshakespeare.txt").read_text().splitlines()
    shape = SIZES[size]
    tok = train_tokenizer(texts=corpus, kind="bpe", vocab_size=shape["vocab_size"])
    torch.manual_seed(0)
    model = build(preset("gpt-tiny", **{**shape, "vocab_size": tok.vocab_size})).eval()
    return LM(model, tok).save(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_active: int | None, threads: int,
                 max_queue: int = 256) -> subprocess.Popen:
    active = "" if max_active is None else f"max_active={max_active}, "
    code = (f"import torch; torch.set_num_threads({threads}); from lmforge.serve import serve; "
            f"serve({str(model_dir)!r}, port={port}, {active}max_queue={max_queue}, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one(http: httpx.AsyncClient, i: int, new_tokens: int, stream: bool) -> tuple[float, int]:
    """(seconds to the whole answer -- or to the first token when streaming --, tokens produced)."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    start = time.perf_counter()
    if not stream:
        r = await http.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]
    first = None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    return first, 0


async def load_test(url: str, concurrency: int, requests: int, new_tokens: int, stream: bool) -> dict:
    """C clients sending `requests` requests in total: wall time, tokens, per-request seconds."""
    counter = iter(range(requests))
    results: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client() -> None:
            for i in counter:
                results.append(await one(http, i, new_tokens, stream))

        await one(http, 0, 2, False)  # connection and server warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall": wall, "tokens": sum(n for _, n in results), "times": [t for t, _ in results]}


def peer(lm: LM, requests: int, new_tokens: int) -> dict:
    """The same requests through generate_text, one after another, in this process."""
    generate_text(lm.model, lm.tokenizer, PROMPTS[0], max_new_tokens=2)
    times = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        generate_text(lm.model, lm.tokenizer, PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens)
        times.append(time.perf_counter() - t)
    return {"wall": time.perf_counter() - start, "tokens": requests * new_tokens, "times": times}


async def big_request(http: httpx.AsyncClient, i: int, new_tokens: int) -> float:
    """One request of 16 prompts x n=8, sampled (seeded): seconds to the whole answer."""
    prompts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(16)]
    body = {"prompt": prompts, "n": 8, "max_tokens": new_tokens, "temperature": 0.8, "seed": i}
    start = time.perf_counter()
    r = await http.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - start


async def mixed_load(url: str, big: int, big_tokens: int, shorts: int, interval: float) -> dict:
    """`big` big requests at once, then `shorts` streamed 5-token requests, one every
    `interval` seconds (open loop): the shorts' times to first token, the bigs' wall time."""
    limits = httpx.Limits(max_connections=big + shorts + 2, max_keepalive_connections=big + shorts + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one(http, 0, 2, False)  # connection and server warm-up
        start = time.perf_counter()
        bigs = [asyncio.create_task(big_request(http, i, big_tokens)) for i in range(big)]
        await asyncio.sleep(interval)  # the big requests are in

        async def short(i: int) -> float:
            await asyncio.sleep(i * interval)
            return (await one(http, i, 5, True))[0]

        ttft = await asyncio.gather(*(short(i) for i in range(shorts)))
        await asyncio.gather(*bigs)
        return {"ttft": list(ttft), "big_wall": time.perf_counter() - start}


def run_mixed(args: argparse.Namespace, model_dir: Path) -> None:
    port = free_port()
    proc = start_server(model_dir, port, None, args.threads, max_queue=4096)
    try:
        rounds = [asyncio.run(mixed_load(f"http://127.0.0.1:{port}", args.big, args.big_tokens, args.shorts,
                                         args.interval)) for _ in range(args.rounds)]
    finally:
        proc.terminate()
        proc.wait(30)
    ttft = [t for r in rounds for t in r["ttft"]]
    lm = load(model_dir)
    cfg = lm.config
    print(f"# lmforge serve benchmark, mixed load, {time.strftime('%Y-%m-%d')}")
    print(f"lmforge {lmforge.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; device cpu, fp32")
    print(f"model: {model_dir if args.model else f'gpt ({args.size} size, random init)'}, "
          f"{count_params(lm.model):,} parameters (dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
          f"context {cfg.max_seq_len}); {args.rounds} rounds of {args.big} requests of 16 prompts x n=8 x "
          f"{args.big_tokens} tokens and {args.shorts} streamed 5-token requests, one every {args.interval} s\n")
    print("| short requests | p50 TTFT (ms) | p99 TTFT (ms) | max TTFT (ms) | big requests' wall time per round (s) |")
    print("|---:|---:|---:|---:|---|")
    walls = ", ".join(f"{r['big_wall']:.1f}" for r in rounds)
    print(f"| {len(ttft)} | {1e3 * percentile(ttft, 50):.0f} | {1e3 * percentile(ttft, 99):.0f} | "
          f"{1e3 * max(ttft):.0f} | {walls} |")
    print("\ncommand: python bench/bench_serve.py " + " ".join(sys.argv[1:]))


def row(name: str, clients: int, plain: list[dict], streamed: list[dict] | None) -> str:
    """A table row: req/s and tokens/s are medians over rounds; latency percentiles pool all requests."""
    req_s = statistics.median(len(r["times"]) / r["wall"] for r in plain)
    tok_s = statistics.median(r["tokens"] / r["wall"] for r in plain)
    times = [t for r in plain for t in r["times"]]
    cells = [name, str(clients), f"{req_s:.1f}", f"{tok_s:.0f}",
             *(f"{1e3 * percentile(times, q):.0f}" for q in (50, 90, 99))]
    if streamed:
        ttft = [t for r in streamed for t in r["times"]]
        cells += [f"{1e3 * percentile(ttft, 50):.0f}", f"{1e3 * percentile(ttft, 99):.0f}"]
    else:
        cells += ["–", "–"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: a random gpt-tiny built here)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-active", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=32, help="requests per row and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the rows run interleaved, in rotating order")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and the peer (1 leaves a core to the load generator on a "
                         "2-core machine; oversubscribed OpenMP threads slow everything down)")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help="the model built without --model")
    ap.add_argument("--mixed", action="store_true", help="short requests under a load of big ones (see above)")
    ap.add_argument("--big", type=int, default=6, help="--mixed: requests of 16 prompts x n=8")
    ap.add_argument("--big-tokens", type=int, default=24, help="--mixed: new tokens of each big request's choices")
    ap.add_argument("--shorts", type=int, default=20, help="--mixed: streamed 5-token requests")
    ap.add_argument("--interval", type=float, default=0.25, help="--mixed: seconds between short requests")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(Path(tmp) / "model", args.size)
        if args.mixed:
            return run_mixed(args, model_dir)
        torch.set_num_threads(args.threads)
        lm = load(model_dir)
        servers = {ma: free_port() for ma in args.max_active}
        procs = [start_server(model_dir, port, ma, args.threads) for ma, port in servers.items()]
        try:
            rows = [("peer", 1)] + [(ma, c) for ma in args.max_active for c in args.concurrency]
            plain: dict = {key: [] for key in rows}
            streamed: dict = {key: [] for key in rows}
            for r in range(args.rounds):
                for key in rows[r % len(rows):] + rows[: r % len(rows)]:
                    if key[0] == "peer":
                        plain[key].append(peer(lm, args.requests, args.new_tokens))
                        continue
                    url = f"http://127.0.0.1:{servers[key[0]]}"
                    plain[key].append(asyncio.run(load_test(url, key[1], args.requests, args.new_tokens, False)))
                    streamed[key].append(asyncio.run(load_test(url, key[1], args.requests, args.new_tokens, True)))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)

        cfg = lm.config
        print(f"# lmforge serve benchmark, {time.strftime('%Y-%m-%d')}")
        print(f"lmforge {lmforge.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}; device cpu, fp32")
        print(f"model: {model_dir if args.model else 'gpt-tiny (random init)'}, {count_params(lm.model):,} "
              f"parameters (dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}); {args.rounds} rounds x "
              f"{args.requests} requests per row, {args.new_tokens} new tokens, greedy\n")
        print("| server | clients | req/s | tokens/s | p50 latency (ms) | p90 (ms) | p99 (ms) "
              "| p50 TTFT, streamed (ms) | p99 TTFT (ms) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in rows:
            name = "peer: generate_text, no server" if key[0] == "peer" else f"serve, max_active={key[0]}"
            print(row(name, key[1], plain[key], streamed[key]))
        print("\ncommand: python bench/bench_serve.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
