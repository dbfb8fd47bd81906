"""Hybrid fusion (stages/retrieval/fusion.py) on hand-made score lists; every expected value is worked out in the comments."""

import pytest

from stages.retrieval.fusion import (RELEASED_CODE, fuse, fuse_many, fusion_coefficient, fusion_weights,
                                     retriever_confidence)


def test_retriever_confidence_by_hand():
    s = [10.0, 8.0, 6.0, 5.0]
    # rank 3 is index 2: 1 - 6/10 = 0.4
    assert retriever_confidence(s, conf_rank=3) == pytest.approx(0.4)
    # conf_index is 0-based: index 1 -> 1 - 8/10 = 0.2
    assert retriever_confidence(s, conf_index=1) == pytest.approx(0.2)
    # the list is shorter than 100: its last score, 5 -> 1 - 5/10 = 0.5
    assert retriever_confidence(s, conf_rank=100) == pytest.approx(0.5)


def test_retriever_confidence_clip_and_degenerate_lists():
    s = [2.0, 1.0, -0.5]
    # no clip: 1 - (-0.5 / 2) = 1.25; clip: the reference becomes 0 -> 1 - 0/2 = 1.0
    assert retriever_confidence(s, conf_rank=3) == pytest.approx(1.25)
    assert retriever_confidence(s, conf_rank=3, clip=True) == pytest.approx(1.0)
    assert retriever_confidence([], conf_rank=100) == 0.0
    assert retriever_confidence([0.0, 0.0], conf_rank=1) == 0.0
    with pytest.raises(ValueError):
        retriever_confidence(s, conf_rank=0)


def test_fusion_coefficient_by_hand():
    # eta_sparse = 1 - 6/10 = 0.4 ; eta_dense = 1 - 0.45/0.9 = 0.5
    # eta = 0.7 * (1 - 0.4) + 0.3 * 0.5 = 0.42 + 0.15 = 0.57
    eta = fusion_coefficient([10.0, 8.0, 6.0, 5.0], [0.9, 0.6, 0.45], conf_rank=3)
    assert eta == pytest.approx(0.57)
    # a different weight w: (1 - 0.5) * 0.6 + 0.5 * 0.5 = 0.55
    assert fusion_coefficient([10.0, 8.0, 6.0, 5.0], [0.9, 0.6, 0.45], conf_rank=3,
                              dense_weight=0.5) == pytest.approx(0.55)


def test_paper_vs_released_code_reading_of_the_100th_hit():
    sparse = [200.0 - i for i in range(200)]          # s[i] = 200 - i
    dense = [(99.5 - i) / 64 for i in range(200)]     # d[99] = +1/128, d[100] = -1/128 (exact in binary)
    # paper, rank 100 = index 99:
    #   eta_sparse = 1 - 101/200 = 0.495 ; eta_dense = 1 - (0.5/64) / (99.5/64) = 1 - 1/199 = 198/199
    #   eta = 0.7 * 0.505 + 0.3 * 198/199 = 0.3535 + 0.29849246... = 0.65199246...
    paper = fusion_coefficient(sparse, dense)
    assert paper == pytest.approx(0.7 * 0.505 + 0.3 * 198 / 199)
    assert paper == pytest.approx(0.651992462, abs=1e-9)
    # released code, index 100 and dense clipped at 0:
    #   eta_sparse = 1 - 100/200 = 0.5 ; d[100] = -1/128 -> clipped to 0 -> eta_dense = 1
    #   eta = 0.7 * 0.5 + 0.3 * 1 = 0.65
    assert fusion_coefficient(sparse, dense, **RELEASED_CODE) == pytest.approx(0.65)
    # index 100 without the clip: eta_dense = 1 + 1/199 -> eta = 0.35 + 0.3 * 200/199
    assert fusion_coefficient(sparse, dense, conf_rank=101) == pytest.approx(0.35 + 0.3 * 200 / 199)
    # conf_index=100 is the same position as conf_rank=101
    assert fusion_coefficient(sparse, dense, conf_index=100, clip_dense=True) == pytest.approx(0.65)


SPARSE = [(1, 12.0), (2, 9.0), (3, 6.0), (4, 3.0)]
DENSE = [(3, 0.8), (5, 0.7), (1, 0.5), (6, 0.2)]
# conf_rank = 3: eta_sparse = 1 - 6/12 = 0.5 ; eta_dense = 1 - 0.5/0.8 = 0.375
# eta = 0.7 * 0.5 + 0.3 * 0.375 = 0.35 + 0.1125 = 0.4625 ; 1 - eta = 0.5375
# fills (each list's minimum): sparse 3.0, dense 0.2
# doc 1: 0.4625*0.5 + 0.5375*12  = 0.23125 + 6.45   = 6.68125
# doc 2: 0.4625*0.2 + 0.5375*9   = 0.0925  + 4.8375 = 4.93      (dense filled)
# doc 3: 0.4625*0.8 + 0.5375*6   = 0.37    + 3.225  = 3.595
# doc 4: 0.4625*0.2 + 0.5375*3   = 0.0925  + 1.6125 = 1.705     (dense filled)
# doc 5: 0.4625*0.7 + 0.5375*3   = 0.32375 + 1.6125 = 1.93625   (sparse filled)
# doc 6: 0.4625*0.2 + 0.5375*3   = 1.705                        (sparse filled; ties doc 4, smaller id first)


def test_fuse_by_hand():
    rows = fuse(SPARSE, DENSE, b=10, conf_rank=3)
    assert [r[0] for r in rows] == [1, 2, 3, 5, 4, 6]
    expected = {1: 6.68125, 2: 4.93, 3: 3.595, 4: 1.705, 5: 1.93625, 6: 1.705}
    for doc_id, fused, _, _ in rows:
        assert fused == pytest.approx(expected[doc_id])
    # raw scores are kept, None where the score was filled
    assert rows[0][2:] == (12.0, 0.5)
    assert rows[1][2:] == (9.0, None)
    assert rows[3][2:] == (None, 0.7)


