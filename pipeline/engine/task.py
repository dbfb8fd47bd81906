"""The Luigi base task of every stage: its key, its output (an artifact of the store), and how it runs the stage.

A subclass names the stage module and function, its inputs (``requires()`` → ``{input_name: task}``) and its parameters
(``stage_params()`` → the dict that enters the key *and* the call; a value whose key form must differ from the value given
to the stage, such as a file path, is an :class:`~pipeline.storage.keys.Identified`). Nothing here imports a stage module until
the stage runs: building the DAG and checking it is complete stays fast (no torch import).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import signal
import sys
import time
from typing import Any, Mapping

import luigi
from luigi.task import task_id_str

from pipeline.engine import config as _config  # registers the project's luigi.cfg
from pipeline.engine.config import distributed
from pipeline.engine.params import ConfigError, check_task, plain
from pipeline.engine.runlog import RUN_LOG
from pipeline.engine.scheduling import apply_thread_budget, die_with_parent, stage_resources, task_resources
from pipeline.engine.stage_code import read_version
from pipeline.sharing.through import pull_inputs, push_built, read_through, share_local
from pipeline.storage.keys import Identified, content_key, key_form
from pipeline.storage.store import Store


class ArtifactTarget(luigi.Target):
    """The artifact ``(stage, key)``: it exists when its manifest does (and, with ``verify``, its files match it)."""

    def __init__(self, store: Store, stage: str, key: str, verify: bool = False):
        self.store, self.stage, self.key, self.verify = store, stage, key, verify

    @property
    def path(self):
        return self.store.path(self.stage, self.key)

    def exists(self) -> bool:
        if not self.store.complete(self.stage, self.key):
            return False
        return not self.verify or not self.store.verify(self.stage, self.key)

    def __str__(self) -> str:
        return f"{self.stage}/{self.key[:12]}"


class KeyedTaskId:
    """Mixin of a Luigi task whose task id carries its artifact key.

    Luigi's id is made of the task's own significant parameters only, so ``BuildBM25Index(k1, b)`` would have one id for
    every corpus: on one ``luigid`` a stage DONE under one configuration (within ``stable_done_cooldown_secs``) or
    disabled after failing under it (``disable_persist``) would stop every other configuration's. Here the id is
    Luigi's own form (``Family_<first params>_<hash>``) over the significant parameters *plus* the key, which covers
    everything that enters it (the configuration, the stage version, the keys of the inputs). The key itself is
    unchanged, and it is computed lazily: on the first use of ``task_id`` after construction (``__hash__`` stays
    Luigi's, from the parameters alone: equal ids imply equal parameters, so equal hashes).

    The parameters sent to ``luigid`` are Luigi's usual ones: a worker that rebuilds the task from them (an assistant)
    computes the same id under the same configuration."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_nest_in_init"] = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            self.__dict__.pop("_nest_in_init", None)

    def keyed_id_part(self) -> str:
        raise NotImplementedError

    @property
    def task_id(self) -> str:  # type: ignore[override]  (Luigi's instance attribute, computed here)
        d = self.__dict__
        if d.get("_nest_in_init"):
            return d["_luigi_task_id"]
        tid = d.get("_nest_task_id")
        if tid is None:
            params = {**self.to_str_params(only_significant=True, only_public=True), "nest_key": self.keyed_id_part()}
            tid = d["_nest_task_id"] = task_id_str(self.get_task_family(), params)
        return tid

    @task_id.setter
    def task_id(self, value: str) -> None:
        self.__dict__["_luigi_task_id"] = value
        self.__dict__.pop("_nest_task_id", None)

    def __hash__(self) -> int:
        return hash(self.__dict__["_luigi_task_id"])

    def __eq__(self, other) -> bool:
        return self.__class__ == other.__class__ and self.task_id == other.task_id


