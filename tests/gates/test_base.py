"""The shared gate base: fail-closed handling for gates that call a model, and per-gate stats."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.gates.base import BaseGate, Verdicts


class Flaky(BaseGate):
    """Rejects answers holding 'bad'; its 'model' raises when a batch holds 'boom'."""

    name = "flaky"

    def __init__(self, fail_closed: bool):
        super().__init__()
        self.fail_closed, self.calls = fail_closed, 0

    def judge(self, rows):
        self.calls += 1
        answers = rows.column("answer").to_pylist()
        if "boom" in answers:
            raise RuntimeError("CUDA error: out of memory")
        keep = ["bad" not in a for a in answers]
        return Verdicts(keep, [1.0] * len(keep), [None if k else "flaky_bad" for k in keep])


def table(*answers):
    return pa.table({"answer": list(answers)})


def test_a_fail_closed_gate_rejects_the_whole_batch_when_its_model_fails_and_keeps_the_message():
    gate = Flaky(fail_closed=True)
    v = gate.apply(table("fine", "boom"))
    assert (v.keep, v.score, v.reason) == ([False, False], [None, None], ["flaky_error", "flaky_error"])
    assert gate.last_error == "RuntimeError: CUDA error: out of memory"
    # the next batch is judged afresh
    v = gate.apply(table("fine", "bad"))
    assert v.reason == [None, "flaky_bad"] and gate.last_error is None
    assert gate.stats.as_dict() == {"judged": 4, "kept": 1, "failed_batches": 1,
                                    "reasons": {"flaky_bad": 1, "flaky_error": 2}}


def test_a_gate_without_a_model_lets_a_bug_stop_the_run():
    with pytest.raises(RuntimeError, match="CUDA error"):
        Flaky(fail_closed=False).apply(table("boom"))


def test_an_empty_batch_is_not_judged():
    gate = Flaky(fail_closed=True)
    assert gate.apply(table()).keep == [] and gate.calls == 0 and gate.stats.judged == 0
