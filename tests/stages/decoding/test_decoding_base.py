"""The base decoder's loop: greedy equals Hugging Face ``generate``; sampling is seeded per example."""

import torch

from decoding_tiny import TinyTokenizer, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, make_decoder


def test_base_greedy_equals_hf_generate():
    model, tok = tiny_llama(seed=7), TinyTokenizer()
    reqs = [DecodeRequest(i, "completion", prefix=p, max_new_tokens=20) for i, p in enumerate(["ab", "the end of"])]
    gens = make_decoder("base", model, tok, NestConfig(batch_size=2)).decode(reqs)
    dec = make_decoder("base", model, tok, NestConfig())
    for req, g in zip(reqs, gens):
        ids = torch.tensor([dec.prompt_ids(req)])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 1 in ref:  # HF keeps EOS; we stop before it
            ref = ref[:ref.index(1)]
        assert g.token_ids == ref
        assert g.text == tok.decode(ref) and g.counters["lm_forward_passes"] == len(ref)


def test_sampling_is_seeded_per_example_and_batch_independent():
    model, tok = tiny_llama(seed=8), TinyTokenizer()
    reqs = [DecodeRequest(i, "completion", prefix="x" * (i + 1), max_new_tokens=15) for i in range(3)]
    cfg = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=3)
    a = make_decoder("base", model, tok, NestConfig(batch_size=3, **cfg)).decode(reqs)
    b = make_decoder("base", model, tok, NestConfig(batch_size=1, **cfg)).decode(reqs)
    c = make_decoder("base", model, tok, NestConfig(batch_size=1, **{**cfg, "seed": 4})).decode(reqs)
    greedy = make_decoder("base", model, tok, NestConfig()).decode(reqs)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]
