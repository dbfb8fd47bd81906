"""The part kNN-LM and NEST share: the token index over the example's passage keys, the kNN distribution and the
mixture p_M = λ·p_LM + (1 − λ)·p_kNN (paper Eq. 2-3), with each method's λ_t, and the bookkeeping of which corpus token
an emitted token came from (attribution, masking of used keys). How a method picks its tokens from p_M is its own:
:mod:`stages.decoding.verify` (one token per step, or a verified draft)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from stages.decoding.base import Clock, Decoder, Row
from stages.decoding.kernels import lm_distribution, mixture_from_neighbors, mu_for, select_span_start
from stages.decoding.passage_keys import (PassageKeyCache, index_tokens, key_identity, lm_fingerprint, lookup_or_encode,
                                          max_index_tokens, min_index_tokens, open_key_cache, passage_bos_id)
from stages.decoding.token_index import TokenIndex


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
class KnnRow(Row):
    """A row with a token index, and the state of the step loop (:mod:`stages.decoding.verify`)."""

    index: TokenIndex | None = None
    dist: Scored | None = None
    pending: int | None = None  # correction token emitted but not yet fed
    stream: tuple[int, int] | None = None  # (doc_id, position) of the next streamed token
    feed: list[int] = field(default_factory=list)
    feed_kind: str = "token"
    draft_src: tuple[int, int] | None = None
    masked_this_step: bool = False
    article_of: dict = field(default_factory=dict)  # doc_id -> its article (the passage's title, else the doc_id)
    span_docs: frozenset | None = None  # where a span may start (NestConfig.span_start_passages); None: anywhere
    sentence_articles: set = field(default_factory=set)  # articles the current sentence copied from


def usable_neighbors(row: KnnRow, d: Scored) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, key rows, values) of the position's neighbours that are still usable: the −inf slots of a
    per-position exclusion are dropped, and so are keys masked since the search (they are sorted last/best
    first, so the result stays sorted)."""
    scores, rows = d.nb_scores[0], d.nb_rows[0]
    ok = torch.isfinite(scores) & row.index.valid[rows]
    if not bool(ok.all()):
        scores, rows = scores[ok], rows[ok]
    return scores, rows, row.index.values[rows]


