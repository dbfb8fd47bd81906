"""Perplexity (evaluation mode): the NLL of a target under each method's distribution, on a tiny random Llama."""

import math

import torch

from stages.decoding import DecodeRequest, NestConfig, make_decoder
from stages.evaluation.perplexity import target_nll
from decoding_tiny import TinyTokenizer, random_passages, tiny_llama

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


def test_perplexity_stage_scores_each_completion_with_the_decoders_evaluation_mode(tmp_path, monkeypatch):
    """The stage (shared setup with Generate: stages/evaluation/method_run.py) gives the NLL of target_nll on the same
    request; a method without an evaluation mode is refused before the LM is loaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from stages.decoding import registry
    from stages.evaluation import method_run
    from stages.evaluation import perplexity
    from stages.retrieval import pre_retrieve
    from tasks.base import Example, examples_to_table
    from tests.stages.decoding.test_decoding_timing import _lookup_for, _Reader

    model, tok = tiny_llama(), TinyTokenizer()
    passages = random_passages(3, 3)
    (tmp_path / "e").mkdir()
    (tmp_path / "r").mkdir()
    ex = [Example(example_id=0, task="completion", kind="completion", query="q", prefix="ab",
                  meta={"prefix_ids": PROMPT, "target_ids": TARGET}),
          Example(example_id=1, task="completion", kind="qa", query="q", question="who?")]  # not a completion
    pq.write_table(examples_to_table(ex), tmp_path / "e" / "examples.parquet")
    rows = [{"example_id": 0, "rank": r + 1, "doc_id": p.doc_id, "fused": 1.0, "sparse": None, "dense": None,
             "search_s": 0.0} for r, p in enumerate(passages)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pre_retrieve.SCHEMA), tmp_path / "r" / "retrievals.parquet")
    monkeypatch.setattr(method_run, "load_lm", lambda *a, **k: (model, tok))  # where the stage looks them up
    monkeypatch.setattr(method_run, "PassageReader", _Reader)
    monkeypatch.setattr(method_run, "TokenLookup", _lookup_for(passages))
    (tmp_path / "out").mkdir()
    stats = perplexity.run(tmp_path / "out", examples=tmp_path / "e", passages=tmp_path, tokens=tmp_path, lm=tmp_path,
                           retrievals=tmp_path / "r", method="nest", config={"mu": 0.5})
    out = pq.read_table(tmp_path / "out" / "perplexity.parquet").to_pylist()
    assert stats["examples"] == 1 and stats["skipped_not_completion"] == 1
    dec = make_decoder("nest", model, tok, NestConfig(mu=0.5))
    req = DecodeRequest(0, "completion", prefix="ab", prefix_ids=PROMPT, passages=passages)
    assert out[0]["nll_sum"] == pytest.approx(target_nll(dec, req, TARGET), rel=1e-6)
    assert out[0]["nll_sum"] != pytest.approx(_direct_nll(model, PROMPT, TARGET), rel=1e-3)  # the kNN mass counts
    monkeypatch.setattr(registry, "methods", _without_perplexity(registry))  # as a method declaring perplexity = False
    with pytest.raises(ValueError, match="has no evaluation mode"):
        perplexity.run(tmp_path / "out", examples=tmp_path / "e", passages=tmp_path, tokens=tmp_path, lm=tmp_path,
                       method="base")


def _without_perplexity(registry):
    import dataclasses

    real = registry.methods()
    return lambda: {m: dataclasses.replace(i, perplexity=False) for m, i in real.items()}
