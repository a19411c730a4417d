"""Talk to an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) with retries."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from refinery.models.backends.base import BackendError, GenRequest, GenResult, apply_stop, error_result

log = logging.getLogger(__name__)


class _Secret:
    """Hold a secret string that never shows in repr/str and cannot be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("secrets are not picklable")


class _Retryable(Exception):
    """A transient failure worth retrying: kind is 'rate_limited' | 'server_error' | 'timeout' | 'connection'."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


class _HTTPStatusError(Exception):
    """A non-retryable HTTP error status (4xx other than 429)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"http_{status}: {detail}")
        self.status, self.detail = status, detail


class _Malformed(Exception):
    """A response whose body does not have the OpenAI shape."""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP-date).

    Args:
        value: the header value, or None.
        now: current epoch seconds (for tests).

    Returns:
        Seconds to wait (>= 0), or None when absent or unparseable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(secs) or math.isinf(secs):
        return None
    return max(0.0, secs)


def normalize_base_url(base_url: str) -> str:
    """Return the base URL ending in '/v1' without a trailing slash ('http://h:8000' -> 'http://h:8000/v1').

    Args:
        base_url: the server URL, with or without '/v1'.

    Returns:
        The normalised URL.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BackendError(f"base_url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _expect(cond: bool, what: str) -> None:
    """Raise _Malformed(what) unless cond holds."""
    if not cond:
        raise _Malformed(what)


def parse_generation(body: Any, *, chat: bool) -> tuple[str, str, int, int]:
    """Extract (text, finish_reason, prompt_tokens, completion_tokens) from a decoded JSON response.

    Args:
        body: the decoded JSON body.
        chat: True for /chat/completions (``message.content``), False for /completions (``text``).

    Returns:
        The text, 'stop' or 'length', and the usage counts (0 when the server gives none).

    Raises:
        _Malformed: when the body does not have the expected shape or types.
    """
    _expect(isinstance(body, dict), f"body is {type(body).__name__}, not an object")
    if "error" in body and "choices" not in body:
        err = body["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise _Malformed(f"server error object: {msg}")
    choices = body.get("choices")
    _expect(isinstance(choices, list) and len(choices) > 0, "missing or empty 'choices'")
    choice = choices[0]
    _expect(isinstance(choice, dict), "choices[0] is not an object")
    if chat:
        msg = choice.get("message")
        _expect(isinstance(msg, dict), "choices[0].message is not an object")
        text = msg.get("content")
        _expect(isinstance(text, str), f"choices[0].message.content is {type(text).__name__}, not a string")
    else:
        text = choice.get("text")
        _expect(isinstance(text, str), f"choices[0].text is {type(text).__name__}, not a string")
    fr = choice.get("finish_reason")
    _expect(fr is None or isinstance(fr, str), "choices[0].finish_reason is not a string")
    reason = "length" if fr == "length" else "stop"
    usage = body.get("usage") or {}
    _expect(isinstance(usage, dict), "'usage' is not an object")
    counts = []
    for k in ("prompt_tokens", "completion_tokens"):
        v = usage.get(k, 0)
        _expect(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"usage.{k} is not a count")
        counts.append(v)
    return text, reason, counts[0], counts[1]


def parse_echo_logprobs(body: Any, context_chars: int, end_chars: int | None = None) -> tuple[float, int] | None:
    """Sum the echoed token log-probs that start in [context_chars, end_chars) (the continuation).

    Args:
        body: decoded /completions response made with echo=True, logprobs=1.
        context_chars: length of the context string; tokens from this offset on are scored.
        end_chars: length of context + continuation; tokens from here on were generated, not echoed.

    Returns:
        (sum of log-probs, token count), or None when the server returned no usable logprobs.
    """
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        return None
    lp = body["choices"][0].get("logprobs") if isinstance(body["choices"][0], dict) else None
    if not isinstance(lp, dict):
        return None
    toks, tlps, offs = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
    if not (isinstance(toks, list) and isinstance(tlps, list) and isinstance(offs, list)):
        return None
    if not (len(toks) == len(tlps) == len(offs)):
        return None
    total, n = 0.0, 0
    for off, val in zip(offs, tlps, strict=True):
        if not isinstance(off, int) or off < context_chars or (end_chars is not None and off >= end_chars):
            continue
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            return None
        total += float(val)
        n += 1
    return total, n


class OpenAICompatBackend:
    """A Backend over an OpenAI-compatible server.

    Messages go to /chat/completions, prompts to /completions. Retries (tenacity): HTTP 429,
    HTTP 5xx, timeouts and connection errors are retried up to ``max_retries`` times with
    exponential backoff (backoff_initial_s * 2**k) plus up to backoff_initial_s of random jitter;
    a Retry-After header, when present, sets the wait instead. Every single wait is capped at
    ``backoff_max_s``. Malformed replies (not JSON, not the OpenAI shape) are asked again up to
    ``max_malformed_retries`` times. Other 4xx answers are not retried. ``generate`` never raises: failures come
    back as error results with a stable reason: 'transport_<rate_limited|server_error|timeout|
    connection|other>', 'http_<status>', 'malformed_response'. The API key is read only from the
    environment variable named by ``api_key_env``, held in a ``_Secret`` (repr '***', not
    picklable), sent only in the Authorization header and scrubbed from every message.
    ``revision`` is the model name the server lists at /models (when it lists one matching the
    configured model, or exactly one), else the configured model.

    Several base URLs name replicas of one model (e.g. llama.cpp server processes that each serve one request at
    a time): slot ``k`` of the window always talks to replica ``k % len(base_url)``, so with ``concurrency`` equal
    to the replicas' total capacity no replica ever queues a request behind another.

    Args:
        base_url: server URL, e.g. 'http://127.0.0.1:8000/v1' ('/v1' is added when missing), or a sequence of
            replica URLs serving the same model.
        model: model name sent with each request.
        api_key_env: name of the environment variable holding the API key (None: no key).
        concurrency: requests in flight at once.
        timeout_s: HTTP timeout per attempt (connect, and each read/write, as httpx applies it).
        max_retries: retries after the first attempt for transient failures.
        max_malformed_retries: retries of a request whose reply is malformed.
        backoff_initial_s: first backoff wait (doubles each retry, plus up to this much jitter).
        backoff_max_s: cap on any single wait, Retry-After included.
        check: probe the server at construction (raises BackendError when unreachable).
        extra_body: server-specific fields added to every generation and scoring payload (e.g. llama.cpp's
            ``top_k: 0`` so that sampling means what temperature and top_p say); None: none.
        echo_max_tokens: max_tokens of the echo requests ``loglikelihood`` sends, when known for this server
            (1 for llama-cpp-python, which reads 0 as 'no limit'); None: probe 0 first, then fall back to 1.
        transport: optional httpx transport (tests).
        sleep: optional sleep function used between retries (tests).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 60,
        max_retries: int = 5,
        max_malformed_retries: int = 2,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 20,
        check: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        echo_max_tokens: int | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise BackendError("OpenAICompatBackend needs at least one base_url")
        self.base_urls = tuple(normalize_base_url(u) for u in urls)
        self.base_url = self.base_urls[0]
        self.extra_body = dict(extra_body or {})
        self.model_id = model
        self.model = model
        if concurrency < 1 or max_retries < 0 or max_malformed_retries < 0 or timeout_s <= 0 \
                or backoff_initial_s < 0 or backoff_max_s < 0:
            raise BackendError(
                "invalid OpenAICompatBackend settings: need concurrency >= 1, max_retries >= 0, "
                "max_malformed_retries >= 0, timeout_s > 0, backoffs >= 0"
            )
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.max_malformed_retries = int(max_malformed_retries)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.api_key_env = api_key_env
        self._key: _Secret | None = None
        if api_key_env:
            value = os.environ.get(api_key_env)
            if not value:
                raise BackendError(f"environment variable {api_key_env} (API key for {self.base_url}) is not set")
            self._key = _Secret(value)
        self._sleep = sleep  # None: real sleeps (time.sleep for the sync calls, asyncio.sleep for generation)
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._async: Any = None
        self._jitter = wait_exponential_jitter(
            multiplier=self.backoff_initial_s, max=self.backoff_max_s, jitter=self.backoff_initial_s
        )
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            transport=transport,
            follow_redirects=False,
        )
        self._lock = threading.Lock()
        self._ll_max_tokens: int | None = echo_max_tokens  # max_tokens that works for echo scoring, once known
        self.attempts = 0  # HTTP attempts made, retries included (for tests and logs)
        self.retries: dict[str, int] = {}  # retries by reason, e.g. {'malformed_response': 2} (the run log)
        self.revision = self.model
        if check:
            self.revision = self.check()

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def close(self) -> None:
        """Close the HTTP connection pools and stop the generation loop."""
        self._client.close()
        loop, self._loop = self._loop, None
        if loop is not None:
            if self._async is not None:
                closer = self._async.aclose() if isinstance(self._async, httpx.AsyncClient) else self._async.close()
                asyncio.run_coroutine_threadsafe(closer, loop).result(timeout=10)
                self._async = None
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)
            loop.close()

    def __enter__(self) -> OpenAICompatBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- helpers -----

    def _scrub(self, text: object) -> str:
        """Remove the API key from a message, collapse it to one line and cap it at 300 characters."""
        text = " ".join(str(text).split())
        if self._key is not None and self._key.get():
            text = text.replace(self._key.get(), "***")
        return text[:300]

    def _headers(self) -> dict[str, str]:
        """Return request headers (Authorization only when a key is configured)."""
        h = {"Accept": "application/json"}
        if self._key is not None:
            h["Authorization"] = "Bearer " + self._key.get()
        return h

    def _wait(self, state: RetryCallState) -> float:
        """Return the wait before the next attempt: Retry-After when given, else jittered backoff; capped."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.backoff_max_s)
        return min(self._jitter(state), self.backoff_max_s)

    def _attempt(self, method: str, path: str, payload: dict | None, base: str | None = None) -> httpx.Response:
        """Make one HTTP attempt (to ``base``, default the first base URL), turning transient failures into
        _Retryable."""
        url = (base or self.base_url) + path
        with self._lock:
            self.attempts += 1
        try:
            resp = self._client.request(method, url, json=payload, headers=self._headers())
        except httpx.TimeoutException as exc:
            raise _Retryable("timeout", f"{type(exc).__name__} after {self.timeout_s:g}s on {url}") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retryable("connection", f"{type(exc).__name__} on {url}: {self._scrub(exc)}") from None
        code = resp.status_code
        if code == 429 or code >= 500:
            kind = "rate_limited" if code == 429 else "server_error"
            raise _Retryable(kind, f"HTTP {code} from {url}", parse_retry_after(resp.headers.get("retry-after")))
        if code >= 400:
            raise _HTTPStatusError(code, f"{url}: {self._scrub(resp.text)[:200]}")
        return resp

    def _request(self, method: str, path: str, payload: dict | None = None, *, retries: int | None = None,
                 base: str | None = None) -> Any:
        """POST/GET with retries (``retries`` overrides max_retries) and return the decoded JSON body.

        Raises:
            _Retryable: transient failure, retries exhausted.
            _HTTPStatusError: a non-retryable error status.
            _Malformed: a body that is not JSON.
        """
        retrying = Retrying(
            stop=stop_after_attempt((self.max_retries if retries is None else retries) + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep or time.sleep,
            reraise=True,
            before_sleep=self._log_retry,
        )
        resp = retrying(self._attempt, method, path, payload, base)
        try:
            return resp.json()
        except ValueError:
            snippet = self._scrub(resp.text)[:80]  # scrub before cutting, so no partial key survives
            raise _Malformed(f"non-JSON body ({resp.headers.get('content-type', '?')}): {snippet!r}") from None

    def _log_retry(self, state: RetryCallState) -> None:
        """Log one line per retry (no headers, no key)."""
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("retrying %s (attempt %d): %s", self.base_url, state.attempt_number, self._scrub(exc))

    # ----- public API -----

    def check(self) -> str:
        """Probe the server once and return the revision (server-reported model name, else the configured one).

        Returns:
            The revision string.

        Raises:
            BackendError: one line naming the URL when the server cannot be reached.
        """
        url = self.base_url + "/models"
        try:
            resp = self._client.get(url, headers=self._headers(), timeout=min(self.timeout_s, 10.0))
        except httpx.TimeoutException:
            raise BackendError(f"cannot reach OpenAI-compatible server at {self.base_url}: timed out") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            why = type(exc).__name__
            raise BackendError(f"cannot reach OpenAI-compatible server at {self.base_url}: {why}") from None
        if resp.status_code in (401, 403):
            raise BackendError(f"OpenAI-compatible server at {self.base_url} refused the API key (HTTP {resp.status_code})")
        if resp.status_code != 200:
            return self.model
        try:
            data = resp.json().get("data")
        except (ValueError, AttributeError):
            return self.model
        ids = [d.get("id") for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)] if isinstance(data, list) else []
        if self.model in ids:
            return self.model
        for mid in ids:  # e.g. 'org/name' served for a requested 'name'
            if mid.endswith("/" + self.model) or mid.startswith(self.model + "@"):
                return mid
        return ids[0] if len(ids) == 1 else self.model

    def _payload(self, req: GenRequest) -> tuple[str, dict, bool]:
        """Build (path, JSON payload, is_chat) for a request."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_new_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            **self.extra_body,
        }
        if req.stop:
            body["stop"] = list(req.stop)
        if req.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in req.messages]
            return "/chat/completions", body, True
        body["prompt"] = req.prompt
        return "/completions", body, False

    def _count_retry(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] = self.retries.get(reason, 0) + 1

    # ----- generation: one asyncio loop, a continuous window of ``concurrency`` requests in flight -----

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """Start (once) the event loop thread that all generation requests of this backend run on."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="oai-loop", daemon=True)
                self._loop_thread.start()
            return self._loop

    async def _session(self) -> Any:
        """The HTTP session of the loop: aiohttp (the client with the least CPU per request, docs/measurements.md:
        client choice), or an httpx AsyncClient over an injected test transport."""
        if self._async is None:
            if self._transport is not None:
                self._async = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), transport=self._transport,
                                                follow_redirects=False)
            else:
                import aiohttp

                self._async = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s),
                    json_serialize=json.dumps, auto_decompress=True)
        return self._async

    async def _send(self, url: str, payload: dict) -> tuple[int, Any, bytes]:
        """POST once; return (status, headers, body) or raise _Retryable for timeouts and broken connections."""
        session = await self._session()
        with self._lock:
            self.attempts += 1
        if isinstance(session, httpx.AsyncClient):
            try:
                resp = await session.post(url, json=payload, headers=self._headers())
            except httpx.TimeoutException as exc:
                raise _Retryable("timeout", f"{type(exc).__name__} after {self.timeout_s:g}s on {url}") from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                raise _Retryable("connection", f"{type(exc).__name__} on {url}: {self._scrub(exc)}") from None
            return resp.status_code, resp.headers, resp.content
        import aiohttp

        try:
            async with session.post(url, json=payload, headers=self._headers()) as resp:
                return resp.status, resp.headers, await resp.read()
        except asyncio.TimeoutError:
            raise _Retryable("timeout", f"no answer within {self.timeout_s:g}s on {url}") from None
        except aiohttp.ClientError as exc:
            raise _Retryable("connection", f"{type(exc).__name__} on {url}: {self._scrub(exc)}") from None

    async def _post_json(self, url: str, payload: dict) -> Any:
        """POST once and return the decoded body; raise _Retryable, _HTTPStatusError or _Malformed."""
        code, headers, raw = await self._send(url, payload)
        if code == 429 or code >= 500:
            kind = "rate_limited" if code == 429 else "server_error"
            raise _Retryable(kind, f"HTTP {code} from {url}", parse_retry_after(headers.get("retry-after")))
        if code >= 400:
            raise _HTTPStatusError(code, f"{url}: {self._scrub(raw.decode('utf-8', errors='replace'))[:200]}")
        try:
            return json.loads(raw)
        except ValueError:
            snippet = self._scrub(raw.decode("utf-8", errors="replace"))[:80]  # scrub before cutting
            raise _Malformed(f"non-JSON body ({headers.get('content-type', '?')}): {snippet!r}") from None

    def _backoff(self, retry: int, exc: _Retryable) -> float:
        """Wait before retry ``retry`` (0-based): Retry-After when given, else initial * 2**retry + jitter; capped."""
        if exc.retry_after is not None:
            return min(exc.retry_after, self.backoff_max_s)
        return min(self.backoff_initial_s * 2 ** retry + random.uniform(0, self.backoff_initial_s), self.backoff_max_s)

    async def _generate_one(self, req: GenRequest, base: str | None = None) -> GenResult:
        """Run one request to completion (at ``base``, default the first base URL); never raises.

        Transient failures are retried up to ``max_retries`` times (with backoff); a reply that is not JSON or
        not of the OpenAI shape (a proxy's HTML page, an empty ``choices``) is asked again up to
        ``max_malformed_retries`` times, counted in ``retries['malformed_response']``; after that the row
        keeps its reason.
        """
        t0 = time.perf_counter()
        path, payload, chat = self._payload(req)
        url = (base or self.base_url) + path
        transient = malformed = 0
        while True:
            try:
                text, reason, ptoks, ctoks = parse_generation(await self._post_json(url, payload), chat=chat)
                break
            except _Retryable as exc:
                if transient >= self.max_retries:
                    detail = f"{exc.detail} (gave up after {self.max_retries + 1} attempts)"
                    return error_result(f"transport_{exc.kind}", self._scrub(detail),
                                        latency_s=time.perf_counter() - t0)
                wait = self._backoff(transient, exc)
                transient += 1
                self._count_retry(exc.kind)
                log.warning("retrying %s (attempt %d): %s", self.base_url, transient, self._scrub(exc))
                if self._sleep is not None:
                    self._sleep(wait)  # tests record the wait instead of sleeping
                else:
                    await asyncio.sleep(wait)
            except _HTTPStatusError as exc:
                return error_result(f"http_{exc.status}", self._scrub(exc.detail), latency_s=time.perf_counter() - t0)
            except _Malformed as exc:
                if malformed >= self.max_malformed_retries:
                    detail = f"{exc} (after {self.max_malformed_retries + 1} attempts)"
                    return error_result("malformed_response", self._scrub(detail), latency_s=time.perf_counter() - t0)
                malformed += 1
                self._count_retry("malformed_response")
            except (httpx.HTTPError, OSError) as exc:
                return error_result("transport_other", self._scrub(f"{type(exc).__name__}: {exc}"),
                                    latency_s=time.perf_counter() - t0)
        text, stopped = apply_stop(text, req.stop)
        return GenResult(text=text, finish_reason="stop" if stopped else reason, prompt_tokens=ptoks,
                         completion_tokens=ctoks, latency_s=time.perf_counter() - t0)

    def generate_stream(self, requests: Sequence[GenRequest]) -> Iterator[list[tuple[int, GenResult]]]:
        """Yield groups of ``(index, result)`` as requests complete, keeping ``concurrency`` requests in flight.

        Requests are sent in index order and a finished one is replaced by the next as soon as the caller
        has taken its result (no batch barrier: a slow request holds up only its own slot). Each group holds
        every result that completed since the last one was taken; a slot sends its next request only when
        the caller comes back for more, so a caller that commits each group before asking for the next
        loses at most ``concurrency`` requests, in flight or uncommitted, when it is killed. Failures are
        error results, never exceptions. Closing the iterator early cancels what is still in flight.
        """
        if not requests:
            return
        done: queue.Queue = queue.Queue()
        todo = iter(enumerate(requests))

        async def worker(base: str) -> None:
            for i, req in todo:  # one shared iterator: each slot takes the next request when its last one ends
                taken = asyncio.Event()
                done.put((i, await self._generate_one(req, base), taken))
                await taken.wait()  # the caller has taken (and committed) the result: only then a new request

        async def window() -> None:
            try:
                slots = range(min(self.concurrency, len(requests)))
                await asyncio.gather(*(worker(self.base_urls[k % len(self.base_urls)]) for k in slots))
            finally:
                done.put(None)

        loop = self._event_loop()
        future = asyncio.run_coroutine_threadsafe(window(), loop)
        try:
            finished = False
            while not finished:
                group = [done.get()]
                while not done.empty():
                    group.append(done.get_nowait())
                finished = group[-1] is None
                group = [g for g in group if g is not None]
                if group:
                    yield [(i, result) for i, result, _ in group]
                    for _, _, taken in group:  # the caller is back for more: what it took is committed
                        loop.call_soon_threadsafe(taken.set)
            future.result()
        finally:
            if not future.done():
                future.cancel()

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Send the requests through the continuous window and return the results in request order.

        Args:
            requests: the requests.

        Returns:
            One GenResult per request; failures are error results, never exceptions.
        """
        out: list[GenResult | None] = [None] * len(requests)
        for group in self.generate_stream(requests):
            for i, result in group:
                out[i] = result
        return out  # type: ignore[return-value]

    def _echo_logprobs(self, ctx: str, cont: str, max_tokens: int, retries: int | None,
                       base: str | None = None) -> tuple[tuple[float, int] | None, int]:
        """Ask /completions (at ``base``) to echo ``ctx + cont`` with logprobs.

        Returns:
            The continuation's (sum of log-probs, token count), None when the answer has none; and the number
            of tokens the server generated past the echo (usage.completion_tokens, 0 when not reported).

        Raises:
            _Retryable, _HTTPStatusError, _Malformed: as ``_request``.
        """
        payload = {
            "model": self.model,
            "prompt": ctx + cont,
            "echo": True,
            "logprobs": 1,
            "max_tokens": max_tokens,
            "temperature": 0,
            **self.extra_body,
        }
        body = self._request("POST", "/completions", payload, retries=retries, base=base)
        usage = body.get("usage") if isinstance(body, dict) else None
        generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
        generated = generated if isinstance(generated, int) and not isinstance(generated, bool) else 0
        return parse_echo_logprobs(body, len(ctx), len(ctx) + len(cont)), generated

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Score continuations through /completions with echo=True, logprobs=1.

        The first call tries max_tokens=0 once (no retries); a server that rejects it (any HTTP
        error status) is asked again with max_tokens=1, whose generated token is ignored (it lies
        past the echoed text). A server that accepts 0 but generates anyway (llama-cpp-python reads 0 as
        "up to the context size") is asked with max_tokens=1 from then on. The working setting is remembered
        for later calls. Requests run ``concurrency`` at a time, each thread pinned to one base URL.

        Args:
            contexts: conditioning texts.
            continuations: texts to score.

        Returns:
            (sum of continuation token log-probs, token count) per pair.

        Raises:
            BackendError: when the server does not return echoed logprobs, or a request fails.
        """
        if len(contexts) != len(continuations):
            raise BackendError(f"loglikelihood got {len(contexts)} contexts but {len(continuations)} continuations")
        pairs = list(zip(contexts, continuations, strict=True))
        if not pairs:
            return []
        unsupported = f"loglikelihood not supported by {self.base_url} (no echoed prompt logprobs from /completions)"

        def fail(exc: Exception) -> BackendError:
            if isinstance(exc, _Retryable):
                return BackendError(f"loglikelihood failed at {self.base_url}: transport_{exc.kind}")
            if isinstance(exc, _HTTPStatusError):
                return BackendError(f"loglikelihood not supported by {self.base_url} (HTTP {exc.status} to echo/logprobs)")
            return BackendError(f"loglikelihood failed at {self.base_url}: malformed_response: {self._scrub(exc)}")

        pinned = threading.local()
        next_slot = iter(range(1 << 62))

        def one(pair: tuple[str, str], max_tokens: int) -> tuple[float, int]:
            if not hasattr(pinned, "base"):  # each worker thread keeps to one replica
                with self._lock:
                    pinned.base = self.base_urls[next(next_slot) % len(self.base_urls)]
            try:
                parsed, _ = self._echo_logprobs(pair[0], pair[1], max_tokens, None, pinned.base)
            except (_Retryable, _HTTPStatusError, _Malformed) as exc:
                raise fail(exc) from None
            if parsed is None:
                raise BackendError(unsupported)
            return parsed

        first: tuple[float, int] | None = None
        if self._ll_max_tokens is None:
            try:
                first, generated = self._echo_logprobs(pairs[0][0], pairs[0][1], 0, 0)
                if first is None:
                    raise BackendError(unsupported)
                self._ll_max_tokens = 1 if generated > 0 else 0
            except (_Retryable, _HTTPStatusError):
                first = one(pairs[0], 1)  # e.g. servers that refuse max_tokens=0 (HTTP 400/422/500)
                self._ll_max_tokens = 1
            except _Malformed as exc:
                raise fail(exc) from None
        mt = self._ll_max_tokens
        rest = pairs[1:] if first is not None else pairs
        if self.concurrency == 1 or len(rest) <= 1:
            scored = [one(p, mt) for p in rest]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(rest)), thread_name_prefix="oai-ll") as pool:
                scored = list(pool.map(lambda p: one(p, mt), rest))
        return ([first] if first is not None else []) + scored
