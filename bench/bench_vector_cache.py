"""Time loading a signature cache in its two shard formats: Arrow IPC (written now) and Parquet (earlier versions).

Usage:
    python bench/bench_vector_cache.py [--texts 100000] [--shards 1] [--repeats 5]

It signs ``--texts`` deterministic texts with the dedup gate's MinHash settings (``SignatureStore``: 128
permutations, 5-character shingles; near-duplicate families, as generated rows are) and stores the signatures
twice, with the same keys and vectors: as Parquet shards written as earlier versions wrote them, and as Arrow IPC
shards written by ``VectorCache.put``; ``--shards`` shards each (1 by default: the dedup gate stores what one
call signed with one ``put``, so the gate stage's rows land in one shard). Then each repeat loads each folder in a
fresh process (alternating formats, so both see the same machine), as a stage does on its first lookup, and
prints the load's wall time; finally the median per format, their ratio, the bytes on disk and whether both
loads hold the same keys and vectors. Figures are printed, never asserted: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_LOAD = """
import hashlib, json, sys, time
import numpy as np
from refinery.models.embed import VectorCache
t0 = time.perf_counter()
cache = VectorCache(sys.argv[1], None, np.uint32)
n = len(cache)
seconds = time.perf_counter() - t0
digest = hashlib.sha256(cache._keys.tobytes() + cache._vecs.tobytes()).hexdigest()[:16]
print(json.dumps({"seconds": seconds, "vectors": n, "digest": digest}))
"""


def texts(n: int) -> list[str]:
    """``n`` deterministic texts in families of near duplicates (a word or two changed within a family)."""
    import random

    r = random.Random(0)
    vocab = [f"{a}{b}{c}" for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "nrstlm"]
    out: list[str] = []
    while len(out) < n:
        base = [r.choice(vocab) for _ in range(r.randint(12, 60))]
        for _ in range(r.randint(1, 4)):
            words = list(base)
            words[r.randrange(len(words))] = r.choice(vocab)
            out.append(" ".join(words))
    return out[:n]


def build(base: Path, n: int, shards: int) -> tuple[Path, Path]:
    """Write the same signatures as Parquet shards (the earlier format) and as IPC shards (VectorCache.put)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery.gates.dedup import SignatureStore
    from refinery.models.embed import VectorCache, _keys_to_arrow, content_keys

    store = SignatureStore(None)
    all_texts = texts(n)
    sigs = store.compute(pa.array(all_texts))
    keys = content_keys("bench", all_texts)
    keys, first = np.unique(keys, return_index=True)
    sigs = sigs[first]
    parquet, ipc = base / "parquet", base / "ipc"
    parquet.mkdir()
    for k, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        table = pa.table({"key": _keys_to_arrow(keys[part]), "vec": pa.FixedSizeListArray.from_arrays(
            pa.array(sigs[part].reshape(-1), pa.uint32()), sigs.shape[1])})
        pq.write_table(table, parquet / f"part-{k:016d}.parquet", compression="zstd")  # as earlier versions wrote
        VectorCache(ipc, sigs.shape[1], np.uint32).put(keys[part], sigs[part])
    return parquet, ipc


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vector-cache-") as tmp:
        t0 = time.perf_counter()
        folders = dict(zip(("parquet", "ipc"), build(Path(tmp), args.texts, args.shards)))
        print(f"{args.texts:,} texts signed and stored in {args.shards} shard{'s' * (args.shards > 1)} per format in "
              f"{time.perf_counter() - t0:.1f} s; on disk: parquet {size(folders['parquet']) / 2**20:.1f} MiB, "
              f"ipc {size(folders['ipc']) / 2**20:.1f} MiB")
        seconds: dict[str, list[float]] = {"parquet": [], "ipc": []}
        digests: dict[str, set[str]] = {"parquet": set(), "ipc": set()}
        for r in range(args.repeats):
            for fmt, folder in folders.items():
                out = subprocess.run([sys.executable, "-c", _LOAD, str(folder)], cwd=ROOT, capture_output=True,
                                     text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                seconds[fmt].append(got["seconds"])
                digests[fmt].add(got["digest"])
                print(f"repeat {r + 1}: {fmt:7s} load {got['seconds']:.3f} s ({got['vectors']:,} vectors)")
        med = {fmt: statistics.median(s) for fmt, s in seconds.items()}
        print(f"median load: parquet {med['parquet']:.3f} s, ipc {med['ipc']:.3f} s; parquet / ipc "
              f"{med['parquet'] / med['ipc']:.2f}x; same keys and vectors: "
              f"{'yes' if digests['parquet'] == digests['ipc'] and len(digests['ipc']) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
