"""Generate verifiable rows from the math and code seed: plan the teacher calls, parse what comes back strictly.

Math: the teacher writes a new word problem like two seed examples, with the Python expression that computes it
and the answer it states. Code: the teacher solves a seed task (its tests shown) and adds one assert of its own;
the seed item's tests still apply to the new solution.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from refinery.generation.calls import call_seed
from refinery.generation.prompts import Template
from refinery.generation.teacher import Job, cache_key
from refinery.models.backends.base import GenRequest, GenResult
from refinery.verify.check import CodeItem, MathItem

_MATH_STOP = ("\n\n", "\nProblem:", "###")
_CODE_STOP = ("```",)


@dataclass(frozen=True)
class Call:
    """One planned teacher call and the seed item it starts from."""

    job: Job
    kind: str  # math | code
    item: MathItem | CodeItem
    sample_index: int
    template: Template


def plan_calls(math_items: list[MathItem], code_items: list[CodeItem], templates: dict[str, Template], *,
               samples: int, shots: int, seed: int, temperature: float, top_p: float, max_new_tokens: dict[str, int],
               teacher_id: str) -> list[Call]:
    """Plan ``samples`` calls per seed item (math items show ``shots`` other items as examples)."""
    calls = []
    tpl = templates["verifiable_math"]
    for item in math_items:
        others = [m for m in math_items if m.item_id != item.item_id]
        for k in range(samples):
            rng = np.random.default_rng(call_seed(seed, item.item_id, k, "shots"))
            picked = [item] + [others[i] for i in rng.permutation(len(others))[:max(shots - 1, 0)]]
            prompt = tpl.render({}, [m.model_dump() for m in picked])
            req = GenRequest(prompt=prompt, max_new_tokens=max_new_tokens["math"], temperature=temperature,
                             top_p=top_p, stop=_MATH_STOP, seed=call_seed(seed, item.item_id, k))
            calls.append(Call(Job(req, cache_key(teacher_id, tpl.ref, req, k)), "math", item, k, tpl))
    tpl = templates["verifiable_code"]
    for item in code_items:
        for k in range(samples):
            prompt = tpl.render({"entry_point": item.entry_point, "question": item.task,
                                 "tests": "\n".join(item.tests)})
            req = GenRequest(prompt=prompt, max_new_tokens=max_new_tokens["code"], temperature=temperature,
                             top_p=top_p, stop=_CODE_STOP, seed=call_seed(seed, item.item_id, k))
            calls.append(Call(Job(req, cache_key(teacher_id, tpl.ref, req, k)), "code", item, k, tpl))
    return calls


def parse_math(text: str) -> tuple[dict[str, str] | None, str | None]:
    """``<problem>\\nExpression: <expr>\\nAnswer: <number>`` -> fields, or a parse error code."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    problem = lines[0] if lines else ""
    expr = next((x.split(":", 1)[1].strip() for x in lines[1:] if x.lower().startswith("expression:")), "")
    answer = next((x.split(":", 1)[1].strip() for x in lines[1:] if x.lower().startswith("answer:")), "")
    if not problem:
        return None, "parse_missing_question"
    if not expr:
        return None, "parse_missing_expression"
    if not answer:
        return None, "parse_missing_answer"
    return {"question": problem, "expression": expr, "answer": answer}, None


_ASSERT = re.compile(r"^assert\s")


def parse_code(text: str, entry_point: str) -> tuple[dict[str, Any] | None, str | None]:
    """The function (every line that is not a top-level assert) and the generated asserts, or a parse error."""
    lines = text.rstrip().splitlines()
    tests = [x.rstrip() for x in lines if _ASSERT.match(x)]
    solution = "\n".join(x for x in lines if not _ASSERT.match(x)).strip("\n")
    if not re.search(rf"^def {re.escape(entry_point)}\s*\(", solution, re.M):
        return None, "parse_missing_function"
    return {"solution": solution, "tests": tests}, None


def to_rows(calls: list[Call], results: list[GenResult], teacher_id: str) -> list[dict[str, Any]]:
    """One row per call: parsed fields, or the call's error / parse error (nothing dropped)."""
    rows = []
    for c, r in zip(calls, results):
        item = c.item
        row: dict[str, Any] = {
            "row_id": "ver_" + hashlib.sha256(c.job.key.encode()).hexdigest()[:16], "kind": c.kind,
            "parent_id": item.item_id, "sample_index": c.sample_index, "prompt_template": c.template.ref,
            "teacher_id": teacher_id, "question": None, "expression": None, "answer": None, "solution": None,
            "tests": [], "seed_tests": list(item.tests) if c.kind == "code" else [], "raw": r.text,
            "error": r.error if not r.ok else None, "parse_error": None,
            "completion_tokens": int(r.completion_tokens)}
        if r.ok:
            if c.kind == "math":
                got, row["parse_error"] = parse_math(r.text)
            else:
                got, row["parse_error"] = parse_code(r.text, item.entry_point)
                row["question"] = item.task
            row.update(got or {})
        rows.append(row)
    return rows
