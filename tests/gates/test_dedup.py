"""Dedup gate: planted exact and near duplicates within the set and against the seed, signature cache."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from refinery.gates.dedup import DedupGate, SignatureStore, candidate_pairs, lsh_params, near_dup_texts
from tests.gates.conftest import rows, seed_rows

BASE = [
    ("How quickly does a file I save on my desktop show up on my laptop?",
     "Normally within a few seconds, provided both machines are connected to the internet."),
    ("Does the desktop client run on Ubuntu?",
     "Yes. Ubuntu 22.04 is supported, along with Fedora 38+, Windows 10 (22H2 or newer) and macOS 12 onward."),
    ("How many computers can I link on the free plan?",
     "Two devices per user on Free. Any paid plan removes the device cap entirely."),
    ("our IT dept wants to push the app to 300 laptops, is there an MSI?",
     "Yes. For central rollout, grab the Windows MSI (or the macOS PKG) from Admin console > Devices > Deployment."),
]
SEED = [
    ("Can a workspace have two Owners? Our CEO and I both want full control.",
     "No, there's only ever one Owner per workspace. You can hand ownership to another person from Admin "
     "console > Settings > Ownership."),
    ("whats the diffrence between a Member and a Guest?",
     "Members belong to your team and can create, edit and share files in any folder they can access. Guests "
     "are outsiders who only see the specific folders someone has shared with them."),
]


def test_unrelated_rows_are_all_kept():
    v = DedupGate(seed_rows(SEED)).apply(rows(BASE))
    assert v.keep == [True] * len(BASE)
    assert all(s is not None and s < 0.55 for s in v.score)


def test_exact_duplicate_within_the_set_keeps_the_first_by_row_id():
    # given the same pair re-cased and re-punctuated, with the copy earlier in the table but a later row_id
    copy = (BASE[0][0].upper() + "!!", "  " + BASE[0][1].lower())
    table = rows([copy, *BASE], row_id=[f"qa_{i:016x}" for i in (9, 0, 1, 2, 3)])
    v = DedupGate().apply(table)
    assert v.reason == ["dedup_exact", None, None, None, None]
    assert v.score[0] == 1.0


def test_exact_duplicate_of_a_seed_row():
    v = DedupGate(seed_rows(SEED)).apply(rows([SEED[1], *BASE]))
    assert v.reason[0] == "dedup_exact_seed" and v.keep[1:] == [True] * len(BASE)


def test_near_duplicate_within_the_set_keeps_one_per_cluster():
    # given two near copies (2 and 3 words edited) of the first row
    near1 = (BASE[0][0].replace("quickly", "fast"), BASE[0][1].replace("Normally", "Usually"))
    near2 = (BASE[0][0].replace("my laptop", "the laptop"), BASE[0][1].replace("few", "couple of"))
    v = DedupGate().apply(rows([*BASE, near1, near2]))
    assert v.reason == [None] * len(BASE) + ["dedup_near", "dedup_near"]
    assert all(s >= 0.55 for s in v.score[-2:])


def test_near_duplicate_cluster_choice_does_not_depend_on_row_order():
    near = (BASE[0][0].replace("quickly", "fast"), BASE[0][1])
    table = rows([*BASE, near])
    shuffled = table.take(pa.array([4, 2, 0, 3, 1]))
    a, b = DedupGate().apply(table), DedupGate().apply(shuffled)
    by_id_a = dict(zip(table.column("row_id").to_pylist(), a.reason))
    by_id_b = dict(zip(shuffled.column("row_id").to_pylist(), b.reason))
    assert by_id_a == by_id_b and list(by_id_a.values()).count("dedup_near") == 1


def test_near_duplicate_of_a_seed_row():
    near_seed = (SEED[1][0].replace("diffrence", "difference"), SEED[1][1].replace("outsiders", "people outside"))
    v = DedupGate(seed_rows(SEED)).apply(rows([near_seed, *BASE]))
    assert v.reason[0] == "dedup_near_seed" and v.score[0] >= 0.55


def test_rows_without_text_are_not_near_duplicates_of_each_other():
    v = DedupGate().apply(rows([(None, None), ("", "")], parse_error=["parse_no_json", "parse_no_json"]))
    # identical empty keys are exact duplicates (the rules gate rejects them first); never near ones
    assert v.reason == [None, "dedup_exact"]


def test_changing_the_threshold_reuses_cached_signatures(tmp_path):
    # given a first run that filled the cache
    table = rows(BASE + [(BASE[0][0].replace("quickly", "fast"), BASE[0][1])])
    first = DedupGate(seed_rows(SEED), max_jaccard=0.6, cache_dir=tmp_path)
    first.apply(table)
    assert first.store.computed == len(BASE) + 1 + len(SEED)
    # when a new gate with another threshold runs on the same rows
    second = DedupGate(seed_rows(SEED), max_jaccard=0.8, cache_dir=tmp_path)
    v = second.apply(table)
    # then no signature is computed again, and the verdicts are still right
    assert second.store.computed == 0
    assert v.reason.count("dedup_near") == 1


def test_cached_signatures_equal_fresh_ones(tmp_path):
    texts = near_dup_texts(pa.array([q for q, _ in BASE]), pa.array([a for _, a in BASE]))
    fresh = SignatureStore(None).compute(texts)
    SignatureStore(tmp_path).signatures(texts)
    again = SignatureStore(tmp_path)
    assert np.array_equal(again.signatures(texts), fresh) and again.computed == 0


def test_non_ascii_text_is_shingled_by_character():
    store = SignatureStore(None)
    a = store.compute(pa.array(["café crème brûlée for everyone at the meeting"]))
    b = store.compute(pa.array(["café crème brûlée for everyone at the meeting"]))
    c = store.compute(pa.array(["cafe creme brulee for everyone at the meeting"]))
    assert np.array_equal(a, b) and 0.3 < (a == c).mean() < 1.0


def test_lsh_bands_fit_the_signature_and_catch_identical_rows():
    bands, per_band = lsh_params(0.55, 128)
    assert bands * per_band <= 128
    sigs = np.tile(np.arange(128, dtype=np.uint32), (3, 1))
    assert candidate_pairs(sigs, bands, per_band).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_empty_input_gives_empty_verdicts():
    v = DedupGate(seed_rows(SEED)).apply(rows([]))
    assert (v.keep, v.score, v.reason) == ([], [], [])


def test_invalid_threshold_is_refused():
    with pytest.raises(ValueError):
        DedupGate(max_jaccard=0.0)
