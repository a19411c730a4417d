"""Calibrate the quality gates' bounds, build the gates from them, and run them on rows: shared by gate and recover.

Which gates exist, their params sections, reason codes and cascade order come from :mod:`refinery.gates.registry`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, create_model

from refinery.core.errors import RefineryError
from refinery.core.params import StageParams
from refinery.gates.base import Gate, GateContext, Verdicts
from refinery.gates.registry import BY_NAME, CASCADE, GATES, SPECS

if TYPE_CHECKING:
    from refinery.engine.base import Engine, GateRecipe

# This module imports every registered gate's class and params model by the registry's dotted paths: their modules
# count as its imports in each stage's code fingerprint (refinery.core.codehash).
__resolves__ = "refinery.gates.registry"

FACTUAL = ("entity_swap", "number_change", "negation_flip", "unsupported_claim", "other_document")


class GateKnobs(StageParams):
    """The gate stage's own knobs (each gate's section is added from the registry: see :data:`GateParams`)."""

    batch_size: int = Field(gt=0)
    threads: int = Field(gt=0)
    mode: Literal["full", "cascade"] = "full"  # full: every verdict on every row; cascade: see run_gates


# Knobs of the gate stage: ``batch_size``, ``threads``, ``mode`` and one sub-section per registry section
# (``gate.rules``, ``gate.dedup``, ``gate.overlap``, ...), each validated by its gate's params model.
_SECTIONS = {s.section: s.params_model() for s in SPECS}
if any(s.params_model() is not _SECTIONS[s.section] for s in SPECS):
    raise ValueError("gate registry: gates that share a params section must share its params model")
GateParams = create_model("GateParams", __base__=GateKnobs, __module__=__name__,
                          **{section: (model, ...) for section, model in _SECTIONS.items()})
GateParams.__doc__ = "Knobs of the gate stage, one sub-section per gate section of the registry."


def compares_rows(name: str) -> bool:
    """Whether gate ``name`` compares rows with each other (dedup): its verdicts need the whole set in one call."""
    return bool(getattr(BY_NAME[name].gate_class(), "compares_rows", False))


@dataclass(frozen=True)
class GateRequest:
    """Rows to gate: in which mode, and split by which column (``injection_kind`` for planted rows) if any."""

    rows: pa.Table
    mode: str = "full"
    by: str | None = None


def run_gates(rows: pa.Table, gates: dict[str, Gate], mode: str = "full", *, engine: Engine | None = None,
              recipe: GateRecipe | None = None, by: str | None = None) -> pa.Table:
    """Apply the gates to the rows and append their columns, ``gate_keep`` and ``gate_reasons``.

    Args:
        rows: rows of the synthetic (or injected) contract.
        gates: name -> gate, for every name of ``schemas.gated.GATES``.
        mode: ``full``: every gate judges every row (every verdict is measured; reasons in GATES order).
            ``cascade``: gates run in ``CASCADE`` order and each judges only the rows every earlier gate
            kept, so a model scores a row at most once and never one already rejected; a gate's columns
            are null on rows it did not judge, and ``gate_reasons`` holds the one reason that stopped a row.
        engine: runs the gates that judge rows one by one, unit by unit (:mod:`refinery.engine`); None: one
            call per gate in this process. Gates that compare rows (dedup) always judge the whole set here.
        recipe: how the engine builds the gates elsewhere (the Ray engine needs it).
        by: judge each value of this column on its own (full mode only).

    Returns:
        ``rows`` with the gate columns (in GATES order); no row is dropped.
    """
    return gate_tables([GateRequest(rows, mode, by)], gates, engine=engine, recipe=recipe)[0]


def gate_tables(requests: list[GateRequest], gates: dict[str, Gate], *, engine: Engine | None = None,
                recipe: GateRecipe | None = None) -> list[pa.Table]:
    """Gate several tables in as few passes of the engine as the cascade allows.

    The cascade order is cut into runs of gates that judge rows one by one, split by the gates that compare rows
    (dedup, judged whole here). Each run is one engine pass over every cascade request's rows still standing
    (a cascade job: within a unit each gate judges the rows every earlier gate kept); the full-mode requests
    (every parallel gate on every row) join the last pass, the one with the model gates, so on the Ray engine
    the models are loaded by one pool of workers and the passes before it are light tasks.

    Returns:
        One gated table per request (see :func:`run_gates`).
    """
    from refinery.engine.base import GateJob, scatter, take, units
    from refinery.engine.local import LocalEngine

    engine = engine if engine is not None else LocalEngine(None, quiet=True)
    for r in requests:
        if r.mode not in ("full", "cascade"):
            raise ValueError(f"gate mode must be 'full' or 'cascade', got {r.mode!r}")
        if r.by is not None and r.mode != "full":
            raise ValueError("rows split by a column are gated in full mode only")
        if r.by is not None and r.by not in r.rows.column_names:
            raise RefineryError(f"gating by {r.by}: the table has no column {r.by}")

    def whole(name: str, rows: pa.Table, by: str | None) -> Verdicts:  # a gate that compares rows: whole groups
        return scatter(rows.num_rows, [(idx, gates[name].apply(take(rows, idx))) for idx in units(rows, None, by)])

    parallel = tuple(n for n in GATES if not compares_rows(n))
    full = [i for i, r in enumerate(requests) if r.mode == "full"]
    cascading = [i for i, r in enumerate(requests) if r.mode == "cascade"]
    results: dict[int, dict[str, tuple[np.ndarray, Verdicts]]] = {i: {} for i in range(len(requests))}
    standing = {i: np.ones(requests[i].rows.num_rows, bool) for i in cascading}
    runs = _runs(CASCADE) if cascading else [()]
    # (no run of row-by-row gates at all: the full-mode requests are judged gate by gate below, whole)
    last = max((k for k, run in enumerate(runs) if not (len(run) == 1 and compares_rows(run[0]))), default=-1)
    for k, run in enumerate(runs):
        if len(run) == 1 and compares_rows(run[0]):
            for i in cascading:
                idx = np.flatnonzero(standing[i])
                v = whole(run[0], take(requests[i].rows, idx), None) if len(idx) else Verdicts([], [], [])
                results[i][run[0]] = (idx, v)
                standing[i][idx] &= np.asarray(v.keep, bool)
            continue
        jobs, owners = [], []
        if k == last:
            jobs += [GateJob(requests[i].rows, parallel, requests[i].by) for i in full]
            owners += [(i, None) for i in full]
        for i in cascading if run else []:
            idx = np.flatnonzero(standing[i])
            jobs.append(GateJob(take(requests[i].rows, idx), run, cascade=True))
            owners.append((i, idx))
        for (i, idx), judged in zip(owners, engine.judge(jobs, gates, recipe) if jobs else []):
            for name, (local, v) in judged.items():
                at = local if idx is None else idx[local]
                results[i][name] = (at, v)
                if idx is not None:
                    standing[i][at] &= np.asarray(v.keep, bool)
    out = []
    for i, r in enumerate(requests):
        if r.mode == "full":
            every = np.arange(r.rows.num_rows)
            res = {name: results[i][name] if name in results[i] else (every, whole(name, r.rows, r.by))
                   for name in GATES}
            out.append(_assemble(r.rows, res, GATES))
        else:
            out.append(_assemble(r.rows, results[i], CASCADE))
    return out


def _runs(order: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Cut a gate order into runs of gates that judge rows one by one, each gate that compares rows on its own."""
    out: list[tuple[str, ...]] = []
    for name in order:
        if compares_rows(name):
            out.append((name,))
        elif out and not compares_rows(out[-1][0]):
            out[-1] += (name,)
        else:
            out.append((name,))
    return out