class TokenIndexDecoder(Decoder):
    """A decoder whose next-token distribution is the mixture p_M over a token index of the example's passages.
    Subclasses give λ_t (:meth:`lambdas`); evaluation mode (:meth:`~Decoder.target_logprobs`) scores p_M."""

    def __init__(self, model, tokenizer, config=None, key_cache: PassageKeyCache | None = None):
        super().__init__(model, tokenizer, config, key_cache)
        cfg = self.config
        if self.key_cache is None:
            self.key_cache = open_key_cache(cfg)
        # the keys' identity: the LM's, and their precision (bf16 keys never share a cache or store with fp32 ones)
        self.lm_identity = key_identity(cfg.lm_identity or lm_fingerprint(model), cfg.key_precision)
        hidden = int(getattr(model.config, "hidden_size", 0) or model.get_input_embeddings().weight.shape[1])
        self.mu = float(cfg.mu) if cfg.mu is not None else mu_for(hidden)
        self.passage_bos = passage_bos_id(tokenizer, cfg.passage_bos)

    @abstractmethod
    def lambdas(self, nb_scores: torch.Tensor) -> torch.Tensor:
        """λ_t per position (the LM's weight in the mixture) from the neighbours' scores ``[k, r']``."""

    def score(self, row: KnnRow, logits: torch.Tensor, queries: torch.Tensor,
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
            return Scored(self.suppress_eos(row, p_lm), p_lm, lam, empty, empty.long())
        nb = index.search(queries, self.config.neighbors, exclude)
        row.count("knn_searches", k)
        lam = self.lambdas(nb.scores).to(p_lm.device)
        p_m = mixture_from_neighbors(p_lm, nb.scores, index.values[nb.rows], lam, self.mu)
        # NestConfig.min_new_tokens: no EOS before it, neither chosen nor accepted in a draft (a document-end key's EOS
        # included); position j of a pass chooses token number len(row.tokens) + j (the fed token is already emitted,
        # a draft's first token too)
        return Scored(self.suppress_eos(row, p_m), p_lm, lam, nb.scores, nb.rows)

    # ---------------------------------------------------------------- passages → token index
    def index_tokens(self, passage, max_tokens: int | None = None) -> list[int]:
        """The token ids a passage contributes to the token index: its tokens cut to the context window, plus EOS after
        the last token of an article when ``document_end = "eos"`` (the key of that last token then says "stop")."""
        return index_tokens(passage.token_ids, max_index_tokens(self.model) if max_tokens is None else max_tokens,
                            ends_document=getattr(passage, "ends_document", False),
                            document_end=self.config.document_end,
                            eos_id=getattr(self.tokenizer, "eos_token_id", None))

    def build_indexes(self, rows: list[KnnRow], clock: Clock) -> None:
        cfg = self.config
        max_tokens = max_index_tokens(self.model)
        per_row = []
        for row in rows:
            seen, ps = set(), []
            for p in row.req.passages[: cfg.passages]:
                if int(p.doc_id) in seen:
                    continue
                seen.add(int(p.doc_id))
                toks = self.index_tokens(p, max_tokens)
                if len(toks) >= min_index_tokens(self.passage_bos):  # at least one key
                    ps.append((int(p.doc_id), toks))
            per_row.append(ps)
            row.counters["passages"] = len(ps)
            self.note_articles(row, row.req.passages[: cfg.passages])
            if not ps:
                row.counters["fallback_no_passages"] = 1  # no keys: p_M = p_LM, i.e. the base LM
        flat = [toks for ps in per_row for _, toks in ps]
        if not flat:
            return
        keys, hits, lookup_s, encode_s = lookup_or_encode(
            self.key_cache, self.model, flat, lm_identity=self.lm_identity, key_layer=cfg.key_layer,
            bos_id=self.passage_bos, batch_size=cfg.passage_batch_size, precision=cfg.key_precision)
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

    def note_articles(self, row: KnnRow, passages) -> None:
        """The row's passage → article map and, with ``span_start_passages``, the passages a span may start in: every
        retrieved passage of the articles of the top-ranked ones (rank order = the request's order)."""
        row.article_of = {int(p.doc_id): (p.title or int(p.doc_id)) for p in passages}
        k = int(self.config.span_start_passages)
        if k > 0:
            top = {row.article_of[int(p.doc_id)] for p in passages[:k]}
            row.span_docs = frozenset(d for d, a in row.article_of.items() if a in top)

    def prefetch_keys(self, requests) -> None:
        """Put the passage keys of ``requests`` into the key cache (e.g. to time decoding with a warm cache)."""
        rows = [self.new_row(self._prepare(r)) for r in requests]
        with torch.inference_mode():
            self.build_indexes(rows, Clock(self.device))

    # ---------------------------------------------------------------- one step of one row
    def token_source(self, row: KnnRow, d: Scored, token: int) -> tuple[int, int] | None:
        """A token-mode token's neighbour: the span-start neighbour's source when its value is the emitted token. It
        is not a copy: it is recorded as *supported* (and its key is masked like a copied token's)."""
        if not self.config.token_mode_attribution:
            return None
        scores, nb_rows, values = usable_neighbors(row, d)
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

    def emit_source(self, row: KnnRow, token: int, source: tuple[int, int] | None, copied: bool = True) -> None:
        """Emit, then mask the used key (paper: every emitted corpus token; code: the step's first one, D4).

        ``copied``: the token comes from an accepted draft or a streamed continuation, so ``source`` is its copy
        source; otherwise (token mode) ``source`` is only a neighbour carrying the same value and is recorded as
        *supported*. Masking does not depend on the difference."""
        emitted = self.emit(row, token, source, None) if copied else self.emit(row, token, None, source)
        if emitted and self.config.span_article == "sentence":
            self.track_sentence_articles(row, source if copied else None)
        if not emitted or source is None or row.index is None:
            return
        mode = self.config.masking
        if mode == "paper":
            row.index.mask(*source)
        elif mode == "code" and not row.masked_this_step:
            row.masked_this_step = True
            if not row.index.is_first_key(*source):
                row.index.mask(*source)

    def track_sentence_articles(self, row: KnnRow, source: tuple[int, int] | None) -> None:
        """Keep the articles the current sentence copied from: a token that starts with whitespace right after one
        that ends with sentence punctuation starts a new sentence (abbreviations aside: a cheap, conservative test)."""
        classes = self.token_classes()
        if (len(row.tokens) >= 2 and row.tokens[-1] in classes.space_start
                and row.tokens[-2] in classes.sentence_punct):
            row.sentence_articles = set()
        if source is not None:
            row.sentence_articles.add(row.article_of.get(int(source[0]), int(source[0])))

    def span_start_docs(self, row: KnnRow) -> frozenset | None:
        """The passages the next span may start in (None: any): the top-ranked articles' passages
        (``span_start_passages``) and, with ``span_article = "sentence"``, those of the articles the sentence already
        copied from."""
        allowed = row.span_docs
        if self.config.span_article == "sentence" and row.sentence_articles:
            mine = frozenset(d for d, a in row.article_of.items() if a in row.sentence_articles)
            allowed = mine if allowed is None else allowed & mine
        return allowed

    def new_row(self, row: Row) -> KnnRow:
        return KnnRow(**{f: getattr(row, f) for f in Row.__dataclass_fields__})

    def _target_logprobs(self, row: Row, logits: torch.Tensor, queries: list, target: torch.Tensor) -> torch.Tensor:
        """log p_M of each target token: every position its own kNN search over the example's token index (no
        masking, no spans: evaluation mode stops at the mixture, paper §3.2)."""
        krow = self.new_row(row)
        krow.min_new = 0  # generation lengths do not enter evaluation mode
        self.build_indexes([krow], Clock(self.device))
        scored = self.score(krow, logits, torch.cat(queries))
        if scored.nb_scores.shape[1] == 0:  # no passages: the mixture is p_LM at the mixture's temperature
            p = lm_distribution(logits, self.config.lm_temperature)
        else:
            p = scored.p_m
        return torch.log(p.gather(1, target[:, None]).squeeze(1).clamp_min(1e-30))
