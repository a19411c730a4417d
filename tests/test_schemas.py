"""Contracts: strict columns, types and row checks, located by row and field."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.seed.adapters import read_source
from refinery.core.errors import InputError
from schemas import documents, seed_excluded, seed_qa, split
from schemas.provenance import PROVENANCE_NAMES
from stages.ingest import IngestParams, ingest
from tests.conftest import TINY_DOCS, TINY_QA, write_jsonl


@pytest.fixture
def tables(tmp_path):
    seed = tmp_path / "seed"
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA)
    r = ingest(read_source("refinery", str(seed)), IngestParams(input=str(seed), format="refinery",
                                                                 max_field_chars=1000), "0.1.0+test")
    return r


def test_every_provenance_column_is_required_by_the_qa_contracts():
    for contract in (seed_qa.CONTRACT, split.CONTRACT):
        assert set(PROVENANCE_NAMES) <= set(contract.arrow.names)


def test_valid_tables_pass(tables):
    documents.CONTRACT.validate(tables.documents, "documents.parquet")
    seed_qa.CONTRACT.validate(tables.qa, "qa.parquet")
    seed_excluded.CONTRACT.validate(tables.excluded, "excluded.parquet")


def test_missing_provenance_column_fails_naming_it(tables):
    with pytest.raises(InputError, match="field 'code_version': missing column"):
        seed_qa.CONTRACT.validate(tables.qa.drop_columns(["code_version"]), "qa.parquet")


def test_extra_column_fails_strictly(tables):
    extra = tables.qa.append_column("note", pa.array(["x"] * tables.qa.num_rows))
    with pytest.raises(InputError, match="field 'note': unexpected column"):
        seed_qa.CONTRACT.validate(extra, "qa.parquet")


def test_bad_value_is_located_by_row_and_field(tables):
    origins = tables.qa.column("origin").to_pylist()
    origins[3] = "synthetic"  # a seed row must be human
    bad = tables.qa.set_column(tables.qa.column_names.index("origin"), seed_qa.ARROW.field("origin"),
                               pa.array(origins))
    with pytest.raises(InputError) as e:
        seed_qa.CONTRACT.validate(bad, "qa.parquet")
    assert "qa.parquet: row 4: field 'origin'" in str(e.value) and "'synthetic'" in str(e.value)


def test_null_in_required_column_fails(tables):
    spans = tables.qa.column("evidence_start").to_pylist()
    spans[0] = None
    bad = tables.qa.set_column(tables.qa.column_names.index("evidence_start"),
                               pa.field("evidence_start", pa.int32()), pa.array(spans, pa.int32()))
    with pytest.raises(InputError, match="evidence_start"):
        seed_qa.CONTRACT.validate(bad, "qa.parquet")


def test_duplicate_row_id_fails(tables):
    doubled = pa.concat_tables([tables.qa, tables.qa.slice(0, 1)])
    with pytest.raises(InputError, match="row_id"):
        seed_qa.CONTRACT.validate(doubled, "qa.parquet")


def test_empty_table_is_valid():
    assert seed_qa.CONTRACT.validate(seed_qa.CONTRACT.empty(), "qa.parquet").num_rows == 0