def _assemble(rows: pa.Table, results: dict[str, tuple[np.ndarray, Verdicts]], order: tuple[str, ...]) -> pa.Table:
    """Append every gate's columns (GATES order), ``gate_keep`` and ``gate_reasons`` (reasons in ``order``)."""
    n = rows.num_rows
    keep_all = np.ones(n, bool)
    reasons: list[list[str]] = [[] for _ in range(n)]
    columns: dict[str, dict[str, pa.Array]] = {}
    for name in order:
        idx, verdicts = results[name]
        keep: list[bool | None] = [None] * n
        score: list[float | None] = [None] * n
        reason: list[str | None] = [None] * n
        for j, i in enumerate(idx.tolist()):
            keep[i], score[i], reason[i] = verdicts.keep[j], verdicts.score[j], verdicts.reason[j]
            if verdicts.reason[j] is not None:
                reasons[i].append(verdicts.reason[j])
        keep_all[idx] &= np.asarray(verdicts.keep, bool)
        columns[name] = {f"{name}_keep": pa.array(keep, pa.bool_()), f"{name}_score": pa.array(score, pa.float64()),
                         f"{name}_reason": pa.array(reason, pa.string())}
    for name in GATES:
        for col, arr in columns[name].items():
            rows = rows.append_column(col, arr)
    rows = rows.append_column(pa.field("gate_keep", pa.bool_(), nullable=False), pa.array(keep_all, pa.bool_()))
    return rows.append_column(pa.field("gate_reasons", pa.list_(pa.string()), nullable=False),
                              pa.array(reasons, pa.list_(pa.string())))


