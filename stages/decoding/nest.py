"""NEST (paper Alg. 1) and RA-NEST: RRC mixture, dynamic span selection, relaxed speculative decoding, streaming,
masking of used spans. Greedy, batched, one LM pass per step.

A row's loop (every LM pass serves all rows of the batch at once):

- the row knows p_M at its next position (``row.dist``: from the prefill, a token pass, or the last position of a
  fully accepted draft);
- **streaming** (after a fully accepted draft): the draft is the next n tokens of the same passage;
- otherwise λ_t > δ → **token mode**: emit argmax p_M, feed it;
- otherwise **span mode**: pick the span-start neighbour (Eq. 5; ``span_start`` rule), draft its passage's next n
  tokens (cut at the passage end, never padded: B6);
- a draft's first token is tested against the known p_M; if accepted the whole draft is fed in **one** teacher-forced
  pass, which gives p_M after every draft token (each position its own kNN search and λ_t); the leading accepted run
  is emitted, and on a rejection the correction argmax p_M follows (it is fed on the next pass, whose output is the
  query of the next step); rejected slots become KV-cache holes (B3 fixed);
- after a fully accepted draft the pass's last position already gives p_M for the next step: no extra LM pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stages.decoding.base import Clock, Decoder, Row
from stages.decoding.kernels import (acceptance_length, lm_distribution, mixture_from_neighbors, mu_for,
                                     relative_retrieval_confidence, select_span_start)
from stages.decoding.lm_runner import BatchedLM
from stages.decoding.passage_keys import PassageKeyCache, lm_fingerprint, lookup_or_encode
from stages.decoding.token_index import TokenIndex
from stages.decoding.types import Generation


@dataclass
class Scored:
    """p_M and its parts at k consecutive positions of one row."""

    p_m: torch.Tensor  # [k, V]
    p_lm: torch.Tensor  # [k, V]
    lam: torch.Tensor  # [k]
    nb_scores: torch.Tensor  # [k, r']
    nb_rows: torch.Tensor  # [k, r'] key rows of the row's token index

    def at(self, i: int) -> "Scored":
        return Scored(self.p_m[i:i + 1], self.p_lm[i:i + 1], self.lam[i:i + 1], self.nb_scores[i:i + 1],
                      self.nb_rows[i:i + 1])


@dataclass
class NestRow(Row):
    index: TokenIndex | None = None
    dist: Scored | None = None
    pending: int | None = None  # correction token emitted but not yet fed
    stream: tuple[int, int] | None = None  # (doc_id, position) of the next streamed token
    feed: list[int] = field(default_factory=list)
    feed_kind: str = "token"
    draft_src: tuple[int, int] | None = None
    masked_this_step: bool = False


class NestDecoder(Decoder):
    """NEST with the paper's defaults; every released-code deviation is a :class:`NestConfig` option."""

    method = "nest"
    uses_spans = True
    record_drafts = False  # tests/debugging: keep each proposed draft in ``self.drafts`` as (example_id, doc, pos, ids)

    def __init__(self, model, tokenizer, config=None, key_cache: PassageKeyCache | None = None):
        super().__init__(model, tokenizer, config, key_cache)
        cfg = self.config
        self.drafts: list[tuple[int, int, int, list[int]]] = []
        if self.key_cache is None:
            self.key_cache = PassageKeyCache(cfg.key_cache_dir, cfg.key_cache_max_bytes)
        self.lm_identity = cfg.lm_identity or lm_fingerprint(model)
        hidden = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
        self.mu = float(cfg.mu) if cfg.mu is not None else mu_for(hidden)
        bos = getattr(tokenizer, "bos_token_id", None)
        if cfg.passage_bos == "yes":
            self.passage_bos = bos
        elif cfg.passage_bos == "no" or bos is None:
            self.passage_bos = None
        else:  # auto: only when the tokenizer itself prepends BOS to text (Llama-2 does, SmolLM2 does not)
            probe = tokenizer("a")["input_ids"] if callable(tokenizer) else []
            self.passage_bos = bos if probe and probe[0] == bos else None

    # ---------------------------------------------------------------- λ_t
    def lambdas(self, nb_scores: torch.Tensor) -> torch.Tensor:
        """λ_t per position: RRC (Eq. 4) unless ``force_lambda`` is set."""
        if self.config.force_lambda is not None:
            return torch.full((nb_scores.shape[0],), float(self.config.force_lambda), device=nb_scores.device)
        return relative_retrieval_confidence(nb_scores, self.config.alpha, self.config.tau)

    def score(self, row: NestRow, logits: torch.Tensor, queries: torch.Tensor,
              exclude: list[list[int]] | None = None) -> Scored:
        """p_M at each fed position: kNN search over the row's token index, p_kNN, λ_t, mixture."""
        p_lm = lm_distribution(logits, self.config.lm_temperature)
        k = p_lm.shape[0]
        index = row.index
        if index is None or index.n_valid == 0:
            empty = torch.zeros((k, 0), device=p_lm.device)
            if index is not None:
                row.count("steps_without_valid_keys", k)
            lam = torch.ones(k, device=p_lm.device)  # no neighbour: the LM alone, whatever λ is forced to
            return Scored(p_lm, p_lm, lam, empty, empty.long())
        nb = index.search(queries, self.config.neighbors, exclude)
        row.count("knn_searches", k)
        lam = self.lambdas(nb.scores).to(p_lm.device)
        p_m = mixture_from_neighbors(p_lm, nb.scores, index.values[nb.rows], lam, self.mu)
        return Scored(p_m, p_lm, lam, nb.scores, nb.rows)

    # ---------------------------------------------------------------- passages → token index
    def index_tokens(self, passage, max_tokens: int | None = None) -> list[int]:
        """The token ids a passage contributes to the token index: its tokens cut to the context window, plus EOS after
        the last token of an article when ``document_end = "eos"`` (the key of that last token then says "stop")."""
        max_tokens = max(self.window - 1, 2) if max_tokens is None else max_tokens
        toks = [int(t) for t in passage.token_ids]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if (self.config.document_end == "eos" and getattr(passage, "ends_document", False) and eos is not None
                and len(toks) < max_tokens):
            toks.append(int(eos))
        return toks[:max_tokens]

    def build_indexes(self, rows: list[NestRow], clock: Clock) -> None:
        cfg = self.config
        max_tokens = max(self.window - 1, 2)
        per_row = []
        for row in rows:
            seen, ps = set(), []
            for p in row.req.passages[: cfg.passages]:
                if int(p.doc_id) in seen:
                    continue
                seen.add(int(p.doc_id))
                toks = self.index_tokens(p, max_tokens)
                if len(toks) >= (1 if self.passage_bos is not None else 2):  # at least one key
                    ps.append((int(p.doc_id), toks))
            per_row.append(ps)
            row.counters["passages"] = len(ps)
            if not ps:
                row.counters["fallback_no_passages"] = 1  # no keys: p_M = p_LM, i.e. the base LM
        flat = [toks for ps in per_row for _, toks in ps]
        if not flat:
            return
        keys, hits, lookup_s, encode_s = lookup_or_encode(
            self.key_cache, self.model, flat, lm_identity=self.lm_identity, key_layer=cfg.key_layer,
            bos_id=self.passage_bos, batch_size=cfg.passage_batch_size)
        with_passages = [r for r, ps in zip(rows, per_row) if ps]
        for r in with_passages:  # one batched lookup/encoding serves every row: its time is shared equally
            r.timings["token_index_build"] += lookup_s / len(with_passages)
            r.timings["passage_encoding"] += encode_s / len(with_passages)
        first_value_pos = 0 if self.passage_bos is not None else 1
        at = 0
        for row, ps in zip(rows, per_row):
            if not ps:
                continue
            mine_keys, mine_hits = keys[at:at + len(ps)], hits[at:at + len(ps)]
            at += len(ps)
            row.counters["key_cache_hits"] = sum(mine_hits)
            row.counters["key_cache_misses"] = len(mine_hits) - sum(mine_hits)
            with clock.time("token_index_build", [row]):
                row.index = TokenIndex(ps, mine_keys, first_value_pos, device=self.device)
                if cfg.sink_keys == "drop":  # the attention-sink key of each passage (NestConfig.sink_keys)
                    for doc, _ in ps:
                        row.index.mask(doc, first_value_pos)
            row.counters["keys"] = len(row.index)

    def prefetch_keys(self, requests) -> None:
        """Put the passage keys of ``requests`` into the key cache (e.g. to time decoding with a warm cache)."""
        rows = [self.new_row(self._prepare(r)) for r in requests]
        with torch.inference_mode():
            self.build_indexes(rows, Clock(self.device))

    # ---------------------------------------------------------------- one step of one row
    def token_source(self, row: NestRow, d: Scored, token: int) -> tuple[int, int] | None:
        """A token-mode token's neighbour: the span-start neighbour's source when its value is the emitted token. It
        is not a copy: it is recorded as *supported* (and its key is masked like a copied token's)."""
        if not self.config.token_mode_attribution:
            return None
        scores, nb_rows, values = self.neighbors_of(row, d)
        if nb_rows.numel() == 0:
            return None
        if self.config.span_start == "paper":
            hits = torch.nonzero(values == token)
            j = int(hits[0, 0]) if hits.numel() else -1
        else:
            j = select_span_start(d.p_m[0], d.p_lm[0], float(d.lam[0]), values, scores, self.mu, "code")
            if j >= 0 and int(values[j]) != token:
                j = -1
        return row.index.source(int(nb_rows[j])) if j >= 0 else None

    @staticmethod
    def neighbors_of(row: NestRow, d: Scored) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, key rows, values) of the position's neighbours that are still usable: the −inf slots of a
        per-position exclusion are dropped, and so are keys masked since the search (they are sorted last/best
        first, so the result stays sorted)."""
        scores, rows = d.nb_scores[0], d.nb_rows[0]
        ok = torch.isfinite(scores) & row.index.valid[rows]
        if not bool(ok.all()):
            scores, rows = scores[ok], rows[ok]
        return scores, rows, row.index.values[rows]

    def emit_source(self, row: NestRow, token: int, source: tuple[int, int] | None, copied: bool = True) -> None:
        """Emit, then mask the used key (paper: every emitted corpus token; code: the step's first one, D4).

        ``copied``: the token comes from an accepted draft or a streamed continuation, so ``source`` is its copy
        source; otherwise (token mode) ``source`` is only a neighbour carrying the same value and is recorded as
        *supported*. Masking does not depend on the difference."""
        emitted = self.emit(row, token, source, None) if copied else self.emit(row, token, None, source)
        if not emitted or source is None or row.index is None:
            return
        mode = self.config.masking
        if mode == "paper":
            row.index.mask(*source)
        elif mode == "code" and not row.masked_this_step:
            row.masked_this_step = True
            if not row.index.is_first_key(*source):
                row.index.mask(*source)

    def accept(self, p_m: torch.Tensor, draft: list[int]) -> int:
        return acceptance_length(p_m, torch.tensor(draft, dtype=torch.long), self.config.gamma,
                                 strict=self.config.acceptance == "strict")

    def span_mode(self, row: NestRow, d: Scored) -> bool:
        return d.nb_rows.numel() > 0 and float(d.lam[0]) <= self.config.delta

    def plan(self, row: NestRow) -> None:
        """Decide what this row feeds in the next pass (and emit what is already decided)."""
        row.masked_this_step = False
        if row.pending is not None:  # the query pass of a correction token
            row.feed, row.feed_kind, row.pending = [row.pending], "token", None
            return
        cfg, d = self.config, row.dist
        n = min(cfg.span_length, row.max_new - len(row.tokens))
        draft: list[int] = []
        start = None
        stop_at_masked = cfg.masking == "paper"  # used corpus tokens are never copied again
        if row.stream is not None:
            draft = row.index.continuation(*row.stream, n, stop_at_masked)
            start = row.stream
            row.stream = None
            if draft:
                row.count("steps_stream")
        if not draft and self.uses_spans and self.span_mode(row, d):
            scores, nb_rows, values = self.neighbors_of(row, d)
            j = select_span_start(d.p_m[0], d.p_lm[0], float(d.lam[0]), values, scores, self.mu, cfg.span_start)
            if j >= 0:
                start = row.index.source(int(nb_rows[j]))
                draft = row.index.continuation(*start, n, stop_at_masked)
                row.count("steps_span")
            else:
                row.count("span_start_not_found")
        if not draft:  # token mode
            w = int(torch.argmax(d.p_m[0]))
            row.count("steps_token")
            self.emit_source(row, w, self.token_source(row, d, w) if row.index is not None else None, copied=False)
            row.feed, row.feed_kind = [w], "token"
            return
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

    def draft_exclusions(self, row: NestRow) -> list[list[int]] | None:
        """Paper masking: the search after draft token i must not see the keys of draft tokens 1..i (token 0 is masked
        already), exactly as if those tokens had been emitted one by one."""
        if row.feed_kind != "draft" or self.config.masking != "paper" or row.index is None or len(row.feed) < 2:
            return None
        doc, pos = row.draft_src
        rows = [row.index.key_row(doc, pos + i) for i in range(1, len(row.feed))]
        return [[x for x in rows[:i] if x >= 0] for i in range(len(row.feed))]

    def absorb(self, row: NestRow, scored: Scored) -> int:
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
    def new_row(self, row: Row) -> NestRow:
        return NestRow(**{f: getattr(row, f) for f in Row.__dataclass_fields__})

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

    def finish(self, row: NestRow) -> Generation:
        for name in ("lm_forward_passes", "drafted", "accepted", "knn_searches", "key_cache_hits",
                     "key_cache_misses", "rejections", "steps_token", "steps_span", "steps_stream"):
            row.counters.setdefault(name, 0)
        return super().finish(row)


class RANestDecoder(NestDecoder):
    """RA-NEST: NEST with the top-3 passages also in the prompt (the token index still uses all b passages)."""

    method = "ra_nest"
    ra_prompt = True
