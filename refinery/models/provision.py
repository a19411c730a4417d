"""Which model each role names (the provision params): the roles, their spec forms and the raw value to parse."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from refinery.core.params import StageParams

ROLES = ("teacher", "judge", "student", "embedder")


class EndpointSpec(StageParams):
    """An OpenAI-compatible server; the API key is read from ``api_key_env`` at run time, never stored."""

    endpoint: str
    model: str
    api_key_env: str | None = None
    # client settings (throughput only; none changes a row): requests in flight, per-read timeout, retry budgets
    concurrency: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0)
    max_malformed_retries: int | None = Field(default=None, ge=0)
    backoff_initial_s: float | None = Field(default=None, ge=0)
    backoff_max_s: float | None = Field(default=None, ge=0)


class ProvisionParams(StageParams):
    """Which model each role uses (see params.yaml for accepted forms)."""

    teacher: str | EndpointSpec
    judge: str | EndpointSpec
    student: str | EndpointSpec
    embedder: str | EndpointSpec


def raw_spec(value: str | EndpointSpec) -> Any:
    """Return a role's value as :func:`refinery.models.resolve.parse_spec` reads it (a string or a plain dict)."""
    return value.model_dump(exclude_none=True) if isinstance(value, EndpointSpec) else value
