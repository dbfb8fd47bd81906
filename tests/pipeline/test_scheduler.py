"""Many workers on Luigi's schedulers, on the loopback interface.

A fixture starts ``luigid`` on 127.0.0.1 (a free port, its state and logs in a temp folder) with short heartbeats; two
``nest worker`` processes, each with its own local store, share a folder remote and build a small sharded fake DAG
(tests/scheduler_fakes.py). Checked: every stage built exactly once across the workers, the keys and the report bytes
of a single-process run; ``kill -9`` of a worker in the middle of a shard (the other takes it over once the dead one's
heartbeat lapses); ``luigid`` killed (workers stop with one line, the rerun finishes); and, under the local scheduler,
``--workers 2`` with its thread budget.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from luigi.task_register import Register

from pipeline.engine.runlog import RUN_LOG
from pipeline_conftest_helpers import PROJECT
from scheduler_fakes import write_shard_stage, write_sized_stage

TESTS = Path(__file__).resolve().parent
ROOT = ["ShAll", "--module", "scheduler_fakes"]
STAGES = {"ShSource", "ShShard", "ShReport"}
N_TASKS = 6  # source, 4 shards, report

# short heartbeats: a lost scheduler is given up after ~2 s. A dead worker's task is handed out again after
# worker_disconnect_delay: 3 s in the tests that kill a worker (marker ``handover``), 20 s elsewhere, so that a live
# worker whose pings are late on a loaded machine is never taken for dead (its task would then run twice)
TEST_CFG = """
[core]
rpc-retry-attempts = 2
rpc-retry-wait = 1
rpc-connect-timeout = 2
[worker]
ping_interval = 0.3
wait_interval = 0.2
wait_jitter = 0.1
[scheduler]
worker_disconnect_delay = {disconnect_delay}
retry_delay = 0.5
retry_count = 3
prune_on_get_work = true
stable_done_cooldown_secs = 0
[resources]
threads = 4
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """A temp folder with the fake stage module, the test luigi.cfg, a folder remote and one store per worker."""

    def __init__(self, root: Path, disconnect_delay: float = 20):
        self.root = root
        self.mods = root / "mods"
        write_shard_stage(self.mods)
        write_sized_stage(self.mods)
        self.cfg = root / "test-luigi.cfg"
        self.cfg.write_text(TEST_CFG.format(disconnect_delay=disconnect_delay))
        self.remote = root / "remote"
        self.log = root / "calls.log"
        self.procs: list[subprocess.Popen] = []

    def env(self, store: str, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEST_", "LUIGI_"))}
        env.update({"PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(self.mods)]),
                    "NEST_STORE": str(self.root / store), "NEST_FAKE_LOG": str(self.log),
                    "LUIGI_CONFIG_PATH": str(self.cfg), "OMP_NUM_THREADS": "1", "NEST_GPU": "0",
                    "TMPDIR": str(self.root),  # run journals of killed workers stay in the test's folder
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        env.update(extra)
        return env

    def start(self, args: list[str], store: str, name: str, **extra) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "w")
        err = open(self.root / f"{name}.err", "w")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=self.root, stdout=out, stderr=err,
                                env=self.env(store, **extra))
        proc.name = name
        self.procs.append(proc)
        return proc

    def worker(self, url: str, store: str, name: str, *more: str, **extra) -> subprocess.Popen:
        return self.start(["worker", "--scheduler-url", url, *more, *ROOT], store, name,
                          NEST_REMOTE=str(self.remote), **extra)

    def text(self, name: str, stream: str = "err") -> str:
        return (self.root / f"{name}.{stream}").read_text()

    def calls(self) -> list[tuple[str, int, str]]:
        """(text, pid, OMP_NUM_THREADS) of every stage call, in order."""
        return [(t, int(p), th) for t, p, th, _at in self._lines()]

    def started(self) -> dict[str, float]:
        return {t: float(at) for t, _p, _th, at in self._lines()}

    def _lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines() if len(line.split()) == 4]

    def record(self, store: str) -> dict:
        return json.loads((self.root / store / "runs" / "latest.json").read_text())

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def site(tmp_path, request):
    s = Site(tmp_path, disconnect_delay=3 if request.node.get_closest_marker("handover") else 20)
    Register.clear_instance_cache()
    RUN_LOG.reset()
    yield s
    s.stop_all()
    Register.clear_instance_cache()


