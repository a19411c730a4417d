"""Contract of data/06_datasets/<arm>.parquet: one row per training example, with provenance.

Row level: the Arrow schema and strict Pandera checks below (:data:`CONTRACT`). Dataset level: the thresholds
(:class:`Thresholds`, read from ``params.yaml: validate``) and the per-kind Great Expectations suite stored as JSON
in ``schemas/expectations/<kind>.json``, run by ``refinery validate`` over the Parquet rows plus the check columns
:func:`refinery.validation.expectations.check_frame` derives.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pydantic import Field

from refinery.core.params import StageParams
from schemas.base import Contract
from schemas.provenance import PROVENANCE_FIELDS, provenance_checks

# Where a row came from in assembly: the human train split, the rows every gate kept, the recovered rows, every
# generated row before any gate (the `unfiltered` arm), and the AI-contaminated rewrites of human rows.
SOURCES = ("human", "accepted", "recovered", "generated", "contaminated")
SYNTHETIC_SOURCES = ("accepted", "recovered", "generated", "contaminated")  # every source but the human anchor
EXPECTATIONS = Path(__file__).resolve().parent / "expectations"  # GE suites: <name>.json (an arm names its suite)

# Provenance a synthetic row must carry (governance brief: teacher, template hash, parents, evidence span); each is
# checked as the GE check column missing_<name> (evidence_span: evidence_start and evidence_end).
SYNTHETIC_PROVENANCE = ("teacher", "prompt_template", "parent_ids", "evidence_span")

CONTENT_FIELDS = [
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("intent", pa.string(), nullable=True),  # seed intent (inherited by synthetic rows)
    pa.field("evidence", pa.string(), nullable=True),  # document text[evidence_start:evidence_end]
    pa.field("weight", pa.float64(), nullable=False),  # sampling weight for the trainer (> 0)
    pa.field("source", pa.string(), nullable=False),  # one of SOURCES
]

ARROW = pa.schema(PROVENANCE_FIELDS + CONTENT_FIELDS)


def _checks(pda) -> dict[str, list]:
    return {
        **provenance_checks(pda),
        "origin": [pda.Check.isin(["human", "synthetic", "recovered", "contaminated"])],
        "question": [pda.Check.str_length(min_value=1)],
        "answer": [pda.Check.str_length(min_value=1)],
        "weight": [pda.Check.gt(0)],
        "source": [pda.Check.isin(list(SOURCES))],
    }


CONTRACT = Contract("datasets", ARROW, _checks, unique=("row_id",))


class Thresholds(StageParams):
    """Dataset-level bounds of one dataset kind (governance brief), each a GE suite parameter of that name."""

    min_rows: int = Field(ge=0)  # fewer rows than this fails
    max_synthetic_share: float = Field(ge=0, le=1)  # share of rows whose source is not human
    max_duplicate_rate: float = Field(ge=0, le=1)  # share of rows that are exact or near duplicates of another row
    max_cross_split_duplicates: int = Field(ge=0)  # rows that exactly or nearly duplicate a val or test row
    max_test_question_leaks: int = Field(ge=0)  # rows whose normalised question is a test question
    max_test_document_leaks: int = Field(ge=0)  # rows built on a document of the test split
    min_intent_count: int = Field(ge=0)  # rows of the rarest seed intent (a missing intent counts 0)
    max_provenance_missing: int = Field(ge=0)  # synthetic rows lacking teacher, template, parents or evidence span
    max_label_disagreement_rate: float = Field(ge=0, le=1)  # questions annotated twice with different intents
    min_script_coverage: float = Field(ge=0, le=1)  # share of the seed's writing scripts present
    max_foreign_script_share: float = Field(ge=0, le=1)  # rows written in a script the seed does not use
    min_cluster_coverage: float = Field(ge=0, le=1)  # share of seed k-means clusters the rows reach
    min_distinct_2: float = Field(ge=0, le=1)  # distinct word bigrams / all bigrams (sampled rows)
    min_dcscore: float = Field(ge=0, le=1)  # DCScore / rows (sampled rows); 1 = every row its own class
    min_intent_coverage: float = Field(ge=0, le=1)  # share of seed intents present
    min_category_coverage: float = Field(ge=0, le=1)  # share of seed document categories present


def suite_path(kind: str) -> Path:
    """Return the GE suite file of a dataset kind."""
    return EXPECTATIONS / f"{kind}.json"
