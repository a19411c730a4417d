"""The lexical grounding features and the logistic combiner on top of a verifier."""

from __future__ import annotations

import re

import numpy as np
import pytest

from refinery.models.claims import split_claim
from refinery.models.grounding.features import (EMBEDDING_FEATURES, FEATURES, LIKELIHOOD_FEATURES, Likelihood,
                                                embedding_matrix, feature_matrix, features, likelihood_matrix)
from refinery.models.grounding.learners import fit_combiner_spec, fit_logistic
from refinery.models.grounding.scorer import Combiner, GroundedVerifier

PASSAGE = "The Berlin office opens at 9 am. Refunds take 14 days and are not available for gift cards."


def f(claim: str, prob: float = 0.5) -> dict[str, float]:
    return dict(zip(FEATURES, features(PASSAGE, claim, prob)))


def test_a_number_the_passage_never_states_is_novel():
    # given a claim with the passage's number, and one with a changed number
    # then only the changed one is flagged
    assert f("Refunds take 14 days.")["novel_number"] == 0.0
    assert f("Refunds take 21 days.")["novel_number"] == 1.0


def test_an_entity_from_nowhere_and_an_added_negation_are_seen():
    assert f("The Berlin office opens at 9 am.")["novel_entity_share"] == 0.0
    assert f("The Paris office opens at 9 am.")["novel_entity_share"] == 1.0
    assert f("The office opens at 9 am.")["claim_negation"] == 0.0
    # the passage has a negation, so a negated claim is not "negation not in passage"
    assert f("Refunds are not available.")["negation_not_in_passage"] == 0.0
    assert features("Refunds take 14 days.", "Refunds do not take 14 days.", 0.5)[FEATURES.index(
        "negation_not_in_passage")] == 1.0


def test_copied_word_pairs_are_supported_and_the_model_logit_is_kept():
    vals = f("Refunds take 14 days.", prob=0.9)
    assert vals["bigram_support"] == 1.0
    assert vals["model_logit"] == pytest.approx(np.log(9.0))


def test_answer_features_read_the_answer_after_its_question_sentence_by_sentence():
    # given a grounded answer, and the same answer with an unsupported sentence appended
    clean = f("How long do refunds take? Refunds take 14 days.")
    padded = f("How long do refunds take? Refunds take 14 days. Our courier brings lunch every Friday.")
    # then the answer-level features see the appended sentence even though most claim words are grounded
    assert clean["answer_novel_word_share"] == 0.0 and clean["answer_sentences_gt1"] == 0.0
    assert clean["max_sentence_novel_word_share"] == 0.0 and clean["min_sentence_bigram_support"] == 1.0
    assert padded["max_sentence_novel_word_share"] == 1.0 and padded["answer_sentences_gt1"] == 1.0
    assert padded["min_sentence_bigram_support"] == 0.0
    # an answer that shares its words with its question scores higher on answer_words_in_question
    assert clean["answer_words_in_question"] > f("How long do refunds take? Gift cards.")["answer_words_in_question"]
    # a claim without a question: the answer is the whole claim
    assert f("Refunds take 14 days.")["answer_words_in_question"] == 0.0


def test_the_combiner_learns_a_separable_cue_and_round_trips(tmp_path):
    # given features where label 0 always has a novel number
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, len(FEATURES)))
    y = (rng.random(200) < 0.5).astype(float)
    x[:, 1] = 1.0 - y
    # when fitted, saved and loaded
    comb = Combiner(fit_logistic(x, y))
    comb.save(tmp_path)
    loaded = Combiner.load(tmp_path)
    # then it ranks every positive above every negative, and the loaded copy predicts the same
    p = loaded.predict(x)
    assert p[y == 1].min() > p[y == 0].max()
    assert np.allclose(p, comb.predict(x))
    assert Combiner.load(tmp_path / "missing") is None


def test_fitting_needs_both_labels():
    with pytest.raises(ValueError, match="both labels"):
        fit_logistic(np.zeros((4, len(FEATURES))), np.ones(4))


