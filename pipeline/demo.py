"""The one-line demo behind ``nest generate "Tell me a bio of Marie Curie."``: retrieve passages for the prompt (hybrid
BM25 + dense fusion), decode with NEST (or a baseline), and print the text with ``[n]`` after each copied span followed
by the numbered sources (title, snippet).

``nest generate --file prompts.txt [--json]`` answers a stream of prompts in one process (:class:`DemoSession`,
:func:`run_stream`): the models and indexes are loaded once (the start-up, reported once and apart), passage keys are
cached in memory across the prompts (an earlier prompt warms a later one; the hit rate is reported), and each prompt's
``seconds`` counts everything it cost, its retrieval included. With ``--json`` stdout holds one JSON object per prompt
(``prompt, method, tokens, seconds, tokens_per_s, components, text, attribution_ratio, sources, passages,
key_cache_hits, key_cache_misses, lm_forward_passes``); stderr gets ``{"startup_s": ...}`` first and
``{"summary": {...}}`` (pooled tokens/s, key hit rate) last.

The upstream artifacts (LM folder, passages, token shards, BM25 and dense indexes) are built by the pipeline; this
module only reads them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Sequence

from stages.corpus.passages import ends_document
from stages.decoding.attribution import token_char_ends
from stages.decoding.config import NestConfig
from stages.decoding.registry import method_info
from tasks.metrics import attribution_ratio, attribution_runs
from stages.decoding.types import LATENCY_COMPONENTS, DecodeRequest, Generation, Passage
from stages.evaluation.experiments import merge_config

DEMO_DEFAULTS = {"max_new_tokens": 128, "passages": 40}
SNIPPET_CHARS = 160


def split_options(options: dict | None) -> tuple[dict, dict]:
    """(NestConfig fields, demo-only options) from one flat dict; unknown names raise ValueError."""
    fields = {f.name for f in dataclasses.fields(NestConfig)}
    demo_only = {"kind", "retrieval_mode", "candidates", "device", "dtype", "min_span_tokens", "task_config", "stops",
                 "stop", "pinned"}
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
    """Top-b passages for ``prompt`` by NEST's hybrid fusion (stages.retrieval.pre_retrieve.HybridRetriever), with their token
    ids (stages.lm.pretokenize.TokenLookup) and title/text (stages.corpus.passages.PassageReader)."""
    return PassageRetriever(passages_dir=passages_dir, tokens_dir=tokens_dir, bm25_dir=bm25_dir, dense_dir=dense_dir,
                            encoder=encoder, b=b, mode=mode, candidates=candidates)(prompt)


BIO_PROMPT = re.compile(r"^\s*(?:question:\s*)?tell me a bio(?:graphy)? of\s+(.+?)\s*[.?!]*\s*$", re.I)


def demo_query(prompt: str) -> tuple[str, str | None]:
    """(retrieval query, task) of a prompt. A bio request ("Tell me a bio of X.") is retrieved by the entity X, as the
    bio task and the paper's FactScore runs retrieve by the topic, and decodes with the profile's ``[decoding]
    task_config`` of ``bio``; any other prompt is its own query (task None)."""
    m = BIO_PROMPT.match(prompt)
    return (m.group(1), "bio") if m else (prompt, None)


class PassageRetriever:
    """The indexes and passage readers opened once; ``retriever(prompt)`` gives the top-b passages of one prompt."""

    def __init__(self, *, passages_dir, tokens_dir, bm25_dir, dense_dir, encoder, b: int, mode: str = "hybrid",
                 candidates: int = 4000):
        from stages.corpus.passages import PassageReader
        from stages.retrieval.pre_retrieve import HybridRetriever
        from stages.lm.pretokenize import TokenLookup

        self.retriever = HybridRetriever(bm25=Path(bm25_dir) if bm25_dir else None,
                                         dense=Path(dense_dir) if dense_dir else None, encoder=encoder, mode=mode, b=b,
                                         candidates=candidates)
        self.reader, self.lookup = PassageReader(passages_dir), TokenLookup(tokens_dir)

    def __call__(self, prompt: str) -> list[Passage]:
        rows = self.retriever.retrieve([prompt])[0].rows
        doc_ids = [int(r[0]) for r in rows]
        if not doc_ids:
            return []
        meta = self.reader.get(doc_ids)
        toks = self.lookup.get(doc_ids)
        ends = ends_document(self.reader, doc_ids, meta)
        return [Passage(d, list(t), m.get("title") or "", m.get("text") or "", e) for d, t, m, e in
                zip(doc_ids, toks, meta, ends)]


class DemoSession:
    """One process answering a stream of prompts: the LM, the indexes and the decoder are loaded once (``startup_s``),
    and the passage keys stay in an in-memory cache across the prompts (an earlier prompt warms a later one; nothing
    is prefetched for the prompt being answered).

    ``retrieve``: prompt -> ranked passages (None for a method that retrieves nothing, as the base LM). Each answer's ``seconds`` counts
    everything that prompt cost: its retrieval (``passage_search``), key encoding, index building and decoding."""

    def __init__(self, model, tokenizer, method: str, config: NestConfig, retrieve=None, kind: str = "qa",
                 min_span_tokens: int = 1, startup_s: float = 0.0, task_config: dict | None = None,
                 stops: dict | None = None, stop: str | None = None, pinned: dict | None = None):
        from stages.decoding import make_decoder
        from stages.decoding.passage_keys import open_key_cache

        self.tokenizer, self.method, self.kind = tokenizer, method, kind
        self.retrieve = retrieve if method_info(method).retrieves else None
        self.min_span_tokens = int(min_span_tokens)
        self.key_cache = open_key_cache(config, on_disk=False)  # memory only: this stream's keys
        self.decoder = make_decoder(method, model, tokenizer, config, key_cache=self.key_cache)
        self.task_config = dict(task_config or {})
        # the overrides a task's must not undo: the method's and the command line's (merge_config's precedence)
        self.pinned = dict(pinned or {})
        self.stops, self.stop = dict(stops or {}), stop
        self._decoders: dict = {}  # by task: a bio prompt decodes with the bio task's overrides (decoder_for)
        self.startup_s = float(startup_s)
        self.answered = 0
        self.totals = {"tokens": 0, "seconds": 0.0, "key_cache_hits": 0, "key_cache_misses": 0}

    @classmethod
    def load(cls, *, lm_dir, passages_dir, tokens_dir, bm25_dir, dense_dir, encoder, method: str = "nest",
             options: dict | None = None) -> "DemoSession":
        """Open the artifacts (see :func:`run_demo` for ``options``); the time it takes is ``startup_s``."""
        from stages.lm.load import load_lm

        t0 = time.perf_counter()
        cfg_fields, extra = split_options(options)
        cfg_fields.pop("key_cache_dir", None)  # the stream's keys live in memory (no cache from earlier processes)
        config = NestConfig(**cfg_fields)
        retrieve = None
        if method_info(method).retrieves:
            retrieve = PassageRetriever(passages_dir=passages_dir, tokens_dir=tokens_dir, bm25_dir=bm25_dir,
                                        dense_dir=dense_dir, encoder=encoder, b=config.passages,
                                        mode=extra.get("retrieval_mode", "hybrid"),
                                        candidates=int(extra.get("candidates", 4000)))
        model, tokenizer = load_lm(lm_dir, device=extra.get("device", "cpu"), dtype=extra.get("dtype"))
        session = cls(model, tokenizer, method, config, retrieve, kind=extra.get("kind", "qa"),
                      min_span_tokens=int(extra.get("min_span_tokens", 1)), task_config=extra.get("task_config"),
                      stops=extra.get("stops"), stop=extra.get("stop"), pinned=extra.get("pinned"))
        session.startup_s = time.perf_counter() - t0
        return session

    def stop_for(self, task: str | None) -> str:
        """The stop rule of a prompt: ``--stop`` if given, else its family's (``[decoding] stops`` over the defaults of
        tasks/stopping.py): a bio request is ``longform`` (it ends with the article, ``document_end``), any other
        question ``qa`` (it ends with its first sentence), a completion prompt ``completion`` (the length only)."""
        from tasks.stopping import DEFAULT_STOPS, STOP_RULES

        if self.stop is not None:
            if self.stop not in STOP_RULES:
                raise ValueError(f"unknown stop rule {self.stop!r}; expected one of {STOP_RULES}")
            return self.stop
        family = "longform" if task == "bio" else "qa" if self.kind == "qa" else "completion"
        return str(self.stops.get(family, DEFAULT_STOPS[family]))

    def overrides_for(self, task: str | None) -> dict:
        """A prompt's ``task_config`` overrides: its task's; for a free question (no task, kind ``qa``) those that every
        configured task of the ``qa`` family shares (the profile starts their spans only in the top article: a free
        question gets the same, so no answer stitches two articles); none for a completion prompt."""
        if task is not None:
            return dict(self.task_config.get(task) or {})
        if self.kind != "qa":
            return {}
        from tasks import registry
        from tasks.stopping import family_of

        qa = [t for t in self.task_config if t in registry.names() and family_of(t) == "qa"]
        common = dict(self.task_config[qa[0]]) if qa else {}
        for t in qa[1:]:
            common = {k: v for k, v in common.items() if (self.task_config[t] or {}).get(k) == v}
        return common

    def decoder_for(self, task: str | None):
        """The decoder of a prompt's task: the session's config with :meth:`overrides_for` the task, under the method's
        and the command line's (:func:`stages.evaluation.experiments.merge_config`: base → task → method → flags)."""
        if task not in self._decoders:
            from stages.decoding import make_decoder

            overrides = self.overrides_for(task)
            self._decoders[task] = self.decoder if not overrides else make_decoder(
                self.method, self.decoder.model, self.tokenizer, self.decoder.config.replace(**merge_config(overrides, self.pinned)),
                key_cache=self.key_cache)
        return self._decoders[task]

    def answer(self, prompt: str) -> tuple[Generation, list[Passage]]:
        """Retrieve and decode one prompt; ``generation.timings`` holds its components and ``total`` (seconds)."""
        from stages.decoding.base import settle_other
        from stages.errors import InputError

        if not prompt.strip():
            raise InputError(None, None, "the prompt is empty")
        t0 = time.perf_counter()
        query, task = demo_query(prompt) if self.kind == "qa" else (prompt, None)
        passages = self.retrieve(query) if self.retrieve is not None else []
        search_s = time.perf_counter() - t0
        kind = self.kind
        request = DecodeRequest(self.answered, kind, question=prompt if kind == "qa" else "",
                                prefix=prompt if kind != "qa" else "", passages=passages, stop=self.stop_for(task))
        generation = self.decoder_for(task).decode([request])[0]
        timings = generation.timings
        timings["passage_search"] = timings.get("passage_search", 0.0) + search_s
        timings["total"] = time.perf_counter() - t0  # everything this prompt cost, measured around all of it
        settle_other(timings)
        self.answered += 1
        c = generation.counters
        self.totals["tokens"] += len(generation.token_ids)
        self.totals["seconds"] += timings["total"]
        self.totals["key_cache_hits"] += int(c.get("key_cache_hits", 0))
        self.totals["key_cache_misses"] += int(c.get("key_cache_misses", 0))
        return generation, passages

    def key_hit_rate(self) -> float | None:
        """Passage-key hits / passages looked up over the prompts answered so far (None before any lookup)."""
        n = self.totals["key_cache_hits"] + self.totals["key_cache_misses"]
        return self.totals["key_cache_hits"] / n if n else None

    def record(self, prompt: str, generation: Generation, passages: Sequence[Passage]) -> dict:
        """The JSON object of one answered prompt (``nest generate --json``)."""
        by_doc = {p.doc_id: p for p in passages}
        used: dict[int, int] = {}
        for _, length, doc in attribution_runs(generation.sources, same_doc_only=True):
            used[doc] = used.get(doc, 0) + length
        t = generation.timings
        c = generation.counters
        n = len(generation.token_ids)
        return {
            "prompt": prompt, "method": self.method, "tokens": n, "seconds": round(t["total"], 6),
            "tokens_per_s": round(n / t["total"], 3) if t["total"] > 0 else None,
            "components": {k: round(float(t.get(k, 0.0)), 6) for k in LATENCY_COMPONENTS},
            "text": generation.text,
            "attribution_ratio": (None if attribution_ratio(generation.sources) is None
                                  else round(attribution_ratio(generation.sources), 4)),
            "sources": [{"n": i + 1, "doc_id": int(doc), "title": by_doc[doc].title if doc in by_doc else "",
                         "tokens": int(k)} for i, (doc, k) in enumerate(used.items())],
            "passages": len(passages),
            "key_cache_hits": int(c.get("key_cache_hits", 0)), "key_cache_misses": int(c.get("key_cache_misses", 0)),
            "lm_forward_passes": int(c.get("lm_forward_passes", 0)),
        }

    def summary(self) -> dict:
        """The stream's pooled figures: Σ tokens / Σ seconds (start-up excluded) and the key hit rate."""
        t = self.totals
        rate = self.key_hit_rate()
        return {"prompts": self.answered, "tokens": t["tokens"], "seconds": round(t["seconds"], 3),
                "tokens_per_s": round(t["tokens"] / t["seconds"], 3) if t["seconds"] > 0 else None,
                "key_cache_hits": t["key_cache_hits"], "key_cache_misses": t["key_cache_misses"],
                "key_hit_rate": None if rate is None else round(rate, 4), "startup_s": round(self.startup_s, 3)}




