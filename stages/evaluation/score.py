"""Score stage: per-example metrics of one (task, method, variant) and their aggregates.

Inputs: ``examples`` (LoadTask), ``generations`` (Generate), optionally ``perplexity`` (Perplexity). Outputs, both
in the paper's table scale (ROUGE, ALR and attribution ratio in %):

- ``scores.parquet``, long format ``(example_id, task, method, variant, metric, value)``;
- ``summary.parquet``, ``(task, method, variant, metric, value, n)``: quality metrics are means over examples; speed and
  attribution are pooled (Σ over examples, then divided), so long generations weigh by their tokens:

| metric | definition |
|---|---|
| ``tokens_per_s`` | Σ generated tokens / Σ wall seconds (pooled: the speed figure; wall seconds count everything a query cost, its retrieval and key encoding included) |
| ``tokens_per_s_median`` | median over examples of tokens / wall seconds (beside the pooled figure, never instead of it) |
| ``ms_per_token`` | 1000 · Σ wall seconds / Σ generated tokens |
| ``seconds_per_query`` | mean wall seconds per example |
| ``seconds_per_query_median`` | median wall seconds per example |
| ``time_<component>`` | mean seconds per example in each latency component of ``stages.decoding.base.TIMING_KEYS``: lm_forward, passage_search, passage_encoding, token_index_build, token_search, verification, other (they add up to ``seconds_per_query``) |
| ``key_hit_rate`` | 100 · Σ passage-key cache hits / Σ passages looked up (methods with a token index; the cache starts empty each run) |
| ``attribution_ratio`` | 100 · Σ copied tokens / Σ generated tokens (copied: emitted from an accepted draft or a streamed continuation) |
| ``attribution_span_length`` | Σ copied tokens / Σ runs (a run: consecutive tokens copied from consecutive positions of one passage) |
| ``supported_ratio`` | 100 · Σ supported tokens / Σ generated tokens (produced one at a time, their value among the neighbours) |
| ``topical_precision`` | topical tasks (bio, factscore): 100 · Σ on-topic copied tokens / Σ copied tokens (``tasks.metrics.Topic``) |
| ``answer_in_copied_span`` | QA (ALR tasks): 100 · share of correct answers whose gold alias lies inside one copied span |
| ``alr_first_sentence`` | QA (ALR tasks): ALR of the answer's first sentence only (``tasks.sentences``): text copied after the answer cannot score |
| ``stopped_by_eos`` / ``stopped_by_stop_rule`` / ``stopped_by_length`` | % of examples each rule ended (``stopped_by_length``: the answers that hit the length cap) |
| ``chimera_rate`` | methods that copy (``passages`` given): 100 · Σ sentences whose copied tokens come from two or more articles (source ids) / Σ sentences (``tasks.metrics.chimera_counts``) |
| ``mean_proposed_span`` | Σ drafted tokens / Σ drafts (a draft: a span step or a streamed continuation; the paper's "average proposed span length", Fig. 2b) |
| ``mean_accepted_span`` | Σ accepted draft tokens / Σ drafts |
| ``ppl`` | exp(Σ target NLL / Σ target tokens) over the examples (evaluation mode, Table 1) |
| ``num_tokens`` | mean generated tokens (the paper's Avg. Len) |

Quality metrics come from the task, looked up in :mod:`tasks.registry` (never matched by name here): its ``score``.
The embedded ``completion`` tasks score ROUGE-1/2/L against the reference continuation; the embedded ``bio`` task scores
ROUGE-1 against the person's passages (``rouge1_source``, a proxy) and FactScore only when a judge LM is configured —
otherwise ``factscore`` is null and the report prints "not computed". A task that declares ``uses_judge`` gets the
judge configured with ``[factscore] judge_lm`` (a local HF chat LM folder; :mod:`stages.evaluation.judge`); it
decomposes each bio into atomic facts and checks each against the top BM25 passages of the corpus for "entity fact".

For the tasks that declare ``topical`` (each example about one entity: bio, factscore) a third output,
``copied_sources.parquet``, lists per example every passage tokens were copied from ``(example_id, task, method,
variant, topic, doc_id, title, tokens, on_topic)``: the report's off-topic section. Titles and source ids of the copied
passages come from ``passages`` (ConvertCorpus) when given; without it only the example's ``doc_ids`` decide what is on
topic.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.corpus.passages import PassageReader
from stages.decoding.types import LATENCY_COMPONENTS
from stages.evaluation.judge import HFJudge, bm25_retriever
from tasks import registry
from tasks.base import Example
from tasks.metrics import Topic, alr_first_sentence, answer_in_copied_span, attribution_stats, chimera_counts, topical_counts
from tasks.sentences import sentence_spans

VERSION = "4"

# which rule ended a generation (the decoder's counters, stages.decoding.base.Decoder.finish)
STOP_REASONS = ("stopped_by_eos", "stopped_by_stop_rule", "stopped_by_length")
QUALITY_MEAN = "mean"


def _example(row: dict):

    row = dict(row)
    row["meta"] = json.loads(row.get("meta") or "{}") if isinstance(row.get("meta"), str) else row.get("meta") or {}
    return Example.from_row(row)


def example_metrics(task: str, text: str, example: dict, scorer=None) -> dict[str, float | None]:
    """Quality metrics of one generation for the registered ``task`` (values in %, None = not computed): its
    ``Task.score``. ``scorer``: a task instance to score with (e.g. one built with a judge), else a plain one."""

    task_obj = scorer if scorer is not None else registry.get(task)
    return dict(task_obj.score(text, _example(example)))


def _sources(gen: dict, prefix: str = "source") -> list:
    """Per-token ``(doc_id, position)`` or None from the ``<prefix>_doc_ids/_positions`` columns (``supported``:
    empty for generations written before those columns existed)."""
    docs, pos = gen.get(f"{prefix}_doc_ids"), gen.get(f"{prefix}_positions")
    if docs is None or pos is None:
        return [None] * int(gen.get("num_tokens") or 0)
    return [None if d < 0 else (d, p) for d, p in zip(docs, pos)]


COPIED_SCHEMA = pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("method", pa.string()),
                           ("variant", pa.string()), ("topic", pa.string()), ("doc_id", pa.int64()),
                           ("title", pa.string()), ("tokens", pa.int64()), ("on_topic", pa.bool_())])


def _passage_info(passages: Path | None, doc_ids: set[int]) -> dict[int, dict]:
    """``{doc_id: {"title", "source_id"}}`` of the given passages (empty without a passages folder)."""
    if passages is None or not doc_ids:
        return {}

    ids = sorted(doc_ids)
    return {d: r for d, r in zip(ids, PassageReader(passages).get(ids, ("title", "source_id")))}


def _topical(task: str) -> bool:
    """Whether the task's examples are about one entity (``Task.topical``: topical precision, copied sources)."""

    return registry.spec(task).topical


