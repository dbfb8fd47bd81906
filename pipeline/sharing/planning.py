"""What to fetch and what to build when a remote holds part of the DAG (``nest status``, ``nest pull``), and the
loop that moves many artifacts with progress bars (``nest push``/``pull``)."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

from pipeline.sharing.remote import Remote, RemoteError, byte_bar
from pipeline.storage.archive import ArchiveError


def needed_from(tasks_dep_first: list, local: Callable[[Any], bool], remote: Callable[[Any], bool]) -> tuple[set, set]:
    """Walk the DAG from its targets: a stage cached locally or on the remote stops the walk (what it was built from
    is not needed). Returns (task_ids to pull, task_ids to build)."""
    inputs_of = {t.task_id: list(t.deps()) for t in tasks_dep_first}  # identity inputs and shards
    required = {d.task_id for deps in inputs_of.values() for d in deps}
    needed = {t.task_id for t in tasks_dep_first if t.task_id not in required}  # the targets
    pull, build = set(), set()
    for t in reversed(tasks_dep_first):  # dependents before their inputs
        if t.task_id not in needed or local(t):
            continue
        if remote(t):
            pull.add(t.task_id)
            continue
        build.add(t.task_id)
        needed.update(d.task_id for d in inputs_of[t.task_id])
    return pull, build


def mark_remote(rows: list, remote: "Remote") -> None:
    """``nest status``: a stage missing locally but on the remote becomes ``remote`` (pulled, not built); a stage only
    needed to build what is cached or on the remote becomes ``not needed``."""
    tasks = [s.task for s in rows]
    cached = {s.task.task_id for s in rows if s.state == "cached"}
    on_remote = {t.task_id for t in tasks if t.task_id not in cached and remote.has(t.stage, t.key)}
    pull, build = needed_from(tasks, lambda t: t.task_id in cached, lambda t: t.task_id in on_remote)
    for s in rows:
        tid = s.task.task_id
        if tid in cached:
            continue
        if tid in pull:
            s.state, s.reasons, s.compared_with = "remote", [f"on the remote {remote.shown} (pulled, not built)"], None
        elif tid not in build:
            s.state, s.reasons, s.compared_with = "not needed", ["what uses it is cached or on the remote"], None


def transfer(items: Iterable[tuple[str, str]], fn: Callable[[str, str, Callable[[int], Any]], Any],
             sizes: Callable[[str, str], int | None], verb: str) -> tuple[list, list[str]]:
    """Run ``fn(stage, key, progress)`` over ``items`` with an artifact bar and a byte bar; (results, error lines)."""
    from tqdm import tqdm  # lazy: start-up time

    items = list(items)
    results, errors = [], []
    with tqdm(total=len(items), desc=verb, unit="artifact", mininterval=0.5, file=sys.stderr) as bar:
        for stage, key in items:
            try:
                with byte_bar(f"{stage} {key[:12]}", sizes(stage, key)) as update:
                    results.append((stage, key, fn(stage, key, update)))
            except (RemoteError, ArchiveError) as e:
                errors.append(str(e))
            bar.update(1)
    return results, errors
