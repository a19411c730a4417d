"""Benchmark the row-level diff: two versions of a 1M-row gated dataset with planted adds, removes and changes.

    python bench/bench_diff.py [--rows 1000000] [--threads 2] [--dir /tmp/bench_diff]

Prints the wall time and the peak resident memory of the diff (run in a child process, so data generation is not
counted) and checks the counts against what was planted. Issue #8's target: 1M rows in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GATES = ("rules", "dedup", "overlap_ngram", "overlap_embedding", "faithfulness", "reward", "perplexity")
STRATEGIES = ["answer_augmentation", "question_rephrasing", "new_question", "evol_depth", "evol_breadth"]
INTENTS = ["billing", "how_to", "troubleshooting", "account_access", "data_privacy", "escalation"]


def _text(prefix: str, ids: np.ndarray, filler: str) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), filler, "")


def make_version(ids: np.ndarray, rng: np.random.Generator, faith: np.ndarray | None = None) -> pa.Table:
    """A gated-like table (provenance + text + 7 gates) for the given integer ids."""
    n = len(ids)
    rid = pc.binary_join_element_wise("syn_", pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 16, "0"), "")
    cols: dict[str, pa.Array] = {
        "row_id": rid,
        "origin": pa.array(np.where(ids % 10 == 0, "recovered", "synthetic")),
        "parent_ids": pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32),
                                               _text("qa_", ids // 4, "")),
        "doc_id": _text("kb-", ids % 50, ""),
        "evidence_start": pa.array((ids % 700).astype(np.int32)),
        "evidence_end": pa.array((ids % 700 + 150).astype(np.int32)),
        "strategy": pa.array(np.array(STRATEGIES)[ids % len(STRATEGIES)]),
        "teacher": pa.array(["embedded:smollm2-135m-instruct@ba4b4f6bc24f"] * n),
        "prompt_template": pa.array(np.array([f"{s}@c5c60d7bff07" for s in STRATEGIES])[ids % len(STRATEGIES)]),
        "attempt": pa.array((ids % 10 == 0).astype(np.int32)),
        "intent": pa.array(np.array(INTENTS)[ids % len(INTENTS)]),
        "question": _text("How do I change setting number ", ids, " on the desktop app when syncing?"),
        "answer": _text("Open Preferences, choose Sync and set option ", ids,
                        " to on; the change applies after the next sync."),
        "evidence": _text("To reduce conflicts, turn on file locking for files under Preferences > Sync > ", ids,
                          " while open; other people then see the file as read-only."),
    }
    scores = rng.random((len(GATES), n))
    if faith is not None:
        scores[GATES.index("faithfulness")] = faith
    keeps = scores > 0.05
    keeps[GATES.index("faithfulness")] = scores[GATES.index("faithfulness")] >= 0.3
    for g, s, k in zip(GATES, scores, keeps):
        cols[f"{g}_keep"] = pa.array(k)
        cols[f"{g}_score"] = pa.array(s)
        cols[f"{g}_reason"] = pa.array(np.where(k, None, f"{g}_low"))
    gate_keep = keeps.all(axis=0)
    cols["gate_keep"] = pa.array(gate_keep)
    reasons = [[f"{g}_low" for g, k in zip(GATES, keeps[:, i]) if not k] for i in range(n)]
    cols["gate_reasons"] = pa.array(reasons, pa.list_(pa.string()))
    return pa.table(cols)


def build(rows: int, folder: Path, seed: int = 42) -> dict[str, int]:
    """Write a.parquet and b.parquet; return the planted counts."""
    rng = np.random.default_rng(seed)
    ids_a = np.arange(rows, dtype=np.int64)
    removed = rng.choice(rows, size=rows // 100, replace=False)
    keep = np.setdiff1d(ids_a, removed)
    added = np.arange(rows, rows + rows // 100, dtype=np.int64)
    ids_b = np.concatenate([keep, added])
    faith_a = np.random.default_rng(seed + 1).random(rows)
    # plant changes on 2% of the kept rows: half a new faithfulness score, half an edited answer
    changed = rng.choice(keep, size=rows // 50, replace=False)
    half = len(changed) // 2
    faith_b_full = faith_a.copy()
    faith_b_full[changed[:half]] = (faith_a[changed[:half]] + 0.5) % 1.0
    new_faith = np.concatenate([faith_b_full[keep], np.random.default_rng(seed + 2).random(len(added))])
    edited = np.isin(ids_b, changed[half:])
    # the other gates' scores must match for kept rows: draw them from one seed, per row id order
    t_a = make_version(ids_a, np.random.default_rng(7), faith=faith_a)
    t_b_all = make_version(ids_a, np.random.default_rng(7), faith=faith_b_full)
    t_b_new = make_version(added, np.random.default_rng(8), faith=new_faith[len(keep):])
    t_b = pa.concat_tables([t_b_all.take(pa.array(keep)), t_b_new])
    answers = pc.if_else(pa.array(edited), pc.binary_join_element_wise(t_b.column("answer"), " (edited)", ""),
                         t_b.column("answer"))
    t_b = t_b.set_column(t_b.column_names.index("answer"), "answer", answers)
    t_b = t_b.take(pa.array(rng.permutation(t_b.num_rows)))  # row order must not matter
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(t_a, folder / "a.parquet", compression="zstd")
    pq.write_table(t_b, folder / "b.parquet", compression="zstd")
    return {"added": len(added), "removed": len(removed), "changed": len(changed)}


def run_diff(folder: Path, threads: int) -> None:
    """Child process: diff a.parquet vs b.parquet and print the result with time and peak memory as JSON."""
    import duckdb

    from refinery.inspect.diff import DiffOptions, diff_table

    t0 = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("CREATE TEMP TABLE moves (ds VARCHAR, k VARCHAR, status VARCHAR)")
    d = diff_table(con, folder / "a.parquet", folder / "b.parquet", "bench", DiffOptions(threads=threads))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mib": round(peak), **{k: d[k] for k in
                      ("rows_a", "rows_b", "added", "removed", "changed", "unchanged", "changed_columns")}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/bench_diff")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.dir)
    if args.child:
        run_diff(folder, args.threads)
        return
    t0 = time.perf_counter()
    planted = build(args.rows, folder)
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in folder.glob("*.parquet")}
    print(f"built 2 x {args.rows:,} rows in {time.perf_counter() - t0:.1f} s; Parquet MiB {sizes}; planted {planted}")
    out = subprocess.run([sys.executable, __file__, "--child", "--dir", str(folder), "--threads", str(args.threads),
                          "--rows", str(args.rows)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"diff: {res['wall_s']} s wall, peak RSS {res['peak_rss_mib']} MiB, threads {args.threads}")
    print(f"counts: added {res['added']}, removed {res['removed']}, changed {res['changed']}, "
          f"unchanged {res['unchanged']}; changed columns {res['changed_columns']}")
    ok = all(res[k] == planted[k] for k in planted)
    print("counts match the planted changes" if ok else f"MISMATCH: planted {planted}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
