"""NEST's first-stage hybrid fusion of a sparse (BM25) and a dense ranking, and of any number of rankings: pure
functions, no I/O.

Paper (Li et al. 2024, §3.1 and App. A), for one query with candidate lists s_sparse and s_dense sorted best first:

    η_x   = 1 − s_x[top-100] / max s_x                 relative confidence of retriever x ∈ {sparse, dense}
    η     = 0.7 · (1 − η_sparse) + 0.3 · η_dense       adaptive fusion coefficient
    s(q,d) = η · s_dense(q,d) + (1 − η) · s_sparse(q,d)

A document present in only one list gets the other list's **minimum** score; the fused list is sorted and cut to the top
b (40). η_x is large when the top hit stands far above the 100th, so a confident sparse ranking moves weight away from the
dense scores. Raw scores are mixed with no normalisation between BM25 and the inner product, as in the paper.

Two readings of "the 100th hit" exist. The paper's is rank 100, index 99 (``conf_rank=100``, the default). The released
code reads index 100 (the 101st hit) and clips a negative dense score at that index to 0: use ``conf_rank=101,
clip_dense=True`` (:data:`RELEASED_CODE`) to reproduce it.

η is not clamped. BM25 scores are ≥ 0, so η_sparse ∈ [0, 1]; a dense reference score below 0 (possible with cosine
scores in a small corpus) gives η_dense > 1 and can push η above 1, i.e. a negative sparse weight. That is the
paper's formula taken literally; ``clip_dense=True`` keeps η_dense ≤ 1.

**Any number of retrievers** (:func:`fusion_weights`, :func:`fuse_many`). The paper's weights are
w_dense = η = p_dense·η_dense + p_sparse·(1 − η_sparse) and w_sparse = 1 − η, with priors p_sparse = 0.7,
p_dense = 0.3: each retriever keeps the share η_x of its prior and hands the share 1 − η_x to the other one. With
N retrievers x = 0..N−1 (priors p_x summing to 1), each hands its 1 − η_x evenly to the N − 1 others:

    w_x = p_x · η_x + Σ_{y≠x} p_y · (1 − η_y) / (N − 1)        for x ≥ 1
    w_0 = 1 − Σ_{x≥1} w_x                                        (so the weights sum to 1)
    s(q,d) = Σ_x w_x · s_x(q,d)                                  (a missing score filled with that list's minimum)

For N = 2 this is the paper's formula, computed with the same floating-point operations: ``fuse_many`` on the BM25
list (x = 0) and the dense list (x = 1) gives :func:`fuse`'s fused scores bit for bit.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

#: Options that reproduce the released code's reading of the fusion coefficient (index 100, dense clipped at 0).
RELEASED_CODE = {"conf_rank": 101, "clip_dense": True}

Row = tuple[int, float, "float | None", "float | None"]


def _conf_position(n: int, conf_rank: int, conf_index: int | None) -> int:
    i = conf_rank - 1 if conf_index is None else conf_index
    if i < 0:
        raise ValueError(f"confidence position must be >= 0 (conf_rank >= 1), got {i}")
    return min(i, n - 1)  # a list shorter than conf_rank uses its last (lowest) score


def retriever_confidence(scores_desc: Sequence[float], conf_rank: int = 100, *, conf_index: int | None = None,
                         clip: bool = False) -> float:
    """η_x = 1 − s_x[conf] / max s_x for one retriever's scores, best first.

    ``conf`` is rank ``conf_rank`` (1-based; the paper's 100th hit is index 99), or the 0-based ``conf_index`` when given.
    A list shorter than that uses its last score. ``clip`` replaces a negative s_x[conf] by 0 (the released code does
    this for the dense side). An empty list, or max s_x = 0, gives η_x = 0 (no evidence of confidence).
    """
    s = np.asarray(scores_desc, dtype=np.float64)
    if s.size == 0:
        return 0.0
    top = float(s.max())
    ref = float(s[_conf_position(s.size, conf_rank, conf_index)])
    if clip:
        ref = max(ref, 0.0)
    if top == 0.0:
        return 0.0
    return 1.0 - ref / top


def fusion_coefficient(sparse_scores_desc: Sequence[float], dense_scores_desc: Sequence[float], conf_rank: int = 100,
                       *, conf_index: int | None = None, clip_dense: bool = False, dense_weight: float = 0.3) -> float:
    """η = (1 − w) · (1 − η_sparse) + w · η_dense, with w = ``dense_weight`` = 0.3 in the paper and the code.

    Both score lists are best first. See :func:`retriever_confidence` for η_x, ``conf_rank``/``conf_index`` and
    ``clip_dense`` (applied to the dense side only, as in the released code).
    """
    eta_sparse = retriever_confidence(sparse_scores_desc, conf_rank, conf_index=conf_index)
    eta_dense = retriever_confidence(dense_scores_desc, conf_rank, conf_index=conf_index, clip=clip_dense)
    return (1.0 - dense_weight) * (1.0 - eta_sparse) + dense_weight * eta_dense


def _first_scores(hits: Iterable[tuple[int, float]]) -> dict[int, float]:
    scores: dict[int, float] = {}
    for doc_id, score in hits:
        scores.setdefault(int(doc_id), float(score))  # a repeated doc keeps its first (best) score
    return scores


def fuse(sparse: Sequence[tuple[int, float]], dense: Sequence[tuple[int, float]], b: int = 40, *,
         eta: float | None = None, conf_rank: int = 100, conf_index: int | None = None, clip_dense: bool = False,
         dense_weight: float = 0.3) -> list[Row]:
    """Fuse two candidate lists of ``(doc_id, score)`` (best first) into the top-``b`` rows.

    s(q,d) = η · s_dense(q,d) + (1 − η) · s_sparse(q,d) over the union of both lists; a document missing from one list
    takes that list's minimum score (0 for an empty list). η is :func:`fusion_coefficient` of the two lists unless given.

    Returns rows ``(doc_id, fused, sparse, dense)`` sorted by fused score, descending (ties: smaller doc_id first);
    ``sparse``/``dense`` are the raw scores, ``None`` where the document was missing from that list and the score filled.
    """
    s_map, d_map = _first_scores(sparse), _first_scores(dense)
    if eta is None:
        eta = fusion_coefficient(list(s_map.values()), list(d_map.values()), conf_rank, conf_index=conf_index,
                                 clip_dense=clip_dense, dense_weight=dense_weight)
    s_fill = min(s_map.values()) if s_map else 0.0
    d_fill = min(d_map.values()) if d_map else 0.0
    rows: list[Row] = []
    for doc_id in s_map.keys() | d_map.keys():
        s, d = s_map.get(doc_id), d_map.get(doc_id)
        fused = eta * (d_fill if d is None else d) + (1.0 - eta) * (s_fill if s is None else s)
        rows.append((doc_id, fused, s, d))
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:b]


def fusion_weights(confidences: Sequence[float], priors: Sequence[float]) -> list[float]:
    """The weight of each retriever from its confidence η_x and prior p_x (module doc); one retriever weighs 1."""
    n = len(confidences)
    if n != len(priors) or n == 0:
        raise ValueError(f"fusion needs one prior per retriever (got {n} confidences and {len(priors)} priors)")
    if n == 1:
        return [1.0]
    handed = [p * (1.0 - eta) for p, eta in zip(priors, confidences)]
    weights = [0.0] * n
    for x in range(1, n):
        weights[x] = priors[x] * confidences[x] + sum(h for y, h in enumerate(handed) if y != x) / (n - 1)
    weights[0] = 1.0 - sum(weights[1:])
    return weights


def fuse_many(lists: Sequence[Sequence[tuple[int, float]]], priors: Sequence[float], b: int = 40, *,
              conf_rank: int = 100, conf_index: int | None = None, clip: Sequence[bool] | None = None
              ) -> tuple[list[tuple], list[float]]:
    """Fuse N candidate lists of ``(doc_id, score)`` (best first) into the top-``b`` rows, and the weights used.

    Each list's confidence is :func:`retriever_confidence` of its scores as given (``clip[x]``: its reference score
    clipped at 0); the weights
    are :func:`fusion_weights`; a document missing from a list takes that list's minimum score (0 for an empty list).
    Rows are ``(doc_id, fused, score_0, ..., score_{N-1})`` sorted by fused score, descending (ties: smaller doc_id
    first), each raw score ``None`` where the document was missing from that list.
    """
    clip = list(clip) if clip is not None else [False] * len(lists)
    maps = [_first_scores(hits) for hits in lists]
    confidences = [retriever_confidence([score for _, score in hits], conf_rank, conf_index=conf_index, clip=c)
                   for hits, c in zip(lists, clip)]
    weights = fusion_weights(confidences, priors)
    fills = [min(m.values()) if m else 0.0 for m in maps]
    rows = []
    for doc_id in set().union(*(m.keys() for m in maps)):
        raw = [m.get(doc_id) for m in maps]
        fused = weights[0] * (fills[0] if raw[0] is None else raw[0])
        for w, fill, r in zip(weights[1:], fills[1:], raw[1:]):
            fused += w * (fill if r is None else r)
        rows.append((doc_id, fused, *raw))
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:b], weights


def top(hits: Sequence[tuple[int, float]], b: int = 40) -> list[tuple[int, float]]:
    """The top-``b`` ``(doc_id, score)`` of one list (a repeated doc keeps its first score), best first, ties by
    smaller doc_id: one retriever alone."""
    return sorted(_first_scores(hits).items(), key=lambda kv: (-kv[1], kv[0]))[:b]