def judged_rows(gated: pa.Table) -> dict[str, int]:
    """Rows each gate judged (its model's calls, for the model gates): all rows in full mode."""
    return {g: gated.num_rows - gated.column(f"{g}_keep").null_count for g in GATES}


def run_gates_by_kind(injected: pa.Table, gates: dict[str, Gate], *, engine: Engine | None = None,
                      recipe: GateRecipe | None = None) -> pa.Table:
    """Gate planted rows kind by kind, so a variant is never deduplicated against its twin from the same source."""
    return run_gates(injected, gates, "full", engine=engine, recipe=recipe, by="injection_kind")


def reason_counts(gated: pa.Table) -> dict[str, Any]:
    """Count rows kept and rejected, per first reason and per gate (a row may fail several gates)."""
    total = gated.num_rows
    kept = int(pc.sum(gated.column("gate_keep")).as_py() or 0) if total else 0
    first = Counter(r[0] for r in gated.column("gate_reasons").to_pylist() if r)
    every = Counter(x for r in gated.column("gate_reasons").to_pylist() for x in r)
    per_gate = {g: int(pc.sum(pc.invert(gated.column(f"{g}_keep"))).as_py() or 0) if total else 0 for g in GATES}
    return {"total": total, "kept": kept, "rejected": total - kept,
            **{f"dropped_{k}": v for k, v in sorted(first.items())},
            "rejected_by_gate": per_gate, "reasons_all": dict(sorted(every.items()))}


def strategy_pass_rates(gated: pa.Table) -> dict[str, Any]:
    """Per generation strategy: rows, rows kept by every gate, and the faithfulness gate's pass rate.

    ``parsed`` counts rows the teacher call returned and the parser read; ``faithfulness_pass_rate`` is over the
    parsed rows that gate judged (every parsed row in full mode); ``kept_share`` over all rows. Strategies whose
    answer must be verbatim source text (answer-first) also report ``contained``: their parsed rows that passed
    that check.
    """
    from refinery.gates.rules import VERBATIM_STRATEGIES

    cols = gated.select(["strategy", "gate_keep", "faithfulness_keep", "gate_reasons"]).to_pylist()
    out: dict[str, Any] = {}
    for name in sorted({r["strategy"] for r in cols if r["strategy"]}):
        sub = [r for r in cols if r["strategy"] == name]
        parsed = [r for r in sub if not {"rules_parse_error", "rules_transport_error"} & set(r["gate_reasons"])]
        judged = [r["faithfulness_keep"] for r in parsed if r["faithfulness_keep"] is not None]
        kept = sum(r["gate_keep"] for r in sub)
        out[name] = {"rows": len(sub), "parsed": len(parsed), "kept": kept,
                     "kept_share": round(kept / len(sub), 4),
                     "faithfulness_judged": len(judged),
                     "faithfulness_pass_rate": round(sum(judged) / len(judged), 4) if judged else None}
        if name in VERBATIM_STRATEGIES:
            out[name]["contained"] = sum("rules_answer_not_in_source" not in r["gate_reasons"] for r in parsed)
    return out


