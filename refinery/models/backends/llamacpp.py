"""Start, watch and stop llama-cpp-python's OpenAI-compatible server for a GGUF model, and talk to it over HTTP.

llama-cpp-python's server answers one request at a time: every route takes one global lock around its single
``Llama`` context (``llama_cpp/server/app.py``: ``llama_outer_lock``/``llama_inner_lock``; batched inference is
abetlen/llama-cpp-python#771, still open). Parallel capacity therefore comes from ``parallel`` server
processes, each with its own port and ``threads`` CPU threads, and the HTTP backend pins each slot of its
request window to one process (``OpenAICompatBackend`` with several base URLs, ``concurrency = parallel``).

The processes run in their own session (process group): ``stop()`` signals the group, so nothing outlives
refinery on success, on an error or on Ctrl-C (``atexit``). A server also watches its parent and exits when
the parent is gone, so even ``kill -9`` of refinery leaves no server behind. Each process logs to
``<log_dir>/<name>-<k>.log``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refinery.models.backends.base import BackendError
from refinery.models.backends.http import OpenAICompatBackend

INSTALL_HINT = "run `make install-llamacpp`"
# Modules llama-cpp-python's server needs: the binding (compiled from source) and its [server] extra.
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
# Sampling fields the server would otherwise default to values the transformers backend does not use (top_k 40,
# min_p 0.05, repeat_penalty 1.1): with these, temperature and top_p mean the same on both backends.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
WARMUP_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
_LOG_TAIL_LINES = 3
_running: weakref.WeakSet[LlamaCppServer] = weakref.WeakSet()


def missing_modules() -> list[str]:
    """Return the server's modules that are not installed (none when ``serve: llama.cpp`` can run here)."""
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last non-empty lines of a log, joined on one line with ' | '."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-400:]


