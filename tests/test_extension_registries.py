"""A toy task and a toy retriever, each added the way docs/extending.md shows, are found by the DAG, the experiment
grid, LoadTask, PreRetrieve, Score and the report, with no other file touched.

This module is also the toy index stage (``BuildToyIndex.stage_module``): ``VERSION`` and ``run`` below.
"""

from __future__ import annotations

import json
from pathlib import Path

import luigi
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from luigi.task_register import Register

from pipeline import dag
from pipeline.engine.task import NestTask
from stages.evaluation import load_task, report, score
from stages.evaluation.generate import SCHEMA as GENERATIONS
from stages.retrieval import fusion, pre_retrieve, searchers
from tasks import registry
from tasks.base import Column, Example, QATask, qa_example

VERSION = "1"  # the toy index stage's declared version


# ---- the toy task: one class (in a real project, its own file under tasks/ with @register("toy_qa")) ------------------

class ToyQA(QATask):
    """Questions and answers, one ``question<TAB>answer`` a line; scored by exact match."""

    name = "toy_qa"
    metrics = ("exact",)
    quality_metric = "exact"
    headline_metrics = ("exact",)
    report_columns = (Column("exact", "Exact match"), Column("num_tokens", "Avg.Len"))
    data_help = "toy.tsv (question<TAB>answer)"

    def read(self, path, stats):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            question, answer = line.split("\t")
            yield qa_example(self.name, question, [answer])

    def score_text(self, text, example):
        return {"exact": 100.0 * (text.strip() == example.references[0])}


# ---- the toy retriever: its stage (run, here), its searcher and its DAG stage -----------------------------------------

def run(out_dir: Path, *, passages: Path, seed: int = 0) -> dict:
    """The toy index: a fixed score per doc_id (``toy.json``)."""
    scores = {str(d): float((d * 7 + seed) % 11) for d in range(12)}
    (Path(out_dir) / "toy.json").write_text(json.dumps(scores))
    return {"docs": len(scores)}


class ToySearcher:
    """Scores every document by its fixed score plus the query's length; best first, ties by doc_id."""

    def __init__(self, scores: dict[int, float]):
        self.scores = scores

    @classmethod
    def from_artifact(cls, path: Path) -> "ToySearcher":
        return cls({int(k): v for k, v in json.loads((Path(path) / "toy.json").read_text()).items()})

    @property
    def size(self) -> int:
        return len(self.scores)

    def search(self, queries, k):
        return [sorted(((d, s + len(q) % 5) for d, s in self.scores.items()), key=lambda h: (-h[1], h[0]))[:k]
                for q in queries]


class BuildToyIndex(dag.RetrieverIndex, NestTask):
    """The toy retriever's artifact."""

    retriever = "toy"
    stage_module = __name__
    seed = luigi.IntParameter(default=0)

    def requires(self):
        return {"passages": dag.ConvertCorpus()}

    def stage_params(self):
        return {"seed": self.seed}


@pytest.fixture
def toys(tmp_path):
    registry.register("toy_qa", ToyQA)
    searchers.register("toy", ToySearcher)
    searchers.register("toy_b", ToySearcher)  # a second one, to fuse two toys on the stage side
    data = tmp_path / "toy.tsv"
    data.write_text("What is two plus two?\tfour\nCapital of France?\tParis\nColour of the sky?\tblue\n")
    conf = luigi.configuration.get_config()
    Register.clear_instance_cache()
    yield data
    registry.unregister("toy_qa")
    searchers.unregister("toy")
    searchers.unregister("toy_b")
    for section, option in (("paper_tasks", "toy_qa"), ("PreRetrieve", "retrievers"), ("PreRetrieve", "weights")):
        if conf.has_option(section, option):
            conf.remove_option(section, option)
    Register.clear_instance_cache()


def test_the_dag_and_the_grid_find_the_toy_task_and_retriever(toys):
    assert "toy_qa" in dag.known_tasks() and "toy_qa" in dag.paper_task_names()
    assert "toy_qa" not in dag.configured_tasks()  # a file task joins the run when its file is set
    conf = luigi.configuration.get_config()
    conf.set("paper_tasks", "toy_qa", str(toys))
    assert "toy_qa" in dag.configured_tasks()
    runs = [(r.task, r.method, r.variant) for r in dag.experiment_runs()]
    assert [m for t, m, v in runs if t == "toy_qa"] == dag.run_methods()
    assert "toy_qa/nest/main" in dag.Report().requires()
    # not topical, no PPL: Score needs the examples and the generations, and for a method that copies the passages
    # (the copied passages' articles: chimera sentences)
    assert set(dag.Score(task="toy_qa", method="nest").requires()) == {"examples", "generations", "passages"}
    assert set(dag.Score(task="toy_qa", method="base").requires()) == {"examples", "generations"}
    assert dag.LoadTask(task="toy_qa").stage_params()["data"].value == toys

    # the toy retriever: alone, and fused with BM25; its index stage is an input named after it
    alone = dag.PreRetrieve(task="toy_qa", mode="toy")
    assert set(alone.requires()) == {"examples", "toy"} and isinstance(alone.requires()["toy"], BuildToyIndex)
    assert "encoder" not in alone.stage_params()
    mixed = dag.PreRetrieve(task="toy_qa", retrievers=["bm25", "toy"], weights={"bm25": 0.5, "toy": 0.5})
    assert set(mixed.requires()) == {"examples", "bm25", "toy"}
    assert mixed.stage_params()["retrievers"] == ["bm25", "toy"]
    assert "retrievers" not in dag.PreRetrieve(task="toy_qa").stage_params()  # the paper's pair: short keys
    conf.set("PreRetrieve", "retrievers", '["bm25", "toy"]')
    Register.clear_instance_cache()
    assert dag.Report().stage_params()["context"]["retrieval"] == "hybrid fusion of bm25, toy"


