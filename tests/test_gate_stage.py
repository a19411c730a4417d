"""Gate stage core: every gate's verdict on every row, planted rows gated per kind, counts."""

from __future__ import annotations

import pyarrow as pa
import pytest

from refinery.gates.base import Verdicts
from schemas.gated import GATES
from stages.gate import reason_counts, run_gates, run_gates_by_kind


class Rejects:
    """A gate double that rejects rows whose answer contains ``word``; it records how many rows it saw at once."""

    def __init__(self, name, word):
        self.name, self.word, self.batches = name, word, []

    def apply(self, rows):
        self.batches.append(rows.num_rows)
        answers = rows.column("answer").to_pylist()
        keep = [self.word not in (a or "") for a in answers]
        return Verdicts(keep, [0.0] * len(keep), [None if k else f"{self.name}_hit" for k in keep])


def doubles():
    return {g: Rejects(g, f"<{g}>") for g in GATES}


def test_every_gate_judges_every_row_and_all_reasons_are_kept():
    rows = pa.table({"answer": ["fine", "<rules> and <reward>", "<perplexity>"]})
    out = run_gates(rows, doubles())
    assert out.column("gate_keep").to_pylist() == [True, False, False]
    assert out.column("gate_reasons").to_pylist() == [[], ["rules_hit", "reward_hit"], ["perplexity_hit"]]
    assert out.column("reward_keep").to_pylist() == [True, False, True]  # not only the first failing gate
    counts = reason_counts(out)
    assert counts["total"] == 3 and counts["kept"] == 1
    assert counts["dropped_rules_hit"] == 1 and counts["dropped_perplexity_hit"] == 1
    assert counts["reasons_all"] == {"perplexity_hit": 1, "reward_hit": 1, "rules_hit": 1}
    assert counts["rejected_by_gate"]["reward"] == 1


def test_planted_rows_are_gated_one_kind_at_a_time_and_keep_their_order():
    gates = doubles()
    rows = pa.table({"answer": ["a", "b <dedup>", "c", "d"], "injection_kind": ["clean", "dup", "clean", "dup"]})
    out = run_gates_by_kind(rows, gates)
    assert out.column("answer").to_pylist() == ["a", "b <dedup>", "c", "d"]
    assert gates["dedup"].batches == [2, 2]  # one pass per kind
    assert out.column("gate_keep").to_pylist() == [True, False, True, True]


def test_empty_input_gives_empty_output_with_gate_columns():
    out = run_gates(pa.table({"answer": pa.array([], pa.string())}), doubles())
    assert out.num_rows == 0 and "faithfulness_reason" in out.column_names
    assert reason_counts(out)["total"] == 0


def test_cascade_judges_each_row_only_while_it_stands_and_models_never_see_rejected_rows():
    # given rows that the rules gate, the reward gate and nothing reject
    gates = doubles()
    rows = pa.table({"answer": ["fine", "<rules> <faithfulness>", "<reward> <perplexity>", "also fine"]})
    # when gated in cascade mode
    out = run_gates(rows, gates, "cascade")
    # then each gate saw only the rows every earlier gate kept (CASCADE order), and verdicts it never gave are null
    from refinery.gates.run import CASCADE, judged_rows

    assert CASCADE.index("reward") < CASCADE.index("faithfulness") < CASCADE.index("perplexity")
    assert gates["rules"].batches == [4] and gates["reward"].batches == [3]
    assert gates["faithfulness"].batches == [2] and gates["perplexity"].batches == [2]
    assert out.column("faithfulness_keep").to_pylist() == [True, None, None, True]
    assert out.column("gate_keep").to_pylist() == [True, False, False, True]
    assert out.column("gate_reasons").to_pylist() == [[], ["rules_hit"], ["reward_hit"], []]
    assert judged_rows(out)["perplexity"] == 2 and judged_rows(out)["rules"] == 4
    counts = reason_counts(out)
    assert counts["rejected_by_gate"]["faithfulness"] == 0 and counts["rejected_by_gate"]["rules"] == 1
    # and full mode still gives every verdict on every row, with the same keep decisions
    full = run_gates(rows, doubles(), "full")
    assert full.column("gate_keep").to_pylist() == out.column("gate_keep").to_pylist()
    assert full.column("faithfulness_keep").null_count == 0


# ---- thresholds.json: calibrated once by the gate stage, then every gate is built from exactly those bounds ----

class Counting:
    """Model doubles that count their calls: a verifier with a calibrated threshold, a reward head, a judge LM."""

    def __init__(self):
        import numpy as np

        from refinery.models.backends.fake import FakeBackend
        from tests.gates.test_overlap import BagOfWordsEmbedder

        self.np, self.calls, self.threshold = np, {"verifier": 0, "reward": 0, "judge": 0}, 0.42
        self._judge, self.embedder = FakeBackend(), BagOfWordsEmbedder()

    def score(self, a, b):  # verifier support and reward alike: one value per pair
        return self.np.linspace(0.1, 0.9, len(a))

    def models(self):
        from refinery.gates.run import Models

        outer = self

        class Verifier:
            threshold = outer.threshold

            def score(self, passages, claims):
                outer.calls["verifier"] += 1
                return outer.score(passages, claims)

        class Reward:
            def score(self, questions, answers):
                outer.calls["reward"] += 1
                return outer.score(questions, answers)

        class Judge:
            def loglikelihood(self, contexts, continuations):
                outer.calls["judge"] += 1
                return outer._judge.loglikelihood(contexts, continuations)

        return Models(verifier=Verifier(), reward=Reward(), judge=Judge(), embedder=self.embedder)


