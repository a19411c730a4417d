"""Declare every quality gate once: its class, params, reason codes, what each code means for recovery, its margins.

The gated schema's columns (:data:`GATES`), the params model of the gate stage, the cascade order, gate building,
recovery's diagnosis and margins, the report's gate families and the tests all read this table. Adding a gate is
one module under ``refinery/gates/`` (a :class:`refinery.gates.base.BaseGate` subclass with its params model, its
``calibrate`` and ``build``), one :class:`GateSpec` below, and its params section ``gate.<section>``.

This module imports no gate module: a spec names its class and params model by dotted path, imported on first
use, so the schema, the report and recovery's diagnosis read names and codes without depending on any gate's
code. :mod:`refinery.gates.run` imports the classes by these paths and declares it (``__resolves__``), so the
code fingerprint of every stage that builds gates covers every gate module (``refinery.core.codehash``);
``tests/gates/test_registry.py`` checks it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from refinery.core.errors import RefineryError

if TYPE_CHECKING:
    from refinery.core.params import StageParams

# What a failing gate means for recovery (the failure modes of ``schemas.recovered.MODES`` that a reason code
# names directly; ``threshold_marginal`` and ``question_defect`` are decided by recovery from scores and text).
FAILURE_MODES = ("malformed", "truncated", "refusal", "duplicate", "too_close_to_seed", "ungrounded", "low_quality",
                 "unrecoverable")
# Which quality dimension a low_quality reason names (recovery's 'rewrite_weakest' picks the rewrite by it).
DIMENSIONS = ("length", "fluency", "helpfulness")


@dataclass(frozen=True)
class Failure:
    """What one reason code means for recovery.

    Attributes:
        mode: one of FAILURE_MODES.
        dimension: for ``low_quality``, the dimension that failed (one of DIMENSIONS).
        copy: for ``too_close_to_seed``, the row is a copy of a seed row (nothing of its own: not worth a call).
    """

    mode: str
    dimension: str | None = None
    copy: bool = False


@dataclass(frozen=True)
class Margin:
    """How far past its bound a failing score is, for recovery's ``threshold_marginal``.

    distance = (bound - score) / margin for a ``min`` bound, (score - bound) / margin for a ``max`` bound; with
    ``relative``, (score / bound - 1) / margin. The margin itself is ``recover.margins.<gate>``.

    Attributes:
        bound: the gate's threshold name in ``thresholds.json`` (``min_support``, ``max_cosine``).
        side: ``min`` (rows below the bound fail) or ``max`` (rows above it fail).
        relative: the distance is a share of the bound, not an absolute difference.
    """

    bound: str
    side: Literal["min", "max"]
    relative: bool = False


@dataclass(frozen=True)
class GateSpec:
    """One gate's declaration.

    Attributes:
        name: the gate's name: the prefix of its columns (``<name>_keep/_score/_reason``) and reason codes.
        gate: its class, ``module:Class`` (a :class:`refinery.gates.base.BaseGate`), imported on first use.
        params: the model of its params section, ``module:Class``, imported on first use.
        section: its params section, ``gate.<section>`` (two gates may share one).
        bounds: the names of every value its verdicts depend on, as its ``calibrate`` resolves them and
            ``data/04_gated/thresholds.json`` records them (thresholds named by their bound, and settings).
        reasons: every reason code the gate can give, in its priority order, and what each means for recovery.
        margins: per reason code that can be marginal, how its distance to the bound is measured.
        needs_model: it scores rows with a model (loaded by the stage, fails closed).
        cascade: its rank in cascade mode (lower runs first): every gate without a model before every model gate,
            then from the cheapest per row.
        family: ``heuristic`` (text rules and similarity bounds) or ``model`` (learned or model-scored), for the report.
    """

    name: str
    gate: str
    params: str
    section: str
    bounds: tuple[str, ...]
    reasons: Mapping[str, Failure]
    needs_model: bool
    cascade: int
    family: Literal["heuristic", "model"]
    margins: Mapping[str, Margin] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The dotted name of the module that holds the gate."""
        return self.gate.split(":")[0]

    def gate_class(self) -> type:
        """Return the gate's class (imported on first use)."""
        return _load(self.gate)

    def params_model(self) -> type[StageParams]:
        """Return the model of its params section ``gate.<section>`` (imported on first use)."""
        return _load(self.params)


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


