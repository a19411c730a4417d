"""Reject exact and near-duplicate rows, within the generated set and against the seed (MinHash LSH, rensa).

The near-duplicate path is split into steps, as datatrove's four-stage MinHash is, so that a threshold
change recomputes nothing expensive:

1. :meth:`SignatureStore.signatures` — MinHash signatures of character 5-gram shingles, cached on disk
   keyed by content hash (the threshold is not part of the key);
2. :func:`candidate_pairs` — LSH banding, bands and rows chosen for the threshold;
3. :func:`verify_pairs` — the estimated Jaccard similarity of each candidate pair, from the signatures;
4. :func:`keep_one_per_cluster` — in a deterministic order, keep a row unless it is similar to a row already
   kept; each rejected row joins the cluster of the kept row it matches best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from refinery.core.params import StageParams
from refinery.core.textkernels import as_strings, match_keys, mix64, utf8_buffers
from refinery.gates.base import BaseGate, Gate, GateContext, Verdicts
from refinery.models.embed import VectorCache, content_keys

_U64 = np.uint64
_SHINGLE_MUL = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                         0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63],
                        dtype=_U64)
_SIG_ROWS_PER_CALL = 1024  # rows per rensa call: bounds its transient arrays and the Python lists it returns

REASONS = ("dedup_exact_seed", "dedup_exact", "dedup_near_seed", "dedup_near")


class DedupParams(StageParams):
    """Exact and near-duplicate detection (MinHash LSH): ``gate.dedup``, and the same knobs where assemble and
    validate deduplicate."""

    max_jaccard: float = Field(gt=0, le=1)  # estimated Jaccard similarity at which a row is a near duplicate
    num_perm: int = Field(gt=0)  # MinHash permutations
    shingle: int = Field(gt=0, le=len(_SHINGLE_MUL))  # shingle length in characters


def exact_keys(question: pa.Array | pa.ChunkedArray, answer: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """Return the exact-duplicate key of each row: match_key(question), unit separator, match_key(answer).

    Rows with equal keys are exact duplicates; Arrow hashes the keys when grouping them.

    Args:
        question: question strings (null counts as '').
        answer: answer strings.

    Returns:
        One key per row.
    """
    return pc.binary_join_element_wise(match_keys(question), match_keys(answer), "\x1f")


def first_occurrences(keys: pa.StringArray, rank: np.ndarray) -> np.ndarray:
    """Return True for the first row (lowest rank) of each distinct key, False for its later copies."""
    ids = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
    order = np.argsort(rank, kind="stable")
    _, first = np.unique(ids[order], return_index=True)
    out = np.zeros(len(ids), bool)
    out[order[first]] = True
    return out


def near_dup_texts(question: pa.Array | pa.ChunkedArray, answer: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    """Return the text that near-duplicate detection shingles: normalised question + ' ' + normalised answer."""
    joined = pc.binary_join_element_wise(match_keys(question), match_keys(answer), " ")
    return pc.utf8_trim_whitespace(joined)


def _code_points(arr: pa.StringArray, lo: int, hi: int, data: np.ndarray,
                 offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint64 code points, row offsets) of rows [lo, hi); ASCII rows straight from the UTF-8 bytes."""
    chunk = arr.slice(lo, hi - lo)
    if pc.all(pc.string_is_ascii(chunk)).as_py() is not False:
        return data[offsets[lo]:offsets[hi]].astype(_U64), offsets[lo:hi + 1] - offsets[lo]
    parts, lengths = [], []
    for i, s in enumerate(chunk.to_pylist()):
        cps = np.frombuffer(s.encode("utf-32-le"), np.uint32).astype(_U64)
        parts.append(cps)
        lengths.append(len(cps))
    return (np.concatenate(parts) if parts else np.zeros(0, _U64),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def shingle_hashes(codes: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every character k-gram of each row (a row shorter than k is one shingle; an empty row has none).

    Args:
        codes: uint64 code points of all rows, concatenated.
        offsets: int64 row offsets into ``codes`` (rows + 1).
        k: shingle length in characters (at most 8).

    Returns:
        (uint64 shingle hashes, uint64 row offsets into them), as rensa's flat-buffer API takes them.
    """
    n_rows = len(offsets) - 1
    lengths = np.diff(offsets)
    # pad each row with k - 1 zeros so windows never cross rows and short rows still give one window
    pad = k - 1
    new_off = offsets + pad * np.arange(n_rows + 1)
    padded = np.zeros(len(codes) + pad * n_rows, _U64)
    dest = np.arange(len(codes)) + pad * np.repeat(np.arange(n_rows), lengths)
    padded[dest] = codes
    total = len(padded)
    h = np.zeros(max(total - pad, 0), _U64)
    with np.errstate(over="ignore"):
        for m in range(k):
            h += (padded[m:m + len(h)] + _U64(1)) * _SHINGLE_MUL[m]
    n_windows = np.where(lengths > 0, np.maximum(lengths - pad, 1), 0)
    starts = np.repeat(new_off[:-1], n_windows) + (np.arange(n_windows.sum()) -
                                                   np.repeat(np.cumsum(n_windows) - n_windows, n_windows))
    return mix64(h[starts]), np.concatenate([[0], np.cumsum(n_windows)]).astype(_U64)


class SignatureStore:
    """MinHash signatures of texts, computed with rensa and cached on disk by content hash.

    The cache (:class:`refinery.models.embed.VectorCache`: Arrow IPC shards, no pickle) lives in a sub-folder named by
    the shingling config and rensa's algorithm version, and its keys hash that config with the text, so a
    change of either never reads stale signatures. The similarity threshold is not part of the key.

    Args:
        cache_dir: the cache folder, or None to keep signatures in memory only (for this object's life).
        num_perm: permutations per signature.
        shingle: shingle length in characters.
        seed: the MinHash seed.

    Attributes:
        computed: how many signatures this store has computed (not loaded); tests count on it.
    """

    def __init__(self, cache_dir: str | Path | None, num_perm: int = 128, shingle: int = 5, seed: int = 42):
        import rensa

        if not 1 <= shingle <= len(_SHINGLE_MUL):
            raise ValueError(f"dedup: shingle must be 1..{len(_SHINGLE_MUL)} characters, got {shingle}")
        self.num_perm, self.shingle, self.seed = num_perm, shingle, seed
        self._rensa = rensa
        self._tag = f"minhash-c{shingle}-p{num_perm}-s{seed}-v{rensa.RMinHash.ALGORITHM_VERSION}"
        self.cache = VectorCache(Path(cache_dir) / self._tag if cache_dir is not None else None, num_perm,
                                 np.uint32)
        self.computed = 0

    def compute(self, texts: pa.StringArray) -> np.ndarray:
        """Compute signatures without the cache.

        Args:
            texts: the texts (normalised by the caller).

        Returns:
            uint32 array (rows, num_perm).
        """
        arr = as_strings(texts)
        data, offsets = utf8_buffers(arr)
        out = np.zeros((len(arr), self.num_perm), np.uint32)
        for lo in range(0, len(arr), _SIG_ROWS_PER_CALL):
            hi = min(lo + _SIG_ROWS_PER_CALL, len(arr))
            codes, off = _code_points(arr, lo, hi, data, offsets)
            hashes, row_off = shingle_hashes(codes, off, self.shingle)
            matrix = self._rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, row_off, self.num_perm,
                                                                               self.seed)
            out[lo:hi] = np.array(matrix.to_rows(), np.uint32).reshape(hi - lo, self.num_perm)
        self.computed += len(arr)
        return out

    def signatures(self, texts: pa.StringArray) -> np.ndarray:
        """Return the signature of every text, computing and caching only those not seen before.

        Args:
            texts: the texts (normalised by the caller).

        Returns:
            uint32 array (rows, num_perm), in input order.
        """
        arr = as_strings(texts)
        if len(arr) == 0:
            return np.zeros((0, self.num_perm), np.uint32)
        keys = content_keys(self._tag, arr.to_pylist())
        found, sigs = self.cache.get(keys)
        missing = np.flatnonzero(~found)
        if len(missing):
            new_keys, first = np.unique(keys[missing], return_index=True)
            todo = missing[first]
            new_sigs = self.compute(arr.take(pa.array(todo)))
            self.cache.put(new_keys, new_sigs)
            pos = np.searchsorted(new_keys, keys[missing])
            sigs[missing] = new_sigs[pos]
        return sigs


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.3) -> tuple[int, int]:
    """Choose LSH bands and rows per band that minimise weighted false positives and negatives at ``threshold``.

    The same optimisation as datasketch's ``MinHashLSH._optimal_param`` (Leskovec, Rajaraman & Ullman,
    "Mining of Massive Datasets", ch. 3.4): a pair with Jaccard s shares a band with probability
    1 - (1 - s^r)^b.

    Args:
        threshold: the Jaccard similarity the banding should separate at.
        num_perm: signature length.
        fp_weight: weight of false positives (false negatives get 1 - fp_weight). Below datasketch's 0.5,
            because every candidate is verified: a false positive costs a comparison, a false negative a
            missed duplicate.

    Returns:
        (bands, rows per band).
    """
    grid_lo = np.linspace(0.0, threshold, 200)
    grid_hi = np.linspace(threshold, 1.0, 200)
    best, best_cost = (1, num_perm), None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - grid_lo ** r) ** b, grid_lo)
            fn = np.trapezoid((1 - grid_hi ** r) ** b, grid_hi)
            cost = fp_weight * fp + (1 - fp_weight) * fn
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = (b, r), cost
    return best


def candidate_pairs(sigs: np.ndarray, bands: int, rows: int, max_neighbours: int = 8) -> np.ndarray:
    """Return unique (i, j), i < j, of rows that share at least one LSH band.

    In a bucket, each row is paired with the bucket's first row and with up to ``max_neighbours`` rows just
    before it, so a bucket of k identical signatures gives O(k) pairs, not O(k^2).

    Args:
        sigs: uint32 signatures (rows, num_perm).
        bands: number of bands.
        rows: signature rows per band.
        max_neighbours: preceding bucket members each row is paired with, besides the first.

    Returns:
        int64 array (pairs, 2), sorted.
    """
    n = len(sigs)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    found = []  # per band: pair codes i * n + j (i < j), deduplicated within the band
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = band_hashes(sigs, b, rows)
            order = np.argsort(h, kind="stable")
            hs = h[order]
            new_group = np.ones(n, bool)
            new_group[1:] = hs[1:] != hs[:-1]
            group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
            members = np.flatnonzero(~new_group)
            left, right = [order[group_start[members]]], [order[members]]
            for d in range(1, max_neighbours + 1):
                sel = members[(members - d > group_start[members])]
                left.append(order[sel - d]), right.append(order[sel])
            i, j = np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)
            found.append(np.unique(np.minimum(i, j) * n + np.maximum(i, j)))
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return np.stack([codes // n, codes % n], axis=1)


def band_hashes(sigs: np.ndarray, band: int, rows: int) -> np.ndarray:
    """Return each signature's LSH bucket in one band: a 64-bit hash of its ``rows`` values in that band."""
    block = sigs[:, band * rows:(band + 1) * rows].astype(_U64)
    h = np.full(len(sigs), _U64(band + 1), _U64)
    with np.errstate(over="ignore"):
        for m in range(rows):
            h = mix64(h ^ block[:, m])
    return h


class SeedBands:
    """A seed's LSH buckets, sorted once per band, to pair new rows with it without sorting the seed again.

    :meth:`pairs` gives the candidate pairs :func:`candidate_pairs` gives for the seed's signatures followed by the
    new rows', less the pairs of two seed rows (near-duplicate detection against a seed never uses those): in a
    bucket the seed's rows come first (lower indices, stable order), so each new row's partners (the bucket's first
    row and the ``max_neighbours`` rows just before it) are found by searching the sorted seed. Recovery re-gates
    candidates against the same seed (or a pool that only grows) every round; the seed's sort is paid once.

    Args:
        sigs: the seed's uint32 signatures (rows, num_perm).
        bands, rows: the LSH banding.
    """

    def __init__(self, sigs: np.ndarray, bands: int, rows: int):
        self.n, self.bands, self.rows = len(sigs), bands, rows
        self._sorted = []  # per band: (bucket hashes sorted, seed index of each), ties in index order
        for b in range(bands):
            h = band_hashes(sigs, b, rows)
            order = np.argsort(h, kind="stable")
            self._sorted.append((h[order], order.astype(np.int64)))

    def extended(self, sigs: np.ndarray) -> SeedBands:
        """Return the buckets of this seed followed by ``sigs`` (merged into the sorted order, no new sort)."""
        new = SeedBands.__new__(SeedBands)
        new.n, new.bands, new.rows, new._sorted = self.n + len(sigs), self.bands, self.rows, []
        for b, (hs, idx) in enumerate(self._sorted):
            h = band_hashes(sigs, b, self.rows)
            order = np.argsort(h, kind="stable")
            at = np.searchsorted(hs, h[order], side="right")  # after the equal seed hashes: higher indices
            new._sorted.append((np.insert(hs, at, h[order]), np.insert(idx, at, order.astype(np.int64) + self.n)))
        return new

    def pairs(self, sigs: np.ndarray, max_neighbours: int = 8) -> np.ndarray:
        """Return the candidate pairs (i, j), i < j, of the seed + ``sigs`` that hold a row of ``sigs``.

        Indices count the seed's rows first (row k of ``sigs`` is ``n + k``), as :func:`candidate_pairs` on the
        concatenation; the result equals its rows with ``j >= n``.
        """
        n_s, m = self.n, len(sigs)
        n = n_s + m
        if m == 0 or n < 2:
            return np.zeros((0, 2), np.int64)
        found = []
        ranks = np.arange(m)
        for b, (hs, sidx) in enumerate(self._sorted):
            h = band_hashes(sigs, b, self.rows)
            order = np.argsort(h, kind="stable")
            hc = h[order]
            lo = np.searchsorted(hs, hc, side="left")
            seeds = np.searchsorted(hs, hc, side="right") - lo  # seed rows in the new row's bucket (they come first)
            new_group = np.ones(m, bool)
            new_group[1:] = hc[1:] != hc[:-1]
            start = np.maximum.accumulate(np.where(new_group, ranks, 0))  # first new row of the bucket
            pos = seeds + ranks - start  # the new row's place in its bucket
            shared = np.flatnonzero(pos >= 1)  # rows alone in their bucket (most) have no partner
            pos, lo, seeds, start = pos[shared], lo[shared], seeds[shared], start[shared]
            me = n_s + order[shared]
            safe = np.minimum(lo, max(n_s - 1, 0))
            first = np.where(seeds > 0, sidx[safe] if n_s else 0, n_s + order[start])
            left, right = [first], [me]
            for d in range(1, max_neighbours + 1):
                q = pos - d  # the partner's place in the bucket; the first (place 0) is paired above
                has = q >= 1
                in_seed = q < seeds
                seed_at = sidx[np.clip(lo + q, 0, max(n_s - 1, 0))] if n_s else np.zeros(len(q), np.int64)
                new_at = n_s + order[np.clip(start + q - seeds, 0, m - 1)]
                partner = np.where(in_seed, seed_at, new_at)
                left.append(partner[has]), right.append(me[has])
            i, j = np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)
            found.append(np.unique(np.minimum(i, j) * n + np.maximum(i, j)))
        codes = np.unique(np.concatenate(found))
        return np.stack([codes // n, codes % n], axis=1)


def verify_pairs(sigs: np.ndarray, pairs: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Return the estimated Jaccard similarity (share of equal signature values) of each pair."""
    out = np.zeros(len(pairs))
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo:lo + chunk]
        out[lo:lo + chunk] = (sigs[p[:, 0]] == sigs[p[:, 1]]).mean(axis=1)
    return out


@dataclass(frozen=True)
class Clusters:
    """The keep decision of near-duplicate clustering over rows in a fixed order.

    Attributes:
        kept: bool per row (False for rows that took no part).
        rejected: bool per row: took part and is a near duplicate of a kept row.
        matched: for a rejected row, the kept row it matches best (else -1).
        score: per row, the highest estimated Jaccard with a kept row among its candidates (0 if none).
    """

    kept: np.ndarray
    rejected: np.ndarray
    matched: np.ndarray
    score: np.ndarray


def keep_one_per_cluster(n: int, rank: np.ndarray, pairs: np.ndarray, similarity: np.ndarray,
                         max_jaccard: float, eligible: np.ndarray) -> Clusters:
    """Keep rows in ``rank`` order unless similar (>= max_jaccard) to a row already kept.

    Greedy, as in datatrove's and text-dedup's "keep the first of each cluster", but anchored on kept rows:
    a row is rejected only for a match with a row that is itself kept, so chains (a~b, b~c, a!~c) never reject c
    for its likeness to a rejected b.

    Args:
        n: number of rows.
        rank: int per row; lower ranks are considered first (deterministic order).
        pairs: candidate pairs (i, j).
        similarity: estimated Jaccard of each pair.
        max_jaccard: the similarity at which a row counts as a near duplicate.
        eligible: bool per row; rows that are not eligible are neither kept nor matched against.

    Returns:
        The keep decision, matches and scores.
    """
    kept = eligible.copy()
    matched = np.full(n, -1, np.int64)
    score = np.zeros(n)
    if len(pairs) == 0:
        return Clusters(kept, np.zeros(n, bool), matched, score)
    ok = eligible[pairs[:, 0]] & eligible[pairs[:, 1]]
    pairs, similarity = pairs[ok], similarity[ok]
    # orient each pair as (earlier, later) by rank
    swap = rank[pairs[:, 0]] > rank[pairs[:, 1]]
    early = np.where(swap, pairs[:, 1], pairs[:, 0])
    late = np.where(swap, pairs[:, 0], pairs[:, 1])
    dup = similarity >= max_jaccard
    # rows with a near-duplicate earlier in the order, visited in order
    order = np.lexsort((-similarity[dup], rank[late[dup]]))
    d_early, d_late, d_sim = early[dup][order], late[dup][order], similarity[dup][order]
    for e, l, s in zip(d_early.tolist(), d_late.tolist(), d_sim.tolist()):
        if kept[l] and kept[e]:
            kept[l] = False
            matched[l] = e
            score[l] = s
    # kept rows: the highest similarity with another kept row (all below the threshold)
    both_kept = kept[early] & kept[late]
    np.maximum.at(score, early[both_kept], similarity[both_kept])
    np.maximum.at(score, late[both_kept], similarity[both_kept])
    return Clusters(kept, eligible & ~kept, matched, score)


class DedupGate(BaseGate):
    """Reject exact and near duplicates, within the generated set and against the seed.

    Codes, in priority order: ``dedup_exact_seed`` (same normalised question and answer as a seed row),
    ``dedup_exact`` (same as a generated row earlier by ``row_id``), ``dedup_near_seed`` (estimated Jaccard
    >= ``max_jaccard`` with a seed row), ``dedup_near`` (the same with a kept generated row; one row per
    cluster is kept, the first by ``row_id``). Score: the highest estimated Jaccard with a kept row or a seed
    row (1.0 for exact duplicates, 0 when no candidate was found).

    Sources: MinHash (Broder 1997, "On the resemblance and containment of documents") with LSH banding
    (Leskovec et al., "Mining of Massive Datasets", ch. 3); character 5-gram shingles and the
    signatures -> buckets -> clusters -> filter steps follow datatrove's MinHash deduplication and
    Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better"; the exact key is
    :func:`refinery.core.text.match_key` of question and answer. Signatures come from rensa (RMinHash).

    Args:
        seed: seed rows (question, answer) to compare against; None or empty for none.
        max_jaccard: estimated Jaccard similarity at which a row is a near duplicate (0-1).
        num_perm: MinHash permutations.
        shingle: shingle length in characters.
        cache_dir: folder for the signature cache (None: no cache).
        minhash_seed: the MinHash seed.
        store: a signature store to share with other gates of the same settings (``cache_dir`` is then unused):
            a text signed by one of them is signed for all.
    """

    name = "dedup"
    compares_rows = True  # the within-set decision needs every row at once: engines run it whole, on the driver

    def __init__(self, seed: pa.Table | None = None, max_jaccard: float = 0.55, num_perm: int = 128,
                 shingle: int = 5, cache_dir: str | Path | None = None, minhash_seed: int = 42,
                 store: SignatureStore | None = None):
        super().__init__()
        if not 0.0 < max_jaccard <= 1.0:
            raise ValueError(f"dedup: max_jaccard must lie in (0, 1], got {max_jaccard}")
        self.max_jaccard = max_jaccard
        if store is not None and (store.num_perm, store.shingle, store.seed) != (num_perm, shingle, minhash_seed):
            raise ValueError("dedup: a shared signature store must have the gate's num_perm, shingle and seed")
        self.store = store or SignatureStore(cache_dir, num_perm=num_perm, shingle=shingle, seed=minhash_seed)
        self.bands, self.rows_per_band = lsh_params(max_jaccard, num_perm)
        if seed is None or seed.num_rows == 0:
            self._seed_keys = pa.array([], pa.string())
            self._seed_texts = pa.array([], pa.string())
        else:
            self._seed_keys = pc.unique(exact_keys(seed.column("question"), seed.column("answer")))
            texts = near_dup_texts(seed.column("question"), seed.column("answer"))
            self._seed_texts = texts.filter(pc.greater(pc.utf8_length(texts), 0))
        self._seed_sigs: np.ndarray | None = None
        self._seed_bands: SeedBands | None = None

    @classmethod
    def calibrate(cls, params: DedupParams, ctx: GateContext) -> dict[str, Any]:
        return params.model_dump()

    @classmethod
    def build(cls, bounds: dict[str, Any], ctx: GateContext) -> DedupGate:
        return cls(ctx.train, max_jaccard=bounds["max_jaccard"], num_perm=bounds["num_perm"],
                   shingle=bounds["shingle"], cache_dir=ctx.cache_dir)

    def extended(self, more: pa.Table) -> DedupGate:
        """Return the gate seeded by this gate's seed rows followed by ``more`` (question, answer), same settings.

        The same gate as ``DedupGate(concat(seed, more), ...)``, without recomputing what this one holds: the
        seed's keys, texts and (once computed) signatures are reused, only ``more``'s are computed. Recovery
        re-gates each round against the accepted rows plus the rows recovered so far: a pool that only grows.
        """
        new = DedupGate.__new__(DedupGate)
        BaseGate.__init__(new)
        new.max_jaccard, new.store, new.bands, new.rows_per_band = (self.max_jaccard, self.store, self.bands,
                                                                    self.rows_per_band)
        keys = exact_keys(more.column("question"), more.column("answer"))
        # only ever a value set (``pc.is_in``), where a repeated key costs nothing: no pc.unique over the pool
        new._seed_keys = pa.concat_arrays([as_strings(self._seed_keys), as_strings(keys)])
        texts = near_dup_texts(more.column("question"), more.column("answer"))
        texts = as_strings(texts.filter(pc.greater(pc.utf8_length(texts), 0)))
        new._seed_texts = pa.concat_arrays([as_strings(self._seed_texts), texts])
        new._seed_sigs, new._seed_bands = None, None
        if self._seed_sigs is not None:
            more_sigs = self.store.signatures(texts)
            new._seed_sigs = np.concatenate([self._seed_sigs, more_sigs])
            if self._seed_bands is not None:
                new._seed_bands = self._seed_bands.extended(more_sigs)
        return new

    def near_duplicates(self, rows: pa.Table, eligible: np.ndarray | None = None) -> tuple[Clusters, np.ndarray]:
        """Run signatures -> candidate pairs -> verification -> clusters on ``rows`` and the seed.

        Args:
            rows: rows with row_id, question and answer.
            eligible: rows that take part (default: all with non-empty text).

        Returns:
            (the within-set clusters, per row the highest estimated Jaccard with a seed row).
        """
        n = rows.num_rows
        texts = near_dup_texts(rows.column("question"), rows.column("answer"))
        has_text = pc.greater(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False)
        eligible = has_text if eligible is None else (eligible & has_text)
        rank = _rank(rows.column("row_id"))
        # only eligible rows take part, in rank order (so a bucket's first row is the one kept first)
        idx = np.flatnonzero(eligible)
        idx = idx[np.argsort(rank[idx], kind="stable")]
        sigs = self.store.signatures(texts.take(pa.array(idx, pa.int64())))
        if self._seed_sigs is None:
            self._seed_sigs = self.store.signatures(self._seed_texts)
        if self._seed_bands is None:
            self._seed_bands = SeedBands(self._seed_sigs, self.bands, self.rows_per_band)
        n_seed = len(self._seed_sigs)
        # the pairs candidate_pairs gives on seed + rows, less seed <-> seed pairs (unused below); the seed's
        # buckets are sorted once per gate, not once per call
        pairs = self._seed_bands.pairs(sigs)
        both = np.concatenate([self._seed_sigs, sigs]) if n_seed else sigs
        sim = verify_pairs(both, pairs)
        del both
        # seed <-> generated pairs (seed rows come first, so i < n_seed <= j)
        to_seed = (pairs[:, 0] < n_seed) & (pairs[:, 1] >= n_seed)
        seed_score = np.zeros(n)
        np.maximum.at(seed_score, idx[pairs[to_seed, 1] - n_seed], sim[to_seed])
        within = pairs[:, 0] >= n_seed
        near_seed = seed_score >= self.max_jaccard
        clusters = keep_one_per_cluster(n, rank, idx[pairs[within] - n_seed], sim[within], self.max_jaccard,
                                        eligible & ~near_seed)
        return clusters, seed_score

    def judge(self, rows: pa.Table) -> Verdicts:
        """Judge every row.

        Args:
            rows: rows of the synthetic contract (row_id, question, answer).

        Returns:
            One verdict per row, reasons in priority order dedup_exact_seed, dedup_exact, dedup_near_seed,
            dedup_near.
        """
        n = rows.num_rows
        keys = exact_keys(rows.column("question"), rows.column("answer"))
        rank = _rank(rows.column("row_id"))
        exact_seed = pc.is_in(keys, value_set=self._seed_keys).to_numpy(zero_copy_only=False)
        exact = ~first_occurrences(keys, rank)
        clusters, seed_score = self.near_duplicates(rows, eligible=~(exact_seed | exact))
        near_seed = (seed_score >= self.max_jaccard) & ~(exact_seed | exact)
        near = clusters.rejected
        score = np.maximum(clusters.score, seed_score)
        score[exact_seed | exact] = 1.0
        reason: list[str | None] = [None] * n
        for code, mask in zip(REASONS, (exact_seed, exact & ~exact_seed, near_seed, near)):
            for i in np.flatnonzero(mask).tolist():
                if reason[i] is None:
                    reason[i] = code
        keep = [r is None for r in reason]
        return Verdicts(keep, score.tolist(), reason)


class PooledDedup:
    """The dedup gate, then (for rows it keeps) a check against a pool of rows already accepted or recovered.

    Recovery re-gates its candidates with it. Codes: the base gate's, plus ``dedup_exact_accepted`` /
    ``dedup_near_accepted`` (same as, or estimated Jaccard >= max_jaccard with, a row of the pool).

    Args:
        base: the dedup gate (against the seed and within the candidates).
        pool: a dedup gate whose seed is the pool, or None for an empty pool.
    """

    name = "dedup"

    def __init__(self, base: Gate, pool: Gate | None):
        self.base, self.pool = base, pool

    @classmethod
    def over(cls, base: Gate, pool: pa.Table, params: dict[str, Any], cache_dir: Path | None) -> PooledDedup:
        """Pool ``base`` with a dedup gate seeded by ``pool`` (rows with question and answer), same settings."""
        pool_gate = DedupGate(pool, max_jaccard=params["max_jaccard"], num_perm=params["num_perm"],
                              shingle=params["shingle"], cache_dir=cache_dir) if pool.num_rows else None
        return cls(base, pool_gate)

    def apply(self, rows: pa.Table) -> Verdicts:
        v = self.base.apply(rows)
        if self.pool is None or rows.num_rows == 0:
            return v
        p = self.pool.apply(rows)
        keep, score, reason = list(v.keep), list(v.score), list(v.reason)
        for i, (k, r) in enumerate(zip(p.keep, p.reason)):
            if keep[i] and r in ("dedup_exact_seed", "dedup_near_seed"):
                keep[i], reason[i] = False, r.replace("_seed", "_accepted")
            if p.score[i] is not None:
                score[i] = max(score[i] or 0.0, p.score[i])
        return Verdicts(keep, score, reason)


def _rank(row_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Return each row's position when rows are sorted by row_id (ties by input position)."""
    order = pc.sort_indices(pa.table({"row_id": row_ids, "pos": pa.array(np.arange(len(row_ids)))}),
                            sort_keys=[("row_id", "ascending"), ("pos", "ascending")]).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank
