"""The step loop of the token-index methods, with verification of drafts (paper Alg. 1). Greedy, batched, one LM pass
per step for every row of the batch.

- the row knows p_M at its next position (``row.dist``: from the prefill, a token pass, or the last position of a
  fully accepted draft);
- the drafter (:mod:`stages.decoding.drafter`; none for kNN-LM) proposes a draft, or nothing: then **token mode**,
  emit argmax p_M and feed it;
- a draft's first token is tested against the known p_M (relaxed speculative decoding, Eq. 7); if accepted the whole
  draft is fed in **one** teacher-forced pass, which gives p_M after every draft token (each position its own kNN search
  and λ_t); the leading accepted run is emitted, and on a rejection the correction argmax p_M follows (it is fed on the
  next pass, whose output is the query of the next step); rejected slots become KV-cache holes (B3 fixed);
- after a fully accepted draft the pass's last position already gives p_M for the next step: no extra LM pass (and,
  with ``streaming``, the drafter continues the same passage).
"""

from __future__ import annotations

import torch

from stages.decoding.base import Clock, Row
from stages.decoding.drafter import Draft, SpanDrafter
from stages.decoding.kernels import acceptance_length
from stages.decoding.knn import KnnRow, Scored, TokenIndexDecoder
from stages.decoding.lm_runner import BatchedLM
from stages.decoding.types import Generation


class VerifyingDecoder(TokenIndexDecoder):
    """Decodes from p_M one LM pass per step, verifying what its ``drafter`` proposes (None: one token per step)."""

    record_drafts = False  # tests/debugging: keep each proposed draft in ``self.drafts`` as (example_id, doc, pos, ids)

    def __init__(self, model, tokenizer, config=None, key_cache=None):
        super().__init__(model, tokenizer, config, key_cache)
        self.drafts: list[tuple[int, int, int, list[int]]] = []
        self.drafter: SpanDrafter | None = None

    def accept(self, p_m: torch.Tensor, draft: list[int]) -> int:
        """How many leading draft tokens p_M accepts (Eq. 7 with leniency γ; ``strict``: argmax only)."""
        return acceptance_length(p_m, torch.tensor(draft, dtype=torch.long), self.config.gamma,
                                 strict=self.config.acceptance == "strict")

    def propose(self, row: KnnRow) -> Draft | None:
        """The row's next draft (None: a token-mode step). No drafter: every step is token mode (kNN-LM)."""
        return self.drafter.propose(row) if self.drafter is not None else None

    def plan(self, row: KnnRow) -> None:
        """Decide what this row feeds in the next pass (and emit what is already decided): the pending correction
        token, else the drafter's draft (its first token verified against the known p_M), else argmax p_M."""
        row.masked_this_step = False
        if row.pending is not None:  # the query pass of a correction token
            row.feed, row.feed_kind, row.pending = [row.pending], "token", None
            return
        d = row.dist
        proposal = self.propose(row)
        if proposal is None:  # token mode
            w = int(torch.argmax(d.p_m[0]))
            row.count("steps_token")
            self.emit_source(row, w, self.token_source(row, d, w) if row.index is not None else None, copied=False)
            row.feed, row.feed_kind = [w], "token"
            return
        start, draft = proposal.start, proposal.tokens
        if self.record_drafts:
            self.drafts.append((row.req.example_id, start[0], start[1], list(draft)))
        # "drafted" counts tokens actually verified: the rest of a draft whose first token fails is never fed
        if self.accept(d.p_m, draft[:1]) == 0:
            c = int(torch.argmax(d.p_m[0]))
            row.count("drafted")
            row.count("rejections")
            self.emit_source(row, c, None)
            row.feed, row.feed_kind = [c], "token"
            return
        row.count("drafted", len(draft))
        row.count("accepted")
        self.emit_source(row, draft[0], start)
        row.feed, row.feed_kind, row.draft_src = draft, "draft", start

    def draft_exclusions(self, row: KnnRow) -> list[list[int]] | None:
        """Paper masking: the search after draft token i must not see the keys of draft tokens 1..i (token 0 is masked
        already), exactly as if those tokens had been emitted one by one."""
        if row.feed_kind != "draft" or self.config.masking != "paper" or row.index is None or len(row.feed) < 2:
            return None
        doc, pos = row.draft_src
        rows = [row.index.key_row(doc, pos + i) for i in range(1, len(row.feed))]
        return [[x for x in rows[:i] if x >= 0] for i in range(len(row.feed))]

    def absorb(self, row: KnnRow, scored: Scored) -> int:
        """Use the pass's outputs for this row; returns how many fed tokens stay in the KV cache."""
        if row.feed_kind == "token":
            row.dist = scored
            return 1
        draft, (doc, pos) = row.feed, row.draft_src
        k = len(draft)
        a = self.accept(scored.p_m[:k - 1], draft[1:]) if k > 1 else 0
        row.count("accepted", a)
        for i in range(1, a + 1):
            self.emit_source(row, draft[i], (doc, pos + i))
        if a == k - 1:
            row.dist = scored.at(k - 1)
            row.stream = (doc, pos + k) if self.config.streaming else None
            return k
        row.count("rejections")
        c = int(torch.argmax(scored.p_m[a]))
        self.emit_source(row, c, None)
        row.pending, row.dist, row.stream = c, None, None
        return a + 1

    # ---------------------------------------------------------------- the batch loop
    def _decode_batch(self, rows_in: list[Row]) -> list[Generation]:
        rows = [self.new_row(r) for r in rows_in]
        clock = Clock(self.device)
        cfg = self.config
        live = [r for r in rows if not r.done]
        if live:
            self.build_indexes(live, clock)
            lm = BatchedLM(self.model, key_layer=cfg.key_layer, compact_min_slots=cfg.compact_min_slots,
                           compact_hole_fraction=cfg.compact_hole_fraction)
            with clock.time("lm_forward", live):
                outs = lm.prefill([r.prompt for r in live])
            for r, o in zip(live, outs):
                r.count("lm_forward_passes")
                with clock.time("token_search", [r]):
                    r.dist = self.score(r, o.logits, o.queries)
            while True:
                with clock.time("verification", live):
                    for r in live:
                        if not r.done:
                            self.plan(r)
                    keep = [i for i, r in enumerate(live) if not r.done]
                    if keep and len(keep) < len(live):
                        lm.keep_rows(keep)
                live = [live[i] for i in keep]
                if not live:
                    break
                with clock.time("lm_forward", live):
                    outs = lm.step([r.feed for r in live])
                kept = []
                for r, o in zip(live, outs):
                    r.count("lm_forward_passes")
                    with clock.time("token_search", [r]):
                        scored = self.score(r, o.logits, o.queries, self.draft_exclusions(r))
                    with clock.time("verification", [r]):
                        kept.append(self.absorb(r, scored))
                with clock.time("verification", live):
                    lm.commit(kept)
            for r in rows:
                r.counters["kv_compactions"] = lm.compactions
        return [self.finish(r) for r in rows]

    def finish(self, row: KnnRow) -> Generation:
        for name in ("lm_forward_passes", "drafted", "accepted", "knn_searches", "key_cache_hits",
                     "key_cache_misses", "rejections", "steps_token", "steps_span", "steps_stream"):
            row.counters.setdefault(name, 0)
        return super().finish(row)

