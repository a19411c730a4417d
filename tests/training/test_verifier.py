"""Verifier: pair building, loaders (our head, HF NLI, cross-encoder), a tiny training run and the stage command."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from refinery.core.errors import InputError, ModelResolutionError, RefineryError
from refinery.models.claims import claim_text, split_claim
from refinery.models.verifier import load_verifier, passage_windows, roc_auc, threshold_for_frr, train_verifier
from stages.train_verifier import PAIRS_ARROW, TrainVerifierParams, build_pairs, evaluate, train_verifier_core
from tests.training.conftest import as_split

PARAMS = dict(seed=3, epochs=3, lr=3e-3, batch_size=8, max_length=64, negatives_per_positive=2, counterfactual=True,
              max_train_pairs=None, trainable_layers=2, snli_path=None, snli_max_pairs=0,
              target_false_rejection=0.1, threads=1)


def test_build_pairs_balances_clean_and_corrupted_rows(seed_tables):
    documents, qa = seed_tables
    # when pairs are built from nine seed rows with two negatives each and counterfactuals
    pairs = build_pairs(qa, documents, seed=0, negatives_per_positive=2, counterfactual=True)
    # then every row has a clean pair, and every label has rows of both classes
    assert pairs.schema == PAIRS_ARROW
    kinds = pairs.column("kind").to_pylist()
    assert kinds.count("clean") == qa.num_rows
    labels = pairs.column("label").to_pylist()
    assert 0.35 < sum(labels) / len(labels) < 0.65
    assert set(kinds) - {"clean", "passage_sentence", "counterfactual"} <= {
        "entity_swap", "number_change", "negation_flip", "unsupported_claim", "other_document"}
    # a counterfactual claim is supported by the edited passage and not by the original
    rows = pairs.to_pylist()
    cf = next(r for r in rows if r["kind"] == "counterfactual")
    twin = next(r for r in rows if r["claim"] == cf["claim"] and r["label"] == 0.0)
    assert cf["claim"] in cf["passage"] and cf["claim"] not in twin["passage"]
    # and the same seed gives the same table
    assert build_pairs(qa, documents, seed=0, negatives_per_positive=2, counterfactual=True).equals(pairs)


def test_unseen_kinds_never_reach_the_training_pairs_but_stay_in_val(tmp_path, seed_tables, tiny_bert):
    # given negation flips and other-document answers held out (leave-families-out)
    documents, qa = seed_tables
    unseen = ("negation_flip", "other_document")
    result = train_verifier_core(qa, qa, documents, TrainVerifierParams(**{**PARAMS, "counterfactual": True}),
                                 str(tiny_bert), tmp_path / "v", unseen_kinds=unseen)
    # then no training pair is of those kinds, nor a counterfactual edited by a negation ...
    train_kinds = set(result.train_pairs.column("kind").to_pylist())
    details = result.train_pairs.column("detail").to_pylist()
    assert not train_kinds & set(unseen) and "negation_flip" not in details
    assert {"entity_swap", "number_change"} & train_kinds
    # ... while the val pairs that measure the verifier still hold them
    assert set(unseen) & set(result.val_pairs.column("kind").to_pylist())
    assert result.metrics["unseen_kinds"] == list(unseen)


def test_build_pairs_names_a_missing_column(seed_tables):
    documents, qa = seed_tables
    with pytest.raises(InputError, match="missing column.*evidence"):
        build_pairs(qa.drop_columns(["evidence"]), documents, seed=0, negatives_per_positive=1,
                    counterfactual=False, where="train.parquet")


def test_passage_windows_and_threshold_helpers():
    long = "One is here. Two is there. Three is far."
    assert passage_windows(long, full_max_chars=1000) == [long]
    assert passage_windows(long, full_max_chars=10) == ["One is here. Two is there.", "Two is there. Three is far."]
    # at most 10% of clean rows (1 of 10) score below the threshold
    clean = np.linspace(0.1, 1.0, 10)
    t = threshold_for_frr(clean, 0.1)
    assert (clean < t).sum() == 1
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.8]) == pytest.approx(0.875)


def test_one_claim_format_for_training_and_gating(seed_tables):
    # given the claim format: question then answer, each stripped; no answer makes no claim
    assert claim_text("Q?", " A. ") == "Q? A." and claim_text(None, "A.") == "A." and claim_text(" ", "A.") == "A."
    assert claim_text("Q?", "") == claim_text("Q?", "  ") == claim_text("Q?", None) == claim_text(None, None) == ""
    assert split_claim(claim_text(" How long? ", " 14 days. ")) == ("How long?", "14 days.")
    # when the verifier's training pairs and the faithfulness gate build claims from the same seed rows
    from refinery.gates.faithfulness import FaithfulnessGate

    documents, qa = seed_tables
    pairs = build_pairs(qa, documents, seed=0, negatives_per_positive=1, counterfactual=False)
    clean = [(p, c) for p, c, k in zip(*(pairs.column(x).to_pylist() for x in ("passage", "claim", "kind")))
             if k == "clean"]
    seen: list[tuple[str, str]] = []

    class Recorder:
        def score(self, passages, claims):
            seen.extend(zip(passages, claims))
            return np.ones(len(claims))

    FaithfulnessGate(Recorder(), documents, mode="grounded").apply(qa)
    # then the gate scores exactly the (passage, claim) pairs the verifier was trained on as supported
    assert len(clean) == qa.num_rows and seen == clean


class OverlapVerifier:
    """Test double: support = share of claim words found in the passage."""

    name, threshold = "overlap", None

    def score(self, passages, claims):
        out = []
        for p, c in zip(passages, claims):
            words = set(c.lower().split())
            out.append(len(words & set(p.lower().split())) / max(len(words), 1))
        return np.asarray(out)


def test_evaluate_picks_the_threshold_for_the_target_false_rejection(seed_tables):
    documents, qa = seed_tables
    val = build_pairs(qa, documents, seed=1, negatives_per_positive=5, counterfactual=False,
                      sentence_positives=False)
    threshold, m = evaluate(OverlapVerifier(), val, 0.2)
    assert m["false_rejection"] <= 0.2 and m["clean"] == qa.num_rows
    assert set(m["recall_per_kind"]) <= {"entity_swap", "number_change", "negation_flip", "unsupported_claim",
                                         "other_document"}
    assert 0 <= m["auc"] <= 1 and m["threshold"] == round(threshold, 6)


def test_tiny_training_lowers_the_loss_and_reloads(tmp_path, seed_tables, tiny_bert):
    documents, qa = seed_tables
    pairs = build_pairs(qa, documents, seed=0, negatives_per_positive=1, counterfactual=False)
    # when a tiny BERT is trained a few epochs on the pairs
    m = train_verifier(pairs, tiny_bert, tmp_path / "v", epochs=6, lr=3e-3, batch_size=8, seed=0, max_length=64,
                       threads=1, trainable_layers=2)
    # then the loss goes down and the folder reloads as a one-logit verifier scoring in [0, 1]
    assert m["loss_per_epoch"][-1] < m["loss_per_epoch"][0]
    v = load_verifier(tmp_path / "v")
    assert v.mode == "single"
    scores = v.score(pairs.column("passage").to_pylist(), pairs.column("claim").to_pylist())
    assert scores.shape == (pairs.num_rows,) and np.all((scores >= 0) & (scores <= 1))
    # empty input is NaN, never a made-up score
    assert np.isnan(v.score(["", "text"], ["claim", ""])).all()


def test_hf_nli_model_uses_its_entailment_column(tiny_nli):
    import torch

    v = load_verifier(tiny_nli)
    assert v.mode == "nli" and v.entail_index == 2
    passages, claims = ["refunds take 14 days."] * 2, ["refunds take 14 days.", "refunds take 3 days."]
    enc = v.tokenizer(passages, claims, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(v.model(**enc).logits, -1)[:, 2].numpy()
    np.testing.assert_allclose(v.score(passages, claims), expected, rtol=1e-5)


def test_model_without_an_entailment_label_is_refused(tmp_path, tiny_bert):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_bert, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "m")
    with pytest.raises(ModelResolutionError, match="none names entailment"):
        load_verifier(tmp_path / "m")
    with pytest.raises(ModelResolutionError, match="cannot load"):
        load_verifier(tmp_path / "absent")


def test_stage_core_is_deterministic(tmp_path, seed_tables, tiny_bert):
    documents, qa = seed_tables
    params = TrainVerifierParams(**PARAMS)
    a = train_verifier_core(qa, qa, documents, params, str(tiny_bert), tmp_path / "a")
    b = train_verifier_core(qa, qa, documents, params, str(tiny_bert), tmp_path / "b")
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(a.metrics["val"]) == drop(b.metrics["val"])
    assert a.metrics["train"]["loss_per_epoch"] == b.metrics["train"]["loss_per_epoch"]
    assert a.threshold == b.threshold


class _Judge:
    """A judge double whose answer-token log-probs fall with the share of the answer's words not in the passage."""

    def token_logprobs(self, contexts, continuations):
        out = []
        for ctx, cont in zip(contexts, continuations):
            passage = ctx.split("\nQuestion:")[0].lower()
            out.append(np.array([-0.5 if w.strip(".,?").lower() in passage else -6.0 for w in cont.split()]))
        return out

    def token_offsets(self, continuations):
        import re

        return [[m.span() for m in re.finditer(r"\S+", c)] for c in continuations]


