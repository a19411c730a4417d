"""Write the static review page and the human-review sample (Label Studio tasks, Argilla records)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from refinery.core.errors import InputError
from refinery.core.io import atomic_outputs, read_parquet
from refinery.core.params import StageParams, load_section
from refinery.inspect.review import (ARGILLA_SETTINGS, LABEL_STUDIO_CONFIG, SampleSpec, argilla_records, build_review,
                             label_studio_tasks, render_html)


class ReviewParams(StageParams):
    """params.yaml: review."""

    seed: int = 3
    rare_max_share: float = Field(0.05, gt=0, le=1)
    rare_share: float = Field(0.2, ge=0, le=1)
    other_share: float = Field(0.05, ge=0, le=1)


def _tables(paths: tuple[str, ...]) -> dict[str, pa.Table]:
    """Read each Parquet file (a folder: every Parquet file in it, sorted) that has a row_id column."""
    out: dict[str, pa.Table] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(str(p), "file not found (did the upstream stage run?)")
        for f in sorted(p.rglob("*.parquet")) if p.is_dir() else [p]:
            if "row_id" in pq.read_schema(f).names:
                out[_relative(f)] = read_parquet(f)
    return out


def _relative(path: Path) -> str:
    """Name a file by its path relative to the working directory (the project root), so exports carry no absolute
    path; a file outside it keeps its absolute path."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def attach_judge_audit(data: dict, audit: pa.Table) -> dict[str, int]:
    """Give each reviewed row the audit judge's verdict (P(yes), keep, agrees with the gates) where it was sampled.

    Returns:
        ``{"rows": audited rows on the page, "disagree": those where judge and gates disagree}``.
    """
    by_id = {r["row_id"]: r for r in audit.select(["row_id", "judge_p_yes", "judge_keep", "agree"]).to_pylist()}
    counts = {"rows": 0, "disagree": 0}
    for row in data["rows"]:
        a = by_id.get(row["row_id"])
        if a is not None:
            row["judge"] = {"p_yes": a["judge_p_yes"], "keep": a["judge_keep"], "agree": a["agree"]}
            counts["rows"] += 1
            counts["disagree"] += a["agree"] is False
    return counts


@click.command("review")
@click.option("--rows", "rows", multiple=True, required=True,
              help="Rows to review, in precedence order (gated, recovered, datasets): Parquet files or folders of "
                   "them; repeat the option.")
@click.option("--documents", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; the evidence passages.")
@click.option("--seeds", multiple=True,
              help="Human seed split files (split's train, val, test.parquet), for lineage and rare-intent shares; "
                   "repeat the option, or leave out to review without them.")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its review section.")
@click.option("--out", "out_dir", required=True,
              help="Writes index.html (the offline review page) and the Label Studio and Argilla exports of the "
                   "review sample here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the row, sample and rare-intent counts here (JSON).")
@click.option("--judge-audit", "judge_audit", default=None,
              help="The audit_judge stage's judge_audit.parquet: each sampled row shows the judge's verdict, and the "
                   "page filters the rows where it disagrees with the gates.")
def cli(rows, documents, seeds, params_file, out_dir, metrics_file, judge_audit) -> None:
    """Write OUT/index.html (offline, self-contained) and the review sample for Label Studio and Argilla."""
    p = load_section(params_file, "review", ReviewParams)
    spec = SampleSpec(seed=p.seed, rare_max_share=p.rare_max_share, rare_share=p.rare_share,
                      other_share=p.other_share)
    tables = _tables(rows)
    seed_tables = [t for t in _tables(seeds).values()]
    seed_table = pa.concat_tables(seed_tables, promote_options="default") if seed_tables else None
    data = build_review(tables, read_parquet(documents), seed_table, spec)
    judged = attach_judge_audit(data, read_parquet(judge_audit)) if judge_audit else None
    tasks = label_studio_tasks(data)
    with atomic_outputs() as out:
        folder = out.folder(out_dir)
        (folder / "index.html").write_text(render_html(data), encoding="utf-8")
        (folder / "label_studio_tasks.json").write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
        (folder / "label_studio_config.xml").write_text(LABEL_STUDIO_CONFIG, encoding="utf-8")
        (folder / "argilla_records.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in argilla_records(data)), encoding="utf-8")
        (folder / "argilla_settings.json").write_text(json.dumps(ARGILLA_SETTINGS, indent=2) + "\n",
                                                      encoding="utf-8")
        out.json({"rows": len(data["rows"]), "sampled": len(data["sample"]["row_ids"]),
                  "rare_intents": data["rare"], "per_class": data["sample"]["per_class"],
                  **({"judge_audit": judged} if judged is not None else {})}, metrics_file)
    click.echo(f"review: {len(data['rows'])} rows, {len(tasks)} sampled for human review -> {out_dir}/index.html")
