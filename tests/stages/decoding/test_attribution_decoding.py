"""Copied vs supported on the tiny random Llama : ``sources`` hold only tokens copied from an
accepted draft or a streamed continuation; tokens produced one at a time whose value a neighbour carries are in
``supported``; masking is unchanged."""

import pytest

from decoding_tiny import TinyTokenizer, mixed_requests, random_passages, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, make_decoder
from tasks.metrics import attribution_stats


def requests(n_new=24):
    return mixed_requests(n_new)[:2]  # a completion and a question


def check_values(gens, reqs):
    """Every copied and every supported token equals the passage token its source names; never both on one token."""
    by_doc = {p.doc_id: list(p.token_ids) for r in reqs for p in r.passages}
    for g in gens:
        assert len(g.supported) == len(g.sources) == len(g.token_ids)
        for t, c, s in zip(g.token_ids, g.sources, g.supported):
            assert c is None or s is None
            for src in (c, s):
                assert src is None or by_doc[src[0]][src[1]] == t


def pooled(gens):
    st = [attribution_stats(g.sources, g.supported) for g in gens]
    n = sum(s["tokens"] for s in st)
    return sum(s["copied_tokens"] for s in st) / n, sum(s["supported_tokens"] for s in st) / n


def test_knnlm_copies_nothing_but_its_tokens_are_supported(model, tok):
    for lam_mode in ("fixed", "rrc"):
        reqs = requests()
        gens = make_decoder("knnlm", model, tok, NestConfig(knnlm_lambda_mode=lam_mode)).decode(reqs)
        copied, supported = pooled(gens)
        assert copied == 0.0 and all(g.spans == [] for g in gens)  # no spans: nothing is a copy
        assert supported > 0                                        # ...but neighbours carry some of its tokens
        check_values(gens, reqs)


@pytest.mark.parametrize("cfg", [dict(gamma=1e-9, delta=1.0, span_length=5),
                                 dict(gamma=0.05, delta=0.7, span_length=4, masking="code", span_start="code"),
                                 dict(gamma=0.5, delta=0.5, span_length=6, masking="off")])
def test_nest_copies_and_supports_apart(model, tok, cfg):
    reqs = requests()
    gens = make_decoder("nest", model, tok, NestConfig(**cfg)).decode(reqs)
    check_values(gens, reqs)
    for g in gens:  # spans are runs over copied tokens only
        for start, length, doc in g.spans:
            assert all(g.sources[i] is not None and g.sources[i][0] == doc for i in range(start, start + length))
    copied, _ = pooled(gens)
    if cfg["delta"] == 1.0:  # span mode at every step with everything accepted: nearly all copied
        assert copied > 0.8


def test_token_mode_attribution_off_records_no_support(model, tok):
    reqs = requests()
    gens = make_decoder("knnlm", model, tok, NestConfig(token_mode_attribution=False)).decode(reqs)
    assert pooled(gens) == (0.0, 0.0)


def test_supported_keys_are_masked_like_copies(model, tok):
    # paper masking masks every emitted corpus token's key, the supported ones included (as before the split): with
    # NEST, no (doc, pos) appears twice among copied and supported tokens together
    reqs = [DecodeRequest(0, "completion", prefix="one", passages=random_passages(41, 3, lo=10, hi=14),
                          max_new_tokens=40)]
    g = make_decoder("nest", model, tok, NestConfig(gamma=0.05, delta=0.6, span_length=4)).decode(reqs)[0]
    used = [c if c is not None else s for c, s in zip(g.sources, g.supported) if c is not None or s is not None]
    assert any(s is not None for s in g.supported) and any(c is not None for c in g.sources)
    assert len(set(used)) == len(used)
