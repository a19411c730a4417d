"""The llama.cpp backend's pieces that need no server: one-line errors, replica pinning, extra fields, echo probing."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter

import httpx
import pytest

from refinery.models.backends import BackendError, GenRequest, make_backend
from refinery.models.backends import llamacpp
from refinery.models.backends.http import OpenAICompatBackend


@pytest.fixture
def installed(monkeypatch):
    """Pretend llama-cpp-python is installed, so the checks after that one are reached."""
    monkeypatch.setattr(llamacpp, "missing_modules", lambda: [])


def test_missing_llama_cpp_is_one_line_naming_the_install_step(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "missing_modules", lambda: ["llama_cpp", "sse_starlette"])
    with pytest.raises(BackendError) as ei:
        make_backend({"kind": "llamacpp", "model_path": str(tmp_path / "m.gguf"), "name": "m"})
    assert str(ei.value) == ("serve: llama.cpp needs llama-cpp-python with its server extra (missing: llama_cpp, "
                             "sse_starlette): run `make install-llamacpp`")


def test_missing_model_file_is_one_line(installed, tmp_path):
    with pytest.raises(BackendError) as ei:
        make_backend({"kind": "llamacpp", "model_path": str(tmp_path / "nope.gguf"), "name": "m", "log_dir": str(tmp_path)})
    assert str(ei.value) == f"llama.cpp server: model file {tmp_path / 'nope.gguf'} not found"


def test_port_in_use_is_one_line_and_starts_nothing(installed, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = llamacpp.LlamaCppServer(model, name="m", port=port, log_dir=tmp_path)
        with pytest.raises(BackendError, match=rf"^llama.cpp server: port {port} on 127.0.0.1 is already in use: set "
                                               r"port: 0 \(a free port\) or another port$"):
            server.start()
    assert server.procs == [] and not list(tmp_path.glob("*.log"))


def test_concurrency_is_set_by_parallel():
    with pytest.raises(BackendError, match="sets concurrency from parallel"):
        llamacpp.LlamaCppBackend("m.gguf", name="m", concurrency=4)
    with pytest.raises(BackendError, match="does not take api_key_env"):
        make_backend({"kind": "llamacpp", "model_path": "m.gguf", "name": "m", "api_key_env": "K"})


def test_each_slot_keeps_to_one_replica_and_extra_fields_are_sent():
    """Two replicas, two slots: every replica sees at most one request at a time, and both are used."""
    now, peak, bodies = Counter(), Counter(), []

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = json.loads(request.content)
        bodies.append(body)
        now[host] += 1
        peak[host] = max(peak[host], now[host])
        await asyncio.sleep(0.02)
        now[host] -= 1
        return httpx.Response(200, json={"choices": [{"text": body["prompt"][::-1], "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    b = OpenAICompatBackend(["http://a.invalid:1", "http://b.invalid:2/v1"], "m", concurrency=2, check=False,
                            extra_body={"top_k": 0}, transport=httpx.MockTransport(handler))
    out = b.generate([GenRequest(prompt=f"p{i}", max_new_tokens=2) for i in range(10)])
    b.close()
    assert [r.text for r in out] == [f"p{i}"[::-1] for i in range(10)]
    assert b.base_urls == ("http://a.invalid:1/v1", "http://b.invalid:2/v1")
    assert dict(peak) == {"a.invalid": 1, "b.invalid": 1}
    assert all(body["top_k"] == 0 and body["seed"] == 0 for body in bodies)


def test_echo_probe_switches_to_one_token_when_zero_means_no_limit():
    """llama-cpp-python reads max_tokens=0 as 'up to the context size': seen once, then 1 is sent."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["max_tokens"])
        p = body["prompt"]
        lp = {"tokens": ["A", " b", " z"], "token_logprobs": [None, -1.0, -9.0], "text_offset": [0, 1, len(p)]}
        return httpx.Response(200, json={"choices": [{"text": p + " z", "logprobs": lp}],
                                         "usage": {"prompt_tokens": 2, "completion_tokens": 7}})

    b = OpenAICompatBackend("http://a.invalid:1", "m", check=False, transport=httpx.MockTransport(handler))
    assert b.loglikelihood(["A", "A", "A"], [" b", " b", " b"]) == [(-1.0, 1)] * 3
    assert seen == [0, 1, 1]
    known = OpenAICompatBackend("http://a.invalid:1", "m", check=False, echo_max_tokens=1,
                                transport=httpx.MockTransport(handler))
    seen.clear()
    known.loglikelihood(["A"], [" b"])
    assert seen == [1]
