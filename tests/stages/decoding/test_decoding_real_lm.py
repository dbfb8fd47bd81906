"""End-to-end checks on the real embedded LM (SmolLM2-135M-Instruct), each on a few short passages and 32 new tokens:

- NEST copies a passage that continues the prompt, and every copied token matches its passage;
- strict NEST at δ = 1 (span mode wherever there are neighbours, λ from RRC, not forced) equals the token-by-token
  reference, kNN-LM with the RRC λ_t (invariant (b) of the tiny-model tests), with drafts both accepted and rejected;
- a batch of 3 equals the 3 examples decoded alone (tokens and sources), in a setting with spans and rejections;
- forcing KV-cache compaction (small ``compact_min_slots``) changes nothing, and compactions did happen.
"""

import pytest

from stages.decoding import DecodeRequest, NestConfig, Passage, make_decoder

CURIE = ("Marie Curie. Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering "
         "research on radioactivity. She was the first woman to win a Nobel Prize, the first person to win a Nobel "
         "Prize twice, and the only person to win a Nobel Prize in two scientific fields.")
OTHERS = ["Andorra. Andorra is a landlocked country on the Iberian Peninsula, in the eastern Pyrenees.",
          "Water. Water is an inorganic compound with the chemical formula H2O. It is a transparent, tasteless, "
          "odorless, and nearly colorless chemical substance.",
          "Jet stream. Jet streams are fast flowing, narrow, meandering thermal wind air currents in the atmospheres "
          "of some planets, including Earth."]
N_NEW = 32
# the embedded profile's mixture (luigi.cfg [decoding]): λ_t from RRC, well below 1 when a passage matches
MIXTURE = dict(alpha=0.2, mu=0.5, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def lm(real_lm_dir):
    from stages.lm.load import load_lm

    return load_lm(real_lm_dir)


@pytest.fixture(scope="module")
def passages(lm):
    _, tok = lm
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [Passage(10, ids(CURIE), "Marie Curie", CURIE)] + [Passage(20 + i, ids(t)) for i, t in enumerate(OTHERS)]


@pytest.fixture(scope="module")
def requests(passages):
    """Three examples of different kinds and prompt lengths (so a batch has padding and rows that end apart)."""
    curie, water = passages[0].token_ids, passages[2].token_ids
    return [DecodeRequest(0, "completion", prefix_ids=curie[:12], passages=passages),
            DecodeRequest(1, "qa", question="Who was Marie Curie?", passages=passages[::-1]),
            DecodeRequest(2, "completion", prefix_ids=water[:6], passages=passages[1:])]


def check_sources(gens, reqs):
    by_doc = {p.doc_id: list(p.token_ids) for r in reqs for p in r.passages}
    for g in gens:
        assert len(g.sources) == len(g.token_ids)
        for t, s in zip(g.token_ids, g.sources):
            assert s is None or by_doc[s[0]][s[1]] == t


def total(gens, name):
    return sum(g.counters[name] for g in gens)


@pytest.mark.slow
def test_nest_copies_the_passage_that_continues_the_prompt(lm, passages, requests):
    model, tok = lm
    req = [DecodeRequest(0, "completion", prefix_ids=passages[0].token_ids[:12], passages=passages,
                         max_new_tokens=16)]
    base = make_decoder("base", model, tok, NestConfig(max_new_tokens=16)).decode(req)[0]
    for cfg in (NestConfig(max_new_tokens=16, key_layer="code"), NestConfig.released_code(max_new_tokens=16)):
        g = make_decoder("nest", model, tok, cfg).decode(req)[0]
        check_sources([g], req)
        copied = [s for s in g.sources if s is not None and s[0] == 10]
        assert len(copied) >= len(g.token_ids) // 2, (cfg.key_layer, g.text)
        assert g.counters["lm_forward_passes"] < base.counters["lm_forward_passes"]


@pytest.mark.slow
def test_strict_nest_at_delta_one_equals_token_by_token_knnlm_with_rrc(lm, requests):
    # Strict acceptance keeps a draft token only if it is argmax p_M, so NEST must give exactly the tokens of the
    # token-by-token mixture with the same λ_t (kNN-LM + RRC). δ = 1: span mode at every step with neighbours, so
    # drafts are proposed all the time; λ is not forced, so the kNN search and the mixture decide every token.
    model, tok = lm
    reqs = requests[:2]
    common = dict(masking="off", span_length=8, **MIXTURE)
    ref = make_decoder("knnlm", model, tok, NestConfig(knnlm_lambda_mode="rrc", **common)).decode(reqs)
    nest = make_decoder("nest", model, tok, NestConfig(acceptance="strict", delta=1.0, **common)).decode(reqs)
    assert [g.token_ids for g in nest] == [g.token_ids for g in ref]
    assert all(len(g.token_ids) == N_NEW for g in nest)
    # it compares something: drafts were proposed, accepted (copying saved LM passes) and rejected
    assert total(nest, "steps_span") > 0 and total(nest, "accepted") > 0 and total(nest, "rejections") > 0
    assert total(nest, "lm_forward_passes") < total(ref, "lm_forward_passes")
    assert total(ref, "knn_searches") > 0 and total(nest, "knn_searches") > 0
    check_sources(nest, reqs)


BATCH_SETTING = dict(gamma=0.5, delta=1.0, span_length=8, **MIXTURE)  # relaxed: spans accepted and rejected


@pytest.fixture(scope="module")
def alone(lm, requests):
    model, tok = lm
    return make_decoder("nest", model, tok, NestConfig(batch_size=1, **BATCH_SETTING)).decode(requests)


@pytest.fixture(scope="module")
def batched(lm, requests):
    model, tok = lm
    return make_decoder("nest", model, tok, NestConfig(batch_size=3, **BATCH_SETTING)).decode(requests)


@pytest.mark.slow
def test_a_batch_of_three_equals_each_example_alone(alone, batched, requests):
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.sources for g in batched] == [g.sources for g in alone]
    assert total(batched, "accepted") > 0 and total(batched, "rejections") > 0
    assert sum(len(g.spans) for g in batched) > 0
    check_sources(batched, requests)


