"""Validate the datasets against the governance brief's thresholds; write the audit log and Data Docs; fail on a breach.

Row level: each dataset's Pandera contract (schemas/datasets.py). Dataset level: the Great Expectations suite of its
kind (schemas/expectations/<kind>.json) over the Parquet rows and the check columns of
:func:`refinery.validation.expectations.check_columns`, thresholds from ``params.yaml: validate``. Diversity
(generation brief): seed-cluster coverage, DCScore and distinct-n for every dataset, with floors as thresholds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from refinery.core.errors import InputError, RefineryError
from refinery.core.params import StageParams, load_section
from refinery.engine.base import engine_of
from refinery.gates.dedup import DedupParams
from schemas.datasets import Thresholds

if TYPE_CHECKING:  # the module itself is imported where it is used, as the other validation modules are
    from refinery.validation.expectations import Checked


class ChecksFailed(RefineryError):
    """A dataset broke a threshold: the run fails (exit 1) after printing one line per failed check."""

    exit_code = 1  # input and params errors exit 2


class DiversityParams(StageParams):
    """Diversity measurement (generation brief)."""

    embedder: Literal["model", "hashing", "none"]  # the provisioned embedder, hashed n-grams, or skip the metrics
    sample: int = Field(gt=1)  # rows per dataset embedded for coverage and DCScore, and used for distinct-n
    clusters: int = Field(gt=0)  # k of the seed k-means
    seed: int
    temperature: float = Field(gt=0)  # DCScore softmax temperature on cosine similarities


class ValidateParams(StageParams):
    """Knobs of the validate stage: near-duplicate and diversity settings, and thresholds per dataset kind."""

    near_duplicate: DedupParams  # MinHash near-duplicate settings of the within-dataset and cross-split checks
    diversity: DiversityParams
    defaults: Thresholds
    thresholds: dict[str, dict[str, int | float]] = {}  # per kind: overrides of the defaults

    @model_validator(mode="after")
    def _check(self) -> ValidateParams:
        for kind in self.thresholds:
            self.thresholds_for(kind)
        return self

    def check_arms(self, arms: list[str]) -> None:
        """Fail when thresholds name a dataset that is not an arm (a misspelt arm would silently get defaults)."""
        unknown = sorted(set(self.thresholds) - set(arms))
        if unknown:
            raise RefineryError(f"params.yaml: validate.thresholds names {', '.join(unknown)}, not an arm of "
                                f"assemble.arms ({', '.join(arms)})")

    def thresholds_for(self, kind: str) -> Thresholds:
        """The defaults with this kind's overrides applied."""
        merged = {**self.defaults.model_dump(), **self.thresholds.get(kind, {})}
        for k, v in self.thresholds.get(kind, {}).items():  # YAML writes 0 for 0.0; counts stay ints
            if isinstance(v, int) and Thresholds.model_fields.get(k) is not None and \
                    Thresholds.model_fields[k].annotation is float:
                merged[k] = float(v)
        return Thresholds.model_validate(merged)


@dataclass(frozen=True)
class Checks:
    """Per dataset: its check table, statistics, and the row-contract error that stopped it (if any)."""

    frames: dict[str, pa.Table]
    stats: dict[str, dict[str, Any]]
    contract_errors: dict[str, str]


def seed_centroids(seed: pa.Table, params: DiversityParams, embed) -> np.ndarray | None:
    """The seed's k-means centroids in ``embed``'s space, fitted on a seeded sample (None when ``embed`` is None)."""
    from refinery.validation.diversity import kmeans_centroids, sample_indices

    if embed is None:
        return None
    idx = sample_indices(seed.num_rows, params.sample, params.seed)
    return kmeans_centroids(embed(_texts(seed, idx)), params.clusters, params.seed)


def _texts(table: pa.Table, idx: np.ndarray) -> list[str]:
    """``question answer`` of the rows at ``idx`` (only the sampled rows become Python strings)."""
    rows = table.select(["question", "answer"]).take(pa.array(idx, pa.int64()))
    return [f"{q} {a}" for q, a in zip(rows.column("question").to_pylist(), rows.column("answer").to_pylist())]


