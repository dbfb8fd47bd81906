"""Example rows, the seeded subset, the registry, and the bio prompt."""

from __future__ import annotations

import pytest

from tasks import registry
from tasks.base import EXAMPLE_COLUMNS, Example, QATask, examples_schema, examples_to_table, seeded_subset
from tasks.prompts import bio_question, user_message


def test_example_row_round_trip_matches_the_parquet_schema(tmp_path):
    import pyarrow.parquet as pq

    ex = Example(3, "nq", "qa", "who", "who?", references=["a", "b"], exclude_doc_ids=[7],
                 meta={"line": 4, "title": "Café"})
    row = ex.to_row()
    assert tuple(row) == EXAMPLE_COLUMNS
    assert row["meta"] == '{"line": 4, "title": "Café"}'
    pq.write_table(examples_to_table([ex]), tmp_path / "examples.parquet")
    back = pq.read_table(tmp_path / "examples.parquet")
    assert back.schema.equals(examples_schema())
    assert Example.from_row(back.to_pylist()[0]) == ex


def test_example_rejects_unknown_kind():
    with pytest.raises(ValueError):
        Example(0, "x", "chat", "q")


def test_seeded_subset():
    a = seeded_subset(100, 10, seed=0)
    assert a == sorted(a) and len(set(a)) == 10
    assert seeded_subset(100, 10, seed=0) == a and seeded_subset(100, 10, seed=1) != a
    assert set(seeded_subset(100, 5, seed=0)) <= set(a)  # nested: a smaller limit is part of a larger one
    assert seeded_subset(5, 10, seed=0) == [0, 1, 2, 3, 4]


def test_registry():
    # at least the built-ins (a task file added later is one more name: docs/extending.md)
    assert {"factscore", "hotpotqa", "medmcqa", "nq", "triviaqa", "truthfulqa", "wikitext"} <= set(registry.names("file"))
    assert {"bio", "completion", "completion_excluded"} <= set(registry.names("corpus"))  # the embedded tasks
    assert registry.names() == tuple(sorted(registry.names("file") + registry.names("corpus")))
    assert registry.get("nq").max_new_tokens == 128
    assert registry.get("nq", max_new_tokens=256).max_new_tokens == 256  # the released code's QA length (B12)
    assert registry.get("wikitext").max_new_tokens == 256 and registry.get("factscore").max_new_tokens == 512
    assert registry.get("hotpotqa").sample_size == 2500 and registry.get("hotpotqa", sample_size=None).sample_size is None
    assert registry.get("truthfulqa").metrics[:2] == ("bleu_diff", "rouge1_diff")
    with pytest.raises(KeyError, match=r"known: (\w+, )*factscore"):
        registry.get("mmlu")


def test_register_a_new_task():
    class Toy(QATask):
        name = "toy"

        def read(self, path, stats):
            yield Example(-1, "toy", "qa", "q", "q", references=["a"])

    registry.register("toy_test", Toy)
    try:
        ex = registry.get("toy_test").load("unused")
        assert ex[0].task == "toy_test" and ex[0].example_id == 0
        with pytest.raises(ValueError):
            registry.register("toy_test", Toy)
    finally:
        registry._FACTORIES.pop("toy_test")


def test_bio_question_and_template():
    q = bio_question("Ada  Lovelace")
    assert q == "Tell me a bio of Ada Lovelace."
    assert user_message("qa", q) == "Question: Tell me a bio of Ada Lovelace. Answer:"
