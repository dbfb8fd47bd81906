"""Generate stage: one decoding method over one task (a range of its examples), with per-token attribution.

Inputs: ``examples`` (LoadTask), ``retrievals`` (PreRetrieve; unused by the base LM), ``passages`` (ConvertCorpus),
``tokens`` (PreTokenize), ``lm`` (PrepareLM). Output: ``generations.parquet``, one row per example:

| column | type | meaning |
|---|---|---|
| example_id, task, method | int64, str, str | |
| text | str | the generated text (EOS and what follows it are never generated) |
| token_ids | list<int32> | generated token ids |
| source_doc_ids, source_positions | list<int64>, list<int32> | per token: the corpus passage and position it was copied from (an accepted draft or a streamed continuation), −1 if not copied |
| supported_doc_ids, supported_positions | list<int64>, list<int32> | per token produced one at a time: the neighbour (passage, position) that carries its value, −1 if none (docs/metrics.md) |
| token_char_ends | list<int32> | per token: the length of the decoded text up to and including it (the characters of each copied span) |
| spans | list<list<int64>> | attribution runs ``[start, length, doc_id]`` |
| num_tokens | int32 | |
| wall_s | float64 | everything the example cost (= ``timings["total"]``): its share of PreRetrieve's search (the
  ``search_s`` column of retrievals.parquet), fetching its passages' token ids, encoding the passage keys the run had not
  met yet, building its token index and decoding. Methods without retrieval (the base LM) pay no search. |
| counters, timings | str (JSON) | the decoder's counters (``key_cache_hits``/``key_cache_misses`` per example, ``max_new_tokens``, the
  example's limit, and which rule ended it: ``stopped_by_eos`` / ``stopped_by_stop_rule`` / ``stopped_by_length``) and the
  latency components of :data:`stages.decoding.base.TIMING_KEYS` (seconds) |
| config | str (JSON) | the NestConfig overrides of this run (tells the γ-sweep runs apart) |

Passage keys: each run starts with its own empty in-process key cache (:func:`stages.decoding.passage_keys.open_key_cache` with ``on_disk=False``), so a query's time
never depends on which stage ran before it; keys are reused only across the examples of the same run (an earlier
query warms a later one), and the run's hit rate is in the stats (``key_hit_rate``). Nothing is prefetched for the
timed queries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.corpus.passages import ends_document
from stages.decoding import DecodeRequest, Passage
from stages.decoding.attribution import token_char_ends
from stages.evaluation.method_run import open_method_run
from stages.progress import progress
from stages.retrieval.pre_retrieve import read_search_seconds
from tasks.stopping import StopRule, rule_for

VERSION = "3"

SCHEMA = pa.schema([
    ("example_id", pa.int64()), ("task", pa.string()), ("method", pa.string()), ("text", pa.string()),
    ("token_ids", pa.list_(pa.int32())), ("source_doc_ids", pa.list_(pa.int64())),
    ("source_positions", pa.list_(pa.int32())), ("spans", pa.list_(pa.list_(pa.int64()))),
    ("num_tokens", pa.int32()), ("wall_s", pa.float64()), ("counters", pa.string()), ("timings", pa.string()),
    ("config", pa.string()),
    ("supported_doc_ids", pa.list_(pa.int64())), ("supported_positions", pa.list_(pa.int32())),
    ("token_char_ends", pa.list_(pa.int32())),
])


def build_requests(examples: list[dict], retrievals: dict[int, list[int]], passage_reader, token_lookup,
                   n_passages: int, max_new_tokens: int | None = None, stopping: dict | None = None):
    """DecodeRequests for ``examples``: ranked passages (token ids from the token shards, title/text for RA prompts).

    Each example's length and stop rule come from its task family (:mod:`tasks.stopping`; ``stopping`` = the run's
    resolved :class:`tasks.stopping.StopRule` as a dict, else the family's defaults); ``max_new_tokens`` (if given)
    overrides the length; a length of None leaves the decoding config's ``max_new_tokens``."""

    fixed = StopRule.from_dict(stopping) if stopping else None

    requests = []
    for ex in examples:
        doc_ids = retrievals.get(int(ex["example_id"]), [])[:n_passages]
        passages = []
        if doc_ids:
            rows = passage_reader.get(doc_ids)
            toks = token_lookup.get(doc_ids)
            ends = ends_document(passage_reader, doc_ids, rows)
            passages = [Passage(int(d), list(t), r.get("title", ""), r.get("text", ""), e) for d, t, r, e in
                        zip(doc_ids, toks, rows, ends)]
        meta = json.loads(ex.get("meta") or "{}")
        rule = fixed or rule_for(str(ex.get("task") or ""), ex.get("kind"))
        requests.append(DecodeRequest(
            example_id=int(ex["example_id"]), kind=ex["kind"], question=ex.get("question") or "",
            prefix=ex.get("prefix") or "", passages=passages, prefix_ids=meta.get("prefix_ids"),
            max_new_tokens=rule.length_for(meta) if max_new_tokens is None else max_new_tokens, stop=rule.stop))
    return requests


def key_hit_rate(counters: list[dict]) -> float | None:
    """Σ key-cache hits / Σ passages looked up over the examples' counters (None when no passage was looked up)."""
    hits = sum(int(c.get("key_cache_hits", 0)) for c in counters)
    total = hits + sum(int(c.get("key_cache_misses", 0)) for c in counters)
    return hits / total if total else None


