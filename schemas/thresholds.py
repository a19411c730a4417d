"""Contract of data/04_gated/thresholds.json: every bound each gate judged with, as the gate stage resolved it.

One object per gate of ``GATES`` (``refinery.gates.registry``), holding exactly the names its registry entry
declares in ``bounds``: thresholds named by their bound (``min_support``, ``max_cosine``: calibrated on human
rows where params say null) and the settings its verdicts depend on (``ngram``, ``mode``). Values are JSON
numbers, strings or booleans, floats at full precision: recovery builds its re-gating gates from exactly these.
"""

from __future__ import annotations

import math
from typing import Any

from refinery.core.errors import InputError
from refinery.gates.registry import BY_NAME, GATES

Thresholds = dict[str, dict[str, Any]]


def validate(data: Any, where: str) -> Thresholds:
    """Check a thresholds mapping and return it.

    Args:
        data: the parsed JSON.
        where: the file that errors name.

    Raises:
        InputError: one line naming the file and the gate or key that is missing, unknown or not a finite scalar.
    """
    if not isinstance(data, dict):
        raise InputError(where, "expected an object with one entry per gate")
    unknown = sorted(set(data) - set(GATES))
    if unknown:
        raise InputError(where, "not a gate of refinery/gates/registry.py (rerun the gate stage)", field=unknown[0])
    for gate in GATES:
        if gate not in data:
            raise InputError(where, "no thresholds for this gate (rerun the gate stage)", field=gate)
        values, declared = data[gate], BY_NAME[gate].bounds
        if not isinstance(values, dict):
            raise InputError(where, "expected an object of bounds", field=gate)
        for key in declared:
            if key not in values:
                raise InputError(where, "missing (rerun the gate stage)", field=f"{gate}.{key}")
            v = values[key]
            if not isinstance(v, (bool, int, float, str)) or (isinstance(v, float) and not math.isfinite(v)):
                raise InputError(where, f"expected a finite number, a string or a boolean, got {v!r}",
                                 field=f"{gate}.{key}")
        extra = sorted(set(values) - set(declared))
        if extra:
            raise InputError(where, f"not a bound gate {gate} declares", field=f"{gate}.{extra[0]}")
    return {gate: dict(data[gate]) for gate in GATES}


def review_copy(thresholds: Thresholds, decimals: int = 4) -> Thresholds:
    """Return the thresholds with floats rounded, as the gate and recover metrics show them for review."""
    return {g: {k: round(v, decimals) if isinstance(v, float) else v for k, v in b.items()}
            for g, b in thresholds.items()}
