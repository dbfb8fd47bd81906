"""Metrics on hand-made inputs whose values are worked out by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest

from tasks.metrics import (alr, alr_first_only, attribution_ratio, attribution_runs, attribution_span_length,
                           attribution_stats, bleu, format_metric, latency_per_query, latency_per_token,
                           mean_or_none, perplexity, pooled_perplexity, rouge, speedup, truncate_at_eos,
                           truncate_ids_at_eos, truthfulqa_deltas)


# -- ALR ---------------------------------------------------------------------------------------------------------------
def test_alr_checks_every_alias_b2_fixed():
    assert alr("it is paris", ["london", "paris"]) == 1
    assert alr_first_only("it is paris", ["london", "paris"]) == 0  # the released code's behaviour (B2)
    assert alr_first_only("London, of course", ["london", "paris"]) == 1


def test_alr_is_lowercase_substring():
    assert alr("The answer is GEORGES BIZET.", ["Georges Bizet"]) == 1
    assert alr("Bizetti", ["Bizet"]) == 1  # substring, as the paper (no word boundaries)
    assert alr("Verdi", ["Bizet", "Georges Bizet"]) == 0
    assert alr("anything", ["", "  "]) == 0  # empty aliases never match everything


# -- ROUGE -------------------------------------------------------------------------------------------------------------
def test_rouge_by_hand():
    # pred unigrams {the:2, cat, was, on, mat}, ref {the:2, cat, sat, on, mat}: overlap 5 of 6 both ways → F = 5/6
    # bigrams: the-cat, on-the, the-mat shared (3 of 5) → 0.6; LCS "the cat on the mat" = 5 → 5/6
    r = rouge("the cat was on the mat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(5 / 6) and r["rouge2"] == pytest.approx(0.6)
    assert r["rougeL"] == pytest.approx(5 / 6)


def test_rouge_uses_stemmer_and_best_reference():
    assert rouge("cats running", "cat runs")["rouge1"] == pytest.approx(1.0)  # Porter: cats→cat, running/runs→run
    assert rouge("red apple", ["blue sky", "red apple"])["rouge1"] == pytest.approx(1.0)


def test_rouge_argument_order_b10():
    # prediction "the cat" (2 tokens) against target "the cat sat" (3): precision 2/2, recall 2/3, F 0.8
    assert rouge("the cat", "the cat sat", measure="precision")["rouge1"] == pytest.approx(1.0)
    assert rouge("the cat", "the cat sat", measure="recall")["rouge1"] == pytest.approx(2 / 3)
    assert rouge("the cat", "the cat sat")["rouge1"] == pytest.approx(0.8)


# -- BLEU and TruthfulQA -----------------------------------------------------------------------------------------------
def test_bleu_by_hand():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # n-gram precisions 5/6, 3/5, 1/4, and 0/3 → exp smoothing 1/(2·3); BP = 1 (equal lengths)
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert bleu("the cat was on the mat", "the cat sat on the mat") == pytest.approx(expected)  # 37.99


def test_truthfulqa_deltas_by_hand():
    d = truthfulqa_deltas("the cat sat on the mat", ["the cat sat on the mat", "I have no comment"],
                          ["the cat was on the mat"])
    b_false = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert d["bleu_max"] == pytest.approx(100.0)
    assert d["bleu_diff"] == pytest.approx(100.0 - b_false)
    assert d["rouge1_max"] == pytest.approx(100.0)
    assert d["rouge1_diff"] == pytest.approx(100.0 - 100 * 5 / 6)
    assert d["bleu_acc"] == 1.0 and d["rouge1_acc"] == 1.0
    worse = truthfulqa_deltas("the cat was on the mat", ["I have no comment"], ["the cat was on the mat"])
    assert worse["rouge1_diff"] == pytest.approx(-100.0) and worse["rouge1_acc"] == 0.0
    assert truthfulqa_deltas("  ", ["a"], ["b"])["bleu_diff"] is None  # empty answers are skipped (Lin et al.)


def test_truthfulqa_task_scores_against_its_references():
    from tasks.base import Example
    from tasks.truthfulqa import TruthfulQA

    ex = Example(0, "truthfulqa", "qa", "q", "q", references=["Nothing happens to you at all.", "I have no comment."],
                 meta={"incorrect_answers": ["You die in your sleep."]})
    s = TruthfulQA().score("Nothing happens to you at all.</s> You die in your sleep.", ex)  # after EOS: ignored (B9)
    assert s["bleu_max"] == pytest.approx(100.0) and s["bleu_diff"] > 0
    # false ref shares only "you": P = 1/6, R = 1/5, F = 2/11
    assert s["rouge1_diff"] == pytest.approx(100.0 - 200 / 11)


# -- attribution -------------------------------------------------------------------------------------------------------
SOURCES = [(3, 10), (3, 11), (3, 12), None, (3, 13), (5, 0), (5, 1), (3, 20), None, None]


def test_attribution_ratio_by_hand():
    assert attribution_ratio(SOURCES) == pytest.approx(7 / 10)
    assert attribution_ratio([None, None]) == 0.0
    assert attribution_ratio([]) is None


def test_attribution_span_length_by_hand():
    # runs: (3,10..12) = 3 | None breaks | (3,13) = 1 | (5,0..1) = 2 | (3,20) = 1 → mean 7/4
    assert [r[1] for r in attribution_runs(SOURCES)] == [3, 1, 2, 1]
    assert attribution_runs(SOURCES) == [(0, 3, 3), (4, 1, 3), (5, 2, 5), (7, 1, 3)]  # (start, length, doc_id)
    assert attribution_span_length(SOURCES) == pytest.approx(1.75)
    jumpy = [(3, 10), (3, 11), (3, 30), (3, 31), (4, 32)]
    assert [r[1] for r in attribution_runs(jumpy)] == [2, 2, 1]  # positions jump 11 → 30: a new span of the doc
    assert attribution_runs(jumpy, same_doc_only=True) == [(0, 4, 3), (4, 1, 4)]
    assert attribution_span_length(jumpy, same_doc_only=True) == pytest.approx(2.5)
    assert attribution_span_length([None]) is None


def test_attribution_stats_pooling_counts():
    s = attribution_stats(SOURCES)
    assert (s["tokens"], s["copied_tokens"], s["runs"], s["runs_same_doc"]) == (10, 7, 4, 4)
    assert s["supported_tokens"] == 0 and s["supported_ratio"] == 0.0
    assert s["attribution_ratio"] == pytest.approx(0.7) and s["attribution_span_length"] == pytest.approx(1.75)


# -- perplexity, latency, EOS, aggregation -----------------------------------------------------------------------------
def test_perplexity_by_hand():
    assert perplexity([math.log(0.5), math.log(0.25)]) == pytest.approx(2 ** 1.5)  # NLL mean = 1.5 ln 2
    # pooled: NLL = ln 2 + 2 ln 4 = 5 ln 2 over 3 tokens → 2^(5/3), not the mean of per-example PPLs (2 and 4)
    assert pooled_perplexity([[math.log(0.5)], [math.log(0.25)] * 2]) == pytest.approx(2 ** (5 / 3))
    with pytest.raises(ValueError):
        perplexity([])


def test_latency_helpers():
    assert latency_per_token([1.0, 3.0], [10, 30]) == pytest.approx(0.1)
    assert latency_per_query([1.0, 3.0]) == pytest.approx(2.0)
    assert speedup(9.0, 5.0) == pytest.approx(1.8)
    assert speedup(None, 1.0) is None and latency_per_token([], []) is None


def test_truncate_at_eos():
    assert truncate_at_eos("Paris.</s> junk") == "Paris."
    assert truncate_at_eos("a<|im_end|>b</s>c") == "a"
    assert truncate_at_eos("no marker") == "no marker"
    assert truncate_ids_at_eos([5, 6, 2, 7], [2]) == [5, 6]


def test_mean_and_format_never_invent_numbers():
    assert mean_or_none([1.0, None, 3.0]) == pytest.approx(2.0)
    assert mean_or_none([None, float("nan")]) is None
    assert format_metric(None) == "not computed" and format_metric(41.63) == "41.6"


def test_qa_task_score_scale():
    from tasks.base import Example
    from tasks.nq import NaturalQuestions

    ex = Example(0, "nq", "qa", "q", "q", references=["london", "paris"])
    assert NaturalQuestions().score("It is Paris.", ex) == {"alr": 100.0, "alr_first_only": 0.0}
    assert NaturalQuestions().score("</s>It is Paris.", ex)["alr"] == 0.0


def test_bleu_of_fewer_than_four_tokens_is_zero_as_in_t5():
    # t5 metrics.bleu (Lin et al.) has no effective order: a 3-token answer has no 4-grams → BLEU 0 even when exact
    assert bleu("Nothing happens.", "Nothing happens.") == 0.0
