"""Audit the seed train split's coverage (topics, intents, categories, passages) before generation aims at the gaps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from pydantic import Field

from refinery.core.params import StageParams, load_section
from refinery.seed.coverage import CoverageAudit


class CoverageParams(StageParams):
    """Knobs of the coverage stage."""

    clusters: int = Field(ge=1)  # k of the seed k-means (capped at the seed rows)
    seed: int  # k-means and map seed
    window_sentences: int = Field(ge=1)  # sentences per passage window
    rare_share: float = Field(ge=0, le=1)  # a cluster, intent or category under this share of seed rows is a gap
    listed_passages: int = Field(default=15, ge=0)  # uncovered passages quoted in reports/coverage.md


def markdown(audit: CoverageAudit, texts: dict[str, str], params: CoverageParams, map_rel: str) -> str:
    """Render reports/coverage.md: what the seed covers, its gaps, and the map."""
    m = audit.metrics
    groups = audit.groups.to_pylist()
    out = ["# Seed coverage audit\n",
           f"The human train split ({m['seed_rows']} rows, {m['train_documents']} documents) embedded with the "
           f"embedder role and clustered into {m['clusters']} k-means clusters (question and answer). A passage is "
           f"a window of {m['window_sentences']} sentences of a train document; it is covered when a seed row's "
           f"evidence overlaps it. A cluster, intent or category under {m['rare_share']:.0%} of the seed rows is a "
           f"gap. `generate.allocation: coverage` takes parents from the smallest clusters first and new passages "
           f"from uncovered windows; validate counts the gaps each dataset closed.\n",
           f"Passages (current documents): **{m['passages']}**, covered {m['passages_covered']}, uncovered "
           f"**{m['passages_uncovered']}** (passage coverage {m['passage_coverage']}); stale passages "
           f"{m['stale_passages']}. Documents outside the train split (held out, or without a seed row; "
           f"generation never reads them): {m['documents_outside_train']}.\n",
           f"![seed coverage map]({map_rel})\n"]
    for kind, title in (("cluster", "Clusters"), ("intent", "Intents"), ("category", "Document categories")):
        rows = [g for g in groups if g["kind"] == kind]
        out.append(f"## {title}\n")
        out.append(f"| {kind} | seed rows | share | documents | passages | uncovered passages | gap |")
        out.append("|---|---|---|---|---|---|---|")
        for g in sorted(rows, key=lambda g: (g["seed_rows"], g["key"])):
            passages = "–" if kind == "intent" else str(g["passages"])
            uncovered = "–" if kind == "intent" else str(g["uncovered_passages"])
            out.append(f"| {g['key']} | {g['seed_rows']} | {g['share']:.1%} | {g['documents']} | {passages} | "
                       f"{uncovered} | {'**gap**' if g['gap'] else ''} |")
        out.append("")
    uncovered = [p for p in audit.passages.to_pylist() if not p["covered"] and not p["stale"]]
    out.append(f"## Uncovered passages (first {min(params.listed_passages, len(uncovered))} of {len(uncovered)})\n")
    out.append("| document | characters | cluster | passage |")
    out.append("|---|---|---|---|")
    for p in uncovered[:params.listed_passages]:
        text = " ".join(texts[p["doc_id"]][p["start"]:p["end"]].split())
        text = (text[:140] + "…" if len(text) > 140 else text).replace("|", "\\|")
        out.append(f"| {p['doc_id']} | {p['start']}-{p['end']} | {p['cluster']} | {text} |")
    out.append("")
    return "\n".join(out)


def plot_map(audit: CoverageAudit, path: Path) -> None:
    """Scatter the seed rows (coloured by cluster) and the passages (uncovered ones marked x) on the 2-D map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, passages = audit.rows.to_pydict(), audit.passages.to_pydict()
    fig, ax = plt.subplots(figsize=(8, 6))
    cmap = plt.get_cmap("tab10")
    clusters = np.asarray(rows["cluster"], int)
    for c in sorted(set(clusters.tolist())):
        m = clusters == c
        ax.scatter(np.asarray(rows["x"])[m], np.asarray(rows["y"])[m], s=18, color=cmap(c % 10),
                   label=f"cluster {c} ({int(m.sum())} seed rows)")
    covered = np.asarray(passages["covered"], bool)
    stale = np.asarray(passages["stale"], bool)
    px, py = np.asarray(passages["x"]), np.asarray(passages["y"])
    ax.scatter(px[covered & ~stale], py[covered & ~stale], s=30, facecolors="none", edgecolors="grey",
               label="passage, covered")
    ax.scatter(px[~covered & ~stale], py[~covered & ~stale], s=40, marker="x", color="black",
               label="passage, no seed row")
    ax.set_title("seed rows and passages (PCA of the embeddings)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


@click.command("coverage")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="Params file; this stage reads its coverage section.")
@click.option("--train", "train_file", required=True,
              help="Human train split (split's train.parquet): one row per seed QA pair; the rows audited.")
