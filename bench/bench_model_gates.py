"""Print each model gate's throughput against its bare model's batched forward pass on the same inputs.

Usage: python bench/bench_model_gates.py [--rows 512] [--repeats 3] [--params params.yaml]
           [--synthetic FILE] [--documents FILE] [--models DIR] [--verifier DIR] [--reward DIR]
(the paths default to the gate stage's options of the same name in dvc.yaml)

Target (#4): every model gate within 85% of its bare model's batched throughput (the gate's cost beyond the
model: batching, windowing, combiner features, verdicts). The models are loaded once, as the gate stage loads
them (``refinery.gates.run.load_models``, the ``gate`` params' batch size and threads). For each gate:

- faithfulness (grounded): ``FaithfulnessGate.apply`` against tokenizer + forward of the verifier's own model on
  the same (passage window, claim) pairs the gate scores, in batches of the same size, shortest first (as the
  gate batches them, so padding is not what is measured). When the verifier has a
  combiner that reads the judge, the bare side also runs the judge's forward pass on the same likelihood inputs;
- reward: ``RewardGate.apply`` against tokenizer + forward on the same (question, answer) pairs;
- perplexity: ``PerplexityGate.apply`` against the judge's forward pass over the same (context + answer) token
  sequences.

Rows are the generated rows (with an answer and an evidence span), repeated up to ``--rows``. The best of
``--repeats`` timings is printed for each side. Figures are printed, never asserted.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refinery.core import dag  # noqa: E402
from refinery.gates.faithfulness import FaithfulnessGate  # noqa: E402
from refinery.gates.perplexity import CONTEXT, PerplexityGate  # noqa: E402
from refinery.gates.reward import RewardGate  # noqa: E402
from refinery.gates.run import GateParams, load_models  # noqa: E402
from refinery.models.claims import claim_text, split_claim  # noqa: E402
from refinery.models.grounding.features import LIKELIHOOD_CONTEXT  # noqa: E402
from refinery.models.grounding.scorer import GroundedVerifier  # noqa: E402
from refinery.core.params import load_section  # noqa: E402
from refinery.models.verifier import passage_windows  # noqa: E402


def best_of(fn, repeats: int) -> float:
    """Return the shortest wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bare_classifier(model, tokenizer, firsts: list[str], seconds: list[str], batch_size: int, max_length: int,
                    truncation: str) -> None:
    """Tokenize and run a sequence classifier over the pairs, batch by batch, shortest first (least padding)."""
    import torch

    order = sorted(range(len(firsts)), key=lambda i: len(firsts[i]) + len(seconds[i]))
    firsts, seconds = [firsts[i] for i in order], [seconds[i] for i in order]
    with torch.inference_mode():
        for s in range(0, len(firsts), batch_size):
            enc = tokenizer(firsts[s:s + batch_size], seconds[s:s + batch_size], truncation=truncation,
                            max_length=max_length, padding=True, return_tensors="pt")
            model(**enc)


def bare_causal(backend, contexts: list[str], continuations: list[str]) -> None:
    """Run a causal LM's forward pass over (context + continuation) token sequences, shortest first."""
    import torch

    pairs = [backend._encode_pair(c, k) for c, k in zip(contexts, continuations)]
    seqs = sorted(((ctx + cont)[-(backend.max_length + 1):-1] for ctx, cont in pairs), key=len)  # as scored
    with torch.inference_mode():
        for s in range(0, len(seqs), backend.batch_size):
            ids, mask = backend._pad(seqs[s:s + backend.batch_size], left=False)
            backend.model(input_ids=ids, attention_mask=mask)


def report(name: str, n: int, gate_s: float, bare_s: float, what: str) -> None:
    print(f"[{name}] {n:,} rows: gate {n / gate_s:,.1f} rows/s ({gate_s:.2f} s), bare {what} {n / bare_s:,.1f} "
          f"rows/s ({bare_s:.2f} s) = {bare_s / gate_s:.0%} of bare (target >= 85%)", flush=True)


@click.command()
@click.option("--rows", "n_rows", type=int, default=512, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--synthetic", "synthetic_file", default=dag.default("gate", "--synthetic", needed_for="--synthetic"),
              show_default="the gate stage's --synthetic in dvc.yaml", help="Generated rows to score.")
@click.option("--documents", "documents_file", default=dag.default("gate", "--documents", needed_for="--documents"),
              show_default="the gate stage's --documents in dvc.yaml", help="Source documents (evidence passages).")
@click.option("--models", "models_dir", default=dag.default("gate", "--models", needed_for="--models"),
              show_default="the gate stage's --models in dvc.yaml", help="Provisioned models folder.")
