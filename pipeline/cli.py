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
import importlib
import json
import sys
from pathlib import Path
from typing import Sequence

from luigi.cmdline_parser import CmdlineParser
from luigi.task_register import TaskClassException

from pipeline import dag, remote_cli, store_cli
from pipeline.engine import config
from pipeline.engine.config import get_store
from pipeline.engine.errors import EXIT_INPUT, INPUT_ERRORS, CliError  # noqa: F401  (CliError: cli.CliError)
from pipeline.engine.params import ConfigError, check_value, plain
from pipeline.engine.runner import build
from pipeline.engine.stopping import become_subreaper
from pipeline.session import setup
from pipeline.sharing.planning import mark_remote
from pipeline.sharing.remote import RemoteError, get_remote
from pipeline.sharing.through import pull_now
from pipeline.status import dag_status
from pipeline.storage.archive import ArchiveError
from pipeline.storage.runs import latest_run_with
from stages.decoding.registry import method_info, method_names  # torch-free: the methods' files are read
from stages.evaluation.experiments import merge_config

REMOTE_ERRORS = (RemoteError, ArchiveError)  # an unreachable remote, a refused pull: one line, exit 1


# ---- commands ----------------------------------------------------------------------------------------------------------

def cmd_all(args) -> int:
    setup(args.profile, args.set)
    rc = build([dag.All()], profile=args.profile, command=["nest", *sys.argv[1:]], force=args.force,
               workers=args.workers, scheduler_url=args.scheduler_url)
    if rc == 0 and args.scheduler_url:
        _pull_report(dag.Report())  # built by another worker: on the remote only
    report = latest_report_path()
    if rc == 0 and report is not None:
        print(f"report: {_shown_path(report)}  (print it with `nest report`)")
    return rc


def _pull_report(task) -> None:
    if not task.store.complete(task.stage, task.key):
        pull_now(task)


def cmd_worker(args) -> int:
    """``nest worker``: connect to a running ``luigid`` and run whatever part of the DAG it hands out (the DAG of
    ``nest all``, or the stage named after the options), until all of it is done. Every worker must see the same
    configuration (luigi.cfg, ``--profile``, ``--set``): the same tasks then have the same keys."""

    luigi_args = _split_run_args(list(args.luigi_args), args)
    if luigi_args:
        return _run_task(luigi_args, args, keep_alive=True, assistant=args.assistant)
    setup(args.profile, args.set)
    roots = [] if args.assistant else [dag.All()]
    return build(roots, profile=args.profile, command=["nest", *sys.argv[1:]], workers=args.workers,
                 scheduler_url=args.scheduler_url, keep_alive=True, assistant=args.assistant)


def latest_report_path():
    """``report.md`` of the newest Report artifact of the latest recorded run that reached one (a later ``nest generate``
    or ``nest run`` does not hide it), or None."""

    store = get_store()
    run = latest_run_with(store, "Report") or {}
    keys = [r["key"] for r in run.get("reached", []) if r.get("stage") == "Report"]
    for key in keys:
        path = store.path("Report", key) / "report.md"
        if path.is_file():
            return path
    return None


def _shown_path(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_report(args) -> int:
    setup(args.profile)
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

    class _Exact(CmdlineParser):
        @staticmethod
        def _build_parser(root_task=None, help_all=False):
            parser = CmdlineParser._build_parser(root_task=root_task, help_all=help_all)
            parser.allow_abbrev = False
            return parser

    return _Exact(luigi_args)


def _import_modules(luigi_args: Sequence[str]) -> None:
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
    _import_modules(luigi_args)  # `--module M` first: its task classes may be named by --set and the config check
    setup(args.profile, args.set)
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
    setup(args.profile, args.set)
    store = get_store()
    rows = dag_status([dag.All()], store)

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


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise CliError("generate: give one prompt, or --file PROMPTS.txt (one prompt per line), not both")
    setup(args.profile, args.set)
    try:
        from pipeline.demo import DemoSession, read_prompts, run_demo, run_stream  # lazy: optional, with the decoding demo
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
    pinned = merge_config(plain(d.method_config).get(args.method, {}), flags)
    options = {**merge_config(plain(d.config), pinned), "task_config": plain(d.task_config),
               "stops": plain(d.stops), "pinned": pinned, "stop": args.stop}
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
        provenance = {"profile": args.profile or "embedded", "inputs": {n: t.key for n, t in tasks.items()},
                      "decoding": json.dumps(options, sort_keys=True, default=str)}
        from stages.evaluation.html_report import demo_page  # lazy: start-up time (pyarrow)

        path = demo_page(args.html, answers, session.tokenizer, args.method, method_info(args.method).label,
                         provenance)
        print(f"(viewer: {_shown_path(path)})", file=sys.stderr)
    return 0


# ---- parser ------------------------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nest", description="NEST reproduction pipeline (content-addressed Luigi stages).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build_parsers(sub)
    store_cli.add_parsers(sub)
    _add_report_parser(sub)
    _add_generate_parser(sub)
    remote_cli.add_parsers(sub, profile_opts)
    return ap


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



def _add_build_parsers(sub) -> None:
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


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="print the latest run's report (Markdown)")
    p.add_argument("--path", action="store_true", help="print only the report's path")
    p.add_argument("--html", action="store_true",
                   help="print the path of the HTML report (report.html: tables, charts, the example browser)")
    p.add_argument("--profile", default=None)
    p.set_defaults(fn=cmd_report)


def _add_generate_parser(sub) -> None:
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


_NOTE_DAMAGED = ("gc", "query", "push")  # show names the damaged artifact itself


def note_damaged(command: str) -> None:
    """One line on stderr when artifacts of the store have a damaged ``manifest.json``: they count as absent (a build
    moves them aside and rebuilds them), so gc, show, query and push skip them instead of failing on them."""
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
        become_subreaper()
    try:
        if args.command in _NOTE_DAMAGED:
            note_damaged(args.command)
        return args.fn(args)
    except INPUT_ERRORS as e:
        print(f"nest: {e}", file=sys.stderr)
        return EXIT_INPUT
    except REMOTE_ERRORS as e:  # unreachable remote, refused pull: one line, exit 1
        print(f"nest: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m pipeline.cli: run the imported module's main, so that the errors other modules
    # raise (pipeline.cli.CliError, imported by remote_cli) are the classes main catches, not __main__'s copies
    from pipeline.cli import main as _main

    sys.exit(_main())
