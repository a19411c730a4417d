"""Seed-overlap gates: word 8-gram share and embedding cosine, failing closed; the embedding block's cache."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from refinery.models.embed import Embedder
from refinery.core.errors import ModelResolutionError
from refinery.gates.overlap import EmbeddingOverlapGate, NgramOverlapGate
from tests.gates.conftest import rows, seed_rows

SEED = [
    ("How long do deleted files stay in the trash?",
     "30 days, whatever plan you're on. After that they're gone for good, and support can't bring them back either."),
    ("Who do I tell about an accessibility barrier I ran into?",
     "Email accessibility@brindlepost.example and you'll hear back within 3 business days."),
]
COPY = ("How long will my deleted files stay in the trash folder?",
        "30 days, whatever plan you're on. After that they're gone for good, and support can't bring them back.")
FRESH = ("Does the desktop client run on Ubuntu?",
         "Yes. Ubuntu 22.04 is supported, along with Fedora 38+, Windows 10 and macOS 12 onward.")


# --- n-gram overlap ----------------------------------------------------------------------------------------------

def test_a_row_that_copies_seed_text_is_rejected():
    v = NgramOverlapGate(seed_rows(SEED)).apply(rows([COPY, FRESH]))
    assert v.reason == ["overlap_ngram", None]
    assert v.score[0] >= 0.30 and v.score[1] == 0.0


def test_overlap_ignores_case_and_punctuation():
    shouted = (SEED[0][0].upper(), SEED[0][1].replace(",", "").replace(".", "!"))
    v = NgramOverlapGate(seed_rows(SEED)).apply(rows([shouted]))
    assert v.score == [1.0] and v.reason == ["overlap_ngram"]


def test_rows_shorter_than_n_words_score_zero():
    v = NgramOverlapGate(seed_rows(SEED)).apply(rows([("Trash?", "30 days.")]))
    assert v.keep == [True] and v.score == [0.0]


def test_the_threshold_is_inclusive():
    score = NgramOverlapGate(seed_rows(SEED)).apply(rows([COPY])).score[0]
    assert NgramOverlapGate(seed_rows(SEED), max_ngram_overlap=score).apply(rows([COPY])).keep == [False]


def test_ngram_empty_input_gives_empty_verdicts():
    v = NgramOverlapGate(seed_rows(SEED)).apply(rows([]))
    assert (v.keep, v.score, v.reason) == ([], [], [])


# --- embedding overlap with a deterministic test double ----------------------------------------------------------

class BagOfWordsEmbedder:
    """Deterministic test double: hashed bag of lower-cased words, L2-normalised; counts the texts it embeds."""

    def __init__(self, dim: int = 64, nan_for: str | None = None, fail: bool = False):
        self.dim, self.nan_for, self.fail, self.computed = dim, nan_for, fail, 0

    def embed(self, texts):
        if self.fail:
            raise RuntimeError("CUDA error: device-side assert triggered")
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.sha256(w.encode()).hexdigest(), 16) % self.dim] += 1
            if self.nan_for and self.nan_for in t:
                out[i] = np.nan
        self.computed += len(texts)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


def test_a_row_close_to_a_seed_row_is_rejected():
    v = EmbeddingOverlapGate(seed_rows(SEED), BagOfWordsEmbedder(), max_cosine=0.85).apply(rows([SEED[0], FRESH]))
    assert v.reason == ["overlap_embedding", None]
    assert v.score[0] == pytest.approx(1.0, abs=1e-5) and v.score[1] < 0.85


def test_a_nan_embedding_fails_closed():
    gate = EmbeddingOverlapGate(seed_rows(SEED), BagOfWordsEmbedder(nan_for="Ubuntu"))
    v = gate.apply(rows([FRESH, COPY]))
    assert v.reason[0] == "overlap_embedding_error" and v.keep[0] is False and v.score[0] is None
    assert v.reason[1] != "overlap_embedding_error"  # the other row is judged normally


def test_a_failing_model_rejects_every_row():
    gate = EmbeddingOverlapGate(seed_rows(SEED), BagOfWordsEmbedder(fail=True))
    v = gate.apply(rows([FRESH, COPY]))
    assert v.reason == ["overlap_embedding_error"] * 2 and v.keep == [False, False]
    assert "CUDA error" in gate.last_error


def test_embedding_empty_input_gives_empty_verdicts():
    v = EmbeddingOverlapGate(seed_rows(SEED), BagOfWordsEmbedder()).apply(rows([]))
    assert (v.keep, v.score, v.reason) == ([], [], [])


class RandomEmbedder:
    """Test double: a fixed random unit vector per text (seeded by its hash), dense like a real model's."""

    def embed(self, texts):
        out = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                        .standard_normal(384) for t in texts]).astype(np.float32) if texts else np.zeros((0, 384))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_a_rows_score_has_the_same_bits_whichever_rows_are_judged_with_it():
    # given dense vectors (a float32 matrix product's last bits follow the number of rows it multiplies)
    seed = seed_rows([(f"seed question {i}", f"seed answer {i}") for i in range(37)])
    pairs = [(f"question {i}", f"answer {i}") for i in range(300)]
    gate = EmbeddingOverlapGate(seed, RandomEmbedder())
    # when the rows are judged all at once, in blocks of 7 (as an engine's blocks would) and one at a time
    whole = gate.apply(rows(pairs)).score
    blocks = [s for lo in range(0, 300, 7) for s in gate.apply(rows(pairs[lo:lo + 7])).score]
    single = [gate.apply(rows([p])).score[0] for p in pairs]
    # then every score is equal bit for bit
    assert whole == blocks == single