MALFORMED, TRUNCATED, REFUSAL = Failure("malformed"), Failure("truncated"), Failure("refusal")
DUPLICATE, UNGROUNDED, UNRECOVERABLE = Failure("duplicate"), Failure("ungrounded"), Failure("unrecoverable")
SEED_CLOSE, SEED_COPY = Failure("too_close_to_seed"), Failure("too_close_to_seed", copy=True)
LENGTH, FLUENCY, HELPFULNESS = (Failure("low_quality", dimension=d) for d in DIMENSIONS)

# In GATES order: the gated Parquet columns and each row's ``gate_reasons`` follow this order (a new gate goes last).
SPECS: tuple[GateSpec, ...] = (
    GateSpec(
        "rules", gate="refinery.gates.rules:RulesGate", params="refinery.gates.rules:RulesParams", section="rules",
        bounds=("min_qa_words", "max_qa_words", "min_answer_words", "max_answer_words"),
        reasons={"rules_transport_error": MALFORMED, "rules_parse_error": MALFORMED, "rules_empty": MALFORMED,
                 "rules_truncated": TRUNCATED, "rules_refusal": REFUSAL, "rules_meta_talk": MALFORMED,
                 "rules_too_short": LENGTH, "rules_too_long": LENGTH, "rules_language": MALFORMED,
                 "rules_answer_repeats_question": LENGTH, "rules_answer_not_in_source": UNGROUNDED},
        needs_model=False, cascade=10, family="heuristic"),
    GateSpec(
        "dedup", gate="refinery.gates.dedup:DedupGate", params="refinery.gates.dedup:DedupParams", section="dedup",
        bounds=("max_jaccard", "num_perm", "shingle"),
        reasons={"dedup_exact_seed": SEED_COPY, "dedup_exact": DUPLICATE, "dedup_near_seed": SEED_COPY,
                 "dedup_near": DUPLICATE,
                 # recovery's pooled dedup: a candidate equal or near to a row already accepted or recovered
                 "dedup_exact_accepted": DUPLICATE, "dedup_near_accepted": DUPLICATE},
        margins={"dedup_near_seed": Margin("max_jaccard", "max"), "dedup_near": Margin("max_jaccard", "max")},
        needs_model=False, cascade=20, family="heuristic"),
    GateSpec(
        "overlap_ngram", gate="refinery.gates.overlap:NgramOverlapGate",
        params="refinery.gates.overlap:OverlapParams", section="overlap", bounds=("ngram", "max_ngram_overlap"),
        reasons={"overlap_ngram": SEED_CLOSE},
        margins={"overlap_ngram": Margin("max_ngram_overlap", "max")},
        needs_model=False, cascade=30, family="heuristic"),
    GateSpec(
        "overlap_embedding", gate="refinery.gates.overlap:EmbeddingOverlapGate",
        params="refinery.gates.overlap:OverlapParams", section="overlap", bounds=("max_cosine",),
        # an embedding failure says nothing about the row: not worth a call
        reasons={"overlap_embedding": SEED_CLOSE, "overlap_embedding_error": UNRECOVERABLE},
        margins={"overlap_embedding": Margin("max_cosine", "max")},
        needs_model=True, cascade=50, family="heuristic"),
    GateSpec(
        "faithfulness", gate="refinery.gates.faithfulness:FaithfulnessGate",
        params="refinery.gates.faithfulness:FaithfulnessParams", section="faithfulness",
        bounds=("judge", "mode", "min_support"),
        reasons={"faithfulness_unsupported": UNGROUNDED, "faithfulness_no_evidence": UNGROUNDED,
                 "faithfulness_no_answer": UNGROUNDED, "faithfulness_error": UNGROUNDED},
        margins={"faithfulness_unsupported": Margin("min_support", "min")},
        needs_model=True, cascade=70, family="model"),
    GateSpec(
        "reward", gate="refinery.gates.reward:RewardGate", params="refinery.gates.reward:RewardParams",
        section="reward", bounds=("min_reward",),
        reasons={"reward_low": HELPFULNESS, "reward_no_answer": HELPFULNESS, "reward_error": HELPFULNESS},
        margins={"reward_low": Margin("min_reward", "min")},
        needs_model=True, cascade=60, family="model"),
    GateSpec(
        "perplexity", gate="refinery.gates.perplexity:PerplexityGate",
        params="refinery.gates.perplexity:PerplexityParams", section="perplexity",
        bounds=("min_perplexity", "max_perplexity"),
        reasons={"perplexity_too_high": FLUENCY, "perplexity_too_low": FLUENCY, "perplexity_no_answer": FLUENCY,
                 "perplexity_error": FLUENCY},
        margins={"perplexity_too_high": Margin("max_perplexity", "max", relative=True)},
        needs_model=True, cascade=80, family="model"),
    GateSpec(
        "pii", gate="refinery.gates.pii:PiiGate", params="refinery.gates.pii:PiiParams", section="pii",
        bounds=("email", "phone", "card", "min_phone_digits"),
        reasons={"pii_email": UNGROUNDED, "pii_phone": UNGROUNDED, "pii_card": UNGROUNDED},
        needs_model=False, cascade=40, family="heuristic"),
)

