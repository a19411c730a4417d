"""Declare the ``engine`` params section: where row-parallel work runs, and the unit it is cut into."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from refinery.core.params import StageParams

# null / "local": start a local cluster; "auto": join the cluster this machine belongs to; "ray://host:port"
# (Ray Client) or "host:port" (the head node's GCS address): join that cluster
_ADDRESS = re.compile(r"^(local|auto|ray://[^\s/:]+:\d+|[^\s/:]+:\d+)$")


class EngineParams(StageParams):
    """Where the gate, generate and validate stages run their row-parallel work (``engine``).

    Only ``block_rows`` changes what a stage writes (it fixes which rows share one model call); ``kind``,
    ``address``, ``workers`` and ``cpus_per_worker`` only choose where the same calls run (a worker runs its
    models with the stage's own torch threads, which do change scores in their last bits).
    """

    kind: Literal["local", "ray"]
    address: str | None = None
    workers: int = Field(gt=0)
    cpus_per_worker: float = Field(gt=0)
    block_rows: int = Field(gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not _ADDRESS.match(v):
            raise ValueError(f"expected null, 'local', 'auto', 'ray://host:port' or 'host:port', got {v!r}")
        return v
