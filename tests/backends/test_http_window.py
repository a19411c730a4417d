"""The continuous request window: `concurrency` requests in flight, no batch barrier, commits as results arrive."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from refinery.models.backends import GenRequest
from refinery.models.backends.http import OpenAICompatBackend
from refinery.generation.teacher import GenerationCache, Job, cache_key, run_jobs
from tests.conftest import ROOT


class Server:
    """An OpenAI-compatible chat server on 127.0.0.1 (aiohttp, in a thread) whose latency a test sets per prompt.

    It answers the prompt reversed, counts every request by prompt and tracks the peak of requests in flight.
    """

    def __init__(self, delay=lambda prompt: 0.0):
        from aiohttp import web

        self.delay, self.seen, self.now, self.peak = delay, Counter(), 0, 0
        self.lock = threading.Lock()

        async def chat(request):
            body = await request.json()
            prompt = body["messages"][-1]["content"]
            with self.lock:
                self.seen[prompt] += 1
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(self.delay(prompt))
            finally:
                with self.lock:
                    self.now -= 1
            return web.json_response({"choices": [{"message": {"content": prompt[::-1]}, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server():
    made = []

    def start(delay=lambda prompt: 0.0):
        made.append(Server(delay))
        return made[-1]

    yield start
    for s in made:
        s.close()


def chat(i: int) -> GenRequest:
    return GenRequest(messages=(("user", f"prompt {i:05d}"),), seed=i)


def test_a_slow_request_holds_up_only_its_own_slot(server):
    # given a server where prompt 0 takes 0.6 s and every other prompt 0.05 s
    srv = server(lambda p: 0.6 if p.endswith("00000") else 0.05)
    b = OpenAICompatBackend(srv.url, "m", concurrency=4, check=False)
    # when 40 requests go through the window
    t0 = time.perf_counter()
    groups = list(b.generate_stream([chat(i) for i in range(40)]))
    wall = time.perf_counter() - t0
    b.close()
    order = [i for g in groups for i, _ in g]
    # then the other 39 flowed through the 3 other slots meanwhile (a batch barrier of 4 would take >= 0.6 + 9 *
    # 0.05 s), all 40 came back once each, and no more than 4 were ever in flight
    assert sorted(order) == list(range(40)) and order.index(0) > 20
    assert wall < 1.0, wall
    assert srv.peak == 4
    assert all(r.ok and r.text == f"prompt {i:05d}"[::-1] for g in groups for i, r in g)


def test_generate_keeps_request_order_and_the_window_stays_full(server):
    srv = server(lambda p: 0.02 * (int(p[-1]) % 3))
    b = OpenAICompatBackend(srv.url, "m", concurrency=8, check=False)
    out = b.generate([chat(i) for i in range(64)])
    b.close()
    assert [r.text for r in out] == [f"prompt {i:05d}"[::-1] for i in range(64)]
    assert srv.peak == 8 and sum(srv.seen.values()) == 64


def _jobs(n: int) -> list[Job]:
    return [Job(chat(i), cache_key("srv@1", "t@1", chat(i), 0)) for i in range(n)]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from refinery.models.backends.http import OpenAICompatBackend
from refinery.generation.teacher import GenerationCache, run_jobs
from tests.backends.test_http_window import _jobs
run_jobs(_jobs({n}), OpenAICompatBackend({url!r}, "m", concurrency={c}, check=False), GenerationCache({cache!r}),
         batch_size=4, quiet=True)
"""


def test_kill_9_during_an_http_generation_repeats_at_most_the_requests_in_flight(server, tmp_path):
    # given a 400-request generation at concurrency 8, killed with SIGKILL after 150 results were committed
    n, c = 400, 8
    srv = server(lambda p: 0.01)
    cache_file = tmp_path / "c.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), n=n, url=srv.url, c=c,
                                                                      cache=str(cache_file))])
    while GenerationCache.committed(cache_file) < 150:
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # when it is run again
    resumed, stats = run_jobs(_jobs(n), OpenAICompatBackend(srv.url, "m", concurrency=c, check=False),
                              GenerationCache(cache_file), batch_size=4, quiet=True)
    # then only the requests in flight at the kill were sent twice, and the rows equal an uninterrupted run's
    repeated = sum(k - 1 for k in srv.seen.values())
    assert 0 <= repeated <= c, repeated
    assert stats.cache_hits >= 150 and stats.calls + stats.cache_hits == n
    clean, _ = run_jobs(_jobs(n), OpenAICompatBackend(srv.url, "m", concurrency=c, check=False),
                        GenerationCache(tmp_path / "clean.sqlite"), batch_size=4, quiet=True)
    assert [r.text for r in resumed] == [r.text for r in clean] == [f"prompt {i:05d}"[::-1] for i in range(n)]
    assert json.dumps(stats.summary())  # the run log's figures are plain JSON
