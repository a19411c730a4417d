"""Targeted rare-class expansion: generate several times the rows a rare intent lacks, with an intent-aware prompt.

Every class (intent, or a coarse question type where the seed has no intents) with fewer seed train rows than
``min_rows`` gets ``factor`` x (``min_rows`` - its rows) teacher calls. Each call shows the class's definition (when
params give one), positive examples (other seed rows of the class), negative examples (questions of other classes),
forbidden shortcuts and a tone variation, and the passage of a seed row of the class. The rows then pass every gate
and dedup like any other; review samples each rare intent's rows at ``review.rare_share`` (20%), and the arms' caps
bound their sampling weight.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Coarse question types for seeds without an intent column (CosmosQA): the question's first wh-word.
_WH = re.compile(r"\b(what|why|how|who|whom|whose|when|where|which)\b", re.IGNORECASE)
WH_TYPES = {"whom": "who", "whose": "who"}


def coarse_type(question: str | None) -> str:
    """The class of a question without an intent: ``wh_<word>`` of its first wh-word, else ``wh_other``."""
    m = _WH.search(question or "")
    if m is None:
        return "wh_other"
    word = m.group(1).lower()
    return f"wh_{WH_TYPES.get(word, word)}"


def class_of(row: dict[str, Any], use_intent: bool) -> str:
    """A row's class: its intent, or its coarse question type when the seed has no intents."""
    return row["intent"] if use_intent else coarse_type(row.get("question"))


def rare_classes(rows: Sequence[dict[str, Any]], min_rows: int, factor: float) -> dict[str, dict[str, int]]:
    """Per class under ``min_rows`` seed rows: its rows, the rows it lacks, and the calls to spend (factor x lacking).

    Classes come from the ``intent`` column when any row has one (rows without one are not counted), else from
    :func:`coarse_type`. Ordered by class name.
    """
    use_intent = any(r.get("intent") for r in rows)
    counts = Counter(class_of(r, use_intent) for r in rows if not use_intent or r.get("intent"))
    out = {}
    for c in sorted(counts):
        lacking = max(0, min_rows - counts[c])
        if lacking:
            out[c] = {"seed_rows": counts[c], "lacking": lacking, "calls": int(round(factor * lacking))}
    return out
