"""Fixtures for verifier / reward tests: tiny seed tables, a tiny random BERT, and a models/base pointing at it."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import TINY_DOCS, TINY_QA, write_jsonl

# Extra QA rows so pair building has numbers, entities, negations and several documents to draw from.
MORE_QA = [
    {"qa_id": "q8", "doc_id": "d3", "question": "Can I export to Word?", "answer": "No, only PDF or Markdown.",
     "intent": "how_to", "evidence": "You can export notes as PDF or Markdown from the File menu."},
    {"qa_id": "q9", "doc_id": "d4", "question": "Is sync faster on Pro?", "answer": "Yes, it runs every 5 minutes.",
     "intent": "feature_info", "evidence": "Sync runs every 5 minutes on the Pro plan and hourly on Free."},
]


def _tiny_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits + ".,;:!?'\"-$%()/>&@"
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + [f"##{c}" for c in chars]
            + ["the", "is", "not", "can", "##s", "refunds", "days", "sync", "export", "pdf"])


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BertModel with a character-level WordPiece tokenizer, built offline."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(_tiny_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(_tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_nli(tmp_path_factory, tiny_bert) -> Path:
    """A tiny random BertForSequenceClassification saved like an HF NLI model (entailment is label 2)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_nli")
    config = BertConfig.from_pretrained(tiny_bert, num_labels=3,
                                        id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
                                        label2id={"contradiction": 0, "neutral": 1, "entailment": 2})
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def seed_tables(tmp_path_factory) -> tuple[pa.Table, pa.Table]:
    """(documents, qa) tables of the project's contracts, made by the ingest core from the tiny seed."""
    from refinery.seed import adapters
    from stages.ingest import IngestParams, ingest

    seed = tmp_path_factory.mktemp("seed")
    write_jsonl(seed / "documents.jsonl", TINY_DOCS)
    write_jsonl(seed / "qa.jsonl", TINY_QA + MORE_QA)
    params = IngestParams(input=str(seed), format="refinery", max_field_chars=10_000)
    result = ingest(adapters.read_source("refinery", str(seed)), params, "test")
    return result.documents, result.qa


def as_split(qa: pa.Table, name: str) -> pa.Table:
    """Return seed QA rows as a split-contract table labelled ``name``."""
    return qa.append_column(pa.field("split", pa.string(), nullable=False), pa.array([name] * qa.num_rows))


@pytest.fixture
def base_dir(tmp_path: Path, tiny_bert: Path) -> Path:
    """A models/base folder whose embedder role points at the tiny BERT (a 'local' model)."""
    base = tmp_path / "models" / "base"
    (base / "embedder").mkdir(parents=True)
    record = {"role": "embedder", "kind": "local", "spec": str(tiny_bert), "files": {},
              "load": {"path": str(tiny_bert), "relative_to": "cwd"}}
    (base / "embedder" / "PROVENANCE.json").write_text(json.dumps(record))
    return base
