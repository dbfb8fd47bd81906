"""Attribution metrics on hand-made sources, every answer worked out by hand: copied runs and ratio,
supported tokens, topical precision, the QA answer inside a copied span (character offsets), the paired bootstrap."""

import pytest

from stages.decoding.attribution import token_char_ends
from tasks.metrics import (Topic, answer_in_copied_span, answer_occurrences, attribution_ratio, attribution_runs,
                           attribution_span_length, attribution_stats, copied_char_ranges, normalize_title,
                           paired_bootstrap, token_char_spans, topical_counts, topical_precision)


# -- copied runs, ratio, supported -------------------------------------------------------------------------------------
def test_runs_ratio_length_one_return_type_one_empty_value():
    src = [(4, 10), (4, 11), (4, 13), None, (2, 0)]
    assert attribution_runs(src) == [(0, 2, 4), (2, 1, 4), (4, 1, 2)]  # 11 → 13 jumps: a new run of doc 4
    assert attribution_runs(src, same_doc_only=True) == [(0, 3, 4), (4, 1, 2)]
    assert attribution_ratio(src) == pytest.approx(4 / 5)
    assert attribution_span_length(src) == pytest.approx(4 / 3)
    assert attribution_span_length(src, same_doc_only=True) == pytest.approx(2.0)
    # a different doc at the next position breaks a run even when positions continue
    assert attribution_runs([(1, 5), (2, 6)]) == [(0, 1, 1), (1, 1, 2)]
    # empty: no run; ratio and length undefined (None), never 0 for "no tokens"
    assert attribution_runs([]) == [] and attribution_ratio([]) is None and attribution_span_length([None]) is None
    assert attribution_ratio([None, None]) == 0.0


def test_supported_tokens_are_counted_apart_from_copies():
    copied = [(1, 0), (1, 1), None, None, None, (1, 7)]
    supported = [None, None, (2, 5), None, (3, 1), None]
    s = attribution_stats(copied, supported)
    assert (s["tokens"], s["copied_tokens"], s["supported_tokens"], s["runs"]) == (6, 3, 2, 2)
    assert s["attribution_ratio"] == pytest.approx(3 / 6) and s["supported_ratio"] == pytest.approx(2 / 6)
    assert s["attribution_span_length"] == pytest.approx(3 / 2)  # runs (1,0..1) and (1,7)
    assert attribution_stats(copied)["supported_tokens"] == 0
    empty = attribution_stats([], [])
    assert empty["attribution_ratio"] is None and empty["supported_ratio"] is None


# -- topical precision -------------------------------------------------------------------------------------------------
ADA = Topic(frozenset({7, 8}), "ada", "Ada Lovelace")
COPIED = [(7, 0), (7, 1), (9, 3), (9, 4), (9, 5), (11, 0), (12, 2), None]
PASSAGES = {9: {"title": "Cesare Beccaria", "source_id": "beccaria"},
            11: {"title": "Ada Lovelace (mathematician)", "source_id": "other"},
            12: {"title": "Ebla", "source_id": "ada"}}


def test_topical_precision_by_doc_ids_source_id_and_title():
    # on topic: doc 7 twice (doc_ids), doc 11 (title, qualifier dropped), doc 12 (same source_id) → 4 of 7 copied
    copied, on, off = topical_counts(COPIED, ADA, PASSAGES)
    assert (copied, on, off) == (7, 4, {9: 3})
    assert topical_precision(COPIED, ADA, PASSAGES) == pytest.approx(4 / 7)
    # without the passages' titles and source ids only doc_ids decide: 2 of 7
    assert topical_counts(COPIED, ADA) == (7, 2, {9: 3, 11: 1, 12: 1})
    # nothing copied: undefined
    assert topical_precision([None, None], ADA) is None
    # title-only topic (FactScore entities): the fallback rule alone
    entity = Topic.from_meta({"entity": "Ada Lovelace"})
    assert entity == Topic(frozenset(), None, "Ada Lovelace")
    assert topical_counts(COPIED, entity, PASSAGES) == (7, 1, {7: 2, 9: 3, 12: 1})


def test_topic_from_bio_meta_and_title_normalisation():
    t = Topic.from_meta({"source_id": "s1", "title": "Marie Curie", "doc_ids": [3, 4], "topic": "People"})
    assert t == Topic(frozenset({3, 4}), "s1", "Marie Curie")
    assert Topic.from_meta({}) is None
    assert normalize_title(" Marie_Curie  (physicist)") == "marie curie"
    assert normalize_title("Marie Curie") != normalize_title("Pierre Curie")


