"""Many workers on Luigi's schedulers: worker processes, thread budgets, resources, distributed mode.

Nothing here schedules: Luigi does. ``nest all --workers N`` hands ``workers=N`` to ``luigi.build`` (N worker
processes under the local scheduler); ``--scheduler-url`` connects to a running ``luigid`` instead; ``nest worker``
connects to one and stays until the DAG it was given is done (Luigi's ``keep_alive``), taking whatever the scheduler
hands it. Luigi guarantees that one task runs in one worker at a time.

- **Thread budget.** With N worker processes on a machine, each stage runs with ``threads // N`` torch/OpenMP threads,
  ``threads`` being ``[resources] threads`` of this machine's luigi.cfg (default: its CPU count), so that N workers do
  not oversubscribe the cores. The budget travels in ``$NEST_THREADS`` (inherited by Luigi's forked worker processes)
  and is applied by :func:`apply_thread_budget` as a stage starts. It is a resource, not part of any key.
- **Resources.** Each task declares Luigi ``resources`` (:func:`task_resources`): ``gpu: 1`` for the LM stages on a
  machine with CUDA, ``lucene: 1`` for the stages that open a Lucene index, whatever ``[stage_resources] needs`` adds
  (e.g. ``memory_gib``), and ``threads`` under the local scheduler when ``[resources] threads`` is set. The scheduler
  (local, or ``luigid`` with the ``[resources]`` section of *its* luigi.cfg) never runs more of a resource at once than
  its limit; a resource without a limit counts as 1 (Luigi's rule).
- **Distributed mode** (``--scheduler-url``, ``nest worker``): each worker has its own local store and shares a remote
  (``[nest] remote``). ``complete()`` counts an artifact on the remote as done without pulling it; a stage pulls its
  inputs just before it runs and pushes its output right after (before the scheduler hears it is done), so the worker
  that runs a dependent always finds its inputs on the remote. ``remote_mode`` becomes ``both``. Without a remote the
  workers must share one store (a shared file system).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings
from typing import Any

import luigi
from luigi.parameter import UnconsumedParameterWarning

from pipeline.engine.config import DISTRIBUTED_ENV, config
from pipeline.sharing.protocol import remote_mode, remote_url

THREADS_ENV = "NEST_THREADS"          # this worker process's thread budget
SCHEDULER_ENV = "NEST_SCHEDULER"      # "local" or the luigid URL (for resources that only the local scheduler limits)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


class stage_resources(luigi.Config):  # noqa: N801  (Luigi names config classes after their luigi.cfg section)
    """``[stage_resources]``: more Luigi resources per stage, on top of gpu/lucene, e.g.
    ``needs = {"BuildDenseIndex": {"memory_gib": 48}}``; give each one a limit in ``[resources]`` (luigid's and local)."""

    needs = luigi.DictParameter(description="{Stage: {resource: amount}} declared by every task of Stage")


# ---- thread budget ---------------------------------------------------------------------------------------------------

def machine_threads() -> int:
    """``[resources] threads`` of this machine's configuration, else its CPU count."""
    value = config().getint("resources", "threads", 0)
    return value if value and value > 0 else (os.cpu_count() or 1)


def thread_budget(workers: int) -> int:
    return max(1, machine_threads() // max(1, workers))


def set_thread_budget(workers: int) -> int | None:
    """Give every stage of this process and its worker processes ``threads // workers`` threads (``$NEST_THREADS``).
    One worker without ``[resources] threads`` changes nothing (the libraries' own defaults)."""
    if workers <= 1 and not config().getint("resources", "threads", 0):
        os.environ.pop(THREADS_ENV, None)
        return None
    n = thread_budget(workers)
    os.environ[THREADS_ENV] = str(n)
    return n


def apply_thread_budget() -> int | None:
    """Called as a stage starts (in its worker process): OpenMP/MKL/BLAS variables for libraries not loaded yet, and
    ``torch.set_num_threads`` / FAISS's OpenMP for those already loaded."""
    raw = os.environ.get(THREADS_ENV)
    if not raw:
        return None
    n = max(1, int(raw))
    for var in _THREAD_VARS:
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(n)
    return n


def die_with_parent() -> None:
    """In a Luigi worker's forked task process: die when the worker dies (``kill -9`` of a worker must not leave an
    orphan that keeps building a stage the scheduler hands to another worker). Linux only; a no-op elsewhere."""

    if multiprocessing.parent_process() is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl
            os._exit(1)
    except (OSError, AttributeError):
        pass


# ---- resources -------------------------------------------------------------------------------------------------------

def cuda_present() -> bool:
    """Whether this machine shows a CUDA device (without importing torch). ``$NEST_GPU`` = 0/1 overrides."""
    forced = os.environ.get("NEST_GPU")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


# stages that run the LM or an encoder (a GPU when there is one), and stages that open a Lucene index (a JVM)
GPU_STAGES = {"EncodePassages", "EncodePassageKeys", "Generate", "Perplexity"}


def _uses_lucene(task) -> bool:
    """The BM25 index stage, and every stage that reads a BM25 index (PreRetrieve in a mode that uses it, a judged
    Score): inputs are named after what they are, so the index is the input named ``bm25``."""
    return task.stage == "BuildBM25Index" or "bm25" in task.inputs()


def task_resources(task) -> dict[str, int]:
    """The Luigi resources ``task`` holds while it runs (see the module docstring)."""
    out: dict[str, int] = {}
    try:
        merging = bool(task.build_requires())  # a sharded stage's merge reads its shards' files: no GPU, no Lucene
    except Exception:
        merging = False
    if task.stage in GPU_STAGES and cuda_present() and not merging:
        out["gpu"] = 1
    try:
        if _uses_lucene(task) and not merging:
            out["lucene"] = 1
    except Exception:  # a task whose inputs cannot be built yet: its own run reports that
        pass
    extra = stage_resources().needs
    for name, amount in (extra.get(task.stage) or {}).items():
        out[str(name)] = int(amount)
    threads = os.environ.get(THREADS_ENV)
    if threads and os.environ.get(SCHEDULER_ENV, "local") == "local" and config().getint("resources", "threads", 0):
        out["threads"] = int(threads)
    return out


def unlimited(resources: dict[str, int]) -> list[str]:
    """Resources declared with more than 1 unit and no limit in this machine's ``[resources]``: Luigi would never run
    such a task (an unset limit is 1)."""
    limits = config().getintdict("resources") if config().has_section("resources") else {}
    return [name for name, amount in resources.items() if amount > 1 and name not in limits]


# ---- distributed mode ------------------------------------------------------------------------------------------------

def enter_distributed(scheduler_url: str) -> str | None:
    """Switch this process (and its workers) to distributed mode; returns a one-line note, or None."""
    os.environ[DISTRIBUTED_ENV] = "1"
    os.environ[SCHEDULER_ENV] = scheduler_url
    _quiet_rpc()
    if remote_url() is None or remote_mode() == "off":  # off: the workers share one store (a shared file system)
        return None
    if remote_mode() != "both":
        note = f"remote_mode {remote_mode()} -> both (a worker pulls the inputs it runs on and pushes what it builds)"
        _saved_mode.setdefault("NEST_REMOTE_MODE", os.environ.get("NEST_REMOTE_MODE"))
        os.environ["NEST_REMOTE_MODE"] = "both"
        return note
    return None


_saved_mode: dict[str, str | None] = {}


def enter_local() -> None:
    """Back to one machine (a process that ran a distributed build before, e.g. a test)."""
    os.environ.pop(DISTRIBUTED_ENV, None)
    os.environ[SCHEDULER_ENV] = "local"
    if "NEST_REMOTE_MODE" in _saved_mode:
        old = _saved_mode.pop("NEST_REMOTE_MODE")
        if old is None:
            os.environ.pop("NEST_REMOTE_MODE", None)
        else:
            os.environ["NEST_REMOTE_MODE"] = old


def _quiet_rpc() -> None:
    """A lost scheduler is one line from the CLI, not Luigi's traceback per retry (nor a warning that [core]'s rpc
    options belong to no task: the RPC client reads them directly)."""


    warnings.filterwarnings("ignore", message=r".*not consumed by the task 'core'", category=UnconsumedParameterWarning)
    cfg = config()
    if not cfg.has_section("core"):
        cfg.add_section("core")
    if not cfg.has_option("core", "rpc-log-retries"):
        cfg.set("core", "rpc-log-retries", "false")


def scheduler_kwargs(workers: int, scheduler_url: str | None, *, assistant: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``luigi.build`` for the local scheduler or a ``luigid``."""
    kw: dict[str, Any] = {"workers": max(1, int(workers))}
    if scheduler_url:
        kw["scheduler_url"] = scheduler_url
        kw["local_scheduler"] = False
        if assistant:
            kw["assistant"] = True
    else:
        kw["local_scheduler"] = True
    return kw


@contextlib.contextmanager
def worker_options(*, keep_alive: bool):
    """``keep_alive``: the worker stays while its DAG has pending tasks (some running elsewhere), for ``nest worker``;
    the configuration's own value is restored afterwards."""
    cfg = config()
    if not keep_alive:
        yield
        return
    had = cfg.has_section("worker") and cfg.has_option("worker", "keep_alive")
    old = cfg.get("worker", "keep_alive") if had else None
    if not cfg.has_section("worker"):
        cfg.add_section("worker")
    cfg.set("worker", "keep_alive", "true")
    try:
        yield
    finally:
        if had:
            cfg.set("worker", "keep_alive", old)
        else:
            cfg.remove_option("worker", "keep_alive")