class _Embedder:
    """Embeds a text as the unit vector of its length bucket (a stand-in with real cosines in [0, 1])."""

    def embed(self, texts):
        out = np.zeros((len(texts), 4))
        out[np.arange(len(texts)), [min(3, len(t) // 25) for t in texts]] = 1.0
        return out


def test_stage_core_fits_the_combiner_with_the_judges_likelihood_features(tmp_path, seed_tables, tiny_bert):
    from refinery.models.grounding.features import EMBEDDING_FEATURES, FEATURES, LIKELIHOOD_FEATURES
    from refinery.models.grounding.scorer import Combiner

    documents, qa = seed_tables
    params = TrainVerifierParams(**{**PARAMS, "epochs": 1, "lexical_combiner": True, "likelihood_features": True,
                                    "combiner_holdout": 0.4})
    result = train_verifier_core(qa, qa, documents, params, str(tiny_bert), tmp_path / "v", judge=_Judge(),
                                 judge_id="judge@1")
    spec = json.loads((tmp_path / "v" / "COMBINER.json").read_text())
    assert spec["features"] == list(FEATURES + LIKELIHOOD_FEATURES) and spec["judge"] == "judge@1"
    assert Combiner(spec).needs_judge and result.metrics["lexical_combiner"]["fit_pairs"] > 0
    # the saved verifier cannot be loaded without a judge that returns token log-probs
    with pytest.raises(ModelResolutionError, match="reads the judge's answer likelihood"):
        load_verifier(tmp_path / "v")
    assert load_verifier(tmp_path / "v", judge=_Judge()).name.endswith("+lexical+likelihood")
    # with the embedding cosines and one regression per corruption kind as well
    both = params.model_copy(update={"embedding_features": True, "combiner_per_kind": True})
    result = train_verifier_core(qa, qa, documents, both, str(tiny_bert), tmp_path / "e", judge=_Judge(),
                                 judge_id="judge@1", embedder=_Embedder())
    spec = json.loads((tmp_path / "e" / "COMBINER.json").read_text())
    assert spec["features"] == list(FEATURES + LIKELIHOOD_FEATURES + EMBEDDING_FEATURES)
    assert spec["per_kind"] and result.metrics["lexical_combiner"]["per_kind"] == sorted(spec["per_kind"])
    assert load_verifier(tmp_path / "e", judge=_Judge(), embedder=_Embedder()).name.endswith(
        "+lexical+likelihood+embedding")
    with pytest.raises(RefineryError, match="no embedder was given"):
        train_verifier_core(qa, qa, documents, both, str(tiny_bert), tmp_path / "f", judge=_Judge())
    # or with boosted trees over the same features, which load as a plain combiner too
    boosted = params.model_copy(update={"embedding_features": True, "combiner_boosted": True})
    result = train_verifier_core(qa, qa, documents, boosted, str(tiny_bert), tmp_path / "b", judge=_Judge(),
                                 judge_id="judge@1", embedder=_Embedder())
    spec = json.loads((tmp_path / "b" / "COMBINER.json").read_text())
    assert spec["boosted"]["trees"] and "weights" not in spec
    combiner_metrics = result.metrics["lexical_combiner"]
    assert combiner_metrics["boosted_trees"] == 300 and set(combiner_metrics["importance"]) == set(spec["features"])
    loaded = load_verifier(tmp_path / "b", judge=_Judge(), embedder=_Embedder())
    assert 0 <= result.metrics["val"]["auc"] <= 1 and np.isfinite(loaded.score(
        [documents.column("text")[0].as_py()], ["What? An answer."])).all()
    with pytest.raises(RefineryError, match="two combiners"):
        train_verifier_core(qa, qa, documents, boosted.model_copy(update={"combiner_per_kind": True}), str(tiny_bert),
                            tmp_path / "k", judge=_Judge(), embedder=_Embedder())
    with pytest.raises(RefineryError, match="combiner_per_kind needs lexical_combiner"):
        train_verifier_core(qa, qa, documents, params.model_copy(update={"lexical_combiner": False,
                                                                         "likelihood_features": False,
                                                                         "combiner_per_kind": True}),
                            str(tiny_bert), tmp_path / "g")
    with pytest.raises(RefineryError, match="no judge model was given"):
        train_verifier_core(qa, qa, documents, params, str(tiny_bert), tmp_path / "w")
    # a judge without token offsets (no word features) still gives the log-probs and the negation-removal gain

    class _NoOffsets:
        token_logprobs = _Judge.token_logprobs

    train_verifier_core(qa, qa, documents, params, str(tiny_bert), tmp_path / "n", judge=_NoOffsets())
    assert json.loads((tmp_path / "n" / "COMBINER.json").read_text())["features"] == list(FEATURES) + [
        "answer_logprob_mean", "answer_logprob_min", "negation_removal_gain"]
    with pytest.raises(RefineryError, match="needs lexical_combiner"):
        train_verifier_core(qa, qa, documents, params.model_copy(update={"lexical_combiner": False}),
                            str(tiny_bert), tmp_path / "x", judge=_Judge())


def test_command_writes_model_training_record_and_metrics(in_tmp, seed_tables, base_dir):
    import yaml

    from stages.train_verifier import cli

    documents, qa = seed_tables
    pq.write_table(as_split(qa, "train"), in_tmp / "train.parquet")
    pq.write_table(as_split(qa, "val"), in_tmp / "val.parquet")
    pq.write_table(documents, in_tmp / "documents.parquet")
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"train_verifier": {**PARAMS, "epochs": 1}}))
    result = CliRunner().invoke(cli, ["--params", "params.yaml", "--train", "train.parquet", "--val", "val.parquet",
                                      "--documents", "documents.parquet", "--base", str(base_dir), "--out",
                                      "out/verifier", "--metrics", "metrics/train_verifier.json"])
    assert result.exit_code == 0, result.output
    record = json.loads((in_tmp / "out/verifier/TRAINING.json").read_text())
    assert record["task"] == "faithfulness_verifier" and 0 <= record["threshold"] <= 1
    assert set(record["inputs_sha256"]) == {"train", "val", "documents"}
    assert record["params"]["seed"] == 3 and "torch" in record["versions"]
    metrics = json.loads((in_tmp / "metrics/train_verifier.json").read_text())
    assert metrics["val"]["clean"] == qa.num_rows and "recall_per_kind" in metrics["val"]
    assert load_verifier(in_tmp / "out/verifier").threshold == record["threshold"]