class _Model:
    name, threshold, full_max_chars = "m", 0.3, 100

    def score(self, passages, claims):
        return np.array([0.9, np.nan])


def test_a_row_the_model_cannot_score_stays_unscored():
    # given a model that fails on the second pair (NaN), wrapped by a combiner
    spec = fit_logistic(np.vstack([np.zeros(len(FEATURES)), np.ones(len(FEATURES))]), np.array([0.0, 1.0]))
    verifier = GroundedVerifier(_Model(), Combiner(spec))
    # when scored
    out = verifier.score([PASSAGE, PASSAGE], ["Refunds take 14 days.", "x"])
    # then the NaN survives (the gate fails closed on it) and the wrapper keeps the model's interface
    assert np.isfinite(out[0]) and np.isnan(out[1])
    assert verifier.threshold == 0.3 and verifier.name == "m+lexical"
    verifier.full_max_chars = 7
    assert verifier.base.full_max_chars == 7
    assert np.isnan(feature_matrix(["p"], ["c"], np.array([np.nan]))).all()


class _Judge:
    """A judge double: every answer token scores -1, except a token 'gift', which scores -9."""

    def __init__(self):
        self.contexts = []

    def token_logprobs(self, contexts, continuations):
        self.contexts += list(contexts)
        return [np.array([-9.0 if w == "gift" else -1.0 for w in c.split()]) for c in continuations]

    def token_offsets(self, continuations):
        return [[m.span() for m in re.finditer(r"\S+", c)] for c in continuations]


