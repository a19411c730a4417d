"""Benchmark the HTTP teacher path: the stage-level window (stream_jobs + cache) against a bare aiohttp client.

Usage: python bench/bench_http_teacher.py [--requests 10000] [--concurrency 32 128 256] [--kill]

A mock OpenAI-compatible server runs in its own process on 127.0.0.1 with a lognormal latency per request
(mean 0.40 s, p99 1.9 s; the same latency for the same prompt, so both clients meet the same server). For
each concurrency it prints requests/s of the stage path (``refinery.generation.stream.stream_jobs`` over
``OpenAICompatBackend`` and the SQLite cache, as generate runs it), of a bare aiohttp client with a semaphore,
the ideal ``concurrency / mean latency``, the schedule bound (a client with no overhead on the server's exact
latencies: the ideal less the drain, the last requests ending one by one), and the ratios. ``--kill`` also
SIGKILLs a generation of ``--requests`` rows halfway and counts the requests the rerun sent again. Prints
figures; asserts nothing.
Run it alone: other load on the 2 cores is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import inspect
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MU, SIGMA = -1.2455, 0.8114  # lognormal: mean exp(MU + SIGMA^2 / 2) = 0.40 s, p99 exp(MU + 2.326 SIGMA) = 1.9 s

SERVER = r'''
import asyncio, hashlib, math, sys
from collections import Counter
from aiohttp import web
MU, SIGMA = {mu}, {sigma}
seen = Counter()
{reply}

{latency}

async def answer(prompt, seed):
    seen[prompt] += 1
    delay = latency(prompt) * {scale}
    if delay > 0:
        await asyncio.sleep(delay)
    text = reply(prompt, seed)
    return text, {{"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}}

async def chat(request):
    body = await request.json()
    text, usage = await answer(body["messages"][-1]["content"], body.get("seed"))
    return web.json_response({{"choices": [{{"message": {{"content": text}}, "finish_reason": "stop"}}],
                              "usage": usage}})

async def complete(request):
    body = await request.json()
    text, usage = await answer(body["prompt"], body.get("seed"))
    return web.json_response({{"choices": [{{"text": text, "finish_reason": "stop"}}], "usage": usage}})

async def stats(request):
    mine = [v for k, v in seen.items() if k.startswith(request.query.get("prefix", ""))]
    return web.json_response({{"requests": sum(mine), "repeated": sum(v - 1 for v in mine)}})

app = web.Application(client_max_size=16 * 2**20)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_post("/v1/completions", complete)
app.router.add_get("/stats", stats)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, backlog=4096)
'''
def latency(prompt: str) -> float:
    """The mock server's latency for ``prompt`` (seconds, before its scale): lognormal, drawn from the prompt's hash."""
    h = hashlib.sha256(prompt.encode()).digest()
    u1, u2 = (int.from_bytes(h[:8], "big") + 1) / 2**64, int.from_bytes(h[8:16], "big") / 2**64
    z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    return math.exp(MU + SIGMA * z)


def schedule_rate(prompts: list[str], concurrency: int) -> float:
    """Requests/s of a client with no overhead at all: each of ``concurrency`` slots sends the next prompt the
    moment its last one ends, on the server's exact latencies. What no client can beat: the ideal
    ``concurrency / mean latency`` leaves out the drain, the last requests finishing one by one."""
    slots = [0.0] * concurrency
    end = 0.0
    for p in prompts:
        t = heapq.heappop(slots) + latency(p)
        end = max(end, t)
        heapq.heappush(slots, t)
    return len(prompts) / end


# The default reply: a fixed question-and-answer (this benchmark measures the client, not parsing).
FIXED_REPLY = '''
def reply(prompt, seed):
    return "Q: x?\\nAnswer: y."
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(scale: float = 1.0, reply: str = FIXED_REPLY, port: int = 0) -> tuple[subprocess.Popen, str]:
    """Start the mock server in its own process; return it and its base URL.

    Args:
        scale: factor on every latency (0: answer at once).
        reply: Python source defining ``reply(prompt, seed) -> str``, the completion text (and chat content).
        port: the port to listen on (0: a free one).
    """
    port = port or free_port()
    code = SERVER.format(mu=MU, sigma=SIGMA, scale=scale, reply=reply, latency=inspect.getsource(latency))
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/v1"


def requests(n: int, tag: str):
    from refinery.models.backends import GenRequest

    return [GenRequest(messages=(("user", f"{tag} prompt {i:06d}"),), seed=i, max_new_tokens=16) for i in range(n)]


def stage_path(url: str, n: int, concurrency: int, tag: str, cache: Path) -> tuple[float, float]:
    """Wall seconds and client CPU seconds of the HTTP backend's window through the SQLite cache, as generate runs
    it: ``stream_jobs`` reading the calls as the window needs them, results handed over in plan order by blocks."""
    from types import SimpleNamespace

    from refinery.generation.stream import stream_jobs
    from refinery.models.backends.http import OpenAICompatBackend
    from refinery.generation.teacher import GenerationCache, Job, cache_key

    calls = [SimpleNamespace(job=Job(r, cache_key("mock@1", "t@1", r, 0))) for r in requests(n, tag)]
    backend = OpenAICompatBackend(url, "mock", concurrency=concurrency, check=False, timeout_s=60)
    store = GenerationCache(cache)
    handed: list[int] = []  # good results per block

    def sink(block: list, results: list) -> None:
        handed.append(sum(r.ok for r in results))

    t0, c0 = time.perf_counter(), time.process_time()
    stats = stream_jobs(iter(calls), backend, store, sink=sink, batch_size=8, quiet=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    store.close()
    backend.close()
    assert stats.errors == 0 and sum(handed) == n, stats
    return wall, cpu


def bare_client(url: str, n: int, concurrency: int, tag: str) -> tuple[float, float]:
    """Wall and CPU seconds of a bare aiohttp client with a semaphore (no retries, no cache, no parsing)."""
    import aiohttp

    payloads = [{"model": "mock", "messages": [{"role": "user", "content": r.messages[0][1]}], "max_tokens": 16}
                for r in requests(n, tag)]

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            async def one(p):
                async with sem, s.post(url + "/chat/completions", json=p) as r:
                    await r.json()
            await asyncio.gather(*(one(p) for p in payloads))

    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(main())
    return time.perf_counter() - t0, time.process_time() - c0


KILLED = """
import sys
sys.path.insert(0, {root!r})
sys.argv = ["x"]
from bench.bench_http_teacher import stage_path
stage_path({url!r}, {n}, {c}, "kill", __import__("pathlib").Path({cache!r}))
"""


def kill_and_resume(url: str, n: int, concurrency: int, tmp: Path) -> None:
    import json
    import urllib.request

    cache = tmp / "kill.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(root=str(ROOT), url=url, n=n, c=concurrency,
                                                                 cache=str(cache))])
    from refinery.generation.teacher import GenerationCache

    committed = 0
    while committed < n // 2 and proc.poll() is None:
        time.sleep(0.05)
        committed = GenerationCache.committed(cache)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage_path(url, n, concurrency, "kill", cache)
    stats = json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/stats?prefix=kill").read())
    print(f"kill -9 after {committed} of {n} committed (concurrency {concurrency}): the rerun sent "
          f"{stats['repeated']} requests again (at most {concurrency} expected)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--kill", action="store_true", help="also kill -9 a generation halfway and resume it")
    args = ap.parse_args()
    mean = math.exp(MU + SIGMA ** 2 / 2)
    print(f"mock server: lognormal latency, mean {mean:.3f} s, p99 {math.exp(MU + 2.326 * SIGMA):.2f} s; "
          f"{args.requests} requests per run; 2 cores shared by server and client")
    print(f"{'concurrency':>11} {'ideal':>8} {'schedule':>8} {'stage':>8} {'bare':>8} {'stage/ideal':>11} "
          f"{'sched/ideal':>11} {'stage/sched':>11} {'stage/bare':>10} {'stage CPU ms/req':>16} "
          f"{'bare CPU ms/req':>15}")
    server, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.concurrency:
                ideal = c / mean
                sched = schedule_rate([r.messages[0][1] for r in requests(args.requests, f"s{c}")], c)
                sw, sc = stage_path(url, args.requests, c, f"s{c}", Path(tmp) / f"s{c}.sqlite")
                bw, bc = bare_client(url, args.requests, c, f"s{c}")  # same prompts, same latencies
                s_rate, b_rate = args.requests / sw, args.requests / bw
                print(f"{c:>11} {ideal:>8.1f} {sched:>8.1f} {s_rate:>8.1f} {b_rate:>8.1f} {s_rate / ideal:>11.3f} "
                      f"{sched / ideal:>11.3f} {s_rate / sched:>11.3f} {s_rate / b_rate:>10.3f} "
                      f"{1000 * sc / args.requests:>16.3f} "
                      f"{1000 * bc / args.requests:>15.3f}")
            if args.kill:
                kill_and_resume(url, args.requests, max(args.concurrency), Path(tmp))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
