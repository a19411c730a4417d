"""Test the OpenAI-compatible backend's parsing, retry and secrecy logic against in-memory transports."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from refinery.models.backends import BackendError, GenRequest, make_backend
from refinery.models.backends.http import (
    OpenAICompatBackend,
    _Malformed,
    normalize_base_url,
    parse_echo_logprobs,
    parse_generation,
    parse_retry_after,
)

FAKE_KEY = "sk-test-SECRET-0123456789abcdef"
URL = "http://api.invalid:9/v1"


def chat_body(text="hi", finish="stop"):
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }


def make(handler, *, sleeps=None, **kw):
    """Build a backend over a MockTransport; waits are recorded in ``sleeps`` instead of slept."""
    sleeps = [] if sleeps is None else sleeps
    kw.setdefault("backoff_initial_s", 0.5)
    kw.setdefault("backoff_max_s", 20)
    return OpenAICompatBackend(URL, "m", transport=httpx.MockTransport(handler), sleep=sleeps.append, check=False, **kw)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)


def test_normalize_base_url():
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(BackendError):
        normalize_base_url("h:8000")


def test_parse_generation_ok_and_malformed():
    assert parse_generation(chat_body("x", "length"), chat=True) == ("x", "length", 3, 2)
    comp = {"choices": [{"text": "y", "finish_reason": "stop"}]}
    assert parse_generation(comp, chat=False) == ("y", "stop", 0, 0)
    bad = [
        [],
        {"object": "x"},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"message": {"content": 5}}]},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": None}}]},
        {"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": "3"}},
        {"error": {"message": "overloaded"}},
    ]
    for b in bad:
        with pytest.raises(_Malformed):
            parse_generation(b, chat=True)
    with pytest.raises(_Malformed):
        parse_generation({"choices": [{"text": 1}]}, chat=False)


def test_parse_echo_logprobs():
    body = {
        "choices": [
            {
                "text": "The cat",
                "logprobs": {"tokens": ["The", " cat"], "token_logprobs": [None, -1.5], "text_offset": [0, 3]},
            }
        ]
    }
    assert parse_echo_logprobs(body, 3) == (-1.5, 1)
    assert parse_echo_logprobs({"choices": [{"text": "x"}]}, 0) is None
    assert parse_echo_logprobs({"choices": [{"logprobs": {"tokens": ["a"]}}]}, 0) is None


def test_chat_and_completion_payloads():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body))
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json=chat_body("hello STOP more"))
        return httpx.Response(200, json={"choices": [{"text": " world", "finish_reason": "length"}]})

    b = make(handler)
    r_chat, r_comp = b.generate(
        [
            GenRequest(messages=(("user", "hi"),), stop=("STOP",), seed=7, max_new_tokens=5),
            GenRequest(prompt="hello", temperature=0.7, top_p=0.9),
        ]
    )
    assert (r_chat.text, r_chat.finish_reason, r_chat.prompt_tokens, r_chat.completion_tokens) == ("hello ", "stop", 3, 2)
    assert (r_comp.text, r_comp.finish_reason) == (" world", "length")
    paths = dict(seen)
    assert paths["/v1/chat/completions"]["messages"] == [{"role": "user", "content": "hi"}]
    assert paths["/v1/chat/completions"]["stop"] == ["STOP"] and paths["/v1/chat/completions"]["seed"] == 7
    assert paths["/v1/completions"] == {
        "model": "m", "prompt": "hello", "max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "seed": 0,
    }  # fmt: skip


def test_retry_after_is_honoured_then_recovers():
    calls = iter([429, 503, 200])
    sleeps: list[float] = []

    def handler(request):
        code = next(calls)
        if code == 429:
            return httpx.Response(429, headers={"Retry-After": "3"}, json={"error": "slow down"})
        if code == 503:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=chat_body())

    b = make(handler, sleeps=sleeps)
    (r,) = b.generate([GenRequest(messages=(("user", "x"),))])
    assert r.ok and r.text == "hi"
    assert b.attempts == 3
    assert sleeps[0] == 3.0  # Retry-After
    assert 1.0 <= sleeps[1] <= 1.5  # 0.5 * 2 + jitter in [0, 0.5]


def test_retry_after_is_capped_by_backoff_max():
    calls = iter([429, 200])
    sleeps: list[float] = []
    b = make(
        lambda r: httpx.Response(429, headers={"Retry-After": "3600"}) if next(calls) == 429 else httpx.Response(200, json=chat_body()),
        sleeps=sleeps,
        backoff_max_s=2,
    )
    assert b.generate([GenRequest(messages=(("user", "x"),))])[0].ok
    assert sleeps == [2]


def test_backoff_grows_with_jitter_and_exhaustion_is_an_error_result():
    sleeps: list[float] = []
    b = make(lambda r: httpx.Response(500, text="boom"), sleeps=sleeps, max_retries=4, backoff_initial_s=0.5, backoff_max_s=3)
    (r,) = b.generate([GenRequest(prompt="x")])
    assert r.finish_reason == "error" and r.text == ""
    assert r.error.startswith("transport_server_error: HTTP 500") and "5 attempts" in r.error
    assert b.attempts == 5 and len(sleeps) == 4
    for i, s in enumerate(sleeps):
        base = 0.5 * 2**i
        assert min(base, 3) <= s <= min(base + 0.5, 3)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ReadTimeout("read timed out"), "transport_timeout"),
        (httpx.ConnectTimeout("connect timed out"), "transport_timeout"),
        (httpx.ConnectError("refused"), "transport_connection"),
        (httpx.RemoteProtocolError("peer closed"), "transport_connection"),
    ],
)
def test_transport_errors_are_retried_then_reported(exc, kind):
    n = {"calls": 0}

    def handler(request):
        n["calls"] += 1
        raise exc

    b = make(handler, max_retries=2)
    (r,) = b.generate([GenRequest(prompt="x")])
    assert r.error.split(":")[0] == kind
    assert n["calls"] == 3


def test_client_errors_are_not_retried():
    b = make(lambda r: httpx.Response(400, json={"error": {"message": "bad max_tokens"}}))
    (r,) = b.generate([GenRequest(prompt="x")])
    assert r.error.startswith("http_400:") and "bad max_tokens" in r.error
    assert b.attempts == 1


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, content=b"\xff\xfe\x00garbage"),
        httpx.Response(200, json={"id": 1}),
        httpx.Response(200, json={"choices": [{"message": {"content": ["a"]}}]}),
        httpx.Response(200, json="just a string"),
    ],
)
def test_malformed_bodies_give_error_results(response):
    b = make(lambda r: response)
    (r,) = b.generate([GenRequest(messages=(("user", "x"),))])
    assert r.finish_reason == "error" and r.error.startswith("malformed_response: ")
    assert "\n" not in r.error and "(after 3 attempts)" in r.error
    assert b.retries == {"malformed_response": 2} and b.attempts == 3


def test_a_malformed_reply_is_asked_again_within_the_run():
    # given a server whose first two replies are an HTML page and an empty choices list
    replies = iter([httpx.Response(200, text="<html>proxy error</html>"), httpx.Response(200, json={"choices": []}),
                    httpx.Response(200, json=chat_body("fine"))])
    b = make(lambda r: next(replies))
    # when one request is sent, then the third reply is the row's, and the retries are counted
    (r,) = b.generate([GenRequest(messages=(("user", "x"),))])
    assert r.ok and r.text == "fine"
    assert b.retries == {"malformed_response": 2}


def test_malformed_retries_are_bounded_by_their_own_setting():
    calls = []
    b = make(lambda r: calls.append(1) or httpx.Response(200, text="nope"), max_malformed_retries=0)
    (r,) = b.generate([GenRequest(prompt="x")])
    assert r.error.startswith("malformed_response: ") and len(calls) == 1 and b.retries == {}


def test_concurrency_is_bounded_and_order_kept():
    import asyncio

    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    async def handler(request):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        with lock:
            state["now"] -= 1
        prompt = json.loads(request.content)["prompt"]
        return httpx.Response(200, json={"choices": [{"text": prompt.upper(), "finish_reason": "stop"}]})

    b = make(handler, concurrency=3)
    out = b.generate([GenRequest(prompt=f"p{i}") for i in range(12)])
    assert [r.text for r in out] == [f"P{i}" for i in range(12)]
    assert 1 < state["peak"] <= 3


def test_api_key_never_leaks(monkeypatch, caplog):
    monkeypatch.setenv("REFINERY_TEST_KEY", FAKE_KEY)
    seen_auth = []
    responses = iter(
        [
            lambda a: httpx.Response(401, text=f"bad key {a}"),
            lambda a: httpx.Response(500, text=f"echo {a}"),
            lambda a: httpx.Response(500, text=f"echo {a}"),
            lambda a: httpx.Response(200, text=f"garbage {a}"),
            lambda a: httpx.Response(200, json={"choices": [{"message": {"content": 3}}], "k": a}),
        ]
    )

    def handler(request):
        auth = request.headers.get("authorization", "")
        seen_auth.append(auth)
        return next(responses)(auth)

    caplog.set_level(logging.DEBUG)
    b = make(handler, api_key_env="REFINERY_TEST_KEY", max_retries=1, max_malformed_retries=0)
    out = b.generate([GenRequest(prompt="a")]) + b.generate([GenRequest(prompt="b")])
    out += b.generate([GenRequest(prompt="c")]) + b.generate([GenRequest(messages=(("user", "d"),))])
    assert seen_auth and all(a == f"Bearer {FAKE_KEY}" for a in seen_auth)  # it is sent...
    assert [r.error.split(":")[0] for r in out] == [
        "http_401", "transport_server_error", "malformed_response", "malformed_response",
    ]  # fmt: skip
    # ...but shows nowhere else.
    texts = [repr(b), str(b), b.revision, repr(vars(b)), caplog.text, *(r.error for r in out), *map(repr, out)]
    assert not [t for t in texts if FAKE_KEY in t]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(b._key)


def test_missing_key_env_is_a_backend_error(monkeypatch):
    monkeypatch.delenv("REFINERY_NO_SUCH_KEY", raising=False)
    with pytest.raises(BackendError, match="REFINERY_NO_SUCH_KEY"):
        OpenAICompatBackend(URL, "m", api_key_env="REFINERY_NO_SUCH_KEY", check=False)


def test_check_reports_server_model_or_configured():
    listing = {"data": [{"id": "org/m", "object": "model"}, {"id": "other"}]}
    b = OpenAICompatBackend(URL, "m", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=listing)))
    assert b.revision == "org/m"
    b = OpenAICompatBackend(URL, "m", transport=httpx.MockTransport(lambda r: httpx.Response(500, text="no")))
    assert b.revision == "m"


def test_check_unreachable_is_one_line_naming_url(monkeypatch):
    monkeypatch.setenv("REFINERY_TEST_KEY", FAKE_KEY)

    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with pytest.raises(BackendError) as ei:
        OpenAICompatBackend(URL, "m", api_key_env="REFINERY_TEST_KEY", transport=httpx.MockTransport(refuse))
    msg = str(ei.value)
    assert URL in msg and "\n" not in msg and FAKE_KEY not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_loglikelihood_via_echo_and_unsupported():
    def echo(request):
        body = json.loads(request.content)
        assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 0
        lp = {"tokens": ["A", " b", " c"], "token_logprobs": [None, -1.0, -2.0], "text_offset": [0, 1, 3]}
        return httpx.Response(200, json={"choices": [{"text": body["prompt"], "logprobs": lp}]})

    b = make(echo)
    assert b.loglikelihood(["A", "A b"], [" b c", " c"]) == [(-3.0, 2), (-2.0, 1)]
    plain = make(lambda r: httpx.Response(200, json={"choices": [{"text": "x", "finish_reason": "stop"}]}))
    with pytest.raises(BackendError, match=r"loglikelihood not supported by http://api\.invalid:9/v1"):
        plain.loglikelihood(["a"], ["b"])
    rejecting = make(lambda r: httpx.Response(422, json={"detail": "echo unsupported"}))
    with pytest.raises(BackendError, match="loglikelihood not supported"):
        rejecting.loglikelihood(["a"], ["b"])


def test_factory_builds_openai_backend_lazily_checked():
    b = make_backend({"kind": "openai", "base_url": "http://127.0.0.1:1", "model": "m", "check": False})
    assert isinstance(b, OpenAICompatBackend) and b.base_url == "http://127.0.0.1:1/v1" and b.revision == "m"


def test_loglikelihood_falls_back_to_max_tokens_1():
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body["max_tokens"])
        if body["max_tokens"] == 0:
            return httpx.Response(500, text="max_new_tokens must be greater than 0")
        p = body["prompt"]  # echo 'A', ' b', then one generated token past the prompt
        lp = {"tokens": ["A", " b", " z"], "token_logprobs": [None, -1.0, -9.0], "text_offset": [0, 1, len(p)]}
        return httpx.Response(200, json={"choices": [{"text": p + " z", "logprobs": lp}]})

    sleeps: list[float] = []
    b = make(handler, sleeps=sleeps)
    assert b.loglikelihood(["A", "A"], [" b", " b"]) == [(-1.0, 1), (-1.0, 1)]
    assert seen == [0, 1, 1] and sleeps == []  # the max_tokens=0 probe is not retried
    assert b.loglikelihood(["A"], [" b"]) == [(-1.0, 1)] and seen[-1] == 1


@pytest.mark.parametrize("status", [400, 200])
def test_no_partial_key_survives_truncation(monkeypatch, status):
    monkeypatch.setenv("REFINERY_TEST_KEY", FAKE_KEY)
    for pad in (60, 75, 190, 290):  # put the key across each cut point
        body = "x" * pad + FAKE_KEY + " tail"
        b = make(lambda r: httpx.Response(status, text=body), api_key_env="REFINERY_TEST_KEY")
        (r,) = b.generate([GenRequest(prompt="p")])
        assert r.finish_reason == "error"
        assert FAKE_KEY[:8] not in r.error, (pad, r.error)
