"""Provide the backend tests' fixtures: SmolLM2 fp32 folder, local backend, real OpenAI server, fault proxy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Nothing in these tests may reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

sys.path.insert(0, str(Path(__file__).parent))
from fault_proxy import FaultProxy, free_port  # noqa: E402

THREADS = 2
SERVER_START_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def local_backend(smol_dir):
    """Return one TransformersBackend over SmolLM2, shared by the session."""
    from refinery.models.backends.local import TransformersBackend

    return TransformersBackend(str(smol_dir), batch_size=4, threads=THREADS)


def _wait_healthy(url: str, proc: subprocess.Popen | None, log_path: Path | None) -> None:
    """Poll ``url`` until it answers 200, the process dies, or SERVER_START_TIMEOUT_S passes."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            pytest.fail(f"server exited with {proc.returncode} before becoming healthy:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:  # not up yet: poll again
            last = exc
        time.sleep(0.5)
    pytest.fail(f"server at {url} not healthy after {SERVER_START_TIMEOUT_S}s (last: {last!r})")


class ServerInfo:
    """Where the OpenAI-compatible test server listens and what it is."""

    def __init__(self, url: str, model: str, kind: str) -> None:
        self.url = url  # without /v1
        self.model = model
        self.kind = kind  # 'transformers-serve' | 'stdlib-fallback'


def _serve_available() -> bool:
    """Return True when `transformers serve` can run here (fastapi, uvicorn, openai installed).

    REFINERY_TEST_MINI_SERVER=1 forces the stdlib fallback server.
    """
    from transformers.utils.import_utils import is_serve_available

    if os.environ.get("REFINERY_TEST_MINI_SERVER") == "1":
        return False

    return bool(is_serve_available()) and shutil.which("transformers", path=str(Path(sys.executable).parent)) is not None


@pytest.fixture(scope="session")
def openai_server(smol_dir, tmp_path_factory, request):
    """Start a real OpenAI-compatible server for SmolLM2 on 127.0.0.1 and stop it after the session.

    Uses `transformers serve <folder>` when its serving extras are installed; otherwise a small
    stdlib server that wraps TransformersBackend and speaks the same JSON (see _MiniServer).
    """
    if not _serve_available():
        server = _MiniServer(request.getfixturevalue("local_backend"))
        try:
            _wait_healthy(server.url + "/health", None, None)
            yield ServerInfo(server.url, server.model, "stdlib-fallback")
        finally:
            server.close()
        return
    port = free_port()
    home = tmp_path_factory.mktemp("hf_home")
    (home / "hub").mkdir()
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log_path = home / "serve.log"
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    cmd = [
        exe, "serve", str(smol_dir), "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log_path)
        yield ServerInfo(f"http://127.0.0.1:{port}", str(smol_dir), "transformers-serve")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="session")
def _proxy_session(openai_server):
    proxy = FaultProxy(openai_server.url, retry_after="1", timeout_sleep_s=2.5)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def fault_proxy(_proxy_session):
    """Return the session's fault proxy with an empty schedule (everything passes)."""
    _proxy_session.set_schedule([])
    yield _proxy_session
    _proxy_session.set_schedule([])


class _MiniServer:
    """A stdlib OpenAI-compatible server over TransformersBackend (fallback when `transformers serve` is unavailable).

    Speaks /health, /v1/models, /v1/chat/completions and /v1/completions; like `transformers serve`
    it ignores echo/logprobs. Requests are served one at a time (model under a lock).
    """

    def __init__(self, backend) -> None:
        from refinery.models.backends.base import GenRequest

        model_dir = backend.model_id
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                return

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": model_dir, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                chat = self.path == "/v1/chat/completions"
                if not chat and self.path != "/v1/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                kw = dict(
                    max_new_tokens=int(body.get("max_tokens") or 16),
                    temperature=float(body.get("temperature") or 0.0),
                    top_p=float(body.get("top_p") or 1.0),
                    stop=tuple(body.get("stop") or ()),
                    seed=int(body.get("seed") or 0),
                )
                if chat:
                    req = GenRequest(messages=tuple((m["role"], m["content"]) for m in body["messages"]), **kw)
                else:
                    req = GenRequest(prompt=body["prompt"], **kw)
                with lock:
                    res = backend.generate([req])[0]
                choice = {"index": 0, "finish_reason": res.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": res.text}
                else:
                    choice["text"] = res.text
                usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}
                self._send(200, {"id": "mini", "model": model_dir, "choices": [choice], "usage": usage})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.model = model_dir

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
