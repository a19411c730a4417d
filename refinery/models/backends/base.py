"""Define the request/result types and the Backend protocol every model backend implements."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from refinery.core.errors import RefineryError


class BackendError(RefineryError):
    """A backend that cannot be built or cannot do what was asked; its message is one line."""


@dataclass(frozen=True)
class GenRequest:
    """One generation request: chat ``messages`` or a raw ``prompt`` (exactly one of the two).

    Args:
        messages: (role, content) chat turns, rendered with the model's chat template.
        prompt: raw completion prompt, used as is.
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 means greedy decoding.
        top_p: nucleus-sampling mass (only used when temperature > 0).
        stop: strings that end the completion; the text is cut before the first one found.
        seed: per-request sampling seed.
        require_text: the completion must open with visible text: end-of-sequence, special and whitespace-only
            tokens are not allowed as its first token (a small model often answers a prompt ending in "Answer:"
            with an immediate newline or end of turn, which a stop string then cuts to nothing). A hint:
            backends that cannot constrain decoding (OpenAI-compatible endpoints) ignore it.
        require: a field marker the completion must reach at the start of a line: it may not end before it
            (end-of-sequence is forbidden and stop strings count only after it), and once a line of text ends
            without it, the marker is written next (a question-and-answer prompt: SmolLM2 often ends its turn,
            or starts another example, right after the question line). A hint, as ``require_text``.
    """

    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    require_text: bool = False
    require: str = ""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenRequest needs exactly one of messages or prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a tuple of strings, not a string")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def sampling_key(self) -> tuple:
        """Return the sampling parameters that must be equal for two requests to share a batch."""
        return (self.max_new_tokens, float(self.temperature), float(self.top_p), tuple(self.stop), self.require_text,
                self.require)

    def as_dict(self) -> dict:
        """Return the request's fields; ``require_text`` and ``require`` only when set, so older requests keep
        their cache keys."""
        d = asdict(self)
        for key in ("require_text", "require"):
            if not d[key]:
                del d[key]
        return d

    def digest(self) -> str:
        """Return a stable sha256 hex digest of the whole request (used by caches and the fake backend)."""
        payload = json.dumps(self.as_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GenResult:
    """The outcome of one GenRequest; never an exception.

    Args:
        text: generated text ('' on error).
        finish_reason: 'stop' | 'length' | 'error'.
        prompt_tokens: tokens in the (templated, possibly truncated) prompt.
        completion_tokens: tokens generated.
        latency_s: wall time spent on this request (its batch, for batched backends).
        error: stable snake_case reason and short detail, e.g. 'transport_timeout: ...'.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Return True when the request produced text rather than an error."""
        return self.finish_reason != "error"


def error_result(reason: str, detail: str, *, latency_s: float = 0.0, prompt_tokens: int = 0) -> GenResult:
    """Build an error GenResult with a one-line ``'reason: detail'`` message.

    Args:
        reason: stable snake_case reason, e.g. 'malformed_response'.
        detail: short human detail; newlines are collapsed.
        latency_s: time spent before giving up.
        prompt_tokens: prompt size when known.

    Returns:
        A GenResult with finish_reason 'error' and empty text.
    """
    one_line = " ".join(str(detail).split())[:300]
    return GenResult(
        text="",
        finish_reason="error",
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        latency_s=latency_s,
        error=f"{reason}: {one_line}",
    )


def apply_stop(text: str, stop: Sequence[str], require: str = "") -> tuple[str, bool]:
    """Cut ``text`` before the earliest occurrence of any stop string.

    Args:
        text: generated text.
        stop: stop strings.
        require: when set, stop strings count only after its first occurrence (none count without it).

    Returns:
        (text, True) truncated when a stop string was found, else (text, False).
    """
    start = 0
    if require:
        at = text.find(require)
        if at == -1:
            return text, False
        start = at + len(require)
    cut = -1
    for s in stop:
        i = text.find(s, start)
        if i != -1 and (cut == -1 or i < cut):
            cut = i
    if cut == -1:
        return text, False
    return text[:cut], True


@runtime_checkable
class Backend(Protocol):
    """What every model backend offers: batched generation and continuation log-likelihoods."""

    model_id: str
    revision: str

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate one result per request, in order; failures come back as error results."""
        ...

    def loglikelihood(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[float, int]]:
        """Sum log-prob of each continuation given its context, and its token count."""
        ...
