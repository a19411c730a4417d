"""Print speed, memory, precision and recall figures of the non-model gates on a planted corpus.

Usage:
    python bench/bench_gates.py [--rows 100000] [--seed 0] [--threads 2] [--max-jaccard 0.6]
        [--million] [--embed-rows 4000] [--skip-embed]

The corpus is deterministic (``random.Random(seed)``): support-style questions and answers built from
templates and a vocabulary, with planted exact duplicates (the same pair re-cased, re-spaced and
re-punctuated), planted near duplicates (1-5 word substitutions, insertions or deletions of a base row),
a seed set drawn the same way, and a few rows that break a rule. Figures:

1. rules + exact dedup + 8-gram seed overlap together, rows/s (target >= 20,000 on 2 cores);
2. MinHash near-duplicate detection (signatures -> LSH pairs -> verification -> clusters), rows/s, with
   precision and recall on the planted near duplicates (targets >= 6,500 rows/s, P >= 0.97, R >= 0.95);
3. with ``--million``: the same on 1,000,000 rows, wall time and peak memory (must fit in 8 GB);
4. embedding overlap gate throughput against a bare ``SentenceTransformer.encode`` on the same texts
   (target >= 85%), when the embedded MiniLM is provisioned.

Never a timed test: it prints figures only.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

NOUNS = ("file folder workspace invoice receipt share link password device laptop phone tablet account profile "
         "team member guest owner admin plan seat license backup snapshot version comment note tag label "
         "calendar reminder notification email address domain certificate token cursor webhook integration "
         "report dashboard chart export import template theme font sidebar toolbar shortcut permission role "
         "group policy setting preference language region timezone quota limit storage trash archive draft "
         "attachment image video recording transcript subtitle caption message thread channel room meeting "
         "invite request approval payment card refund discount coupon trial subscription renewal upgrade "
         "downgrade migration sync conflict error warning log audit session key secret region mirror").split()
VERBS = ("share export import delete restore rename move copy archive pin unpin sync download upload print "
         "invite remove approve reject cancel renew upgrade downgrade transfer merge split lock unlock hide show "
         "reset change update edit format convert schedule mute unmute follow unfollow tag untag filter sort "
         "search recover verify enable disable connect disconnect").split()
ADJS = ("shared private archived deleted pinned locked hidden old new large small recent default custom "
        "public internal external monthly annual paid free expired pending active inactive duplicate empty "
        "encrypted read-only offline synced broken missing").split()
MENUS = ("Settings", "Preferences", "Admin console", "the File menu", "the sidebar", "Billing", "Security",
         "the web app", "the desktop app", "the mobile app", "Members", "Devices", "Recovery", "Integrations",
         "Notifications", "Storage", "the toolbar", "the context menu", "Account", "Help")
PLANS = ("Free", "Starter", "Pro", "Business", "Enterprise", "Team", "Education", "Nonprofit")
UNITS = ("minutes", "hours", "days", "weeks", "months", "seconds")
PEOPLE = ("my manager", "a guest", "the owner", "an admin", "my team", "a contractor", "support", "a client",
          "the finance team", "a new hire")

QUESTIONS = (
    "how do I {v} a {a} {n} in {m}?",
    "why can't I {v} the {n} that {p} sent me?",
    "can I {v} {a} {n}s on the {plan} plan?",
    "what happens to my {n} if I {v} the {n2}?",
    "is there a way to {v} every {n} in a {n2} at once?",
    "where do I find the {n} {n2} in {m}?",
    "how long does it take to {v} a {n} after {p} changes the {n2}?",
    "does {v}ing a {n} also {v2} its {n2}?",
    "my {n} keeps showing as {a}, how do I fix that?",
    "who can {v} the {a} {n} in our workspace?",
    "how many {n}s can I {v} per {n2} on {plan}?",
    "{p} says the {n} is {a}. What should we do?",
    "what is the difference between a {a} {n} and a {a2} {n2}?",
    "will {p} see it if I {v} their {n}?",
    "is it possible to {v} a {n} without losing the {n2}?",
    "how do we stop {p} from {v}ing {a} {n}s?",
    "can a {a} {n} be {v}ed from {m} on the {plan} plan?",
    "which {n}s count towards the {n2} {n3}?",
    "what does the {a} icon next to a {n} mean?",
    "how can {p} {v} a {n} they no longer need?",
)
Q_PREFIX = ("", "", "", "Quick question: ", "We're on the {plan} plan. ", "{P} asked me this: ", "Since yesterday, ",
            "Hi, ", "After the last update, ", "On my {n3}, ", "For our {k}-person team, ", "Sorry if this is basic, ")
Q_SUFFIX = ("", "", "", " It worked last week.", " We have about {k} of them.", " Nothing in {m} helps.",
            " {P} is waiting on it.", " I tried {v3}ing it already.", " This is on the {a3} {n3}.")
ANSWERS = (
    "Open {m} and choose {V} {n}.",
    "The change applies to every {n2} within {k} {u}.",
    "Only the owner or an admin can {v} a {a} {n}, so ask {p} to do it from {m}.",
    "On the {plan} plan you can {v} up to {k} {n}s per {n2}.",
    "A {a} {n} can't be {v}ed until the {n2} is {a2}.",
    "It usually takes {k} {u}, and {m} shows the progress of each {n}.",
    "Select the {n}, then press {V} in {m}.",
    "{P} gets an email once the {n} is {a}.",
    "Your {n} stays {a} for {k} {u}, after which it moves to the {n2} automatically.",
    "That happens when the {n2} is {a}; {v2} it from {m} and try again.",
    "Every {n} keeps its {n2} when you {v} it, so nothing is lost.",
    "Use {m} > {M2} > {V} {n} and pick the {a} {n2} from the list.",
    "If the {n} was {a} more than {k} {u} ago, support can't {v} it anymore.",
    "Guests never see a {a} {n} unless someone {v}s it with them.",
    "You'll find the {n} {n2} under {m}, next to {n3}.",
    "Turning on {a} {n}s also {v2}s the matching {n2} for {p}.",
    "There is no limit on {n}s, but each {n2} holds at most {k} {n3}s.",
    "The {a} icon means the {n} is waiting for {p} to {v} it.",
    "{V}ing a {n} doesn't touch its {n2} or {n3}.",
    "Most teams {v} their {n}s weekly; the {plan} plan can schedule it.",
    "To undo it, open {m} within {k} {u} and press {V} again.",
    "Ask {p} to check {m} first, since a {a} {n2} blocks this.",
    "Billing is per {n}, so {v}ing {k} of them changes the next invoice.",
    "Nothing changes for {p} until the {n} is {a2} again.",
)
REFUSALS = ("I'm sorry, but I can't help with that request.",
            "As an AI language model, I cannot provide an answer to this.")
META = ("Sure! Here's a question about the {n}:", "According to the passage, how do I {v} a {n}?")


@dataclass(frozen=True)
class Corpus:
    """A planted benchmark corpus: rows (synthetic contract columns that gates read), seed, ground truth.

    group: rows with the same group are planted copies of one base row (exact or near); kind per row is
    'base', 'exact' or 'near'.
    """

    rows: pa.Table
    seed: pa.Table
    group: np.ndarray
    kind: np.ndarray


def _fill(template: str, r: random.Random) -> str:
    v, p = r.choice(VERBS), r.choice(PEOPLE)
    text = template.format(v=v, v2=r.choice(VERBS), v3=r.choice(VERBS), V=v.capitalize(), n=r.choice(NOUNS),
                           n2=r.choice(NOUNS), n3=r.choice(NOUNS), a=r.choice(ADJS), a2=r.choice(ADJS),
                           a3=r.choice(ADJS), m=r.choice(MENUS), M2=r.choice(MENUS).replace("the ", "").title(),
                           p=p, P=p[0].upper() + p[1:], plan=r.choice(PLANS), k=r.randint(2, 90),
                           u=r.choice(UNITS))
    return text[0].upper() + text[1:] if text else text


def make_pair(r: random.Random) -> tuple[str, str]:
    """Return one question (with an optional lead-in and follow-up) and a one- to four-sentence answer."""
    core = _fill(r.choice(QUESTIONS), r)
    prefix = _fill(r.choice(Q_PREFIX), r)
    q = prefix + (core[0].lower() + core[1:] if prefix and not prefix.endswith(". ") else core)
    q += _fill(r.choice(Q_SUFFIX), r)
    n_sent = r.choices((1, 2, 3, 4), weights=(2, 4, 3, 1))[0]
    a = " ".join(_fill(t, r) for t in r.sample(ANSWERS, n_sent))
    return q, a


def edit_words(text: str, k: int, r: random.Random) -> str:
    """Apply ``k`` random word edits (substitute, insert or delete) to ``text``."""
    words = text.split()
    for _ in range(k):
        op = r.choice(("sub", "sub", "ins", "del")) if len(words) > 3 else "ins"
        i = r.randrange(len(words))
        if op == "sub":
            words[i] = r.choice(NOUNS + VERBS + ADJS)
        elif op == "ins":
            words.insert(i, r.choice(NOUNS + VERBS + ADJS))
        else:
            del words[i]
    return " ".join(words)


def exact_variant(text: str, r: random.Random) -> str:
    """Return ``text`` with case, spacing and punctuation changed (same match_key)."""
    t = text.upper() if r.random() < 0.3 else text.lower()
    t = t.replace(" ", "  ") if r.random() < 0.5 else t
    return t.rstrip(".?") + r.choice(("", "!", " ...", "??"))


def build_corpus(n: int, seed: int = 0, n_seed: int = 2000, near_share: float = 0.10,
                 exact_share: float = 0.05, bad_share: float = 0.02) -> Corpus:
    """Build ``n`` rows with planted duplicates and a seed set.

    Args:
        n: rows.
        seed: RNG seed (a local ``random.Random``).
        n_seed: seed rows.
        near_share, exact_share: shares of rows that are planted near / exact copies of a base row.
        bad_share: share of base rows replaced by a refusal or meta-talk pair.

    Returns:
        The corpus.
    """
    r = random.Random(seed)
    seed_pairs = [make_pair(r) for _ in range(n_seed)]
    n_near, n_exact = int(n * near_share), int(n * exact_share)
    n_base = n - n_near - n_exact
    qs, ans, group, kind = [], [], [], []
    for i in range(n_base):
        if r.random() < bad_share:
            q = _fill(r.choice(META), r) if r.random() < 0.5 else _fill(r.choice(QUESTIONS), r)
            a = r.choice(REFUSALS) if r.random() < 0.5 else make_pair(r)[1]
        elif r.random() < 0.002:  # a generated row that copies a seed row
            q, a = seed_pairs[r.randrange(n_seed)]
        else:
            q, a = make_pair(r)
        qs.append(q), ans.append(a), group.append(i), kind.append("base")
    for _ in range(n_near):
        b = r.randrange(n_base)
        text = edit_words(qs[b] + " \x00 " + ans[b], r.randint(1, 5), r)
        q, _, a = text.partition(" \x00 ")
        if not a:  # the separator was edited away: keep the base answer
            q, a = text.replace("\x00", ""), ans[b]
        qs.append(q), ans.append(a), group.append(b), kind.append("near")
    for _ in range(n_exact):
        b = r.randrange(n_base)
        qs.append(exact_variant(qs[b], r)), ans.append(exact_variant(ans[b], r)), group.append(b)
        kind.append("exact")
    perm = np.random.default_rng(seed).permutation(n)
    rows = pa.table({
        "row_id": pa.array([f"qa_{i:016x}" for i in range(n)]).take(pa.array(perm)),
        "question": pa.array(qs).take(pa.array(perm)),
        "answer": pa.array(ans).take(pa.array(perm)),
        "raw_output": pa.array([""] * n),
        "error": pa.nulls(n, pa.string()),
        "parse_error": pa.nulls(n, pa.string()),
        "finish_reason": pa.array(["stop"] * n),
    })
    seed_table = pa.table({"question": [q for q, _ in seed_pairs], "answer": [a for _, a in seed_pairs]})
    return Corpus(rows, seed_table, np.array(group)[perm], np.array(kind)[perm])


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def near_dup_quality(corpus: Corpus, max_jaccard: float, cache_dir: str | None = None) -> dict[str, float]:
    """Time the near-duplicate steps and score them against the planted groups.

    A rejected row is a true positive when the kept row it matched belongs to its planted group. Rows that
    must be rejected: per group, every member but one (exact copies are removed first, as the gate does).

    Returns:
        rows_per_s, precision, recall, seconds, rejected, expected.
    """
    from refinery.gates.dedup import DedupGate, exact_keys, first_occurrences
    from refinery.gates.rules import RulesGate

    rows = corpus.rows
    # the gate stage runs rules and exact dedup first: near-dup detection sees what they kept
    eligible = first_occurrences(exact_keys(rows.column("question"), rows.column("answer")),
                                 np.arange(rows.num_rows)) & np.array(RulesGate().apply(rows).keep)
    gate = DedupGate(seed=None, max_jaccard=max_jaccard, cache_dir=cache_dir)
    t0 = time.perf_counter()
    clusters, _ = gate.near_duplicates(rows, eligible=eligible)
    secs = time.perf_counter() - t0
    rejected = np.flatnonzero(clusters.rejected)
    tp = int((corpus.group[rejected] == corpus.group[clusters.matched[rejected]]).sum())
    groups, sizes = np.unique(corpus.group[eligible], return_counts=True)
    expected = int((sizes - 1).sum())
    return {"rows_per_s": rows.num_rows / secs, "precision": tp / max(len(rejected), 1),
            "recall": tp / max(expected, 1), "seconds": secs, "rejected": len(rejected), "expected": expected}


def bench_fast_gates(corpus: Corpus) -> None:
    """Print rows/s of rules + exact dedup + 8-gram overlap together."""
    from refinery.gates.dedup import exact_keys, first_occurrences
    from refinery.gates.overlap import NgramOverlapGate
    from refinery.gates.rules import RulesGate

    rules, overlap = RulesGate(), NgramOverlapGate(corpus.seed)
    rows = corpus.rows
    n = rows.num_rows
    t0 = time.perf_counter()
    v_rules = rules.apply(rows)
    t1 = time.perf_counter()
    first = np.flatnonzero(first_occurrences(exact_keys(rows.column("question"), rows.column("answer")),
                                             np.arange(n)))
    t2 = time.perf_counter()
    v_overlap = overlap.apply(rows)
    t3 = time.perf_counter()
    print(f"[fast] rules {n / (t1 - t0):,.0f} rows/s | exact dedup {n / (t2 - t1):,.0f} rows/s | "
          f"8-gram overlap {n / (t3 - t2):,.0f} rows/s")
    print(f"[fast] rules + exact dedup + 8-gram overlap together: {n / (t3 - t0):,.0f} rows/s "
          f"({t3 - t0:.2f} s for {n:,} rows; target >= 20,000)")
    kept = sum(v_rules.keep)
    print(f"[fast] rules kept {kept:,}/{n:,}; exact duplicates {n - len(first):,} (planted "
          f"{int((corpus.kind == 'exact').sum()):,}); overlap rejected {n - sum(v_overlap.keep):,}")


def bench_embedding(corpus: Corpus, n: int, batch_size: int, repeats: int = 3) -> None:
    """Print embedding gate throughput against a bare SentenceTransformer.encode on the same texts."""
    from refinery.models.embed import Embedder, VectorCache
    from refinery.core.errors import ModelResolutionError
    from refinery.gates.overlap import EmbeddingOverlapGate, embedding_texts
    from refinery.models.resolve import load_target

    root = Path(__file__).resolve().parents[1]
    try:
        target = load_target(str(root / "models" / "base"), "embedder")
    except ModelResolutionError as e:
        print(f"[embed] skipped: embedder not provisioned ({e})")
        return
    path = Path(target["path"])
    path = path if path.is_absolute() else root / path
    from sentence_transformers import SentenceTransformer

    rows = corpus.rows.slice(0, n)
    warm_rows = corpus.rows.slice(n, 64)  # warm-up texts outside the timed set (the caches never serve them)
    texts = embedding_texts(rows.column("question"), rows.column("answer")).to_pylist()
    bare_model = SentenceTransformer(str(path), device="cpu")
    bare_model.encode(embedding_texts(warm_rows.column("question"),
                                      warm_rows.column("answer")).to_pylist(), batch_size=batch_size)
    seed = corpus.seed.slice(0, 500)
    embedder = Embedder(path, cache_dir=None)
    gate = EmbeddingOverlapGate(seed, embedder, max_cosine=0.85)
    gate.apply(warm_rows)  # loads the model and embeds the seed once, as a long-lived gate would have
    best_bare, best_gate, best_batched = None, None, None
    for _ in range(repeats):  # alternate the sides; keep the best (fastest) repeat of each
        t0 = time.perf_counter()  # bare, as the embedder encodes: one text at a time (docs/measurements.md)
        bare_model.encode(texts, batch_size=1, normalize_embeddings=True, convert_to_numpy=True)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()  # bare, batched: what embedding one text at a time costs
        bare_model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        batched = time.perf_counter() - t0
        best_batched = batched if best_batched is None else min(best_batched, batched)
        embedder.cache = VectorCache(None, None, np.float32)  # cold: nothing of the timed set is cached
        t0 = time.perf_counter()
        gate.apply(rows)
        gated = time.perf_counter() - t0
        best_bare = bare if best_bare is None else min(best_bare, bare)
        best_gate = gated if best_gate is None else min(best_gate, gated)
    print(f"[embed] {n:,} rows: bare encode one text at a time {n / best_bare:,.0f} rows/s (batched by "
          f"{batch_size}: {n / best_batched:,.0f} rows/s) | embedding gate {n / best_gate:,.0f} rows/s (hashing, "
          f"cache lookup, encode one at a time, nearest-seed cosine over {seed.num_rows} seed rows) = "
          f"{best_bare / best_gate:.0%} of bare one at a time (target >= 85%)")
    with tempfile.TemporaryDirectory() as d:
        embedder = Embedder(path, cache_dir=d)
        gate = EmbeddingOverlapGate(seed, embedder, max_cosine=0.85)
        gate.apply(rows)
        gate2 = EmbeddingOverlapGate(seed, Embedder(path, cache_dir=d), max_cosine=0.8)
        t0 = time.perf_counter()
        gate2.apply(rows)
        print(f"[embed] re-run with another max_cosine from the cache: {n / (time.perf_counter() - t0):,.0f} "
              f"rows/s, {gate2.embedder.computed} texts embedded")


def main() -> None:
    """Run the benchmarks and print their figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch / rayon threads")
    ap.add_argument("--max-jaccard", type=float, default=0.55)
    ap.add_argument("--million", action="store_true", help="also run near-dup detection on 1,000,000 rows")
    ap.add_argument("--embed-rows", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    print(f"cores available: {len(os.sched_getaffinity(0))}, threads: {args.threads}")

    t0 = time.perf_counter()
    corpus = build_corpus(args.rows, args.seed)
    print(f"corpus: {args.rows:,} rows in {time.perf_counter() - t0:.1f} s; planted near "
          f"{int((corpus.kind == 'near').sum()):,}, exact {int((corpus.kind == 'exact').sum()):,}; "
          f"seed {corpus.seed.num_rows:,} rows; mean QA words "
          f"{np.mean([len((q + ' ' + a).split()) for q, a in zip(corpus.rows['question'].to_pylist()[:5000], corpus.rows['answer'].to_pylist()[:5000])]):.1f}")
    bench_fast_gates(corpus)
    q = near_dup_quality(corpus, args.max_jaccard)
    print(f"[near] max_jaccard {args.max_jaccard}: {q['rows_per_s']:,.0f} rows/s ({q['seconds']:.1f} s), "
          f"precision {q['precision']:.3f}, recall {q['recall']:.3f} ({q['rejected']:,} rejected, "
          f"{q['expected']:,} planted; targets >= 6,500 rows/s, P >= 0.97, R >= 0.95)")
    if not args.skip_embed:
        import torch

        torch.set_num_threads(args.threads)
        bench_embedding(corpus, min(args.embed_rows, args.rows), args.batch_size)
    if args.million:
        del corpus
        t0 = time.perf_counter()
        big = build_corpus(1_000_000, args.seed + 1)
        print(f"[million] corpus built in {time.perf_counter() - t0:.0f} s, peak RSS so far {peak_rss_gb():.2f} GB")
        q = near_dup_quality(big, args.max_jaccard)
        print(f"[million] near-dup on 1,000,000 rows: {q['seconds']:.0f} s wall ({q['rows_per_s']:,.0f} rows/s), "
              f"precision {q['precision']:.3f}, recall {q['recall']:.3f}, peak RSS {peak_rss_gb():.2f} GB "
              f"(limit 8 GB)")


if __name__ == "__main__":
    main()
