"""The one-line demo behind ``nest generate "Tell me a bio of Marie Curie."``: retrieve passages for the prompt (hybrid
BM25 + dense fusion), decode with NEST (or a baseline), and print the text with ``[n]`` after each copied span followed
by the numbered sources (title, snippet).

The upstream artifacts (LM folder, passages, token shards, BM25 and dense indexes) are built by the pipeline; this
module only reads them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from stages.decoding.attribution import token_char_ends
from stages.decoding.config import NestConfig
from tasks.metrics import attribution_runs
from stages.decoding.types import DecodeRequest, Generation, Passage

DEMO_DEFAULTS = {"max_new_tokens": 128, "passages": 40}
SNIPPET_CHARS = 160


def split_options(options: dict | None) -> tuple[dict, dict]:
    """(NestConfig fields, demo-only options) from one flat dict; unknown names raise ValueError."""
    fields = {f.name for f in dataclasses.fields(NestConfig)}
    demo_only = {"kind", "retrieval_mode", "candidates", "device", "dtype", "min_span_tokens"}
    cfg, extra = dict(DEMO_DEFAULTS), {}
    for k, v in (options or {}).items():
        if v is None:
            continue
        if k in fields:
            cfg[k] = v
        elif k in demo_only:
            extra[k] = v
        else:
            raise ValueError(f"unknown demo option {k!r}; expected a NestConfig field or one of {sorted(demo_only)}")
    return cfg, extra


def _snippet(passage: Passage, chars: int = SNIPPET_CHARS) -> str:
    text = " ".join((passage.text or "").split())
    return text if len(text) <= chars else text[: chars - 1].rsplit(" ", 1)[0] + "…"


def format_attributed(generation: Generation, tokenizer, passages: Sequence[Passage], min_span_tokens: int = 1,
                      summary: bool = True) -> str:
    """The generated text with ``[n]`` after every run of tokens copied from one passage, then the numbered sources.

    Only copies are marked: ``generation.sources`` holds a source only for tokens emitted from an accepted draft or a
    streamed continuation; tokens produced one at a time whose value a neighbour carries (``generation.supported``) get
    no marker and are only counted in the summary line. Runs are maximal stretches of tokens copied from the same
    passage (``attribution_runs(same_doc_only=True)``); runs shorter than ``min_span_tokens`` get no marker. Sources
    are numbered in order of first use. Character offsets come from decoding growing prefixes
    (:func:`~stages.decoding.attribution.token_char_ends`), so markers land where the decoded text of the whole
    generation has them.
    """
    ids = list(generation.token_ids)
    by_doc = {p.doc_id: p for p in passages}
    numbers: dict[int, int] = {}
    marks: list[tuple[int, int]] = []  # (token end, source number)
    for start, length, doc in attribution_runs(generation.sources, same_doc_only=True):
        if length < min_span_tokens:
            continue
        n = numbers.setdefault(doc, len(numbers) + 1)
        marks.append((start + length, n))
    pieces, prev_chars = [], 0
    full = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    ends = token_char_ends(tokenizer, ids) if marks else []
    for end, n in marks:
        upto = ends[end - 1]
        pieces.append(full[prev_chars:upto] + f" [{n}]")
        prev_chars = upto
    pieces.append(full[prev_chars:])
    lines = ["".join(pieces).strip()]
    if numbers:
        lines.append("")
        lines.append("Sources:")
        for doc, n in sorted(numbers.items(), key=lambda kv: kv[1]):
            p = by_doc.get(doc)
            title = (p.title if p and p.title else f"passage {doc}")
            lines.append(f"[{n}] {title} (doc {doc}): {_snippet(p) if p else ''}".rstrip())
    if summary:
        c = generation.counters
        lines.append("")
        copied = sum(x is not None for x in generation.sources)
        supported = sum(x is not None for x in (generation.supported or []))
        share = f"{copied / len(ids):.0%}" if ids else "0%"
        more = f", {supported} more produced by the LM but carried by a neighbour (not marked)" if supported else ""
        lines.append(f"({len(ids)} tokens, {share} copied from the corpus{more}, "
                     f"{c.get('lm_forward_passes', 0)} LM passes, {generation.timings.get('total', 0.0):.1f} s)")
    return "\n".join(lines)


def retrieve_passages(prompt: str, *, passages_dir, tokens_dir, bm25_dir, dense_dir, encoder, b: int,
                      mode: str = "hybrid", candidates: int = 4000) -> list[Passage]:
    """Top-b passages for ``prompt`` by NEST's hybrid fusion (stages.pre_retrieve.HybridRetriever), with their token
    ids (stages.pretokenize.TokenLookup) and title/text (stages.passages.PassageReader)."""
    from stages.passages import PassageReader
    from stages.pre_retrieve import HybridRetriever
    from stages.pretokenize import TokenLookup

    retriever = HybridRetriever(bm25=Path(bm25_dir) if bm25_dir else None, dense=Path(dense_dir) if dense_dir else None,
                                encoder=encoder, mode=mode, b=b, candidates=candidates)
    rows = retriever.retrieve([prompt])[0].rows
    doc_ids = [int(r[0]) for r in rows]
    if not doc_ids:
        return []
    meta = PassageReader(passages_dir).get(doc_ids)
    toks = TokenLookup(tokens_dir).get(doc_ids)
    return [Passage(d, list(t), m.get("title") or "", m.get("text") or "") for d, t, m in zip(doc_ids, toks, meta)]


def run_demo(prompt: str, *, lm_dir, passages_dir, tokens_dir, bm25_dir, dense_dir, encoder, method: str = "nest",
             options: dict | None = None) -> str:
    """Retrieve, decode one prompt with ``method``, and return the attributed text and its sources (see
    :func:`format_attributed`). ``options``: NestConfig fields (gamma, alpha, tau, delta, span_length, passages,
    max_new_tokens, ...) plus ``kind`` (``qa``: the prompt is the question, default; ``completion``: the prompt is the
    article's start), ``retrieval_mode``, ``candidates``, ``device``, ``dtype``, ``min_span_tokens``."""
    from stages.decoding import make_decoder
    from stages.lm import load_lm

    cfg_fields, extra = split_options(options)
    config = NestConfig(**cfg_fields)
    kind = extra.get("kind", "qa")
    if not prompt.strip():
        from stages.errors import InputError
        raise InputError(None, None, "the prompt is empty")
    t0 = time.perf_counter()
    passages = []
    if method != "base":
        passages = retrieve_passages(prompt, passages_dir=passages_dir, tokens_dir=tokens_dir, bm25_dir=bm25_dir,
                                     dense_dir=dense_dir, encoder=encoder, b=config.passages,
                                     mode=extra.get("retrieval_mode", "hybrid"),
                                     candidates=int(extra.get("candidates", 4000)))
    search_s = time.perf_counter() - t0
    model, tokenizer = load_lm(lm_dir, device=extra.get("device", "cpu"), dtype=extra.get("dtype"))
    decoder = make_decoder(method, model, tokenizer, config)
    request = DecodeRequest(0, kind, question=prompt if kind == "qa" else "", prefix=prompt if kind != "qa" else "",
                            passages=passages)
    generation = decoder.decode([request])[0]
    text = format_attributed(generation, tokenizer, passages, int(extra.get("min_span_tokens", 1)))
    return f"{text}\n(passage search {search_s:.1f} s, method {method})"
