"""Latency components: each method books its time under the component that names it, the parts add up to
the total, and a prompt stream (``nest generate --file --json``) reports everything a prompt cost."""

import io
import json
import time

import pytest

from decoding_tiny import TinyTokenizer, random_passages, tiny_llama
from stages.decoding import DecodeRequest, NestConfig, PassageKeyCache, make_decoder
from stages.decoding.types import LATENCY_COMPONENTS
from stages.decoding.base import COMPONENT_KEYS, TIMING_KEYS, add_passage_search, settle_other
from pipeline.demo import DemoSession, read_prompts, run_stream
from stages.errors import InputError

SLACK = 1e-6  # float rounding of the sums


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, max_pos=256)


def _req(eid=0, n_passages=6, seed=1):
    return DecodeRequest(eid, "completion", prefix="hello world", passages=random_passages(seed, n_passages),
                         max_new_tokens=12)


def _parts(t: dict) -> float:
    return sum(t[k] for k in COMPONENT_KEYS)


def test_timing_keys_are_the_contract():
    assert TIMING_KEYS == ("lm_forward", "passage_search", "passage_encoding", "token_index_build", "token_search",
                           "verification", "other", "total")
    assert LATENCY_COMPONENTS == TIMING_KEYS[:-1]


@pytest.mark.parametrize("method", ["base", "ra"])
def test_prompt_only_methods_book_only_the_lm_forward(model, tok, method):
    g = make_decoder(method, model, tok, NestConfig()).decode([_req()])[0]
    t = g.timings
    assert set(t) == set(TIMING_KEYS)
    assert t["lm_forward"] > 0
    assert all(t[k] == 0.0 for k in ("passage_search", "passage_encoding", "token_index_build", "token_search",
                                     "verification"))
    assert t["other"] >= 0 and t["lm_forward"] + t["other"] == pytest.approx(t["total"], abs=SLACK)


@pytest.mark.parametrize("method", ["nest", "knnlm"])
def test_token_index_methods_pay_encoding_cold_and_not_warm(model, tok, method):
    dec = make_decoder(method, model, tok, NestConfig(), key_cache=PassageKeyCache())
    cold = dec.decode([_req()])[0]
    t = cold.timings
    assert t["passage_encoding"] > 0 and t["token_index_build"] > 0 and t["token_search"] > 0
    assert t["lm_forward"] > 0 and t["passage_search"] == 0.0  # the caller retrieved the passages
    assert _parts(t) <= t["total"] + SLACK
    assert _parts(t) + t["other"] == pytest.approx(t["total"], abs=SLACK)
    assert cold.counters["key_cache_misses"] == 6 and cold.counters["key_cache_hits"] == 0
    # the same passages again: the keys come from the cache the first query filled, nothing is encoded
    warm = dec.decode([_req(eid=1)])[0]
    assert warm.timings["passage_encoding"] == 0.0 and warm.timings["token_index_build"] > 0
    assert warm.counters["key_cache_hits"] == 6 and warm.counters["key_cache_misses"] == 0
    assert warm.token_ids == cold.token_ids  # the cache changes time, never tokens


def test_a_batch_encodes_each_distinct_passage_once(model, tok):
    """Two rows of one batch share passages: the shared ones are encoded once (both rows count them as misses)."""
    cache = PassageKeyCache()
    dec = make_decoder("nest", model, tok, NestConfig(batch_size=2), key_cache=cache)
    shared = random_passages(5, 4)
    reqs = [DecodeRequest(i, "completion", prefix="ab" * (i + 1), passages=shared, max_new_tokens=4) for i in range(2)]
    gens = dec.decode(reqs)
    assert cache.stats["misses"] == 4  # four distinct passages encoded, not eight
    assert all(g.counters["key_cache_misses"] == 4 for g in gens)
    # the encoding time of the batch is shared equally
    assert gens[0].timings["passage_encoding"] == pytest.approx(gens[1].timings["passage_encoding"])


def test_passage_search_is_added_to_the_total():
    t = settle_other({"lm_forward": 1.0, "total": 1.5})
    assert t["other"] == pytest.approx(0.5)
    add_passage_search(t, 0.25)
    assert t["passage_search"] == 0.25 and t["total"] == pytest.approx(1.75) and t["other"] == pytest.approx(0.5)


