"""The FactScore judge's real pieces: BM25 support passages from the corpus, and a local HF chat LM that answers."""

import importlib.util

import pytest

from stages.retrieval import bm25
from stages.evaluation.judge import HFJudge, bm25_retriever
from tasks.factscore import parse_verdict, support_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bm25_dir(tmp_path_factory, micro_passages_dir):
    if importlib.util.find_spec("pyserini") is None:
        pytest.skip("pyserini not installed")
    out = tmp_path_factory.mktemp("judge_bm25")
    bm25.run(out, passages=micro_passages_dir)
    return out


def test_support_passages_lead_with_the_entitys_page(bm25_dir, micro_passages_dir):
    retrieve = bm25_retriever(bm25_dir, micro_passages_dir, k=3)
    texts = retrieve("Bill Gates", "co-founded Microsoft")
    assert len(texts) == 3 and texts[0].startswith("Bill Gates. ")
    assert "Microsoft" in texts[0]


def test_the_judge_answers_a_support_prompt(real_lm_dir, bm25_dir, micro_passages_dir):
    judge = HFJudge(real_lm_dir, max_new_tokens=8)
    passages = bm25_retriever(bm25_dir, micro_passages_dir, k=1)("Bill Gates", "co-founded Microsoft")
    answer = judge.generate(support_prompt("Bill Gates", "Bill Gates co-founded Microsoft.", passages))
    assert isinstance(answer, str) and answer.strip()
    assert isinstance(parse_verdict(answer), bool)