@dataclass
class Models:
    """Everything the model gates need, loaded once per stage."""

    verifier: Any
    reward: Any
    judge: Any  # backend with loglikelihood (perplexity gate, LLM judge)
    embedder: Any


def calibrate(params: Any, ctx: GateContext) -> dict[str, dict[str, Any]]:
    """Resolve every gate's bounds: params as set, null ones calibrated on ``ctx.calib`` (human val rows).

    The gate stage alone calibrates, and writes the result as ``data/04_gated/thresholds.json``; recovery reads it.

    Args:
        params: the gate stage's params (:data:`GateParams`).
        ctx: train, documents, calibration rows and the loaded models.

    Returns:
        ``{gate: {bound: value}}`` for every gate of GATES, each with the names its registry entry declares.
    """
    out = {}
    for s in SPECS:
        bounds = s.gate_class().calibrate(getattr(params, s.section), ctx)
        if set(bounds) != set(s.bounds):
            raise ValueError(f"gate {s.name}: calibrate returned {sorted(bounds)}, the registry declares "
                             f"{sorted(s.bounds)}")
        out[s.name] = {k: bounds[k] for k in s.bounds}
    return out


def build_gates(thresholds: dict[str, dict[str, Any]], ctx: GateContext) -> dict[str, Gate]:
    """Build every gate from its resolved bounds (as :func:`calibrate` returned them) and the context.

    Args:
        thresholds: ``{gate: {bound: value}}`` (thresholds.json, validated by ``schemas.thresholds``).
        ctx: train (the seed of dedup and overlap), documents, the loaded models, the cache folder.

    Returns:
        The gates by name, in GATES order.
    """
    return {s.name: s.gate_class().build(thresholds[s.name], ctx) for s in SPECS}