def test_fuse_top_b_and_given_eta():
    assert [r[0] for r in fuse(SPARSE, DENSE, b=4, conf_rank=3)] == [1, 2, 3, 5]
    # eta = 1: dense scores only, filled with 0.2 -> 3 (0.8), 5 (0.7), 1 (0.5), then 2, 4, 6 tied at 0.2 by id
    assert [r[0] for r in fuse(SPARSE, DENSE, b=10, eta=1.0)] == [3, 5, 1, 2, 4, 6]
    # eta = 0: sparse only, filled with 3.0 -> 1, 2, 3, then 4, 5, 6 tied at 3.0
    assert [r[0] for r in fuse(SPARSE, DENSE, b=10, eta=0.0)] == [1, 2, 3, 4, 5, 6]


def test_fuse_with_an_empty_sparse_list():
    # BM25 can return nothing (no query term in the corpus): eta_sparse = 0, fill = 0
    # eta_dense = 1 - 0.3/0.9 = 2/3 ; eta = 0.7 * 1 + 0.3 * 2/3 = 0.9
    # doc 7: 0.9 * 0.9 = 0.81 ; doc 8: 0.9 * 0.3 = 0.27
    rows = fuse([], [(7, 0.9), (8, 0.3)], b=5)
    assert [(r[0], r[2], r[3]) for r in rows] == [(7, None, 0.9), (8, None, 0.3)]
    assert rows[0][1] == pytest.approx(0.81)
    assert rows[1][1] == pytest.approx(0.27)


# ---- any number of retrievers (fusion_weights, fuse_many) ------------------------------------------------------------

def test_fuse_many_is_the_paper_formula_bit_for_bit_on_two_lists():
    """Two lists (BM25 first, dense second, priors 1 − w and w): the same fused scores as fuse(), compared with ==."""
    import random

    rnd = random.Random(7)
    cases = [(SPARSE, DENSE, {"conf_rank": 3}), ([], DENSE, {}), (SPARSE, [], {"conf_rank": 2})]
    for _ in range(200):
        docs = rnd.sample(range(60), 40)
        s = sorted(((d, rnd.uniform(0, 30)) for d in docs[:25]), key=lambda h: -h[1])
        d = sorted(((d, rnd.uniform(-0.4, 0.9)) for d in docs[15:]), key=lambda h: -h[1])
        cases.append((s, d, {"conf_rank": rnd.choice([1, 5, 10, 100]), "clip_dense": rnd.random() < 0.5,
                             "dense_weight": rnd.choice([0.3, 0.5, 0.1])}))
    for s, d, kw in cases:
        w = kw.get("dense_weight", 0.3)
        want = fuse(s, d, 12, **kw)
        got, weights = fuse_many([s, d], [1.0 - w, w], 12, conf_rank=kw.get("conf_rank", 100),
                                 clip=[kw.get("clip_dense", False)] * 2)
        assert got == want  # exact: same floats, same order
        eta = fusion_coefficient([x for _, x in s], [x for _, x in d], kw.get("conf_rank", 100),
                                 clip_dense=kw.get("clip_dense", False), dense_weight=w)
        assert weights == [1.0 - eta, eta]


def test_fuse_many_three_retrievers_by_hand():
    a = [(1, 10.0), (2, 6.0), (3, 5.0)]
    b = [(1, 0.9), (4, 0.45)]
    c = [(2, 4.0), (4, 2.0)]
    # conf_rank = 2: eta_a = 1 - 6/10 = 0.4, eta_b = 1 - 0.45/0.9 = 0.5, eta_c = 1 - 2/4 = 0.5
    # priors 0.5, 0.25, 0.25; handed on: a 0.5*0.6 = 0.3, b 0.125, c 0.125 (split over the N - 1 = 2 others)
    # w_b = 0.25*0.5 + (0.3 + 0.125)/2 = 0.3375 = w_c ; w_a = 1 - 0.675 = 0.325 (= 0.5*0.4 + 0.25/2)
    assert fusion_weights([0.4, 0.5, 0.5], [0.5, 0.25, 0.25]) == pytest.approx([0.325, 0.3375, 0.3375])
    rows, weights = fuse_many([a, b, c], [0.5, 0.25, 0.25], b=4, conf_rank=2)
    assert weights == pytest.approx([0.325, 0.3375, 0.3375]) and sum(weights) == pytest.approx(1.0)
    # fills (each list's minimum): a 5.0, b 0.45, c 2.0
    # doc 1: 0.325*10 + 0.3375*0.9 + 0.3375*2.0  = 3.25 + 0.30375 + 0.675 = 4.22875
    # doc 2: 0.325*6 + 0.3375*0.45 + 0.3375*4.0  = 1.95 + 0.151875 + 1.35 = 3.451875
    # doc 3: 0.325*5 + 0.3375*0.45 + 0.3375*2.0  = 2.451875 ; doc 4: 0.325*5 (filled) + the same = 2.451875 (tie: 3 first)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[1] for r in rows] == pytest.approx([4.22875, 3.451875, 2.451875, 2.451875])
    assert rows[0][2:] == (10.0, 0.9, None) and rows[3][2:] == (None, 0.45, 2.0)


def test_fusion_weights_edge_cases():
    assert fusion_weights([0.7], [1.0]) == [1.0]  # one retriever: its score is the fused score
    with pytest.raises(ValueError, match="one prior per retriever"):
        fusion_weights([0.1, 0.2], [1.0])