BY_NAME: dict[str, GateSpec] = {s.name: s for s in SPECS}
GATES: tuple[str, ...] = tuple(s.name for s in SPECS)
# Cascade order: the gates that need no model first, then the model gates from the cheapest per row (an embedding,
# a reward-head pass, a cross-encoder pass, a language-model pass over every token).
CASCADE: tuple[str, ...] = tuple(s.name for s in sorted(SPECS, key=lambda s: (s.needs_model, s.cascade)))
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SPECS))
REASONS: dict[str, Failure] = {code: f for s in SPECS for code, f in s.reasons.items()}
GATE_OF: dict[str, str] = {code: s.name for s in SPECS for code in s.reasons}


class UnknownReasonError(RefineryError):
    """A reason code that no gate declares (a gate gave a code missing from its registry entry)."""


def failure(code: str) -> Failure:
    """Return what reason ``code`` means for recovery.

    Raises:
        UnknownReasonError: no gate declares ``code``.
    """
    try:
        return REASONS[code]
    except KeyError:
        raise UnknownReasonError(f"reason code {code!r} is declared by no gate in refinery/gates/registry.py") from None


def family(name: Literal["heuristic", "model"]) -> tuple[str, ...]:
    """Return the gates of one family, in GATES order."""
    return tuple(s.name for s in SPECS if s.family == name)


def _check() -> None:
    """Fail at import on a registry that contradicts itself (a typo here would otherwise surface far away)."""
    if len(BY_NAME) != len(SPECS) or len(REASONS) != sum(len(s.reasons) for s in SPECS):
        raise ValueError("gate registry: a gate name or a reason code is declared twice")
    if len({s.cascade for s in SPECS}) != len(SPECS):
        raise ValueError("gate registry: two gates share a cascade rank")
    for s in SPECS:
        for code, f in s.reasons.items():
            if not code.startswith(s.name):
                raise ValueError(f"gate registry: {s.name}'s reason {code} does not start with the gate name")
            if f.mode not in FAILURE_MODES or (f.mode == "low_quality") != (f.dimension is not None):
                raise ValueError(f"gate registry: {code}: bad failure {f}")
        unknown = set(s.margins) - set(s.reasons)
        if unknown:
            raise ValueError(f"gate registry: {s.name} has a margin for undeclared reason {sorted(unknown)[0]}")
        if not s.gate.startswith("refinery.gates.") or s.module != s.params.split(":")[0]:
            raise ValueError(f"gate registry: {s.name}'s class and params model must sit in one refinery/gates module")
        if any(m.bound not in s.bounds for m in s.margins.values()):
            raise ValueError(f"gate registry: {s.name} measures a margin from a bound it does not declare")


_check()
