"""NEST's first-stage hybrid fusion of a sparse (BM25) and a dense ranking: pure functions, no I/O.

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


def single(hits: Sequence[tuple[int, float]], b: int = 40, *, side: str) -> list[Row]:
    """Top-``b`` rows of one retriever alone (BM25-only or dense-only mode): fused = that retriever's score.

    ``side`` is ``"sparse"`` or ``"dense"``: which raw-score column the score goes to (the other is ``None``).
    """
    if side not in ("sparse", "dense"):
        raise ValueError(f"side must be 'sparse' or 'dense', got {side!r}")
    ranked = sorted(_first_scores(hits).items(), key=lambda kv: (-kv[1], kv[0]))[:b]
    if side == "sparse":
        return [(doc_id, score, score, None) for doc_id, score in ranked]
    return [(doc_id, score, None, score) for doc_id, score in ranked]
