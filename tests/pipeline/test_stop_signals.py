"""Clean stops: SIGINT/SIGTERM end a build at once with one line and 130/143, no temp
folder and no process left, and a rerun finishes; a dead forked worker names its stage; the BM25 indexer dies with
the process that started it. Each test waits for a line the build prints, never for a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stop_fakes import write_stop_stage

PROJECT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent


class Site:
    def __init__(self, root: Path):
        self.root = root
        self.store = root / "store"
        self.mods = root / "mods"
        self.pids = root / "pids.txt"
        write_stop_stage(self.mods)

    def env(self, **extra) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(self.mods)]),
               "NEST_STORE": str(self.store), "NEST_STOP_PIDS": str(self.pids), "OMP_NUM_THREADS": "1"}
        env.pop("NEST_REMOTE", None)
        env.update(extra)
        return env

    def start(self, *args: str, name: str = "run", **extra) -> tuple[subprocess.Popen, Path]:
        err = self.root / f"{name}.err"
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args, "--module", "stop_fakes"],
                                cwd=self.root, env=self.env(**extra), stdout=open(self.root / f"{name}.out", "w"),
                                stderr=open(err, "w"), start_new_session=True)
        return proc, err

    def run(self, *args: str, name: str = "rerun") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, "--module", "stop_fakes"],
                              cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=300)

    def child_pids(self) -> list[int]:
        return [int(x) for x in self.pids.read_text().split()] if self.pids.exists() else []

    def temp_folders(self) -> list[Path]:
        return sorted(self.store.glob("*/.tmp-*"))


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = path.read_text() if path.exists() else ""
        if text in body:
            return body
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{body}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n{path.read_text()}")


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def settle(pids, timeout: float = 30) -> list[int]:
    """Processes of ``pids`` still alive once they had ``timeout`` s to die."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    yield s
    for pid in alive(s.child_pids()):  # never leave a stray sleeper behind, even when a test fails
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_build_stops_at_once_cleanly(site, sig, workers):
    proc, err = site.start("--workers", workers, "StAll", NEST_STOP_SLOW="600")
    wait_for(err, "stop-fake: sleeping", proc)
    below = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert site.child_pids() and set(site.child_pids()) <= set(below)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole process group
    else:
        os.kill(proc.pid, sig)  # `timeout`, a batch scheduler: the command's process only
    rc = proc.wait(timeout=120)
    text = err.read_text()
    assert rc == 128 + sig, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("nest:")]
    assert len(lines) == 1 and lines[0].startswith(f"nest: stopped by {sig.name}: "), text
    assert "StSlow" in lines[0] and "run the same command again" in lines[0], lines[0]
    assert "StAfter" not in text.replace(lines[0], "")  # nothing was scheduled after the signal
    assert site.temp_folders() == []
    assert settle(below + site.child_pids()) == []
    assert not (site.store / "runs" / "active").exists() or not list((site.store / "runs" / "active").iterdir())

    rerun = site.run("StAll")
    assert rerun.returncode == 0, rerun.stderr
    assert "StSource" in rerun.stdout and "cached" in rerun.stdout.split("StSource", 1)[1].splitlines()[0]
    assert site.temp_folders() == []


def test_a_killed_forked_worker_fails_the_run_naming_its_stage(site):
    proc, err = site.start("--workers", "2", "StAll", NEST_STOP_SLOW="600")
    body = wait_for(err, "stop-fake: sleeping", proc)
    worker = int(body.split("stop-fake: sleeping in ", 1)[1].split()[0])
    assert worker != proc.pid and worker in [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(worker, signal.SIGKILL)
    rc = proc.wait(timeout=120)
    text = err.read_text()
    assert rc == 1, text
    assert "Traceback" not in text, text
    named = [ln for ln in text.splitlines() if ln.startswith("nest: StSlow ") and "worker process died" in ln]
    assert len(named) == 1 and "SIGKILL" in named[0], text
    assert settle(site.child_pids()) == []  # the dead worker's child: reaped by the run, not left to init
    rerun = site.run("StAll")
    assert rerun.returncode == 0, rerun.stderr
    assert site.temp_folders() == []


def test_the_bm25_indexer_dies_with_the_process_that_started_it(tmp_path):
    """``kill -9`` of the build leaves no indexer (the JVM) running: it has the parent-death signal."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import os, sys, time\n"
        "from stages.retrieval.bm25 import indexer_process\n"
        "p = indexer_process([sys.executable, '-c', 'import time; time.sleep(600)'], dict(os.environ))\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive([child]) == [child]
        parent.kill()
        parent.wait()
        left = settle([child])
    finally:
        parent.kill()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_a_stop_removes_only_the_temp_folders_of_its_own_processes(tmp_path):
    from pipeline.engine.stopping import remove_temp_folders

    mine, other = os.getpid(), os.getpid() + 1
    stage = tmp_path / "StSlow"
    (stage / f".tmp-{'a' * 64}-{mine}-0badcafe").mkdir(parents=True)
    (stage / f".tmp-{'b' * 64}-{other}-0badcafe").mkdir()  # another run's build: left alone
    (stage / f".tmp-{'c' * 64}-{mine}-0badcafe-x").mkdir()  # not a name the store gives: left alone
    (stage / ("d" * 64)).mkdir()
    removed = remove_temp_folders(tmp_path, {mine})
    assert [p.name for p in removed] == [f".tmp-{'a' * 64}-{mine}-0badcafe"]
    assert sorted(p.name for p in stage.iterdir()) == sorted([f".tmp-{'b' * 64}-{other}-0badcafe",
                                                              f".tmp-{'c' * 64}-{mine}-0badcafe-x", "d" * 64])
