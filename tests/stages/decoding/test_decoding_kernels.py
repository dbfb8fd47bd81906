"""The pure kernels of stages.decoding.kernels on hand-made tensors, answers worked out by hand.
(Attribution metrics: tests/tasks/test_attribution.py.)"""

import math

import pytest
import torch

from stages.decoding.kernels import (acceptance_length, knn_distribution, lm_distribution, mixture,
                                     mixture_from_neighbors, mu_for, negative_squared_l2, neighbor_weights,
                                     relative_retrieval_confidence, select_span_start, top_neighbors)


def test_negative_squared_l2_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    s = negative_squared_l2(q, k)
    # q0: |0|², |(1,-1)|² = 2, |(-2,0)|² = 4 ; q1: |(-1,2)|² = 5, |(0,1)|² = 1, |(-3,2)|² = 13
    assert torch.allclose(s, torch.tensor([[0.0, -2.0, -4.0], [-5.0, -1.0, -13.0]]))
    assert s.dtype == torch.float32
    # precomputed norms and half-precision inputs give the same fp32 answer
    s2 = negative_squared_l2(q.half(), k.half(), (k * k).sum(-1))
    assert s2.dtype == torch.float32 and torch.allclose(s2, s)


def test_top_neighbors_clamps_r_to_valid_keys_b7():
    scores = torch.tensor([[-1.0, -5.0, -2.0, -3.0]])
    valid = torch.tensor([True, True, False, True])
    top, idx = top_neighbors(scores, r=8, valid=valid)
    assert idx.tolist() == [[0, 3, 1]]  # the masked key 2 is never returned, r' = 3 not 8
    assert top.tolist() == [[-1.0, -3.0, -5.0]]
    top, idx = top_neighbors(scores, r=2)
    assert idx.tolist() == [[0, 2]]
    top, idx = top_neighbors(scores, r=4, valid=torch.zeros(4, dtype=torch.bool))
    assert top.shape == (1, 0)


def test_knn_distribution_by_hand_and_no_mass_on_invalid_b6():
    # µ = 1: weights ∝ exp(0) = 1 and exp(−ln 3) = 1/3 → 0.75 / 0.25
    p = knn_distribution(torch.tensor([[0.0, -math.log(3.0)]]), torch.tensor([[5, 7]]), vocab_size=8, mu=1.0)
    assert p[0, 5].item() == pytest.approx(0.75) and p[0, 7].item() == pytest.approx(0.25)
    assert p.sum().item() == pytest.approx(1.0)
    # two neighbours with the same value add up
    p = knn_distribution(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[2, 2, 6]]), vocab_size=8, mu=1.0)
    assert p[0, 2].item() == pytest.approx(2 / 3) and p[0, 6].item() == pytest.approx(1 / 3)
    # a −inf slot, a negative value (the released code's pad −1) and an out-of-vocabulary value carry no mass
    p = knn_distribution(torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]), torch.tensor([[3, 4, -1, 99]]),
                         vocab_size=8, mu=1.0)
    assert p[0, 3].item() == pytest.approx(1.0) and p[0, 0].item() == 0.0 and p[0, 7].item() == 0.0
    # no valid slot at all: an all-zero row, not NaN
    p = knn_distribution(torch.tensor([[float("-inf")]]), torch.tensor([[3]]), vocab_size=8, mu=1.0)
    assert p.sum().item() == 0.0 and not torch.isnan(p).any()