class KeyedWrapperTask(KeyedTaskId, luigi.WrapperTask):
    """A wrapper task (``All``) whose id follows the ids of what it requires: two configurations' ``All`` differ."""

    def keyed_id_part(self) -> str:
        ids = sorted(t.task_id for t in luigi.task.flatten(self.requires()))
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class NestTask(KeyedTaskId, luigi.Task):
    """Base of the stage tasks. Class attributes:

    - ``stage_module`` / ``stage_fn``: the stage function, ``run(out_dir, *, <inputs>, <params>) -> stats``;
    - ``version_attr``: the module constant holding the declared stage version (``VERSION``);
    - ``key_exclude``: parameters handed to the stage but left out of the key (resources: threads, batch size);
    - ``input_args``: ``{input_name: kwarg}`` when the stage names an input differently;
    - ``label_params``: luigi parameters shown in labels (``LoadTask(task=bio)``); those also in ``label_if_set`` only
      when one of them differs from its default (a shard's ``start``/``end``).

    **Identity inputs and build dependencies.** ``requires()`` names the *identity inputs*: their keys enter this
    task's key and its manifest's ``inputs``, and the stage reads them. ``build_requires()`` names *build
    dependencies*: tasks Luigi must finish before this one runs but which are no part of its identity. A sharded stage
    (``pipeline/engine/sharding.py``) uses them: its shards are build dependencies, and ``build()`` then calls the stage
    module's ``merge_fn`` on the shard artifacts (plus the identity inputs listed in ``merge_inputs``) instead of
    ``stage_fn``. The key, and the files the merge writes, are those of the unsharded stage, so how many shards built
    it changes nothing downstream. Luigi sees both kinds (``deps()``, through its ``_requires`` hook for non-input
    dependencies); keys, manifests and ``nest status``'s reasons see only the identity inputs.
    """

    stage_module: str = ""
    stage_fn: str = "run"
    version_attr: str = "VERSION"
    key_exclude: tuple[str, ...] = ()
    input_args: Mapping[str, str] = {}
    label_params: tuple[str, ...] = ()
    label_if_set: tuple[str, ...] = ()
    merge_fn: str = "merge"
    merge_inputs: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_task(self)  # a value outside what the parameter accepts: one line, before anything builds

    # ---- what subclasses declare ------------------------------------------------------------------------------------
    def requires(self) -> dict[str, "NestTask"]:
        return {}

    def stage_params(self) -> dict[str, Any]:
        return {}

    def build_requires(self) -> dict[str, "NestTask"]:
        """Build dependencies that are not identity inputs (a sharded stage's shards, in order); empty by default."""
        return {}

    def _requires(self):  # Luigi's hook for dependencies that are not inputs: what Luigi waits for
        return luigi.task.flatten(self.requires()) + luigi.task.flatten(self.build_requires())

    def run_inputs(self) -> dict[str, "NestTask"]:
        """The artifacts ``run()`` reads: the identity inputs, or, when merging shards, the shards and the identity
        inputs named in ``merge_inputs`` (distributed mode pulls exactly these)."""
        shards = self.build_requires()
        if not shards:
            return self.inputs()
        inputs = self.inputs()
        return {**shards, **{name: inputs[name] for name in self.merge_inputs if name in inputs}}

    # ---- identity ----------------------------------------------------------------------------------------------------
    @classmethod
    def stage_name(cls) -> str:
        return cls.__name__

    @property
    def stage(self) -> str:
        return self.stage_name()

    def stage_version(self) -> str:
        return read_version(self.stage_module, self.version_attr)

    def inputs(self) -> dict[str, "NestTask"]:
        req = self.requires() or {}
        if not isinstance(req, Mapping):
            raise TypeError(f"{self.stage}.requires() must return a dict {{input_name: task}}")
        return dict(req)

    def _params_memo(self) -> dict[str, Any]:
        memo = self.__dict__.get("_nest_params")
        if memo is None:
            memo = self.__dict__["_nest_params"] = dict(self.stage_params())
        return memo

    @property
    def key_params(self) -> dict[str, Any]:
        """The parameters as they enter the key (identities, not paths)."""
        return key_form({k: v for k, v in self._params_memo().items() if k not in self.key_exclude})

    def key_ingredients(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_version": self.stage_version(), "params": self.key_params,
                "inputs": {name: t.key for name, t in self.inputs().items()}}

    @property
    def key(self) -> str:
        k = self.__dict__.get("_nest_key")
        if k is None:
            ing = self.key_ingredients()
            k = self.__dict__["_nest_key"] = content_key(ing["stage"], ing["stage_version"], ing["params"], ing["inputs"])
        return k

    def keyed_id_part(self) -> str:  # Luigi's task id carries the key (KeyedTaskId)
        return self.key

    @property
    def label(self) -> str:
        optional = any(getattr(self, p) != self.get_param_default(p) for p in self.label_if_set)
        shown = ", ".join(f"{p}={getattr(self, p)}" for p in self.label_params if optional or p not in self.label_if_set)
        return f"{self.stage}({shown})" if shown else self.stage

    # ---- luigi -------------------------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        return _config.get_store()

    def output(self) -> ArtifactTarget:
        return ArtifactTarget(self.store, self.stage, self.key, verify=_config.verify_on_complete())

    @property
    def artifact_dir(self):
        return self.store.path(self.stage, self.key)

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]  (Luigi's class attribute, computed here)
        return task_resources(self)  # gpu, lucene, [stage_resources], threads

    def complete(self) -> bool:
        RUN_LOG.touch(self)
        if super().complete():
            if distributed():  # other workers must be able to pull it
                return share_local(self)
            return True
        bad = self.store.set_aside_if_bad(self.stage, self.key, verify=_config.verify_on_complete())
        if bad is not None:  # so that the pull below (or the build) replaces it: a pull never overwrites a local artifact
            aside, problems = bad
            print(f"[nest] {self.label} {self.key[:12]}: corrupt ({problems[0]}; {len(problems)} problem(s)); moved "
                  f"aside to {aside.name}, pulling or rebuilding it", file=sys.stderr, flush=True)
        pulled = read_through(self)  # a missing stage is pulled when the remote has it (distributed: counted)
        if isinstance(pulled, bool):
            return pulled
        RUN_LOG.note("pulled", (self.stage, self.key), pulled)  # the seconds of the pull
        return True

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the stage call: input artifact folders, then parameters (``Identified`` → value)."""
        kwargs: dict[str, Any] = {}
        for name, task in self.inputs().items():
            kwargs[self.input_args.get(name, name)] = task.artifact_dir
        for name, value in self._params_memo().items():
            kwargs[name] = value.value if isinstance(value, Identified) else value
        return kwargs

    @classmethod
    def get_param_default(cls, name: str):
        return dict(cls.get_params())[name]._default

    def build(self, out_dir) -> Mapping | None:
        """Import the stage module (only now) and run it into ``out_dir``; with build dependencies (a sharded stage),
        merge them: ``merge_fn(out_dir, shards=[folders of the "shard-*" ones, in order], <other build dependencies
        by name>, <merge_inputs>, <parameters>)``."""
        module = importlib.import_module(self.stage_module)
        deps = self.build_requires()
        if deps:
            kwargs = self.call_kwargs()
            for name in self.inputs():
                if name not in self.merge_inputs:
                    kwargs.pop(self.input_args.get(name, name), None)
            kwargs.update({name: t.artifact_dir for name, t in deps.items() if not name.startswith("shard-")})
            shards = [t.artifact_dir for name, t in deps.items() if name.startswith("shard-")]
            return getattr(module, self.merge_fn)(out_dir, shards=shards, **kwargs)
        fn = getattr(module, self.stage_fn)
        return fn(out_dir, **self.call_kwargs())

    def run(self) -> None:
        ref = (self.stage, self.key)
        die_with_parent()  # a killed worker leaves no orphan building this stage
        apply_thread_budget()  # N worker processes: threads // N each
        if distributed():
            try:  # built by other workers: pulled now, just before they are read
                pull_inputs(self, RUN_LOG.note)
            except BaseException as e:
                RUN_LOG.note("failed", ref, e)
                raise
        print(f"[nest] {self.label} {self.key[:12]}: building", file=sys.stderr, flush=True)
        RUN_LOG.note("started", ref, self.label)  # a stop, or this worker's death, names what was being built
        t0 = time.perf_counter()
        def corrupt(aside, problems):
            print(f"[nest] {self.label} {self.key[:12]}: corrupt ({problems[0]}; {len(problems)} problem(s)); moved "
                  f"aside to {aside.name}, rebuilding", file=sys.stderr, flush=True)

        try:
            # verify: a corrupt artifact is moved aside and rebuilt (a remote store's read-through would pull it again
            # here: it wraps self.build)
            self.store.publish(self.stage, self.key, self.build, version=self.stage_version(), params=self.key_params,
                               inputs={name: (t.stage, t.key) for name, t in self.inputs().items()},
                               verify=_config.verify_on_complete(), on_corrupt=corrupt)
        except BaseException as e:
            RUN_LOG.note("failed", ref, e)
            raise
        seconds = time.perf_counter() - t0
        print(f"[nest] {self.label} {self.key[:12]}: built in {seconds:.1f} s", file=sys.stderr, flush=True)
        try:  # remote_mode = push|both: share what was built
            push_built(self, strict=distributed())  # distributed: pushed before the scheduler hears it is done
        except BaseException as e:
            RUN_LOG.note("failed", ref, e)
            raise
        RUN_LOG.note("built", ref, seconds)


class WorkerDied(Exception):
    """A Luigi worker process that died while it built a stage (``kill -9``, the OOM killer): Luigi only logs it."""


@NestTask.event_handler(luigi.Event.PROCESS_FAILURE)
def _worker_died(task: NestTask, error_msg: str) -> None:
    """In the process that runs Luigi: a forked worker died without reporting; say which stage it was building."""
    code = error_msg.rsplit(" ", 1)[-1]
    try:
        how = f"killed by {signal.Signals(-int(code)).name}" if code.startswith("-") else f"exit code {code}"
    except ValueError:
        how = f"exit code {code}"
    RUN_LOG.note("failed", (task.stage, task.key), WorkerDied(
        f"its worker process died ({how}) while building {task.label}; what was built is kept: run the same command "
        f"again to build it"))


def subclasses(cls: type):
    """Every subclass of ``cls``, depth first (the stage classes under ``NestTask``, the index stages of the
    retrievers)."""
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def check_needs() -> None:
    """``[stage_resources] needs`` before anything builds: a JSON object ``{Stage: {resource: amount}}``
    naming registered stages (the closest name for a typo), each amount an integer >= 0. Raises ConfigError."""
    needs = plain(stage_resources().needs)
    stages = sorted({c.stage_name() for c in subclasses(NestTask) if c.stage_module})
    if not isinstance(needs, dict):
        raise ConfigError(f"stage_resources.needs = {json.dumps(needs, default=str)}: expected "
                          "{Stage: {resource: amount}}")
    for stage, wants in needs.items():
        if stage not in stages:
            close = difflib.get_close_matches(str(stage), stages, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (stages: {', '.join(stages)})"
            raise ConfigError(f"stage_resources.needs: unknown stage {stage!r}{hint}")
        if not isinstance(wants, dict):
            raise ConfigError(f"stage_resources.needs[{stage!r}] = {json.dumps(wants, default=str)}: expected "
                              "{resource: amount}")
        for resource, amount in wants.items():
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                raise ConfigError(f"stage_resources.needs[{stage!r}][{resource!r}] = {json.dumps(amount)}: expected "
                                  f"an integer >= 0")