@pytest.mark.slow
def test_forced_kv_compaction_gives_the_same_tokens(lm, requests, batched):
    # The shared KV cache keeps rejected draft slots and padding as masked holes until holes dominate; then it is
    # compacted (kept slots gathered left). Tiny thresholds force compactions all along the decode.
    model, tok = lm
    cfg = NestConfig(batch_size=3, compact_min_slots=8, compact_hole_fraction=0.05, **BATCH_SETTING)
    compacted = make_decoder("nest", model, tok, cfg).decode(requests)
    assert min(g.counters["kv_compactions"] for g in compacted) > 0
    assert max(g.counters["kv_compactions"] for g in batched) == 0  # the reference run never compacted
    assert [g.token_ids for g in compacted] == [g.token_ids for g in batched]
    assert [g.sources for g in compacted] == [g.sources for g in batched]


def test_sentence_rule_ends_a_copied_answer_on_the_real_lm(lm, passages):
    # Copied Wikipedia text has no line breaks: under the paper's `paragraph` rule NEST copies all of Curie's passage
    # (and more); the QA default `sentence` ends the same answer at its first sentence end, inside the copied run.
    model, tok = lm
    cfg = NestConfig(**{**MIXTURE, "gamma": 0.05, "sink_keys": "drop", "max_new_tokens": 64})

    def answer(stop):
        req = DecodeRequest(0, "qa", question="Who was Marie Curie?", passages=passages, max_new_tokens=64, stop=stop)
        return make_decoder("nest", model, tok, cfg).decode([req])[0]

    long, short = answer("paragraph"), answer("sentence")
    assert long.counters["stopped_by_stop_rule"] == 0 and "\n" not in long.text  # the rule never fired
    assert short.counters["stopped_by_stop_rule"] == 1
    assert short.token_ids == long.token_ids[:len(short.token_ids)] and len(short.token_ids) < len(long.token_ids)
    assert short.text.rstrip().endswith(".") and short.sources[-1] is not None  # ended inside a copied run
    assert long.sources[len(short.token_ids)] is not None  # ... which went on copying under `paragraph`
    from tasks.sentences import first_sentence

    assert first_sentence(long.text).strip() == short.text.strip()
