"""LoadTask on the micro corpus: completion (both variants, same examples), exclusion lists, bio's person rule."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.evaluation import load_task
from stages.errors import InputError
from stages.lm.load import load_tokenizer
from stages.corpus.passages import PassageReader
from tasks.base import examples_schema
from tasks.bio import is_person
from tasks.completion import FALLBACK_TARGET_TOKENS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

P, T = 16, 48  # prefix / target tokens for the tiny tokenizer (its tokens are short: ~2 chars)

PEOPLE = {"Jules Verne", "Ben Jonson", "Joseph Fourier", "Shirley Temple", "Bill Gates", "Simone Biles", "Karl Pearson",
          "Konrad Zuse", "Margaret Thatcher", "Louis XVI", "Madhvacharya", "William Blackstone"}


def run_task(out, passages, lm, task, **kw):
    out.mkdir(parents=True, exist_ok=True)
    stats = load_task.run(out, passages=passages, lm=lm, task=task, **kw)
    table = pq.read_table(out / "examples.parquet")
    assert table.schema.equals(examples_schema())
    return stats, table.to_pylist()


@pytest.fixture(scope="module")
def completion_pair(tmp_path_factory, micro_passages_dir, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("load_task")
    kw = dict(n_examples=6, seed=3, prefix_tokens=P, target_tokens=T)
    a = run_task(base / "in", micro_passages_dir, tiny_tokenizer_dir, "completion", **kw)
    b = run_task(base / "ex", micro_passages_dir, tiny_tokenizer_dir, "completion_excluded", **kw)
    return a, b


def test_completion_examples(completion_pair, micro_passages_dir, tiny_tokenizer_dir):
    (stats, rows), _ = completion_pair
    tok = load_tokenizer(tiny_tokenizer_dir)
    reader = PassageReader(micro_passages_dir)
    assert stats["num_examples"] == 6 and stats["min_tokens"] == P + T
    assert [r["example_id"] for r in rows] == list(range(6))
    doc_ids = [json.loads(r["meta"])["doc_id"] for r in rows]
    assert doc_ids == sorted(set(doc_ids))
    for row, passage in zip(rows, reader.get(doc_ids)):
        meta = json.loads(row["meta"])
        ids = tok(f"{passage['title']}. {passage['text']}", add_special_tokens=False)["input_ids"]
        assert len(ids) >= P + T
        assert meta["prefix_ids"] == ids[:P] and meta["target_ids"] == ids[P:P + T]
        assert row["prefix"] == tok.decode(ids[:P]) == row["query"]
        assert row["references"] == [tok.decode(ids[P:P + T])]
        assert (passage["title"] + ". " + passage["text"]).startswith(row["prefix"] + row["references"][0])
        assert (row["task"], row["kind"], row["question"], row["exclude_doc_ids"]) == ("completion", "completion", "",
                                                                                       [])
        assert meta["source_id"] == passage["source_id"]


def test_completion_variants_share_examples_and_exclude_the_source(completion_pair, micro_passages_dir):
    (_, with_source), (_, excluded) = completion_pair
    keep = ("example_id", "kind", "query", "question", "prefix", "references", "meta")
    assert [{k: r[k] for k in keep} for r in with_source] == [{k: r[k] for k in keep} for r in excluded]
    every = [r for b in PassageReader(micro_passages_dir).iter_batches(["doc_id", "source_id"]) for r in b.to_pylist()]
    for row in excluded:
        meta = json.loads(row["meta"])
        assert row["task"] == "completion_excluded"
        assert row["exclude_doc_ids"] == [p["doc_id"] for p in every if p["source_id"] == meta["source_id"]]
        assert meta["doc_id"] in row["exclude_doc_ids"]
    assert any(len(r["exclude_doc_ids"]) > 1 for r in excluded)  # a split article excludes all its parts


def test_completion_is_seeded(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    kw = dict(n_examples=6, prefix_tokens=P, target_tokens=T)
    _, a = run_task(tmp_path / "a", micro_passages_dir, tiny_tokenizer_dir, "completion", seed=3, **kw)
    _, b = run_task(tmp_path / "b", micro_passages_dir, tiny_tokenizer_dir, "completion", seed=3, **kw)
    _, c = run_task(tmp_path / "c", micro_passages_dir, tiny_tokenizer_dir, "completion", seed=4, **kw)
    assert a == b
    assert [r["query"] for r in a] != [r["query"] for r in c]


def test_completion_falls_back_to_shorter_targets(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    # no passage has 16 + 5000 tokens: the rule allows prefix + 32, references then hold what is left (<= target)
    stats, rows = run_task(tmp_path, micro_passages_dir, tiny_tokenizer_dir, "completion", n_examples=4,
                           prefix_tokens=P, target_tokens=5000)
    assert stats["min_tokens"] == P + FALLBACK_TARGET_TOKENS
    assert len(rows) == 4
    assert all(len(json.loads(r["meta"])["target_ids"]) >= 32 for r in rows)
    with pytest.raises(InputError, match="tokens the completion task needs"):
        run_task(tmp_path / "none", micro_passages_dir, tiny_tokenizer_dir, "completion", prefix_tokens=100_000)


def test_bio_picks_only_people(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    stats, rows = run_task(tmp_path, micro_passages_dir, tiny_tokenizer_dir, "bio", n_examples=100)
    assert stats["eligible"] == len(PEOPLE) == len(rows)
    assert {r["query"] for r in rows} == PEOPLE  # not "The Doors", "Laurel and Hardy" (groups) nor "Augustus"
    reader = PassageReader(micro_passages_dir)
    for r in rows:
        meta = json.loads(r["meta"])
        assert r["question"] == f"Tell me a bio of {r['query']}."
        assert (r["kind"], r["prefix"], r["exclude_doc_ids"], meta["topic"]) == ("qa", "", [], "People")
        assert r["references"] == [p["text"] for p in reader.get(meta["doc_ids"])]
    gates = next(r for r in rows if r["query"] == "Bill Gates")
    assert len(gates["references"]) == 2


def test_bio_is_seeded_subset(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    _, a = run_task(tmp_path / "a", micro_passages_dir, tiny_tokenizer_dir, "bio", n_examples=4, seed=1)
    _, b = run_task(tmp_path / "b", micro_passages_dir, tiny_tokenizer_dir, "bio", n_examples=4, seed=1)
    assert a == b and len(a) == 4 and {r["query"] for r in a} <= PEOPLE


def test_person_rule():
    assert is_person({"topic": "People", "description": "Tang dynasty Chinese poet (712–770)"})
    assert not is_person({"topic": "People", "description": "American rock band"})
    assert not is_person({"topic": "People", "description": "French brothers, filmmakers and inventors"})
    assert not is_person({"topic": "Uncategorized", "description": "Roman emperor from 27 BC to AD 14"})


def test_bio_needs_people(tmp_path, tiny_tokenizer_dir):
    from stages.corpus import convert as corpus

    src = tmp_path / "a.jsonl"
    src.write_text('{"id": "1", "title": "T", "text": "Some words."}\n')
    corpus.run(tmp_path, source=src)
    with pytest.raises(InputError, match="no people"):
        run_task(tmp_path / "o", tmp_path, tiny_tokenizer_dir, "bio")


def test_unknown_task(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        load_task.run(tmp_path, passages=micro_passages_dir, lm=tiny_tokenizer_dir, task="mmlu")
    # a paper task is known, but reads its benchmark file: without one, the error names the option to set
    with pytest.raises(ValueError, match=r"\[paper_tasks\] nq"):
        load_task.run(tmp_path, passages=micro_passages_dir, lm=tiny_tokenizer_dir, task="nq")


def test_real_lm_completion(tmp_path, micro_passages_dir, real_lm_dir):
    stats, rows = run_task(tmp_path, micro_passages_dir, real_lm_dir, "completion", n_examples=3)
    tok = load_tokenizer(real_lm_dir)
    assert stats["num_examples"] == 3
    for r in rows:
        meta = json.loads(r["meta"])
        assert len(meta["prefix_ids"]) == 32 and 32 <= len(meta["target_ids"]) <= 96
        assert tok.decode(meta["prefix_ids"]) == r["prefix"]


def test_paper_task_from_its_official_file(tmp_path):
    """LoadTask reads a paper benchmark through tasks.registry: seeded subsample, the examples schema, all aliases."""
    import pyarrow.parquet as pq

    from stages.evaluation import load_task

    fixture = FIXTURES / "tasks" / "nq_open.jsonl"
    stats = load_task.run(tmp_path, passages=tmp_path, lm=tmp_path, task="nq", data=fixture, n_examples=2, seed=0)
    rows = pq.read_table(tmp_path / "examples.parquet").to_pylist()
    assert stats["num_examples"] == len(rows) == 2
    assert [r["example_id"] for r in rows] == [0, 1]
    assert all(r["task"] == "nq" and r["kind"] == "qa" and r["query"] == r["question"] and r["references"]
               for r in rows)


def test_paper_task_bad_file_is_one_line_error(tmp_path):
    from stages.evaluation import load_task
    from stages.errors import InputError

    bad = tmp_path / "nq.jsonl"
    bad.write_text('{"question": "q1", "answer": ["a"]}\n{"question": "q2", "answer": \n')
    with pytest.raises(InputError, match=r"nq.jsonl:2: "):
        load_task.run(tmp_path, passages=tmp_path, lm=tmp_path, task="nq", data=bad, n_examples=2)