@click.option("--verifier", "verifier_dir", default=dag.default("gate", "--verifier", needed_for="--verifier"),
              show_default="the gate stage's --verifier in dvc.yaml", help="Trained verifier folder.")
@click.option("--reward", "reward_dir", default=dag.default("gate", "--reward", needed_for="--reward"),
              show_default="the gate stage's --reward in dvc.yaml", help="Trained reward model folder.")
def main(n_rows: int, repeats: int, params_file: str, synthetic_file: str, documents_file: str, models_dir: str,
         verifier_dir: str, reward_dir: str) -> None:
    """Time each model gate against its bare model on the same inputs and print the ratio."""
    for path in (params_file, synthetic_file, documents_file, models_dir, verifier_dir, reward_dir):
        if not Path(path).exists():
            raise click.ClickException(f"{path}: not found (run `make repro` first, or pass the path)")
    params = load_section(params_file, "gate", GateParams)
    rows = pq.read_table(synthetic_file)
    rows = rows.filter(pc.and_(pc.greater(pc.utf8_length(pc.fill_null(rows.column("answer"), "")), 0),
                               pc.is_valid(rows.column("evidence_start"))))
    if rows.num_rows == 0:
        raise click.ClickException(f"{synthetic_file}: no rows with an answer and an evidence span")
    reps = -(-n_rows // rows.num_rows)
    rows = pa.concat_tables([rows] * reps).slice(0, n_rows)
    documents = pq.read_table(documents_file)
    with tempfile.TemporaryDirectory() as cache:
        models = load_models(params, models_dir, verifier_dir, reward_dir, Path(cache))
    n = rows.num_rows
    print(f"{n:,} rows ({synthetic_file}), batch {params.batch_size}, {params.threads} threads, best of {repeats}",
          flush=True)

    # faithfulness, grounded: the verifier's windows and (with a judge-reading combiner) the judge's inputs
    gate = FaithfulnessGate(models.verifier, documents, mode="grounded", min_support=0.5)
    texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
    r = rows.to_pylist()
    passages = [texts[x["doc_id"]][x["evidence_start"]:x["evidence_end"]] for x in r]
    claims = [claim_text(x["question"], x["answer"]) for x in r]
    base = models.verifier.base if isinstance(models.verifier, GroundedVerifier) else models.verifier
    flat_p, flat_c = [], []
    for p, c in zip(passages, claims):
        windows = passage_windows(p, full_max_chars=base.full_max_chars, window_sentences=base.window_sentences)
        flat_p += windows
        flat_c += [c] * len(windows)
    judge_in = None
    if isinstance(models.verifier, GroundedVerifier) and models.verifier.judge is not None:
        pairs = list(dict.fromkeys(zip(passages, claims)))  # the gate's judge scores each distinct pair once
        split = [(p, *split_claim(c)) for p, c in pairs]
        judge_in = ([LIKELIHOOD_CONTEXT.format(passage=p, question=q) for p, q, _ in split],
                    [" " + a for _, _, a in split])

    def bare_verifier() -> None:
        bare_classifier(base.model, base.tokenizer, flat_p, flat_c, base.batch_size, base.max_length, "only_first")
        if judge_in is not None:
            bare_causal(models.judge, *judge_in)

    def gate_faithfulness() -> None:
        if judge_in is not None:  # forget scored pairs, so each timing pays for its judge passes
            models.verifier.judge.memo.clear()
        gate.apply(rows)

    gate_faithfulness()  # warm-up
    report("faithfulness", n, best_of(gate_faithfulness, repeats), best_of(bare_verifier, repeats),
           f"verifier forward ({len(flat_p):,} window pairs"
           f"{f', + judge on {len(judge_in[0]):,} distinct pairs' if judge_in else ''})")

    # reward
    rm = models.reward
    rgate = RewardGate(rm, min_reward=0.5)
    qs, ans = [x["question"] or "" for x in r], [x["answer"] for x in r]
    rgate.apply(rows)
    report("reward", n, best_of(lambda: rgate.apply(rows), repeats),
           best_of(lambda: bare_classifier(rm.model, rm.tokenizer, qs, ans, rm.batch_size, rm.max_length,
                                           "longest_first"), repeats), "reward forward")

    # perplexity
    pgate = PerplexityGate(models.judge, min_perplexity=1.0, max_perplexity=1e9)
    contexts, conts = [CONTEXT.format(question=q) for q in qs], [" " + a.strip() for a in ans]
    pgate.apply(rows)
    report("perplexity", n, best_of(lambda: pgate.apply(rows), repeats),
           best_of(lambda: bare_causal(models.judge, contexts, conts), repeats), "judge forward")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