def test_the_stages_and_the_report_run_the_toy_task_and_retriever(toys, tmp_path):
    # LoadTask: a file task, found in the registry
    (tmp_path / "ex").mkdir()
    stats = load_task.run(tmp_path / "ex", passages=tmp_path, lm=tmp_path, task="toy_qa", data=toys, n_examples=3)
    assert stats["num_examples"] == 3

    # PreRetrieve: two toy retrievers fused; one score column each, named after it
    arts = {}
    for name, seed in (("toy", 0), ("toy_b", 5)):
        arts[name] = tmp_path / name
        arts[name].mkdir()
        run(arts[name], passages=tmp_path, seed=seed)
    (tmp_path / "ret").mkdir()
    pre_retrieve.run(tmp_path / "ret", examples=tmp_path / "ex", mode="hybrid", retrievers=["toy", "toy_b"], b=5,
                     conf_rank=3, **arts)
    table = pq.read_table(tmp_path / "ret" / "retrievals.parquet")
    assert table.column_names == ["example_id", "rank", "doc_id", "fused", "toy", "toy_b", "search_s"]
    query = pq.read_table(tmp_path / "ex" / "examples.parquet").to_pylist()[0]["query"]
    lists = [ToySearcher.from_artifact(arts[n]).search([query], 12)[0] for n in ("toy", "toy_b")]
    want = fusion.fuse(lists[0], lists[1], 5, conf_rank=3)  # the paper's two-list formula, priors 0.7 / 0.3
    got = [r for r in table.to_pylist() if r["example_id"] == 0]
    assert [(r["doc_id"], r["fused"], r["toy"], r["toy_b"]) for r in got] == want

    # Score: the task's own metric; the report: its own Table 1 columns, and the retrieval in the context
    examples = pq.read_table(tmp_path / "ex" / "examples.parquet").to_pylist()
    gens = [{"example_id": e["example_id"], "task": "toy_qa", "method": m, "text": text, "token_ids": [1, 2],
             "source_doc_ids": [-1, -1], "source_positions": [-1, -1], "spans": [], "num_tokens": 2, "wall_s": 1.0,
             "counters": "{}", "timings": "{}", "config": "{}"}
            for e, text, m in zip(examples, (e["references"][0] for e in examples), ["base"] * 3)]
    (tmp_path / "g").mkdir()
    pq.write_table(pa.Table.from_pylist(gens, schema=GENERATIONS), tmp_path / "g" / "generations.parquet")
    (tmp_path / "s").mkdir()
    score.run(tmp_path / "s", examples=tmp_path / "ex", generations=tmp_path / "g", task="toy_qa", method="base")
    summary = {r["metric"]: r["value"] for r in pq.read_table(tmp_path / "s" / "summary.parquet").to_pylist()}
    assert summary["exact"] == 100.0 and "alr" not in summary
    (tmp_path / "r").mkdir()
    report.run(tmp_path / "r", summaries=[tmp_path / "s"], context={"retrieval": "hybrid fusion of toy, toy_b"})
    text = (tmp_path / "r" / "report.md").read_text()
    assert "**toy_qa** (3 examples)" in text and "| method | Exact match | Avg.Len |" in text
    assert "| Base LM | 100.0 | 2.0 |" in text
    assert "- retrieval: `hybrid fusion of toy, toy_b`" in text


def test_a_toy_task_is_scored_by_its_declaration_not_its_name(toys):
    ex = Example(example_id=0, task="toy_qa", kind="qa", query="q", question="q", references=["four"])
    assert score.example_metrics("toy_qa", "four", ex.to_row()) == {"exact": 100.0}
    assert report.task_spec("toy_qa").report_columns[0].label == "Exact match"
    assert report.quality_column("toy_qa") == Column("exact", "Exact match")


def test_a_retriever_module_declares_itself(tmp_path):
    """RETRIEVER/SEARCHER literals in a module of the retrieval package register it, read from the source only."""
    from stages.retrieval import searchers

    (tmp_path / "lexical.py").write_text('import not_installed_anywhere\nRETRIEVER = "lexical"\nSEARCHER = "LexSearcher"\n'
                                         'SEARCHER_OPTIONS = ("encoder",)\n')
    (tmp_path / "helper.py").write_text('SEARCHER = "NotARetriever"\n')  # no RETRIEVER: not one
    assert searchers.declared(tmp_path) == [("lexical", "stages.retrieval.lexical:LexSearcher", ("encoder",))]
    assert set(searchers.names()) >= {"bm25", "dense"}
