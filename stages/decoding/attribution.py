"""Attribution on the decoding side: the character offsets of generated tokens (for the demo's markers and the QA
"answer inside a copied span" metric), and the attribution metrics themselves, which live in ONE place,
:mod:`tasks.metrics` (re-exported here for the decoding library's users).

A *source* is ``(doc_id, position)``: the token equals ``passage[doc_id].token_ids[position]``, or None. A
generation's ``sources`` hold a source only for COPIED tokens (an accepted draft or a streamed continuation); tokens
produced one at a time whose value occurs among the neighbours are in the parallel list ``supported`` (docs/metrics.md).
"""

from __future__ import annotations

from typing import Sequence

from tasks.metrics import (attribution_ratio, attribution_runs, attribution_span_length,  # noqa: F401 (re-exports)
                           attribution_stats)


def token_char_ends(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """``ends[i]`` = the length of the decoded text of ``token_ids[:i+1]`` (special tokens skipped, as the generation's
    text), made non-decreasing and at most the length of the whole text. Token i spans ``[ends[i-1], ends[i])``
    (``ends[-1]`` read as 0). One decode per token: O(n²) characters, a few ms for a few hundred tokens."""
    ids = [int(t) for t in token_ids]
    if not ids:
        return []
    total = len(tokenizer.decode(ids, skip_special_tokens=True))
    ends, prev = [], 0
    for i in range(1, len(ids) + 1):
        e = len(tokenizer.decode(ids[:i], skip_special_tokens=True)) if i < len(ids) else total
        prev = min(max(e, prev), total)
        ends.append(prev)
    return ends
