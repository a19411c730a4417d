"""Vectorised text and hashing kernels: normalise, tokenise, count and hash a whole Arrow column at once.

Each kernel gives exactly what the per-string functions in :mod:`refinery.core.text` give (``match_keys`` is
``match_key`` of every value, ``word_counts`` is ``len(text.split())``), but runs with NumPy on the UTF-8 bytes,
falling back to Python only for the rare non-ASCII rows. The rules, dedup and overlap gates, the diversity and
expectation checks and the benches share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refinery.core.text import match_key

ROWS_PER_PASS = 8192  # rows a caller judges per pass: keeps lookups cache-sized and temporaries reused

_CHUNK_BYTES = 1 << 20  # bytes of text per NumPy pass: small temporaries are reused by the allocator, where
# fresh multi-megabyte arrays pay page faults (seconds per 100k rows on sandboxed kernels)
_U64 = np.uint64
_P = _U64(0x100000001B3)  # FNV-64 prime: odd, so invertible modulo 2**64
_P_INV = _U64(pow(0x100000001B3, -1, 1 << 64))
_POW: dict[str, np.ndarray] = {"p": np.ones(1, _U64), "inv": np.ones(1, _U64)}

# ASCII byte map equal to match_key on ASCII text: casefold (= lower for ASCII), characters that are neither
# \w nor \s become a space, Python's \s (which includes \x1c-\x1f) becomes a space.
_LUT = np.full(256, 32, np.uint8)
for _c in range(256):
    _ch = chr(_c)
    if _c >= 128:
        _LUT[_c] = _c  # only used on rows that are pure ASCII
    elif _ch.isalnum() or _ch == "_":
        _LUT[_c] = ord(_ch.lower())
del _c, _ch
_ASCII_WS = np.zeros(256, bool)
_ASCII_WS[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # bytes Python's str.split() splits on


def as_strings(values: pa.Array | pa.ChunkedArray | list[str | None]) -> pa.StringArray:
    """Return one contiguous string array with nulls replaced by ''."""
    if isinstance(values, list):
        values = pa.array(values, pa.string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if values.type != pa.string():
        values = values.cast(pa.string())
    if values.null_count:
        values = values.fill_null("")
    return values


def utf8_buffers(arr: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """Return (utf-8 bytes, int64 offsets starting at 0) of a string array without copying the bytes."""
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int32, count=len(arr) + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]]
    return data, offsets - offsets[0]


def _from_buffers(data: np.ndarray, offsets: np.ndarray) -> pa.StringArray:
    return pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(np.ascontiguousarray(data, np.uint8)))


def _row_chunks(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Split rows into consecutive [lo, hi) ranges of about _CHUNK_BYTES bytes each (at least one row)."""
    n = len(offsets) - 1
    bounds, lo = [], 0
    while lo < n:
        hi = int(np.searchsorted(offsets, offsets[lo] + _CHUNK_BYTES, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return P**k and P**-k modulo 2**64 for k < n (cached, grown on demand)."""
    if len(_POW["p"]) < n:
        size = max(n, 2 * len(_POW["p"]))
        _POW["p"] = np.cumprod(np.concatenate([[_U64(1)], np.full(size - 1, _P, _U64)]), dtype=_U64)
        _POW["inv"] = np.cumprod(np.concatenate([[_U64(1)], np.full(size - 1, _P_INV, _U64)]), dtype=_U64)
    return _POW["p"][:n], _POW["inv"][:n]


def mix64(x: np.ndarray) -> np.ndarray:
    """Scramble uint64 values with the splitmix64 finaliser (a bijection; spreads similar inputs apart).

    Args:
        x: uint64 values.

    Returns:
        The mixed values (new array).
    """
    with np.errstate(over="ignore"):
        x = x.astype(_U64, copy=True)
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


def _normalise_ascii(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply match_key's ASCII rules to rows of bytes: map, collapse spaces, trim. Returns (bytes, offsets)."""
    lengths = np.diff(offsets)
    m = _LUT[data]
    is_sp = m == 32
    first = np.zeros(len(m), bool)
    first[offsets[:-1][lengths > 0]] = True
    prev_sp = np.empty(len(m), bool)
    if len(m):
        prev_sp[0] = True
        prev_sp[1:] = is_sp[:-1]
    keep = ~(is_sp & (prev_sp | first))
    cs = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    m, offsets = m[keep], cs[offsets]
    # a row may now end with one space: drop it
    nonempty = np.diff(offsets) > 0
    last = offsets[1:][nonempty] - 1
    trailing = last[m[last] == 32]
    if len(trailing):
        keep = np.ones(len(m), bool)
        keep[trailing] = False
        cs = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        m, offsets = m[keep], cs[offsets]
    return m, offsets


def match_keys(values: pa.Array | pa.ChunkedArray | list[str | None]) -> pa.StringArray:
    """Return ``refinery.core.text.match_key`` of every value, vectorised (nulls give '').

    Args:
        values: strings (Arrow array, chunked array or list).

    Returns:
        A string array of the same length; element i equals ``match_key(values[i] or '')``.
    """
    arr = as_strings(values)
    if len(arr) == 0:
        return arr
    ascii_mask = pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)
    data, offsets = utf8_buffers(arr)
    parts, lengths = [], []
    for lo, hi in _row_chunks(offsets):
        m, off = _normalise_ascii(data[offsets[lo]:offsets[hi]], offsets[lo:hi + 1] - offsets[lo])
        parts.append(m)
        lengths.append(np.diff(off))
    m = np.concatenate(parts)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    fast = _from_buffers(m, offsets)
    if ascii_mask.all():
        return fast
    slow = arr.to_pylist()
    out = fast.to_pylist()
    for i in np.flatnonzero(~ascii_mask):
        out[i] = match_key(slow[i])
    return pa.array(out, pa.string())


@dataclass(frozen=True)
class Tokens:
    """Word tokens of many texts as 64-bit hashes, flat, with row offsets.

    Attributes:
        hashes: uint64, one per token, equal for equal token text in any row or call.
        offsets: int64, length rows + 1; row i's tokens are ``hashes[offsets[i]:offsets[i + 1]]``.
    """

    hashes: np.ndarray
    offsets: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Tokens per row."""
        return np.diff(self.offsets)

    @property
    def rows(self) -> np.ndarray:
        """The row index of every token."""
        return np.repeat(np.arange(len(self.offsets) - 1), self.counts)


def word_tokens(keys: pa.StringArray) -> Tokens:
    """Hash the space-separated words of normalised keys (the output of :func:`match_keys`).

    Args:
        keys: normalised strings (single spaces, no leading or trailing space).

    Returns:
        The token hashes and row offsets.
    """
    keys = as_strings(keys)
    data, offsets = utf8_buffers(keys)
    hashes, counts = [], []
    for lo, hi in _row_chunks(offsets):
        c = data[offsets[lo]:offsets[hi]]
        off = offsets[lo:hi + 1] - offsets[lo]
        n = len(c)
        if n == 0:
            counts.append(np.zeros(hi - lo, np.int64))
            continue
        is_sp = c == 32
        is_tok = ~is_sp
        prev_tok = np.zeros(n, bool)
        prev_tok[1:] = is_tok[:-1]
        next_tok = np.zeros(n, bool)
        next_tok[:-1] = is_tok[1:]
        row_start = np.zeros(n, bool)
        row_start[off[:-1][off[:-1] < n]] = True
        row_end = np.zeros(n, bool)
        row_end[off[1:][off[1:] > 0] - 1] = True
        starts = np.flatnonzero(is_tok & (~prev_tok | row_start))
        ends = np.flatnonzero(is_tok & (~next_tok | row_end)) + 1
        p, pinv = _powers(n)
        with np.errstate(over="ignore"):
            g = np.cumsum(c.astype(_U64) * pinv, dtype=_U64)
            before = np.where(starts > 0, g[np.maximum(starts - 1, 0)], _U64(0))
            h = (g[ends - 1] - before) * p[starts]
            h ^= (ends - starts).astype(_U64) * _U64(0x9E3779B97F4A7C15)
        hashes.append(mix64(h))
        counts.append(np.diff(np.searchsorted(starts, off)))
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    return Tokens(np.concatenate(hashes) if hashes else np.zeros(0, _U64),
                  np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64))


def word_counts(values: pa.Array | pa.ChunkedArray | list[str | None]) -> np.ndarray:
    """Count whitespace-separated words of raw text, as ``len(text.split())`` does (nulls count 0).

    Args:
        values: strings.

    Returns:
        int64 counts, one per value.
    """
    arr = as_strings(values)
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    data, offsets = utf8_buffers(arr)
    counts = np.zeros(len(arr), np.int64)
    for lo, hi in _row_chunks(offsets):
        off = offsets[lo:hi + 1] - offsets[lo]
        is_word = ~_ASCII_WS[data[offsets[lo]:offsets[hi]]]
        start = is_word.copy()
        start[1:] &= ~is_word[:-1]
        heads = off[:-1][np.diff(off) > 0]
        start[heads] = is_word[heads]
        cs = np.concatenate([[0], np.cumsum(start, dtype=np.int64)])
        counts[lo:hi] = cs[off[1:]] - cs[off[:-1]]
    ascii_mask = pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)
    if not ascii_mask.all():
        for i in np.flatnonzero(~ascii_mask):
            counts[i] = len(arr[i].as_py().split())
    return counts


def hash_words(words: list[str]) -> np.ndarray:
    """Return the token hashes of a word list, as :func:`word_tokens` hashes them.

    Args:
        words: words (normalised like :func:`refinery.core.text.match_key`; a word with punctuation gives
            several tokens).

    Returns:
        Sorted unique uint64 hashes.
    """
    keys = match_keys(words)
    toks = word_tokens(keys)
    return np.unique(toks.hashes)


def in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Return ``np.isin(values, sorted_set)`` for an already sorted ``sorted_set``, by binary search (faster).

    Args:
        values: values to look up.
        sorted_set: ascending values.

    Returns:
        bool per value.
    """
    if len(sorted_set) == 0:
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


class SmallHashSet:
    """Membership in a small set of 64-bit hashes with one table lookup per value (no search).

    The table is indexed by the low bits of each hash, with enough bits that no two members share a slot.

    Args:
        members: uint64 hashes (well mixed, e.g. from :func:`word_tokens`).
    """

    def __init__(self, members: np.ndarray):
        members = np.unique(members.astype(_U64))
        bits = 10
        while len(members) and len(np.unique(members & _U64((1 << bits) - 1))) < len(members):
            bits += 1
        self._mask = _U64((1 << bits) - 1)
        empty = _U64(0)
        while empty in set(members.tolist()):
            empty += _U64(1)
        self._table = np.full(1 << bits, empty, _U64)
        self._table[(members & self._mask).astype(np.int64)] = members
        self._empty = empty

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Return a bool per value: whether it is a member."""
        found = self._table[(values & self._mask).astype(np.int64)]
        return (found == values) & (values != self._empty)


class U64Set:
    """Membership in a large set of 64-bit hashes: a bitmap on the low bits screens out most non-members,
    and a binary search confirms the rest.

    Args:
        members: uint64 hashes (well mixed).
    """

    def __init__(self, members: np.ndarray):
        self._members = np.unique(members.astype(_U64))
        bits = int(min(max(np.ceil(np.log2(max(len(self._members), 1) * 32)), 16), 28))
        self._mask = _U64((1 << bits) - 1)
        self._bitmap = np.zeros(1 << bits, bool)
        self._bitmap[(self._members & self._mask).astype(np.int64)] = True

    def __len__(self) -> int:
        return len(self._members)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Return a bool per value: whether it is a member."""
        out = self._bitmap[(values & self._mask).astype(np.int64)]
        maybe = np.flatnonzero(out)
        out[maybe] = in_sorted(values[maybe], self._members)
        return out


def per_row_sum(tokens_rows: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Sum ``weights`` per row index (a vectorised group-by).

    Args:
        tokens_rows: the row index of each item.
        weights: one number (or bool) per item.
        n: number of rows.

    Returns:
        float64 sums, one per row.
    """
    return np.bincount(tokens_rows, weights=weights.astype(np.float64), minlength=n)
