"""Score claims with a verifier combined with grounding features: the ``Combiner`` and the ``GroundedVerifier``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinery.models.grounding.features import (EMBEDDING_FEATURES, EXTRA_FEATURES, FEATURES, LIKELIHOOD_FEATURES,
                                                OFFSET_FEATURES, Likelihood, embedding_matrix, feature_matrix,
                                                likelihood_matrix)
from refinery.models.grounding.learners import BoostedTrees, clean_rank, linear_logit

COMBINER_FILE = "COMBINER.json"


class Combiner:
    """The fitted logistic regression over FEATURES, plus any of EXTRA_FEATURES it was fitted with.

    A spec may instead hold ``boosted``: gradient-boosted trees over the same features (``fit_combiner_spec``
    with ``boosted``), exported as plain node arrays so no pickled model is ever loaded.

    A spec may also hold ``per_kind``: one regression per corruption kind, each fitted on clean answers against
    that kind's negatives alone and ranked against the clean answers (``fit_combiner_spec``). The score is then
    the minimum over the overall regression and the per-kind ones, so a row is as supported as its most damning
    detector says. One linear score has to trade a swapped word's cue against an answer-from-another-document's
    cue; the minimum keeps each cue at full strength.
    """

    def __init__(self, spec: dict[str, Any]):
        names = list(spec.get("features", []))
        self.trees = BoostedTrees(spec["boosted"], len(names)) if "boosted" in spec else None
        extra = names[len(FEATURES):]
        if names[:len(FEATURES)] != list(FEATURES) or len(set(extra)) != len(extra) or \
                not set(extra) <= set(EXTRA_FEATURES):
            raise ValueError(f"combiner features {spec.get('features')} differ from this version's {list(FEATURES)} "
                             f"(optionally + some of {list(EXTRA_FEATURES)})")
        self.spec = spec
        self.likelihood_columns = [LIKELIHOOD_FEATURES.index(n) for n in extra if n in LIKELIHOOD_FEATURES]
        self.embedding_columns = [EMBEDDING_FEATURES.index(n) for n in extra if n in EMBEDDING_FEATURES]
        if [n for n in extra if n in LIKELIHOOD_FEATURES] + [n for n in extra if n in EMBEDDING_FEATURES] != extra:
            raise ValueError(f"combiner features {extra}: likelihood features must come before embedding features")
        self.needs_judge = bool(self.likelihood_columns)
        self.needs_offsets = any(n in OFFSET_FEATURES for n in extra)
        self.needs_embedder = bool(self.embedding_columns)
        self.models = [] if self.trees is not None else \
            [spec] + [spec["per_kind"][k] for k in sorted(spec.get("per_kind") or {})]
        for m in self.models:
            if not len(m["mean"]) == len(m["std"]) == len(m["weights"]) == len(names):
                raise ValueError(f"combiner: {len(names)} features but a regression of {len(m['weights'])} weights")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the support score per row; NaN rows stay NaN.

        One regression, or boosted trees: P(supported). Per kind: the minimum over the regressions of the share of
        clean answers each one scores the row above (``fit_combiner_spec``).
        """
        if self.trees is not None:
            p = 1 / (1 + np.exp(-np.clip(self.trees.raw(x), -30, 30)))
            return np.where(np.isnan(x).any(axis=1), np.nan, p)
        out = None
        for m in self.models:
            z = linear_logit(m, x)
            if "clean_logits" in m:
                p = clean_rank(z, np.asarray(m["clean_logits"], dtype=float))
            else:
                p = 1 / (1 + np.exp(-np.clip(z, -30, 30)))
            out = p if out is None else np.minimum(out, p)
        return out

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write COMBINER.json into a model folder."""
        path = Path(folder) / COMBINER_FILE
        path.write_text(json.dumps({**self.spec, **(extra or {})}, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Combiner | None:
        """Return the folder's combiner, or None when it has none."""
        path = Path(folder) / COMBINER_FILE
        return cls(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


class GroundedVerifier:
    """A verifier whose score is the combiner over its model's score and grounding features.

    Keeps the wrapped verifier's interface (``name``, ``threshold``, ``score``), so gates and the
    calibration code use it unchanged. A combiner fitted with LIKELIHOOD_FEATURES needs the judge backend (with
    ``token_offsets`` for the word features); one fitted with EMBEDDING_FEATURES needs the embedder.
    """

    def __init__(self, base: Any, combiner: Combiner, judge: Any | None = None, embedder: Any | None = None):
        if combiner.needs_judge and not callable(getattr(judge, "token_logprobs", None)):
            got = "none was given" if judge is None else f"{type(judge).__name__} cannot return token log-probs"
            raise ValueError(f"verifier {base.name}: its combiner reads the judge's answer likelihood "
                             f"({', '.join(LIKELIHOOD_FEATURES)}), but {got}: use a local judge model")
        if combiner.needs_offsets and not callable(getattr(judge, "token_offsets", None)):
            raise ValueError(f"verifier {base.name}: its combiner reads the judge's word log-probs, but "
                             f"{type(judge).__name__} cannot return token offsets: use a local judge model")
        if combiner.needs_embedder and not callable(getattr(embedder, "embed", None)):
            raise ValueError(f"verifier {base.name}: its combiner reads sentence-embedding cosines "
                             f"({', '.join(EMBEDDING_FEATURES)}), but no embedder was given")
        if combiner.needs_judge and not isinstance(judge, Likelihood):
            judge = Likelihood(judge)
        self.base, self.combiner = base, combiner
        self.judge = judge if combiner.needs_judge else None
        self.embedder = embedder if combiner.needs_embedder else None
        suffix = "+lexical" + ("+likelihood" if self.judge is not None else "") + \
            ("+embedding" if self.embedder is not None else "")
        self.name, self.threshold = f"{base.name}{suffix}", base.threshold

    @property
    def full_max_chars(self) -> int:
        return self.base.full_max_chars

    @full_max_chars.setter
    def full_max_chars(self, value: int) -> None:
        self.base.full_max_chars = value

    def score(self, passages: Sequence[str], claims: Sequence[str]) -> np.ndarray:
        """Return the combined support score per pair (see ``Combiner.predict``); NaN where a feature is NaN."""
        probs = np.asarray(self.base.score(passages, claims), dtype=float)
        return self.combiner.predict(combiner_matrix(self.combiner, passages, claims, probs, judge=self.judge,
                                                     embedder=self.embedder))


def combiner_matrix(combiner: Combiner, passages: Sequence[str], claims: Sequence[str], model_probs: np.ndarray,
                    *, judge: Any | None = None, embedder: Any | None = None) -> np.ndarray:
    """Return the feature matrix in ``combiner``'s column order (FEATURES, then its extra features)."""
    x = [feature_matrix(passages, claims, model_probs)]
    if combiner.likelihood_columns:
        x.append(likelihood_matrix(judge, passages, claims)[:, combiner.likelihood_columns])
    if combiner.embedding_columns:
        x.append(embedding_matrix(embedder, passages, claims)[:, combiner.embedding_columns])
    return np.hstack(x)
