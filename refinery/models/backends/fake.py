"""Provide a deterministic, model-free Backend for unit tests of other stages."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

from refinery.models.backends.base import BackendError, GenRequest, GenResult, apply_stop, error_result

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


def request_text(req: GenRequest) -> str:
    """Return the text a request conditions on: the prompt, or the last chat turn's content."""
    if req.prompt is not None:
        return req.prompt
    return req.messages[-1][1] if req.messages else ""


class FakeBackend:
    """A Backend whose outputs are a pure function of the request (its sha256 digest).

    Args:
        model_id: the name reported as ``model_id``.
        responses: canned texts, keyed by the prompt or by the last chat message's content;
            a canned text still obeys ``stop`` and ``max_new_tokens`` (in words).
        fail: maps a prompt / last message content to an error string ('reason: detail');
            such requests come back as error results.
        fail_every: when > 0, every n-th request (1-based, counted over the instance's life)
            comes back as 'transport_fake: injected failure'.
        responder: optional function GenRequest -> str that overrides the default text.
        revision: the reported revision; defaults to a digest of the configuration.

    Default text: ``max_new_tokens`` words (capped at 16) picked from a fixed word list by the
    request digest, so equal requests give equal texts and any field change gives another text;
    its finish_reason is 'length' when it used all max_new_tokens words.
    Words count as tokens; prompt tokens are whitespace-split words of the rendered prompt.
    """

    def __init__(
        self,
        model_id: str = "fake",
        *,
        responses: Mapping[str, str] | None = None,
        fail: Mapping[str, str] | None = None,
        fail_every: int = 0,
        responder: Callable[[GenRequest], str] | None = None,
        revision: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.responses = dict(responses or {})
        self.fail = dict(fail or {})
        self.fail_every = int(fail_every)
        self.responder = responder
        self.calls: list[GenRequest] = []
        conf = repr((model_id, sorted(self.responses.items()), sorted(self.fail.items()), self.fail_every))
        self.revision = revision or "fake-" + hashlib.sha256(conf.encode("utf-8")).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"FakeBackend(model_id={self.model_id!r}, revision={self.revision!r})"

    def _one(self, req: GenRequest) -> GenResult:
        """Produce the deterministic result for one request."""
        self.calls.append(req)
        key = request_text(req)
        rendered = req.prompt if req.prompt is not None else " ".join(c for _, c in req.messages or ())
        prompt_tokens = len(rendered.split())
        if self.fail_every > 0 and len(self.calls) % self.fail_every == 0:
            return error_result("transport_fake", "injected failure", prompt_tokens=prompt_tokens)
        if key in self.fail:
            reason, _, detail = self.fail[key].partition(": ")
            return error_result(reason or "fake_error", detail or "injected failure", prompt_tokens=prompt_tokens)
        open_ended = False
        if self.responder is not None:
            full = self.responder(req)
        elif key in self.responses:
            full = self.responses[key]
        else:
            digest = bytes.fromhex(req.digest())
            n = min(req.max_new_tokens, 16)
            full = " ".join(_WORDS[digest[i % len(digest)] % len(_WORDS)] for i in range(n))
            open_ended = n == req.max_new_tokens  # a model would have gone on
        words = full.split(" ")
        truncated = len(words) > req.max_new_tokens or open_ended
        text = " ".join(words[: req.max_new_tokens])
        text, stopped = apply_stop(text, req.stop)
        reason = "length" if truncated and not stopped else "stop"
        return GenResult(
            text=text,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(text.split()),
            latency_s=0.0,
        )

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Return one deterministic result per request, in order.

        Args:
            requests: the requests.

        Returns:
            One GenResult per request.
        """
        return [self._one(r) for r in requests]

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Return a deterministic pseudo log-likelihood: -(1 + digest byte / 64) per whitespace token.

        Args:
            contexts: conditioning texts.
            continuations: texts to score.

        Returns:
            (negative score, word count) per pair.
        """
        if len(contexts) != len(continuations):
            raise BackendError(f"loglikelihood got {len(contexts)} contexts but {len(continuations)} continuations")
        out = []
        for ctx, cont in zip(contexts, continuations, strict=True):
            n = len(cont.split())
            b = hashlib.sha256(f"{ctx}\0{cont}".encode()).digest()[0]
            out.append((-n * (1.0 + b / 64.0), n))
        return out