class Luigid:
    def __init__(self, site: Site, port: int | None = None):
        self.site, self.port = site, port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Luigid":
        folder = self.site.root / "luigid"
        folder.mkdir(exist_ok=True)
        log = open(folder / "luigid.log", "a")
        env = self.site.env("unused")
        self.proc = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()",
                                      "--address", "127.0.0.1", "--port", str(self.port),
                                      "--state-path", str(folder / "state.pickle"), "--logdir", str(folder)],
                                     cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/graph", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"luigid did not start on {self.url}: "
                                   f"{(folder / 'luigid.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def luigid(site):
    server = Luigid(site).start()
    yield server
    server.stop()


def _wait(proc: subprocess.Popen, site: Site, timeout: float = 90) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.name} did not finish: {site.text(proc.name)[-3000:]}")


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _single_process(site: Site) -> dict:
    """The reference: the same DAG in one process, local scheduler, no remote."""
    proc = site.start(["run", *ROOT], "single", "single")
    assert _wait(proc, site) == 0, site.text("single")
    record = site.record("single")
    assert record["ok"] and {r["status"] for r in record["reached"]} == {"built"}
    return record


def _keys(record: dict) -> dict[str, str]:
    return {r["label"]: r["key"] for r in record["reached"]}


def _remote_report(site: Site, key: str) -> bytes:
    """ShReport's out.txt pulled from the remote into a fresh store (checked against its digests on the way)."""
    from pipeline.sharing.remote import Remote
    from pipeline.storage.store import Store

    store = Store(site.root / "fresh")
    Remote(str(site.remote)).pull(store, "ShReport", key)
    return (store.path("ShReport", key) / "out.txt").read_bytes()


# ---- two workers on luigid ---------------------------------------------------------------------------------------------

def test_two_workers_build_every_stage_once_with_the_keys_and_report_of_one_process(site, luigid):
    reference = _single_process(site)
    site.log.unlink()
    slow = "shard-0-2:0.6,shard-2-4:0.6,shard-4-6:0.6,shard-6-8:0.6"  # so that both workers get shards
    a = site.worker(luigid.url, "store-a", "a", NEST_TEST_SLOW=slow)
    b = site.worker(luigid.url, "store-b", "b", NEST_TEST_SLOW=slow)
    assert _wait(a, site) == 0, site.text("a")
    assert _wait(b, site) == 0, site.text("b")

    # exactly once: across both workers' run records, and in the stage calls
    built: dict[tuple[str, str], list[str]] = {}
    for store in ("store-a", "store-b"):
        record = site.record(store)
        assert record["ok"], record
        assert {r["status"] for r in record["reached"]} <= {"built", "remote", "cached", "pulled"}
        for r in record["reached"]:
            if r["status"] == "built":
                built.setdefault((r["stage"], r["key"]), []).append(store)
    assert len(built) == N_TASKS and all(len(v) == 1 for v in built.values()), built
    texts = [t for t, _pid, _th in site.calls()]
    assert sorted(texts) == sorted(set(texts)) and len(texts) == N_TASKS, texts
    assert len({pid for _t, pid, _th in site.calls()}) == 2, "both workers took part"

    # the same keys as one process, each on the remote once, and the same report bytes
    keys = _keys(site.record("store-a"))
    assert keys == _keys(reference) == _keys(site.record("store-b"))
    from pipeline.sharing.remote import Remote

    assert sorted(Remote(str(site.remote)).list()) == sorted((r["stage"], r["key"]) for r in reference["reached"])
    report_key = keys["ShReport"]
    single = (site.root / "single" / "ShReport" / report_key / "out.txt").read_bytes()
    assert single == _remote_report(site, report_key)
    assert single.startswith(b"report|shard-0-2|source|shard-2-4|source")
    # a worker pulled only the inputs of what it ran: the other worker's shards are not in its store
    for store in ("store-a", "store-b"):
        own = {k for (s, k), who in built.items() if who == [store]}
        local = {p.name for p in (site.root / store).glob("Sh*/*") if (p / "manifest.json").is_file()}
        assert own <= local


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.handover
@pytest.mark.parametrize("processes", ["1", "2"])
def test_kill_9_of_a_worker_mid_shard_hands_the_shard_to_the_other(site, luigid, processes):
    """``--workers 2``: the shard runs in a process Luigi forked; it must die with its worker (no orphan build)."""
    reference = _single_process(site)
    site.log.unlink()
    a = site.worker(luigid.url, "store-a", "a", "--workers", processes, NEST_TEST_SLOW="shard-4-6:60")
    _until(lambda: any(t == "shard-4-6" for t, _p, _th in site.calls()), 60, "worker a to start shard-4-6")
    stage_pid = [p for t, p, _th in site.calls() if t == "shard-4-6"][0]
    assert (stage_pid == a.pid) == (processes == "1")
    b = site.worker(luigid.url, "store-b", "b")
    time.sleep(0.5)
    t_kill = time.monotonic()
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    _until(lambda: not _alive(stage_pid), 10, "the killed worker's stage process to die with it")
    assert _wait(b, site) == 0, site.text("b")
    took = time.monotonic() - t_kill
    assert took < 45, f"the other worker took {took:.0f} s to finish"
    shard_runs = [(t, p) for t, p, _th in site.calls() if t == "shard-4-6"]
    assert len(shard_runs) == 2 and shard_runs[0][1] == stage_pid and shard_runs[1][1] != stage_pid  # a, then b
    record = site.record("store-b")
    assert record["ok"]
    statuses = {r["label"]: r["status"] for r in record["reached"]}
    assert statuses["ShShard(start=4, end=6)"] == "built" and statuses["ShReport"] == "built"
    assert _keys(record) == _keys(reference)
    key = _keys(record)["ShReport"]
    assert _remote_report(site, key) == (site.root / "single" / "ShReport" / key / "out.txt").read_bytes()
    # the killed build left nothing that looks complete in a's store
    assert not (site.root / "store-a" / "ShShard" / _keys(reference)["ShShard(start=4, end=6)"]).exists()


