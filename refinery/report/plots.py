"""Draw the report's PNG plots (arms, F1, all metrics, gap, gate overlap, recovery) from the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from refinery.report.render import LABEL, lookup, recovery_modes
from refinery.report.stats import METRICS, MODELS, NOT_RUN


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _not_run(path: Path, what: str) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5, 2), dpi=100)
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: {NOT_RUN}", ha="center", va="center")
    _save(plt, fig, path)


def write_plots(docs: dict[str, Any], summary: dict[str, Any], metrics_dir: str, paths: dict[str, Path],
                runs: dict[str, str] | None = None) -> None:
    """Write the report's PNGs: F1, arms over seeds, all metrics, gap, gate overlap, recovery ('not run' if missing)."""
    plt = _fig()
    runs = runs or {m: m for m in MODELS}
    evals = {m: docs.get(f"{metrics_dir}/eval/{r}.json") for m, r in runs.items()}
    have = [m for m in runs if evals[m] and evals[m].get("f1") is not None]  # scored (test rows > 0)
    arms = ((summary.get("experiment") or {}).get("arms")) or {}
    if arms:
        fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
        names = list(arms)
        x = np.arange(len(names))
        means = [arms[a]["mean"] for a in names]
        sds = [arms[a]["sd"] or 0.0 for a in names]
        ax.bar(x, means, yerr=sds, capsize=4, color="lightsteelblue", edgecolor="black", lw=0.5,
               label="mean ± sd over seeds")
        for i, a in enumerate(names):
            ys = list(arms[a]["f1_per_seed"].values())
            ax.plot([i] * len(ys), ys, "k.", ms=5, label="one seed" if i == 0 else None)
        ax.set_xticks(x, [LABEL.get(a, a) for a in names], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="token F1", title="Arms on the human test split")
        ax.legend(fontsize=8)
        _save(plt, fig, paths["arms"])
    else:
        _not_run(paths["arms"], "arm comparison")
    if have:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        f1 = [evals[m]["f1"] for m in have]
        ax.bar([LABEL.get(m, m) for m in have], f1)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.set(ylabel="token F1", title="F1 on the human test split")
        _save(plt, fig, paths["f1"])
        fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
        width = 0.8 / len(have)
        for i, m in enumerate(have):
            vals = [evals[m].get(k) or 0.0 for k, _ in METRICS]
            ax.bar(np.arange(len(METRICS)) + i * width, vals, width, label=LABEL.get(m, m))
        ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2, [h for _, h in METRICS])
        ax.set(ylabel="score", title="All metrics, human test split")
        ax.legend(fontsize=8)
        _save(plt, fig, paths["metrics"])
    else:
        _not_run(paths["f1"], "evaluation")
        _not_run(paths["metrics"], "evaluation")
    gap = (summary.get("gap") or {}).get("metrics") or {}
    if gap:
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        keys = [k for k, _ in METRICS if k in gap]
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [gap[k]["lost"] for k in keys], 0.4, label="lost by contamination (A − B)")
        ax.bar(x + 0.2, [gap[k]["recovered"] for k in keys], 0.4, label="won back by curation (C − B)")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x, [h for k, h in METRICS if k in gap])
        ax.set(title="Gap analysis")
        ax.legend(fontsize=8)
        _save(plt, fig, paths["gap"])
    else:
        _not_run(paths["gap"], "gap analysis")
    gate = docs.get(f"{metrics_dir}/gate.json") or {}
    ov = gate.get("overlap") or {}
    if ov.get("gates"):
        names = ov["gates"]
        # a gate that rejected nothing has no Jaccard with anyone (null in gate.json): drawn blank
        mat = np.array([[np.nan if ov["jaccard"][a][b] is None else ov["jaccard"][a][b] for b in names]
                        for a in names], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        fig.colorbar(im, ax=ax, label="Jaccard of rejected rows")
        ax.set(title="Gate overlap")
        _save(plt, fig, paths["gate_overlap"])
    else:
        _not_run(paths["gate_overlap"], "gate")
    rec = docs.get(f"{metrics_dir}/recover.json")
    modes = recovery_modes(rec)
    if modes:
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        x = np.arange(len(modes))
        ax.bar(x - 0.2, [lookup(rec, f"{a}.recovery_rate") or 0.0 for _, a, _ in modes], 0.4, label="adaptive")
        ax.bar(x + 0.2, [lookup(rec, f"{b}.recovery_rate") or 0.0 for _, _, b in modes], 0.4, label="naive")
        ax.set_xticks(x, [m for m, _, _ in modes], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="recovery rate", title="Recovery at equal budget")
        ax.legend()
        _save(plt, fig, paths["recovery"])
    else:
        _not_run(paths["recovery"], "recovery")


PLOT_DATA = ("arms", "f1", "gap", "recovery")  # report_<name>.csv: the figures' numbers, declared as DVC plots


def write_plot_data(docs: dict[str, Any], summary: dict[str, Any], metrics_dir: str, paths: dict[str, Path],
                    runs: dict[str, str] | None = None) -> None:
    """Write the numbers behind the arms, F1, gap and recovery figures as CSVs (DVC plots; header only if not run).

    dvc.yaml declares each as a bar plot, so ``dvc plots show`` / ``refinery plots`` draw them with Vega and
    ``dvc plots diff`` compares them across revisions, beside the PNGs.
    """
    import csv

    runs = runs or {m: m for m in MODELS}
    arms = ((summary.get("experiment") or {}).get("arms")) or {}
    evals = {m: docs.get(f"{metrics_dir}/eval/{r}.json") for m, r in runs.items()}
    gap = (summary.get("gap") or {}).get("metrics") or {}
    rec = docs.get(f"{metrics_dir}/recover.json")
    label = dict(METRICS)
    tables = {
        "arms": (["arm", "mean_f1", "sd", "seeds"],
                 [[LABEL.get(a, a), arms[a]["mean"], arms[a]["sd"], len(arms[a]["f1_per_seed"])] for a in arms]),
        "f1": (["model", "f1"], [[LABEL.get(m, m), evals[m]["f1"]] for m in runs
                                 if evals[m] and evals[m].get("f1") is not None]),
        "gap": (["effect", "value"], [[f"{label.get(k, k)}: {what}", gap[k][what]] for k, _ in METRICS if k in gap
                                      for what in ("lost", "recovered")]),
        "recovery": (["mode", "recovery_rate"],
                     [[f"{m}: {method}", lookup(rec, f"{key}.recovery_rate") or 0.0]
                      for m, a, b in recovery_modes(rec) for method, key in (("adaptive", a), ("naive", b))]),
    }
    for name in PLOT_DATA:
        header, rows = tables[name]
        with open(paths[name], "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(header)
            out.writerows(rows)
