"""Pure tensor kernels of NEST (paper Eq. 2-7, Alg. 1): scores, top-r, p_kNN, RRC, mixture, span start, acceptance.

Every function is stateless and works on the device of its inputs; distances are always computed in fp32.
Shapes: m = queries, N = keys, d = hidden size, r = neighbours, V = vocabulary.
"""

from __future__ import annotations

import math

import torch

# Weight of the kNN weight w_i in the released code's span-start score λ·p_LM(v_i) + 1e-6·w_i (D3).
CODE_SPAN_START_EPS = 1e-6


def negative_squared_l2(queries: torch.Tensor, keys: torch.Tensor,
                        key_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """s(q, k) = −‖q − k‖² for every query/key pair (paper §2.2, symbol s).

    queries [m, d], keys [N, d], key_sq_norms [N] (‖k‖², precomputed once per index) → scores [m, N], fp32, ≤ 0.
    Computed as 2·q·k − ‖q‖² − ‖k‖² (one matmul) and clamped to ≤ 0 (rounding can make a tiny distance negative).

    Example: q = [1, 0], keys = [[1, 0], [0, 1], [3, 0]] → s = [0, −2, −4].
    """
    q = queries.float()
    k = keys.float()
    if key_sq_norms is None:
        key_sq_norms = (k * k).sum(-1)
    s = 2.0 * (q @ k.T) - (q * q).sum(-1, keepdim=True) - key_sq_norms.float()[None, :]
    return s.clamp_(max=0.0)


def top_neighbors(scores: torch.Tensor, r: int, valid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The r highest scores per query among the valid keys (paper: π, the r = 1024 nearest neighbours).

    scores [m, N], valid [N] bool (None = all valid) → (top_scores [m, r'], top_index [m, r']) sorted best first, with
    r' = min(r, number of valid keys) (B7: asking for more neighbours than valid keys would put masked keys, at
    distance +inf, into π and collapse the RRC to a constant). r' = 0 when no key is valid.

    Example: scores [[−1, −5, −2, −3]], valid [T, T, F, T], r = 8 → r' = 3, top_scores [[−1, −3, −5]],
    index [[0, 3, 1]].
    """
    if valid is not None:
        n_valid = int(valid.sum())
        if n_valid < valid.numel():
            scores = scores.masked_fill(~valid[None, :], float("-inf"))
    else:
        n_valid = scores.shape[-1]
    k = min(int(r), n_valid)
    if k == 0:
        empty = scores.new_zeros((scores.shape[0], 0))
        return empty, empty.long()
    top = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    return top.values, top.indices


def neighbor_weights(neighbor_scores: torch.Tensor, mu: float) -> torch.Tensor:
    """w_i = exp(µ·s_i) / Σ_j exp(µ·s_j) over the retrieved neighbours (Eq. 2 before aggregation), µ = 1/√d.

    neighbor_scores [m, r] (−inf marks an invalid slot, which gets weight 0) → [m, r] fp32 summing to 1 per row (0 for a
    row with no valid slot).
    """
    s = neighbor_scores.float() * mu
    finite = torch.isfinite(s)
    s = s.masked_fill(~finite, float("-inf"))
    row_ok = finite.any(-1, keepdim=True)
    s = torch.where(row_ok, s, torch.zeros_like(s))
    w = torch.softmax(s, dim=-1)
    return torch.where(finite & row_ok, w, torch.zeros_like(w))


def knn_distribution(neighbor_scores: torch.Tensor, neighbor_values: torch.Tensor, vocab_size: int,
                     mu: float) -> torch.Tensor:
    """p_kNN(w) ∝ Σ_i 1[w = v_i]·exp(µ·s_i) (paper Eq. 2), µ = 1/√d.

    neighbor_scores [m, r], neighbor_values [m, r] int (the token v_i that followed key i) → p_kNN [m, V] fp32.
    A slot whose score is −inf or whose value is outside [0, V) carries no mass (B6: padding is never a token), and a
    row is renormalised over the slots that remain; a row with no valid slot is all zeros.

    Example (µ = 1): scores [[0, −ln 3]], values [[5, 7]] → weights ∝ [1, 1/3] → p_kNN[5] = 0.75, p_kNN[7] = 0.25.
    """
    values = neighbor_values.long()
    in_vocab = (values >= 0) & (values < vocab_size)
    scores = neighbor_scores.float().masked_fill(~in_vocab, float("-inf"))
    w = neighbor_weights(scores, mu)
    out = torch.zeros(scores.shape[0], vocab_size, dtype=torch.float32, device=scores.device)
    out.scatter_add_(1, values.clamp(0, vocab_size - 1), w)
    return out


def relative_retrieval_confidence(neighbor_scores: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """λ_t = σ((min_i |s_i| / max_i |s_i| − α) / τ) over the r retrieved neighbours (paper Eq. 4; not Alg. 1's
    signed form, which inverts the ratio: D5).

    neighbor_scores [m, r] (s ≤ 0; −inf slots ignored) → λ [m] fp32. |s| is a squared distance, so the ratio is
    d_nearest / d_farthest ∈ [0, 1]: a nearest neighbour much closer than the rest gives a small ratio, a small λ, and
    more weight on p_kNN. Edge cases: no valid neighbour → λ = 1 (the LM alone); all distances 0 → ratio 1.

    Example (α = 0.3, τ = 0.1): distances [1, 10] → ratio 0.1 → λ = σ(−2) ≈ 0.119; distances [3, 10] → λ = 0.5.
    """
    d = (-neighbor_scores.float()).clamp(min=0.0)
    finite = torch.isfinite(d)
    d_min = torch.where(finite, d, torch.full_like(d, float("inf"))).min(-1).values if d.shape[-1] else \
        d.new_zeros(d.shape[0])
    d_max = torch.where(finite, d, torch.zeros_like(d)).max(-1).values if d.shape[-1] else d.new_zeros(d.shape[0])
    ratio = torch.where(d_max > 0, d_min / d_max.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(d_max))
    lam = torch.sigmoid((ratio - alpha) / tau)
    has_any = finite.any(-1) if d.shape[-1] else torch.zeros_like(ratio, dtype=torch.bool)
    return torch.where(has_any, lam, torch.ones_like(lam))


def lm_distribution(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_LM = softmax(logits / T) in fp32 (T = 1 in the paper; the released code uses 0.7 inside the mixture: D2)."""
    logits = logits.float()
    return torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def mixture(p_lm: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """p_M = λ_t·p_LM + (1 − λ_t)·p_kNN (paper Eq. 3 with λ → λ_t). p_lm, p_knn [m, V], lam [m] or a float → [m, V]."""
    if not torch.is_tensor(lam):
        lam = torch.full((p_lm.shape[0],), float(lam), dtype=torch.float32, device=p_lm.device)
    lam = lam.float()[:, None]
    return lam * p_lm + (1.0 - lam) * p_knn


def mixture_from_neighbors(p_lm: torch.Tensor, neighbor_scores: torch.Tensor, neighbor_values: torch.Tensor,
                           lam: torch.Tensor, mu: float) -> torch.Tensor:
    """p_M = λ_t·p_LM + (1 − λ_t)·p_kNN without materialising p_kNN (the hot path: one [m, V] tensor instead of four).

    Equal to ``mixture(p_lm, knn_distribution(neighbor_scores, neighbor_values, V, mu), lam)``, including its rules:
    invalid slots carry no mass, and a row with no valid slot gets p_M = λ_t·p_LM (its p_kNN is all zeros).
    """
    vocab = p_lm.shape[-1]
    values = neighbor_values.long()
    in_vocab = (values >= 0) & (values < vocab)
    w = neighbor_weights(neighbor_scores.float().masked_fill(~in_vocab, float("-inf")), mu)
    lam = lam.float().to(p_lm.device)[:, None]
    p_m = p_lm * lam
    p_m.scatter_add_(1, values.clamp(0, vocab - 1).to(p_lm.device), (1.0 - lam) * w.to(p_lm.device))
    return p_m


def select_span_start(p_m: torch.Tensor, p_lm: torch.Tensor, lam: float, neighbor_values: torch.Tensor,
                      neighbor_scores: torch.Tensor, mu: float, rule: str = "paper") -> int:
    """Index (into the neighbour list) of the neighbour whose corpus continuation becomes the draft (Eq. 5), or −1.

    p_m, p_lm [V]; neighbor_values, neighbor_scores [r], sorted best first (as :func:`top_neighbors` returns them).
    - ``"paper"``: w_t = argmax p_M; the nearest neighbour whose value is w_t (max-pooling of retrieval probability over
      the neighbours carrying w_t). −1 when no neighbour carries w_t (the caller then emits w_t in token mode).
    - ``"code"`` (D3): argmax_i λ·p_LM(v_i) + 1e-6·w_i, the retrieved value the LM likes most; its value can differ from
      argmax p_M.

    Example: values [7, 3, 3], scores [0, −1, −2], argmax p_M = 3 → paper picks index 1.
    """
    if neighbor_values.numel() == 0:
        return -1
    values = neighbor_values.long()
    if rule == "paper":
        w_t = int(torch.argmax(p_m))
        hits = torch.nonzero(values == w_t)
        return int(hits[0, 0]) if hits.numel() else -1
    if rule == "code":
        w = neighbor_weights(neighbor_scores[None, :], mu)[0]
        score = lam * p_lm.float()[values] + CODE_SPAN_START_EPS * w
        return int(torch.argmax(score))
    raise ValueError(f"unknown span_start rule {rule!r}")


def acceptance_length(p_m: torch.Tensor, draft: torch.Tensor, gamma: float, strict: bool = False) -> int:
    """Number of leading draft tokens accepted by relaxed speculative decoding (greedy Eq. 7, Alg. 1).

    p_m [k, V] (row i = p_M given everything before draft token i), draft [k] → accepted prefix length in [0, k].
    Relaxed: accept w_i iff min(1, p_M(w_i) / (γ·max_w p_M)) > 0.5, i.e. p_M(w_i) > 0.5·γ·max p_M.
    Strict: accept w_i iff w_i = argmax p_M (the speculative path then equals token-by-token decoding over p_M).

    Example (γ = 0.5, threshold 0.25·max): rows [[.6, .4], [.9, .1], [.5, .5]], draft [1, 1, 0] →
    accepted [T, F, T] → 1 (only the leading run counts).
    """
    if draft.numel() == 0:
        return 0
    idx = draft.long().to(p_m.device)
    if strict:
        ok = p_m.argmax(-1) == idx
    else:
        chosen = p_m.gather(1, idx[:, None])[:, 0]
        ok = chosen > 0.5 * gamma * p_m.max(-1).values
    bad = torch.nonzero(~ok)
    return int(bad[0, 0]) if bad.numel() else int(idx.numel())


def mu_for(dim: int) -> float:
    """µ = 1/√d (the PDF lost the radical; the released code divides by √d)."""
    return 1.0 / math.sqrt(dim)
