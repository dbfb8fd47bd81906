"""Score stage on hand-made generations: per-example metrics and the pooled aggregates, worked out by hand."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from stages import score
from stages.generate import SCHEMA
from tasks.base import examples_to_table, Example


def _write(tmp_path, gens, examples):
    (tmp_path / "g").mkdir()
    (tmp_path / "e").mkdir()
    pq.write_table(pa.Table.from_pylist(gens, schema=SCHEMA), tmp_path / "g" / "generations.parquet")
    pq.write_table(examples_to_table(examples), tmp_path / "e" / "examples.parquet")


def _gen(eid, text, docs, pos, wall, counters):
    return {"example_id": eid, "task": "completion", "method": "nest", "text": text, "token_ids": list(range(len(docs))),
            "source_doc_ids": docs, "source_positions": pos, "spans": [], "num_tokens": len(docs), "wall_s": wall,
            "counters": json.dumps(counters), "timings": json.dumps({"verification": wall / 2}), "config": "{}"}


def test_pooled_metrics_by_hand(tmp_path):
    ex = [Example(example_id=i, task="completion", kind="completion", query="q", references=["the cat sat"])
          for i in range(2)]
    gens = [
        # 4 tokens: a run of 2 (doc 7, pos 3-4), one unattributed, a run of 1 (doc 7, pos 9)
        _gen(0, "the cat sat", [7, 7, -1, 7], [3, 4, -1, 9], 2.0, {"accepted": 3, "drafted": 4, "steps_span": 1}),
        # 2 tokens, none attributed
        _gen(1, "a dog", [-1, -1], [-1, -1], 1.0, {"accepted": 0, "drafted": 2, "steps_stream": 1}),
    ]
    _write(tmp_path, gens, ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="completion", method="nest")
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["tokens_per_s"], 6 / 3.0)
    assert math.isclose(s["ms_per_token"], 500.0)
    assert math.isclose(s["attribution_ratio"], 100 * 3 / 6)        # 3 attributed of 6 tokens
    assert math.isclose(s["attribution_span_length"], 3 / 2)        # runs [2, 1]
    assert math.isclose(s["mean_accepted_span"], 3 / 2)             # 3 accepted over 2 drafts (a span, a stream)
    assert math.isclose(s["mean_proposed_span"], 6 / 2)             # 4 + 2 drafted
    assert math.isclose(s["rouge1"], (100.0 + 0.0) / 2)             # exact match, then no overlap
    assert math.isclose(s["time_verification"], (1.0 + 0.5) / 2)
    assert math.isclose(s["num_tokens"], 3.0)
    assert "ppl" not in s
    assert math.isclose(s["tokens_per_s_median"], (4 / 2.0 + 2 / 1.0) / 2)  # per example: 2.0 and 2.0 tok/s
    assert math.isclose(s["seconds_per_query_median"], 1.5)
    assert "key_hit_rate" not in s  # no passage was looked up


def test_components_and_key_hit_rate_pooled(tmp_path):
    """time_<component> is the mean per example of every latency component; the key hit rate pools the counters;
    the median tokens/s sits beside the pooled figure and differs from it when one example is slow."""
    ex = [Example(example_id=i, task="completion", kind="completion", query="q", references=["x"]) for i in range(3)]
    gens = []
    for eid, (wall, n, hits, misses) in enumerate(((10.0, 2, 0, 4), (1.0, 4, 3, 1), (1.0, 4, 4, 0))):
        g = _gen(eid, "x", [-1] * n, [-1] * n, wall, {"key_cache_hits": hits, "key_cache_misses": misses})
        timings = {"lm_forward": wall * 0.5, "passage_search": 0.1, "passage_encoding": 4.0 if misses == 4 else 0.0,
                   "token_index_build": 0.01, "token_search": 0.02, "verification": 0.03}
        timings["other"] = wall - sum(timings.values())
        g["timings"] = json.dumps({**timings, "total": wall})
        gens.append(g)
    _write(tmp_path, gens, ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="completion", method="nest")
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["tokens_per_s"], 10 / 12.0)                  # pooled: Σ tokens / Σ seconds
    assert math.isclose(s["tokens_per_s_median"], 4.0)                 # per example 0.2, 4, 4
    assert math.isclose(s["key_hit_rate"], 100 * 7 / 12)
    assert math.isclose(s["time_passage_encoding"], 4.0 / 3)
    assert math.isclose(s["time_lm_forward"], (5.0 + 0.5 + 0.5) / 3)
    assert math.isclose(sum(s[f"time_{c}"] for c in score.COMPONENTS), s["seconds_per_query"])


def test_bio_reports_factscore_as_not_computed(tmp_path):
    ex = [Example(example_id=0, task="bio", kind="qa", query="Ada Lovelace", question="Tell me a bio of Ada Lovelace.",
                  references=["Ada Lovelace was a mathematician."])]
    _write(tmp_path, [{**_gen(0, "Ada Lovelace was a mathematician.", [-1], [-1], 1.0, {}), "task": "bio"}], ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="bio", method="base")
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert s["factscore"] is None
    assert math.isclose(s["rouge1_source"], 100.0)


def test_bio_factscore_with_a_configured_judge(tmp_path, monkeypatch):
    """With a judge: 12 facts (no length penalty), the ones about mathematics supported: FS = 100 · 6/12."""
    import stages.judge

    facts = [f"Ada studied mathematics topic {i}." for i in range(6)] + [f"Ada owned horse {i}." for i in range(6)]

    class FakeJudge:
        def __init__(self, lm_dir):
            assert str(lm_dir).endswith("judge")

        def generate(self, prompt):
            if prompt.rstrip().endswith("True or False?\nOutput:"):
                return "True" if "mathematics" in prompt.split("Input:")[-1] else "False"
            return "\n".join(f"- {f}" for f in facts)

    monkeypatch.setattr(stages.judge, "HFJudge", FakeJudge)
    monkeypatch.setattr(stages.judge, "bm25_retriever", lambda bm25, passages: lambda e, f: ["Ada Lovelace. text"])
    ex = [Example(example_id=0, task="bio", kind="qa", query="Ada Lovelace", question="Tell me a bio of Ada Lovelace.",
                  references=["Ada Lovelace was a mathematician."])]
    _write(tmp_path, [{**_gen(0, "Ada Lovelace was a mathematician.", [-1], [-1], 1.0, {}), "task": "bio"}], ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="bio", method="nest",
              judge_lm=tmp_path / "judge", bm25=tmp_path, passages=tmp_path)
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["factscore"], 50.0) and s["num_facts"] == 12
