"""Forward HTTP to a loopback upstream while injecting faults on a configurable schedule."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACTIONS = ("pass", "429", "500", "503", "timeout", "garbage", "nochoices", "wrongtype", "drop")


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that injects faults in front of one upstream.

    Actions, taken one per incoming request from ``schedule`` (then ``default``):
        'pass'       forward to the upstream unchanged
        '429'        answer 429 with ``Retry-After: <retry_after>``
        '500'/'503'  answer that status with a small JSON error
        'timeout'    hold the request for ``timeout_sleep_s`` seconds, then drop the connection
        'garbage'    answer 200 with a non-JSON body
        'nochoices'  answer 200 with JSON lacking 'choices'
        'wrongtype'  answer 200 with choices whose text/content is a number
        'drop'       close the connection without answering

    Loopback only; each hold is bounded (30 s at most) and interrupted by ``close()``.

    Args:
        upstream: base URL of the upstream server, e.g. 'http://127.0.0.1:8000'.
        retry_after: value of the Retry-After header sent with injected 429s (None: no header).
        timeout_sleep_s: how long a 'timeout' action holds the request (bounded to 30 s).
        upstream_timeout_s: timeout for forwarded requests.
    """

    def __init__(
        self,
        upstream: str,
        *,
        retry_after: str | None = "1",
        timeout_sleep_s: float = 2.0,
        upstream_timeout_s: float = 120.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("FaultProxy forwards to loopback upstreams only")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.retry_after = retry_after
        self.timeout_sleep_s = min(float(timeout_sleep_s), 30.0)
        self.upstream_timeout_s = upstream_timeout_s
        self.default = "pass"
        self._schedule: deque[str] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.log: list[tuple[str, str, str]] = []  # (method, path, action)
        self.forwarded: list[tuple[float, float]] = []  # (start, end) monotonic times of each forwarded request
        self.auth_headers: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # keep test output quiet
                return

            def do_GET(self):
                proxy._safe_handle(self, "GET")

            def do_POST(self):
                proxy._safe_handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Return the proxy's base URL (without /v1)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_schedule(self, actions: list[str], *, default: str = "pass") -> None:
        """Replace the fault schedule and clear the log.

        Args:
            actions: actions for the next requests, in order.
            default: action once the schedule is used up.
        """
        bad = [a for a in [*actions, default] if a not in ACTIONS]
        if bad:
            raise ValueError(f"unknown actions {bad}")
        with self._lock:
            self._schedule = deque(actions)
            self.default = default
            self.log.clear()
            self.auth_headers.clear()
            self.forwarded.clear()

    def _next(self) -> str:
        with self._lock:
            return self._schedule.popleft() if self._schedule else self.default

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None):
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _safe_handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        """Handle a request; a client that went away (e.g. after its timeout) is not an error."""
        try:
            self._handle(h, method)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        action = self._next()
        with self._lock:
            self.log.append((method, h.path, action))
            if h.headers.get("Authorization"):
                self.auth_headers.append(h.headers["Authorization"])
        if action == "429":
            extra = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            self._reply(h, 429, b'{"error": {"message": "rate limited (injected)"}}', extra)
        elif action in ("500", "503"):
            self._reply(h, int(action), b'{"error": {"message": "server error (injected)"}}')
        elif action == "timeout":
            self._stop.wait(self.timeout_sleep_s)
            h.close_connection = True
        elif action == "drop":
            h.close_connection = True
        elif action == "garbage":
            self._reply(h, 200, b"<html>\x00\xff not json at all")
        elif action == "nochoices":
            self._reply(h, 200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
        elif action == "wrongtype":
            choice = {"index": 0, "text": 42, "message": {"role": "assistant", "content": 42}, "finish_reason": "stop"}
            self._reply(h, 200, json.dumps({"id": "x", "choices": [choice]}).encode())
        else:
            start = time.monotonic()
            self._forward(h, method, body)
            with self._lock:
                self.forwarded.append((start, time.monotonic()))

    def _forward(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout_s)
        try:
            headers = {"Content-Type": h.headers.get("Content-Type", "application/json")}
            conn.request(method, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("Content-Type", "application/json")
            h.send_response(resp.status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError as exc:
            self._reply(h, 502, json.dumps({"error": {"message": f"upstream: {type(exc).__name__}"}}).encode())
        finally:
            conn.close()

    def close(self) -> None:
        """Stop serving, release held requests and close the socket."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
