"""Bad input: defined behaviour and a one-line message, never a crash deep inside torch."""

import pytest

from decoding_tiny import TinyTokenizer, random_passages, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, Passage, make_decoder
from stages.errors import InputError


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, max_pos=64)


def test_empty_prompt_and_empty_question(model, tok):
    dec = make_decoder("nest", model, tok, NestConfig(max_new_tokens=4))
    with pytest.raises(InputError, match="example 7: empty prompt"):
        dec.decode([DecodeRequest(7, prompt_ids=[])])
    with pytest.raises(InputError, match="example 8: empty question"):
        dec.decode([DecodeRequest(8, "qa", question="  ")])
    with pytest.raises(InputError, match="unknown kind"):
        dec.decode([DecodeRequest(9, "poem")])
    # the message is one line naming the example
    with pytest.raises(InputError) as err:
        dec.decode([DecodeRequest(3, prompt_ids=[5]), DecodeRequest(4, prompt_ids=[])])
    assert "\n" not in str(err.value) and "example 4" in str(err.value)


def test_prompt_longer_than_the_context_window(model, tok):
    long = DecodeRequest(1, prompt_ids=[5] * 80, max_new_tokens=8)
    with pytest.raises(InputError, match="80 tokens.*context window of 64"):
        make_decoder("base", model, tok, NestConfig()).decode([long])
    g = make_decoder("base", model, tok, NestConfig(prompt_overflow="truncate_left")).decode([long])[0]
    assert g.counters["prompt_truncated"] == 80 - 56 and len(g.token_ids) == 8
    # a prompt that fits but leaves less room than asked: generation stops at the window
    g = make_decoder("nest", model, tok, NestConfig()).decode(
        [DecodeRequest(2, prompt_ids=[5] * 60, max_new_tokens=20, passages=random_passages(1, 2))])[0]
    assert len(g.token_ids) == 4 and g.counters["stopped_at_context_window"] == 1


def test_no_passages_falls_back_to_the_base_lm(model, tok):
    req = [DecodeRequest(0, "completion", prefix="abc", max_new_tokens=10)]
    base = make_decoder("base", model, tok, NestConfig()).decode(req)[0]
    for method in ("nest", "knnlm", "ra_nest"):
        g = make_decoder(method, model, tok, NestConfig()).decode(req)[0]
        assert g.counters["fallback_no_passages"] == 1 and g.sources == [None] * 10
        if method != "ra_nest":
            assert g.token_ids == base.token_ids
    # passages too short to give a key (one token, no BOS) count as none
    req = [DecodeRequest(0, "completion", prefix="abc", max_new_tokens=10, passages=[Passage(1, [9])])]
    assert make_decoder("nest", model, tok, NestConfig()).decode(req)[0].counters["fallback_no_passages"] == 1


def test_all_keys_masked_continues_with_the_lm(model, tok):
    # 3 keys in all; paper masking uses them up; then p_M = p_LM and the steps are counted
    req = [DecodeRequest(0, "completion", prefix="abc", max_new_tokens=12,
                         passages=[Passage(1, [10, 11]), Passage(2, [12, 13, 14])])]
    g = make_decoder("nest", model, tok, NestConfig(gamma=1e-9, delta=1.0)).decode(req)[0]
    assert len(g.token_ids) == 12 and g.counters["steps_without_valid_keys"] > 0
    assert sum(s is not None for s in g.sources) <= 3


def test_bad_token_ids_options_and_zero_budget(model, tok):
    dec = make_decoder("nest", model, tok, NestConfig())
    with pytest.raises(InputError, match="passage 5 has token id 64 outside the vocabulary"):
        dec.decode([DecodeRequest(0, prompt_ids=[5], passages=[Passage(5, [3, 64])])])
    with pytest.raises(InputError, match="prompt token id -1"):
        dec.decode([DecodeRequest(0, prompt_ids=[-1])])
    with pytest.raises(ValueError, match="unknown decoding method"):
        make_decoder("beam", model, tok)
    with pytest.raises(ValueError, match="key_layer"):
        NestConfig(key_layer="middle")
    with pytest.raises(ValueError, match="gamma"):
        NestConfig(gamma=0)
    g = dec.decode([DecodeRequest(0, prompt_ids=[5], max_new_tokens=0)])[0]
    assert g.token_ids == [] and g.text == "" and g.counters["generated_tokens"] == 0
