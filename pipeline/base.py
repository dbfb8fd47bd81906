"""The Luigi base task of every stage: its key, its output (an artifact of the store), and how it runs the stage.

A subclass names the stage module and function, its inputs (``requires()`` → ``{input_name: task}``) and its parameters
(``stage_params()`` → the dict that enters the key *and* the call; a value whose key form must differ from the value given
to the stage, such as a file path, is an :class:`~pipeline.store.Identified`). Nothing here imports a stage module until
the stage runs: building the DAG and checking it is complete stays fast (no torch import).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import sys
import time
from typing import Any, Iterable, Mapping

import luigi

from pipeline import config as _config  # registers the project's luigi.cfg
from pipeline import scheduling as _scheduling  # noqa: F401  (registers [stage_resources] before config checks)
from pipeline.runs import new_run_id, write_run
from pipeline.stage_code import read_version
from pipeline.store import Identified, Store, content_key, key_form, utc_now


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
            from luigi.task import task_id_str

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
        import hashlib

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
    (``pipeline/sharding.py``) uses them: its shards are build dependencies, and ``build()`` then calls the stage
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
        from pipeline.params import check_task

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
        from pipeline.scheduling import task_resources  # gpu, lucene, [stage_resources], threads

        return task_resources(self)

    def complete(self) -> bool:
        RUN_LOG.touch(self)
        from pipeline.scheduling import distributed

        if super().complete():
            if distributed():  # other workers must be able to pull it
                from pipeline.remote import share_local

                return share_local(self)
            return True
        bad = self.store.set_aside_if_bad(self.stage, self.key, verify=_config.verify_on_complete())
        if bad is not None:  # so that the pull below (or the build) replaces it: a pull never overwrites a local artifact
            aside, problems = bad
            print(f"[nest] {self.label} {self.key[:12]}: corrupt ({problems[0]}; {len(problems)} problem(s)); moved "
                  f"aside to {aside.name}, pulling or rebuilding it", file=sys.stderr, flush=True)
        from pipeline.remote import read_through  # a missing stage is pulled when the remote has it (distributed: counted)

        return read_through(self)

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
        from pipeline.scheduling import apply_thread_budget, die_with_parent, distributed

        ref = (self.stage, self.key)
        die_with_parent()  # a killed worker leaves no orphan building this stage
        apply_thread_budget()  # N worker processes: threads // N each
        if distributed():
            from pipeline.remote import pull_inputs  # built by other workers: pulled now, just before they are read

            try:
                pull_inputs(self)
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
        from pipeline.remote import push_built  # remote_mode = push|both: share what was built

        try:
            push_built(self, strict=distributed())  # distributed: pushed before the scheduler hears it is done
        except BaseException as e:
            RUN_LOG.note("failed", ref, e)
            raise
        RUN_LOG.note("built", ref, seconds)


def _walk(roots: Iterable[luigi.Task]) -> list[tuple[luigi.Task, list[luigi.Task]]]:
    """(task, its requirements) for every task reachable from ``roots``, dependencies first, each once."""
    out: list[tuple[luigi.Task, list[luigi.Task]]] = []
    seen: set[str] = set()

    def visit(task: luigi.Task) -> None:
        if task.task_id in seen:
            return
        seen.add(task.task_id)
        deps = list(task.deps())  # identity inputs and build dependencies (a sharded stage's shards)
        for dep in deps:
            visit(dep)
        out.append((task, deps))

    for r in roots:
        visit(r)
    return out


def closure(roots: Iterable[luigi.Task]) -> list[NestTask]:
    """Every NestTask reachable from ``roots`` (wrapper tasks are walked through), dependencies first, each once."""
    return [t for t, _deps in _walk(roots) if isinstance(t, NestTask)]


def _mark_skipped(tasks: list[NestTask], reached: list[dict], target_keys: set[str]) -> None:
    """A missing stage that only feeds stages which are cached, pulled or on the remote was never needed: ``skipped``, not a failure
    (Luigi does not look below a complete task)."""
    status = {t.task_id: r for t, r in zip(tasks, reached)}
    needed = {t.task_id for t in tasks if t.key in target_keys}
    for t in reversed(tasks):  # dependents before their inputs
        if t.task_id in needed and status[t.task_id]["status"] not in ("cached", "pulled", "remote"):
            needed.update(d.task_id for d in t.deps())
    for t in tasks:
        if t.task_id not in needed and status[t.task_id]["status"] == "missing":
            status[t.task_id]["status"] = "skipped"


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


class ChildFailure(Exception):
    """A stage that failed in one of Luigi's worker processes, as the journal tells it to the process that records
    the run (the exception itself stayed in that process)."""

    def __init__(self, type_name: str, message: str, input_error: bool):
        super().__init__(message)
        self.type_name, self.input_error = type_name, input_error


def _is_input_error(exc: BaseException) -> bool:
    try:
        from pipeline.cli import _input_error_types

        return isinstance(exc, _input_error_types())
    except Exception:
        return False


class RunLog:
    """What this process's Luigi runs reached: written as a run record by the CLI, or at exit for plain ``luigi``.

    The DAG under each task Luigi checks is walked (and its keys computed) at once, while Luigi's command-line parameters
    are still in effect: at exit, re-instantiating the tasks would use the configuration's defaults instead.

    With several worker processes (``nest all --workers N``) stages run in Luigi's forked processes: each outcome is
    also appended to a journal file (``$NEST_RUN_JOURNAL``, one JSON line per event), which the recording process reads.
    """

    def __init__(self):
        self.reset()
        self._atexit = False

    def reset(self) -> None:
        self.tasks: dict[str, NestTask] = {}       # task_id -> task, dependencies first
        self.required: set[str] = set()           # task_ids some reached task requires
        self.built: dict[tuple[str, str], float] = {}
        self.failed: dict[tuple[str, str], BaseException] = {}
        self.pulled: dict[tuple[str, str], float] = {}  # read-through: pulled from the remote, not built
        self.started: dict[tuple[str, str], str] = {}  # stages whose build began (label), here or in a worker
        self.started_at = utc_now()
        self.store: Store | None = None
        self.close_journal()

    # ---- the journal: outcomes of stages run in other processes ---------------------------------------------------
    def open_journal(self) -> None:
        """Start a journal that this process's forked Luigi workers append to (inherited through the environment)."""
        import tempfile

        self.close_journal()
        fd, path = tempfile.mkstemp(prefix="nest-run-", suffix=".jsonl")
        os.close(fd)
        os.environ["NEST_RUN_JOURNAL"] = path
        self._journal_owner = (path, os.getpid())

    def close_journal(self) -> None:
        owner = getattr(self, "_journal_owner", None)
        if owner and owner[1] == os.getpid():
            os.environ.pop("NEST_RUN_JOURNAL", None)
            try:
                os.unlink(owner[0])
            except OSError:
                pass
        self._journal_owner = None

    def note(self, event: str, ref: tuple[str, str], value) -> None:
        """Record a stage's outcome (``built``/``pulled``: seconds; ``failed``: the exception) here and in the journal."""
        {"built": self.built, "pulled": self.pulled, "failed": self.failed, "started": self.started}[event][ref] = value
        path = os.environ.get("NEST_RUN_JOURNAL")
        if not path:
            return
        doc = {"event": event, "stage": ref[0], "key": ref[1]}
        if event == "failed":
            doc.update(type=type(value).__name__, message=str(value), input_error=_is_input_error(value))
        elif event == "started":
            doc["label"] = value
        else:
            doc["seconds"] = value
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, (json.dumps(doc) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass

    def merge_journal(self) -> None:
        """Fold in what the worker processes recorded (only outcomes this process did not see itself)."""
        owner = getattr(self, "_journal_owner", None)
        if not owner:
            return
        try:
            lines = open(owner[0], encoding="utf-8").read().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:  # a worker killed in the middle of a line
                continue
            ref = (doc["stage"], doc["key"])
            if doc["event"] == "failed":
                if ref not in self.failed and ref not in self.built:
                    self.failed[ref] = ChildFailure(doc["type"], doc["message"], doc["input_error"])
            elif doc["event"] == "built":
                self.failed.pop(ref, None)  # a retry (another worker process) built it
                self.built.setdefault(ref, doc["seconds"])
            elif doc["event"] == "pulled":
                self.pulled.setdefault(ref, doc["seconds"])
            elif doc["event"] == "started":
                self.started.setdefault(ref, doc["label"])

    def abandoned(self) -> list[str]:
        """Labels of the stages whose build began but neither finished nor failed (what a stop abandons)."""
        self.merge_journal()
        return [label for ref, label in self.started.items() if ref not in self.built and ref not in self.failed]

    def _add(self, roots: Iterable[luigi.Task]) -> None:
        for task, deps in _walk(roots):
            if isinstance(task, NestTask) and task.task_id not in self.tasks:
                _ = task.key  # computed now, under the current parameters
                self.tasks[task.task_id] = task
                self.required.update(d.task_id for d in deps)

    def touch(self, task: NestTask) -> None:
        if not self.tasks:
            self.started_at = utc_now()
            self.store = _config.get_store()
        if task.task_id not in self.tasks:
            self._add([task])
        if not self._atexit:
            atexit.register(self._flush_at_exit)
            self._atexit = True

    def record(self, roots: Iterable[luigi.Task] | None = None, *, command: list[str] | None = None,
               profile: str | None = None, store: Store | None = None) -> dict:
        """The run record of ``roots`` (default: every task Luigi checked), with each stage's status."""
        store = store or self.store or _config.get_store()
        if roots is not None:
            self._add(roots)
            wanted = {t.task_id for t in closure(roots)}
        else:
            wanted = set(self.tasks)
        self.merge_journal()
        tasks = [t for tid, t in self.tasks.items() if tid in wanted]
        on_remote = _remote_checker()
        shard_ids = {d.task_id for t in tasks for d in t.build_requires().values()}  # a merge's shards (catalog skips)
        reached = []
        for t in tasks:
            ref = (t.stage, t.key)
            if ref in self.failed:
                status = "failed"
            elif ref in self.built:
                status = "built"
            elif ref in self.pulled:
                status = "pulled"
            elif store.complete(*ref):
                status = "cached"
            elif on_remote(ref):
                status = "remote"  # distributed mode: built (or kept) by another worker, on the shared remote
            else:
                status = "missing"
            reached.append({"stage": t.stage, "key": t.key, "label": t.label, "status": status,
                            "seconds": round(self.built[ref], 3) if ref in self.built
                            else round(self.pulled[ref], 3) if ref in self.pulled else None})
            if t.task_id in shard_ids:
                reached[-1]["shard"] = True
        targets = [{"stage": t.stage, "key": t.key, "label": t.label} for t in tasks if t.task_id not in self.required]
        _mark_skipped(tasks, reached, {t["key"] for t in targets})
        ok = all(r["status"] in ("built", "cached", "pulled", "skipped", "remote") for r in reached)
        return {"id": new_run_id(), "started_at": self.started_at, "finished_at": utc_now(),
                "command": command if command is not None else [sys.argv[0].rsplit("/", 1)[-1]] + sys.argv[1:],
                "profile": profile, "ok": ok, "targets": targets, "reached": reached}

    def flush(self, roots: Iterable[luigi.Task] | None = None, **kw) -> dict | None:
        """Write the run record (``runs/<id>.json`` + ``runs/latest.json``) and start a new log."""
        if roots is None and not self.tasks:
            return None
        store = kw.pop("store", None) or self.store or _config.get_store()
        record = self.record(roots, store=store, **kw)
        if record["reached"]:
            try:
                write_run(store, record)
            except OSError as e:  # a read-only (shared) store serves cached runs; the record is best effort there
                record["not_recorded"] = f"{e.strerror or e}"
                print(f"[nest] note: run not recorded ({store.runs_dir}: {e.strerror or e}; read-only store?)",
                      file=sys.stderr)
        self.reset()
        return record

    def _flush_at_exit(self) -> None:
        if not self.tasks:
            return
        try:
            store = self.store or _config.get_store()
            if store.root.is_dir():
                self.flush(store=store)
        except Exception as e:  # never turn a finished run into a crash at exit
            print(f"[nest] could not record the run: {e}", file=sys.stderr)


def _remote_checker():
    """``(stage, key) -> bool``: on the remote, in distributed mode only (elsewhere a stage is local or missing)."""
    from pipeline.scheduling import distributed

    if not distributed():
        return lambda ref: False
    from pipeline.remote import RemoteError, active_remote

    try:
        remote = active_remote("pull")
    except RemoteError:
        remote = None
    if remote is None:
        return lambda ref: False

    def check(ref):
        try:
            return remote.has(*ref)
        except RemoteError:
            return False

    return check


RUN_LOG = RunLog()