# ---- the prompt stream (nest generate --file --json) -------------------------------------------------------------

def _session(model, tok, method="nest"):
    passages = random_passages(7, 5)

    def retrieve(prompt):
        time.sleep(0.001)  # a retrieval that takes measurable time
        return passages

    return DemoSession(model, tok, method, NestConfig(max_new_tokens=6), retrieve=retrieve, kind="completion",
                       startup_s=1.5)


def test_stream_json_one_object_per_prompt(model, tok):
    session = _session(model, tok)
    out, err = io.StringIO(), io.StringIO()
    summary = run_stream(session, ["first prompt", "second prompt", "third"], as_json=True, out=out, err=err)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 3
    for rec in lines:
        assert {"prompt", "tokens", "seconds", "components", "text", "sources"} <= set(rec)
        assert set(rec["components"]) == set(LATENCY_COMPONENTS)
        assert rec["components"]["passage_search"] > 0  # the prompt's own retrieval is in its seconds
        assert sum(rec["components"].values()) == pytest.approx(rec["seconds"], abs=1e-5)
        assert rec["tokens"] == 6 and isinstance(rec["text"], str)
        for src in rec["sources"]:
            assert {"n", "doc_id", "title", "tokens"} <= set(src) and src["tokens"] >= 1
    # the first prompt encodes the keys, the later ones find them (the same passages)
    assert lines[0]["key_cache_misses"] == 5 and lines[0]["components"]["passage_encoding"] > 0
    assert lines[1]["key_cache_hits"] == 5 and lines[1]["components"]["passage_encoding"] == 0
    # start-up first and the summary last, on stderr, apart from every prompt's seconds
    meta = [json.loads(x) for x in err.getvalue().splitlines()]
    assert meta[0] == {"startup_s": 1.5} and meta[-1]["summary"] == summary
    assert summary["prompts"] == 3 and summary["key_hit_rate"] == pytest.approx(10 / 15, abs=1e-4)
    assert summary["tokens"] == 18
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in lines), abs=1e-2)


def test_stream_text_mode_and_the_base_lm(model, tok):
    session = _session(model, tok, method="base")
    out = io.StringIO()
    summary = run_stream(session, ["a prompt"], out=out, err=io.StringIO())
    assert out.getvalue().startswith("=== 1/1: a prompt\n")
    assert "passage-key hit rate n/a" in out.getvalue() and summary["key_hit_rate"] is None
    assert session.totals["key_cache_misses"] == 0  # the base LM retrieves nothing


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Tell me a bio of Ada Lovelace.\n\n  Tell me a bio of Alan Turing.  \n", encoding="utf-8")
    assert read_prompts(f) == ["Tell me a bio of Ada Lovelace.", "Tell me a bio of Alan Turing."]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(InputError, match=r"bad.txt:2: not UTF-8"):
        read_prompts(tmp_path / "bad.txt")


# ---- the Generate stage: wall_s counts everything, keys warm only from the run's earlier examples -----------------

class _Reader:
    def __init__(self, folder):
        pass

    def get(self, doc_ids, columns=None):
        return [{"title": f"T{d}", "text": ""} for d in doc_ids]


def _lookup_for(passages):
    by_id = {p.doc_id: list(p.token_ids) for p in passages}

    class _Lookup:
        def __init__(self, folder):
            pass

        def get(self, doc_ids):
            return [by_id[int(d)] for d in doc_ids]

    return _Lookup


def _stage_inputs(tmp_path, passages, search_s):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.retrieval import pre_retrieve
    from tasks.base import Example, examples_to_table

    (tmp_path / "e").mkdir()
    (tmp_path / "r").mkdir()
    ex = [Example(example_id=i, task="completion", kind="completion", query="q", prefix=f"prefix {i}",
                  references=["x"]) for i in range(3)]
    pq.write_table(examples_to_table(ex), tmp_path / "e" / "examples.parquet")
    rows = [{"example_id": i, "rank": r + 1, "doc_id": p.doc_id, "fused": 1.0, "bm25": None, "dense": None,
             "search_s": search_s} for i in range(3) for r, p in enumerate(passages)]
    pq.write_table(pa.Table.from_pylist(rows, schema=pre_retrieve.SCHEMA), tmp_path / "r" / "retrievals.parquet")


