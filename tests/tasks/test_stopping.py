"""Each task family's generation length and stop rule (tasks/stopping.py): the rules themselves, the decoders applying
them (every method, mid-draft too, batch rows with different limits), Generate's requests and the DAG's keys."""

import json

import pytest

from decoding_tiny import TinyTokenizer, random_passages, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, Passage, make_decoder
from stages.evaluation.generate import build_requests
from tasks import registry
from tasks.stopping import (DEFAULT_LENGTHS, FAMILIES, StopRule, family_of, rule_for,
                            stop_reached)

NL_IDS = frozenset(range(40, 52))  # 12 of the 60 text ids decode to a line break (the rest stay characters)


class NewlineTokenizer(TinyTokenizer):
    """The tiny tokenizer with some ids that decode to a line break (tiny_llama emits them now and then)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if int(i) in NL_IDS else super(NewlineTokenizer, self).decode([i], skip_special_tokens)
                       for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tok():
    return NewlineTokenizer()


def first_stop(tok, tokens, rule):
    """The length at which ``rule`` ends ``tokens`` (None: it never does)."""
    return next((k for k in range(1, len(tokens) + 1) if stop_reached(rule, tok.decode(tokens[:k]))), None)


# ---------------------------------------------------------------- the rules


def test_stop_rules_on_text():
    assert not stop_reached("none", "a\n\nb")
    assert not stop_reached("paragraph", "\n\n  Paris") and stop_reached("paragraph", "\n Paris.\n")
    assert not stop_reached("paragraph", "Paris is the capital")
    assert not stop_reached("blank_line", "Paris.\nIt is") and stop_reached("blank_line", "Paris.\n \nIt")
    assert not stop_reached("blank_line", "\n\n\nParis.\n")  # leading blank lines come before the answer
    assert not stop_reached("sentence", "Paris.") and not stop_reached("sentence", "It is Paris")
    assert stop_reached("sentence", "It is Paris. It") and stop_reached("sentence", "Paris\n")
    assert not stop_reached("sentence", "Dr. Smith") and not stop_reached("sentence", "1. The")
    with pytest.raises(ValueError, match="unknown stop rule"):
        stop_reached("chapter", "a.")


def test_every_task_has_a_family_and_the_paper_tasks_agree_with_their_class():
    for name in registry.names():  # the family is what the registered class declares, and a known one
        assert family_of(name) == type(registry.get(name)).family == registry.spec(name).family, name
        assert family_of(name) in FAMILIES, name
    assert {family_of(t) for t in ("completion", "completion_excluded", "bio")} == {"completion", "longform"}
    assert family_of("nq") == "qa" and family_of("medmcqa") == "multiple_choice"
    assert family_of("my_task", "completion") == "completion"
    with pytest.raises(ValueError, match="no family"):
        family_of("my_task")
    # the paper's lengths: QA 128, FactScore 512; a completion runs to its reference
    assert rule_for("hotpotqa") == StopRule("qa", 128, "sentence")
    assert rule_for("factscore") == StopRule("longform", 512, "none")
    assert rule_for("wikitext").max_new_tokens == "reference" == DEFAULT_LENGTHS["completion"]
    for name in registry.names("file"):  # each paper task's declared length is its family's
        task = registry.get(name, **({"tokenizer": None} if name == "wikitext" else {}))
        want = rule_for(name).max_new_tokens
        assert task.max_new_tokens == (256 if want == "reference" else want), name


def test_overrides_by_family_and_bad_overrides():
    r = rule_for("nq", lengths={"qa": 256, "longform": 96}, stops={"qa": "blank_line"})
    assert r == StopRule("qa", 256, "blank_line")
    assert rule_for("bio", lengths={"qa": 256, "longform": 96}) == StopRule("longform", 96, "none")
    assert rule_for("bio", lengths={"longform": None}).length_for({}) is None  # the config's max_new_tokens
    assert rule_for("completion").length_for({"target_ids": [5] * 17}) == 17
    assert rule_for("completion").length_for({}) is None
    assert StopRule.from_dict(r.to_dict()) == r
    for lengths, stops, msg in (({"QA": 1}, {}, "unknown task family"), ({"qa": 0}, {}, "positive integer"),
                                ({"qa": "long"}, {}, "positive integer"), ({}, {"qa": "chapter"}, "stop rule")):
        with pytest.raises(ValueError, match=msg):
            rule_for("nq", lengths=lengths, stops=stops)
    assert set(FAMILIES) == set(DEFAULT_LENGTHS)


# ---------------------------------------------------------------- the decoders


METHODS = [("base", {}), ("ra", {}), ("knnlm", {}), ("nest", dict(gamma=0.5, span_length=6)),
           ("nest", dict(gamma=1e-9, delta=1.0, span_length=6)), ("ra_nest", dict(gamma=0.05, span_length=4))]


def qa(example_id, stop, n=40, seed=10):
    return DecodeRequest(example_id, "qa", question="who?", passages=random_passages(seed, 5, first_doc=100 * seed),
                         max_new_tokens=n, stop=stop)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_paragraph_rule_ends_the_answer_at_its_first_line_break_for_every_method(model, tok, method, cfg):
    full = make_decoder(method, model, tok, NestConfig(**cfg)).decode([qa(0, "none")])[0]
    k = first_stop(tok, full.token_ids, "paragraph")
    assert k is not None and k < len(full.token_ids)  # the full answer goes on past its first paragraph
    g = make_decoder(method, model, tok, NestConfig(**cfg)).decode([qa(0, "paragraph")])[0]
    assert g.token_ids == full.token_ids[:k] and g.sources == full.sources[:k]
    body = g.text.lstrip()
    assert body.endswith("\n") and "\n" not in body[:-1]  # one paragraph, its line break kept
    c = g.counters
    assert (c["stopped_by_stop_rule"], c["stopped_by_length"], c["stopped_by_eos"]) == (1, 0, 0)
    assert c["max_new_tokens"] == 40
    assert full.counters["stopped_by_length"] == 1 and full.counters["stopped_by_stop_rule"] == 0


def test_blank_line_ends_an_accepted_draft_in_its_middle(model, tok):
    # NEST copies a passage whose text has a line break and then a blank line: the paragraph rule stops at the line
    # break, the blank-line rule at the blank line, both inside accepted drafts (nothing after them is emitted).
    text = [10, 11, 12, 13, 41, 14, 15, 16, 42, 43, 17, 18, 19, 20, 21, 22, 23, 24]
    p = Passage(5, text, "", "")
    cfg = NestConfig(gamma=1e-9, delta=1.0, span_length=16)

    def run(stop):
        return make_decoder("nest", model, tok, cfg).decode([DecodeRequest(0, "qa", question="q?", passages=[p],
                                                                           max_new_tokens=40, stop=stop)])[0]

    full = run("none")
    assert len(full.token_ids) == 40 and full.counters["accepted"] > 10
    for rule in ("paragraph", "blank_line"):
        g = run(rule)
        k = first_stop(tok, full.token_ids, rule)
        assert g.token_ids == full.token_ids[:k] and g.counters["stopped_by_stop_rule"] == 1
        assert stop_reached(rule, g.text) and not stop_reached(rule, tok.decode(g.token_ids[:-1]))
        assert g.token_ids[-1] in NL_IDS
    assert run("blank_line").text.endswith("\n\n")


def test_newline_ids_are_found_once_per_tokenizer(model, tok):
    dec = make_decoder("base", model, tok, NestConfig())
    assert dec.newline_ids() == NL_IDS and dec.newline_ids() is dec.newline_ids()
    assert make_decoder("nest", model, tok, NestConfig()).newline_ids() is dec.newline_ids()  # once per tokenizer
    assert make_decoder("base", model, TinyTokenizer(), NestConfig()).newline_ids() == frozenset()


def test_bad_stop_rule_is_a_clear_input_error(model, tok):
    from stages.errors import InputError

    with pytest.raises(InputError, match="example 3: unknown stop rule 'chapter'"):
        make_decoder("base", model, tok, NestConfig()).decode([qa(3, "chapter")])


PERIOD, SPACED = 52, (53, 54, 55, 56)  # "." and " w"-like tokens (a word start), for the sentence rule


class SentenceTokenizer(NewlineTokenizer):
    """The tiny tokenizer with a period and some tokens that start with a space."""

    def decode(self, ids, skip_special_tokens=True):
        out = []
        for i in ids:
            i = int(i)
            out.append("." if i == PERIOD else " " + chr(97 + i - 53) if i in SPACED
                       else super().decode([i], skip_special_tokens))
        return "".join(out)


def test_sentence_rule_ends_a_copied_run_before_the_next_sentence(model):
    # NEST copies a passage of short sentences "AB qCD. rEF GH. ..." with no line break: without a stop rule it runs
    # on to the length cap; `sentence` ends at the first sentence end of at least two words inside the accepted
    # draft, and the token that starts the next sentence (a space first) is not emitted.
    tok = SentenceTokenizer()
    words = [[17, 18], [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30], [31, 32]]
    text = []
    for i, w in enumerate(words * 2):
        text += ([SPACED[i % 4]] if i else []) + w + ([PERIOD] if i % 2 else [])
    p = Passage(5, text, "", "")
    cfg = NestConfig(gamma=1e-9, delta=1.0, span_length=16)

    def run(stop, n=24):
        return make_decoder("nest", model, tok, cfg).decode([DecodeRequest(
            0, "completion", prefix_ids=text[:1], passages=[p], max_new_tokens=n, stop=stop)])[0]

    full = run("none")
    assert len(full.token_ids) == 24 and full.counters["accepted"] > 10  # it copies, past every sentence end
    g = run("sentence")
    k = next(i for i in range(1, len(full.token_ids))
             if full.token_ids[i - 1] == PERIOD and full.token_ids[i] in SPACED
             and len(tok.decode(full.token_ids[:i]).split()) >= 2)
    assert g.token_ids == full.token_ids[:k] and g.text.endswith(".")
    assert g.counters["stopped_by_stop_rule"] == 1 and g.counters["stopped_by_length"] == 0
    assert g.sources[-1] is not None and full.sources[k] is not None  # it ended inside a copied run
    assert stop_reached("sentence", g.text + " x") and not stop_reached("sentence", g.text)


@pytest.mark.parametrize("method,cfg", METHODS)
def test_min_new_tokens_writes_exactly_n_tokens_with_every_method(model, method, cfg):
    # EOS, the stop rule and a document-end EOS key are all suppressed until min_new_tokens; with min = max every
    # method writes exactly that many tokens. Passages end their article, so with document_end = "eos" their last
    # key's value is EOS, and the tiny LM is made to like EOS.
    tok = SentenceTokenizer()
    ps = [Passage(100 + i, p.token_ids, "", "", True) for i, p in enumerate(random_passages(3, 5, lo=6, hi=10))]
    eos_model = tiny_llama(seed=0)
    import torch

    with torch.no_grad():  # EOS logit = 0.5·Σh: often the largest, so the natural answer ends early
        eos_model.lm_head.weight[1].fill_(0.5)
    natural = make_decoder(method, eos_model, tok, NestConfig(document_end="eos", **cfg)).decode(
        [DecodeRequest(0, "qa", question="who?", passages=ps, max_new_tokens=48, stop="sentence")])[0]
    n = 40
    out = make_decoder(method, eos_model, tok, NestConfig(document_end="eos", min_new_tokens=n, **cfg)).decode(
        [DecodeRequest(0, "qa", question="who?", passages=ps, max_new_tokens=n, stop="sentence")])[0]
    assert len(out.token_ids) == n and out.counters["min_new_tokens"] == n
    assert 1 not in out.token_ids and out.counters["stopped_by_length"] == 1
    assert len(natural.token_ids) < n  # without it the same example stops early


def test_min_new_tokens_is_capped_by_the_length_and_checked():
    with pytest.raises(ValueError, match="min_new_tokens"):
        NestConfig(min_new_tokens=-1)
    g = make_decoder("base", tiny_llama(seed=0), TinyTokenizer(), NestConfig(min_new_tokens=50)).decode(
        [DecodeRequest(0, "qa", question="who?", max_new_tokens=7)])[0]
    assert len(g.token_ids) == 7 and g.counters["min_new_tokens"] == 7


# ---------------------------------------------------------------- Generate's requests


def example(eid, task, kind, **meta):
    return {"example_id": eid, "task": task, "kind": kind, "question": "who?" if kind == "qa" else "",
            "prefix": "xy" if kind == "completion" else "", "meta": json.dumps(meta)}


def test_requests_carry_each_family_length_and_stop_rule():
    rows = [example(0, "completion", "completion", target_ids=[7] * 17), example(1, "nq", "qa"),
            example(2, "bio", "qa"), example(3, "completion_excluded", "completion")]
    reqs = build_requests(rows, {}, None, None, 40)
    assert [(r.max_new_tokens, r.stop) for r in reqs] == [(17, "none"), (128, "sentence"), (512, "none"),
                                                           (None, "none")]
    # a run's resolved rule (Generate's `stopping` parameter) and an explicit length
    reqs = build_requests(rows[1:2], {}, None, None, 40, stopping=rule_for("nq", lengths={"qa": 64}).to_dict())
    assert (reqs[0].max_new_tokens, reqs[0].stop) == (64, "sentence")
    assert build_requests(rows[1:2], {}, None, None, 40, max_new_tokens=9)[0].max_new_tokens == 9


def test_completion_runs_to_its_reference_length_and_the_config_is_the_fallback(model, tok):
    rows = [example(0, "completion", "completion", target_ids=[7] * 17),
            example(1, "completion", "completion"),  # no reference ids: the config's length
            example(2, "bio", "qa")]
    stopping = rule_for("bio", lengths={"longform": None}).to_dict()  # a family that sets no length
    reqs = build_requests(rows[:2], {}, None, None, 40) + build_requests(rows[2:], {}, None, None, 40,
                                                                         stopping=stopping)
    gens = make_decoder("base", model, tok, NestConfig(max_new_tokens=11)).decode(reqs)
    assert [len(g.token_ids) for g in gens] == [17, 11, 11]
    assert [g.counters["max_new_tokens"] for g in gens] == [17, 11, 11]
    assert all(g.counters["stopped_by_length"] == 1 for g in gens)
    assert any(t in NL_IDS for t in gens[0].token_ids)  # line breaks do not end a completion


@pytest.mark.parametrize("method,cfg", [("base", {}), ("nest", dict(gamma=0.5, span_length=6)),
                                        ("ra_nest", dict(gamma=1e-9, delta=1.0, span_length=8))])
def test_batch_rows_with_different_limits_are_each_right(model, tok, method, cfg):
    reqs = [qa(0, "paragraph", n=40),
            DecodeRequest(1, "completion", prefix="the cat", passages=random_passages(12, 6, first_doc=300),
                          max_new_tokens=13, stop="none"),
            qa(2, "none", n=21, seed=13),
            qa(3, "blank_line", n=40, seed=14)]
    batched = make_decoder(method, model, tok, NestConfig(batch_size=4, **cfg)).decode(reqs)
    alone = make_decoder(method, model, tok, NestConfig(batch_size=1, **cfg)).decode(reqs)
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.sources for g in batched] == [g.sources for g in alone]
    full = make_decoder(method, model, tok, NestConfig(batch_size=4, **cfg)).decode(
        [DecodeRequest(r.example_id, r.kind, r.question, r.prefix, r.passages, max_new_tokens=40) for r in reqs])
    for g, f, r in zip(batched, full, reqs):
        k = first_stop(tok, f.token_ids, r.stop) if r.stop != "none" else None
        want = min(k or r.max_new_tokens, r.max_new_tokens)
        assert g.token_ids == f.token_ids[:want], r.example_id
        assert g.counters["stopped_by_stop_rule"] == int(k is not None and k <= r.max_new_tokens)
    assert len(batched[1].token_ids) == 13 and len(batched[2].token_ids) == 21
    assert batched[0].counters["stopped_by_stop_rule"] == 1


# ---------------------------------------------------------------- the DAG


def test_generate_key_holds_its_family_rule_and_only_that_family_reruns():
    pytest.importorskip("luigi")
    from luigi.task_register import Register

    from pipeline import dag
    from pipeline.engine import config

    Register.clear_instance_cache()
    cfg = config.config()
    old = cfg.get("decoding", "lengths", fallback=None)

    def keys():
        Register.clear_instance_cache()
        return {t: dag.Generate(task=t, method="base").stage_params()["stopping"] for t in ("completion", "bio", "nq")}

    try:
        config.apply_overrides({"decoding": {"lengths": '{"longform": 96}'}})
        before = keys()
        assert before["nq"] == {"family": "qa", "max_new_tokens": 128, "stop": "sentence"}
        assert before["bio"]["max_new_tokens"] == 96 and before["completion"]["max_new_tokens"] == "reference"
        config.apply_overrides({"decoding": {"lengths": '{"longform": 96, "qa": 256}'}})
        after = keys()
        assert after["nq"]["max_new_tokens"] == 256
        assert after["bio"] == before["bio"] and after["completion"] == before["completion"]
    finally:
        if old is None:
            cfg.remove_option("decoding", "lengths")
        else:
            cfg.set("decoding", "lengths", old)
        Register.clear_instance_cache()
