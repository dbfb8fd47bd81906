"""Attribution runs and the paper's attribution metrics (Table 2: ratio and length), as pure functions.

A *source* is ``(doc_id, position)``: the token equals ``passage[doc_id].token_ids[position]``, or None.

Definitions (docs/decoding.md):
- **ratio** = tokens with a source / generated tokens (0 for an empty generation).
- **run** (``contiguous=True``, the default) = a maximal stretch of consecutive output tokens that all have a source, with
  the same doc_id and source positions increasing by exactly 1 (i.e. a copied n-gram).
  With ``contiguous=False`` a run only needs the same doc_id (the paper's "consecutive tokens from the same document").
- **length** = mean number of tokens per run (0 when there is no run).
"""

from __future__ import annotations

from typing import Sequence


def attribution_runs(sources: Sequence[tuple[int, int] | None], contiguous: bool = True
                     ) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, length, doc_id)`` over ``sources``.

    Example: sources [(4,10), (4,11), (4,13), None, (2,0)] → contiguous: [(0,2,4), (2,1,4), (4,1,2)];
    same-doc only: [(0,3,4), (4,1,2)].
    """
    runs: list[tuple[int, int, int]] = []
    start = None
    for i, src in enumerate(sources):
        if src is None:
            if start is not None:
                runs.append((start, i - start, sources[start][0]))
                start = None
            continue
        if start is not None:
            prev = sources[i - 1]
            same = prev[0] == src[0] and (not contiguous or src[1] == prev[1] + 1)
            if same:
                continue
            runs.append((start, i - start, sources[start][0]))
        start = i
    if start is not None:
        runs.append((start, len(sources) - start, sources[start][0]))
    return runs


def attribution_ratio(sources: Sequence[tuple[int, int] | None]) -> float:
    """Share of generated tokens that carry a source (paper Table 2 "Ratio")."""
    return sum(s is not None for s in sources) / len(sources) if len(sources) else 0.0


def attribution_length(sources: Sequence[tuple[int, int] | None], contiguous: bool = True) -> float:
    """Mean run length in tokens (paper Table 2 "Length")."""
    runs = attribution_runs(sources, contiguous)
    return sum(r[1] for r in runs) / len(runs) if runs else 0.0
