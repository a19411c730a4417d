"""Teacher throughput against batch size: the local TransformersBackend sampling the same few-shot prompts.

Usage:
    python bench/bench_teacher_batch.py [--batch-sizes 8 16 32] [--n 48] [--max-new-tokens 64]
        [--dtype bfloat16] [--threads 2]

Reads the provisioned teacher (models/base, after `refinery provision`) and the demo's train split
(data/02_split/train.parquet) and documents: each prompt is a passage with one few-shot example, as generate's
prompts are. Each batch size gets a warm-up batch, then one timed pass over all prompts; prints seconds, calls per
second and completion tokens. Run it alone: on 2 cores any other load is in the figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def prompts(n: int) -> list[str]:
    """Few-shot question-writing prompts over the demo's passages (one example each, from another row)."""
    import pyarrow.parquet as pq

    docs = {d["doc_id"]: d["text"] for d in pq.read_table("data/01_seed/documents.parquet").to_pylist()}
    train = pq.read_table("data/02_split/train.parquet").to_pylist()
    out = []
    for i, r in enumerate(train[:n]):
        ex = train[(i + 7) % len(train)]
        out.append(f"Write a question and answer from the passage.\n\nQuestion: {ex['question']}\nAnswer: "
                   f"{ex['answer']}\n\nPassage: {docs[r['doc_id']][:900]}\nQuestion:")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--n", type=int, default=48, help="prompts (the demo's first train rows)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from refinery.models.backends.base import GenRequest
    from refinery.models.backends.local import TransformersBackend
    from refinery.models.resolve import backend_spec, load_target

    path = backend_spec(load_target("models/base", "teacher"))["path"]
    reqs = [GenRequest(prompt=p, max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.95, seed=i)
            for i, p in enumerate(prompts(args.n))]
    print(f"{len(reqs)} prompts, {args.max_new_tokens} new tokens, {args.dtype}, {args.threads} threads")
    for bs in args.batch_sizes:
        backend = TransformersBackend(path, batch_size=bs, threads=args.threads, dtype=args.dtype)
        backend.generate(reqs[:bs])  # warm-up
        t0 = time.perf_counter()
        res = backend.generate(reqs)
        dt = time.perf_counter() - t0
        tokens = sum(r.completion_tokens or 0 for r in res)
        print(f"batch {bs:>3}: {dt:6.1f} s, {len(reqs) / dt:5.2f} calls/s, {tokens} completion tokens")


if __name__ == "__main__":
    main()
