"""``build()``: the programmatic entry point of a run, called by ``nest all``/``run``/``worker``/``generate`` and by the
benches.

It builds the targets with Luigi (local scheduler, or a ``luigid``) and N worker processes, records the run (as it starts,
``runs/active/``, and when it ends, ``runs/<id>.json``), and prints one line per stage.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Sequence

import luigi
import luigi.rpc
from luigi.rpc import RemoteScheduler

from pipeline.engine import scheduling
from pipeline.engine.config import config, get_store
from pipeline.engine.errors import EXIT_INPUT, INPUT_ERRORS, CliError, is_input_error
from pipeline.engine.runlog import RUN_LOG, closure
from pipeline.engine.sharding import size_sources
from pipeline.engine.stopping import stop_on_signals
from pipeline.storage.runs import end_run, new_run_id, start_run


class _DropInputErrors(logging.Filter):
    """Luigi logs a traceback for every failed task; for bad input the CLI prints one line instead. A scheduler that
    stopped answering is one line too (printed by :func:`build`), not a warning per ping."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(record.msg, str) and record.msg.startswith("Failed pinging scheduler"):
            return False
        if exc is not None and type(exc).__name__ == "RPCError":
            return False
        return not (exc is not None and isinstance(exc, INPUT_ERRORS))


def _configure_logging() -> None:
    logger = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _DropInputErrors) for f in logger.filters):
        logger.addFilter(_DropInputErrors())


def _precompute_keys(roots: Iterable) -> list:
    """Compute every key before Luigi runs: a bad source path then fails here, in one line, not inside Luigi's
    scheduler (which would log a traceback and skip the task)."""
    tasks = closure(roots)
    for t in tasks:
        _ = t.key
    return tasks


def _force(tasks: list, stages: Sequence[str]) -> list:
    """Move aside the artifacts of the tasks of ``stages`` and of every task downstream of them (their keys would not
    change, so they would stay cached); the run then rebuilds them. Returns the tasks moved aside."""
    if not stages:
        return []
    names = {t.stage for t in tasks}
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise CliError(f"--force {unknown[0]}: not a stage of this run (its stages: {', '.join(sorted(names))})")
    store = get_store()
    hit: set[str] = set()
    for t in tasks:  # dependencies first: a task is hit when forced or when an input was hit
        if t.stage in stages or any(i.task_id in hit for i in t.deps()):  # inputs and shards
            hit.add(t.task_id)
    moved = []
    for t in tasks:
        if t.task_id in hit and store.complete(t.stage, t.key):
            with store.lock(t.stage, t.key):
                if store.complete(t.stage, t.key):
                    aside = store.quarantine(t.stage, t.key, reason="replaced")
                    print(f"[nest] {t.label} {t.key[:12]}: --force, moved aside to {aside.name}", file=sys.stderr)
                    moved.append(t)
    return moved


def build(roots: list, *, profile: str | None, command: list[str], quiet: bool = False,
          force: Sequence[str] = (), workers: int = 1, scheduler_url: str | None = None, keep_alive: bool = False,
          assistant: bool = False) -> int:
    """Build ``roots`` with Luigi (local scheduler, or the ``luigid`` at ``scheduler_url``) and ``workers`` worker
    processes; record the run; print one line per stage (``pipeline/engine/scheduling.py``).

    The run is recorded as it starts (``runs/active/``), so that ``nest gc`` meanwhile keeps everything it may read.
    With a ``luigid`` the process stays until its DAG is done (Luigi's ``keep_alive``), also while other workers run its
    tasks: otherwise a submitter whose every task was taken by a faster worker would stop at once and report them
    missing."""
    keep_alive = keep_alive or bool(scheduler_url)
    if workers < 1:
        raise CliError(f"--workers {workers}: give at least 1")
    if force and scheduler_url:
        raise CliError("--force with --scheduler-url: not supported (the remote and the other workers would still "
                       "count the old artifacts as done)")
    if scheduler_url:
        note = scheduling.enter_distributed(scheduler_url)
        if note and not quiet:
            print(f"[nest] {note}", file=sys.stderr)
    else:
        scheduling.enter_local()
    scheduling.set_thread_budget(workers)
    _configure_logging()
    RUN_LOG.reset()
    if workers > 1 or scheduler_url:
        RUN_LOG.open_journal()  # stages run in Luigi's worker processes: they tell this one through the journal
    kwargs = scheduling.scheduler_kwargs(workers, scheduler_url, assistant=assistant)
    t0 = time.perf_counter()
    run: dict = {}  # the active-run record, once started (a stop ends it)
    stop = stop_on_signals(get_store().root, lambda name, removed: _stopped(name, removed, roots, run, command, profile))
    with stop:
        return _build_locked(roots, run, kwargs, t0, profile=profile, command=command, quiet=quiet, force=force,
                             scheduler_url=scheduler_url, keep_alive=keep_alive)