@pytest.mark.parametrize("method", ["nest", "base"])
def test_generate_wall_time_counts_retrieval_and_cold_keys(model, tok, tmp_path, monkeypatch, method):
    import pyarrow.parquet as pq

    from stages.evaluation import method_run
    from stages.evaluation import generate

    passages = random_passages(11, 4)
    search_s = 0.25  # PreRetrieve's share per example (written by hand)
    _stage_inputs(tmp_path, passages, search_s)
    monkeypatch.setattr(method_run, "load_lm", lambda *a, **k: (model, tok))  # where the stage looks them up
    monkeypatch.setattr(method_run, "PassageReader", _Reader)
    monkeypatch.setattr(method_run, "TokenLookup", _lookup_for(passages))
    (tmp_path / "out").mkdir()
    stats = generate.run(tmp_path / "out", examples=tmp_path / "e", passages=tmp_path, tokens=tmp_path, lm=tmp_path,
                         retrievals=tmp_path / "r", method=method, config={"max_new_tokens": 5})
    gens = pq.read_table(tmp_path / "out" / "generations.parquet").to_pylist()
    timings = [json.loads(g["timings"]) for g in gens]
    counters = [json.loads(g["counters"]) for g in gens]
    for g, t in zip(gens, timings):
        assert set(t) == set(TIMING_KEYS)
        assert g["wall_s"] == pytest.approx(t["total"])
        assert _parts(t) + t["other"] == pytest.approx(t["total"], abs=SLACK)
    if method == "base":  # no retrieval: nothing of it is charged
        assert all(t["passage_search"] == 0.0 and t["passage_encoding"] == 0.0 for t in timings)
        assert stats["key_hit_rate"] is None
        return
    assert all(t["passage_search"] >= search_s and g["wall_s"] > search_s for g, t in zip(gens, timings))
    # the run's cache starts empty: the first example encodes, the later ones (same passages) reuse its keys
    assert counters[0]["key_cache_misses"] == 4 and timings[0]["passage_encoding"] > 0
    assert all(c["key_cache_hits"] == 4 and t["passage_encoding"] == 0.0 for c, t in zip(counters[1:], timings[1:]))
    assert stats["key_hit_rate"] == pytest.approx(8 / 12, abs=1e-4)


def test_stream_stop_rule_by_prompt_and_min_new_tokens(model, tok):
    # nest generate: a question ends with its first sentence (the qa family's rule), a bio request with its article
    # (longform: no rule), --stop overrides both; --min-new-tokens N with --max-new-tokens N writes exactly N tokens
    qa = DemoSession(model, tok, "nest", NestConfig(max_new_tokens=6), retrieve=lambda p: random_passages(7, 5))
    assert qa.stop_for(None) == "sentence" and qa.stop_for("bio") == "none"
    assert DemoSession(model, tok, "base", NestConfig(), stops={"qa": "paragraph"}).stop_for(None) == "paragraph"
    forced = DemoSession(model, tok, "base", NestConfig(), stop="none")
    assert forced.stop_for(None) == "none"
    assert DemoSession(model, tok, "base", NestConfig(), kind="completion").stop_for(None) == "none"
    for method in ("base", "nest"):
        s = DemoSession(model, tok, method, NestConfig(max_new_tokens=9, min_new_tokens=9),
                        retrieve=lambda p: random_passages(7, 5))
        g, _ = s.answer("Who was it?")
        assert len(g.token_ids) == 9 and g.counters["min_new_tokens"] == 9


def test_a_free_question_takes_the_overrides_every_qa_task_shares(model, tok):
    cfg = {"bio": {"document_end": "eos", "span_start_passages": 1}, "nq": {"span_start_passages": 1, "gamma": 0.5},
           "hotpotqa": {"span_start_passages": 1}, "completion": {"gamma": 0.9}}
    qa = DemoSession(model, tok, "nest", NestConfig(), task_config=cfg)
    assert qa.overrides_for(None) == {"span_start_passages": 1}  # shared by nq and hotpotqa; nq's γ is not
    assert qa.overrides_for("bio") == cfg["bio"]
    assert qa.decoder_for(None).config.span_start_passages == 1
    assert DemoSession(model, tok, "nest", NestConfig(), kind="completion", task_config=cfg).overrides_for(None) == {}
    assert DemoSession(model, tok, "nest", NestConfig()).overrides_for(None) == {}
