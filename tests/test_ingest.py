"""Ingest: the core on a tiny seed, and every kind of bad input through the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refinery.cli import main
from tests.conftest import COSMOSQA, TINY_DOCS, TINY_QA, needs_cosmosqa, params_for, write_jsonl


def run_ingest(tmp: Path, seed: Path, fmt: str = "refinery", **ingest_overrides) -> int:
    params = params_for(tmp, ingest={"format": fmt, "input": str(seed), **ingest_overrides})
    return main(["ingest", "--params", str(params), "--input", str(seed), "--out", str(tmp / "out"),
                 "--metrics", str(tmp / "metrics" / "ingest.json")])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def assert_no_output(tmp: Path) -> None:
    assert not (tmp / "out").exists()
    assert not (tmp / "metrics").exists()
    assert not list(tmp.glob(".refinery-tmp-*"))


def test_tiny_seed_ingests_with_ids_spans_and_stale_docs(in_tmp, tiny_seed, capsys):
    # given a five-document seed where d2 supersedes d1
    # when ingest runs
    assert run_ingest(in_tmp, tiny_seed) == 0
    # then documents and QA rows are written with stable ids and exact evidence spans
    docs = pq.read_table(in_tmp / "out" / "documents.parquet").to_pylist()
    qa = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()
    assert [d["doc_id"] for d in docs] == ["d1", "d2", "d3", "d4", "d5"]
    stale = {d["doc_id"]: (d["stale"], d["superseded_by"]) for d in docs}
    assert stale["d1"] == (True, "d2") and stale["d2"] == (False, None)
    assert docs[0]["text"] == "Refunds are issued within 14 days. Contact billing to start one."  # spaces collapsed
    text = {d["doc_id"]: d["text"] for d in docs}
    for row in qa:
        assert text[row["doc_id"]][row["evidence_start"]:row["evidence_end"]] == row["evidence"]
        assert row["origin"] == "human" and row["parent_ids"] == [] and row["row_id"].startswith("qa_")
    metrics = json.loads((in_tmp / "metrics" / "ingest.json").read_text())
    assert metrics["documents"] == 5 and metrics["qa_rows"] == 7 and metrics["stale_documents"] == 1


def test_row_ids_are_stable_across_runs_and_machines(in_tmp, tiny_seed):
    # given the same seed ingested twice into different folders
    assert run_ingest(in_tmp, tiny_seed) == 0
    first = pq.read_table(in_tmp / "out" / "qa.parquet").column("row_id").to_pylist()
    (in_tmp / "out").rename(in_tmp / "out1")
    assert run_ingest(in_tmp, tiny_seed) == 0
    # then the ids are identical (they derive from content only)
    assert pq.read_table(in_tmp / "out" / "qa.parquet").column("row_id").to_pylist() == first


def test_duplicate_content_is_excluded_with_a_reason_not_dropped(in_tmp, tmp_path, capsys):
    # given two QA rows that differ only in case and punctuation
    seed = tmp_path / "seed"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA + [{**TINY_QA[0], "qa_id": "q99", "question": "how long do REFUNDS take"}])
    # when ingest runs, then it succeeds and the copy is in excluded.parquet with its reason
    assert run_ingest(in_tmp, seed) == 0
    excluded = pq.read_table(in_tmp / "out" / "excluded.parquet").to_pylist()
    assert [(e["qa_id"], e["reason"]) for e in excluded] == [("q99", "ingest_duplicate_content")]
    assert "row 1" in excluded[0]["detail"]


def test_csv_and_parquet_inputs_read_like_jsonl(in_tmp, tmp_path):
    import pyarrow as pa

    seed = tmp_path / "seedcsv"
    seed.mkdir()
    pq.write_table(pa.Table.from_pylist(TINY_DOCS), seed / "documents.parquet")
    import csv

    with (seed / "qa.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(TINY_QA[0]))
        w.writeheader()
        w.writerows(TINY_QA)
    assert run_ingest(in_tmp, seed) == 0
    assert pq.read_table(in_tmp / "out" / "qa.parquet").num_rows == len(TINY_QA)


# ---- bad input: one line naming file, row and field; exit != 0; no partial output ----

def _seed_with(tmp_path: Path, docs=None, qa=None, qa_text: bytes | None = None, qa_name="qa.jsonl") -> Path:
    seed = tmp_path / "bad"
    write_jsonl(seed / "documents.jsonl", docs if docs is not None else TINY_DOCS)
    if qa_text is not None:
        (seed / qa_name).write_bytes(qa_text)
    else:
        write_jsonl(seed / qa_name, qa if qa is not None else TINY_QA)
    return seed


def test_missing_seed_folder(in_tmp, capsys):
    assert run_ingest(in_tmp, in_tmp / "nope") == 2
    line = one_error_line(capsys)
    assert "nope" in line and "not found" in line
    assert_no_output(in_tmp)


def test_unknown_file_format(in_tmp, tmp_path, capsys):
    seed = _seed_with(tmp_path, qa_text=b"x", qa_name="qa.xlsx")
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.xlsx" in line and "unknown file format '.xlsx'" in line
    assert_no_output(in_tmp)


def test_misnamed_required_column(in_tmp, tmp_path, capsys):
    qa = [{("qustion" if k == "question" else k): v for k, v in r.items()} for r in TINY_QA]
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl" in line and "field 'question'" in line and "did you mean 'qustion'" in line
    assert_no_output(in_tmp)


def test_empty_file(in_tmp, tmp_path, capsys):
    seed = _seed_with(tmp_path, qa_text=b"")
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl" in line and "empty file" in line
    assert_no_output(in_tmp)


def test_header_only_csv_is_empty(in_tmp, tmp_path, capsys):
    seed = _seed_with(tmp_path, qa_text=b"qa_id,doc_id,question,answer,intent,evidence\n", qa_name="qa.csv")
    assert run_ingest(in_tmp, seed) == 2
    assert "empty file" in one_error_line(capsys)


def test_whitespace_only_text(in_tmp, tmp_path, capsys):
    docs = [dict(d) for d in TINY_DOCS]
    docs[2]["text"] = "  \n\t "
    seed = _seed_with(tmp_path, docs=docs)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "documents.jsonl: row 3: field 'text': empty or whitespace-only" in line
    assert_no_output(in_tmp)


def test_duplicate_ids(in_tmp, tmp_path, capsys):
    qa = TINY_QA + [{**TINY_QA[2], "qa_id": "q1", "question": "Something else entirely?"}]
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "row 8: field 'qa_id': duplicate id 'q1' (first at row 1)" in line
    assert_no_output(in_tmp)


def test_qa_row_whose_document_is_missing(in_tmp, tmp_path, capsys):
    qa = [dict(r) for r in TINY_QA]
    qa[4]["doc_id"] = "d404"
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    assert "row 5: field 'doc_id': no document with doc_id 'd404'" in one_error_line(capsys)
    assert_no_output(in_tmp)


def test_non_utf8_bytes(in_tmp, tmp_path, capsys):
    lines = [json.dumps(r).encode() for r in TINY_QA]
    lines[3] = lines[3].replace(b"Where is export?", b"Where is \xff export?")
    seed = _seed_with(tmp_path, qa_text=b"\n".join(lines) + b"\n")
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl: row 4: field 'question': invalid UTF-8 byte 0xff" in line
    assert_no_output(in_tmp)


def test_non_utf8_bytes_in_csv(in_tmp, tmp_path, capsys):
    text = b"qa_id,doc_id,question,answer,intent,evidence\nq1,d1,How long?,Within 14 days,billing,\xe9t\xe9\n"
    seed = _seed_with(tmp_path, qa_text=text, qa_name="qa.csv")
    assert run_ingest(in_tmp, seed) == 2
    assert "qa.csv: row 1: field 'evidence': invalid UTF-8 byte 0xe9" in one_error_line(capsys)


def test_five_megabyte_field(in_tmp, tmp_path, capsys):
    docs = [dict(d) for d in TINY_DOCS]
    docs[1]["text"] = "word " * (1024 * 1024)  # 5 MiB
    seed = _seed_with(tmp_path, docs=docs)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "documents.jsonl: row 2: field 'text': 5,242,880 characters, over the limit of 200,000" in line
    assert_no_output(in_tmp)


def test_null_and_nan_in_required_fields(in_tmp, tmp_path, capsys):
    qa = [dict(r) for r in TINY_QA]
    qa[1]["answer"] = None
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    assert "qa.jsonl: row 2: field 'answer': missing value (null/NaN)" in one_error_line(capsys)
    # NaN in a Parquet table
    import pyarrow as pa

    seed2 = tmp_path / "nan"
    write_jsonl(seed2 / "documents.jsonl", TINY_DOCS)
    table = pa.Table.from_pylist(TINY_QA).set_column(
        5, "evidence", pa.array([r["evidence"] for r in TINY_QA[:-1]] + [None]))
    pq.write_table(table, seed2 / "qa.parquet")
    assert run_ingest(in_tmp, seed2) == 2
    assert "qa.parquet: row 7: field 'evidence': missing value (null/NaN)" in one_error_line(capsys)
    assert_no_output(in_tmp)


def test_evidence_not_in_document(in_tmp, tmp_path, capsys):
    qa = [dict(r) for r in TINY_QA]
    qa[0]["evidence"] = "Refunds take a week."
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    assert "row 1: field 'evidence': not found verbatim in the text of document 'd1'" in one_error_line(capsys)


def test_unknown_supersedes_target(in_tmp, tmp_path, capsys):
    docs = [dict(d) for d in TINY_DOCS]
    docs[1]["supersedes"] = "d0"
    seed = _seed_with(tmp_path, docs=docs)
    assert run_ingest(in_tmp, seed) == 2
    assert "documents.jsonl: row 2: field 'supersedes': no document with doc_id 'd0'" in one_error_line(capsys)


def test_unknown_format_param_names_the_key(in_tmp, tiny_seed, capsys):
    assert run_ingest(in_tmp, tiny_seed, fmt="xlsx") == 2
    line = one_error_line(capsys)
    assert "ingest.format" in line
    assert_no_output(in_tmp)


def _cosmos(tmp_path: Path, rows: list[dict]) -> Path:
    import csv

    path = tmp_path / "cosmos.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "context", "question", "answer0", "answer1", "answer2", "answer3",
                                          "label"])
        w.writeheader()
        w.writerows(rows)
    return path


COSMOS_ROW = {"id": "c1", "context": "I missed the bus , so I walked to work in the rain .",
              "question": "Why did I walk to work ?", "answer0": "I missed the bus", "answer1": "I like rain",
              "answer2": "None of the above choices .", "answer3": "My car broke", "label": "0"}


def test_cosmosqa_label_out_of_range(in_tmp, tmp_path, capsys):
    path = _cosmos(tmp_path, [COSMOS_ROW, {**COSMOS_ROW, "id": "c2", "label": "7"}])
    assert run_ingest(in_tmp, path, fmt="cosmosqa") == 2
    assert "cosmos.csv: row 2: field 'label': 7 is out of range 0..3" in one_error_line(capsys)
    assert_no_output(in_tmp)


def test_cosmosqa_reference_is_the_correct_option_and_none_of_the_above_is_excluded(in_tmp, tmp_path):
    path = _cosmos(tmp_path, [COSMOS_ROW, {**COSMOS_ROW, "id": "c2", "question": "What else ?", "label": "2"}])
    assert run_ingest(in_tmp, path, fmt="cosmosqa") == 0
    qa = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()
    assert [(r["qa_id"], r["answer"], r["intent"]) for r in qa] == [("c1", "I missed the bus", "cause")]
    assert qa[0]["evidence"] == COSMOS_ROW["context"]  # the whole context is the evidence
    excluded = pq.read_table(in_tmp / "out" / "excluded.parquet").to_pylist()
    assert [(e["qa_id"], e["reason"]) for e in excluded] == [("c2", "ingest_no_reference_answer")]


def test_squad_json(in_tmp, tmp_path):
    context = "The Eiffel Tower is in Paris. It was finished in 1889. It is 330 metres tall."
    squad = {"data": [{"title": "Eiffel", "paragraphs": [{"context": context, "qas": [
        {"id": "s1", "question": "When was it finished?", "answers": [{"text": "1889", "answer_start": 49}]},
        {"id": "s2", "question": "Who owns it?", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    assert run_ingest(in_tmp, path, fmt="squad") == 0
    qa = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()
    assert [(r["qa_id"], r["answer"], r["evidence"]) for r in qa] == [("s1", "1889", "It was finished in 1889.")]
    excluded = pq.read_table(in_tmp / "out" / "excluded.parquet").to_pylist()
    assert [(e["qa_id"], e["reason"]) for e in excluded] == [("s2", "ingest_unanswerable")]


def test_hf_format_without_datasets_package_says_what_to_install(in_tmp, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    assert run_ingest(in_tmp, Path("squad"), fmt="hf") == 2
    assert "needs the `datasets` package" in one_error_line(capsys)


@needs_cosmosqa()
def test_cosmosqa_shared_file_ingests(in_tmp):
    assert run_ingest(in_tmp, COSMOSQA, fmt="cosmosqa") == 0
    m = json.loads((in_tmp / "metrics" / "ingest.json").read_text())
    assert m["source_qa_rows"] == 1963
    assert m["qa_rows"] + m["excluded"] == 1963
    assert m["excluded_ingest_no_reference_answer"] > 0


# ---- seed edge cases: each a clear error naming file, row and field, or an explicit, counted decision ----

def test_a_nul_byte_in_a_field_is_an_error_naming_row_and_field(in_tmp, tmp_path, capsys):
    qa = [dict(r) for r in TINY_QA]
    qa[2]["answer"] = "PDF\x00 and Markdown."
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl: row 3: field 'answer': contains a NUL byte (U+0000) at character 4" in line
    assert_no_output(in_tmp)


def test_a_nul_byte_in_a_csv_field_is_an_error_too(in_tmp, tmp_path, capsys):
    header = b"qa_id,doc_id,question,answer,intent,evidence\n"
    row = b'q1,d1,How long?\x00,Within 14 days.,billing,Refunds are issued within 14 days.\n'
    seed = _seed_with(tmp_path, qa_text=header + row, qa_name="qa.csv")
    assert run_ingest(in_tmp, seed) == 2
    assert "qa.csv: row 1: field 'question': contains a NUL byte" in one_error_line(capsys)
    assert_no_output(in_tmp)


def test_a_number_where_a_question_belongs_is_an_error_not_the_text_42(in_tmp, tmp_path, capsys):
    qa = [dict(r) for r in TINY_QA]
    qa[1]["question"] = 42
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl: row 2: field 'question': expected text (a JSON string), got int 42" in line
    assert_no_output(in_tmp)


def test_a_whole_number_id_is_read_as_an_id(in_tmp, tmp_path):
    docs = [{**d, "doc_id": i + 1, "supersedes": 1 if d["supersedes"] else None} for i, d in enumerate(TINY_DOCS)]
    ids = {d["doc_id"]: i + 1 for i, d in enumerate(TINY_DOCS)}
    qa = [{**r, "doc_id": ids[r["doc_id"]], "qa_id": n} for n, r in enumerate(TINY_QA, start=100)]
    seed = _seed_with(tmp_path, docs=docs, qa=qa)
    assert run_ingest(in_tmp, seed) == 0
    rows = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()
    assert rows[0]["qa_id"] == "100" and rows[0]["doc_id"] == "1"


def test_an_unreadable_input_file_is_one_line(in_tmp, tmp_path, capsys, monkeypatch):
    # (root reads any file whatever its mode, so the refusal is simulated where the file is read)
    seed = _seed_with(tmp_path)
    real = Path.read_bytes

    def refuse(self):
        if self.name == "qa.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl: cannot be read: permission denied" in line and "[EACCES]" in line
    assert_no_output(in_tmp)


def test_whole_input_errors_name_the_input_path_not_the_params_value(in_tmp, tmp_path, capsys):
    # given a seed whose every QA row is a duplicate of another... of none: all rows point nowhere usable
    seed = tmp_path / "given_on_the_command_line"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    (seed / "qa.jsonl").write_text("")
    params = params_for(in_tmp, ingest={"format": "qa_table", "input": "params/value/elsewhere.csv"})
    table = tmp_path / "table.csv"
    table.write_text("question,answer,context\n")
    assert main(["ingest", "--params", str(params), "--input", str(table), "--out", str(in_tmp / "out"),
                 "--metrics", str(in_tmp / "metrics" / "ingest.json")]) == 2
    line = one_error_line(capsys)
    assert str(table) in line and "params/value" not in line


def test_no_usable_rows_names_the_input_path(in_tmp, tmp_path, capsys):
    from refinery.seed import adapters
    from refinery.core.errors import InputError
    from stages.ingest import IngestParams, ingest

    src = adapters.SeedSource(documents=[adapters.RawDoc("d1", "Text.", "docs.jsonl", 1)], path="the/input")
    import pytest

    with pytest.raises(InputError, match=r"^the/input: no usable QA rows"):
        ingest(src, IngestParams(input="the/params/value", format="refinery", max_field_chars=100), "test")


def test_cosmosqa_errors_name_the_csv_columns(in_tmp, tmp_path, capsys):
    header = "id,context,question,answer0,answer1,answer2,answer3,label\n"
    rows = ('a1,"She left early.",Why did she leave?,Tired,Bored,Late,Sick,0\n'
            'a1,"She left early.",Where did she go?,Home,Work,Park,Shop,1\n')
    path = tmp_path / "cosmos.csv"
    path.write_text(header + rows)
    params = params_for(in_tmp, ingest={"format": "cosmosqa", "input": str(path)})
    assert main(["ingest", "--params", str(params), "--input", str(path), "--out", str(in_tmp / "out"),
                 "--metrics", str(in_tmp / "m.json")]) == 2
    line = one_error_line(capsys)
    assert "cosmos.csv: row 2: field 'id': duplicate id 'a1' (first at row 1)" in line
    # and a too-long context is named by its CSV column, not the internal 'text'
    path.write_text(header + 'a1,"' + "x" * 50 + '",Why?,A,B,C,D,0\n')
    params = params_for(in_tmp, ingest={"format": "cosmosqa", "input": str(path), "max_field_chars": 20})
    assert main(["ingest", "--params", str(params), "--input", str(path), "--out", str(in_tmp / "out"),
                 "--metrics", str(in_tmp / "m.json")]) == 2
    assert "cosmos.csv: row 1: field 'context': 50 characters, over the limit" in one_error_line(capsys)


def test_a_misspelt_column_is_an_error_listing_it_not_silently_dropped(in_tmp, tmp_path, capsys):
    docs = [{("supercedes" if k == "supersedes" else k): v for k, v in d.items()} for d in TINY_DOCS]
    seed = _seed_with(tmp_path, docs=docs)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "documents.jsonl: field 'supercedes': unknown column(s) 'supercedes' (did you mean 'supersedes'?)" in line
    assert "ingest.unknown_columns: ignore" in line
    assert_no_output(in_tmp)


def test_unknown_columns_can_be_ignored_and_are_counted(in_tmp, tmp_path):
    qa = [{**r, "reviewer": "ann"} for r in TINY_QA]
    seed = _seed_with(tmp_path, qa=qa)
    assert run_ingest(in_tmp, seed, unknown_columns="ignore") == 0
    metrics = json.loads((in_tmp / "metrics" / "ingest.json").read_text())
    assert metrics["ignored_columns"] == {"qa.jsonl": ["reviewer"]}


def test_evidence_found_twice_in_its_document_is_an_error_naming_both_places(in_tmp, tmp_path, capsys):
    docs = [dict(d) for d in TINY_DOCS]
    text = "You can export notes as PDF or Markdown from the File menu. Or open the File menu."
    docs[2]["text"] = text
    qa = [dict(r) for r in TINY_QA]
    qa[3]["evidence"] = "the File menu"
    seed = _seed_with(tmp_path, docs=docs, qa=qa)
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    first, second = text.index("the File menu"), text.rindex("the File menu")
    assert (f"qa.jsonl: row 4: field 'evidence': found 2 times in the text of document 'd3' (at characters "
            f"{first}, {second}): quote a longer span") in line
    assert_no_output(in_tmp)


def test_squad_evidence_that_stands_twice_takes_the_sentence_answer_start_points_at(in_tmp, tmp_path):
    context = "Press Save. Then close it. Press Save."
    squad = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "s1", "question": "What next?", "answers": [{"text": "Press Save", "answer_start": 27}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    params = params_for(in_tmp, ingest={"format": "squad", "input": str(path)})
    assert main(["ingest", "--params", str(params), "--input", str(path), "--out", str(in_tmp / "out"),
                 "--metrics", str(in_tmp / "m.json")]) == 0
    row = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()[0]
    assert (row["evidence_start"], row["evidence"]) == (27, "Press Save.")


def test_a_symlink_loop_is_reported_as_a_loop_not_as_missing(in_tmp, tmp_path, capsys):
    seed = _seed_with(tmp_path)
    (seed / "qa.jsonl").unlink()
    (seed / "qa.jsonl").symlink_to(seed / "qa.jsonl")
    assert run_ingest(in_tmp, seed) == 2
    line = one_error_line(capsys)
    assert "qa.jsonl" in line and "symlink loop" in line and "not found" not in line
    assert_no_output(in_tmp)


def _hf_folder(tmp: Path) -> Path:
    """A local dataset folder that datasets.load_dataset reads offline like a hub id (QA-table columns)."""
    folder = tmp / "hf_ds"
    folder.mkdir()
    rows = [{"context": "The Eiffel Tower was finished in 1889. It is in Paris.", "question": q, "answer": a}
            for q, a in (("When was the tower finished?", "1889"), ("Where is the tower?", "Paris"))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hf_format_reads_ingest_hf_dataset_not_the_input_path(in_tmp):
    pytest.importorskip("datasets", reason="datasets not installed (dev extra)")
    folder = _hf_folder(in_tmp)
    # given format hf naming the dataset in params, and --input a path that holds no seed
    assert run_ingest(in_tmp, in_tmp / "unused", fmt="hf", hf_dataset=str(folder)) == 0
    qa = pq.read_table(in_tmp / "out" / "qa.parquet").to_pylist()
    assert sorted(r["answer"] for r in qa) == ["1889", "Paris"]


def test_hf_format_offline_says_it_needs_the_network(in_tmp, capsys, monkeypatch):
    pytest.importorskip("datasets", reason="datasets not installed (dev extra)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert run_ingest(in_tmp, in_tmp / "unused", fmt="hf", hf_dataset="refinery-tests/no-such-dataset") == 2
    line = one_error_line(capsys)
    assert line.startswith("error: hf:refinery-tests/no-such-dataset: format 'hf' needs network access"), line
    assert "(HF_HUB_OFFLINE is set)" in line
    assert_no_output(in_tmp)


def test_hf_ingest_runs_under_dvc_repro(tmp_path):
    """The DAG's ingest stage with format hf: DVC depends on the params value and the stage reads the dataset."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT

    pytest.importorskip("datasets", reason="datasets not installed (dev extra)")
    folder = _hf_folder(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(format="hf", hf_dataset=str(folder), input="data/00_seed")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]
    stage["deps"] = [d for d in stage["deps"] if not str(d).startswith("fingerprints/")]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}))
    (project / "data/00_seed").mkdir(parents=True)
    (project / "data/00_seed/README.md").write_text("no seed here: format hf reads ingest.hf_dataset\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "ingest"], cwd=project, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert pq.read_table(project / "data/01_seed/qa.parquet").num_rows == 2
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ingest"]
    assert lock["params"]["params.yaml"]["ingest"]["hf_dataset"] == str(folder)
    # pinning another revision changes the params value, and that alone makes the stage stale
    params["ingest"]["hf_revision"] = "v2"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "ingest"], cwd=project, env=env,
                            capture_output=True, text=True).stdout
    assert "changed deps" in status and "modified:           ingest" in status, status
