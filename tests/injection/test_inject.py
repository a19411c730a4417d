"""Inject stage: every kind planted with its label, from the right split, deterministically, within contract."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.core.errors import InputError, ParamsError, RefineryError
from refinery.core.params import parse_section
from refinery.core.text import stable_id
from schemas import injected as injected_schema
from schemas.injected import KINDS
from stages.inject import TRAIN_KINDS, VAL_KINDS, InjectParams, cli, inject
from tests.injection.conftest import DOCS, TRAIN, VAL, documents_table, split_table

ALL = InjectParams(seed=7, kinds=list(KINDS), per_kind=2, clean_controls=3)


def by_kind(table: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        out.setdefault(r["injection_kind"], []).append(r)
    return out


def test_every_kind_is_planted_from_its_split_with_its_label(tables):
    # given a tiny train / val split
    train, val, documents = tables
    sources = {r["row_id"]: r for r in train.to_pylist() + val.to_pylist()}
    train_ids, val_ids = set(train.column("row_id").to_pylist()), set(val.column("row_id").to_pylist())
    # when every kind is injected
    table, metrics = inject(train, val, documents, ALL, "test")
    rows = by_kind(table)
    # then each kind yields rows, labelled and stamped like synthetic rows, from the split it belongs to
    assert set(rows) == set(KINDS) | {"clean"}
    for kind, kind_rows in rows.items():
        assert metrics["produced"][kind] == len(kind_rows) >= 1
        for r in kind_rows:
            src = sources[r["injection_source"]]
            assert r["origin"] == "injected" and r["parent_ids"] == [src["row_id"]]
            assert (r["doc_id"], r["evidence_start"], r["evidence_end"], r["evidence"], r["intent"]) == \
                   (src["doc_id"], src["evidence_start"], src["evidence_end"], src["evidence"], src["intent"])
            assert r["raw_output"] == r["answer"] and r["strategy"] is None and r["seed"] == 7
            assert r["row_id"] == stable_id("inj", kind, src["row_id"], r["question"], r["answer"])
            if kind in TRAIN_KINDS:
                assert src["row_id"] in train_ids
            else:
                assert src["row_id"] in val_ids
            if kind in VAL_KINDS:  # the answer is corrupted, the question kept
                assert r["question"] == src["question"] and r["answer"] != src["answer"]
                assert r["injection_field"] == "answer" and r["injection_detail"]
    # the always-applicable kinds fill their quota
    for kind in ("unsupported_claim", "truncation", "refusal", "duplicate", "clean"):
        assert metrics["produced"][kind] == metrics["requested"][kind]


def test_duplicate_copies_a_train_row_and_clean_controls_are_unmodified(tables):
    train, val, documents = tables
    table, _ = inject(train, val, documents, ALL, "test")
    rows = by_kind(table)
    train_pairs = {(r["question"], r["answer"]) for r in train.to_pylist()}
    val_rows = {r["row_id"]: r for r in val.to_pylist()}
    assert all((r["question"], r["answer"]) in train_pairs and r["injection_field"] == "both"
               for r in rows["duplicate"])
    for r in rows["clean"]:
        src = val_rows[r["injection_source"]]
        assert (r["question"], r["answer"], r["injection_detail"]) == (src["question"], src["answer"], None)


def test_near_duplicate_and_paraphrase_stay_close_to_their_train_row(tables):
    train, val, documents = tables
    table, _ = inject(train, val, documents, ALL, "test")
    sources = {r["row_id"]: r for r in train.to_pylist()}
    for r in by_kind(table)["near_duplicate"] + by_kind(table)["seed_paraphrase"]:
        src = sources[r["injection_source"]]
        changed = {f for f in ("question", "answer") if r[f] != src[f]}
        assert changed and r["injection_field"] == ("both" if len(changed) == 2 else changed.pop())
        for f in ("question", "answer"):
            assert len(set(r[f].split()) ^ set(src[f].split())) <= 10  # a few word edits, not a rewrite


def test_other_document_answers_come_from_a_different_document_once_each(tables):
    train, val, documents = tables
    params = InjectParams(seed=5, kinds=["other_document"], per_kind=len(VAL), clean_controls=0)
    table, _ = inject(train, val, documents, params, "test")
    answer_doc = {r["answer"]: r["doc_id"] for r in val.to_pylist()}
    answers = table.column("answer").to_pylist()
    assert len(answers) >= 3 and len(set(answers)) == len(answers)  # never two planted rows with one answer
    for r in table.to_pylist():
        assert r["answer"] in answer_doc and answer_doc[r["answer"]] != r["doc_id"]


def test_an_edit_of_only_punctuation_does_not_count_as_a_paraphrase():
    # given a train row whose only paraphrase rule is the opening 'Yes, ' -> 'Yes. ' (an exact copy by match_key)
    row = ("t9", "d1", "Is it on?", "Yes, it works that way here.", "Refunds are issued within 14 days.")
    train, val = split_table([row], "train"), split_table(VAL, "val")
    params = InjectParams(seed=1, kinds=["seed_paraphrase"], per_kind=1, clean_controls=0)
    # when seed_paraphrase is asked for
    table, metrics = inject(train, val, documents_table(), params, "test")
    # then no row is planted and the attempt counts as not applicable
    assert table.num_rows == 0 and metrics["not_applied"]["seed_paraphrase"] == 1


def test_a_kind_that_cannot_apply_moves_on_to_the_next_row_and_reports_the_shortfall(tables):
    # given a val split where only v3 holds a number
    train, val, documents = tables
    params = InjectParams(seed=3, kinds=["number_change"], per_kind=len(VAL), clean_controls=0)
    # when number_change is asked for every val row
    table, metrics = inject(train, val, documents, params, "test")
    # then the one row that can take it is used, and the others are counted as not applicable
    assert table.column("injection_source").to_pylist() == [stable_id("qa", "v3")]
    assert metrics["requested"]["number_change"] == 4 and metrics["produced"]["number_change"] == 1
    assert metrics["not_applied"]["number_change"] == 3 and metrics["short"] == 3
    # and a quota of one still finds v3 whatever the seeded order
    for seed in range(4):
        one, _ = inject(train, val, documents, InjectParams(seed=seed, kinds=["number_change"], per_kind=1,
                                                            clean_controls=0), "test")
        assert one.column("injection_source").to_pylist() == [stable_id("qa", "v3")]


def test_same_seed_same_rows_and_kinds_do_not_disturb_each_other(tables):
    train, val, documents = tables
    a, ma = inject(train, val, documents, ALL, "test")
    b, mb = inject(train, val, documents, ALL, "test")
    assert a.equals(b) and ma == mb
    # dropping a kind leaves the other kinds' rows unchanged (one seeded stream per kind)
    fewer, _ = inject(train, val, documents, ALL.model_copy(update={"kinds": ["refusal", "entity_swap"]}), "test")
    keep = [r["row_id"] for r in a.to_pylist() if r["injection_kind"] in ("refusal", "entity_swap", "clean")]
    assert fewer.column("row_id").to_pylist() == keep


def test_output_passes_the_injected_contract(tables):
    train, val, documents = tables
    table, metrics = inject(train, val, documents, ALL, "test")
    assert injected_schema.CONTRACT.validate(table, "injected.parquet").num_rows == metrics["rows"]


def test_contract_rejects_an_unknown_kind(tables):
    train, val, documents = tables
    table, _ = inject(train, val, documents, InjectParams(seed=1, kinds=["refusal"], per_kind=1,
                                                          clean_controls=0), "test")
    bad = table.set_column(table.schema.get_field_index("injection_kind"), "injection_kind",
                           pa.array(["typo"], pa.string()))
    with pytest.raises(InputError, match="injection_kind"):
        injected_schema.CONTRACT.validate(bad, "injected.parquet")


def test_missing_column_is_a_clear_error(tables):
    train, val, documents = tables
    with pytest.raises(InputError, match=r"inject val: field 'evidence': missing column\(s\) evidence"):
        inject(train, val.drop_columns(["evidence"]), documents, ALL, "test")


def test_empty_val_split_is_a_clear_error(tables):
    train, _, documents = tables
    with pytest.raises(RefineryError, match="val split is empty"):
        inject(train, split_table([], "val"), documents, ALL, "test")


def test_row_without_its_document_is_a_clear_error(tables):
    train, val, _ = tables
    with pytest.raises(RefineryError, match="no document 'd5'"):
        inject(train, val, documents_table([d for d in DOCS if d[0] != "d5"]), ALL, "test")


def test_params_reject_unknown_and_repeated_kinds():
    with pytest.raises(ParamsError, match=r"inject\.kinds.*unknown kind typo"):
        parse_section({"seed": 1, "kinds": ["typo"], "per_kind": 1, "clean_controls": 0}, InjectParams,
                      where="params.yaml: inject")
    with pytest.raises(ParamsError, match="repeat"):
        parse_section({"seed": 1, "kinds": ["refusal", "refusal"], "per_kind": 1, "clean_controls": 0},
                      InjectParams, where="params.yaml: inject")


def test_command_writes_validated_rows_and_metrics(in_tmp):
    # given split and documents files and a params file with an inject section
    pq.write_table(split_table(TRAIN, "train"), in_tmp / "train.parquet")
    pq.write_table(split_table(VAL, "val"), in_tmp / "val.parquet")
    pq.write_table(documents_table(), in_tmp / "documents.parquet")
    (in_tmp / "params.yaml").write_text("inject:\n  seed: 42\n  kinds: [refusal, duplicate]\n  per_kind: 2\n"
                                        "  clean_controls: 1\n")
    # when the command runs
    result = CliRunner().invoke(cli, ["--params", "params.yaml", "--train", "train.parquet", "--val",
                                      "val.parquet", "--documents", "documents.parquet", "--out",
                                      "out/injected.parquet", "--metrics", "metrics/inject.json"])
    # then the output has the explicit schema and the metrics count it
    assert result.exit_code == 0, result.output
    table = pq.read_table(in_tmp / "out" / "injected.parquet")
    assert table.schema.equals(injected_schema.ARROW) and table.num_rows == 5
    metrics = json.loads((in_tmp / "metrics" / "inject.json").read_text())
    assert metrics["produced"] == {"refusal": 2, "duplicate": 2, "clean": 1} and metrics["rows"] == 5


def test_unseen_families_name_known_families_and_map_to_their_kinds():
    import pydantic

    from refinery.planted.corruptions import FAMILIES, kinds_of, unseen_kinds
    from refinery.core.errors import ParamsError
    from stages.inject import InjectParams

    base = dict(seed=1, kinds=["entity_swap"], per_kind=1, clean_controls=1)
    assert InjectParams(**base, unseen_families=["polarity"]).unseen_families == ["polarity"]
    with pytest.raises(pydantic.ValidationError, match="unknown corruption family 'polarty'"):
        InjectParams(**base, unseen_families=["polarty"])
    assert kinds_of(["misattribution", "polarity"]) == ("negation_flip", "other_document")
    assert sorted(k for ks in FAMILIES.values() for k in ks) == sorted(
        ("entity_swap", "number_change", "negation_flip", "unsupported_claim", "other_document"))
    with pytest.raises(ParamsError, match=r"^p.yaml: inject.unseen_families: expected a list"):
        unseen_kinds("polarity", "p.yaml")
