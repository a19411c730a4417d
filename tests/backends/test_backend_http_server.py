"""Test OpenAICompatBackend against a real OpenAI-compatible server, through a fault-injecting proxy."""

from __future__ import annotations

import logging
import time

import pytest

from refinery.models.backends import BackendError, GenRequest, make_backend
from refinery.models.backends.http import OpenAICompatBackend

from fault_proxy import free_port

# starts a real `transformers serve` process (it loads a model) before its first test
pytestmark = pytest.mark.slow

FAKE_KEY = "sk-live-DO-NOT-LEAK-9f8e7d6c5b4a"
CHAT = GenRequest(messages=(("user", "What is the capital of France? One word."),), max_new_tokens=4)
PROMPT = GenRequest(prompt="The capital of France is", max_new_tokens=4)


def backend(url: str, model: str, **kw) -> OpenAICompatBackend:
    """Build a backend with short, test-sized retry settings."""
    kw.setdefault("timeout_s", 30)
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 2)
    return OpenAICompatBackend(url + "/v1", model, **kw)


def test_real_server_chat_and_completion(openai_server, local_backend):
    b = make_backend({"kind": "openai", "base_url": openai_server.url, "model": openai_server.model, "concurrency": 2})
    assert b.revision.startswith(openai_server.model)
    chat, comp = b.generate([CHAT, PROMPT])
    assert chat.ok and comp.ok, (chat, comp, openai_server.kind)
    assert comp.text.strip().startswith("Paris")
    assert comp.prompt_tokens == 5 and 1 <= comp.completion_tokens <= 4
    assert chat.prompt_tokens > 10 and chat.completion_tokens >= 1 and chat.finish_reason in ("stop", "length")
    # Same weights, same greedy decoding: the server's completion matches the in-process backend.
    assert comp.text == local_backend.generate([PROMPT])[0].text


def test_retries_recover_from_429_500_and_drops(openai_server, fault_proxy):
    fault_proxy.set_schedule(["429", "500", "drop"])
    b = backend(fault_proxy.url, openai_server.model, check=False, backoff_max_s=2)
    t0 = time.monotonic()
    (r,) = b.generate([PROMPT])
    elapsed = time.monotonic() - t0
    assert r.ok and r.text.strip().startswith("Paris"), r
    assert [a for _, _, a in fault_proxy.log] == ["429", "500", "drop", "pass"]
    assert b.attempts == 4
    assert elapsed >= 1.0  # the 429's Retry-After: 1 was honoured


def test_timeouts_are_retried(openai_server, fault_proxy):
    fault_proxy.set_schedule(["timeout"])
    b = backend(fault_proxy.url, openai_server.model, check=False, timeout_s=2.0, max_retries=4)
    # The hold (2.5 s) outlasts the client timeout (2 s); a retry goes through. On a loaded
    # machine a real generation may time out too, so only the first action is pinned.
    (r,) = b.generate([GenRequest(prompt="1, 2, 3,", max_new_tokens=1)])
    assert r.ok, r
    actions = [a for _, _, a in fault_proxy.log]
    assert actions[0] == "timeout" and set(actions[1:]) == {"pass"}
    assert b.attempts == len(actions) >= 2


def test_exhausted_retries_are_error_results(openai_server, fault_proxy):
    fault_proxy.set_schedule([], default="503")
    b = backend(fault_proxy.url, openai_server.model, check=False, max_retries=2, concurrency=2)
    out = b.generate([PROMPT, CHAT])
    assert [r.finish_reason for r in out] == ["error", "error"]
    assert all(r.error.startswith("transport_server_error: HTTP 503") and "3 attempts" in r.error for r in out)
    assert len(fault_proxy.log) == 6
    fault_proxy.set_schedule([], default="timeout")
    b = backend(fault_proxy.url, openai_server.model, check=False, max_retries=1, timeout_s=0.5)
    (r,) = b.generate([PROMPT])
    assert r.error.startswith("transport_timeout: ") and r.text == ""


@pytest.mark.parametrize("fault", ["garbage", "nochoices", "wrongtype"])
def test_garbage_is_malformed_response(openai_server, fault_proxy, fault):
    fault_proxy.set_schedule([fault])
    b = backend(fault_proxy.url, openai_server.model, check=False, max_malformed_retries=0)
    bad, good = b.generate([CHAT, PROMPT])  # concurrency 4: either may meet the fault
    results = sorted([bad, good], key=lambda r: r.ok)
    assert results[0].finish_reason == "error" and results[0].error.startswith("malformed_response: ")
    assert results[1].ok


@pytest.mark.parametrize("fault", ["garbage", "nochoices"])
def test_garbage_is_asked_again_and_the_row_is_not_lost(openai_server, fault_proxy, fault):
    fault_proxy.set_schedule([fault, fault])
    b = backend(fault_proxy.url, openai_server.model, check=False, concurrency=1)
    (r,) = b.generate([PROMPT])
    assert r.ok and b.retries == {"malformed_response": 2}


def test_mixed_faults_under_concurrency_all_recover(openai_server, fault_proxy):
    fault_proxy.set_schedule(["500", "429", "drop", "503"])
    b = backend(fault_proxy.url, openai_server.model, check=False, concurrency=4, max_retries=4)
    reqs = [GenRequest(prompt=p, max_new_tokens=2) for p in ("A", "B", "C", "D", "E", "F")]
    out = b.generate(reqs)
    assert all(r.ok for r in out), out
    direct = backend(openai_server.url, openai_server.model, check=False, concurrency=1).generate(reqs)
    assert [r.text for r in out] == [r.text for r in direct]


def test_api_key_never_leaks(openai_server, fault_proxy, monkeypatch, caplog):
    monkeypatch.setenv("REFINERY_SERVER_TEST_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    fault_proxy.set_schedule(["429", "garbage", "500", "500"])
    b = backend(fault_proxy.url, openai_server.model, api_key_env="REFINERY_SERVER_TEST_KEY", max_retries=1, concurrency=1,
                max_malformed_retries=0)
    out = b.generate([PROMPT, PROMPT, PROMPT])
    assert [r.error.split(":")[0] if r.error else "ok" for r in out] == ["malformed_response", "transport_server_error", "ok"]
    assert fault_proxy.auth_headers and set(fault_proxy.auth_headers) == {f"Bearer {FAKE_KEY}"}
    with pytest.raises(BackendError) as ei:
        b.loglikelihood(["a"], ["b"])
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError) as ei2:
        backend(dead, "m", api_key_env="REFINERY_SERVER_TEST_KEY")
    texts = [repr(b), str(b), b.revision, repr(vars(b)), caplog.text, str(ei.value), str(ei2.value)]
    texts += [repr(r) for r in out]
    assert not [t for t in texts if FAKE_KEY in t]


def test_unreachable_url_is_one_line_backend_error():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError) as ei:
        make_backend({"kind": "openai", "base_url": dead, "model": "m"})
    msg = str(ei.value)
    assert dead in msg and "\n" not in msg and "Traceback" not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_loglikelihood_unsupported_is_clear(openai_server):
    b = backend(openai_server.url, openai_server.model)
    with pytest.raises(BackendError) as ei:
        b.loglikelihood(["The capital of France is"], [" Paris"])
    assert str(ei.value).startswith(f"loglikelihood not supported by {openai_server.url}/v1")