def test_likelihood_features_read_the_answer_given_the_passage_and_question():
    judge = _Judge()
    x = likelihood_matrix(judge, [PASSAGE] * 5, ["How long do refunds take? 14 days.",
                                                 "How long do refunds take? gift days.", "How long?",
                                                 "How long do refunds take? Two weeks.",
                                                 "How long do refunds take? They do n't."])
    # mean and min over the answer's tokens, then the least likely content word the passage holds ("days",
    # "gift"), the least likely one it does not ("weeks") and the least likely negation word ("n't"); 0.0 where
    # the answer has no such word; last, the summed log-prob gained by removing the negation ("They do." scores
    # -2 against -3)
    assert x[0].tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0]
    assert x[1].tolist() == [-5.0, -9.0, -9.0, 0.0, 0.0, 0.0]
    assert x[3].tolist() == [-1.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    assert x[4].tolist() == [-1.0, -1.0, 0.0, -1.0, -1.0, 1.0]
    # the context is the exact passage, then the question; the answer is what is scored, and only the answer
    # with a negation is scored again, de-negated, in the same context
    assert judge.contexts[0] == f"Passage: {PASSAGE}\nQuestion: How long do refunds take?\nAnswer:"
    assert len(judge.contexts) == 6 and judge.contexts[5] == judge.contexts[4]
    assert split_claim("How long?") == ("", "How long?") and x.shape == (5, len(LIKELIHOOD_FEATURES))


def test_denegate_removes_each_negation_and_keeps_the_modal():
    from refinery.models.grounding.features import denegate

    assert denegate("He did not go and she never called.") == "He did go and she called."
    assert denegate("It can't be, it cannot be, it won't be, it isn't, they don't.") == \
        "It can be, it can be, it will be, it is, they do."
    assert denegate("Can't stop. Notice nothing.") == "Can stop. Notice nothing."


def test_a_combiner_fitted_with_likelihood_features_needs_a_judge():
    names = FEATURES + LIKELIHOOD_FEATURES
    spec = fit_logistic(np.vstack([np.zeros(len(names)), np.ones(len(names))]), np.array([0.0, 1.0]), names=names)
    combiner = Combiner(spec)
    assert combiner.needs_judge and spec["features"] == list(names)
    with pytest.raises(ValueError, match="reads the judge's answer likelihood"):
        GroundedVerifier(_Model(), combiner)
    verifier = GroundedVerifier(_Model(), combiner, _Judge())
    assert verifier.name == "m+lexical+likelihood"
    out = verifier.score([PASSAGE, PASSAGE], ["How long do refunds take? 14 days.", "x"])
    assert np.isfinite(out[0]) and np.isnan(out[1])
    # a lexical-only combiner ignores a judge it does not need
    lexical = GroundedVerifier(_Model(), Combiner(fit_logistic(np.vstack([np.zeros(len(FEATURES)),
                                                                           np.ones(len(FEATURES))]),
                                                               np.array([0.0, 1.0]))), _Judge())
    assert lexical.judge is None and lexical.name == "m+lexical"
    with pytest.raises(ValueError, match="differ from this version"):
        Combiner({**spec, "features": list(FEATURES) + ["other"]})
    # a combiner saved before the word features (mean and min only) still loads and needs no token offsets
    old = FEATURES + LIKELIHOOD_FEATURES[:2]
    spec = fit_logistic(np.vstack([np.zeros(len(old)), np.ones(len(old))]), np.array([0.0, 1.0]), names=old)
    assert Combiner(spec).needs_judge and not Combiner(spec).needs_offsets
    # nor does the negation-removal gain, which a judge without offsets still gives
    from refinery.models.grounding.features import OFFSET_FEATURES

    plain = FEATURES + tuple(n for n in LIKELIHOOD_FEATURES if n not in OFFSET_FEATURES)
    assert plain[-1] == "negation_removal_gain"
    assert not Combiner({**spec, "features": list(plain), "mean": [0.0] * len(plain), "std": [1.0] * len(plain),
                         "weights": [0.0] * len(plain)}).needs_offsets


@pytest.mark.slow
def test_the_small_teacher_finds_a_swapped_in_word_improbable_given_the_passage(smol_dir):
    # given the embedded teacher as judge, and an answer with one word swapped for another word of the passage
    from refinery.models.backends.local import TransformersBackend

    judge = TransformersBackend(str(smol_dir), batch_size=2, threads=2)
    passage = "We drove to the lake on Saturday. My sister caught a big fish and we cooked it for dinner."
    question = "What did the narrator's sister do at the lake?"
    x = likelihood_matrix(judge, [passage] * 2, [f"{question} She caught a big fish.",
                                                 f"{question} She cooked a big Saturday."])
    # then the swapped answer's least likely token is far less likely than any token of the faithful answer
    assert x[1, 1] < x[0, 1] - 2.0 and x[1, 0] < x[0, 0]
    # and its least likely word taken from the passage ("Saturday", in the wrong place) far less likely than
    # the faithful answer's ("caught", "big", "fish"), though both answers only use the passage's words
    copied, new = LIKELIHOOD_FEATURES.index("copied_word_logprob_min"), LIKELIHOOD_FEATURES.index("new_word_logprob_min")
    assert x[1, copied] < x[0, copied] - 3.0 and x[0, new] == x[1, new] == 0.0


@pytest.mark.slow
def test_the_small_teacher_gains_more_from_removing_a_negation_the_passage_contradicts(smol_dir):
    # given the same "can't" answer to a passage that states it and to one that states the opposite
    from refinery.models.backends.local import TransformersBackend

    judge = TransformersBackend(str(smol_dir), batch_size=2, threads=2)
    claim = "Can the shop refund opened items? The shop can't refund opened items."
    x = likelihood_matrix(judge, ["The shop can't refund opened items. Unopened items can be returned within 14 days.",
                                  "The shop can refund opened items within 14 days."], [claim, claim])
    gain = x[:, LIKELIHOOD_FEATURES.index("negation_removal_gain")]
    # then "The shop can refund opened items." is far likelier than the answer only where the passage says so
    assert gain[1] > gain[0] + 3.0


def test_per_kind_regressions_score_a_row_by_its_most_damning_detector():
    # given clean rows (both features high) and two corruption kinds, each low on a different feature
    rng = np.random.default_rng(0)
    names = FEATURES + LIKELIHOOD_FEATURES
    clean = rng.normal(0, 1, (60, len(names)))
    swap, other = rng.normal(0, 1, (60, len(names))), rng.normal(0, 1, (60, len(names)))
    swap[:, len(FEATURES) + 2] -= 4.0  # copied_word_logprob_min
    other[:, 3] += 4.0  # novel_word_share
    x = np.vstack([clean, swap, other])
    y = np.r_[np.ones(60), np.zeros(120)]
    kinds = ["clean"] * 60 + ["entity_swap"] * 60 + ["other_document"] * 60
    spec = fit_combiner_spec(x, y, names, kinds)
    # then one regression per kind is kept beside the overall one, and the score is their minimum
    assert sorted(spec["per_kind"]) == ["entity_swap", "other_document"]
    combiner = Combiner(spec)
    p = combiner.predict(x)
    assert np.isnan(combiner.predict(np.full((1, len(names)), np.nan))).all()
    # each regression's score is its rank among the clean answers, so the score is a share in [0, 1] and the
    # clean rows spread over it while each corruption sits at the bottom of its own detector
    ranks = {k: Combiner({"features": spec["features"], **m}).predict(x) for k, m in spec["per_kind"].items()}
    assert np.array_equal(p, np.minimum.reduce([Combiner({**spec, "per_kind": {}}).predict(x), *ranks.values()]))
    assert 0 <= p.min() and p.max() <= 1 and np.median(p[:60]) > 0.15 and np.median(p[60:]) < 0.05
    assert np.median(ranks["entity_swap"][60:120]) < 0.05 and np.median(ranks["other_document"][120:]) < 0.05
    assert np.median(ranks["entity_swap"][120:]) > 0.1  # the swap detector does not flag the other kind
    # a kind with fewer than 5 negatives gets no regression of its own
    few = fit_combiner_spec(x[:64], y[:64], names, kinds[:64])
    assert few["per_kind"] == {}
    with pytest.raises(ValueError, match="a regression of"):
        Combiner({**spec, "per_kind": {"entity_swap": {**spec["per_kind"]["entity_swap"], "weights": [1.0]}}})


class _Embedder:
    """Embeds a text as a unit vector: axis 0 for texts about refunds, axis 1 for anything else."""

    def embed(self, texts):
        return np.array([[1.0, 0.0] if "refund" in t.lower() else [0.0, 1.0] for t in texts])


def test_embedding_features_and_a_combiner_that_reads_them_needs_an_embedder():
    x = embedding_matrix(_Embedder(), [PASSAGE] * 3, ["How long do refunds take? Refunds take 14 days.",
                                                      "How long do refunds take? It's a joke.", "Refunds are slow."])
    # answer-passage cosine, then answer-question cosine (0 for a claim without a question)
    assert x.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    names = FEATURES + LIKELIHOOD_FEATURES[:2] + EMBEDDING_FEATURES
    spec = fit_logistic(np.vstack([np.zeros(len(names)), np.ones(len(names))]), np.array([0.0, 1.0]), names=names)
    combiner = Combiner(spec)
    assert combiner.needs_embedder and combiner.needs_judge and not combiner.needs_offsets
    with pytest.raises(ValueError, match="no embedder was given"):
        GroundedVerifier(_Model(), combiner, _Judge())
    verifier = GroundedVerifier(_Model(), combiner, _Judge(), _Embedder())
    assert verifier.name == "m+lexical+likelihood+embedding"
    out = verifier.score([PASSAGE, PASSAGE], ["How long do refunds take? 14 days.", "x"])
    assert np.isfinite(out[0]) and np.isnan(out[1])
    # the word features need the judge's token offsets
    words = FEATURES + LIKELIHOOD_FEATURES
    spec = fit_logistic(np.vstack([np.zeros(len(words)), np.ones(len(words))]), np.array([0.0, 1.0]), names=words)

    class _NoOffsets:
        def token_logprobs(self, contexts, continuations):
            return [np.array([-1.0]) for _ in continuations]

    with pytest.raises(ValueError, match="cannot return token offsets"):
        GroundedVerifier(_Model(), Combiner(spec), _NoOffsets())
    with pytest.raises(ValueError, match="must come before"):
        Combiner({**spec, "features": list(FEATURES + EMBEDDING_FEATURES + LIKELIHOOD_FEATURES[:2])})


def test_likelihood_remembers_pairs_it_has_scored():
    judge = _Judge()
    memo = Likelihood(judge)
    claims = ["How long do refunds take? 14 days.", "How long do refunds take? gift days."]
    first = likelihood_matrix(memo, [PASSAGE] * 2, claims)
    again = likelihood_matrix(memo, [PASSAGE] * 3, claims + ["How long do refunds take? 14 days."])
    # then the second call scores nothing new, and returns the same features in the caller's order
    assert len(judge.contexts) == 2
    assert np.array_equal(again[:2], first) and np.array_equal(again[2], first[0])


def test_a_clean_rank_keeps_the_order_of_rows_beyond_every_clean_answer():
    from refinery.models.grounding.learners import clean_rank

    ref = np.array([-1.0, 0.0, 1.0, 2.0])
    z = np.array([-50.0, -5.0, -1.0, -0.5, 2.0, 9.0, np.nan])
    p = clean_rank(z, ref)
    # inside the clean logits: the share below, interpolated; outside: inside the outer half-steps, in order
    assert p[2] == 0.125 and p[3] == 0.25 and p[4] == 0.875
    assert 0 < p[0] < p[1] < 0.125 and 0.875 < p[5] < 1 and np.isnan(p[6])


@pytest.mark.slow
def test_boosted_trees_catch_a_cue_that_matters_only_beside_another_and_load_from_plain_json(tmp_path):
    import json

    from sklearn.ensemble import HistGradientBoostingClassifier

    # given rows where a cue condemns an answer with a negation and clears one without (an interaction no weighted
    # sum of the two features expresses)
    rng = np.random.default_rng(0)
    names = FEATURES + LIKELIHOOD_FEATURES
    x = rng.normal(0, 1, (400, len(names)))
    has_negation, gain = rng.random(400) < 0.5, len(FEATURES) + LIKELIHOOD_FEATURES.index("negation_removal_gain")
    x[:, 5] = has_negation  # claim_negation
    y = ((x[:, gain] > 0) != has_negation).astype(float)
    kinds = np.where(y > 0.5, "clean", "negation_flip")
    spec = fit_combiner_spec(x, y, names, kinds, boosted=True)
    # then the exported trees, read back from JSON, give exactly scikit-learn's probabilities
    combiner = Combiner(json.loads(json.dumps(spec)))
    reference = HistGradientBoostingClassifier(max_depth=2, max_iter=300, learning_rate=0.05, l2_regularization=1.0,
                                               early_stopping=False, random_state=0).fit(x, y)
    test = rng.normal(0, 1, (50, len(names)))
    assert np.allclose(combiner.predict(test), reference.predict_proba(test)[:, 1], atol=1e-12)
    # and they separate what a single regression cannot
    from refinery.models.verifier import roc_auc

    linear = Combiner(fit_combiner_spec(x, y, names))
    assert roc_auc(y, combiner.predict(x)) > 0.99 and roc_auc(y, linear.predict(x)) < 0.7
    importance = spec["boosted"]["importance"]
    assert list(importance) == list(names) and abs(sum(importance.values()) - 1) < 1e-3
    # a row with a NaN feature stays NaN; a tree that reads a feature the spec lacks does not load
    assert np.isnan(combiner.predict(np.full((1, len(names)), np.nan))).all()
    bad = json.loads(json.dumps(spec))
    bad["boosted"]["trees"][0]["feature"] = [len(names) + 3] * len(bad["boosted"]["trees"][0]["feature"])
    with pytest.raises(ValueError, match="does not fit its"):
        Combiner(bad)
    cycle = json.loads(json.dumps(spec))
    cycle["boosted"]["trees"][0] = {"feature": [0], "threshold": [0.0], "missing_left": [True], "left": [0],
                                    "right": [0], "leaf": [False], "value": [0.0]}
    with pytest.raises(ValueError, match="has a cycle"):
        Combiner(cycle).predict(test[:2])
    assert Combiner.load(combiner.save(tmp_path).parent).predict(test[:3]).tolist() == combiner.predict(test[:3]).tolist()