def _listen(port: int) -> socket.socket:
    """Bind and listen on 127.0.0.1:``port`` (0: a free port chosen by the kernel), inheritable by a child.

    Binding here, before the server starts, means no other process can take the port in between.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        why = "already in use" if exc.errno in (98, 48) else (exc.strerror or type(exc).__name__)
        raise BackendError(f"llama.cpp server: port {port} on 127.0.0.1 is {why}: set port: 0 (a free port) "
                           f"or another port") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


class LlamaCppServer:
    """``parallel`` llama-cpp-python server processes for one GGUF file, on 127.0.0.1.

    Args:
        model_path: the .gguf file.
        name: the model name the servers answer to (``model`` in requests, listed at /v1/models).
        parallel: server processes (each serves one request at a time).
        threads: CPU threads per process (generation and prompt processing).
        n_ctx: context size per process, in tokens (prompt + completion).
        port: first port (process k listens on port + k); 0: free ports.
        logits_all: keep the logits of every prompt token, which echo+logprobs scoring (``loglikelihood``)
            needs; off for generation only (it costs time and memory on every prompt).
        seed: the servers' default sampling seed (every refinery request sends its own).
        startup_timeout_s: how long to wait for every process to answer /v1/models.
        log_dir: where each process's log goes.
        python: the interpreter that runs the servers.
    """

    def __init__(self, model_path: str | Path, *, name: str, parallel: int = 1, threads: int = 1, n_ctx: int = 2048,
                 port: int = 0, logits_all: bool = False, seed: int = 0, startup_timeout_s: float = 120,
                 log_dir: str | Path = ".refinery/llamacpp", python: str = sys.executable) -> None:
        if parallel < 1 or threads < 1 or n_ctx < 16 or not 0 <= port <= 65535 or startup_timeout_s <= 0:
            raise BackendError("llama.cpp server: need parallel >= 1, threads >= 1, n_ctx >= 16, 0 <= port <= 65535, "
                               "startup_timeout_s > 0")
        self.model_path = Path(model_path)
        self.name = name
        self.parallel, self.threads, self.n_ctx, self.port = int(parallel), int(threads), int(n_ctx), int(port)
        self.logits_all, self.seed = bool(logits_all), int(seed)
        self.startup_timeout_s = float(startup_timeout_s)
        self.log_dir = Path(log_dir)
        self.python = python
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.urls: list[str] = []

    def __repr__(self) -> str:
        return f"LlamaCppServer({self.model_path.name!r}, parallel={self.parallel}, urls={self.urls})"

    @property
    def pids(self) -> list[int]:
        """Process ids of the running servers."""
        return [p.pid for p in self.procs]

    def start(self, progress: Callable[[str], None] = lambda s: None) -> list[str]:
        """Start every process and wait until each answers /v1/models.

        Returns:
            The base URLs (``http://127.0.0.1:<port>/v1``), one per process.

        Raises:
            BackendError: one line: llama-cpp-python missing, the model file missing, a port in use, or a
                server that exited or did not answer within ``startup_timeout_s`` (with its last log lines).
        """
        missing = missing_modules()
        if missing:
            raise BackendError(f"serve: llama.cpp needs llama-cpp-python with its server extra (missing: "
                               f"{', '.join(missing)}): {INSTALL_HINT}")
        if not self.model_path.is_file():
            raise BackendError(f"llama.cpp server: model file {self.model_path} not found")
        if self.procs:
            return self.urls
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            socks = [_listen(self.port + k if self.port else 0) for k in range(self.parallel)]
        except BackendError:
            raise
        try:
            for k, sock in enumerate(socks):
                self._spawn(k, sock)
        finally:
            for sock in socks:  # the children hold their own copies
                sock.close()
        _running.add(self)
        progress(f"starting {self.parallel} llama.cpp server process(es) for {self.model_path.name} "
                 f"({self.threads} thread(s) each; logs in {self.log_dir})")
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.urls

    def _spawn(self, k: int, sock: socket.socket) -> None:
        """Start process ``k`` on the listening socket ``sock``."""
        port = sock.getsockname()[1]
        log = self.log_dir / f"{self.name.replace('/', '--')}-{k}.log"
        config = {"model": str(self.model_path), "alias": self.name, "threads": self.threads, "n_ctx": self.n_ctx,
                  "logits_all": self.logits_all, "seed": self.seed}
        cmd = [self.python, "-m", "refinery.models.backends.llamacpp", "--fd", str(sock.fileno()),
               "--parent", str(os.getpid()), "--config", json.dumps(config)]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(sock.fileno(),), start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        self.urls.append(f"http://127.0.0.1:{port}/v1")

    def _wait_ready(self) -> None:
        """Poll each server until /v1/models answers 200, then have it generate one token (a llama.cpp build
        whose kernels this CPU cannot run dies there, not on the first real request); raise one line when a
        server exits or does not answer within ``startup_timeout_s``."""
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(range(len(self.procs)))
        while pending:
            for k in list(pending):
                self._check_alive(k, "while starting")
                try:
                    with urllib.request.urlopen(self.urls[k] + "/models", timeout=2) as resp:
                        if resp.status == 200:
                            pending.remove(k)
                except (urllib.error.URLError, OSError):  # not listening yet, or still loading: poll again
                    pass
            if pending and time.monotonic() > deadline:
                k = pending[0]
                raise BackendError(f"llama.cpp server for {self.model_path.name} did not answer within "
                                   f"{self.startup_timeout_s:g} s: {_log_tail(self.logs[k]) or 'no output'} "
                                   f"(log: {self.logs[k]})")
            if pending:
                time.sleep(0.2)
        # a prompt of a few dozen tokens, so prompt processing runs the batched matrix kernels, not only the
        # one-row ones that decoding uses
        body = json.dumps({"model": self.name, "prompt": WARMUP_PROMPT, "max_tokens": 1, "temperature": 0}).encode()
        for k, url in enumerate(self.urls):
            req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=max(5.0, deadline - time.monotonic())) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError) as exc:
                time.sleep(0.5)  # let a crashed server's exit status arrive
                self._check_alive(k, "on its first completion")
                raise BackendError(f"llama.cpp server for {self.model_path.name} failed its first completion "
                                   f"({' '.join(str(exc).split())[:120]}): {_log_tail(self.logs[k]) or 'no output'} "
                                   f"(log: {self.logs[k]})") from None

    def _check_alive(self, k: int, when: str) -> None:
        """Raise one line, with the last lines of its log, when server process ``k`` has exited."""
        proc, log = self.procs[k], self.logs[k]
        code = proc.poll()
        if code is None:
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_ \
            else f"exited with code {code}"
        hint = " (a llama.cpp build this CPU cannot run? reinstall: make install-llamacpp)" \
            if code in (-signal.SIGSEGV, -signal.SIGILL, -signal.SIGBUS) else ""
        raise BackendError(f"llama.cpp server for {self.model_path.name} {how} {when}{hint}: "
                           f"{_log_tail(log) or 'no output'} (log: {log})")

    def alive(self) -> bool:
        """Return True while every process is running."""
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process (SIGTERM to its process group, SIGKILL after ``timeout_s``); safe to call twice."""
        procs, self.procs = self.procs, []
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:  # already gone
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        self.urls = []
        _running.discard(self)

    def __enter__(self) -> LlamaCppServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    """Stop every server this process started (normal exit, an uncaught error, Ctrl-C)."""
    for server in list(_running):
        server.stop(timeout_s=5)


class LlamaCppBackend(OpenAICompatBackend):
    """An OpenAI-compatible backend over llama.cpp server processes that it starts, and stops on ``close()``.

    Args:
        model_path: the .gguf file.
        name: the model name requests carry.
        parallel, threads, n_ctx, port, logits_all, startup_timeout_s, log_dir: as :class:`LlamaCppServer`.
        client: OpenAICompatBackend settings (timeout_s, max_retries, ...); ``concurrency`` is ``parallel``.
    """

    def __init__(self, model_path: str | Path, *, name: str, parallel: int = 1, threads: int = 1, n_ctx: int = 2048,
                 port: int = 0, logits_all: bool = False, startup_timeout_s: float = 120,
                 log_dir: str | Path = ".refinery/llamacpp", **client: Any) -> None:
        if "concurrency" in client:
            raise BackendError("serve: llama.cpp sets concurrency from parallel (one request per server process)")
        self.server = LlamaCppServer(model_path, name=name, parallel=parallel, threads=threads, n_ctx=n_ctx,
                                     port=port, logits_all=logits_all, startup_timeout_s=startup_timeout_s,
                                     log_dir=log_dir)
        urls = self.server.start(progress=lambda s: print(f"llama.cpp: {s}", file=sys.stderr, flush=True))
        try:
            super().__init__(urls, name, concurrency=parallel, extra_body=NEUTRAL_SAMPLING, echo_max_tokens=1,
                             **client)
        except BaseException:
            self.server.stop()
            raise

    def __repr__(self) -> str:
        return f"LlamaCppBackend({self.server!r})"

    def close(self) -> None:
        """Close the HTTP client, then stop the servers."""
        try:
            super().close()
        finally:
            self.server.stop()


# ----- the server process -----

def _watch_parent(parent: int, interval_s: float = 0.5) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (refinery exited, even by kill -9)."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(interval_s)


def echo_logprobs(llama_cls: Any, max_top: int = 20) -> None:
    """Serve echoed prompt log-probs (``echo`` + ``logprobs`` on /v1/completions) computed by refinery, exactly.

    llama-cpp-python 0.3.x gets them wrong for models that add no BOS token (SmolLM2, Qwen, GPT-2 style
    vocabularies): it pairs prompt token i with the distribution computed *after* it, so it reports
    log p(token i | tokens up to i) instead of log p(token i | tokens before i) (abetlen/llama-cpp-python#1983);
    and it builds them in Python with a full sort of the vocabulary per token (seconds for a passage-length
    prompt). Here the completion runs without logprobs, then each prompt token's value is read from the logits
    of the position before it, which the model keeps (``logits_all``): the first token has none unless the
    model adds a BOS token (null, as in the OpenAI API). A generated token gets its value when the position
    before it was evaluated (the first one always is), else null. ``top_logprobs`` holds the ``logprobs`` (at
    most ``max_top``) likeliest tokens and the token itself. Requests without echo are left to the library.
    """
    original = llama_cls.create_completion
    if getattr(original, "_refinery_echo", False):
        return
    import numpy as np

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        prompt, top = kwargs.get("prompt", args[0] if args else None), kwargs.get("logprobs")
        if not (kwargs.get("echo") and top is not None and isinstance(prompt, str) and prompt and len(args) <= 1
                and self._logits_all and not kwargs.get("stream") and kwargs.get("suffix") is None):
            return original(self, *args, **kwargs)
        out = original(self, *args, **{**kwargs, "logprobs": None})
        text = out["choices"][0]["text"]
        ids = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        generated = self.tokenize(text[len(prompt):].encode("utf-8"), add_bos=False, special=True) \
            if len(text) > len(prompt) else []
        ids, bos = ids + generated, int(bool(self._model.add_bos_token()))
        scores = self._scores  # row j: the logits after input position j (a BOS, when added, is position 0)
        rows = [bos + i - 1 for i in range(len(ids))]
        known = [i for i, r in enumerate(rows) if 0 <= r < len(scores)]
        logp = llama_cls.logits_to_logprobs(scores[[rows[i] for i in known]]) if known else np.zeros((0, 1))
        k = max(0, min(int(top), max_top))
        tokens, offsets, values, tops, done = [], [], [], [], b""
        by_row = dict(zip(known, range(len(known))))
        for i, tid in enumerate(ids):
            piece = self.detokenize([tid], prev_tokens=ids[:i])
            offsets.append(len(done.decode("utf-8", errors="ignore")))
            tokens.append(piece.decode("utf-8", errors="ignore"))
            done += piece
            if i not in by_row:
                values.append(None), tops.append(None)
                continue
            row = logp[by_row[i]]
            values.append(float(row[tid]))
            best = np.argpartition(-row, k)[:k] if k else []
            entry = {self.detokenize([int(t)], prev_tokens=ids[:i]).decode("utf-8", errors="ignore"): float(row[t])
                     for t in best}
            tops.append({**entry, tokens[-1]: values[-1]})
        out["choices"][0]["logprobs"] = {"tokens": tokens, "text_offset": offsets, "token_logprobs": values,
                                         "top_logprobs": tops}
        return out

    create_completion._refinery_echo = True  # type: ignore[attr-defined]
    llama_cls.create_completion = create_completion


def serve(argv: Sequence[str] | None = None) -> None:
    """Run one llama-cpp-python server on an inherited listening socket (the child side of LlamaCppServer)."""
    ap = argparse.ArgumentParser(prog="python -m refinery.models.backends.llamacpp")
    ap.add_argument("--fd", type=int, required=True, help="listening socket inherited from the parent")
    ap.add_argument("--parent", type=int, required=True, help="pid to outlive by at most half a second")
    ap.add_argument("--config", required=True, help="JSON: model, alias, threads, n_ctx, logits_all, seed")
    args = ap.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="watch-parent").start()
    cfg = json.loads(args.config)

    import uvicorn
    from llama_cpp import Llama
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    echo_logprobs(Llama)
    sock = socket.socket(fileno=args.fd)
    host, port = sock.getsockname()[:2]
    model = ModelSettings(model=cfg["model"], model_alias=cfg["alias"], n_threads=cfg["threads"],
                          n_threads_batch=cfg["threads"], n_ctx=cfg["n_ctx"], logits_all=cfg["logits_all"],
                          seed=cfg["seed"], verbose=False)
    app = create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[model])
    print(f"serving {cfg['model']} as {cfg['alias']!r} on http://{host}:{port}/v1 ({cfg['threads']} thread(s), "
          f"n_ctx {cfg['n_ctx']}, logits_all {cfg['logits_all']})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])


if __name__ == "__main__":  # pragma: no cover - runs in the server process
    serve()
