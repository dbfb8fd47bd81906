"""NEST's span drafter: which corpus tokens to propose next (paper §3.3, dynamic span selection), kept apart from
their verification (:mod:`stages.decoding.verify`), as HF keeps candidate generation apart from the assisted-decoding
loop.

A draft is the next ``n`` tokens of one passage after a start ``(doc_id, position)``:

- **streaming**: after a fully accepted draft, the continuation of the same passage;
- otherwise **span mode** when the position's λ_t ≤ δ: the span-start neighbour (Eq. 5; ``span_start`` rule) and the
  tokens after it (cut at the passage end, never padded: B6); with ``span_start_passages`` / ``span_article`` (beyond
  the paper) only neighbours of the allowed articles may start it;
- otherwise no draft: the step is token mode.

With paper masking, tokens already used are never drafted again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.decoding.config import NestConfig
from stages.decoding.kernels import select_span_start
from stages.decoding.knn import KnnRow, Scored, usable_neighbors


@dataclass
class Draft:
    """A proposed continuation: its tokens and the source of the first one (token i is ``(doc, pos + i)``)."""

    start: tuple[int, int]
    tokens: list[int]


class SpanDrafter:
    """Proposes a row's next draft from its token index (counts ``steps_stream``, ``steps_span`` and
    ``span_start_not_found`` on the row)."""

    def __init__(self, config: NestConfig, mu: float, allowed=None):
        """``allowed(row)``: the passages a span may start in, or None for any (the decoder's
        :meth:`~stages.decoding.knn.TokenIndexDecoder.span_start_docs`)."""
        self.config = config
        self.mu = mu
        self.allowed = allowed if allowed is not None else (lambda row: None)

    def span_mode(self, d: Scored) -> bool:
        """λ_t ≤ δ (and there are neighbours): the retrieval is confident enough to copy a span."""
        return d.nb_rows.numel() > 0 and float(d.lam[0]) <= self.config.delta

    def propose(self, row: KnnRow) -> Draft | None:
        """The row's next draft, or None (token mode). Consumes the row's pending stream."""
        cfg, d = self.config, row.dist
        n = min(cfg.span_length, row.max_new - len(row.tokens))
        stop_at_masked = cfg.masking == "paper"  # used corpus tokens are never copied again
        if row.stream is not None:
            start, row.stream = row.stream, None
            draft = row.index.continuation(*start, n, stop_at_masked)
            if draft:
                row.count("steps_stream")
                return Draft(start, draft)
        if not self.span_mode(d):
            return None
        scores, nb_rows, values = usable_neighbors(row, d)
        allowed = self.allowed(row)
        if allowed is not None:  # span_start_passages / span_article: only neighbours of the allowed articles
            docs = row.index.doc_ids[nb_rows.cpu()]  # each neighbour's passage, one gather
            keep = torch.isin(docs, torch.tensor(sorted(allowed), dtype=docs.dtype)).to(nb_rows.device)
            if not bool(keep.all()):
                row.count("span_starts_restricted")
                scores, nb_rows, values = scores[keep], nb_rows[keep], values[keep]
        j = select_span_start(d.p_m[0], d.p_lm[0], float(d.lam[0]), values, scores, self.mu, cfg.span_start)
        if j < 0:
            row.count("span_start_not_found")
            return None
        start = row.index.source(int(nb_rows[j]))
        row.count("steps_span")
        draft = row.index.continuation(*start, n, stop_at_masked)
        return Draft(start, draft) if draft else None