def test_luigid_killed_workers_stop_with_one_line_and_the_rerun_finishes(site):
    server = Luigid(site).start()
    try:
        a = site.worker(server.url, "store-a", "a", NEST_TEST_SLOW="shard-0-2:3")
        _until(lambda: any(t == "shard-0-2" for t, _p, _th in site.calls()), 60, "worker a to start shard-0-2")
        server.kill()
        rc = _wait(a, site, timeout=60)
        err = site.text("a")
        assert rc == 1, err
        lines = [line for line in err.splitlines() if line.startswith("nest:")]
        assert len(lines) == 1 and "stopped answering" in lines[0] and server.url in lines[0], err
        assert "Traceback" not in err and "Failed connecting" not in err, err
        # the shard finished before the scheduler was missed: it is on the remote, and the rerun does not redo it
        done_before = [t for t, _p, _th in site.calls()]
        server.start()  # same port, same state file
        again = site.worker(server.url, "store-a", "a2")
        assert _wait(again, site) == 0, site.text("a2")
        record = site.record("store-a")
        assert record["ok"]
        redone = [t for t, _p, _th in site.calls()][len(done_before):]
        assert "shard-0-2" in done_before and "shard-0-2" not in redone and "report" in redone
    finally:
        server.stop()


def test_worker_without_a_scheduler_is_one_line(site):
    proc = site.worker(f"http://127.0.0.1:{_free_port()}", "store-a", "a")
    assert _wait(proc, site, timeout=60) == 1
    err = site.text("a")
    assert [line for line in err.splitlines() if line.startswith("nest:")][0].startswith("nest: the scheduler at")
    assert "Traceback" not in err


def test_a_failing_stage_is_retried_then_the_workers_stop_with_one_line(site, luigid):
    """Luigi retries a failed task (``[scheduler] retry_delay``) up to ``retry_count`` failures, then disables it: the
    workers stop instead of waiting for it forever."""
    a = site.worker(luigid.url, "store-a", "a", NEST_TEST_SLOW="shard-2-4:oops")
    b = site.worker(luigid.url, "store-b", "b", NEST_TEST_SLOW="shard-2-4:oops")
    assert _wait(a, site, timeout=60) == 1 and _wait(b, site, timeout=60) == 1
    assert [t for t, _p, _th in site.calls()].count("shard-2-4") == 3  # retry_count = 3, across both workers
    for name in ("a", "b"):
        err = site.text(name)
        lines = [line for line in err.splitlines() if line.startswith("nest:")]
        if "shard-2-4" in "".join(lines):  # the worker that ran it last names it
            assert lines == [line for line in lines if "failed: ValueError" in line], err


# ---- local scheduler, N worker processes -------------------------------------------------------------------------------

