"""Build a Backend from a plain dict spec (as found in params.yaml)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from refinery.models.backends.base import Backend, BackendError

_KINDS = ("local", "openai", "llamacpp", "fake")
_LOCAL_KEYS = {"path", "batch_size", "threads", "dtype", "max_length", "device"}
_OPENAI_KEYS = {
    "base_url",
    "model",
    "api_key_env",
    "concurrency",
    "timeout_s",
    "max_retries",
    "max_malformed_retries",
    "backoff_initial_s",
    "backoff_max_s",
    "check",
}
_LLAMACPP_KEYS = {"model_path", "name", "parallel", "threads", "n_ctx", "port", "logits_all", "startup_timeout_s",
                  "log_dir", "check"} | (_OPENAI_KEYS - {"base_url", "model", "api_key_env", "concurrency"})
_FAKE_KEYS = {"model_id", "responses", "fail", "fail_every", "revision"}


def _options(spec: Mapping[str, Any], allowed: set[str], required: tuple[str, ...]) -> dict[str, Any]:
    """Return the spec minus 'kind', after checking required and unknown keys."""
    kind = spec["kind"]
    opts = {k: v for k, v in spec.items() if k != "kind"}
    missing = [k for k in required if opts.get(k) in (None, "")]
    if missing:
        raise BackendError(f"backend kind '{kind}' needs {', '.join(missing)}")
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise BackendError(f"backend kind '{kind}' does not take {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return opts


def make_backend(spec: Mapping[str, Any]) -> Backend:
    """Build the backend a spec names; heavy libraries are imported only for the kind used.

    Args:
        spec: {"kind": "local", "path": ..., "batch_size": 8, "threads": 2, ...},
            {"kind": "openai", "base_url": ..., "model": ..., "api_key_env": "OPENAI_API_KEY", ...},
            {"kind": "llamacpp", "model_path": ....gguf, "name": ..., "parallel": 2, ...} (starts llama.cpp
            server processes, stopped by the backend's ``close()`` or at exit) or {"kind": "fake", ...}.

    Returns:
        A Backend.

    Raises:
        BackendError: unknown kind, missing or unknown options, or a backend that cannot start.
    """
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise BackendError(f"backend spec needs a 'kind' (one of {', '.join(_KINDS)})")
    kind = spec["kind"]
    if kind == "local":
        opts = _options(spec, _LOCAL_KEYS, ("path",))
        from refinery.models.backends.local import TransformersBackend

        return TransformersBackend(opts.pop("path"), **opts)
    if kind == "openai":
        opts = _options(spec, _OPENAI_KEYS, ("base_url", "model"))
        from refinery.models.backends.http import OpenAICompatBackend

        return OpenAICompatBackend(opts.pop("base_url"), opts.pop("model"), **opts)
    if kind == "llamacpp":
        opts = _options(spec, _LLAMACPP_KEYS, ("model_path", "name"))
        from refinery.models.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(opts.pop("model_path"), **opts)
    if kind == "fake":
        opts = _options(spec, _FAKE_KEYS, ())
        from refinery.models.backends.fake import FakeBackend

        return FakeBackend(**opts)
    raise BackendError(f"unknown backend kind {kind!r} (expected one of {', '.join(_KINDS)})")