def dataset_diversity(table: pa.Table, centroids: np.ndarray, params: DiversityParams, embed) -> dict[str, Any]:
    """Measure one dataset's diversity against the seed's k-means clusters, on its seeded sample of rows."""
    from refinery.validation.diversity import measure, sample_indices

    idx = sample_indices(table.num_rows, params.sample, params.seed)
    syn = np.asarray(pc.not_equal(table.column("source").take(pa.array(idx, pa.int64())), "human")
                     .to_numpy(zero_copy_only=False), bool)
    # the texts are the sample already: measure's own draw of min(rows, sample) of them takes them all
    return measure(_texts(table, idx), syn, centroids, embed, params.sample, params.seed,
                   params.temperature).as_dict()


class Checker:
    """Checks datasets one at a time against the same splits, seed clusters and duplicate gate.

    Built once per run; :meth:`check` takes one dataset, so validate reads, checks and releases the arms one
    after another: the held-out duplicate gate keeps the signatures it computed (rows shared by arms are signed
    once), nothing else outlives a dataset.
    """

    def __init__(self, val: pa.Table, test: pa.Table, seed: pa.Table, documents: pa.Table, params: ValidateParams,
                 embed=None, map_blocks=None):
        from refinery.validation.expectations import NearDup, held_out_dedup

        self.val, self.test, self.seed, self.params = val, test, seed, params
        self.embed, self.map_blocks = embed, map_blocks
        self.centroids = seed_centroids(seed, params.diversity, embed)
        self.categories = dict(zip(documents.column("doc_id").to_pylist(), documents.column("category").to_pylist()))
        nd = params.near_duplicate
        self.near = NearDup(nd.max_jaccard, nd.num_perm, nd.shingle)
        self.dedup = held_out_dedup(val, test, self.near)  # one for every dataset: shared rows are signed once

    def check(self, kind: str, table: pa.Table) -> tuple[Checked | None, str | None]:
        """Return (the check table and statistics, None), or (None, the row-contract error) for one dataset."""
        from refinery.validation.expectations import check_columns
        from schemas import datasets as datasets_schema

        try:
            valid = datasets_schema.CONTRACT.validate(table, f"{kind} dataset")
        except InputError as e:
            return None, str(e)
        diversity = dataset_diversity(valid, self.centroids, self.params.diversity, self.embed) \
            if self.centroids is not None else None
        return check_columns(valid, self.val, self.test, self.seed, self.categories, self.near, diversity,
                             self.dedup, map_blocks=self.map_blocks), None


def run_checks(datasets: dict[str, pa.Table], val: pa.Table, test: pa.Table, seed: pa.Table, documents: pa.Table,
               params: ValidateParams, embed=None, map_blocks=None) -> Checks:
    """Check each dataset's rows against its contract and derive its check columns and statistics.

    Args:
        datasets: kind -> rows as read (validated against the datasets contract here).
        val, test: the held-out splits.
        seed: the human train split (reference for intents, scripts, categories, diversity clusters).
        documents: doc_id -> category, for concept coverage.
        params: the stage's params.
        embed: texts -> normalised vectors for diversity, or None to skip the diversity metrics.
        map_blocks: an engine's block map for the per-row checks (``engine.kind: ray``), or None (here).

    Returns:
        Check tables, statistics and contract errors, per dataset.
    """
    checker = Checker(val, test, seed, documents, params, embed, map_blocks)
    frames, stats, errors = {}, {}, {}
    for kind, table in datasets.items():
        checked, error = checker.check(kind, table)
        if error is not None:
            errors[kind] = error
        else:
            frames[kind], stats[kind] = checked.frame, checked.stats
    return Checks(frames, stats, errors)


_DETAIL = {"rare_intent_min_count": lambda s: ", ".join(s["rarest_intents"]),
           "cross_split_duplicates": lambda s: _rows(s["examples"]["cross_split_duplicates"]),
           "test_question_leaks": lambda s: _rows(s["examples"]["test_question_leaks"]),
           "test_document_leaks": lambda s: _rows(s["examples"]["test_document_leaks"])}


def _rows(ids: list[str]) -> str:
    return "e.g. " + ", ".join(ids) if ids else ""


def failure_lines(outcomes, stats: dict[str, dict[str, Any]], contract_errors: dict[str, str]) -> dict[str, list[str]]:
    """One line per failed check, grouped by dataset."""
    lines: dict[str, list[str]] = {k: [f"{k}: row contract: {m}"] for k, m in contract_errors.items()}
    for o in outcomes:
        if o.success:
            continue
        detail = ""
        if o.check in _DETAIL:
            detail = _DETAIL[o.check](stats[o.dataset])
        elif o.check.startswith("provenance_missing_"):
            detail = _rows(stats[o.dataset]["examples"].get(o.check, []))
        lines.setdefault(o.dataset, []).append(o.line(detail))
    return lines


