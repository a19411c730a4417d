"""Compute dataset-level check columns with Arrow and DuckDB, and run Great Expectations suites over them.

A dataset's rows (from its Parquet file) get per-row check columns (``is_synthetic``, ``is_duplicate``,
``cross_split_duplicate``, ``missing_teacher``, ...) and broadcast dataset-level columns (``rare_intent_min_count``,
``script_coverage``, diversity figures). The GE suite of the dataset kind (``schemas/expectations/<kind>.json``)
then asserts aggregates of those columns against thresholds passed as suite parameters (``$PARAMETER``), so the
suite file stays reviewable while params.yaml holds the numbers. Data Docs HTML is written on request.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.core.offline import offline_data_docs
from schemas.datasets import SYNTHETIC_PROVENANCE

CHECK_COLUMNS = ("is_synthetic", "is_duplicate", "cross_split_duplicate", "test_question_leak", "test_document_leak",
                 "foreign_script") + tuple(f"missing_{f}" for f in SYNTHETIC_PROVENANCE)
BROADCAST_COLUMNS = ("rare_intent_min_count", "label_disagreement_rate", "script_coverage", "intent_coverage",
                     "category_coverage", "cluster_coverage", "distinct_2", "dcscore")


@dataclass(frozen=True)
class NearDup:
    """MinHash near-duplicate settings for within-dataset and cross-split checks."""

    max_jaccard: float = 0.8
    num_perm: int = 128
    shingle: int = 5


@dataclass
class Checked:
    """One dataset's check columns (a table of the rows) and its statistics for the audit log."""

    frame: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


def _bool(mask: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(mask, bool), pa.bool_())


def scripts_of(text: str) -> set[str]:
    """Return the Unicode scripts of the letters of ``text`` (first word of each letter's Unicode name: LATIN, ...)."""
    out = set()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            out.add(name.split(" ")[0] if name else "UNKNOWN")
    return out


def row_scripts(texts: pa.Array) -> list[set[str]]:
    """Scripts of each row; pure-ASCII rows are LATIN (or none) without a Python loop over characters."""
    ascii_mask = pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    has_alpha = pc.match_substring_regex(texts, "[A-Za-z]").to_numpy(zero_copy_only=False)
    out: list[set[str]] = [{"LATIN"} if a and h else set() for a, h in zip(ascii_mask, has_alpha)]
    if not ascii_mask.all():
        values = texts.to_pylist()
        for i in np.flatnonzero(~ascii_mask):
            out[i] = scripts_of(values[i])
    return out


def script_table(block: pa.Table) -> pa.Table:
    """Return each row's scripts (sorted) as a table: the per-row check an engine maps over blocks of rows."""
    return pa.table({"scripts": pa.array([sorted(s) for s in row_scripts(_texts(block))], pa.list_(pa.string()))})


