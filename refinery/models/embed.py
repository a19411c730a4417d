"""Embed texts with a sentence-transformers model, one text at a time, caching vectors on disk by content hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from refinery.core.errors import ModelResolutionError

_KEY_BYTES = 16  # sha256 prefix used as the cache key (collisions: ~2**-64 at a billion entries)
_ENCODE_CHUNK = 8192  # texts per encode call: vectors are written to the cache after each chunk
_LOAD_BATCH = 65_536  # vectors read from shards before the first merge (later batches: what the cache holds)


class VectorCache:
    """A content-addressed matrix store: fixed-length vectors keyed by 16-byte hashes, as Arrow IPC shards.

    Each :meth:`put` writes one shard (``part-<hash>.arrow``, an Arrow IPC file, zstd-compressed buffers:
    ``key`` binary(16), ``vec`` fixed-size list) to a temporary name and renames it into place, so readers never
    see half a shard and concurrent writers of the same vectors write the same file. Shards are read memory-mapped,
    and only their zstd buffers are decompressed: decoding Parquet was most of the time a stage spent loading a large
    cache (``docs/measurements.md``, stop 40). Parquet shards (``part-<hash>.parquet``) written by earlier versions are
    still read. Nothing is pickled. With ``folder=None`` vectors live in memory only, for the life of the object.

    Args:
        folder: the shard folder (created on the first write), or None.
        dim: vector length.
        dtype: NumPy dtype of the vectors (float32 embeddings, uint32 MinHash signatures).
    """

    def __init__(self, folder: str | Path | None, dim: int | None, dtype: Any):
        self.folder = Path(folder) if folder is not None else None
        self.dim, self.dtype = dim, np.dtype(dtype)
        self._keys = np.zeros(0, f"S{_KEY_BYTES}")  # sorted
        self._vecs: np.ndarray | None = None
        self._loaded = False

    def __len__(self) -> int:
        if not self._loaded:
            self._load()
        return len(self._keys)

    def _load(self) -> None:
        self._loaded = True
        if self.folder is None or not self.folder.is_dir():
            return
        # shards are merged in file order (a key in several keeps the first shard's vector), a batch at a time:
        # a batch grows to the size of what is held before it is merged, so the matrix is copied a few times in
        # all, not once per shard, and a cache of many overlapping shards never sits in memory whole
        keys: list[np.ndarray] = []
        vecs: list[np.ndarray] = []
        for shard in shard_files(self.folder):
            shard_keys, shard_vecs = read_shard(shard, self.dtype)
            dim = shard_vecs.shape[1]
            keys.append(shard_keys)
            vecs.append(shard_vecs)
            if self.dim is not None and dim != self.dim:
                raise ValueError(f"{self.folder}: cached vectors have length {dim}, expected {self.dim}")
            if self.dim is None:
                self.dim = dim
            if sum(map(len, keys)) >= max(len(self._keys), _LOAD_BATCH):
                self._merge(np.concatenate(keys), np.concatenate(vecs))
                keys, vecs = [], []
        if keys:
            self._merge(np.concatenate(keys), np.concatenate(vecs))

    def _merge(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        if self.dim is None:
            self.dim = vecs.shape[1]
        if vecs.shape[1] != self.dim:
            raise ValueError(f"{self.folder}: cached vectors have length {vecs.shape[1]}, expected {self.dim}")
        old = self._vecs if self._vecs is not None else np.zeros((0, self.dim), self.dtype)
        keys, first = np.unique(keys, return_index=True)  # a key given twice: its first vector
        vecs = vecs[first]
        pos = np.searchsorted(self._keys, keys)
        known = self._keys[np.minimum(pos, len(self._keys) - 1)] == keys if len(self._keys) else \
            np.zeros(len(keys), bool)
        keep = ~known  # a key already held keeps its vector
        # one copy of the matrix with the new rows slotted in at their sorted places
        self._keys = np.insert(self._keys, pos[keep], keys[keep])
        self._vecs = np.insert(old, pos[keep], vecs[keep].astype(self.dtype), axis=0)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Look keys up.

        Args:
            keys: ``S16`` keys.

        Returns:
            (found: bool per key, vectors: (keys, dim) with zeros where not found).
        """
        if not self._loaded:
            self._load()
        dim = self.dim or 0
        if len(self._keys) == 0 or len(keys) == 0:
            return np.zeros(len(keys), bool), np.zeros((len(keys), dim), self.dtype)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        found = self._keys[pos] == keys
        vecs = self._vecs[pos]
        vecs[~found] = 0
        return found, vecs

    def put(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors (in memory, and as one new shard when the cache has a folder).

        Args:
            keys: ``S16`` keys, unique.
            vecs: (keys, dim) vectors.
        """
        if not self._loaded:
            self._load()
        if len(keys) == 0:
            return
        self._merge(keys, vecs)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        arrow_type = pa.from_numpy_dtype(self.dtype)
        table = pa.table({
            "key": _keys_to_arrow(keys),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(vecs.astype(self.dtype).reshape(-1), arrow_type),
                                                     vecs.shape[1]),
        })
        name = hashlib.sha256(np.sort(keys).tobytes()).hexdigest()[:16]
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".arrow", dir=self.folder)
        os.close(fd)
        try:
            with pa.ipc.new_file(tmp, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
                writer.write_table(table)
            os.replace(tmp, self.folder / f"part-{name}.arrow")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def shard_files(folder: str | Path) -> list[Path]:
    """Return a cache folder's shard files in the order they are merged (by name): IPC and legacy Parquet."""
    return sorted(p for p in Path(folder).glob("part-*") if p.suffix in (".arrow", ".parquet"))


def read_shard(path: str | Path, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read one shard: its ``S16`` keys and its vectors as a (keys, dim) matrix of ``dtype``.

    An IPC shard (``.arrow``) is memory-mapped and its buffers decompressed; a Parquet shard (``.parquet``,
    earlier versions) is decoded.
    """
    path = Path(path)
    if path.suffix == ".arrow":
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
            return _table_vectors(table, dtype)
    return _table_vectors(pq.read_table(path), dtype)


def _table_vectors(table: pa.Table, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    column = table.column("vec")
    dim = column.type.list_size
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in column.chunks]
    vecs = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0, dim), dtype)
    return _keys_from_arrow(table.column("key")), vecs


def _keys_to_arrow(keys: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Wrap ``S16`` keys as Arrow binary(16) from their raw bytes (``tolist`` would drop trailing zero bytes)."""
    raw = np.ascontiguousarray(keys, f"S{_KEY_BYTES}").tobytes()
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(_KEY_BYTES), len(keys), [None, pa.py_buffer(raw)])


def _keys_from_arrow(column: pa.ChunkedArray) -> np.ndarray:
    """Return the raw bytes of a binary(16) column as ``S16`` keys."""
    parts = []
    for chunk in column.chunks:
        buf = chunk.buffers()[1]
        raw = np.frombuffer(buf, np.uint8, count=len(chunk) * _KEY_BYTES, offset=chunk.offset * _KEY_BYTES)
        parts.append(raw.copy().view(f"S{_KEY_BYTES}"))
    return np.concatenate(parts) if parts else np.zeros(0, f"S{_KEY_BYTES}")


def content_keys(namespace: str, texts: Sequence[str]) -> np.ndarray:
    """Return the cache key of each text: the first 16 bytes of sha256(namespace, unit separator, text).

    Args:
        namespace: what the vectors depend on besides the text (model id, shingling config).
        texts: the texts.

    Returns:
        ``S16`` keys, one per text.
    """
    prefix = namespace.encode("utf-8") + b"\x1f"
    return np.array([hashlib.sha256(prefix + t.encode("utf-8")).digest()[:_KEY_BYTES] for t in texts],
                    f"S{_KEY_BYTES}")


def model_fingerprint(model_path: str | Path) -> str:
    """Return a stable id for a model folder: its file names and sizes, and the content of small files.

    Args:
        model_path: the sentence-transformers folder.

    Returns:
        ``<folder name>@<12 hex>``.
    """
    root = Path(model_path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        size = f.stat().st_size
        h.update(f"{rel}\x1f{size}\x1e".encode())
        if size <= 2 << 20:
            h.update(f.read_bytes())
    return f"{root.name}@{h.hexdigest()[:12]}"


class Embedder:
    """Sentence embeddings from a local sentence-transformers folder, normalised, cached by content hash.

    The model is loaded once, on the first text that is not in the cache (so a fully cached run never
    loads it). Texts are embedded one at a time, unpadded: a vector then depends on its text alone, never on the
    other texts of a batch (batched, padded and length-sorted, its last bits follow its batch), so a run that reads
    some vectors from the cache gives the bits a cold run gives and a resumed stage writes what an unbroken one
    would (docs/measurements.md, embedding one text at a time). Vectors are L2-normalised, so a dot product is the
    cosine similarity. The cache key is
    sha256(model id + text): a different model never reads another's vectors, and changing a gate's
    threshold recomputes nothing.

    Args:
        model_path: the model folder (e.g. ``load_target('models/base', 'embedder')['path']``).
        cache_dir: folder for the vector cache (None: no disk cache; vectors are still reused in memory).
        model_id: the id that keys the cache (e.g. ``load_target(...)['id']``); default: a fingerprint of
            the folder's files.
        device: torch device.
        threads: torch intra-op threads while embedding (None: whatever the process has). A vector's last bits
            follow the thread count for longer texts, so a stage that embeds in several processes (Ray workers
            start with one thread) fixes it.

    Attributes:
        computed: how many texts this embedder has run through the model; tests count on it.

    Raises:
        ModelResolutionError: the model folder does not exist.
    """

    def __init__(self, model_path: str | Path, cache_dir: str | Path | None = None, model_id: str | None = None,
                 device: str = "cpu", threads: int | None = None):
        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            raise ModelResolutionError(f"embedder: model folder {self.model_path} not found (run `refinery "
                                       f"provision` first)")
        if threads is not None and threads < 1:
            raise ValueError(f"embedder: threads must be >= 1, got {threads}")
        self.device, self.threads = device, threads
        self.model_id = model_id or model_fingerprint(self.model_path)
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / ("embed-" + hashlib.sha256(self.model_id.encode()).hexdigest()[:16])
        self.cache = VectorCache(folder, None, np.float32)
        self.computed = 0
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded (a fully cached run never loads it)."""
        return self._model is not None

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer (loaded on first use)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path), device=self.device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """Run the model on ``texts`` one at a time (no cache): float32 (texts, dim), L2-normalised."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        vecs = self.model.encode(texts, batch_size=1, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        self.computed += len(texts)
        return np.asarray(vecs, np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return one normalised vector per text, embedding only texts not cached before.

        Args:
            texts: the texts.

        Returns:
            float32 array (texts, dim), in input order.
        """
        texts = list(texts)
        keys = content_keys(self.model_id, texts)
        found, _ = self.cache.get(keys)
        missing = np.flatnonzero(~found)
        if len(missing):
            new_keys, first = np.unique(keys[missing], return_index=True)
            todo = missing[first]
            for lo in range(0, len(todo), _ENCODE_CHUNK):
                idx = todo[lo:lo + _ENCODE_CHUNK]
                self.cache.put(new_keys[lo:lo + _ENCODE_CHUNK], self.encode([texts[i] for i in idx]))
        if not texts:
            return np.zeros((0, self.cache.dim or 0), np.float32)
        found, vecs = self.cache.get(keys)
        return vecs
