"""Expose the model backends: local transformers, OpenAI-compatible HTTP, and a fake for tests."""

from refinery.models.backends.base import Backend, BackendError, GenRequest, GenResult
from refinery.models.backends.factory import make_backend

__all__ = ["Backend", "BackendError", "GenRequest", "GenResult", "make_backend"]