def _texts(table: pa.Table) -> pa.Array:
    q = pc.fill_null(table.column("question"), "")
    a = pc.fill_null(table.column("answer"), "")
    joined = pc.binary_join_element_wise(q, a, " ")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def check_columns(table: pa.Table, val: pa.Table, test: pa.Table, seed: pa.Table, categories: dict[str, str],
                  near: NearDup, diversity: dict[str, Any] | None = None, dedup: Any = None,
                  map_blocks: Any = None) -> Checked:
    """Derive every check column of one dataset and its audit statistics.

    Args:
        table: the dataset rows (datasets contract).
        val: the val split; test: the test split (no training row may duplicate either; no test question or
            document may appear).
        seed: the human train split: the reference for intents, scripts and document categories.
        categories: doc_id -> document category.
        near: near-duplicate settings.
        diversity: this dataset's diversity figures (:meth:`refinery.validation.diversity.Diversity.as_dict`), or None.
        dedup: the duplicate gate of :func:`held_out_dedup` for these splits and settings, shared by the datasets
            of one run (it keeps the signatures it computed); None builds one.
        map_blocks: ``map_blocks(fn, table)`` of an engine (:mod:`refinery.engine`), to run the per-row checks
            (:func:`script_table`) block by block elsewhere; None: here, in one pass.

    Returns:
        The check table (row_id, source + check and broadcast columns) and the statistics.
    """
    import duckdb

    from refinery.core.textkernels import match_keys

    n = table.num_rows
    source = table.column("source")
    synthetic = np.asarray(pc.not_equal(source, "human").to_numpy(zero_copy_only=False), bool) if n else \
        np.zeros(0, bool)
    # duplicates within the dataset and against val + test (exact key, then MinHash near), in one pass
    reasons: list[str | None] = [None] * n
    if n:
        gate = dedup if dedup is not None else held_out_dedup(val, test, near)
        reasons = gate.apply(table.select(["row_id", "question", "answer"])).reason
    r = np.asarray([x or "" for x in reasons], object)
    dup_exact, dup_near = r == "dedup_exact", r == "dedup_near"
    cross_exact, cross_near = r == "dedup_exact_seed", r == "dedup_near_seed"
    # leakage: test questions (normalised) and test documents
    test_q = pc.unique(match_keys(test.column("question")))
    q_leak = pc.is_in(match_keys(table.column("question")), value_set=test_q).to_numpy(zero_copy_only=False) \
        if n else np.zeros(0, bool)
    d_leak = pc.is_in(table.column("doc_id"), value_set=pc.unique(test.column("doc_id"))).to_numpy(
        zero_copy_only=False) if n else np.zeros(0, bool)
    # provenance of synthetic rows
    def null_or_empty(col: str) -> np.ndarray:
        c = table.column(col)
        empty = pc.equal(pc.utf8_length(c), 0) if pa.types.is_string(c.type) else pc.is_null(c)
        return np.asarray(pc.fill_null(pc.or_(pc.is_null(c), empty), True).to_numpy(zero_copy_only=False), bool)

    missing = {
        "teacher": null_or_empty("teacher"),
        "prompt_template": null_or_empty("prompt_template"),
        "parent_ids": np.asarray(pc.fill_null(pc.equal(pc.list_value_length(table.column("parent_ids")), 0),
                                              True).to_numpy(zero_copy_only=False), bool) if n else np.zeros(0, bool),
        "evidence_span": null_or_empty("evidence_start") | null_or_empty("evidence_end"),
    }
    missing = {k: missing[k] & synthetic for k in SYNTHETIC_PROVENANCE}
    # intents, labels, categories (DuckDB over the Arrow tables)
    rows = table.select(["question", "intent", "doc_id"]).append_column("qkey", match_keys(table.column("question")))
    con = duckdb.connect()
    con.register("rows_", rows)
    seed_intents = sorted({x for x in seed.column("intent").to_pylist() if x is not None})
    counts = dict(con.execute("select intent, count(*) from rows_ where intent is not null group by intent").fetchall())
    intent_counts = {i: int(counts.get(i, 0)) for i in seed_intents}
    rare_min = min(intent_counts.values()) if intent_counts else 0
    rarest = sorted(i for i, c in intent_counts.items() if c == rare_min) if intent_counts else []
    multi, disagree = con.execute(
        "select count(*), coalesce(sum(case when k > 1 then 1 else 0 end), 0) from "
        "(select qkey, count(*) as c, count(distinct intent) as k from rows_ group by qkey) where c > 1").fetchone()
    con.close()
    disagreement = float(disagree) / multi if multi else 0.0
    seed_cats = {categories.get(d) for d in seed.column("doc_id").to_pylist()} - {None}
    cats = {categories.get(d) for d in table.column("doc_id").to_pylist()} - {None}
    # scripts
    seed_scripts = set().union(*row_scripts(_texts(seed))) if seed.num_rows else set()
    if n and map_blocks is not None:
        per_row = [set(s) for block in map_blocks(script_table, table) for s in block.column("scripts").to_pylist()]
    else:
        per_row = row_scripts(_texts(table)) if n else []
    present = set().union(*per_row) if per_row else set()
    foreign = np.asarray([bool(s - seed_scripts) for s in per_row], bool)
    script_cov = len(seed_scripts & present) / len(seed_scripts) if seed_scripts else 1.0
    intent_cov = len({i for i, c in intent_counts.items() if c > 0}) / len(seed_intents) if seed_intents else 1.0
    cat_cov = len(seed_cats & cats) / len(seed_cats) if seed_cats else 1.0
    div = diversity or {}
    broadcast = {"rare_intent_min_count": int(rare_min), "label_disagreement_rate": disagreement,
                 "script_coverage": script_cov, "intent_coverage": intent_cov, "category_coverage": cat_cov,
                 "cluster_coverage": div.get("cluster_coverage"), "distinct_2": div.get("distinct_2"),
                 "dcscore": div.get("dcscore")}
    cols: dict[str, pa.Array] = {"row_id": table.column("row_id"), "source": source,
                                 "is_synthetic": _bool(synthetic), "is_duplicate": _bool(dup_exact | dup_near),
                                 "cross_split_duplicate": _bool(cross_exact | cross_near),
                                 "test_question_leak": _bool(q_leak), "test_document_leak": _bool(d_leak),
                                 "foreign_script": _bool(foreign)}
    cols.update({f"missing_{k}": _bool(v) for k, v in missing.items()})
    cols.update({k: pa.array([v] * n, pa.int64() if k == "rare_intent_min_count" else pa.float64())
                 for k, v in broadcast.items()})
    rate = lambda m: round(float(np.mean(m)), 6) if n else 0.0  # noqa: E731
    stats = {
        "total_examples": n,
        "synthetic_share": rate(synthetic),
        "duplicate_rate": rate(dup_exact | dup_near),
        "duplicates": {"exact": int(dup_exact.sum()), "near": int(dup_near.sum())},
        "leakage": {"cross_split_duplicates": int((cross_exact | cross_near).sum()),
                    "cross_split_exact": int(cross_exact.sum()), "cross_split_near": int(cross_near.sum()),
                    "test_question_leaks": int(q_leak.sum()), "test_document_leaks": int(d_leak.sum())},
        "label_disagreement_rate": round(disagreement, 6),
        "questions_annotated_twice": int(multi),
        "provenance_missing": {k: int(v.sum()) for k, v in missing.items()},
        "intent_counts": intent_counts,
        "rare_intent_min_count": rare_min,
        "rarest_intents": rarest,
        "intent_coverage": round(intent_cov, 6),
        "category_coverage": round(cat_cov, 6),
        "scripts": {"seed": sorted(seed_scripts), "present": sorted(present),
                    "foreign_rows": int(foreign.sum())},
        "script_coverage": round(script_cov, 6),
        "foreign_script_share": rate(foreign),
        "diversity": div,
        "examples": {"cross_split_duplicates": _first(table, cross_exact | cross_near),
                     "test_question_leaks": _first(table, q_leak), "test_document_leaks": _first(table, d_leak),
                     **{f"provenance_missing_{k}": _first(table, v) for k, v in missing.items()}},
    }
    return Checked(pa.table(cols), stats)