@click.option("--documents", "documents_file", required=True,
              help="Source documents (ingest's documents.parquet): one row per document; their passages.")
@click.option("--models", "models_dir", required=True,
              help="Provisioned models folder (provision's --out): the embedder role is read from it.")
@click.option("--cache", "cache_dir", required=True, help="Embedding cache folder (created if missing).")
@click.option("--out", "out_dir", required=True,
              help="Writes rows.parquet (per seed row its cluster), groups.parquet (per cluster, intent and "
                   "category), passages.parquet (per passage window: covered or not) and centroids.parquet here.")
@click.option("--report", "report_file", required=True, help="Writes the audit as Markdown here (coverage.md).")
@click.option("--plots", "plots_dir", required=True, help="Writes coverage_map.png (the 2-D map) here.")
@click.option("--metrics", "metrics_file", required=True,
              help="Writes the audit's counts (clusters, rare intents, passage coverage) here (JSON).")
def cli(params_file, train_file, documents_file, models_dir, cache_dir, out_dir, report_file, plots_dir,
        metrics_file) -> None:
    """Audit the seed's coverage of topics, intents, categories and passages before generating."""
    import os

    from refinery.core.io import atomic_outputs, read_parquet
    from refinery.models.embed import Embedder
    from refinery.models.resolve import load_target
    from refinery.seed.coverage import audit, centroids_table
    from schemas import coverage as coverage_schema
    from schemas import documents as documents_schema
    from schemas import split as split_schema

    params = load_section(params_file, "coverage", CoverageParams)
    train = split_schema.CONTRACT.validate(read_parquet(train_file), train_file)
    documents = documents_schema.CONTRACT.validate(read_parquet(documents_file), documents_file)
    target = load_target(models_dir, "embedder")
    embed = Embedder(target["path"], cache_dir=cache_dir, model_id=target["id"]).embed
    result = audit(train, documents, embed, clusters=params.clusters, seed=params.seed,
                   window_sentences=params.window_sentences, rare_share=params.rare_share)
    out = Path(out_dir)
    tables: dict[str, Any] = {
        "rows": (coverage_schema.ROWS, result.rows), "groups": (coverage_schema.GROUPS, result.groups),
        "passages": (coverage_schema.PASSAGES, result.passages),
        "centroids": (coverage_schema.CENTROIDS, centroids_table(result.centroids))}
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    map_path = Path(plots_dir) / "coverage_map.png"
    with atomic_outputs() as outputs:
        for name, (contract, table) in tables.items():
            path = out / f"{name}.parquet"
            outputs.parquet(contract.validate(table, str(path)), path, contract.arrow)
        map_rel = os.path.relpath(map_path, Path(report_file).parent)
        outputs.text(markdown(result, texts, params, map_rel), report_file)
        plot_map(result, outputs.path(map_path))
        outputs.json(result.metrics, metrics_file)
    m = result.metrics
    click.echo(f"coverage: {m['seed_rows']} seed rows in {m['clusters']} clusters (smallest share "
               f"{m['smallest_cluster_share']}), rare intents {m['rare_intents'] or 'none'}; "
               f"{m['passages_uncovered']} of {m['passages']} passages uncovered -> {out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