def attribution_metrics(gen: dict, example: dict, task: str, quality: dict, passages: dict[int, dict] | None = None
                        ) -> tuple[dict[str, float | None], dict]:
    """Per-example attribution metrics (in %) of one generation, and the counts to pool: ``attribution_ratio``,
    ``attribution_span_length``, ``supported_ratio``; ``topical_precision`` for the topical tasks (when the example
    knows its topic); ``answer_in_copied_span`` for tasks scored by ALR (``quality`` holds ``alr``)."""

    src = _sources(gen)
    st = attribution_stats(src, _sources(gen, "supported"))
    n = st["tokens"]
    out = {"attribution_ratio": 100.0 * st["copied_tokens"] / n if n else None,
           "attribution_span_length": st["attribution_span_length"],
           "supported_ratio": 100.0 * st["supported_tokens"] / n if n else None}
    counts = {"copied": st["copied_tokens"], "runs": st["runs"], "supported": st["supported_tokens"],
              "topic_copied": 0, "topic_on": 0, "off_topic": {}, "on_topic_docs": {}, "topic": None}
    if _topical(task):
        meta = _example(example).meta
        topic = Topic.from_meta(meta)
        if topic is not None:
            copied, on, off = topical_counts(src, topic, passages)
            out["topical_precision"] = 100.0 * on / copied if copied else None
            on_docs: dict[int, int] = {}
            for s_ in src:
                if s_ is not None and int(s_[0]) not in off:
                    on_docs[int(s_[0])] = on_docs.get(int(s_[0]), 0) + 1
            counts.update(topic_copied=copied, topic_on=on, off_topic=off, on_topic_docs=on_docs,
                          topic=str(topic.title or meta.get("source_id") or ""))
    ends = gen.get("token_char_ends")
    ends = list(ends) if ends is not None and len(ends) == len(src) else None
    if quality.get("alr") is not None:
        refs = list(example.get("references") or [])
        out["alr_first_sentence"] = 100.0 * alr_first_sentence(gen["text"], refs)
        if ends is not None:
            v = answer_in_copied_span(gen["text"], refs, src, ends)
            out["answer_in_copied_span"] = None if v is None else 100.0 * v
    counts.update(sentences=0, chimeras=0)
    if ends is not None and passages and st["copied_tokens"]:
        def article_of(doc: int):
            info = passages.get(doc) or {}
            return info.get("source_id") or info.get("title") or doc

        n_sent, n_chim = chimera_counts(gen["text"], src, ends, article_of)
        counts.update(sentences=n_sent, chimeras=n_chim)
        out["chimera_rate"] = 100.0 * n_chim / n_sent if n_sent else None
    elif ends is not None and passages is not None:

        counts["sentences"] = len(sentence_spans(gen["text"]))  # nothing copied: no chimera
        out["chimera_rate"] = 0.0 if counts["sentences"] else None
    return out, counts


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def run(out_dir: Path, *, examples: Path, generations: Path, task: str, method: str, variant: str = "main",
        perplexity: Path | None = None, judge_lm: Path | None = None, bm25: Path | None = None,
        passages: Path | None = None) -> dict:
    """Score one (task, method, variant). ``judge_lm`` (with ``bm25`` and ``passages``): the judge of the tasks that
    declare ``uses_judge`` (FactScore); ``passages`` alone: the titles and source ids of copied passages (topical
    precision, ``copied_sources.parquet``)."""

    spec = registry.spec(task)
    options = {}
    if judge_lm is not None and spec.uses_judge:

        options = {"judge": HFJudge(judge_lm), "retrieve": bm25_retriever(bm25, passages)}
    scorer = registry.get(task, **options)

    out_dir = Path(out_dir)
    ex_rows = {int(r["example_id"]): r for r in pq.read_table(Path(examples) / "examples.parquet").to_pylist()}
    gens = pq.read_table(Path(generations) / "generations.parquet").to_pylist()
    ppl_rows = {}
    if perplexity is not None:
        for r in pq.read_table(Path(perplexity) / "perplexity.parquet").to_pylist():
            ppl_rows[int(r["example_id"])] = r

    # titles and source ids of copied passages: topical precision, off-topic copies, chimera sentences
    passage_info: dict[int, dict] | None = None
    if passages is not None:
        passage_info = _passage_info(passages, {int(d) for g in gens for d in (g["source_doc_ids"] or []) if d >= 0})

    long_rows: list[dict] = []
    copied_rows: list[dict] = []
    per_metric: dict[str, list[float]] = {}
    pooled = {"tokens": 0, "seconds": 0.0, "attributed": 0, "runs": 0, "accepted": 0, "drafted": 0, "drafts": 0,
              "supported": 0, "topic_copied": 0, "topic_on": 0, "sentences": 0, "chimeras": 0,
              "key_hits": 0, "key_lookups": 0}
    rates: list[float] = []
    walls: list[float] = []
    comp_sum = {c: 0.0 for c in LATENCY_COMPONENTS}

    def add(eid: int, metric: str, value) -> None:
        v = _num(value)
        long_rows.append({"example_id": eid, "task": task, "method": method, "variant": variant, "metric": metric,
                          "value": v})
        if v is not None:
            per_metric.setdefault(metric, []).append(v)

    for g in gens:
        eid = int(g["example_id"])
        ex = ex_rows[eid]
        m = example_metrics(task, g["text"], ex, scorer)
        for k, v in m.items():
            add(eid, k, v)
        n = int(g["num_tokens"])
        add(eid, "num_tokens", n)
        add(eid, "wall_s", g["wall_s"])
        attr, cnt = attribution_metrics(g, ex, task, m, passage_info)
        for k, v in attr.items():
            add(eid, k, v)
        for k in ("supported", "topic_copied", "topic_on", "sentences", "chimeras"):
            pooled[k] += cnt[k]
        for on_topic, docs in ((False, cnt["off_topic"]), (True, cnt["on_topic_docs"])):
            for doc, k in sorted(docs.items()):
                copied_rows.append({"example_id": eid, "task": task, "method": method, "variant": variant,
                                    "topic": cnt["topic"], "doc_id": doc,
                                    "title": ((passage_info or {}).get(doc) or {}).get("title") or f"passage {doc}",
                                    "tokens": k, "on_topic": on_topic})
        counters = json.loads(g["counters"] or "{}")
        timings = json.loads(g["timings"] or "{}")
        for reason in STOP_REASONS:  # which rule ended the answer, in % of examples (stopped_by_length: cap hits)
            if reason in counters:
                add(eid, reason, 100.0 * int(counters[reason]))
        pooled["tokens"] += n
        pooled["seconds"] += float(g["wall_s"])
        pooled["attributed"] += cnt["copied"]
        pooled["runs"] += cnt["runs"]
        pooled["accepted"] += int(counters.get("accepted", 0))
        pooled["drafted"] += int(counters.get("drafted", 0))
        pooled["drafts"] += int(counters.get("steps_span", 0)) + int(counters.get("steps_stream", 0))
        hits, misses = int(counters.get("key_cache_hits", 0)), int(counters.get("key_cache_misses", 0))
        pooled["key_hits"] += hits
        pooled["key_lookups"] += hits + misses
        walls.append(float(g["wall_s"]))
        if float(g["wall_s"]) > 0:
            rates.append(n / float(g["wall_s"]))
        for c in LATENCY_COMPONENTS:
            comp_sum[c] += float(timings.get(c, 0.0))
        if eid in ppl_rows:
            add(eid, "nll_sum", ppl_rows[eid]["nll_sum"])
            add(eid, "ppl_tokens", ppl_rows[eid]["num_tokens"])

    n_ex = len(gens)
    summary: dict[str, float | None] = {}
    for metric, values in per_metric.items():
        if metric in ("attribution_ratio", "attribution_span_length", "supported_ratio", "topical_precision",
                      "chimera_rate", "wall_s", "nll_sum", "ppl_tokens"):
            continue
        summary[metric] = sum(values) / len(values) if values else None
    for metric in {k for r in long_rows for k in [r["metric"]]} - set(summary):
        if metric in ("factscore", "num_facts") and not per_metric.get(metric):
            summary[metric] = None
    summary["tokens_per_s"] = pooled["tokens"] / pooled["seconds"] if pooled["seconds"] > 0 else None
    summary["tokens_per_s_median"] = statistics.median(rates) if rates else None
    summary["ms_per_token"] = 1000 * pooled["seconds"] / pooled["tokens"] if pooled["tokens"] else None
    summary["seconds_per_query"] = pooled["seconds"] / n_ex if n_ex else None
    summary["seconds_per_query_median"] = statistics.median(walls) if walls else None
    if pooled["key_lookups"]:
        summary["key_hit_rate"] = 100.0 * pooled["key_hits"] / pooled["key_lookups"]
    summary["attribution_ratio"] = 100.0 * pooled["attributed"] / pooled["tokens"] if pooled["tokens"] else None
    summary["attribution_span_length"] = pooled["attributed"] / pooled["runs"] if pooled["runs"] else None
    summary["supported_ratio"] = 100.0 * pooled["supported"] / pooled["tokens"] if pooled["tokens"] else None
    if spec.topical:
        summary["topical_precision"] = (100.0 * pooled["topic_on"] / pooled["topic_copied"]
                                        if pooled["topic_copied"] else None)
    if pooled["sentences"]:
        summary["chimera_rate"] = 100.0 * pooled["chimeras"] / pooled["sentences"]
    summary["mean_accepted_span"] = pooled["accepted"] / pooled["drafts"] if pooled["drafts"] else None
    summary["mean_proposed_span"] = pooled["drafted"] / pooled["drafts"] if pooled["drafts"] else None
    for c in LATENCY_COMPONENTS:
        summary[f"time_{c}"] = comp_sum[c] / n_ex if n_ex else None
    if ppl_rows:
        nll = sum(float(r["nll_sum"]) for r in ppl_rows.values())
        toks = sum(int(r["num_tokens"]) for r in ppl_rows.values())
        summary["ppl"] = math.exp(nll / toks) if toks else None

    long_schema = pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("method", pa.string()),
                             ("variant", pa.string()), ("metric", pa.string()), ("value", pa.float64())])
    pq.write_table(pa.Table.from_pylist(long_rows, schema=long_schema), out_dir / "scores.parquet",
                   compression="zstd")
    if spec.topical:
        tmp = out_dir / ".copied_sources.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(copied_rows, schema=COPIED_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, out_dir / "copied_sources.parquet")
    sum_schema = pa.schema([("task", pa.string()), ("method", pa.string()), ("variant", pa.string()),
                            ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int64())])
    sum_rows = [{"task": task, "method": method, "variant": variant, "metric": k, "value": v, "n": n_ex}
                for k, v in sorted(summary.items())]
    pq.write_table(pa.Table.from_pylist(sum_rows, schema=sum_schema), out_dir / "summary.parquet",
                   compression="zstd")
    return {"examples": n_ex, "metrics": len(sum_rows)}