def held_out_dedup(val: pa.Table, test: pa.Table, near: NearDup) -> Any:
    """Return the duplicate gate of :func:`check_columns`: seeded by the val and test rows, with ``near``'s settings.

    Its verdicts on a dataset do not depend on what it judged before, so one gate serves every dataset of a run,
    and a row shared by several datasets (the human anchor, accepted rows) has its signature computed once.
    """
    from refinery.gates.dedup import DedupGate

    held_out = pa.concat_tables([val.select(["question", "answer"]), test.select(["question", "answer"])])
    return DedupGate(held_out, max_jaccard=near.max_jaccard, num_perm=near.num_perm, shingle=near.shingle)


def _first(table: pa.Table, mask: np.ndarray, k: int = 3) -> list[str]:
    idx = np.flatnonzero(mask)[:k]
    return table.column("row_id").take(pa.array(idx, pa.int64())).to_pylist() if len(idx) else []


# ------------------------------------------------------------------------------------------------------------------
# Great Expectations
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One expectation's outcome: the check it implements, the observed value and the bound it was held to."""

    dataset: str
    check: str
    success: bool
    observed: Any
    bound: str  # "max" | "min" | "set"
    limit: Any
    suite: str  # the suite file, as users see it

    def line(self, detail: str = "") -> str:
        """One line for a failed check: ``curated: synthetic_share 0.62 > max 0.50 (schemas/expectations/...)``."""
        extra = f" ({detail})" if detail else ""
        if self.bound == "set":
            return f"{self.dataset}: {self.check} {_fmt(self.observed)} not within {_fmt(self.limit)}{extra} " \
                   f"({self.suite})"
        op = ">" if self.bound == "max" else "<"
        return f"{self.dataset}: {self.check} {_fmt(self.observed)} {op} {self.bound} {_fmt(self.limit)}{extra} " \
               f"({self.suite})"


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.2g}" if 0 < abs(x) < 0.01 else f"{float(x):.2f}"
    if isinstance(x, (list, tuple, set)):
        return "[" + ", ".join(sorted(map(str, x))) + "]"
    return str(x)


