"""What a run reached: the walk of the DAG under its targets, and the run log that becomes a run record
(``runs/<id>.json``, pipeline/storage/runs.py).

The stage tasks (pipeline/engine/task.py) report to :data:`RUN_LOG` as Luigi checks and runs them; this module never
imports them (a stage task is told by its key, :func:`is_stage`), so the log sits below the task base.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
from typing import Iterable

import luigi

from pipeline.engine import config as _config
from pipeline.engine.config import distributed
from pipeline.engine.errors import is_input_error
from pipeline.sharing.remote import RemoteError, active_remote
from pipeline.storage.runs import new_run_id, write_run
from pipeline.storage.store import Store, utc_now


def is_stage(task) -> bool:
    """A stage task (it has a key: a ``NestTask``), as opposed to a wrapper such as ``All``."""
    return hasattr(type(task), "key_ingredients")


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


def closure(roots: Iterable[luigi.Task]) -> list:
    """Every NestTask reachable from ``roots`` (wrapper tasks are walked through), dependencies first, each once."""
    return [t for t, _deps in _walk(roots) if is_stage(t)]


def _mark_skipped(tasks: list, reached: list[dict], target_keys: set[str]) -> None:
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


class ChildFailure(Exception):
    """A stage that failed in one of Luigi's worker processes, as the journal tells it to the process that records
    the run (the exception itself stayed in that process)."""

    def __init__(self, type_name: str, message: str, input_error: bool):
        super().__init__(message)
        self.type_name, self.input_error = type_name, input_error


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
        self.tasks: dict[str, luigi.Task] = {}       # task_id -> task, dependencies first
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
            doc.update(type=type(value).__name__, message=str(value), input_error=is_input_error(value))
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
            if is_stage(task) and task.task_id not in self.tasks:
                _ = task.key  # computed now, under the current parameters
                self.tasks[task.task_id] = task
                self.required.update(d.task_id for d in deps)

    def touch(self, task) -> None:
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
    if not distributed():
        return lambda ref: False
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
