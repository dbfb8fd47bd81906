"""``nest``: the command line of the pipeline.

    nest all [--profile P] [--set Stage.param=value ...] [--force STAGE] [--workers N] [--scheduler-url URL]
                                                           build the DAG (Luigi; local scheduler, one worker by default)
    nest worker --scheduler-url URL [--workers N] [StageName --param value ...]
                                                           work for a running luigid on the DAG (default: `nest all`'s)
    nest run [--profile P] [--set ...] [--force STAGE] StageName [--param value ...]
                                                           one stage and what it needs (Luigi's own parameters)
    nest status [--profile P]                              cached, or why a stage would rerun
    nest show KEY-or-prefix [--verify]                     an artifact's manifest (and a check of its files)
    nest gc [--keep N] [--yes]                             artifacts no recorded run reaches (dry run by default)
    nest query "SQL" [--task T|all]                        DuckDB over manifests and the latest run's Parquet files
    nest generate "prompt" [--method nest] [...]           decode one prompt with attribution (the decoding demo)
    nest push [STAGE|KEY-PREFIX ...] [--all]               send artifacts to the remote store (pipeline/remote_cli.py)
    nest pull [STAGE|KEY-PREFIX ...] [--all]               fetch artifacts from it (default: what `nest all` needs)
    nest generate --file prompts.txt [--json]              a stream of prompts in one process (one JSON per prompt)

Bad input (``stages.errors.InputError``) prints one line ``path:line: message`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Iterable, Sequence

from stages.evaluation.experiments import merge_config

_EXIT_INPUT = 2


class CliError(Exception):
    """A one-line user-facing error (exit status 2)."""


def _input_error_types() -> tuple[type, ...]:
    from pipeline.config import ProfileError
    from pipeline.params import ConfigError
    from pipeline.store import StoreError
    from stages.errors import InputError
    from tasks.errors import TaskInputError

    return InputError, TaskInputError, ProfileError, ConfigError, StoreError, CliError, FileNotFoundError


def _remote_error_types() -> tuple[type, ...]:
    from pipeline.archive import ArchiveError
    from pipeline.remote import RemoteError

    return RemoteError, ArchiveError


# ---- building ----------------------------------------------------------------------------------------------------------

class _DropInputErrors(logging.Filter):
    """Luigi logs a traceback for every failed task; for bad input the CLI prints one line instead. A scheduler that
    stopped answering is one line too (printed by :func:`build`), not a warning per ping."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(record.msg, str) and record.msg.startswith("Failed pinging scheduler"):
            return False
        if exc is not None and type(exc).__name__ == "RPCError":
            return False
        return not (exc is not None and isinstance(exc, _input_error_types()))


def _configure_logging() -> None:
    logger = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _DropInputErrors) for f in logger.filters):
        logger.addFilter(_DropInputErrors())


def _setup(profile: str | None, sets: Sequence[str] = ()) -> None:
    """Apply the profile and ``--set`` overrides, then check the whole configuration (names and values) before any
    task is built: a misspelt section/option or a bad value is one line (exit 2)."""
    from pipeline import config, dag  # dag registers the task and config classes
    from pipeline.params import check_config

    if profile:
        config.apply_profile(profile)
    if sets:
        config.apply_overrides(config.parse_set(list(sets)))
    check_config(extra_sections=config.PROFILES)
    dag.check_decoding()  # the keys inside [decoding]'s dicts, NestConfig's own validation of each merged config
    from pipeline.scheduling import check_needs

    check_needs()
    config.get_store().check_root()


def _precompute_keys(roots: Iterable) -> list:
    """Compute every key before Luigi runs: a bad source path then fails here, in one line, not inside Luigi's
    scheduler (which would log a traceback and skip the task)."""
    from pipeline.base import closure

    tasks = closure(roots)
    for t in tasks:
        _ = t.key
    return tasks