def _stopped(signame: str, removed: list, roots: list, run: dict, command: list[str], profile: str | None) -> str:
    """A SIGINT/SIGTERM stopped the run (:mod:`pipeline.engine.stopping`): record it and say, in one line, what was
    built and what a rerun does."""
    abandoned = RUN_LOG.abandoned()
    record = None
    try:
        record = RUN_LOG.flush(roots, command=command, profile=profile) if roots else None
    finally:
        RUN_LOG.close_journal()
        if run.get("active") is not None:
            end_run(run["active"])
    reached = (record or {}).get("reached", [])
    built = [r["label"] for r in reached if r["status"] == "built"]
    left = [r for r in reached if r["status"] in ("missing", "failed")]
    what = f"built {len(built)} stage(s)" + (f" ({', '.join(built[:4])}{', …' if len(built) > 4 else ''})" if built
                                             else "")
    gone = (f"; abandoned {', '.join(abandoned)} (its processes killed, {len(removed)} temp folder(s) removed)"
            if abandoned else "")
    rerun = (f"run the same command again to build the {len(left)} stage(s) left (what was built stays cached)"
             if left else "run the same command again to finish")
    return f"nest: stopped by {signame}: {what}{gone}; {rerun}"


def _build_locked(roots: list, run: dict, kwargs: dict, t0: float, *, profile, command, quiet, force, scheduler_url,
                  keep_alive) -> int:
    """The body of :func:`build`, under :func:`pipeline.engine.stopping.stop_on_signals`."""
    try:
        if not _build_size_sources(roots, kwargs, quiet=quiet):
            print(f"nest: the scheduler at {scheduler_url} stopped answering; what was built is kept: run the same "
                  f"command again to finish", file=sys.stderr)
            RUN_LOG.close_journal()
            return 1
        tasks = _precompute_keys(roots)
        for t in tasks if not scheduler_url else ():  # luigid's limits are in its own luigi.cfg
            missing = scheduling.unlimited(t.resources)
            if missing:
                raise CliError(f"{t.label}: resource {missing[0]} = {t.resources[missing[0]]} has no limit in "
                               f"[resources] (Luigi would never run it); set one, e.g. [resources] {missing[0]} = 64")
        _force(tasks, force)
    except BaseException:
        RUN_LOG.close_journal()
        raise
    active = run["active"] = start_run(get_store(), new_run_id(), [(t.stage, t.key) for t in tasks], command)
    try:
        try:
            with scheduling.worker_options(keep_alive=keep_alive):
                _build_settled(roots, kwargs)
        except luigi.rpc.RPCError as e:
            RUN_LOG.reset()
            attempts = str(e).splitlines()[0].split(" when ")[0].removeprefix("Errors ").strip("()")
            print(f"nest: the scheduler at {scheduler_url} stopped answering ({attempts}); what was built is kept: "
                  f"run the same command again to finish", file=sys.stderr)
            return 1
        RUN_LOG.merge_journal()
        failed = dict(RUN_LOG.failed)
        record = RUN_LOG.flush(roots, command=command, profile=profile)
    finally:
        RUN_LOG.close_journal()  # (flush closed it already, unless interrupted)
        end_run(active)
    total = time.perf_counter() - t0
    if not quiet and record and record["reached"]:
        width = max(len(r["label"]) for r in record["reached"])
        for r in record["reached"]:
            secs = f" {r['seconds']:.1f} s" if r["seconds"] is not None else ""
            print(f"{r['label']:<{width}}  {r['key'][:12]}  {r['status']}{secs}")
        where = "not recorded" if record.get("not_recorded") else f"recorded as runs/{record['id']}.json"
        print(f"{'ok' if record['ok'] else 'FAILED'} in {total:.1f} s; run {where}")
    for _ref, exc in failed.items():
        if is_input_error(exc):
            print(f"nest: {exc}", file=sys.stderr)
            return EXIT_INPUT
    if failed or (record and not record["ok"]):
        for (stage, key), exc in failed.items():
            name = getattr(exc, "type_name", type(exc).__name__)
            print(f"nest: {stage} {key[:12]} failed: {name}: {exc}", file=sys.stderr)
        if not failed:  # nothing failed here: say what is missing, and where to look (never silent)
            missing = [r for r in record["reached"] if r["status"] not in ("built", "cached", "pulled", "skipped",
                                                                           "remote")]
            shown = ", ".join(f"{r['label']} {r['key'][:12]}" for r in missing[:3]) + (" …" if len(missing) > 3 else "")
            where = (f"the scheduler at {scheduler_url} did not hand them to this worker (failed or disabled "
                     f"elsewhere: see its page)" if scheduler_url else "a dependency was not run")
            print(f"nest: {len(missing)} stage(s) not built ({shown}): {where}; run the same command again",
                  file=sys.stderr)
        return 1
    return 0


