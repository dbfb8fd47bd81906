"""Score stage on hand-made generations: per-example metrics and the pooled aggregates, worked out by hand."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from stages.decoding.types import LATENCY_COMPONENTS
from stages.evaluation import score
from stages.evaluation.generate import SCHEMA
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
    assert math.isclose(sum(s[f"time_{c}"] for c in LATENCY_COMPONENTS), s["seconds_per_query"])


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

    facts = [f"Ada studied mathematics topic {i}." for i in range(6)] + [f"Ada owned horse {i}." for i in range(6)]

    class FakeJudge:
        def __init__(self, lm_dir):
            assert str(lm_dir).endswith("judge")

        def generate(self, prompt):
            if prompt.rstrip().endswith("True or False?\nOutput:"):
                return "True" if "mathematics" in prompt.split("Input:")[-1] else "False"
            return "\n".join(f"- {f}" for f in facts)

    monkeypatch.setattr(score, "HFJudge", FakeJudge)  # where Score looks them up
    monkeypatch.setattr(score, "bm25_retriever", lambda bm25, passages: lambda e, f: ["Ada Lovelace. text"])
    ex = [Example(example_id=0, task="bio", kind="qa", query="Ada Lovelace", question="Tell me a bio of Ada Lovelace.",
                  references=["Ada Lovelace was a mathematician."])]
    _write(tmp_path, [{**_gen(0, "Ada Lovelace was a mathematician.", [-1], [-1], 1.0, {}), "task": "bio"}], ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="bio", method="nest",
              judge_lm=tmp_path / "judge", bm25=tmp_path, passages=tmp_path)
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["factscore"], 50.0) and s["num_facts"] == 12


# -- attribution: copied vs supported, topical precision, answer in a copied span -------------------------
def _passages(folder, rows):
    """A ConvertCorpus-style passages folder: (title, source_id) per doc_id 0..n-1."""
    folder.mkdir()
    n = len(rows)
    pq.write_table(pa.table({"doc_id": list(range(n)), "source_id": [s for _, s in rows],
                             "title": [t for t, _ in rows], "section": [""] * n, "text": ["x"] * n}),
                   folder / "passages-00000.parquet")
    (folder / "passages.json").write_text(json.dumps({"num_rows": n, "shard_rows": n,
                                                      "shards": [{"file": "passages-00000.parquet"}]}))
    return folder


def _with_supported(gen, docs, pos, ends=None):
    return {**gen, "supported_doc_ids": docs, "supported_positions": pos, "token_char_ends": ends}


def test_bio_topical_precision_supported_and_off_topic_copies_by_hand(tmp_path):
    ex = [Example(example_id=0, task="bio", kind="qa", query="Ada Lovelace", question="Tell me a bio of Ada Lovelace.",
                  references=["Ada Lovelace was a mathematician."],
                  meta={"source_id": "s_ada", "title": "Ada Lovelace", "doc_ids": [0, 1]}),
          Example(example_id=1, task="bio", kind="qa", query="Cesare Beccaria", question="Tell me a bio of C. B.",
                  references=["Beccaria was a jurist."],
                  meta={"source_id": "s_bec", "title": "Cesare Beccaria", "doc_ids": [2]})]
    gens = [
        # copied: doc 0 (Ada's) ×2, doc 2 (Beccaria's) ×3 → 2 of 5 on topic; token 5 supported by doc 3
        _with_supported({**_gen(0, "Ada was a mathematician who wrote", [0, 0, 2, 2, 2, -1], [0, 1, 5, 6, 7, -1],
                                1.0, {}), "task": "bio"}, [-1, -1, -1, -1, -1, 3], [-1, -1, -1, -1, -1, 4]),
        # copied: doc 2 (his own) ×1, doc 3 (Ebla) ×1 → 1 of 2; token 2 supported by doc 0
        _with_supported({**_gen(1, "Beccaria was a jurist", [2, 3, -1, -1], [0, 0, -1, -1], 1.0, {}), "task": "bio"},
                        [-1, -1, 0, -1], [-1, -1, 0, -1]),
    ]
    _write(tmp_path, gens, ex)
    passages = _passages(tmp_path / "p", [("Ada Lovelace", "s_ada"), ("Ada Lovelace", "s_ada"),
                                          ("Cesare Beccaria", "s_bec"), ("Ebla", "s_ebla")])
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="bio", method="nest", passages=passages)
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["attribution_ratio"], 100 * 7 / 10)      # copied tokens only
    assert math.isclose(s["supported_ratio"], 100 * 2 / 10)        # apart
    assert math.isclose(s["topical_precision"], 100 * 3 / 7)       # pooled: Σ on-topic / Σ copied
    per = {(r["example_id"], r["metric"]): r["value"] for r in pq.read_table(out / "scores.parquet").to_pylist()}
    assert math.isclose(per[(0, "topical_precision")], 40.0) and math.isclose(per[(1, "topical_precision")], 50.0)
    copied = sorted((r["example_id"], r["title"], r["tokens"], r["on_topic"], r["topic"])
                    for r in pq.read_table(out / "copied_sources.parquet").to_pylist())
    assert copied == [(0, "Ada Lovelace", 2, True, "Ada Lovelace"), (0, "Cesare Beccaria", 3, False, "Ada Lovelace"),
                      (1, "Cesare Beccaria", 1, True, "Cesare Beccaria"), (1, "Ebla", 1, False, "Cesare Beccaria")]


def test_qa_answer_in_copied_span_and_old_generations_without_new_columns(tmp_path):
    ends = [3, 11, 14, 20, 21, 28, 29]  # "The| capital| is| Paris|,| France|."
    text = "The capital is Paris, France."
    ex = [Example(example_id=i, task="nq", kind="qa", query="q", question="Capital of France?",
                  references=["Paris", "paris, france"]) for i in range(3)]
    gens = [
        {**_with_supported(_gen(0, text, [-1, -1, -1, 4, 4, 4, -1], [-1, -1, -1, 10, 11, 12, -1], 1.0, {}),
                           [-1] * 7, [-1] * 7, ends), "task": "nq"},   # " Paris, France" copied: inside
        {**_with_supported(_gen(1, text, [-1, -1, -1, -1, 4, 4, -1], [-1, -1, -1, -1, 11, 12, -1], 1.0, {}),
                           [-1] * 7, [-1] * 7, ends), "task": "nq"},   # only ", France" copied: not inside
        {**_with_supported(_gen(2, "I do not know", [7, 7, 7, 7], [0, 1, 2, 3], 1.0, {}), [-1] * 4, [-1] * 4,
                           [1, 4, 8, 13]), "task": "nq"},              # wrong: not counted
    ]
    _write(tmp_path, gens, ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="nq", method="nest")
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["alr"], 100 * 2 / 3)
    assert math.isclose(s["answer_in_copied_span"], 100 * 1 / 2)  # of the 2 correct answers, 1
    assert math.isclose(s["num_tokens"], (7 + 7 + 4) / 3)
    assert not (out / "copied_sources.parquet").exists()           # bio tasks only
    # generations written before the supported/offset columns: supported 0, no answer-in-span
    old = [{k: v for k, v in g.items() if k not in ("supported_doc_ids", "supported_positions", "token_char_ends")}
           for g in gens]
    assert all("supported_doc_ids" not in g for g in old)
    (tmp_path / "g" / "generations.parquet").unlink()
    pq.write_table(pa.Table.from_pylist(old), tmp_path / "g" / "generations.parquet")
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="nq", method="nest")
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert s["supported_ratio"] == 0.0 and "answer_in_copied_span" not in s


def test_qa_stop_reasons_first_sentence_recall_and_chimeras_by_hand(tmp_path, micro_passages_dir):
    """Two NQ answers: one stopped by its rule, correct in its first sentence; one that hit the length cap, whose
    alias comes only in its second sentence, and whose first sentence copies from two articles (a chimera)."""
    from stages.corpus.passages import PassageReader

    reader = PassageReader(micro_passages_dir)
    rows = reader.get(list(range(len(reader))), ("doc_id", "source_id"))
    a = rows[0]["doc_id"]
    b = next(r["doc_id"] for r in rows if r["source_id"] != rows[0]["source_id"])
    ex = [Example(example_id=i, task="nq", kind="qa", query="q", references=["paris"]) for i in range(2)]
    g0 = _gen(0, "It is Paris. More", [a, a, a, -1], [1, 2, 3, -1], 1.0,
              {"stopped_by_eos": 0, "stopped_by_stop_rule": 1, "stopped_by_length": 0})
    g0["token_char_ends"] = [2, 5, 12, 17]
    g1 = _gen(1, "It is Rome. Not Paris.", [a, b, -1, b, b], [1, 4, -1, 5, 6], 1.0,
              {"stopped_by_eos": 0, "stopped_by_stop_rule": 0, "stopped_by_length": 1})
    g1["token_char_ends"] = [2, 5, 11, 15, 22]
    for g in (g0, g1):
        g["task"] = "nq"
    _write(tmp_path, [g0, g1], ex)
    out = tmp_path / "out"
    out.mkdir()
    score.run(out, examples=tmp_path / "e", generations=tmp_path / "g", task="nq", method="nest",
              passages=micro_passages_dir)
    s = {r["metric"]: r["value"] for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert math.isclose(s["alr"], 100.0) and math.isclose(s["alr_first_sentence"], 50.0)
    assert math.isclose(s["stopped_by_stop_rule"], 50.0) and math.isclose(s["stopped_by_length"], 50.0)
    assert math.isclose(s["stopped_by_eos"], 0.0)
    # sentences: "It is Paris." / " More" (g0: none stitched), "It is Rome." (a and b: a chimera) / " Not Paris." (b)
    assert math.isclose(s["chimera_rate"], 100 * 1 / 4)