def run(out_dir: Path, *, examples: Path, passages: Path, tokens: Path, lm: Path, retrievals: Path | None = None,
        method: str, config: dict | None = None, start: int = 0, end: int | None = None,
        device: str = "cpu", dtype: str | None = None, passage_keys: Path | None = None,
        stopping: dict | None = None) -> dict:
    """Decode examples ``[start, end)`` of ``examples.parquet`` with ``method`` and ``NestConfig(**config)``; each
    example's length and stop rule are its task family's (``stopping``: the resolved rule, see :func:`build_requests`;
    the config's ``max_new_tokens`` is the fallback only)."""
    # lazy: torch takes seconds to import
    import torch

    # lazy: torch and transformers take seconds to import
    from stages.decoding.base import add_passage_search, settle_other
    from stages.decoding.passage_keys import open_key_cache

    out_dir = Path(out_dir)
    # no cross-run disk key cache: a run's speed must not depend on what ran before it
    mr = open_method_run(method, config, examples=examples, passages=passages, tokens=tokens, lm=lm,
                         retrievals=retrievals, device=device, dtype=dtype,
                         key_cache=lambda cfg: open_key_cache(cfg, passage_keys, on_disk=False))
    cfg, decoder, tokenizer = mr.config, mr.decoder, mr.tokenizer
    reader, lookup, retr = mr.reader, mr.lookup, mr.retrievals
    rows = mr.rows[start:end]
    uses_retrieval = mr.decoder.retrieves
    search_s = read_search_seconds(retrievals) if uses_retrieval else {}
    decoder.newline_ids()  # the stop rules' line-break ids: one-time start-up, never inside an example's wall time

    out_rows = []
    all_counters = []
    t_all = time.perf_counter()
    bs = max(1, cfg.batch_size)
    # a bar on a terminal; in a log, a line every few seconds (done/total, rate, ETA): RA-NEST runs for many minutes
    with torch.inference_mode(), progress(f"Generate {method}", len(rows), "examples") as bar:
        for i in range(0, len(rows), bs):
            batch = rows[i:i + bs]
            t0 = time.perf_counter()
            reqs = build_requests(batch, retr, reader, lookup, cfg.passages, stopping=stopping)
            fetch_s = (time.perf_counter() - t0) / len(batch)  # reading the passages' token ids and text
            gens = decoder.decode(reqs)
            for ex, g in zip(batch, gens):
                if uses_retrieval:  # the example's share of the retrieval, and fetching its passages
                    add_passage_search(g.timings, fetch_s + search_s.get(int(ex["example_id"]), 0.0))
                else:  # reading the example only: "other"
                    g.timings["total"] += fetch_s
                    settle_other(g.timings)
                all_counters.append(g.counters)
                wall = g.timings["total"]
                r = g.to_row()
                out_rows.append({
                    "example_id": r["example_id"], "task": ex["task"], "method": method, "text": r["text"],
                    "token_ids": r["token_ids"], "source_doc_ids": r["source_doc_ids"],
                    "source_positions": r["source_positions"], "spans": r["spans"],
                    "num_tokens": len(r["token_ids"]), "wall_s": wall,
                    "counters": json.dumps(r["counters"], sort_keys=True),
                    "timings": json.dumps(r["timings"], sort_keys=True),
                    "config": json.dumps(config or {}, sort_keys=True),
                    "supported_doc_ids": r["supported_doc_ids"], "supported_positions": r["supported_positions"],
                    "token_char_ends": token_char_ends(tokenizer, r["token_ids"])})  # after the timed decode
            bar.update(len(batch))
    write_generations(out_dir, out_rows)
    rate = key_hit_rate(all_counters)
    return {"examples": len(out_rows), "tokens": sum(r["num_tokens"] for r in out_rows),
            "seconds": round(time.perf_counter() - t_all, 3),
            "wall_s_sum": round(sum(r["wall_s"] for r in out_rows), 3),
            "key_hit_rate": None if rate is None else round(rate, 4),
            "key_cache_hits": sum(int(c.get("key_cache_hits", 0)) for c in all_counters),
            "key_cache_misses": sum(int(c.get("key_cache_misses", 0)) for c in all_counters)}


def write_generations(out_dir: Path, rows: list[dict]) -> None:
    """``generations.parquet`` of ``rows`` (a run, or the merge of a sharded run: the same call, the same bytes)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), Path(out_dir) / "generations.parquet",
                   compression="zstd")


def merge(out_dir: Path, *, shards: list[Path], **_params) -> dict:
    """The shards of a sharded Generate (example ranges, in order: each a Generate over ``[start, end)``) → the
    ``generations.parquet`` of the whole range. The rows are the shards' rows, so the file is the one a single run
    writes, except for what every run measures anew (``wall_s``, ``timings``; and the per-run key-cache counters of
    the methods that encode passage keys on the fly)."""
    rows: list[dict] = []
    for s in shards:
        rows.extend(pq.read_table(Path(s) / "generations.parquet").to_pylist())
    ids = [r["example_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("Generate merge: two shards hold the same example")
    write_generations(out_dir, rows)
    counters = [json.loads(r["counters"] or "{}") for r in rows]
    rate = key_hit_rate(counters)
    return {"examples": len(rows), "tokens": sum(r["num_tokens"] for r in rows),
            "wall_s_sum": round(sum(r["wall_s"] for r in rows), 3),
            "key_hit_rate": None if rate is None else round(rate, 4),
            "key_cache_hits": sum(int(c.get("key_cache_hits", 0)) for c in counters),
            "key_cache_misses": sum(int(c.get("key_cache_misses", 0)) for c in counters),
            "merged_shards": len(shards)}
