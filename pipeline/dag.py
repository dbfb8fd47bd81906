"""The stage DAG as Luigi tasks (docs/architecture.md, "Stages"): the module Luigi names.

    luigi --module pipeline.dag BuildBM25Index --k1 1.2 --local-scheduler
    nest run PreRetrieve --task bio

The stages are wired in ``pipeline/wiring/``, one module per concern, each on the one before it:

- ``sections.py``: the configuration sections (``[nest]``, ``[encoder]``, ``[decoding]``, ``[factscore]``,
  ``[paper_tasks]``) and what the stages read from them;
- ``corpus_lm.py``: PrepareLM, ConvertCorpus, PreTokenize, LoadTask;
- ``retrieval.py``: the retrievers' index stages (BM25, the dense family) and PreRetrieve;
- ``evaluation.py``: EncodePassageKeys, Generate, Perplexity, Score, Report.

This module re-exports them and adds the target of ``nest all``. Every option that ``luigi.cfg`` sets takes its
default from there and only there (the embedded profile): the classes give no default of their own for it, so the two
cannot drift (``tests/pipeline/test_config_defaults.py``). Options the file does not list (rarely changed ones, and one per
registered paper task) keep a default in their class. A new stage: docs/extending.md, "A stage".
"""

from __future__ import annotations

import luigi

from pipeline.engine.task import KeyedWrapperTask, NestTask
from pipeline.wiring.corpus_lm import ConvertCorpus, LoadTask, PrepareLM, PreTokenize
from pipeline.wiring.evaluation import (EXAMPLES, GENERATIONS, EncodePassageKeys, Generate, Perplexity, Report, Score,
                                        applied_stop_rules, experiment_runs, passage_keys_task)
from pipeline.wiring.retrieval import (PAPER_RETRIEVERS, AddDenseShard, BuildBM25Index, BuildDenseIndex,
                                       EncodePassages, ImportDenseIndex, PreRetrieve, RetrieverIndex, TrainDenseIndex,
                                       dense_index_task, retrieval_description, retriever_indexes)
from pipeline.wiring.sections import (EMBEDDED, PAPER_TASKS, check_decoding, config_value, configured_tasks, decoding,
                                      encoder, encoder_param, factscore, known_tasks, method_info, nest,
                                      paper_task_names, paper_task_paths, paper_tasks, run_methods, stop_rule,
                                      task_spec)

__all__ = [
    "EMBEDDED", "PAPER_TASKS", "PAPER_RETRIEVERS", "EXAMPLES", "GENERATIONS",
    # configuration sections
    "nest", "encoder", "decoding", "factscore", "paper_tasks",
    # stages
    "PrepareLM", "ConvertCorpus", "PreTokenize", "LoadTask", "RetrieverIndex", "BuildBM25Index", "EncodePassages",
    "BuildDenseIndex", "TrainDenseIndex", "AddDenseShard", "ImportDenseIndex", "PreRetrieve", "EncodePassageKeys",
    "Generate", "Perplexity", "Score", "Report", "All",
    # what the CLI and the benches read
    "applied_stop_rules", "check_decoding", "config_value", "configured_tasks", "dense_index_task", "demo_tasks",
    "encoder_param",
    "experiment_runs", "known_tasks", "method_info", "paper_task_names", "paper_task_paths", "passage_keys_task",
    "retrieval_description", "retriever_indexes", "run_methods", "stop_rule", "task_spec",
]


class All(KeyedWrapperTask):
    """The whole DAG of the configured profile (``nest all``): each configured task's pre-retrieval and the token
    shards (what decoding needs, built even where no method of the grid reads them), then the report over the grid's
    generations and scores."""

    def requires(self):
        return [*(PreRetrieve(task=t) for t in configured_tasks()), PreTokenize(), Report()]


def demo_tasks(prebuilt_index: str = "") -> dict[str, NestTask]:
    """What ``nest generate`` needs: the LM, passages, their tokens and both indexes."""
    return {"lm": PrepareLM(), "passages": ConvertCorpus(), "tokens": PreTokenize(), "bm25": BuildBM25Index(),
            "dense": dense_index_task(prebuilt_index)}