def audit_records(kinds: list[str], stats: dict[str, dict[str, Any]], thresholds: dict[str, Thresholds],
                  lines: dict[str, list[str]], files: dict[str, str], suites: dict[str, str]) -> list[dict[str, Any]]:
    """Return one audit event per dataset, in the shape of the governance brief's audit log."""
    out = []
    for kind in kinds:
        s = stats.get(kind, {})
        out.append({
            "event": "dataset_validated", "dataset": kind, "file": files[kind], "suite": suites[kind],
            "total_examples": s.get("total_examples"), "synthetic_share": s.get("synthetic_share"),
            "duplicate_rate": s.get("duplicate_rate"), "duplicates": s.get("duplicates"),
            "leakage": s.get("leakage"), "label_disagreement_rate": s.get("label_disagreement_rate"),
            "questions_annotated_twice": s.get("questions_annotated_twice"),
            "rare_intent_min_count": s.get("rare_intent_min_count"), "rarest_intents": s.get("rarest_intents"),
            "intent_counts": s.get("intent_counts"), "provenance_missing": s.get("provenance_missing"),
            "script_coverage": s.get("script_coverage"), "foreign_script_share": s.get("foreign_script_share"),
            "scripts": s.get("scripts"), "intent_coverage": s.get("intent_coverage"),
            "category_coverage": s.get("category_coverage"), "diversity": s.get("diversity"),
            "thresholds": thresholds[kind].model_dump(),
            "decision": "reject" if lines.get(kind) else "accept",
            "failed_checks": lines.get(kind, []),
        })
    return out


def audit_log(records: list[dict[str, Any]]) -> dict[str, Any]:
    """An audit file: the decision, every failed check, and one event per dataset under ``datasets``.

    validate writes one per arm (reports/audit/<arm>.json, one record each), so a training stage depends on its
    own dataset's audit alone and a change to another arm's data does not retrain it.
    """
    failed = [line for r in records for line in r["failed_checks"]]
    return {"event": "validate", "decision": "reject" if failed else "accept", "failed_checks": failed,
            "datasets": records}


