"""Clean stops of a build: SIGINT or SIGTERM ends ``nest run``/``nest all`` at once and cleanly.

A batch scheduler's time limit, ``timeout`` or Ctrl-C must not leave Luigi scheduling stage after stage in a
half-torn-down process (each failing with a traceback), nor orphans (Luigi's forked workers, the Lucene indexer's JVM)
writing into a dead build's temp folder. :func:`stop_on_signals` wraps the Luigi run of :func:`pipeline.cli.build`:

- on the first SIGINT/SIGTERM, the process that called it (the *run*) ignores further ones, kills every process below
  it (Luigi's worker processes, the stages' children: the JVM indexer), waits until they are gone, removes the temp
  folders they or it were building into (``.tmp-<key>-<pid>-…``, named by pid), records the run, prints **one line**
  (what was built, what a rerun does) and exits with ``128 + signal`` (130, 143) without running Python's shutdown
  (no tracebacks from threads or pools torn down half-way);
- a forked Luigi worker inherits the handler: on its own signal (a Ctrl-C reaches the whole process group) it kills its
  own children, removes its own temp folders and exits silently; the run says what happened.

Nothing here decides what a stage writes: an abandoned stage leaves no artifact (its manifest was never written), so a
rerun builds it again, and what was built stays cached.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_TMP_PID = re.compile(r"\.tmp-[0-9a-f]{64}-(\d+)-[0-9a-f]+")


def descendants(pid: int | None = None) -> list[int]:
    """Every living process below ``pid`` (default: this one), children first."""
    import psutil

    try:
        procs = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in procs]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_tree(pid: int | None = None, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process below ``pid`` (default: this one) and wait (at most ``timeout`` s) until each is gone;
    reap this process's own children. Returns the pids killed. Walked again until nothing new appears, so that a
    process forked during the walk is caught too."""
    killed: list[int] = []
    for _ in range(5):
        fresh = [p for p in descendants(pid) if p not in killed]
        if not fresh:
            break
        for p in fresh:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        killed.extend(fresh)
    deadline = time.monotonic() + timeout
    for p in killed:
        while True:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p, os.WNOHANG)  # our own children: reaped, not left as zombies
            if not _alive(p) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    return killed


def remove_temp_folders(root: Path, pids: set[int]) -> list[Path]:
    """Remove the store's temp folders (``<Stage>/.tmp-<key>-<pid>-<hex>``) that the processes ``pids`` built into."""
    removed = []
    try:
        stage_dirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return removed
    for d in stage_dirs:
        with contextlib.suppress(OSError):
            for p in d.iterdir():
                m = _TMP_PID.fullmatch(p.name)
                if m and int(m.group(1)) in pids and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


_reaper = {"on": False}


def become_subreaper() -> bool:
    """Make this process (the ``nest`` command) the reaper of its orphans (Linux ``PR_SET_CHILD_SUBREAPER``): a
    stage's child whose Luigi worker was killed is re-parented here instead of to init, so that :func:`stop_on_signals`
    finds it, and kills it, when the run ends. Only for a process that owns its whole subtree (not a test runner)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        _reaper["on"] = ctypes.CDLL(None, use_errno=True).prctl(36, 1) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        _reaper["on"] = False
    return _reaper["on"]


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def stop_on_signals(store_root: Path, on_stop: Callable[[str, list[Path]], str]) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM stop the run as the module docstring says. ``on_stop(signal name, temp folders
    removed)`` records the run and returns the one line to print. The previous handlers are restored on exit."""
    owner = os.getpid()

    def handler(signum, _frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the clean-up
        killed = kill_tree()
        pids = {os.getpid(), *killed}
        removed = remove_temp_folders(store_root, pids)
        if os.getpid() == owner:
            name = signal.Signals(signum).name
            try:
                line = on_stop(name, removed)
            except BaseException as e:  # the stop itself must not end in a traceback
                line = f"nest: stopped by {name} (the run could not be recorded: {e}); run the same command again"
            _flush_stdio()
            print(line, file=sys.stderr, flush=True)
        _flush_stdio()
        os._exit(128 + signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    installed = False
    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        for s in SIGNALS:
            signal.signal(s, handler)
        installed = True
    try:
        yield
    finally:
        if os.getpid() == owner:
            if installed:
                for s, h in previous.items():
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
            if _reaper["on"]:  # Luigi's workers are done: whatever is still below us was left by a dead one
                left = kill_tree()
                if left:
                    print(f"[nest] killed {len(left)} process(es) left behind by a dead worker", file=sys.stderr,
                          flush=True)
