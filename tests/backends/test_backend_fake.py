"""Test the request types, the fake backend and the factory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refinery.models.backends import Backend, BackendError, GenRequest, GenResult, make_backend
from refinery.models.backends.base import apply_stop, error_result
from refinery.models.backends.fake import FakeBackend


def test_genrequest_needs_exactly_one_input():
    with pytest.raises(ValueError):
        GenRequest()
    with pytest.raises(ValueError):
        GenRequest(prompt="a", messages=(("user", "b"),))
    with pytest.raises(ValueError):
        GenRequest(prompt="a", stop="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GenRequest(prompt="a", max_new_tokens=0)
    req = GenRequest(prompt="a")
    with pytest.raises(AttributeError):
        req.prompt = "b"  # type: ignore[misc]


def test_request_digest_is_stable_and_field_sensitive():
    a = GenRequest(prompt="hello", seed=1)
    assert a.digest() == GenRequest(prompt="hello", seed=1).digest()
    assert a.digest() != GenRequest(prompt="hello", seed=2).digest()
    assert a.sampling_key == GenRequest(prompt="other", seed=9).sampling_key


def test_require_text_is_keyed_only_when_set():
    import hashlib
    import json

    plain, strict = GenRequest(prompt="hello", seed=1), GenRequest(prompt="hello", seed=1, require_text=True)
    # requests written before the field existed keep their digest (so their cached teacher calls stay valid)
    old = {"messages": None, "prompt": "hello", "max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0,
           "stop": [], "seed": 1}
    assert plain.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert strict.digest() != plain.digest() and strict.sampling_key != plain.sampling_key


def test_apply_stop_cuts_at_earliest():
    assert apply_stop("abc STOP def END", ("END", "STOP")) == ("abc ", True)
    assert apply_stop("abc", ("x",)) == ("abc", False)
    assert apply_stop("abc", ()) == ("abc", False)


def test_apply_stop_with_a_required_marker_counts_stop_strings_only_after_it():
    text = "Why?\n\nAnswer: Because.\n\nPassage: more"
    assert apply_stop(text, ("\n\n",), "Answer:") == ("Why?\n\nAnswer: Because.", True)
    assert apply_stop("Why?\n\nPassage: x", ("\n\n",), "Answer:") == ("Why?\n\nPassage: x", False)


def test_require_is_keyed_only_when_set():
    plain, required = GenRequest(prompt="hello", seed=1), GenRequest(prompt="hello", seed=1, require="Answer:")
    assert "require" not in plain.as_dict() and required.as_dict()["require"] == "Answer:"
    assert required.digest() != plain.digest() and required.sampling_key != plain.sampling_key


def test_error_result_is_one_line():
    r = error_result("malformed_response", "line1\nline2\tx")
    assert r.error == "malformed_response: line1 line2 x"
    assert r.finish_reason == "error" and r.text == "" and not r.ok


def test_fake_is_deterministic_and_seed_sensitive():
    fb = FakeBackend()
    reqs = [GenRequest(prompt="p", seed=s, max_new_tokens=8) for s in (1, 2, 1)]
    out = fb.generate(reqs)
    assert out[0] == out[2]
    assert out[0].text != out[1].text
    assert FakeBackend().generate(reqs) == out  # across instances too
    assert all(r.finish_reason == "length" and r.completion_tokens == 8 for r in out)
    assert isinstance(fb, Backend)


def test_fake_canned_responses_stop_and_length():
    fb = FakeBackend(responses={"q": "one two three four five", "hi": "hello there"})
    r_len, r_stop, r_chat = fb.generate(
        [
            GenRequest(prompt="q", max_new_tokens=3),
            GenRequest(prompt="q", stop=(" four",)),
            GenRequest(messages=(("system", "s"), ("user", "hi"))),
        ]
    )
    assert (r_len.text, r_len.finish_reason, r_len.completion_tokens) == ("one two three", "length", 3)
    assert (r_stop.text, r_stop.finish_reason) == ("one two three", "stop")
    assert (r_chat.text, r_chat.finish_reason, r_chat.prompt_tokens) == ("hello there", "stop", 2)


def test_fake_failure_injection():
    fb = FakeBackend(fail={"bad": "transport_timeout: injected"}, fail_every=3)
    out = fb.generate([GenRequest(prompt=p) for p in ("a", "bad", "c", "d")])
    assert [r.finish_reason == "error" for r in out] == [False, True, True, False]
    assert out[1].error == "transport_timeout: injected"
    assert out[2].error == "transport_fake: injected failure"
    assert out[0].ok and out[3].ok
    assert len(fb.calls) == 4


def test_fake_responder_and_loglikelihood():
    fb = FakeBackend(responder=lambda r: (r.prompt or "").upper())
    assert fb.generate([GenRequest(prompt="abc")])[0].text == "ABC"
    ll = fb.loglikelihood(["ctx", "ctx"], ["a b", "c"])
    assert ll == fb.loglikelihood(["ctx", "ctx"], ["a b", "c"])
    assert [n for _, n in ll] == [2, 1] and all(s < 0 for s, _ in ll)
    with pytest.raises(BackendError):
        fb.loglikelihood(["a"], [])


def test_factory_fake_and_errors():
    fb = make_backend({"kind": "fake", "model_id": "m", "responses": {"x": "y"}})
    assert isinstance(fb, FakeBackend) and fb.model_id == "m"
    assert fb.generate([GenRequest(prompt="x")])[0] == GenResult("y", "stop", 1, 1, 0.0)
    for spec, needle in [
        ({"kind": "gpt9"}, "unknown backend kind 'gpt9'"),
        ({}, "needs a 'kind'"),
        ({"kind": "local"}, "needs path"),
        ({"kind": "openai", "base_url": "http://127.0.0.1:1"}, "needs model"),
        ({"kind": "fake", "bogus": 1}, "does not take bogus"),
    ]:
        with pytest.raises(BackendError) as ei:
            make_backend(spec)
        assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_importing_backends_is_light():
    code = (
        "import sys, refinery.models.backends as b; "
        "b.make_backend({'kind': 'fake'}); "
        "print(sorted(m for m in ('torch', 'transformers', 'httpx', 'tenacity') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
