"""Contracts of data/02_coverage/: the seed coverage audit (refinery/seed/coverage.py) that generation aims by."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import Contract

ROWS_ARROW = pa.schema([  # rows.parquet: one row per seed train row
    pa.field("row_id", pa.string(), nullable=False),  # the seed row (split's train.parquet)
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("intent", pa.string(), nullable=True),
    pa.field("category", pa.string(), nullable=True),  # its document's category
    pa.field("cluster", pa.int32(), nullable=False),  # nearest seed k-means centroid (question + answer embedded)
    pa.field("x", pa.float64(), nullable=False),  # 2-D map position (PCA of seed rows and passages)
    pa.field("y", pa.float64(), nullable=False),
])
GROUPS_ARROW = pa.schema([  # groups.parquet: one row per cluster, intent and document category of the seed
    pa.field("kind", pa.string(), nullable=False),  # cluster | intent | category
    pa.field("key", pa.string(), nullable=False),  # the cluster number, intent or category
    pa.field("seed_rows", pa.int64(), nullable=False),  # seed train rows in it
    pa.field("documents", pa.int64(), nullable=False),  # distinct documents of those rows
    pa.field("share", pa.float64(), nullable=False),  # seed_rows / all seed train rows
    pa.field("passages", pa.int64(), nullable=False),  # passage windows in it (nearest cluster; category); intent: 0
    pa.field("uncovered_passages", pa.int64(), nullable=False),  # of those, windows no seed evidence overlaps
    pa.field("gap", pa.bool_(), nullable=False),  # share < coverage.rare_share
])
PASSAGES_ARROW = pa.schema([  # passages.parquet: one row per passage window of a document of the train split
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("start", pa.int64(), nullable=False),  # character offsets in the document text
    pa.field("end", pa.int64(), nullable=False),
    pa.field("category", pa.string(), nullable=True),
    pa.field("stale", pa.bool_(), nullable=False),  # the document is superseded (generation skips it)
    pa.field("seed_rows", pa.int64(), nullable=False),  # seed evidence spans overlapping the window
    pa.field("covered", pa.bool_(), nullable=False),  # seed_rows > 0
    pa.field("cluster", pa.int32(), nullable=False),  # nearest seed centroid of the window's text
    pa.field("x", pa.float64(), nullable=False),  # 2-D map position
    pa.field("y", pa.float64(), nullable=False),
])
CENTROIDS_ARROW = pa.schema([  # centroids.parquet: the seed k-means centroids
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("vector", pa.list_(pa.float32()), nullable=False),  # unit norm, the embedder's dimension
])


def _group_checks(pda) -> dict[str, list]:
    return {"kind": [pda.Check.isin(["cluster", "intent", "category"])], "share": [pda.Check.in_range(0.0, 1.0)]}


def _passage_checks(pda) -> dict[str, list]:
    return {"start": [pda.Check.ge(0)], "seed_rows": [pda.Check.ge(0)]}


ROWS = Contract("coverage_rows", ROWS_ARROW, lambda pda: {"cluster": [pda.Check.ge(0)]}, unique=("row_id",))
GROUPS = Contract("coverage_groups", GROUPS_ARROW, _group_checks)
PASSAGES = Contract("coverage_passages", PASSAGES_ARROW, _passage_checks)
CENTROIDS = Contract("coverage_centroids", CENTROIDS_ARROW, lambda pda: {}, unique=("cluster",))
