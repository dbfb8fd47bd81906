"""``nest push`` and ``nest pull``: share artifacts through the remote store (``pipeline.sharing.remote``).

    nest push [STAGE|KEY-PREFIX ...] [--all] [--remote URL] [--verify] [--force] [--clean-stale HOURS]
        no argument: what the latest recorded run reached; STAGE: every complete local artifact of that stage;
        KEY-PREFIX: the artifacts whose key starts with it; --all: every complete artifact of the store.
        A remote copy whose manifest is unreadable or whose archive is missing or of the wrong size is replaced;
        --verify also reads every remote copy whole and reports damage (exit 1); --force replaces the remote copies
        (with --verify: the damaged ones); --clean-stale removes what killed pushes left, older than HOURS.
    nest pull [STAGE|KEY-PREFIX ...] [--all] [--remote URL] [--profile P] [--set ...]
        no argument: what `nest all` would otherwise build (a stage on the remote stops the walk: what it was built
        from is not fetched); STAGE / KEY-PREFIX: those artifacts of the remote; --all: the whole remote.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time

from pipeline import dag
from pipeline.engine.config import get_store
from pipeline.engine.errors import CliError
from pipeline.engine.runlog import closure
from pipeline.session import setup
from pipeline.sharing.planning import needed_from, transfer
from pipeline.sharing.remote import Remote, RemoteError, get_remote
from pipeline.storage.runs import human_bytes, latest_run
from pipeline.storage.store import Store

_HEX = set("0123456789abcdef")


def _remote(args) -> Remote:
    try:
        remote = get_remote(args.remote)
    except RemoteError as e:
        raise CliError(str(e)) from None
    if remote is None:
        raise CliError(f"{args.command}: no remote configured: set [nest] remote in luigi.cfg, $NEST_REMOTE, "
                       f"or pass --remote URL")
    return remote


def _is_prefix(text: str) -> bool:
    return bool(text) and set(text.lower()) <= _HEX


class Terminated(SystemExit):
    """SIGTERM during a transfer: unwinds like an exception, so that a push aborts its S3 multipart upload and removes
    its temp file on a folder remote (``kill -9`` cannot be caught: ``nest push --clean-stale`` removes what it
    leaves)."""


@contextlib.contextmanager
def _term_unwinds():
    def raise_exit(signum, frame):
        raise Terminated(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, raise_exit) if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else None
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def push_targets(store: Store, names: list[str], everything: bool) -> list[tuple[str, str]]:
    """The complete local artifacts ``nest push`` sends (see the module docstring)."""
    if everything:
        return [(r.stage, r.key) for r in store.folders() if store.complete(r.stage, r.key)]
    if not names:
        run = latest_run(store)
        if run is None:
            raise CliError("push: no recorded run in the store; name stages or key prefixes, or use --all")
        return [(r["stage"], r["key"]) for r in run.get("reached", []) if store.complete(r["stage"], r["key"])]
    out: list[tuple[str, str]] = []
    stages = set(store.stages())
    for name in names:
        if name in stages:
            found = [(r.stage, r.key) for r in store.folders(name) if store.complete(r.stage, r.key)]
        elif _is_prefix(name):
            found = [(r.stage, r.key) for r in store.find(name)]
        else:
            raise CliError(f"push: {name!r} is neither a stage of the store ({', '.join(sorted(stages)) or 'none'}) "
                           f"nor a key prefix")
        if not found:
            raise CliError(f"push: no complete artifact matches {name!r} in {store.root}")
        out.extend(r for r in found if r not in out)
    return out


def pull_targets(remote: Remote, store: Store, names: list[str], everything: bool) -> list[tuple[str, str]]:
    """The remote artifacts ``nest pull`` fetches (see the module docstring), minus those already local."""
    if everything:
        refs = remote.list()
    elif not names:
        tasks = closure([dag.All()])
        on_remote = {t.task_id for t in tasks if not store.complete(t.stage, t.key) and remote.has(t.stage, t.key)}
        pull, _build = needed_from(tasks, lambda t: store.complete(t.stage, t.key), lambda t: t.task_id in on_remote)
        refs = [(t.stage, t.key) for t in tasks if t.task_id in pull]
    else:
        listing = remote.list()
        refs = []
        for name in names:
            if _is_prefix(name):
                found = [r for r in listing if r[1].startswith(name.lower())]
            else:
                found = [r for r in listing if r[0] == name]
            if not found:
                raise CliError(f"pull: nothing on the remote {remote.shown} matches {name!r}")
            refs.extend(r for r in found if r not in refs)
    return [r for r in refs if not store.complete(*r)]


def cmd_push(args) -> int:
    setup(None)
    store = get_store()
    remote = _remote(args)
    only_clean = args.clean_stale is not None and not args.targets and not args.all
    refs = [] if only_clean else push_targets(store, args.targets, args.all)
    t0 = time.perf_counter()

    def sizes(stage, key):
        return (store.manifest(stage, key) or {}).get("size")

    if args.clean_stale is not None:
        try:
            gone = remote.clean_stale(args.clean_stale)
        except RemoteError as e:
            raise CliError(str(e)) from None
        print(f"removed {len(gone)} stale upload(s) older than {args.clean_stale:g} h from {remote.shown}"
              + (f": {', '.join(gone[:5])}" + (" …" if len(gone) > 5 else "") if gone else ""))
        if not refs:
            return 0
    with _term_unwinds():
        results, errors = transfer(refs, lambda s, k, p: remote.push(store, s, k, verify=args.verify,
                                                                     force=args.force, progress=p), sizes, "push")
    for stage, key, r in results:
        if r is not None and r.get("replaced") and r["replaced"] != "forced":
            print(f"nest: replaced a damaged remote copy: {r['replaced']}", file=sys.stderr)
    sent = [r for r in results if r[2] is not None]
    raw = sum(r[2]["bytes"] for r in sent)
    packed = sum(r[2]["size"] for r in sent)
    secs = time.perf_counter() - t0
    print(f"pushed {len(sent)} artifact(s) ({human_bytes(raw)} as {human_bytes(packed)} of .tar.zst), "
          f"{len(results) - len(sent)} already on {remote.shown}, in {secs:.1f} s")
    for line in errors:
        print(f"nest: {line}", file=sys.stderr)
    return 1 if errors else 0


def cmd_pull(args) -> int:
    setup(args.profile, args.set)
    store = get_store()
    remote = _remote(args)
    try:
        remote.check_exists()
        refs = pull_targets(remote, store, args.targets, args.all)
    except RemoteError as e:
        raise CliError(str(e)) from None
    for line in remote.refused:  # crafted names in the listing: left out, told once each
        print(f"nest: {line}", file=sys.stderr)
    t0 = time.perf_counter()
    docs: dict = {}

    def sizes(stage, key):
        docs[(stage, key)] = doc = remote.manifest(stage, key)
        return doc["remote"]["archive"]["size"] if doc else None

    with _term_unwinds():
        results, errors = transfer(refs, lambda s, k, p: remote.pull(store, s, k, progress=p, doc=docs.get((s, k))),
                                   lambda s, k: _safe_size(sizes, s, k), "pull")
    raw = sum((docs.get((s, k)) or {}).get("size", 0) for s, k, _ in results)
    secs = time.perf_counter() - t0
    print(f"pulled {len(results)} artifact(s) ({human_bytes(raw)}) from {remote.shown} in {secs:.1f} s")
    for line in errors:
        print(f"nest: {line}", file=sys.stderr)
    return 1 if errors or remote.refused else 0


def _safe_size(sizes, stage, key):
    try:
        return sizes(stage, key)
    except RemoteError:
        return None  # the pull itself reports it in one line


def add_parsers(sub, profile_opts) -> None:
    """Register ``push`` and ``pull`` on the ``nest`` sub-command parser."""
    p = sub.add_parser("push", help="send artifacts to the remote store (default: what the latest run reached)")
    p.add_argument("targets", nargs="*", metavar="STAGE|KEY-PREFIX")
    p.add_argument("--all", action="store_true", help="every complete artifact of the store")
    p.add_argument("--remote", default=None, metavar="URL", help="this remote instead of [nest] remote / $NEST_REMOTE")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every file against its manifest while packing (refuse to send a corrupt one), and "
                        "read every copy already on the remote whole, reporting damage")
    p.add_argument("--force", action="store_true",
                   help="replace the remote copies (with --verify: only the damaged ones)")
    p.add_argument("--clean-stale", type=float, default=None, metavar="HOURS",
                   help="first remove temp files (folder remote) or incomplete multipart uploads (S3) that killed "
                        "pushes left, older than HOURS")
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser("pull", help="fetch artifacts from the remote store (default: what `nest all` needs)")
    p.add_argument("targets", nargs="*", metavar="STAGE|KEY-PREFIX")
    p.add_argument("--all", action="store_true", help="every artifact of the remote")
    p.add_argument("--remote", default=None, metavar="URL", help="this remote instead of [nest] remote / $NEST_REMOTE")
    profile_opts(p)
    p.set_defaults(fn=cmd_pull)