def test_mu_and_neighbor_weights():
    assert mu_for(4096) == pytest.approx(1 / 64)
    w = neighbor_weights(torch.tensor([[0.0, -64 * math.log(2.0)]]), mu=1 / 64)  # exp(−ln 2) = 1/2 → 2/3, 1/3
    assert w[0].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_relative_retrieval_confidence_eq4():
    # α = 0.3, τ = 0.1: distances [1, 10] → ratio 0.1 → σ(−2); [3, 10] → σ(0) = 0.5; [5, 10] → σ(2)
    s = -torch.tensor([[1.0, 4.0, 10.0], [3.0, 5.0, 10.0], [5.0, 6.0, 10.0]])
    lam = relative_retrieval_confidence(s, alpha=0.3, tau=0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert lam.tolist() == pytest.approx([sig(-2.0), 0.5, sig(2.0)], abs=1e-6)
    # Alg. 1's signed min/max would give 10/1 ≥ 1 (D5): λ would be ≈ 1 for a confident retrieval; Eq. 4 gives 0.12
    assert lam[0] < 0.2
    # −inf slots (invalid) are ignored; no neighbour at all → λ = 1; all distances 0 → ratio 1
    lam = relative_retrieval_confidence(torch.tensor([[-1.0, -10.0, float("-inf")]]), 0.3, 0.1)
    assert lam.item() == pytest.approx(sig(-2.0), abs=1e-6)
    assert relative_retrieval_confidence(torch.zeros((2, 0)), 0.3, 0.1).tolist() == [1.0, 1.0]
    assert relative_retrieval_confidence(torch.zeros((1, 3)), 0.3, 0.1).item() == pytest.approx(sig(7.0))


def test_lm_distribution_temperature_and_mixture():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert lm_distribution(logits).tolist()[0] == pytest.approx([0.25, 0.75])
    # T = 0.5 squares the odds: 1 : 9
    assert lm_distribution(logits, 0.5).tolist()[0] == pytest.approx([0.1, 0.9])
    p_lm = torch.tensor([[0.25, 0.75]])
    p_knn = torch.tensor([[1.0, 0.0]])
    assert mixture(p_lm, p_knn, torch.tensor([0.2])).tolist()[0] == pytest.approx([0.85, 0.15])
    assert mixture(p_lm, p_knn, 1.0).tolist()[0] == pytest.approx([0.25, 0.75])


def test_fused_mixture_equals_the_two_step_form():
    torch.manual_seed(0)
    p_lm = torch.softmax(torch.randn(3, 10), -1)
    scores = -torch.rand(3, 5) * 4
    scores[1, 3:] = float("-inf")
    scores[2, :] = float("-inf")  # no valid neighbour: p_M = λ·p_LM
    values = torch.randint(0, 10, (3, 5))
    values[0, 0] = -1
    lam = torch.tensor([0.2, 0.5, 0.9])
    ref = mixture(p_lm, knn_distribution(scores, values, 10, mu=0.7), lam)
    assert torch.allclose(mixture_from_neighbors(p_lm, scores, values, lam, mu=0.7), ref, atol=1e-7)
    assert torch.allclose(ref[2], 0.9 * p_lm[2])


def test_select_span_start_paper_vs_code_d3():
    # neighbours sorted best first: values [7, 3, 3]; p_M's argmax is 3, p_LM prefers 7
    values = torch.tensor([7, 3, 3])
    scores = torch.tensor([0.0, -1.0, -2.0])
    p_m = torch.zeros(10)
    p_m[3], p_m[7] = 0.6, 0.4
    p_lm = torch.zeros(10)
    p_lm[3], p_lm[7] = 0.1, 0.9
    # paper: the nearest neighbour carrying argmax p_M = 3 → index 1
    assert select_span_start(p_m, p_lm, 0.4, values, scores, mu=1.0, rule="paper") == 1
    # code (D3): argmax λ·p_LM(v_i) + 1e-6·w_i → value 7 → index 0, although argmax p_M = 3
    assert select_span_start(p_m, p_lm, 0.4, values, scores, mu=1.0, rule="code") == 0
    # code: ties in p_LM go to the nearest neighbour (higher w_i)
    assert select_span_start(p_m, p_lm, 0.4, torch.tensor([3, 3]), torch.tensor([-2.0, -1.0]), 1.0, "code") in (1,)
    # paper: no neighbour carries argmax p_M → −1 (the step falls back to token mode)
    assert select_span_start(p_m, p_lm, 0.4, torch.tensor([5, 6]), torch.tensor([0.0, -1.0]), 1.0, "paper") == -1
    assert select_span_start(p_m, p_lm, 0.4, torch.zeros(0, dtype=torch.long), torch.zeros(0), 1.0, "paper") == -1


def test_acceptance_length_relaxed_eq7_and_strict():
    p_m = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    # γ = 0.5 → threshold 0.25·max: row 0 accepts 1 (0.4 > 0.15), row 1 rejects 1 (0.1 < 0.225): leading run = 1
    assert acceptance_length(p_m, torch.tensor([1, 1, 0]), gamma=0.5) == 1
    # γ = 0.1 → threshold 0.05·max: 0.1 > 0.045 accepted → all 3
    assert acceptance_length(p_m, torch.tensor([1, 1, 0]), gamma=0.1) == 3
    # strict: only the argmax; a tie takes the first index (0)
    assert acceptance_length(p_m, torch.tensor([0, 0, 0]), gamma=1.0, strict=True) == 3
    assert acceptance_length(p_m, torch.tensor([1, 0, 0]), gamma=1e-9, strict=True) == 0
    assert acceptance_length(p_m[:0], torch.tensor([], dtype=torch.long), gamma=0.5) == 0
    # the boundary is strict: p = 0.5·γ·max exactly is rejected (Alg. 1: stop when P(accept) ≤ 0.5)
    assert acceptance_length(torch.tensor([[0.8, 0.2]]), torch.tensor([1]), gamma=0.5) == 0