# --- the real embedded MiniLM ------------------------------------------------------------------------------------

def test_minilm_rejects_a_paraphrase_of_the_seed_and_keeps_an_unrelated_row(minilm_path):
    paraphrase = ("How long do files I delete stay in the trash?",
                  "30 days on every plan. After that they're permanently gone and support can't restore them.")
    gate = EmbeddingOverlapGate(seed_rows(SEED), Embedder(minilm_path), max_cosine=0.85)
    v = gate.apply(rows([paraphrase, FRESH]))
    assert v.reason == ["overlap_embedding", None]
    assert 0.85 <= v.score[0] <= 1.0 + 1e-5 and v.score[1] < 0.5


def test_changing_the_threshold_embeds_nothing_again(minilm_path, tmp_path):
    # given a run that filled the cache
    table = rows([COPY, FRESH])
    first = Embedder(minilm_path, cache_dir=tmp_path)
    EmbeddingOverlapGate(seed_rows(SEED), first, max_cosine=0.85).apply(table)
    assert first.computed == len(SEED) + 2
    # when a new embedder and gate with another threshold run on the same rows
    second = Embedder(minilm_path, cache_dir=tmp_path)
    v = EmbeddingOverlapGate(seed_rows(SEED), second, max_cosine=0.5).apply(table)
    # then nothing is embedded (the model is not even loaded) and the verdicts use the new threshold
    assert second.computed == 0 and not second.loaded
    assert v.reason[0] == "overlap_embedding"


def test_cached_vectors_equal_fresh_ones(minilm_path, tmp_path):
    texts = ["Refunds are issued within 14 days.", "Sync runs every 5 minutes.", "Refunds are issued within 14 days."]
    fresh = Embedder(minilm_path).embed(texts)
    Embedder(minilm_path, cache_dir=tmp_path).embed(texts[:2])
    again = Embedder(minilm_path, cache_dir=tmp_path)
    vecs = again.embed(texts)
    assert again.computed == 0 and np.array_equal(vecs, fresh)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_a_vector_depends_on_its_text_alone_not_on_the_texts_embedded_with_it(minilm_path):
    # a cold run embeds a text with other texts than a run that finds some of them cached, or than a resumed
    # stage: the vector must be the same bits, or a resumed stage writes other scores than an unbroken one
    text = "Refunds are issued within 14 days."
    longer = "Sync runs every 5 minutes on every plan, and a failed sync is retried with a backoff. " * 3
    alone = Embedder(minilm_path).embed([text])[0]
    together = Embedder(minilm_path).embed([longer, text, "Sync runs."])[1]
    assert np.array_equal(alone, together)


def test_an_embedder_with_threads_embeds_with_that_many_torch_threads_whatever_the_process_had(minilm_path):
    import torch

    # given a process with one torch thread (as a Ray worker starts: OMP_NUM_THREADS=1), where a long text's
    # vector differs in its last bits from a two-thread process's
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # when an embedder built with threads=2 embeds
        Embedder(minilm_path, threads=2).embed(["Sync runs every 5 minutes."])
        # then it ran with 2 threads
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Embedder(minilm_path, threads=0)


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="not found"):
        Embedder(tmp_path / "absent")