def metrics_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Small, flat numbers per dataset for ``dvc metrics``."""
    out: dict[str, Any] = {}
    for r in records:
        if r["total_examples"] is None:
            out[r["dataset"]] = {"passed": False, "failed_checks": len(r["failed_checks"])}
            continue
        d = r["diversity"] or {}
        out[r["dataset"]] = {
            "total_examples": r["total_examples"], "synthetic_share": r["synthetic_share"],
            "duplicate_rate": r["duplicate_rate"], **r["leakage"],
            "label_disagreement_rate": r["label_disagreement_rate"],
            "rare_intent_min_count": r["rare_intent_min_count"],
            "provenance_missing": sum(r["provenance_missing"].values()),
            "script_coverage": r["script_coverage"], "intent_coverage": r["intent_coverage"],
            "category_coverage": r["category_coverage"],
            **{k: d[k] for k in ("cluster_coverage", "synthetic_cluster_coverage", "dcscore", "distinct_1",
                                 "distinct_2") if k in d},
            "passed": not r["failed_checks"], "failed_checks": len(r["failed_checks"]),
        }
    out["failed_checks"] = sum(len(r["failed_checks"]) for r in records)
    return out


def table_text(records: list[dict[str, Any]]) -> str:
    """A short fixed-width table: one line per dataset."""
    head = f"{'dataset':<13}{'rows':>7}{'synth':>7}{'dup':>8}{'leak':>6}{'rare':>6}{'prov':>6}{'clust':>7}" \
           f"{'dcs':>6}{'dist2':>7}  decision"
    out = [head]
    for r in records:
        if r["total_examples"] is None:
            out.append(f"{r['dataset']:<13}{'-':>7}  reject ({len(r['failed_checks'])} failed)")
            continue
        d = r["diversity"] or {}
        leak = sum(v for k, v in r["leakage"].items() if k in ("cross_split_duplicates", "test_question_leaks",
                                                             "test_document_leaks"))
        f = lambda x, w, p=2: f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
        out.append(f"{r['dataset']:<13}{r['total_examples']:>7}{f(r['synthetic_share'], 7)}"
                   f"{f(r['duplicate_rate'], 8, 4)}"
                   f"{leak:>6}{r['rare_intent_min_count']:>6}{sum(r['provenance_missing'].values()):>6}"
                   f"{f(d.get('cluster_coverage'), 7)}{f(d.get('dcscore'), 6)}{f(d.get('distinct_2'), 7)}  "
                   f"{r['decision']}" + (f" ({len(r['failed_checks'])} failed)" if r["failed_checks"] else ""))
    return "\n".join(out)


def plot_diversity(records: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of diversity and coverage per dataset, and the share of rows per seed cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["total_examples"] is not None]
    names = ["cluster_coverage", "synthetic_cluster_coverage", "dcscore", "distinct_1", "distinct_2",
             "intent_coverage", "category_coverage"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(recs), 1)
    for i, r in enumerate(recs):
        vals = [(r["diversity"] or {}).get(n, r.get(n)) for n in names]
        ax1.bar(np.arange(len(names)) + i * width, [v if v is not None else 0 for v in vals], width,
                label=r["dataset"])
        counts = np.asarray((r["diversity"] or {}).get("cluster_counts", []), float)
        if counts.sum():
            ax2.plot(np.arange(len(counts)), counts / counts.sum(), marker="o", label=r["dataset"])
    ax1.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20, fontsize=8)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("diversity and concept coverage (higher is more diverse)")
    if recs:
        ax1.legend(fontsize=8)
    ax2.set_xlabel("seed k-means cluster")
    ax2.set_ylabel("share of sampled rows")
    ax2.set_title("rows per seed cluster")
    if recs:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


@click.command("validate")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its validate and engine sections and assemble.arms.")
@click.option("--datasets", "datasets_dir", required=True,
              help="Assemble's output folder: reads <arm>.parquet (one row per training example) for every arm "
                   "of assemble.arms.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; the reference "
                   "for intents, categories and diversity.")
@click.option("--val", "val_file", required=True,
              help="Human validation split (split's val.parquet): one row per seed QA pair; a dataset row leaking it "
                   "fails.")
@click.option("--test", "test_file", required=True,
              help="Human test split (split's test.parquet): one row per seed QA pair; a dataset row leaking it "
                   "fails.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; categories for "
                   "concept coverage.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the embedder, when validate.diversity.embedder "
                   "is 'model'.")
@click.option("--cache", "cache_dir", required=True, help="Embedding cache folder (created if missing).")
@click.option("--expectations", "suites_dir", required=True,
              help="Folder of the Great Expectations suites: reads <suite>.json per arm (assemble.arms.<arm>.suite, "
                   "else the arm's name).")
@click.option("--audit", "audit_dir", required=True,
              help="Writes <arm>.json here: one audit file per dataset (decision, failed checks, statistics).")
@click.option("--data-docs", "docs_dir", required=True,
              help="Writes the Great Expectations Data Docs here (a static HTML site, index.html).")
@click.option("--plots", "plots_dir", required=True, help="Writes validate_diversity.png (diversity per dataset) here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes a few flat figures per dataset here (JSON): size, synthetic share, duplicates, leaks, "
                   "diversity.")
@click.option("--coverage", "coverage_dir", default=None,
              help="The coverage stage's folder (passages.parquet, centroids.parquet): each dataset's synthetic rows "
                   "are counted against the seed's uncovered passages and clusters (gaps closed / still open).")
@click.option("--warn-only", is_flag=True, help="Report failed checks but exit 0 (exploration only).")
def cli(params_file, datasets_dir, train_file, val_file, test_file, documents_file, models_dir, cache_dir, suites_dir,
        audit_dir, docs_dir, plots_dir, metrics_file, coverage_dir, warn_only) -> None:
    """Validate the assembled datasets; exit non-zero with one line per failed check."""
    import time

    from refinery.core.io import atomic_outputs, check_input, read_parquet
    from refinery.validation.expectations import SuiteRunner
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    t0 = time.perf_counter()
    from refinery.training.arms import load_arms

    params = load_section(params_file, "validate", ValidateParams)
    arms = load_arms(params_file)
    kinds = list(arms)
    params.check_arms(kinds)
    files = {k: str(Path(datasets_dir) / f"{k}.parquet") for k in kinds}
    suites = {k: Path(suites_dir) / f"{arms[k].suite or k}.json" for k in kinds}
    for k, p in suites.items():
        if not p.is_file():
            raise RefineryError(f"{p}: expectation suite of the {k} arm not found (assemble.arms.{k}.suite)")
    for f in files.values():
        check_input(f)  # every arm's file is there before the first is checked
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    val = split_schema.CONTRACT.validate(read_parquet(val_file), val_file)
    test = split_schema.CONTRACT.validate(read_parquet(test_file), test_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    embed = make_embedder(params.diversity, models_dir, cache_dir)
    thresholds = {k: params.thresholds_for(k) for k in kinds}
    gaps = GapCounter(coverage_dir, embed if params.diversity.embedder == "model" else None) \
        if coverage_dir is not None else None
    stats: dict[str, dict[str, Any]] = {}
    contract_errors: dict[str, str] = {}
    outcomes = []
    closed: dict[str, Any] = {}
    # one arm at a time: read, check, validate with its suite, release (memory follows the largest arm);
    # engine ray: the per-row checks run on Ray tasks, block by block; the checks across rows stay here
    with engine_of(params_file) as engine, atomic_outputs() as outputs:
        checker = Checker(val, test, train, documents, params, embed,
                          map_blocks=engine.map_blocks if engine.name != "local" else None)
        runner = SuiteRunner(outputs.folder(docs_dir))
        for k in kinds:
            table = read_parquet(files[k])
            checked, error = checker.check(k, table)
            if error is not None:
                contract_errors[k] = error
                continue
            stats[k] = checked.stats
            outcomes += runner.run(k, checked.frame, suites[k], thresholds[k].model_dump(), str(suites[k]))
            if gaps is not None:
                closed[k] = gaps(table)
            del table, checked
        runner.finish()
        lines = failure_lines(outcomes, stats, contract_errors)
        records = audit_records(kinds, stats, thresholds, lines, files, {k: str(v) for k, v in suites.items()})
        for record in records:
            outputs.json(audit_log([record]), Path(audit_dir) / f"{record['dataset']}.json")
        metrics = metrics_of(records)
        if gaps is not None:
            metrics["coverage_gaps"] = closed
        outputs.json(metrics, metrics_file)
        plot_diversity(records, outputs.path(Path(plots_dir) / "validate_diversity.png"))
    click.echo(table_text(records), err=True)
    failed = [line for k in kinds for line in lines.get(k, [])]
    for line in failed:
        click.echo(f"{'warning' if warn_only else 'error'}: {line}", err=True)
    summary = (f"validate: {len(kinds) - sum(bool(lines.get(k)) for k in kinds)}/{len(kinds)} datasets pass, "
               f"{len(failed)} failed check(s) ({time.perf_counter() - t0:.0f} s); see {audit_dir}/<arm>.json and "
               f"{Path(docs_dir) / 'index.html'}")
    if failed and not warn_only:
        raise ChecksFailed(summary)  # refinery's CLI prints it as the last 'error:' line and exits 1
    click.echo(summary, err=True)


class GapCounter:
    """Per dataset: the seed's uncovered passages its synthetic rows closed, and the seed clusters they reach.

    Reads the coverage stage's passages.parquet and centroids.parquet once (:func:`refinery.seed.coverage.
    gaps_closed`); called with one dataset at a time. ``embed``: the embedder role (the centroids live in its
    space), or None to count passages only (``validate.diversity.embedder`` is not ``model``).
    """

    def __init__(self, coverage_dir: str, embed):
        from refinery.core.io import read_parquet
        from refinery.seed.coverage import read_centroids
        from schemas import coverage as coverage_schema

        folder = Path(coverage_dir)
        self.passages = coverage_schema.PASSAGES.validate(read_parquet(str(folder / "passages.parquet")),
                                                          str(folder / "passages.parquet"))
        self.centroids = read_centroids(coverage_schema.CENTROIDS.validate(
            read_parquet(str(folder / "centroids.parquet")), str(folder / "centroids.parquet")))
        self.embed = embed

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        from refinery.seed.coverage import gaps_closed

        return gaps_closed(table, self.passages, self.centroids if self.embed is not None else None, self.embed)


def make_embedder(params: DiversityParams, models_dir: str, cache_dir: str):
    """Return the diversity embedding function the params name (None to skip diversity metrics)."""
    if params.embedder == "none":
        return None
    if params.embedder == "hashing":
        from refinery.validation.diversity import HashingEmbedder

        return HashingEmbedder()
    from refinery.models.embed import Embedder
    from refinery.models.resolve import load_target

    target = load_target(models_dir, "embedder")
    return Embedder(target["path"], cache_dir=cache_dir, model_id=target["id"]).embed


if __name__ == "__main__":  # pragma: no cover
    try:
        cli.main(standalone_mode=False)
    except RefineryError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