def compare_modes(injected_gated: pa.Table, gates: dict[str, Gate], documents: pa.Table, models: Models,
                  target_frr: float, *, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Score planted rows in grounded, retrieved and ungrounded modes, for two judges, at equal FRR.

    Both the trained verifier and the LLM judge score the same planted rows in the three evidence modes (the
    provenance claim is that the exact source passage helps judges, the stronger ones most). Each mode's
    threshold keeps the clean controls' false rejections at ``target_frr``; recall on the factual errors
    carries a 95% Wilson interval, and the differences grounded - retrieved and grounded - ungrounded a
    paired bootstrap interval over the planted rows (thresholds re-picked in every resample).

    Returns:
        ``{mode: {...}}`` for the configured judge (as before), ``judge`` (its name), and ``by_judge``:
        ``{verifier|llm: {modes: {mode: {...}}, differences: {name: {mean, low, high}}}}``.
    """
    from refinery.gates.faithfulness import MODES, FaithfulnessGate, LLMJudge, PassageRetriever
    from refinery.planted.measure import recall_at_frr, wilson

    kinds = np.asarray(injected_gated.column("injection_kind").to_pylist())
    measured = np.flatnonzero((kinds == "clean") | np.isin(kinds, FACTUAL))  # only these rows enter the figures
    injected_gated, kinds = injected_gated.take(pa.array(measured, pa.int64())), kinds[measured]
    clean, factual = kinds == "clean", np.isin(kinds, FACTUAL)
    configured = gates["faithfulness"].scorer
    judges = {"verifier": models.verifier, "llm": LLMJudge(models.judge)}
    name_of = next((n for n, j in judges.items() if j is configured), None)
    if name_of is None:  # the configured judge is an LLM judge built by build_gates
        name_of = "llm" if isinstance(configured, LLMJudge) else "verifier"
        judges[name_of] = configured
    rng = np.random.default_rng(seed)
    draws = [(rng.integers(0, clean.sum(), clean.sum()), rng.integers(0, factual.sum(), factual.sum()))
             for _ in range(bootstrap)] if clean.any() and factual.any() else []
    by_judge: dict[str, Any] = {}
    for judge_name, scorer in judges.items():
        modes, support_by_mode = {}, {}
        for mode in MODES:
            retriever = PassageRetriever(documents, models.embedder) if mode == "retrieved" else None
            support, _ = FaithfulnessGate(scorer, documents, mode=mode, retriever=retriever).scores(injected_gated)
            support_by_mode[mode] = support
            threshold, recall, frr = recall_at_frr(support[clean], support[factual], target_frr)
            per_kind = {k: round(float(np.mean(np.nan_to_num(support[kinds == k], nan=-1.0) < threshold)), 4)
                        for k in FACTUAL if (kinds == k).any()}
            hits = int(round(recall * factual.sum()))
            # the clean-control count is the resolution of the false-rejection rate (20 controls: steps of 0.05)
            modes[mode] = {"threshold": round(float(threshold), 4), "recall_factual": round(float(recall), 4),
                           "recall_ci95": wilson(hits, int(factual.sum())), "false_rejection": round(float(frr), 4),
                           "recall_per_kind": per_kind, "clean_controls": int(clean.sum()),
                           "factual_rows": int(factual.sum())}
        diffs = {}
        for other in ("retrieved", "ungrounded"):
            g, o = support_by_mode["grounded"], support_by_mode[other]
            gc, gf, oc, of = g[clean], g[factual], o[clean], o[factual]
            boot = [recall_at_frr(gc[ci], gf[fi], target_frr)[1] - recall_at_frr(oc[ci], of[fi], target_frr)[1]
                    for ci, fi in draws]
            point = modes["grounded"]["recall_factual"] - modes[other]["recall_factual"]
            diffs[f"grounded_minus_{other}"] = {
                "mean": round(float(point), 4),
                "low": round(float(np.quantile(boot, 0.025)), 4) if boot else None,
                "high": round(float(np.quantile(boot, 0.975)), 4) if boot else None}
        by_judge[judge_name] = {"modes": modes, "differences": diffs}
    return {**by_judge[name_of]["modes"], "judge": name_of, "by_judge": by_judge}


@dataclass(frozen=True)
class ModelLoader:
    """Where the gates' models come from, picklable, so a Ray worker loads the very models the driver would.

    Attributes:
        params: the gate stage's params (judge and model choices, batch size, threads).
        models_dir, verifier_dir, reward_dir: the provisioned base models and the trained heads (absolute paths
            when the loader travels to other machines).
        cache_dir: the signature and embedding cache.
        embed_shards: the embedding cache's shard files to read (``with_frozen_cache``), so every embedding call
            depends only on its own texts and what was cached when the stage started; None: the embedder reads
            its whole cache and reuses what it computed earlier in the run.
    """

    params: Any
    models_dir: str
    verifier_dir: str
    reward_dir: str
    cache_dir: str | None
    embed_shards: tuple[str, ...] | None = None

    def __call__(self) -> LazyModels:
        """Return the models, each loaded on first use."""
        return LazyModels(self)

    def embedder(self) -> Any:
        """Build the embedder (its model loads on the first text it has to embed)."""
        from refinery.models.embed import Embedder
        from refinery.models.resolve import load_target

        embed = load_target(self.models_dir, "embedder")
        base = Embedder(embed["path"], cache_dir=self.cache_dir, model_id=embed["id"], threads=self.params.threads)
        if self.embed_shards is None:
            return base
        from refinery.engine.embed import FrozenCacheEmbedder

        return FrozenCacheEmbedder(base, self.embed_shards)

    def with_frozen_cache(self) -> ModelLoader:
        """Return this loader reading only the embedding cache shards on disk now."""
        from dataclasses import replace

        from refinery.engine.embed import FrozenCacheEmbedder

        base = self.embedder()
        return replace(self, embed_shards=FrozenCacheEmbedder.shards_of(getattr(base, "base", base)))


class LazyModels:
    """The verifier, reward model, judge backend and embedder of the gates (:class:`Models`), each loaded once, on
    first use: a process that runs only some gates (a Ray worker) loads only their models."""

    def __init__(self, loader: ModelLoader):
        self.loader = loader
        self._loaded: dict[str, Any] = {}

    def _get(self, name: str, build: Any) -> Any:
        if name not in self._loaded:
            self._loaded[name] = build()
        return self._loaded[name]

    @property
    def threads(self) -> int:
        return self.loader.params.threads

    @property
    def judge(self) -> Any:
        def build():
            from refinery.models.backends.factory import make_backend
            from refinery.models.resolve import backend_spec, load_target

            return make_backend(backend_spec(load_target(self.loader.models_dir, "judge"),
                                             batch_size=self.loader.params.batch_size, threads=self.threads))
        return self._get("judge", build)

    @property
    def embedder(self) -> Any:
        return self._get("embedder", self.loader.embedder)

    @property
    def verifier(self) -> Any:
        def build():
            from refinery.models.verifier import load_verifier

            p = self.loader.params
            ref = self.loader.verifier_dir if p.faithfulness.verifier == "trained" else p.faithfulness.verifier
            return load_verifier(ref, batch_size=p.batch_size, threads=self.threads, judge=self.judge,
                                 embedder=self.embedder)
        return self._get("verifier", build)

    @property
    def reward(self) -> Any:
        def build():
            from refinery.models.reward import load_reward

            p = self.loader.params
            ref = self.loader.reward_dir if p.reward.model == "trained" else p.reward.model
            return load_reward(ref, batch_size=p.batch_size, threads=self.threads)
        return self._get("reward", build)


def load_models(params: GateParams, models_dir: str, verifier_dir: str, reward_dir: str, cache_dir: Path, *,
                frozen_cache: bool = False) -> LazyModels:
    """Return the verifier, reward model, judge backend and embedder for the stage, each loaded once on first use.

    Args:
        frozen_cache: embed as :class:`refinery.engine.embed.FrozenCacheEmbedder` does (the gate stage: so its
            verdicts do not depend on which engine, worker or unit embedded a text first).
    """
    loader = ModelLoader(params, str(models_dir), str(verifier_dir), str(reward_dir),
                         str(cache_dir) if cache_dir is not None else None)
    return (loader.with_frozen_cache() if frozen_cache else loader)()


@dataclass(frozen=True)
class GivenModels:
    """A model factory returning models already built (test doubles): pickled whole to where they are used."""

    models: Any

    def __call__(self) -> Any:
        return self.models


def model_factory(models: Any) -> Any:
    """Return a picklable factory of ``models`` for a :class:`GateRecipe`: their loader where they came from
    :func:`load_models`, else the models themselves."""
    loader = getattr(models, "loader", None)
    return loader if isinstance(loader, ModelLoader) else GivenModels(models)


@dataclass(frozen=True)
class GateRecipe:
    """How to build the gates in any process: their resolved bounds, the data they compare with, their models.

    Picklable (Arrow tables, a :class:`ModelLoader`), so the Ray engine's workers build the very gates the driver
    builds with :func:`build_gates`.

    Attributes:
        thresholds: ``{gate: {bound: value}}`` (thresholds.json).
        train, documents: the seed and documents (:class:`refinery.gates.base.GateContext`).
        models: a factory of the models (``ModelLoader``), called only where a gate needs one.
        cache_dir: the signature and embedding cache.
    """

    thresholds: dict[str, dict[str, Any]]
    train: pa.Table
    documents: pa.Table
    models: Any
    cache_dir: str | None

    def needs_model(self, names: Any) -> bool:
        """Whether any of the named gates scores rows with a model."""
        return any(BY_NAME[n].needs_model for n in names)

    def build(self, names: Any, models: Any = None) -> dict[str, Gate]:
        """Build the named gates in this process, with ``models`` or, where a gate needs one, models of their own."""
        if models is None and self.models is not None and self.needs_model(names):
            models = self.models()
        ctx = GateContext(self.train, self.documents, models, Path(self.cache_dir) if self.cache_dir else None)
        return {n: BY_NAME[n].gate_class().build(self.thresholds[n], ctx) for n in names}
