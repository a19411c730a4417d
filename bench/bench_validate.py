"""Time `refinery validate` on a 100,000-row curated dataset (target: under 60 s on 2 cores).

`python bench/bench_validate.py [--rows 100000] [--embedder hashing|model]` builds a deterministic dataset
(`random.Random(seed)`): half human rows, half synthetic rows with full provenance, 11 intents (3 rare),
0.2% planted exact duplicates, 2,000-row val and test splits, then runs the validate command (Pandera row
contract, Arrow/DuckDB check columns, MinHash near duplicates, diversity on a 1,000-row sample, the GE suite and
Data Docs) in a subprocess and prints its wall time and peak RSS. Figures are printed, never asserted.
With `--embedder model` the provisioned MiniLM (the validate stage's `--models` in dvc.yaml) embeds the diversity
sample (cold cache).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# runs a module as ``python -m`` would, then prints the process's own peak RSS (VmHWM) on stderr: a child's
# getrusage figure starts at this benchmark's RSS when it forked, which holds the rows it built
PEAK_THEN_RUN = """import atexit, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        sys.stderr.write(next((l for l in f if l.startswith("VmHWM:")), ""))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

from refinery.core import dag  # noqa: E402
from refinery.core.text import stable_id  # noqa: E402
from schemas import datasets as datasets_schema  # noqa: E402
from schemas import documents as documents_schema  # noqa: E402
from schemas import split as split_schema  # noqa: E402

INTENTS = ["how_to"] * 24 + ["troubleshooting"] * 16 + ["billing"] * 11 + ["feature_info"] * 14 + \
    ["account_access"] * 6 + ["policy"] * 7 + ["integration"] * 7 + ["data_privacy"] * 6 + \
    ["accessibility", "legal_request", "escalation"] * 3
VOCAB = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in ("n", "r", "s", "t", "l", "m")]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def build(rows: int, tmp: Path, seed: int = 42) -> None:
    rng = random.Random(seed)
    n_docs = 500
    docs = [{"doc_id": f"kb-{i:04d}", "title": None, "text": text(rng, 150), "updated_at": "2024-01-01",
             "category": ["help_center", "billing", "api", "policy"][i % 4], "supersedes": None,
             "superseded_by": None, "stale": False, "content_hash": f"{i:016x}", "source_file": "d.jsonl",
             "source_row": i + 1, "params_hash": "p", "code_version": "c"} for i in range(n_docs)]
    pq.write_table(pa.Table.from_pylist(docs, schema=documents_schema.ARROW), tmp / "documents.parquet")

    def split_rows(split: str, n: int, doc_lo: int, doc_hi: int) -> pa.Table:
        out = []
        for i in range(n):
            out.append({"row_id": stable_id("qa", split, str(i)), "origin": "human", "parent_ids": [],
                        "doc_id": f"kb-{rng.randrange(doc_lo, doc_hi):04d}", "evidence_start": 0, "evidence_end": 10,
                        "attempt": 0, "params_hash": "p", "code_version": "c", "qa_id": f"{split}-{i}",
                        "question": text(rng, 10) + "?", "answer": text(rng, 25) + ".",
                        "intent": rng.choice(INTENTS), "evidence": "x", "source_file": "qa.jsonl",
                        "source_row": i + 1, "split": split})
        return pa.Table.from_pylist(out, schema=split_schema.ARROW)

    half = rows // 2
    train = split_rows("train", half, 0, 400)
    for name, t in (("train", train), ("val", split_rows("val", 2000, 400, 450)),
                    ("test", split_rows("test", 2000, 450, 500))):
        pq.write_table(t, tmp / f"{name}.parquet")
    human = [{k: r[k] for k in datasets_schema.ARROW.names if k in r} | {"weight": 1.0, "source": "human"}
             for r in train.to_pylist()]
    syn = []
    for i in range(rows - half):
        parent = human[rng.randrange(half)]
        if i % 500 == 0:  # planted exact duplicate of a human row (0.2%)
            q, a = parent["question"].upper(), parent["answer"]
        else:
            q, a = text(rng, 10) + "?", text(rng, 25) + "."
        syn.append({"row_id": stable_id("syn", str(i)), "origin": "synthetic", "parent_ids": [parent["row_id"]],
                    "doc_id": parent["doc_id"], "evidence_start": 0, "evidence_end": 10, "strategy": "new_question",
                    "teacher": "embedded:smollm2-135m-instruct@abc", "prompt_template": "new_question@0123",
                    "gen_params": "{}", "attempt": 0, "recovery_action": None, "params_hash": "p",
                    "code_version": "c", "question": q, "answer": a, "intent": parent["intent"], "evidence": "x",
                    "weight": 0.5, "source": "accepted"})
    (tmp / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(human + syn, schema=datasets_schema.ARROW), tmp / "ds" / "curated.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--embedder", choices=["hashing", "model", "none"], default="hashing")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="a params file with a validate section")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        build(args.rows, tmp)
        print(f"built {args.rows:,} rows in {time.perf_counter() - t0:.1f} s")
        project = yaml.safe_load(Path(args.params).read_text())
        params, assemble = project.get("validate"), project.get("assemble")
        if params is None or "curated" not in ((assemble or {}).get("arms") or {}):
            raise SystemExit(f"{args.params} has no validate section or no curated arm in assemble.arms")
        # the curated arm alone (validate reads assemble.arms), with its thresholds
        params = {**params, "diversity": {**params["diversity"], "embedder": args.embedder},
                  "thresholds": {k: v for k, v in (params.get("thresholds") or {}).items() if k == "curated"}}
        assemble = {**assemble, "arms": {"curated": assemble["arms"]["curated"]}}
        (tmp / "params.yaml").write_text(yaml.safe_dump({"validate": params, "assemble": assemble}))
        cmd = [sys.executable, "-c", PEAK_THEN_RUN, "stages.validate", "--params", str(tmp / "params.yaml"), "--datasets",
               str(tmp / "ds"), "--train", str(tmp / "train.parquet"), "--val", str(tmp / "val.parquet"), "--test",
               str(tmp / "test.parquet"), "--documents", str(tmp / "documents.parquet"), "--models",
               dag.option("validate", "--models", ROOT), "--cache", str(tmp / "cache"), "--expectations",
               dag.option("validate", "--expectations", ROOT), "--audit", str(tmp / "audit.json"), "--data-docs",
               str(tmp / "data_docs"), "--plots", str(tmp / "plots"), "--metrics", str(tmp / "validate.json"),
               "--warn-only"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # the paths of dvc.yaml are relative
        wall = time.perf_counter() - t0
        peak = [line for line in proc.stderr.splitlines() if line.startswith("VmHWM:")]
        rss = (int(peak[-1].split()[1]) / 1024 if peak
               else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        print("\n".join(line for line in proc.stderr.splitlines() if not line.startswith("VmHWM:")).strip())
        if proc.returncode:
            raise SystemExit(f"validate exited {proc.returncode}")
        m = json.loads((tmp / "validate.json").read_text())["curated"]
        print(f"validate on {args.rows:,} rows ({args.embedder} diversity): {wall:.1f} s wall "
              f"({args.rows / wall:,.0f} rows/s), peak RSS {rss:,.0f} MiB; duplicate_rate {m['duplicate_rate']}, "
              f"target < 60 s on 2 cores")


if __name__ == "__main__":
    main()
