"""Which model each role names (the provision params): the roles, their spec forms and the raw value to parse."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from refinery.core.params import StageParams

ROLES = ("teacher", "judge", "student", "embedder", "audit_judge")


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


class ServeSpec(StageParams):
    """A GGUF model that refinery serves itself (llama-cpp-python's OpenAI-compatible server), started by the stage
    that uses it and stopped when that stage ends."""

    serve: Literal["llama.cpp"]
    model: str  # embedded:<name> (a GGUF shipped in a PyPI package) or a path to a .gguf file
    # server settings (throughput only; none changes a row): processes, threads each, context, first port, start wait
    parallel: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    n_ctx: int | None = Field(default=None, ge=16)
    port: int | None = Field(default=None, ge=0, le=65535)
    startup_timeout_s: float | None = Field(default=None, gt=0)
    # client settings, as an endpoint's (concurrency is parallel: one request per server process)
    timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0)
    max_malformed_retries: int | None = Field(default=None, ge=0)
    backoff_initial_s: float | None = Field(default=None, ge=0)
    backoff_max_s: float | None = Field(default=None, ge=0)


def _form(value: Any) -> str:
    """Name the form a role's value takes, so that a mistake is reported against that form only."""
    if isinstance(value, (EndpointSpec, ServeSpec)):
        return "serve" if isinstance(value, ServeSpec) else "endpoint"
    if isinstance(value, dict):
        return "serve" if "serve" in value else "endpoint"
    return "name"


# A model name (embedded:<name>, an HF id, a path), an endpoint mapping, or a serve mapping.
RoleSpec = Annotated[Annotated[str, Tag("name")] | Annotated[EndpointSpec, Tag("endpoint")]
                     | Annotated[ServeSpec, Tag("serve")], Discriminator(_form)]


class ProvisionParams(StageParams):
    """Which model each role uses (see params.yaml for accepted forms)."""

    teacher: RoleSpec
    judge: RoleSpec
    student: RoleSpec
    embedder: RoleSpec
    # scores the judge-audit sample (stages/audit_judge.py); params.yaml names it, this default keeps older params
    # files (without the role) valid
    audit_judge: RoleSpec = "embedded:smollm2-135m-instruct"


def raw_spec(value: str | EndpointSpec | ServeSpec) -> Any:
    """Return a role's value as :func:`refinery.models.resolve.parse_spec` reads it (a string or a plain dict)."""
    return value.model_dump(exclude_none=True) if isinstance(value, (EndpointSpec, ServeSpec)) else value
