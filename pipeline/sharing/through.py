"""What a run does with the remote: read-through (a missing stage is pulled instead of built), a stage's inputs pulled
in distributed mode (or built here when the remote copy is damaged), and what was built pushed.

The task base (pipeline/engine/task.py) calls these; they report pull and build seconds back to it (the run log), so
this room never imports the engine above the configuration."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from pipeline.engine.config import distributed
from pipeline.sharing.remote import RemoteError, active_remote, byte_bar
from pipeline.storage.archive import ArchiveError


def read_through(task) -> bool | float:
    """Called by ``NestTask.complete()`` for a stage missing locally: pull it when the remote has it (and
    ``remote_mode`` is pull or both). Returns the seconds the pull took (the task records them), or False (build it)
    when it is not there or the pull is refused; the reason is printed in one line.

    In distributed mode (``nest worker``, ``--scheduler-url``: :mod:`pipeline.engine.scheduling`) an artifact on the
    remote counts as done without being pulled (True): the worker that runs a stage needing it pulls it then
    (:func:`pull_inputs`).
    """
    if distributed():
        try:
            remote = active_remote("pull")
            return remote is not None and remote.has(task.stage, task.key)
        except RemoteError as e:
            print(f"[nest] {task.label} {task.key[:12]}: remote not checked ({e})", file=sys.stderr, flush=True)
            return False
    seconds = pull_now(task)
    return False if seconds is None else seconds


def pull_now(task, *, quiet_missing: bool = True) -> float | None:
    """Pull ``task``'s artifact into the local store when the remote has it: the seconds it took, or None (with one
    line) when it was not pulled."""
    try:
        remote = active_remote("pull")
        if remote is None:
            return None
        store = task.store
        doc = remote.manifest(task.stage, task.key)
        if doc is None:
            return None
        print(f"[nest] {task.label} {task.key[:12]}: pulling from {remote.shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with byte_bar(f"pull {task.stage}", doc["remote"]["archive"]["size"]) as update:
            remote.pull(store, task.stage, task.key, progress=update, doc=doc)
    except (RemoteError, ArchiveError) as e:
        print(f"[nest] {task.label} {task.key[:12]}: not pulled ({e}); building it", file=sys.stderr, flush=True)
        return None
    seconds = time.perf_counter() - t0
    print(f"[nest] {task.label} {task.key[:12]}: pulled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def _not_noted(event: str, ref: tuple[str, str], value) -> None:
    return None


def pull_inputs(task, note: Callable[[str, tuple[str, str], Any], Any] = _not_noted) -> None:
    """Distributed mode, before a stage runs: pull every input that is not in the local store (another worker built
    it and pushed it; a sharded stage's merge: its shards). An input whose remote copy is damaged (the pull refuses
    it, in one line) is built here instead, and pushed over the damaged copy. Each outcome is told to
    ``note(event, (stage, key), seconds)`` (``pulled`` or ``built``: the run log's). Raises :class:`RemoteError`
    naming an input that is neither local nor on the remote."""
    for name, dep in task.run_inputs().items():
        if dep.store.complete(dep.stage, dep.key):
            continue
        seconds = pull_now(dep)
        if seconds is not None:
            note("pulled", (dep.stage, dep.key), seconds)
            continue
        remote = active_remote("pull")
        if remote is not None and remote.check(dep.stage, dep.key)[0] is not None:
            build_here(dep, note)  # on the remote but refused: damaged there
            continue
        raise RemoteError(f"{task.label}: input {name} ({dep.label} {dep.key[:12]}) is neither in the local store "
                          f"nor on the remote")


def build_here(task, note: Callable[[str, tuple[str, str], Any], Any] = _not_noted) -> None:
    """Build ``task``'s artifact in this worker (its inputs pulled, or built here the same way) and push it over the
    damaged remote copy: what a refused pull of an input falls back to in distributed mode."""
    pull_inputs(task, note)
    print(f"[nest] {task.label} {task.key[:12]}: building it here (its remote copy was refused)", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    task.store.publish(task.stage, task.key, task.build, version=task.stage_version(), params=task.key_params,
                       inputs={n: (t.stage, t.key) for n, t in task.inputs().items()})
    note("built", (task.stage, task.key), time.perf_counter() - t0)  # the run record lists it as built
    remote = active_remote("push")
    if remote is not None:
        remote.push(task.store, task.stage, task.key, force=True)


def push_built(task, *, strict: bool = False) -> None:
    """Called by ``NestTask.run()`` after a build: push it when ``remote_mode`` is push or both (a failure is
    reported in one line; the local build stands). ``strict`` (distributed mode): a failed push fails the stage, since
    the workers that run its dependents could not pull it."""
    try:
        remote = active_remote("push")
        if remote is None:
            return
        m = task.store.manifest(task.stage, task.key) or {}
        with byte_bar(f"push {task.stage}", m.get("size")) as update:
            sent = remote.push(task.store, task.stage, task.key, progress=update)
        if sent is not None:
            print(f"[nest] {task.label} {task.key[:12]}: pushed to {remote.shown}", file=sys.stderr, flush=True)
    except (RemoteError, ArchiveError) as e:
        print(f"[nest] {task.label} {task.key[:12]}: not pushed ({e})", file=sys.stderr, flush=True)
        if strict:
            raise


def share_local(task) -> bool:
    """Distributed mode, ``complete()`` of a stage found in the local store: make sure the remote has it too (a build
    whose push failed, or an artifact built before this run), so that other workers can pull it. False when the push
    failed: the task then runs, which pushes again (strictly)."""
    try:
        remote = active_remote("push")
        if remote is None or remote.has(task.stage, task.key):
            return True
    except RemoteError as e:
        print(f"[nest] {task.label} {task.key[:12]}: remote not checked ({e})", file=sys.stderr, flush=True)
        return False
    try:
        push_built(task, strict=True)
    except (RemoteError, ArchiveError):
        return False
    return True

