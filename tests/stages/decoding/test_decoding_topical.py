"""NEST's on-topic options (beyond the paper, off by default): spans start only in the top-ranked articles
(``span_start_passages``), and a sentence copies from one article (``span_article = "sentence"``)."""

import pytest

from decoding_tiny import TinyTokenizer, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, Passage, make_decoder
from tasks.metrics import chimera_counts

PERIOD, SPACED = 52, (53, 54, 55, 56)


class SentenceTokenizer(TinyTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return "".join("." if int(i) == PERIOD else " w" if int(i) in SPACED
                       else super(SentenceTokenizer, self).decode([i], skip_special_tokens) for i in ids)


def passages():
    """Three articles of two passages each (titles A, B, C); each passage is short sentences of random words: the
    same words recur across articles, so spans can start in any of them."""
    import random

    rng = random.Random(4)
    out = []
    for a, title in enumerate("ABC"):
        for part in range(2):
            toks = []
            for s in range(4):
                toks += [rng.randrange(10, 30) for _ in range(3)] + [PERIOD, SPACED[s % 4]]
            out.append(Passage(10 * a + part, toks, title, ""))
    return out


def decode(model, cfg, n=60):
    ps = passages()
    tok = SentenceTokenizer()
    reqs = [DecodeRequest(i, "completion", prefix_ids=ps[i].token_ids[:2], passages=ps[i:] + ps[:i],
                          max_new_tokens=n) for i in (0, 2, 4)]
    return make_decoder("nest", model, tok, NestConfig(gamma=1e-9, delta=1.0, span_length=6, **cfg)).decode(reqs), \
        reqs, tok


def article(reqs, doc):
    return next(p.title for p in reqs[0].passages if p.doc_id == doc)


def test_paper_default_copies_from_several_articles(model):
    gens, reqs, _ = decode(model, {})
    # the setting is one where the options have something to do: NEST copies from articles below the top one
    assert any(article(reqs, s[0]) != r.passages[0].title for g, r in zip(gens, reqs) for s in g.sources if s)


def test_spans_start_only_in_the_top_ranked_article(model):
    gens, reqs, _ = decode(model, {"span_start_passages": 1})
    copied = 0
    for g, r in zip(gens, reqs):
        for s in g.sources:
            if s is not None:
                copied += 1
                assert article(reqs, s[0]) == r.passages[0].title  # both passages of the top article may start one
    assert copied > 20
    assert sum(g.counters.get("span_starts_restricted", 0) for g in gens) > 0


def test_a_sentence_copies_from_one_article(model):
    _, reqs, tok = decode(model, {})
    art = {p.doc_id: p.title for p in reqs[0].passages}

    def chimeras(gens):
        out = 0
        for g in gens:
            ends = [len(tok.decode(g.token_ids[:i + 1])) for i in range(len(g.token_ids))]
            out += chimera_counts(g.text, g.sources, ends, art.get)[1]
        return out

    free, _, _ = decode(model, {})
    locked, _, _ = decode(model, {"span_article": "sentence"})
    assert chimeras(free) > 0 and chimeras(locked) == 0
    assert sum(s is not None for g in locked for s in g.sources) > 20  # it still copies


def test_bad_values_are_one_line_errors():
    with pytest.raises(ValueError, match="span_start_passages"):
        NestConfig(span_start_passages=-1)
    with pytest.raises(ValueError, match="span_article"):
        NestConfig(span_article="paragraph")