def read_prompts(path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped. Raises InputError (file, line) on a file
    that cannot be read or holds no prompt."""
    from stages.errors import InputError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(path, None, "no such prompts file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(path, line, "not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(path, None, "no prompt in the file (one prompt per line)")
    return prompts


def run_stream(session: DemoSession, prompts: Sequence[str], *, as_json: bool = False, out=None, err=None,
               on_answer=None) -> dict:
    """Answer ``prompts`` in order with one session. ``as_json``: one JSON object per prompt on ``out`` (see
    :meth:`DemoSession.record`), and the start-up (``{"startup_s": ...}``, before the first prompt) and the stream's
    summary (``{"summary": ...}``, after the last) as JSON lines on ``err``; otherwise the attributed texts, one
    block per prompt, and a summary line. ``on_answer(prompt, generation, passages)``: called after each prompt
    (``nest generate --html`` collects the answers). Returns the summary."""
    import json
    import sys

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if as_json:
        print(json.dumps({"startup_s": round(session.startup_s, 3)}), file=err, flush=True)
    for i, prompt in enumerate(prompts):
        generation, passages = session.answer(prompt)
        if on_answer is not None:
            on_answer(prompt, generation, passages)
        if as_json:
            print(json.dumps(session.record(prompt, generation, passages), ensure_ascii=False), file=out, flush=True)
        else:
            text = format_attributed(generation, session.tokenizer, passages, session.min_span_tokens)
            print(f"=== {i + 1}/{len(prompts)}: {prompt}\n{text}\n", file=out, flush=True)
    summary = session.summary()
    if as_json:
        print(json.dumps({"summary": summary}), file=err, flush=True)
    else:
        rate = summary["key_hit_rate"]
        print(f"({summary['prompts']} prompts, {summary['tokens']} tokens in {summary['seconds']:.1f} s: "
              f"{summary['tokens_per_s'] or 0:.1f} tokens/s, retrieval and key encoding included; start-up "
              f"{summary['startup_s']:.1f} s apart; passage-key hit rate "
              f"{'n/a' if rate is None else f'{rate:.0%}'})", file=out, flush=True)
    return summary


def run_demo(prompt: str, *, lm_dir, passages_dir, tokens_dir, bm25_dir, dense_dir, encoder, method: str = "nest",
             options: dict | None = None) -> str:
    """Retrieve, decode one prompt with ``method``, and return the attributed text and its sources (see
    :func:`format_attributed`). ``options``: NestConfig fields (gamma, alpha, tau, delta, span_length, passages,
    max_new_tokens, ...) plus ``kind`` (``qa``: the prompt is the question, default; ``completion``: the prompt is the
    article's start), ``retrieval_mode``, ``candidates``, ``device``, ``dtype``, ``min_span_tokens``."""
    from stages.errors import InputError

    if not prompt.strip():
        raise InputError(None, None, "the prompt is empty")
    session = DemoSession.load(lm_dir=lm_dir, passages_dir=passages_dir, tokens_dir=tokens_dir, bm25_dir=bm25_dir,
                               dense_dir=dense_dir, encoder=encoder, method=method, options=options)
    generation, passages = session.answer(prompt)
    text = format_attributed(generation, session.tokenizer, passages, session.min_span_tokens)
    return (f"{text}\n(passage search {generation.timings['passage_search']:.1f} s, method {method}; "
            f"start-up {session.startup_s:.1f} s apart)")