def test_command_with_likelihood_features_and_no_provisioned_judge_fails_before_training(in_tmp, seed_tables,
                                                                                       base_dir):
    import yaml

    from stages.train_verifier import cli

    documents, qa = seed_tables
    pq.write_table(as_split(qa, "train"), in_tmp / "train.parquet")
    pq.write_table(documents, in_tmp / "documents.parquet")
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"train_verifier": {**PARAMS, "lexical_combiner": True,
                                                                           "likelihood_features": True}}))
    result = CliRunner().invoke(cli, ["--params", "params.yaml", "--train", "train.parquet", "--val", "train.parquet",
                                      "--documents", "documents.parquet", "--base", str(base_dir), "--out",
                                      "out/verifier", "--metrics", "m.json"])
    assert result.exit_code != 0
    assert "role 'judge'" in str(result.exception) + result.output
    assert not (in_tmp / "out").exists() and not (in_tmp / "m.json").exists()


def test_command_rejects_an_input_missing_a_column(in_tmp, seed_tables, base_dir):
    import yaml

    from stages.train_verifier import cli

    documents, qa = seed_tables
    pq.write_table(as_split(qa, "train").drop_columns(["answer"]), in_tmp / "train.parquet")
    pq.write_table(as_split(qa, "val"), in_tmp / "val.parquet")
    pq.write_table(documents, in_tmp / "documents.parquet")
    (in_tmp / "params.yaml").write_text(yaml.safe_dump({"train_verifier": PARAMS}))
    # then the command fails before training, naming the file and the column, and writes nothing
    with pytest.raises(InputError, match="train.parquet.*missing column.*answer"):
        cli.main(["--params", "params.yaml", "--train", "train.parquet", "--val", "val.parquet", "--documents",
                  "documents.parquet", "--base", str(base_dir), "--out", "v", "--metrics", "m.json"],
                 standalone_mode=False)
    assert not (in_tmp / "v").exists()


def test_snli_reader_balances_labels(tmp_path):
    import gzip

    from stages.train_verifier import read_snli

    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": lab, "pair_id": str(i)}
            for i, lab in enumerate(["entailment", "neutral", "contradiction", "-"] * 5)]
    path = tmp_path / "snli.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    t = read_snli(str(path), max_pairs=8, seed=0)
    assert t.num_rows == 8 and sum(t.column("label").to_pylist()) == 4
    assert isinstance(t, pa.Table)