def _build_size_sources(roots: list, kwargs: dict, *, quiet: bool) -> bool:
    """Sharded stages (``shards > 1``, pipeline/engine/sharding.py) split by the number of passages or examples: build the
    artifacts that say it (ConvertCorpus, LoadTask) first, with the same scheduler, so that the DAG Luigi gets next
    holds the shard tasks. With a ``luigid``, the worker stays until they are built, also when another worker builds
    them (:func:`_build_settled`): going on before would compute the shard plan without the size (one task) and hand
    ``luigid`` the merge without its shards, replacing the other worker's dependencies. False when the scheduler
    stopped answering."""
    sources = size_sources(roots)
    if not sources:
        return True
    if not quiet:
        print(f"[nest] sharded stages: building what sizes them first ({', '.join(t.label for t in sources)})",
              file=sys.stderr)
    try:
        with scheduling.worker_options(keep_alive=bool(kwargs.get("scheduler_url"))):
            _build_settled(sources, kwargs)  # a failure shows again (and is reported) below
    except luigi.rpc.RPCError:
        return False
    return True


def _build_settled(roots: list, kwargs: dict) -> None:
    """``luigi.build(roots)``; with a ``luigid``, until the DAG is settled.

    Luigi's ``keep_alive`` keeps a worker only while some task of its DAG is *pending* for it: a task that another
    worker is running does not count, so ``luigi.build`` returns while the size source or the merge is still being
    built elsewhere, and the worker would report it missing (exit 1, both workers when they raced), or plan shards
    without a size. So this asks ``luigid`` for the state of the roots' graph and waits while a task of it is RUNNING
    elsewhere, or FAILED there (a dead worker's task, or another worker's failure: ``luigid`` makes it PENDING again
    after ``retry_delay`` and Luigi is then called again, so this worker takes it). It stops when the roots are DONE,
    when a stage failed in this worker (reported by the caller) or when nothing is running or to be retried (disabled,
    blocked: the caller reports what is missing in one line). Each wait is bounded by another worker's progress, its
    heartbeat (``worker_disconnect_delay``) or the retry policy."""
    url = kwargs.get("scheduler_url")
    luigi.build(roots, log_level="WARNING", detailed_summary=True, **kwargs)
    if not url:
        return
    announced = False
    while True:
        RUN_LOG.merge_journal()
        if RUN_LOG.failed:
            return
        states = _scheduler_states(url, roots)
        if all(states.get(r.task_id) == "DONE" for r in roots):
            return
        running = sum(st == "RUNNING" for st in states.values())
        retried = sum(st == "FAILED" for st in states.values())
        if running or retried:
            if not announced:
                print(f"[nest] waiting for luigid: {running} task(s) of this DAG running on other workers, {retried} "
                      f"failed there and to be retried", file=sys.stderr, flush=True)
                announced = True
            time.sleep(_wait_interval())
            continue
        if "PENDING" not in states.values():
            return
        luigi.build(roots, log_level="WARNING", detailed_summary=True, **kwargs)  # e.g. a dead worker's task, back
        if _scheduler_states(url, roots) == states:
            return  # nothing this worker can run (blocked by a disabled stage): the caller says what is missing
        announced = False


def _scheduler_states(url: str, roots: list) -> dict[str, str]:
    """``{task_id: status}`` of every task of the graphs of ``roots`` in the ``luigid`` at ``url`` (one request per
    root; a root it does not have: ``UNKNOWN``)."""
    sch = RemoteScheduler(url)
    out = {}
    for r in roots:
        graph = sch._request("/api/dep_graph", {"task_id": r.task_id, "include_done": True}) or {}
        out.update({tid: str(t.get("status") or "UNKNOWN") for tid, t in graph.items()})
        out.setdefault(r.task_id, "UNKNOWN")
    return out


def _wait_interval() -> float:
    try:
        return max(0.1, float(config().get("worker", "wait_interval", "1.0")))
    except ValueError:
        return 1.0