def _ctx(models, calib=None):
    from refinery.gates.base import GateContext
    from tests.gates.conftest import rows, seed_rows

    train = seed_rows([("How long do refunds take?", "Within 14 days of the request.")])
    documents = pa.table({"doc_id": ["d1"], "text": ["Refunds are issued within 14 days."]})
    calib = calib if calib is not None else rows([(f"Question {i} about refunds?", f"Refunds take {i} days here.")
                                                  for i in range(20)])
    return GateContext(train, documents, models, None, calib=calib)


def _params(**sections):
    import yaml

    from refinery.gates.run import GateParams
    from tests.conftest import ROOT

    gate = yaml.safe_load((ROOT / "params.yaml").read_text())["gate"]
    for name, values in sections.items():
        gate[name] = {**gate[name], **values}
    return GateParams.model_validate(gate)


def test_calibration_resolves_every_declared_bound_and_null_ones_from_the_human_rows():
    import numpy as np

    from refinery.gates.registry import SPECS
    from refinery.gates.run import calibrate
    from schemas.thresholds import validate

    doubles = Counting()
    ctx = _ctx(doubles.models())
    thresholds = validate(calibrate(_params(), ctx), "calibrated")  # the demo params: three bounds are null
    assert {g: set(b) for g, b in thresholds.items()} == {s.name: set(s.bounds) for s in SPECS}
    assert thresholds["faithfulness"]["min_support"] == doubles.threshold  # the verifier's calibrated threshold
    rewards = doubles.score(range(20), range(20))
    assert thresholds["reward"]["min_reward"] == float(np.quantile(rewards, 0.05))  # reward.human_quantile
    assert thresholds["perplexity"]["max_perplexity"] > thresholds["perplexity"]["min_perplexity"]
    assert thresholds["dedup"] == {"max_jaccard": 0.55, "num_perm": 128, "shingle": 5}  # params as set
    # a bound set in params is used as is, and nothing is scored for it
    doubles.calls = dict.fromkeys(doubles.calls, 0)
    fixed = calibrate(_params(reward={"min_reward": 0.3}, perplexity={"max_perplexity": 250.0},
                              faithfulness={"min_support": 0.6}), ctx)
    assert (fixed["reward"], fixed["perplexity"]["max_perplexity"], fixed["faithfulness"]["min_support"]) == \
        ({"min_reward": 0.3}, 250.0, 0.6)
    assert doubles.calls == {"verifier": 0, "reward": 0, "judge": 0}


def test_gates_built_from_the_written_thresholds_use_exactly_them_and_building_scores_nothing(tmp_path):
    import json

    from refinery.gates.run import build_gates, calibrate
    from schemas.thresholds import validate

    # given thresholds calibrated by the gate stage and written to thresholds.json
    doubles = Counting()
    written = calibrate(_params(), _ctx(doubles.models()))
    (tmp_path / "thresholds.json").write_text(json.dumps(written))
    # when recovery reads the file and builds its gates (no calibration rows at all)
    doubles.calls = dict.fromkeys(doubles.calls, 0)
    read = validate(json.loads((tmp_path / "thresholds.json").read_text()), "thresholds.json")
    gates = build_gates(read, _ctx(doubles.models(), calib=pa.table({})))
    # then every gate holds the written bound to the last bit, and no model scored anything to get there
    assert read == written
    assert gates["reward"].min_reward == written["reward"]["min_reward"]
    assert gates["perplexity"].max_perplexity == written["perplexity"]["max_perplexity"]
    assert gates["faithfulness"].min_support == written["faithfulness"]["min_support"]
    assert gates["overlap_embedding"].max_cosine == written["overlap_embedding"]["max_cosine"]
    assert gates["overlap_ngram"].max_ngram_overlap == written["overlap_ngram"]["max_ngram_overlap"]
    assert gates["dedup"].max_jaccard == written["dedup"]["max_jaccard"]
    assert gates["rules"].max_qa_words == written["rules"]["max_qa_words"]
    assert doubles.calls == {"verifier": 0, "reward": 0, "judge": 0}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("rules"), "thresholds.json: field 'rules': no thresholds for this gate"),
    (lambda t: t["reward"].pop("min_reward"), "thresholds.json: field 'reward.min_reward': missing"),
    (lambda t: t["reward"].update(human_quantile=0.05), "field 'reward.human_quantile': not a bound gate reward"),
    (lambda t: t["perplexity"].update(max_perplexity=float("nan")), "field 'perplexity.max_perplexity': expected a"),
    (lambda t: t.update(spam={}), "field 'spam': not a gate"),
])
def test_a_thresholds_file_that_does_not_match_the_registry_is_a_one_line_error(change, message):
    import copy

    from refinery.core.errors import InputError
    from refinery.gates.run import calibrate
    from schemas.thresholds import validate

    thresholds = copy.deepcopy(calibrate(_params(), _ctx(Counting().models())))
    change(thresholds)
    with pytest.raises(InputError, match=message):
        validate(thresholds, "thresholds.json")


def test_gate_cli_paths_are_required_and_every_option_is_explained():
    from click.testing import CliRunner

    from stages.gate import cli

    assert all(o.help for o in cli.params if o.name != "help")
    paths = [o for o in cli.params if o.name not in ("params_file", "help")]
    assert paths and all(o.required and o.to_info_dict()["default"] is None for o in paths)
    result = CliRunner().invoke(cli, ["--params", "params.yaml"])
    assert result.exit_code == 2 and "Missing option" in result.output
