"""Perplexity (evaluation mode): the NLL of a target under each method's distribution, on a tiny random Llama."""

import math

import torch

from stages.decoding import DecodeRequest, NestConfig, make_decoder
from stages.evaluation.perplexity import target_nll
from tests.decoding_tiny import TinyTokenizer, random_passages, tiny_llama

PROMPT = [5, 9, 17, 33, 8, 12]
TARGET = [40, 41, 7, 19, 22, 60, 4]


def _direct_nll(model, prompt, target):
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(-sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(target)))


def test_base_nll_equals_one_full_forward():
    model, tok = tiny_llama(), TinyTokenizer()
    dec = make_decoder("base", model, tok, NestConfig())
    nll = target_nll(dec, DecodeRequest(0, prompt_ids=PROMPT), TARGET)
    assert math.isclose(nll, _direct_nll(model, PROMPT, TARGET), rel_tol=1e-4)


def test_mixture_with_lambda_one_is_the_lm():
    model, tok = tiny_llama(), TinyTokenizer()
    dec = make_decoder("nest", model, tok, NestConfig(force_lambda=1.0))
    req = DecodeRequest(0, prompt_ids=PROMPT, passages=random_passages(1, 4))
    assert math.isclose(target_nll(dec, req, TARGET), _direct_nll(model, PROMPT, TARGET), rel_tol=1e-4)


def test_knn_mass_changes_the_nll_and_copying_lowers_it():
    """With λ = 0 the score is the kNN distribution alone: a target that is a passage's continuation gets mass."""
    model, tok = tiny_llama(), TinyTokenizer()
    passages = random_passages(2, 3)
    src = list(passages[0].token_ids)
    prompt, target = src[:6], src[6:12]
    copy = make_decoder("knnlm", model, tok, NestConfig(knnlm_lambda=0.5))
    base = make_decoder("base", model, tok, NestConfig())
    req = DecodeRequest(0, prompt_ids=prompt, passages=passages)
    assert target_nll(copy, req, target) < target_nll(base, req, target)
