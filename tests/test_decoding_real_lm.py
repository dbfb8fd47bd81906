"""One end-to-end check on the real embedded LM (SmolLM2-135M-Instruct): NEST copies a passage that continues the
prompt, every copied token matches its passage, and λ = 1 gives the base LM's tokens."""

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


@pytest.mark.slow
def test_nest_on_the_real_lm(real_lm_dir):
    from stages.lm import load_lm

    model, tok = load_lm(real_lm_dir)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    curie = ids(CURIE)
    passages = [Passage(10, curie, "Marie Curie", CURIE)] + [Passage(20 + i, ids(t)) for i, t in enumerate(OTHERS)]
    req = [DecodeRequest(0, "completion", prefix_ids=curie[:12], passages=passages, max_new_tokens=16)]
    base = make_decoder("base", model, tok, NestConfig(max_new_tokens=16)).decode(req)[0]
    for cfg in (NestConfig(max_new_tokens=16, key_layer="code"), NestConfig.released_code(max_new_tokens=16)):
        g = make_decoder("nest", model, tok, cfg).decode(req)[0]
        by_doc = {p.doc_id: p.token_ids for p in passages}
        for t, s in zip(g.token_ids, g.sources):
            assert s is None or by_doc[s[0]][s[1]] == t
        copied = [s for s in g.sources if s is not None and s[0] == 10]
        assert len(copied) >= len(g.token_ids) // 2, (cfg.key_layer, g.text)
        assert g.counters["lm_forward_passes"] < base.counters["lm_forward_passes"]
    same = make_decoder("nest", model, tok, NestConfig(max_new_tokens=16, force_lambda=1.0)).decode(req)[0]
    assert same.token_ids == base.token_ids
