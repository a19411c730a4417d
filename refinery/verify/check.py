"""Verifiable data: seed items read strictly, and the ``verifiable`` gate that checks answers by running them.

A math row carries a Python expression and the answer it states: the expression is evaluated in the sandbox and
must equal the stated number. A code row carries a function and asserts: the function runs against the generated
asserts and the seed item's own tests in the same sandbox. Nothing here trusts a model: a row passes only when
execution agrees with it.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refinery.core.errors import InputError
from refinery.gates.base import Verdicts
from refinery.verify.sandbox import Limits, run_python

REASONS = ("verifiable_wrong_answer", "verifiable_timeout", "verifiable_error")
_NUMBER = re.compile(r"^[^\d+\-.]*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*[A-Za-z%€$]*\.?$")


class MathItem(BaseModel):
    """One line of ``math.jsonl``: a word problem, the expression that computes its answer, the answer."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    question: str = Field(min_length=1)
    expression: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class CodeItem(BaseModel):
    """One line of ``code.jsonl``: a task, the function that solves it, and its tests (assert lines)."""

    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    entry_point: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    task: str = Field(min_length=1)
    solution: str = Field(min_length=1)
    tests: list[str] = Field(min_length=1)

    @field_validator("tests")
    @classmethod
    def _asserts(cls, tests: list[str]) -> list[str]:
        bad = [t for t in tests if not t.startswith("assert ")]
        if bad:
            raise ValueError(f"every test is one 'assert ...' line, not {bad[0]!r}")
        return tests


def load_items(path: str | Path, model: type[BaseModel]) -> list[tuple[int, Any]]:
    """Read a JSONL seed file strictly: one item per line, unique ids; returns (line number, item) pairs.

    Raises:
        InputError: a missing file, a line that is not JSON or not an item (file, line and field named).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such file")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = model.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(str(path), f"not JSON ({e.msg})", row=n) from None
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(str(path), err["msg"], row=n, field=".".join(str(x) for x in err["loc"]) or None) \
                from None
        if item.item_id in seen:
            raise InputError(str(path), f"duplicate item_id {item.item_id!r}", row=n, field="item_id")
        seen.add(item.item_id)
        items.append((n, item))
    if not items:
        raise InputError(str(path), "no item")
    return items


def parse_number(text: str | None) -> float | None:
    """The number a stated answer gives (``1,296``, ``$66``, ``0.85 GB``, ``12.``), or None."""
    m = _NUMBER.match((text or "").strip())
    if m is None:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None


@dataclass(frozen=True)
class Check:
    """One row's verdict: ``reason`` None when execution agrees with the row."""

    reason: str | None
    detail: str | None
    value: float | None = None


def check_math(expression: str, answer: str, limits: Limits) -> Check:
    """Evaluate the expression in the sandbox; it must be a number equal to the stated answer."""
    stated = parse_number(answer)
    if stated is None:
        return Check("verifiable_error", f"the stated answer {answer!r} is not a number")
    r = run_python(expression, "eval", limits)
    if r.status == "timeout":
        return Check("verifiable_timeout", r.error)
    if r.status == "error":
        return Check("verifiable_error", f"{r.error_type}: {r.error}")
    if not isinstance(r.value, float):
        return Check("verifiable_error", f"the expression gives {r.value}, not a number")
    if not math.isclose(r.value, stated, rel_tol=1e-6, abs_tol=1e-9):
        return Check("verifiable_wrong_answer", f"the expression gives {r.value:g}, the answer states {stated:g}",
                     r.value)
    return Check(None, None, r.value)


def check_code(solution: str, tests: list[str], limits: Limits) -> Check:
    """Run the function and every assert in one sandboxed program: a failing assert is a wrong answer."""
    r = run_python(solution + "\n\n" + "\n".join(tests) + "\n", "exec", limits)
    if r.status == "timeout":
        return Check("verifiable_timeout", r.error)
    if r.status == "error":
        reason = "verifiable_wrong_answer" if r.error_type == "AssertionError" else "verifiable_error"
        return Check(reason, f"{r.error_type}: {r.error}" if r.error else r.error_type)
    return Check(None, None)


class VerifiableGate:
    """Keep a row only when running it agrees with it (math: value = stated answer; code: every test passes).

    Rows are dicts with ``kind`` (math | code) and, for math, ``expression`` and ``answer``; for code,
    ``solution``, ``tests`` (generated asserts) and ``seed_tests`` (the seed item's). Runs ``workers`` sandboxes
    at a time (each run is a subprocess: the work is the child's, not this process's).
    """

    name = "verifiable"

    def __init__(self, limits: Limits, workers: int = 2):
        self.limits, self.workers = limits, workers

    def check(self, row: dict[str, Any]) -> Check:
        """One row's verdict."""
        if row["kind"] == "math":
            return check_math(row["expression"], row["answer"], self.limits)
        return check_code(row["solution"], list(row["tests"] or []) + list(row["seed_tests"] or []), self.limits)

    def checks(self, rows: list[dict[str, Any]]) -> list[Check]:
        """Every row's verdict, in row order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.check, rows))

    def apply(self, rows: list[dict[str, Any]]) -> Verdicts:
        """The gate's verdicts (score: 1.0 kept, 0.0 rejected)."""
        got = self.checks(rows)
        return Verdicts([c.reason is None for c in got], [1.0 if c.reason is None else 0.0 for c in got],
                        [c.reason for c in got])


Kind = Literal["math", "code"]