# -- QA: the answer inside a copied span -------------------------------------------------------------------------------
# "The| capital| is| Paris|,| France|." → character ends 3, 11, 14, 20, 21, 28, 29
TEXT = "The capital is Paris, France."
ENDS = [3, 11, 14, 20, 21, 28, 29]


def test_copied_char_ranges_from_token_ends():
    assert token_char_spans(ENDS)[3] == (14, 20)
    src = [None, None, None, (4, 10), (4, 11), (4, 12), None]
    assert copied_char_ranges(src, ENDS) == [(14, 28)]  # " Paris, France"
    with pytest.raises(ValueError, match="7 character offsets for 6 tokens"):
        copied_char_ranges(src[:6], ENDS)
    assert answer_occurrences("Paris or paris", ["PARIS", " "]) == [(0, 5), (9, 14)]


def test_answer_in_copied_span_by_hand():
    paris_france = [None, None, None, (4, 10), (4, 11), (4, 12), None]
    assert answer_in_copied_span(TEXT, ["paris"], paris_france, ENDS) == 1.0          # 15..20 inside 14..28
    assert answer_in_copied_span(TEXT, ["Paris, France"], paris_france, ENDS) == 1.0  # 15..28 inside 14..28
    comma_france = [None, None, None, None, (4, 11), (4, 12), None]                    # copied 20..28 only
    assert answer_in_copied_span(TEXT, ["paris"], comma_france, ENDS) == 0.0
    # straddling two copied runs (doc 4, then doc 9) is not inside ONE copied span
    two_runs = [None, None, None, (4, 10), (9, 0), (9, 1), None]
    assert answer_in_copied_span(TEXT, ["Paris, France"], two_runs, ENDS) == 0.0
    assert answer_in_copied_span(TEXT, ["paris"], two_runs, ENDS) == 1.0
    # a wrong answer is not counted at all (the share is over correct answers)
    assert answer_in_copied_span(TEXT, ["London"], paris_france, ENDS) is None
    # any alias may be the one inside: "France" is copied even though "capital" is not
    assert answer_in_copied_span(TEXT, ["capital", "france"], paris_france, ENDS) == 1.0


class _BytesTokenizer:
    """Decodes id 100 alone to the replacement character, 100 then 101 to one "é": a character split over tokens."""

    def decode(self, ids, skip_special_tokens=True):
        out, i = "", 0
        while i < len(ids):
            if ids[i] == 100:
                out += "é" if i + 1 < len(ids) and ids[i + 1] == 101 else "\ufffd"
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 101 else 1
            elif ids[i] == 0:  # special
                i += 1
            else:
                out += chr(ids[i])
                i += 1
        return out


def test_token_char_ends_are_monotone_and_skip_specials():
    tok = _BytesTokenizer()
    # "a" | "é" split over 100, 101 | special 0 | "b": prefix lengths 1, 2 ("a�"), 2 ("aé"), 2, 3
    assert token_char_ends(tok, [97, 100, 101, 0, 98]) == [1, 2, 2, 2, 3]
    assert token_char_spans([1, 2, 2, 2, 3]) == [(0, 1), (1, 2), (2, 2), (2, 2), (2, 3)]
    assert token_char_ends(tok, []) == []


# -- paired bootstrap --------------------------------------------------------------------------------------------------
def test_paired_bootstrap_interval_excludes_or_includes_zero():
    # every paired difference is +1: every resample's mean is 1 → interval [1, 1], significant
    r = paired_bootstrap([2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0], resamples=500)
    assert (r["diff"], r["low"], r["high"], r["n"], r["significant"]) == (1.0, 1.0, 1.0, 4, True)
    # differences +1 and −1 in equal numbers: mean 0; a resample's mean is (2k − n)/n with k ~ Binomial(n, 1/2), so the
    # 95% interval is about ±2/√n = ±0.45 for n = 20: it includes 0
    method = [1.0, 0.0] * 10
    base = [0.0, 1.0] * 10
    r = paired_bootstrap(method, base)
    assert r["diff"] == 0.0 and r["low"] < 0 < r["high"] and not r["significant"]
    assert 0.3 < r["high"] < 0.6 and -0.6 < r["low"] < -0.3
    # the same draw for the same seed
    assert paired_bootstrap(method, base, seed=3) == paired_bootstrap(method, base, seed=3)
    # negative and significant: the method loses 1 on each of 30 examples but one
    r = paired_bootstrap([0.0] * 29 + [1.0], [1.0] * 30)
    assert r["high"] < 0 and r["significant"]
    assert paired_bootstrap([], [])["diff"] is None
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([1.0], [1.0, 2.0])
