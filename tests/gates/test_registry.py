"""The gate registry: one declaration per gate that the schema, params, cascade, recovery and report all read."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from refinery.core.params import StageParams
from refinery.gates import registry
from refinery.gates.base import BaseGate
from refinery.gates.registry import BY_NAME, CASCADE, GATES, SPECS, UnknownReasonError, failure
from tests.conftest import ROOT


def test_the_gates_that_existed_keep_their_order_a_new_gate_comes_after_them():
    # the gated Parquet columns and the order of gate_reasons follow GATES: existing outputs keep their layout
    assert GATES[:7] == ("rules", "dedup", "overlap_ngram", "overlap_embedding", "faithfulness", "reward",
                         "perplexity")


def test_the_cascade_runs_every_gate_without_a_model_before_any_model_gate():
    first_model = min(CASCADE.index(s.name) for s in SPECS if s.needs_model)
    assert all(CASCADE.index(s.name) < first_model for s in SPECS if not s.needs_model)
    # the model gates go from the cheapest per row: embedding, reward head, cross-encoder, language model
    assert [g for g in CASCADE if BY_NAME[g].needs_model] == ["overlap_embedding", "reward", "faithfulness",
                                                               "perplexity"]
    assert CASCADE[:3] == ("rules", "dedup", "overlap_ngram")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_entry_names_a_gate_class_and_params_model_that_agree_with_it(spec):
    cls, model = spec.gate_class(), spec.params_model()
    assert issubclass(cls, BaseGate) and cls.name == spec.name
    assert issubclass(model, StageParams)
    # a gate that calls a model fails closed, and its failure code is declared
    assert cls.fail_closed == spec.needs_model
    if cls.fail_closed:
        assert f"{spec.name}_error" in spec.reasons
    # every margin is measured from a bound the gate records in thresholds.json
    assert all(m.bound in spec.bounds for m in spec.margins.values())


def test_reason_codes_match_the_codes_the_gate_modules_give():
    from refinery.gates import dedup, rules

    assert tuple(BY_NAME["rules"].reasons) == rules.REASONS  # same codes, same priority order
    assert tuple(BY_NAME["dedup"].reasons) == dedup.REASONS + ("dedup_exact_accepted", "dedup_near_accepted")


def test_an_unknown_reason_code_is_an_error():
    assert failure("reward_low").mode == "low_quality"
    with pytest.raises(UnknownReasonError, match="reason code 'reward_too_kind' is declared by no gate"):
        failure("reward_too_kind")


def test_every_gate_belongs_to_one_report_family():
    assert sorted(registry.family("heuristic") + registry.family("model")) == sorted(GATES)
    assert "rules" in registry.family("heuristic") and "faithfulness" in registry.family("model")


def test_the_gate_params_have_one_section_per_registry_section_and_the_project_params_validate():
    from refinery.gates.run import GateParams

    gate = yaml.safe_load((ROOT / "params.yaml").read_text())["gate"]
    assert set(registry.SECTIONS) <= set(GateParams.model_fields)
    assert set(gate) == set(GateParams.model_fields)
    GateParams.model_validate(gate)


def test_the_registry_imports_no_gate_module_and_nothing_heavy():
    code = ("import sys; import refinery.gates.registry, schemas.gated; "
            "print(sorted(m for m in sys.modules if m.startswith('refinery.gates.') or m.split('.')[0] in "
            "('torch', 'transformers', 'sentence_transformers', 'great_expectations', 'rensa')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['refinery.gates.registry']"


def test_the_stages_that_build_gates_fingerprint_every_registered_gate_module():
    # the registry names gate classes by dotted path (so the schema and the report do not depend on gate code);
    # refinery.gates.run imports them by those paths and says so (__resolves__), so every stage that builds gates
    # has every gate module in its code fingerprint, and a stage that only reads the schema has none
    from refinery.core.codehash import closure

    for stage in ("gate", "recover"):
        found = closure(f"stages.{stage}", ROOT)
        assert "refinery.gates.run" in found
        assert {spec.module for spec in SPECS} <= found, stage
        assert {spec.params.split(":")[0] for spec in SPECS} <= found, stage
    assert not {spec.module for spec in SPECS if spec.module != "refinery.gates.dedup"} & closure("stages.report",
                                                                                                    ROOT)