def _force(tasks: list, stages: Sequence[str]) -> list:
    """Move aside the artifacts of the tasks of ``stages`` and of every task downstream of them (their keys would not
    change, so they would stay cached); the run then rebuilds them. Returns the tasks moved aside."""
    from pipeline.config import get_store

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
    processes; record the run; print one line per stage (``pipeline/scheduling.py``).

    The run is recorded as it starts (``runs/active/``), so that ``nest gc`` meanwhile keeps everything it may read.
    With a ``luigid`` the process stays until its DAG is done (Luigi's ``keep_alive``), also while other workers run its
    tasks: otherwise a submitter whose every task was taken by a faster worker would stop at once and report them
    missing."""
    import luigi
    import luigi.rpc

    from pipeline import scheduling
    from pipeline.base import RUN_LOG
    from pipeline.config import get_store
    from pipeline.stopping import stop_on_signals

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
    """A SIGINT/SIGTERM stopped the run (:mod:`pipeline.stopping`): record it and say, in one line, what was built
    and what a rerun does."""
    from pipeline.base import RUN_LOG
    from pipeline.runs import end_run

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
    """The body of :func:`build`, under :func:`pipeline.stopping.stop_on_signals`."""
    import luigi
    import luigi.rpc

    from pipeline import scheduling
    from pipeline.base import RUN_LOG
    from pipeline.config import get_store
    from pipeline.runs import end_run, new_run_id, start_run

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
        if isinstance(exc, _input_error_types()) or getattr(exc, "input_error", False):
            print(f"nest: {exc}", file=sys.stderr)
            return _EXIT_INPUT
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
    """Sharded stages (``shards > 1``, pipeline/sharding.py) split by the number of passages or examples: build the
    artifacts that say it (ConvertCorpus, LoadTask) first, with the same scheduler, so that the DAG Luigi gets next
    holds the shard tasks. With a ``luigid``, the worker stays until they are built, also when another worker builds
    them (:func:`_build_settled`): going on before would compute the shard plan without the size (one task) and hand
    ``luigid`` the merge without its shards, replacing the other worker's dependencies. False when the scheduler
    stopped answering."""
    import luigi.rpc

    from pipeline.sharding import size_sources

    sources = size_sources(roots)
    if not sources:
        return True
    if not quiet:
        print(f"[nest] sharded stages: building what sizes them first ({', '.join(t.label for t in sources)})",
              file=sys.stderr)
    try:
        with _scheduling().worker_options(keep_alive=bool(kwargs.get("scheduler_url"))):
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
    import luigi

    from pipeline.base import RUN_LOG

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
    from luigi.rpc import RemoteScheduler

    sch = RemoteScheduler(url)
    out = {}
    for r in roots:
        graph = sch._request("/api/dep_graph", {"task_id": r.task_id, "include_done": True}) or {}
        out.update({tid: str(t.get("status") or "UNKNOWN") for tid, t in graph.items()})
        out.setdefault(r.task_id, "UNKNOWN")
    return out


def _wait_interval() -> float:
    from pipeline.config import config

    try:
        return max(0.1, float(config().get("worker", "wait_interval", "1.0")))
    except ValueError:
        return 1.0


def _scheduling():
    from pipeline import scheduling

    return scheduling


# ---- commands ----------------------------------------------------------------------------------------------------------

def cmd_all(args) -> int:
    from pipeline import dag

    _setup(args.profile, args.set)
    rc = build([dag.All()], profile=args.profile, command=["nest", *sys.argv[1:]], force=args.force,
               workers=args.workers, scheduler_url=args.scheduler_url)
    if rc == 0 and args.scheduler_url:
        _pull_report(dag.Report())  # built by another worker: on the remote only
    report = latest_report_path()
    if rc == 0 and report is not None:
        print(f"report: {_shown_path(report)}  (print it with `nest report`)")
    return rc


def _pull_report(task) -> None:
    from pipeline.remote import pull_now

    if not task.store.complete(task.stage, task.key):
        pull_now(task)


def cmd_worker(args) -> int:
    """``nest worker``: connect to a running ``luigid`` and run whatever part of the DAG it hands out (the DAG of
    ``nest all``, or the stage named after the options), until all of it is done. Every worker must see the same
    configuration (luigi.cfg, ``--profile``, ``--set``): the same tasks then have the same keys."""
    from pipeline import dag

    luigi_args = _split_run_args(list(args.luigi_args), args)
    if luigi_args:
        return _run_task(luigi_args, args, keep_alive=True, assistant=args.assistant)
    _setup(args.profile, args.set)
    roots = [] if args.assistant else [dag.All()]
    return build(roots, profile=args.profile, command=["nest", *sys.argv[1:]], workers=args.workers,
                 scheduler_url=args.scheduler_url, keep_alive=True, assistant=args.assistant)


def latest_report_path():
    """``report.md`` of the newest Report artifact of the latest recorded run that reached one (a later ``nest generate``
    or ``nest run`` does not hide it), or None."""
    from pipeline.config import get_store
    from pipeline.runs import latest_run_with

    store = get_store()
    run = latest_run_with(store, "Report") or {}
    keys = [r["key"] for r in run.get("reached", []) if r.get("stage") == "Report"]
    for key in keys:
        path = store.path("Report", key) / "report.md"
        if path.is_file():
            return path
    return None


def _shown_path(path) -> str:
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_report(args) -> int:
    _setup(args.profile)
    path = latest_report_path()
    if path is None:
        raise CliError("report: no report yet; run `make all` (or `nest all`) first")
    if args.html:
        html = path.with_name("report.html")
        if not html.is_file():
            raise CliError("report: the latest report has no report.html (a Report built before the HTML view); "
                           "run `nest all` to build it")
        print(_shown_path(html))
    elif args.path:
        print(_shown_path(path))
    else:
        print(path.read_text(encoding="utf-8"), end="")
    return 0


_OWN_RUN_OPTIONS = ("--set", "--force", "--profile", "--workers", "--scheduler-url")


def _split_run_args(luigi_args: Sequence[str], args) -> list[str]:
    """Take nest's own options (``--set``, ``--force``, ``--profile``) out of the arguments after the stage name, so that
    they work on either side of it; the rest goes to Luigi."""
    rest: list[str] = []
    it = iter(luigi_args)
    for a in it:
        name, eq, value = a.partition("=")
        if name in _OWN_RUN_OPTIONS:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise CliError(f"run: {name} needs a value")
            if name == "--profile":
                args.profile = value
            elif name == "--workers":
                try:
                    args.workers = int(value)
                except ValueError:
                    raise CliError(f"run: --workers {value}: not a number") from None
            elif name == "--scheduler-url":
                args.scheduler_url = value
            else:
                getattr(args, name[2:]).append(value)
        else:
            rest.append(a)
    return rest


def _task_parser(luigi_args: list[str]):
    """Luigi's command-line parser without argparse's prefix matching: ``--b 20`` is PreRetrieve's ``b``, not an
    ambiguous prefix of the many ``--batch-email-...`` options Luigi registers."""
    from luigi.cmdline_parser import CmdlineParser

    class _Exact(CmdlineParser):
        @staticmethod
        def _build_parser(root_task=None, help_all=False):
            parser = CmdlineParser._build_parser(root_task=root_task, help_all=help_all)
            parser.allow_abbrev = False
            return parser

    return _Exact(luigi_args)


def _import_modules(luigi_args: Sequence[str]) -> None:
    import importlib

    for i, a in enumerate(luigi_args):
        name = a.partition("=")[2] if a.startswith("--module=") else (
            luigi_args[i + 1] if a == "--module" and i + 1 < len(luigi_args) else None)
        if name:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise CliError(f"run: --module {name}: {e}") from None


def cmd_run(args) -> int:
    return _run_task(_split_run_args(list(args.luigi_args), args), args)


def _run_task(luigi_args: list[str], args, **build_kw) -> int:
    from luigi.cmdline_parser import CmdlineParser
    from luigi.task_register import TaskClassException

    from pipeline.params import ConfigError, check_value

    _import_modules(luigi_args)  # `--module M` first: its task classes may be named by --set and the config check
    _setup(args.profile, args.set)
    if not luigi_args:
        raise CliError("run: name a stage, e.g. `nest run BuildBM25Index --k1 1.2`")
    try:
        cp = _task_parser(luigi_args)
    except TaskClassException as e:
        raise CliError(f"run: {str(e).splitlines()[0]}") from None
    cls = cp._get_task_cls()
    for name, param in cls.get_params():  # the command line's values, checked like the config's
        raw = getattr(cp.known_args, name, None)
        if raw:
            check_value(cls.get_task_family(), name, param, raw, raw=True)
    assert CmdlineParser._instance is None
    CmdlineParser._instance = cp  # what CmdlineParser.global_instance does, for our subclass
    try:
        try:
            task = cp.get_task_obj()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise CliError(f"run: {cls.get_task_family()}: {str(e).splitlines()[0]}") from None
        return build([task], profile=args.profile, command=["nest", *sys.argv[1:]], force=getattr(args, "force", ()),
                     workers=args.workers, scheduler_url=args.scheduler_url, **build_kw)
    finally:
        CmdlineParser._instance = None


def cmd_status(args) -> int:
    from pipeline import dag
    from pipeline.config import get_store
    from pipeline.status import dag_status

    _setup(args.profile, args.set)
    store = get_store()
    rows = dag_status([dag.All()], store)
    from pipeline.remote import RemoteError, get_remote, mark_remote

    try:
        remote = get_remote()
        if remote is not None:
            mark_remote(rows, remote)  # cached locally / on the remote / to be built
    except RemoteError as e:
        print(f"nest: status of the remote unknown: {e}", file=sys.stderr)
    width = max(len(s.task.label) for s in rows)
    for s in rows:
        head = f"{s.task.label:<{width}}  {s.task.key[:12]}  {s.state}"
        if s.state == "cached":
            print(head)
        elif s.state == "new":
            print(f"{head}: " + "; ".join(s.reasons))
        else:
            against = f" (vs {s.compared_with[:12]})" if s.compared_with else ""
            print(f"{head}{against}: " + "; ".join(s.reasons))
    stale = sum(s.state not in ("cached", "remote", "not needed") for s in rows)
    remote_n = sum(s.state == "remote" for s in rows)
    skipped = sum(s.state == "not needed" for s in rows)
    cached_n = len(rows) - stale - remote_n - skipped
    if remote_n or skipped:
        print(f"{cached_n} cached, {remote_n} on the remote, {stale} to build, {skipped} not needed")
    else:
        print(f"{cached_n} cached, {stale} to build")
    return 0


def cmd_show(args) -> int:
    from pipeline.config import get_store
    from pipeline.runs import human_bytes

    store = get_store()
    refs = store.find(args.key)
    if not refs:
        bad = [d for d in store.damaged() if d[1].startswith(args.key.lower())]
        if bad:
            stage, key, why = bad[0]
            raise CliError(f"show: {stage}/{key[:16]}: {why}: not complete (a build of it moves it aside and rebuilds)")
        raise CliError(f"show: no complete artifact with a key starting {args.key!r} in {store.root}")
    if len(refs) > 1:
        listing = ", ".join(f"{r.stage}/{r.key[:16]}" for r in refs[:10])
        raise CliError(f"show: {len(refs)} artifacts match {args.key!r} ({listing}); give more of the key")
    ref = refs[0]
    m = store.manifest(ref.stage, ref.key)
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
        print(f"stage      {m['stage']} (version {m.get('stage_version')})")
        print(f"key        {m['key']}")
        print(f"path       {ref.path}")
        print(f"created    {m.get('created_at')}  (built in {timings.get('build_s')} s)")
        print(f"size       {human_bytes(m.get('size', 0))} in {len(m['files'])} files")
        print(f"params     {json.dumps(m.get('params'), sort_keys=True, ensure_ascii=False)}")
        for name, i in sorted(m.get("inputs", {}).items()):
            print(f"input      {name}: {i['stage']}/{i['key']}")
        print(f"stats      {json.dumps(m.get('stats', {}), sort_keys=True, ensure_ascii=False)}")
        print(f"tools      {' '.join(f'{k}={v}' for k, v in sorted(m.get('tools', {}).items()))}")
    if args.verify:
        problems = store.verify(ref.stage, ref.key)
        if problems:
            for p in problems:
                print(f"verify: {p}", file=sys.stderr)
            return 1
        print(f"verify     ok ({len(m['files'])} files match the manifest)")
    return 0


def cmd_gc(args) -> int:
    from pipeline.config import get_store
    from pipeline.runs import apply_gc, human_bytes, plan_gc

    store = get_store()
    try:
        plan = plan_gc(store, args.keep)
    except RuntimeError as e:
        raise CliError(f"gc: {e}") from None
    for stage, key, path, size in plan.remove:
        kind = "" if path.name == key else " (crash leftover)"
        print(f"{'remove' if args.yes else 'would remove'}  {stage}/{key[:16]}{kind}  {human_bytes(size)}")
    verb = "removed" if args.yes else "would free"
    print(f"{len(plan.remove)} unreached ({verb} {human_bytes(plan.bytes)}); keeping {len(plan.keep)} artifacts "
          f"reached by {plan.kept_runs} recorded run(s)" + ("" if args.yes or not plan.remove else "; --yes removes them"))
    if args.yes:
        apply_gc(store, plan)
    return 0


def cmd_query(args) -> int:
    from pipeline import dag
    from pipeline.catalog import format_table, open_catalog, safe_text
    from pipeline.config import get_store

    cat = open_catalog(get_store(), task=args.task, preferred_tasks=list(dag.nest().tasks))
    if cat.task is not None and len(cat.tasks) > 1:
        print(f"(views examples, retrievals show task {cat.task!r}; --task all or --task NAME for others: "
              f"{', '.join(cat.tasks)})", file=sys.stderr)
    _read_only_sql(args.sql)
    try:
        cur = cat.con.execute(args.sql)
        if cur.description is None:  # not a query
            return 0
        columns = [d[0] for d in cur.description]
        rows = cur.fetchmany(args.max_rows + 1)
    except Exception as e:  # duckdb errors: one line, with the views that exist and the columns of those it names
        views = ", ".join(sorted(cat.views))
        columns = "".join(f"; columns of {v}: {', '.join(cols)}" for v, cols in _named_view_columns(cat, args.sql))
        raise CliError(safe_text(f"query: {str(e).splitlines()[0]} (views: {views}{columns})")) from None
    print(format_table(columns, rows[: args.max_rows]))
    if len(rows) > args.max_rows:
        print(f"... (first {args.max_rows} rows; --max-rows N for more)")
    return 0


def _named_view_columns(cat, sql: str) -> list[tuple[str, list[str]]]:
    """``(view, its column names)`` for each view the query names: a query that names a missing column, or a reserved
    word such as ``references`` (the examples view calls it ``refs``), is told which columns exist."""
    import re

    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    out = []
    for view in sorted(cat.views):
        if view.lower() not in words:
            continue
        try:
            out.append((view, [str(r[0]) for r in cat.con.execute(f'DESCRIBE "{view}"').fetchall()]))
        except Exception:  # a view that cannot be described adds nothing to the message
            continue
    return out


def _read_only_sql(sql: str) -> None:
    """Refuse, in one line, anything but queries (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN): ``nest query`` reads the
    store, it never writes into it (``COPY … TO`` a file inside the store would pass DuckDB's directory allowance)."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # a syntax error: DuckDB's own message comes from execute
    allowed = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
    for st in statements:
        if st.type not in allowed:
            raise CliError(f"query: read-only: {st.type.name} statements are refused (SELECT, DESCRIBE, SHOW, "
                           f"SUMMARIZE and EXPLAIN are allowed)")
        if st.type == duckdb.StatementType.EXPLAIN and _explained_type(st.query) != duckdb.StatementType.SELECT:
            # EXPLAIN ANALYZE runs its statement: EXPLAIN ANALYZE COPY … TO would write (the catalog also allows
            # no file access at all; this says why in one line)
            raise CliError("query: read-only: EXPLAIN is allowed of a query only (SELECT, DESCRIBE, SHOW, SUMMARIZE)")


def _explained_type(sql: str):
    """The statement type that an ``EXPLAIN [ANALYZE | (options)]`` statement explains; None when it cannot be told
    (then the statement is refused)."""
    import re

    import duckdb

    m = re.match(r"\s*EXPLAIN\s+(?:ANALYZE\s+|\([^()]*\)\s*)?", sql, flags=re.IGNORECASE)
    if not m:
        return None
    try:
        inner = duckdb.extract_statements(sql[m.end():])
    except duckdb.Error:
        return None
    return inner[0].type if len(inner) == 1 else None


def cmd_generate(args) -> int:
    from pipeline import config, dag

    if (args.prompt is None) == (args.file is None):
        raise CliError("generate: give one prompt, or --file PROMPTS.txt (one prompt per line), not both")
    _setup(args.profile, args.set)
    try:
        from pipeline.demo import DemoSession, read_prompts, run_demo, run_stream
    except ImportError as e:
        raise CliError(f"generate: the decoding demo is not available ({e})") from None
    prompts = read_prompts(args.file) if args.file is not None else None  # a bad file fails before any build
    prebuilt = config.config().get("PreRetrieve", "prebuilt_index", "")
    tasks = dag.demo_tasks(prebuilt)
    code = build(list(tasks.values()), profile=args.profile, command=["nest", *sys.argv[1:]], quiet=True)
    if code:
        return code
    # the grid's precedence (stages.evaluation.experiments.merge_config): the profile's [decoding] config, a prompt's
    # task overrides (applied per prompt by the session), the method's, then the command line's
    d = dag.decoding()
    flags = {k: getattr(args, k) for k in ("gamma", "alpha", "tau", "delta", "span_length", "max_new_tokens",
                                           "min_new_tokens", "passages") if getattr(args, k) is not None}
    pinned = merge_config(dag._plain(d.method_config).get(args.method, {}), flags)
    options = {**merge_config(dag._plain(d.config), pinned), "task_config": dag._plain(d.task_config),
               "stops": dag._plain(d.stops), "pinned": pinned, "stop": args.stop}
    where = dict(lm_dir=tasks["lm"].artifact_dir, passages_dir=tasks["passages"].artifact_dir,
                 tokens_dir=tasks["tokens"].artifact_dir, bm25_dir=tasks["bm25"].artifact_dir,
                 dense_dir=tasks["dense"].artifact_dir, encoder=dag.encoder_param().value, method=args.method,
                 options=options)
    if prompts is None and not args.json and not args.html:
        print(run_demo(args.prompt, **where))
        return 0
    session = DemoSession.load(**where)
    answers: list = []
    run_stream(session, prompts if prompts is not None else [args.prompt], as_json=args.json,
               on_answer=(lambda *a: answers.append(a)) if args.html else None)
    if args.html:
        from stages.decoding.registry import method_info
        from stages.evaluation.html_report import demo_page

        provenance = {"profile": args.profile or "embedded", "inputs": {n: t.key for n, t in tasks.items()},
                      "decoding": json.dumps(options, sort_keys=True, default=str)}
        path = demo_page(args.html, answers, session.tokenizer, args.method, method_info(args.method).label,
                         provenance)
        print(f"(viewer: {_shown_path(path)})", file=sys.stderr)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    from stages.decoding.registry import method_names  # torch-free: the methods' files are read, not imported

    ap = argparse.ArgumentParser(prog="nest", description="NEST reproduction pipeline (content-addressed Luigi stages).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def profile_opts(p, with_set=True):
        p.add_argument("--profile", default=None, help="embedded (default: luigi.cfg as is) or full (the paper's setting)")
        if with_set:
            p.add_argument("--set", action="append", default=[], metavar="Stage.param=value",
                           help="override one parameter (repeatable), e.g. --set BuildBM25Index.k1=1.2")

    def force_opt(p):
        p.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rebuild STAGE (repeatable) and every stage that depends on it; the old artifacts are "
                            "moved aside (nest gc removes them)")

    def workers_opts(p, need_url=False):
        p.add_argument("--workers", type=int, default=1, metavar="N",
                       help="N Luigi worker processes on this machine, each with [resources] threads // N threads "
                            "(default 1)")
        p.add_argument("--scheduler-url", default=None, required=need_url, metavar="URL",
                       help="a running luigid (e.g. http://127.0.0.1:8082) instead of the local scheduler; workers "
                            "share artifacts through [nest] remote (or one shared store)")

    p = sub.add_parser("all", help="build the whole DAG")
    profile_opts(p)
    force_opt(p)
    workers_opts(p)
    p.set_defaults(fn=cmd_all)

    p = sub.add_parser("worker", help="work for a running luigid until the DAG is done (on any number of machines)")
    profile_opts(p)
    workers_opts(p, need_url=True)
    p.add_argument("--assistant", action="store_true",
                   help="take any runnable task of the scheduler (Luigi's assistant), not only this DAG's; stays "
                        "until stopped")
    p.add_argument("luigi_args", nargs=argparse.REMAINDER,
                   help="optional StageName and Luigi parameters (default: the DAG of `nest all`)")
    p.set_defaults(fn=cmd_worker, force=[])

    p = sub.add_parser("run", help="build one stage (and what it needs): nest run StageName --param value",
                       prefix_chars="-", add_help=True)
    profile_opts(p)
    force_opt(p)
    workers_opts(p)
    p.add_argument("luigi_args", nargs=argparse.REMAINDER, help="StageName and Luigi parameters")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("status", help="cached stages, and why the others would rerun")
    profile_opts(p)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("show", help="an artifact's manifest")
    p.add_argument("key", help="a key or a unique prefix of one")
    p.add_argument("--verify", action="store_true", help="check every file's size and sha256 against the manifest")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("gc", help="remove artifacts no recorded run reaches (dry run unless --yes)")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="keep what the latest N runs reached (default: all)")
    p.add_argument("--yes", action="store_true", help="really remove")
    p.set_defaults(fn=cmd_gc)

    p = sub.add_parser("query", help="SQL (DuckDB) over manifests and the latest run's outputs")
    p.add_argument("sql")
    p.add_argument("--task", default=None, help="task shown by examples/retrievals (default: the first configured; all)")
    p.add_argument("--max-rows", type=int, default=100)
    p.set_defaults(fn=cmd_query)

    p = sub.add_parser("report", help="print the latest run's report (Markdown)")
    p.add_argument("--path", action="store_true", help="print only the report's path")
    p.add_argument("--html", action="store_true",
                   help="print the path of the HTML report (report.html: tables, charts, the example browser)")
    p.add_argument("--profile", default=None)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("generate", help="decode a prompt (or a file of prompts) with NEST or a baseline, with attribution")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--file", default=None, metavar="PROMPTS.txt",
                   help="one prompt per line, answered in one process (models and indexes loaded once)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt on stdout (tokens, seconds, components, text, sources); "
                        "start-up and the stream's summary as JSON lines on stderr")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write the answers to FILE as the report's viewer: copied spans lead to their passages, "
                        "the retrieved passages listed, the ones copied from marked")
    p.add_argument("--method", default="nest", choices=method_names(),
                   help="a registered decoding method (a file of stages/decoding/methods/)")
    p.add_argument("--gamma", type=float, help="γ, leniency of relaxed speculative decoding")
    p.add_argument("--alpha", type=float, help="α, RRC offset")
    p.add_argument("--tau", type=float, help="τ, RRC temperature")
    p.add_argument("--delta", type=float, help="δ, span selection threshold")
    p.add_argument("--span-length", type=int, dest="span_length", help="n, longest drafted span")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--min-new-tokens", type=int, dest="min_new_tokens",
                   help="suppress EOS, the stop rule and the article's end until N tokens (with --max-new-tokens N: "
                        "every method writes exactly N, for speed on equal work)")
    p.add_argument("--stop", choices=("none", "paragraph", "blank_line", "sentence"),
                   help="the answer's stop rule (default: its task family's; a question ends with its first sentence)")
    p.add_argument("--passages", type=int, help="b, passages retrieved for the prompt")
    profile_opts(p)
    p.set_defaults(fn=cmd_generate)

    from pipeline.remote_cli import add_parsers

    add_parsers(sub, profile_opts)
    return ap


