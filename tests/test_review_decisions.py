"""Human review decisions come back: Label Studio and Argilla exports are read, and assemble applies them."""

from __future__ import annotations

import json

import pytest

from refinery.core.errors import InputError
from refinery.inspect.decisions import read_decisions
from stages.assemble import assemble, corrected_row_id
from tests.test_assemble import documents, human_rows, pairs, params, synthetic_rows


def _ls_task(row_id, verdict, answer=None, cancelled=False, updated="2026-12-01T00:00:00"):
    result = [{"from_name": "verdict", "to_name": "answer", "type": "choices", "value": {"choices": [verdict]}}]
    if answer is not None:
        result.append({"from_name": "corrected_answer", "to_name": "answer", "type": "textarea",
                       "value": {"text": [answer]}})
    return {"id": 1, "data": {"row_id": row_id},
            "annotations": [{"result": result, "was_cancelled": cancelled, "updated_at": updated}],
            "predictions": []}


def test_label_studio_export_gives_the_newest_annotation_that_was_not_cancelled(tmp_path):
    task = _ls_task("syn_a", "reject")
    task["annotations"] += [_ls_task("syn_a", "fix", "New answer.", updated="2026-12-02T00:00:00")["annotations"][0],
                            _ls_task("syn_a", "accept", cancelled=True, updated="2026-12-03")["annotations"][0]]
    undecided = {"data": {"row_id": "syn_b"}, "annotations": []}
    path = tmp_path / "export.json"
    path.write_text(json.dumps([task, undecided]))
    [d] = read_decisions(path)
    assert (d.row_id, d.verdict, d.corrected_answer) == ("syn_a", "fix", "New answer.")


def test_argilla_records_flat_and_nested_are_read(tmp_path):
    flat = {"id": "syn_a", "verdict.responses": ["reject"], "corrected_answer.responses": None}
    nested = {"id": "syn_b", "responses": {"verdict": [{"value": "fix", "status": "submitted"}],
                                           "corrected_answer": [{"value": "Better.", "status": "submitted"}]}}
    draft = {"id": "syn_c", "responses": {"verdict": [{"value": "reject", "status": "draft"}]}}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (flat, nested, draft)))
    got = {d.row_id: (d.verdict, d.corrected_answer) for d in read_decisions(path)}
    assert got == {"syn_a": ("reject", None), "syn_b": ("fix", "Better.")}


@pytest.mark.parametrize(("record", "message"), [
    (_ls_task("syn_a", "maybe"), "row 1: field 'annotations.result.verdict': verdict 'maybe' is not one of"),
    (_ls_task("syn_a", "fix"), "row 1: field 'corrected_answer': verdict 'fix' without a corrected answer"),
    ({"verdict.responses": ["reject"]}, "row 1: field 'row_id': a decided record names no row"),
])
def test_bad_decisions_fail_naming_file_record_and_field(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(InputError) as e:
        read_decisions(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_an_empty_list_means_no_decision_and_a_missing_file_is_an_error(tmp_path):
    (tmp_path / "none.json").write_text("[]\n")
    assert read_decisions(tmp_path / "none.json") == []
    with pytest.raises(InputError, match="file not found"):
        read_decisions(tmp_path / "absent.json")


class FakeGates:
    """Judges corrected rows: refuses an answer containing 'forbidden', keeps the rest; records what it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, rows):
        self.seen += rows.column("row_id").to_pylist()
        answers = rows.column("answer").to_pylist()
        return ["forbidden" not in a for a in answers], [["rules_forbidden"] if "forbidden" in a else []
                                                         for a in answers]


def test_assemble_removes_rejected_rows_replaces_fixed_ones_once_the_gates_keep_them():
    from refinery.inspect.decisions import Decision

    train = human_rows(["a"] * 10)
    accepted = synthetic_rows(["a"] * 4)
    ids = accepted.column("row_id").to_pylist()
    decisions = [Decision(ids[0], "reject", None, "f, record 1"),
                 Decision(ids[1], "fix", "A corrected answer.", "f, record 2"),
                 Decision(ids[2], "fix", "A forbidden answer.", "f, record 3"),
                 Decision(ids[3], "accept", None, "f, record 4"),
                 Decision("syn_0000000000000000", "reject", None, "f, record 5")]
    gates = FakeGates()
    result = assemble(train, train, accepted, None, documents(), pairs(train), params(), decisions=decisions,
                      regate=gates)
    curated = {r["row_id"]: r for r in result.tables["curated"].to_pylist()}
    fixed = corrected_row_id(ids[1], "A corrected answer.")
    # then the rejected and both fixed originals are gone, the kept correction is in with its provenance
    assert ids[0] not in curated and ids[1] not in curated and ids[2] not in curated and ids[3] in curated
    assert curated[fixed]["answer"] == "A corrected answer." and curated[fixed]["parent_ids"] == [ids[1]]
    assert curated[fixed]["recovery_action"] == "human_review" and curated[fixed]["source"] == "accepted"
    assert corrected_row_id(ids[2], "A forbidden answer.") not in curated
    # and every corrected row went through the gates; each decision is a row saying what it did
    assert sorted(gates.seen) == sorted([fixed, corrected_row_id(ids[2], "A forbidden answer.")])
    log = {r["reviewed_row_id"]: r for r in result.decisions.to_pylist()}
    assert [log[i]["action"] for i in ids] == ["removed", "replaced", "replacement_rejected", "kept"]
    assert log[ids[2]]["gate_reasons"] == ["rules_forbidden"]
    assert log["syn_0000000000000000"]["action"] == "not_found"
    assert result.metrics["review_decisions"] == {"decisions": 5, "kept": 1, "removed": 1, "replaced": 1,
                                                  "replacement_rejected": 1, "not_found": 1}


def test_without_a_decisions_file_nothing_changes():
    train = human_rows(["a"] * 6)
    accepted = synthetic_rows(["a"] * 3)
    a = assemble(train, train, accepted, None, documents(), pairs(train), params())
    b = assemble(train, train, accepted, None, documents(), pairs(train), params(), decisions=[])
    assert a.tables["curated"].equals(b.tables["curated"]) and a.decisions is None
    assert b.metrics["review_decisions"]["decisions"] == 0
