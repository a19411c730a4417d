"""Is greedy decoding of a LoRA-merged student the same on every run, per dtype and thread count? And how fast?

Usage: python bench/bench_decode_dtype.py --adapter models/adapters/contaminated-s42 [--repeats 3]
       [--setups float32x2 bfloat16x2 bfloat16x1] [--rows 96] [--max-new-tokens 16]

What runs is the evaluate stage's decoding path (``refinery.training.lora``): the student base from
models/base (a provisioned demo), the adapter merged, cast to the dtype, prompts built from the first ``--rows``
rows of data/02_split/train.parquet with the train section's window, decoded greedily in batches of 48 with
``lora.generate``. Each setup (DTYPExTHREADS) runs ``--repeats`` times, each in a fresh process (torch's thread
pool is fixed per process), alternating setups. Prints per run the decode seconds and a hash of all decoded
texts: one hash per setup means that setup decodes the same on every run. Prints figures; asserts nothing.
Run it alone: other load on the 2 cores is noise. ONEDNN_MAX_CPU_ISA from the environment is passed through.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(adapter: str, dtype: str, threads: int, rows: int, max_new_tokens: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import pyarrow.parquet as pq
    import torch
    import yaml
    from peft import PeftModel

    from refinery.training import lora

    window = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["window_chars"]
    student = next((ROOT / "models" / "base" / "weights").glob("*smollm2*"))
    model, tok, s2s = lora.load_student(str(student), threads)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(getattr(torch, dtype))
    docs = {r["doc_id"]: r["text"] for r in pq.read_table(ROOT / "data/01_seed/documents.parquet").to_pylist()}
    table = pq.read_table(ROOT / "data/02_split/train.parquet").to_pylist()[:rows]
    prompts = [lora.prompt_text(tok, lora.messages_for(r, docs, window, with_answer=False), s2s) for r in table]
    t0 = time.perf_counter()
    out = lora.generate(model, tok, prompts, seq2seq=s2s, max_new_tokens=max_new_tokens, batch_size=48)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 1), "hash": hashlib.md5("\x1f".join(out).encode()).hexdigest()[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--setups", nargs="+", default=["float32x2", "bfloat16x2", "bfloat16x1"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        dtype, threads = a.child.split("x")
        print(json.dumps(_one(a.adapter, dtype, int(threads), a.rows, a.max_new_tokens)))
        return
    seen: dict[str, list[dict]] = {s: [] for s in a.setups}
    for r in range(a.repeats):
        for setup in (a.setups if r % 2 == 0 else list(reversed(a.setups))):
            cmd = [sys.executable, __file__, "--adapter", a.adapter, "--rows", str(a.rows),
                   "--max-new-tokens", str(a.max_new_tokens), "--child", setup]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            seen[setup].append(res)
            print(f"repeat {r + 1}  {setup:<12} {res['seconds']:>6.1f} s  texts {res['hash']}", flush=True)
    for setup, runs in seen.items():
        hashes = sorted({x["hash"] for x in runs})
        print(f"{setup:<12} median {sorted(x['seconds'] for x in runs)[len(runs) // 2]:.1f} s; "
              f"{len(hashes)} distinct output(s) in {len(runs)} runs: {', '.join(hashes)}")


if __name__ == "__main__":
    main()