def load_suite(path: str | Path) -> dict[str, Any]:
    """Read a suite JSON file (``name``, ``expectations``; each with ``type``, ``kwargs``, ``meta.check``)."""
    from refinery.core.io import read_json

    suite = read_json(path)
    for e in suite.get("expectations", []):
        if "check" not in e.get("meta", {}):
            raise ValueError(f"{path}: expectation {e.get('type')} has no meta.check name")
    return suite


def _resolve(value: Any, parameters: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "$PARAMETER" in value:
        return parameters.get(value["$PARAMETER"])
    return value


def run_suites(frames: dict[str, pa.Table], suites: dict[str, Path], parameters: dict[str, dict[str, Any]],
               docs_dir: Path | None = None, suite_names: dict[str, str] | None = None) -> list[Outcome]:
    """Validate each dataset's check table with its GE suite; optionally write Data Docs HTML.

    Args:
        frames: dataset kind -> check table (:func:`check_columns`).
        suites: dataset kind -> suite JSON file.
        parameters: dataset kind -> suite parameters (the thresholds).
        docs_dir: folder for the Data Docs site (absolute or relative), or None for none.
        suite_names: dataset kind -> the suite path as shown in messages (default: the file path).

    Returns:
        One outcome per expectation, in suite order, datasets in ``frames`` order.
    """
    runner = SuiteRunner(docs_dir)
    outcomes = [o for kind, frame in frames.items()
                for o in runner.run(kind, frame, suites[kind], parameters[kind], (suite_names or {}).get(kind))]
    runner.finish()
    return outcomes


class SuiteRunner:
    """One Great Expectations context that validates datasets one at a time and writes one Data Docs site.

    :meth:`run` takes one dataset's check table, so a caller can read, check and release the datasets one
    after another (validate's memory then follows the largest dataset, not their sum); :meth:`finish` makes the
    site's pages reproducible once every dataset ran.
    """

    def __init__(self, docs_dir: Path | None = None):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self.docs_dir = docs_dir
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        if docs_dir is not None:
            self.context.add_data_docs_site(site_name="refinery", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(docs_dir).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
        self.source = self.context.data_sources.add_pandas("refinery")

    def run(self, kind: str, frame: pa.Table, suite_file: Path, params: dict[str, Any],
            shown: str | None = None) -> list[Outcome]:
        """Validate one dataset's check table with its suite; return one outcome per expectation, in suite order.

        Args:
            kind: the dataset's name (one run per name).
            frame: its check table (:func:`check_columns`).
            suite_file: its suite JSON file.
            params: the suite parameters (the thresholds).
            shown: the suite path as shown in messages (default: ``suite_file``).
        """
        gx = self._gx
        from great_expectations.core.run_identifier import RunIdentifier

        raw = load_suite(suite_file)
        # skip checks of columns nobody computed; on an empty dataset only table-level checks mean anything
        skipped = [e for e in raw["expectations"] if _all_null(frame, e["kwargs"].get("column"))
                   or (frame.num_rows == 0 and "column" in e["kwargs"])]
        raw = {**raw, "expectations": [e for e in raw["expectations"] if e not in skipped]}
        shown = shown or str(suite_file)
        suite = self.context.suites.add(gx.ExpectationSuite(name=kind, expectations=raw["expectations"],
                                                            meta=raw.get("meta", {})))
        batch = self.source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe("parquet rows")
        vd = self.context.validation_definitions.add(gx.ValidationDefinition(name=kind, data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["refinery"])] \
            if self.docs_dir is not None else []
        checkpoint = self.context.checkpoints.add(gx.Checkpoint(name=kind, validation_definitions=[vd],
                                                                actions=actions,
                                                                result_format={"result_format": "SUMMARY"}))
        result = checkpoint.run(batch_parameters={"dataframe": frame.to_pandas()}, expectation_parameters=params,
                                run_id=RunIdentifier(run_name="refinery-validate", run_time=run_time()))
        vr = next(iter(result.run_results.values()))
        by_check = {r.expectation_config.meta["check"]: r for r in vr.results}
        outcomes = []
        for spec in raw["expectations"]:
            r = by_check[spec["meta"]["check"]]
            kw = spec["kwargs"]
            if "max_value" in kw:
                bound, limit = "max", _resolve(kw["max_value"], params)
            elif "min_value" in kw:
                bound, limit = "min", _resolve(kw["min_value"], params)
            else:
                bound, limit = "set", _resolve(kw.get("value_set"), params)
            res = r.result or {}
            observed = res.get("observed_value")
            if observed is None and "unexpected_count" in res:
                observed = res.get("partial_unexpected_list") or res["unexpected_count"]
            if isinstance(observed, np.generic):
                observed = observed.item()
            outcomes.append(Outcome(kind, spec["meta"]["check"], bool(r.success), observed, bound, limit, shown))
        return outcomes

    def finish(self) -> None:
        """Make the Data Docs pages reproducible and offline (no-op without a docs folder)."""
        if self.docs_dir is not None:
            reproducible_docs(Path(self.docs_dir), run_time())
            offline_data_docs(Path(self.docs_dir))


_STAMP = re.compile(r"\b\d{8}T\d{6}\.\d{6}Z\b")  # GE's run, load and render times (and a logo URL's ?d=)
_UUID4 = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\b")


def reproducible_docs(folder: Path, when) -> None:
    """Make GE's Data Docs pages depend on the data only: wall-clock stamps become ``when``, random ids derived ones.

    Great Expectations writes the render time into every page (a logo URL's cache-buster, ``ge_load_time``)
    and a fresh uuid4 per collapsible block, so two runs on the same data never give the same bytes. Each
    uuid4 becomes a uuid5 of the page's path and its order on the page, each stamp ``when``.
    """
    import uuid

    stamp = when.strftime("%Y%m%dT%H%M%S.%fZ")
    for page in sorted(folder.rglob("*.html")):
        rel = page.relative_to(folder).as_posix()
        ids: dict[str, str] = {}
        text = page.read_text(encoding="utf-8")
        text = _UUID4.sub(lambda m: ids.setdefault(m.group(0), str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rel}#{len(ids)}"))),
                          text)
        page.write_text(_STAMP.sub(stamp, text), encoding="utf-8")


def run_time():
    """Return the time the Data Docs show for a run: ``SOURCE_DATE_EPOCH`` when set, else the epoch.

    The Data Docs are a DVC output, so the same data must give the same bytes on every machine; the wall
    clock would make every run differ. ``SOURCE_DATE_EPOCH`` is the reproducible-builds convention for
    stamping a chosen time (e.g. the commit's) into otherwise reproducible outputs.
    """
    import datetime as dt

    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(raw) if raw.isdigit() else 0
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def _all_null(frame: pa.Table, column: str | None) -> bool:
    """True for a broadcast column nobody computed (diversity without an embedder): its checks are skipped."""
    return column is not None and column in frame.column_names and frame.num_rows > 0 and \
        frame.column(column).null_count == frame.num_rows


def dump_suite(suite: dict[str, Any]) -> str:
    """Serialise a suite as stable, indented JSON (what ``schemas/expectations/*.json`` hold)."""
    return json.dumps(suite, indent=2, ensure_ascii=False) + "\n"