def test_local_workers_share_the_cores_and_record_every_build(site):
    reference = _single_process(site)
    site.log.unlink()
    proc = site.start(["run", "--workers", "2", *ROOT], "two", "two", NEST_TEST_SLOW=",".join(f"shard-{i}-{i + 2}:1" for i in (0, 2, 4, 6)))
    assert _wait(proc, site) == 0, site.text("two")
    record = site.record("two")
    # built in Luigi's forked worker processes: the run record still knows each build (the journal)
    assert record["ok"] and {r["status"] for r in record["reached"]} == {"built"}
    assert _keys(record) == _keys(reference)
    calls = site.calls()
    assert {th for _t, _p, th in calls} == {"2"}  # [resources] threads = 4 over 2 workers
    assert len({p for _t, p, _th in calls}) >= 2  # stages ran in worker processes, not all in one
    # four 1-second shards: two at a time (one after the other, each start would be ≥ 1 s after the previous one)
    starts = sorted(at for t, at in site.started().items() if t.startswith("shard-"))
    assert min(b - a for a, b in zip(starts, starts[1:])) < 0.5, starts
    key = _keys(record)["ShReport"]
    assert (site.root / "two" / "ShReport" / key / "out.txt").read_bytes() == \
        (site.root / "single" / "ShReport" / key / "out.txt").read_bytes()


def test_gpu_stages_never_run_two_at_once(site):
    """Shards declared as GPU stages (``[stage_resources] needs``) with no ``[resources] gpu`` limit (Luigi: 1): two
    worker processes run them one after the other, never two on the one GPU."""
    proc = site.start(["run", "--workers", "2", "--set", 'stage_resources.needs={"ShShard": {"gpu": 1}}', *ROOT],
                      "two", "two", NEST_TEST_SLOW=",".join(f"shard-{i}-{i + 2}:0.6" for i in (0, 2, 4, 6)))
    assert _wait(proc, site) == 0, site.text("two")
    starts = sorted(at for t, at in site.started().items() if t.startswith("shard-"))
    assert len(starts) == 4 and min(b - a for a, b in zip(starts, starts[1:])) >= 0.55, starts


def test_a_need_without_a_limit_is_refused_in_one_line(site):
    proc = site.start(["run", "--set", 'stage_resources.needs={"ShShard": {"memory_gib": 8}}', *ROOT], "one", "one")
    assert _wait(proc, site) == 2
    err = site.text("one").strip().splitlines()
    assert len(err) == 1 and "memory_gib = 8 has no limit in [resources]" in err[0], err
    assert site.calls() == []  # nothing ran


def test_a_failure_in_a_worker_process_is_one_line_with_its_type(site):
    proc = site.start(["run", "--workers", "2", *ROOT], "two", "two", NEST_TEST_SLOW="shard-2-4:oops")
    assert _wait(proc, site) == 1
    err = site.text("two")
    assert "nest: ShShard" in err and "failed: ValueError: could not convert string to float" in err, err


# ---- resources ---------------------------------------------------------------------------------------------------------

def test_resources_gpu_lucene_and_site_needs(monkeypatch):
    from pipeline import dag
    from pipeline.engine import config, scheduling

    Register.clear_instance_cache()
    monkeypatch.setenv("NEST_GPU", "1")
    assert dag.Generate(task="bio", method="nest").resources == {"gpu": 1}
    assert dag.BuildBM25Index().resources == {"lucene": 1}
    assert dag.PreRetrieve(task="bio", mode="dense").resources == {}
    assert dag.PreRetrieve(task="bio", mode="hybrid").resources == {"lucene": 1}
    monkeypatch.setenv("NEST_GPU", "0")
    assert dag.Generate(task="bio", method="nest").resources == {}
    cfg = config.config()
    before = cfg.get("stage_resources", "needs", raw=True)
    config.apply_overrides({"stage_resources": {"needs": '{"BuildDenseIndex": {"memory_gib": 48}}'}})
    try:
        Register.clear_instance_cache()
        needs = dag.BuildDenseIndex().resources
        assert needs == {"memory_gib": 48}
        assert scheduling.unlimited(needs) == ["memory_gib"]  # no [resources] memory_gib: Luigi would never run it
        config.apply_overrides({"resources": {"memory_gib": "64"}})
        assert scheduling.unlimited(needs) == []
    finally:
        cfg.set("stage_resources", "needs", before)  # luigi.cfg's value (the only default it has)
        if cfg.has_option("resources", "memory_gib"):
            cfg.remove_option("resources", "memory_gib")
        Register.clear_instance_cache()


