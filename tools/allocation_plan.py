"""Plan-level comparison of generate.allocation plain vs coverage at the same budget (no teacher calls).

Plans round 1 of the generate stage both ways from the demo's split, documents and coverage audit (run `dvc repro
coverage` first) and prints, per allocation: calls per seed cluster, the smallest cluster's calls, the uncovered
passage windows some call is grounded in, and the calls on rare-intent parents. What the gates then keep is the
validate stage's `coverage_gaps` (metrics/validate.json), for the allocation params.yaml names.

    python tools/allocation_plan.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from refinery.core.params import load_section
    from refinery.generation import strategies as strat
    from refinery.generation.calls import load_templates
    from stages.generate import GenerateParams, plan

    train = pq.read_table(ROOT / "data/02_split/train.parquet")
    documents = pq.read_table(ROOT / "data/01_seed/documents.parquet")
    rows = pq.read_table(ROOT / "data/02_coverage/rows.parquet").to_pylist()
    passages = pq.read_table(ROOT / "data/02_coverage/passages.parquet").to_pylist()
    cluster_of = {r["row_id"]: r["cluster"] for r in rows}
    intent_of = {r["row_id"]: r["intent"] for r in rows}
    rare = {i for i, n in Counter(intent_of.values()).items() if i is not None and n < 8}
    uncovered = [p for p in passages if not p["covered"] and not p["stale"]]
    templates = load_templates(ROOT / "prompts", list(strat.GENERATION_STRATEGIES))
    base = load_section(args.params, "generate", GenerateParams)
    print(f"budget {base.budget}; {len(uncovered)} uncovered passage windows; rare intents {sorted(rare)}")
    for allocation in ("plain", "coverage"):
        params = base.model_copy(update={"allocation": allocation})
        planned, _ = plan(train, documents, templates, params, "teacher@bench",
                          cluster_of if allocation == "coverage" else None)
        per_cluster = Counter(cluster_of[p.parent["row_id"]] for p in planned if p.parent["row_id"] in cluster_of)
        touched = {(u["doc_id"], u["start"]) for u in uncovered for p in planned
                   if p.parent.get("doc_id") == u["doc_id"] and p.span[0] < u["end"] and u["start"] < p.span[1]}
        rare_calls = sum(intent_of.get(p.parent["row_id"]) in rare for p in planned)
        print(f"{allocation:>8}: {len(planned)} calls; per seed cluster "
              f"{dict(sorted(per_cluster.items()))}; smallest cluster's calls {min(per_cluster.values())}; "
              f"uncovered windows grounded in {len(touched)} of {len(uncovered)}; calls on rare-intent parents "
              f"{rare_calls}")


if __name__ == "__main__":
    main()
