"""Gate stage core: every gate's verdict on every row, planted rows gated per kind, counts."""

from __future__ import annotations

import pyarrow as pa

from refinery.gates.base import Verdicts
from schemas.gated import GATES
from stages.gate import reason_counts, run_gates, run_gates_by_kind


class Rejects:
    """A gate double that rejects rows whose answer contains ``word``; it records how many rows it saw at once."""

    def __init__(self, name, word):
        self.name, self.word, self.batches = name, word, []

    def apply(self, rows):
        self.batches.append(rows.num_rows)
        answers = rows.column("answer").to_pylist()
        keep = [self.word not in (a or "") for a in answers]
        return Verdicts(keep, [0.0] * len(keep), [None if k else f"{self.name}_hit" for k in keep])


def doubles():
    return {g: Rejects(g, f"<{g}>") for g in GATES}


def test_every_gate_judges_every_row_and_all_reasons_are_kept():
    rows = pa.table({"answer": ["fine", "<rules> and <reward>", "<perplexity>"]})
    out = run_gates(rows, doubles())
    assert out.column("gate_keep").to_pylist() == [True, False, False]
    assert out.column("gate_reasons").to_pylist() == [[], ["rules_hit", "reward_hit"], ["perplexity_hit"]]
    assert out.column("reward_keep").to_pylist() == [True, False, True]  # not only the first failing gate
    counts = reason_counts(out)
    assert counts["total"] == 3 and counts["kept"] == 1
    assert counts["dropped_rules_hit"] == 1 and counts["dropped_perplexity_hit"] == 1
    assert counts["reasons_all"] == {"perplexity_hit": 1, "reward_hit": 1, "rules_hit": 1}
    assert counts["rejected_by_gate"]["reward"] == 1


def test_planted_rows_are_gated_one_kind_at_a_time_and_keep_their_order():
    gates = doubles()
    rows = pa.table({"answer": ["a", "b <dedup>", "c", "d"], "injection_kind": ["clean", "dup", "clean", "dup"]})
    out = run_gates_by_kind(rows, gates)
    assert out.column("answer").to_pylist() == ["a", "b <dedup>", "c", "d"]
    assert gates["dedup"].batches == [2, 2]  # one pass per kind
    assert out.column("gate_keep").to_pylist() == [True, False, True, True]


def test_empty_input_gives_empty_output_with_gate_columns():
    out = run_gates(pa.table({"answer": pa.array([], pa.string())}), doubles())
    assert out.num_rows == 0 and "faithfulness_reason" in out.column_names
    assert reason_counts(out)["total"] == 0


def test_cascade_judges_each_row_only_while_it_stands_and_models_never_see_rejected_rows():
    # given rows that the rules gate, the reward gate and nothing reject
    gates = doubles()
    rows = pa.table({"answer": ["fine", "<rules> <faithfulness>", "<reward> <perplexity>", "also fine"]})
    # when gated in cascade mode
    out = run_gates(rows, gates, "cascade")
    # then each gate saw only the rows every earlier gate kept (CASCADE order), and verdicts it never gave are null
    from refinery.gates.run import CASCADE, judged_rows

    assert CASCADE.index("reward") < CASCADE.index("faithfulness") < CASCADE.index("perplexity")
    assert gates["rules"].batches == [4] and gates["reward"].batches == [3]
    assert gates["faithfulness"].batches == [2] and gates["perplexity"].batches == [2]
    assert out.column("faithfulness_keep").to_pylist() == [True, None, None, True]
    assert out.column("gate_keep").to_pylist() == [True, False, False, True]
    assert out.column("gate_reasons").to_pylist() == [[], ["rules_hit"], ["reward_hit"], []]
    assert judged_rows(out)["perplexity"] == 2 and judged_rows(out)["rules"] == 4
    counts = reason_counts(out)
    assert counts["rejected_by_gate"]["faithfulness"] == 0 and counts["rejected_by_gate"]["rules"] == 1
    # and full mode still gives every verdict on every row, with the same keep decisions
    full = run_gates(rows, doubles(), "full")
    assert full.column("gate_keep").to_pylist() == out.column("gate_keep").to_pylist()
    assert full.column("faithfulness_keep").null_count == 0