def test_thread_budget(monkeypatch):
    from pipeline.engine import config, scheduling

    monkeypatch.delenv(scheduling.THREADS_ENV, raising=False)
    for mod in ("torch", "faiss"):  # this process's own thread settings stay as they are
        monkeypatch.delitem(sys.modules, mod, raising=False)
    config.apply_overrides({"resources": {"threads": "6"}})
    try:
        assert scheduling.thread_budget(4) == 1 and scheduling.thread_budget(2) == 3 and scheduling.thread_budget(1) == 6
        assert scheduling.set_thread_budget(2) == 3 and os.environ[scheduling.THREADS_ENV] == "3"
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(var, "1")
        assert scheduling.apply_thread_budget() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        config.config().remove_option("resources", "threads")
        os.environ.pop(scheduling.THREADS_ENV, None)


def test_assistant_worker_takes_tasks_another_process_submitted(site, luigid):
    """``nest worker --assistant`` adds no DAG: it runs whatever runnable task the scheduler has, here the shards of a
    ``nest run --scheduler-url`` submitted by another process (each task rebuilt from its module and parameters)."""
    helper = site.start(["worker", "--scheduler-url", luigid.url, "--assistant"], "store-b", "helper",
                        NEST_REMOTE=str(site.remote))
    time.sleep(1.0)
    slow = ",".join(f"shard-{i}-{i + 2}:0.7" for i in (0, 2, 4, 6))
    main = site.start(["run", "--scheduler-url", luigid.url, *ROOT], "store-a", "main", NEST_REMOTE=str(site.remote),
                      NEST_TEST_SLOW=slow)
    assert _wait(main, site) == 0, site.text("main") + site.text("helper")
    texts = [t for t, _p, _th in site.calls()]
    assert sorted(texts) == sorted(set(texts)) and len(texts) == N_TASKS
    by = {t: p for t, p, _th in site.calls()}
    assert helper.pid in by.values() and set(by.values()) <= {main.pid, helper.pid}, f"the assistant ran nothing: {by}"
    assert helper.poll() is None  # an assistant stays until stopped
    helper.terminate()
    helper.wait(20)


def _verify_everything(site: Site, stores: list[str]) -> tuple[int, list[str]]:
    """Every complete artifact of every store checked against its manifest, every remote artifact pulled (and so
    checked) into a fresh store: (artifacts checked, problems)."""
    from pipeline.sharing.remote import Remote, RemoteError
    from pipeline.storage.store import Store

    checked, problems = 0, []
    for name in stores:
        store = Store(site.root / name)
        if not store.root.is_dir():
            continue
        for ref in store.folders():
            if store.complete(ref.stage, ref.key):
                checked += 1
                problems += [f"{name} {ref.stage}/{ref.key[:12]}: {p}" for p in store.verify(ref.stage, ref.key)]
    fresh = Store(site.root / "verify-remote")
    remote = Remote(str(site.remote))
    for stage, key in remote.list():
        checked += 1
        try:
            remote.pull(fresh, stage, key)
        except RemoteError as e:
            problems.append(f"remote {stage}/{key[:12]}: {e}")
    return checked, problems


@pytest.mark.handover
def test_ten_random_kills_across_two_workers_leave_no_corrupt_artifact(site, luigid):
    import random

    rng = random.Random(10)
    slow = ",".join(f"shard-{i}-{i + 2}:1.0" for i in (0, 2, 4, 6))
    kills = 0
    for rnd in range(5):
        salt = [f"--ShSource-salt=_r{rnd}"]
        workers = [site.start(["worker", "--scheduler-url", luigid.url, *ROOT, *salt], store, f"{store}-{rnd}",
                              NEST_REMOTE=str(site.remote), NEST_TEST_SLOW=slow) for store in ("store-a", "store-b")]
        for proc in rng.sample(workers, 2):  # both die, in a random order, at random moments
            time.sleep(rng.uniform(0.8, 2.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        # the rerun finishes (here on the local scheduler: the killed workers' tasks stay theirs until their heartbeat
        # lapses), pulling what the killed workers pushed
        rerun = site.start(["run", *ROOT, *salt], "store-a", f"rerun-{rnd}", NEST_REMOTE=str(site.remote),
                           NEST_REMOTE_MODE="both")
        assert _wait(rerun, site) == 0, site.text(f"rerun-{rnd}")
    assert kills >= 8, f"only {kills} kills landed"
    checked, problems = _verify_everything(site, ["store-a", "store-b"])
    assert problems == [] and checked >= 5 * N_TASKS, (checked, problems)