_NOTE_DAMAGED = ("gc", "query", "push")  # show names the damaged artifact itself


def note_damaged(command: str) -> None:
    """One line on stderr when artifacts of the store have a damaged ``manifest.json``: they count as absent (a build
    moves them aside and rebuilds them), so gc, show, query and push skip them instead of failing on them."""
    from pipeline.config import get_store

    try:
        bad = get_store().damaged()
    except OSError:
        return
    if bad:
        stage, key, why = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        print(f"nest {command}: skipping {stage}/{key[:12]}{more}: {why}; not complete (`nest run` moves it aside and "
              f"rebuilds it)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if argv is None and args.command in ("all", "run", "worker"):  # the `nest` process owns its subtree
        from pipeline.stopping import become_subreaper

        become_subreaper()
    try:
        if args.command in _NOTE_DAMAGED:
            note_damaged(args.command)
        return args.fn(args)
    except _input_error_types() as e:
        print(f"nest: {e}", file=sys.stderr)
        return _EXIT_INPUT
    except _remote_error_types() as e:  # unreachable remote, refused pull: one line, exit 1
        print(f"nest: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m pipeline.cli: run the imported module's main, so that the errors other modules
    # raise (pipeline.cli.CliError, imported by remote_cli) are the classes main catches, not __main__'s copies
    from pipeline.cli import main as _main

    sys.exit(_main())
