"""Benchmark evaluation decoding: greedy answers of the student per dtype and batch size, on a real test split.

Usage: python bench/bench_eval.py [--rows 48] [--split FILE] [--documents FILE] [--models DIR] [--window-chars 0]
       [--max-new-tokens 24] [--configs float32:24 bfloat16:24 bfloat16:48]
--split, --documents and --models default to the evaluate_base stage's --test, --documents and --models in dvc.yaml.

Builds the prompts exactly as `refinery evaluate` does (the passage window of the train params), decodes the
first ``--rows`` test rows once per ``dtype:batch_size`` config with the same loaded student, and prints seconds,
rows/s, the speed relative to the first config, and how many answers equal those of the first config. Prints
figures; asserts nothing. Run it alone: other load on the 2 cores is noise (the ratios within one run are the
figure to keep).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--split", help="default: the evaluate_base stage's --test in dvc.yaml")
    ap.add_argument("--documents", help="default: the evaluate_base stage's --documents in dvc.yaml")
    ap.add_argument("--models", help="default: the evaluate_base stage's --models in dvc.yaml")
    ap.add_argument("--window-chars", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["float32:24", "bfloat16:24", "bfloat16:48"])
    args = ap.parse_args(argv)
    from refinery.core import dag

    args.split = args.split or dag.option("evaluate_base", "--test", needed_for="--split")
    args.documents = args.documents or dag.option("evaluate_base", "--documents", needed_for="--documents")
    args.models = args.models or dag.option("evaluate_base", "--models", needed_for="--models")

    import torch

    from refinery.training import lora
    from refinery.core.io import read_parquet
    from refinery.training.student import read_documents, student_path

    test = read_parquet(args.split).slice(0, args.rows).to_pylist()
    documents = read_documents(args.documents)
    ref, student_id = student_path(args.models)
    model, tokenizer, seq2seq = lora.load_student(ref, args.threads)
    prompts = [lora.prompt_text(tokenizer, lora.messages_for(r, documents, args.window_chars, with_answer=False),
                                seq2seq) for r in test]
    tokens = sum(len(tokenizer(p).input_ids) for p in prompts) / max(len(prompts), 1)
    print(f"student {student_id}: {len(prompts)} test rows, {tokens:.0f} prompt tokens on average, "
          f"max_new_tokens {args.max_new_tokens}, {args.threads} threads")
    first_s, first_out = None, None
    print(f"{'dtype':<10}{'batch':>6}{'seconds':>9}{'rows/s':>8}{'speed-up':>10}  same answers as the first")
    for cfg in args.configs:
        dtype, batch = cfg.split(":")
        m = model.to(getattr(torch, dtype))
        t0 = time.perf_counter()
        out = lora.generate(m, tokenizer, prompts, seq2seq=seq2seq, max_new_tokens=args.max_new_tokens,
                            batch_size=int(batch))
        s = time.perf_counter() - t0
        first_s, first_out = (s, out) if first_s is None else (first_s, first_out)
        same = sum(a == b for a, b in zip(out, first_out))
        print(f"{dtype:<10}{batch:>6}{s:>9.1f}{len(out) / s:>8.2f}{first_s / s:>9.2f}x  {same}/{len(out)}")


if __name__ == "__main__":
    main()
