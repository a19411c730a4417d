"""Embed texts so that every call depends only on its own texts and on the cache as it was when the stage started."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class FrozenCacheEmbedder:
    """An :class:`refinery.models.embed.Embedder` whose vectors never depend on which process ran which call before.

    The embedder embeds one text at a time, so a vector depends on its text alone; what this view adds is that
    a call reads only the cache shards listed when the stage started (``shards``), never the shards other units
    or Ray workers write while the stage runs, so what a call reads and computes does not follow the order in
    which the workers ran. It embeds every other text of a call as one call of :meth:`Embedder.encode`; new
    vectors are still written to the cache, for the next run.

    Args:
        base: the embedder (its model, batch size, model id and cache folder).
        shards: shard file names in ``base``'s cache folder to read (:meth:`shards_of` at the stage's start).
    """

    def __init__(self, base: Any, shards: Sequence[str]):
        self.base, self.shards = base, tuple(shards)
        self._view: Any = None

    @staticmethod
    def shards_of(base: Any) -> tuple[str, ...]:
        """Return the shard files now in ``base``'s cache folder (none without a folder)."""
        folder = base.cache.folder
        if folder is None or not Path(folder).is_dir():
            return ()
        from refinery.models.embed import shard_files

        return tuple(p.name for p in shard_files(folder))

    @property
    def computed(self) -> int:
        """How many texts went through the model."""
        return self.base.computed

    def _frozen(self) -> Any:
        if self._view is None:
            from refinery.models.embed import VectorCache, read_shard

            view = VectorCache(None, None, np.float32)
            folder = self.base.cache.folder
            keys, vecs = [], []
            for name in self.shards:
                path = Path(folder) / name
                if not path.is_file():
                    continue  # removed since (a cleaned cache): those texts are embedded again
                shard_keys, shard_vecs = read_shard(path, np.float32)
                if not len(shard_keys):
                    continue
                keys.append(shard_keys)
                vecs.append(shard_vecs)
            if keys:
                all_keys, first = np.unique(np.concatenate(keys), return_index=True)
                view.put(all_keys, np.concatenate(vecs)[first])
            self._view = view
        return self._view

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return one normalised vector per text: cached at the stage's start, or embedded in this call.

        Args:
            texts: the texts.

        Returns:
            float32 array (texts, dim), in input order.
        """
        from refinery.models.embed import content_keys

        texts = list(texts)
        keys = content_keys(self.base.model_id, texts)
        found, cached = self._frozen().get(keys)
        missing = np.flatnonzero(~found)
        if not len(missing):
            return cached
        new_keys, first = np.unique(keys[missing], return_index=True)
        new = self.base.encode([texts[i] for i in missing[first]])
        self.base.cache.put(new_keys, new)
        vecs = np.zeros((len(texts), new.shape[1]), np.float32)
        if found.any():
            vecs[found] = cached[found]
        vecs[missing] = new[np.searchsorted(new_keys, keys[missing])]
        return vecs
