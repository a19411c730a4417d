"""Compare TransformersBackend.generate throughput with a bare model.generate loop on the same batches."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

USAGE = """Usage:
    python bench/bench_local_backend.py [--model DIR] [--batch-size 8] [--max-new-tokens 32]
        [--n 32] [--threads 2] [--repeats 3]

Both sides run greedy decoding over the same prompts, pre-sorted by token length so that the
backend's own length-sorted batching and the bare loop see identical batches. Tokens are
completion tokens up to and including the first EOS (else max_new_tokens), counted the same way
on both sides. Runs alternate between the two sides; the best (fastest) repeat of each is kept.
Wall time and process CPU time are both reported: on a shared machine the CPU-time figure is the
steadier one (it does not count time spent waiting for a core).
"""

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEEDS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def quicksort(xs):",
    "The three primary colours are",
    "In 1905, Albert Einstein published",
    "A recipe for pancakes: first,",
    "Photosynthesis is the process by which plants",
    "The quick brown fox",
]


def build_prompts(n: int) -> list[str]:
    """Return ``n`` prompts of mixed length.

    Args:
        n: how many prompts.

    Returns:
        The prompts.
    """
    return [f"{SEEDS[i % len(SEEDS)]}" + (" Indeed," * (i // len(SEEDS))) for i in range(n)]


def count_tokens(gen: list[int], eos: set[int], max_new: int) -> int:
    """Count generated tokens up to and including the first EOS.

    Args:
        gen: generated token ids of one row.
        eos: EOS token ids.
        max_new: max_new_tokens.

    Returns:
        The token count.
    """
    for j, t in enumerate(gen):
        if t in eos:
            return j + 1
    return min(len(gen), max_new)


def bare_loop(model, tok, prompts: list[str], batch_size: int, max_new: int, eos: set[int]) -> int:
    """Run plain model.generate over the batches and return the completion-token total.

    Args:
        model: the causal LM.
        tok: its tokenizer (left padding).
        prompts: prompts, already in batch order.
        batch_size: batch size.
        max_new: max_new_tokens.
        eos: EOS token ids.

    Returns:
        Total completion tokens.
    """
    import torch

    total = 0
    for s in range(0, len(prompts), batch_size):
        enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos)
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            total += count_tokens(row, eos, max_new)
    return total


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print tokens/s for both sides and their ratio.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        Process exit code.
    """
    ap = argparse.ArgumentParser(description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("REFINERY_BENCH_MODEL"),
                    help="model folder (default: the embedded SmolLM2 under the provision stage's --out in dvc.yaml)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.model is None:
        from refinery.core import dag

        args.model = str(Path(dag.option("provision", "--out", needed_for="--model")) / "weights"
                         / "embedded--smollm2-135m-instruct")
    if not (Path(args.model) / "config.json").is_file():
        print(f"no model folder at {args.model} (run `dvc repro provision` first, or pass --model)", file=sys.stderr)
        return 2

    from refinery.models.backends import GenRequest
    from refinery.models.backends.local import TransformersBackend

    be = TransformersBackend(args.model, batch_size=args.batch_size, threads=args.threads)
    tok, model = be.tokenizer, be.model
    prompts = build_prompts(args.n)
    prompts.sort(key=lambda p: len(tok(p)["input_ids"]))  # the order the backend batches in
    reqs = [GenRequest(prompt=p, max_new_tokens=args.max_new_tokens) for p in prompts]
    eos = set(be.eos_ids)

    be.generate(reqs[: args.batch_size])  # warm-up both paths
    bare_loop(model, tok, prompts[: args.batch_size], args.batch_size, args.max_new_tokens, eos)

    t_backend, t_bare, c_backend, c_bare = [], [], [], []
    n_backend = n_bare = 0
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = be.generate(reqs)
        t_backend.append(time.perf_counter() - t0)
        c_backend.append(time.process_time() - c0)
        n_backend = sum(r.completion_tokens for r in res)
        t0, c0 = time.perf_counter(), time.process_time()
        n_bare = bare_loop(model, tok, prompts, args.batch_size, args.max_new_tokens, eos)
        t_bare.append(time.perf_counter() - t0)
        c_bare.append(time.process_time() - c0)

    tps_backend = n_backend / min(t_backend)
    tps_bare = n_bare / min(t_bare)
    cps_backend = n_backend / min(c_backend)
    cps_bare = n_bare / min(c_bare)
    print(
        f"model={args.model} revision={be.revision} n={args.n} batch_size={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} threads={args.threads} repeats={args.repeats}"
    )
    print(f"backend.generate : {n_backend} tokens, best {min(t_backend):.2f}s "
          f"(median {statistics.median(t_backend):.2f}s) -> {tps_backend:.1f} tok/s")  # fmt: skip
    print(f"bare model.generate: {n_bare} tokens, best {min(t_bare):.2f}s "
          f"(median {statistics.median(t_bare):.2f}s) -> {tps_bare:.1f} tok/s")  # fmt: skip
    print(f"ratio backend/bare (wall): {tps_backend / tps_bare:.3f}")
    print(f"per CPU-second: backend {cps_backend:.1f} tok/cpu-s, bare {cps_bare:.1f} tok/cpu-s, "
          f"ratio {cps_backend / cps_bare:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
