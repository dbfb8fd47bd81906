"""Worker faults: two ``nest worker``s started together on a sharded DAG, one ``kill -9``'d at random.

    python -m bench.faults_workers --rounds 20            # ≥ 20 rounds for the issue's figure (a few minutes)
    python -m bench.faults_workers --rounds 3 --seed 1    # to check the benchmark itself
    python -m bench.run faults --worker-rounds 20         # these rounds within the whole fault bench

A ``luigid`` on 127.0.0.1 (a free port; short heartbeats: ``worker_disconnect_delay`` = 3 s, ``retry_delay`` = 0.5 s), a
folder remote, one local store per worker. The DAG is cheap (a module of fake stages written into the scratch folder):
a size source, then a stage sized by it and split into 4 range shards, each writing a few files in small chunks so that a
kill often lands while one is half written, then their merge::

    FwSource(salt) ── FwWork(shards=4): FwWork(start, end) × 4 ── merge

Each round has new keys (a new ``salt``). The two workers start within a second of each other (the second usually
while the first builds the size source: the race this bench is about), each with 1 or 2 worker processes; after a random
delay one of them is killed with ``kill -9`` (its process group: its forked task processes too). Counted:

- **hung**: the survivor did not exit within the round's timeout (it is then killed);
- **not finished**: the survivor exited non-zero (or the victim, when it finished before its kill), or the merged
  artifact is not on the remote once the survivor exited;
- **corrupt-complete**: an artifact that has a manifest (in either store, or published on the remote) but does not
  verify against it (every file's size and sha256; remote artifacts are pulled into a scratch store, which checks them);
- **left running**: any process of the round still alive after it (workers, their task processes, a stage's pid).

``worker_rounds(n, workdir, rng)`` returns the counts (and each round's details) as a dict; ``bench/bench_faults.py``
may include it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.sharing.remote import Remote, RemoteError
from pipeline.storage.store import Store

PROJECT = Path(__file__).resolve().parents[1]

STAGE_MODULE = "nest_faults_workers_stage"
TASK_MODULE = "nest_faults_workers_tasks"

STAGE_SRC = '''"""Fake stages of bench/faults_workers.py: a size source, then ranges that write files in small chunks."""
import os
import time
from pathlib import Path

VERSION = "1"


def _log(text):
    with open(os.environ["NEST_FW_LOG"], "a") as f:
        f.write(f"{text} {os.getpid()} {time.time():.3f}\\n")


def _write(path, text, chunks, pause):
    with open(path, "w") as f:
        for i in range(chunks):
            f.write(f"{text} chunk {i}\\n" * 2000)
            f.flush()
            time.sleep(pause)


def run(out_dir, *, text, items=None, start=None, end=None, source=None, pause=0.1):
    out = Path(out_dir)
    if source is None:
        _log(text)
        _write(out / "source.txt", text, 10, pause)
        (out / "items.txt").write_text(str(items))
        return {"items": int(items)}
    n = int((Path(source) / "items.txt").read_text())
    a, b = int(start or 0), n if end is None else int(end)
    _log(f"{text}-{a}-{b}")
    for i in range(a, b):
        _write(out / f"item-{i:03d}.txt", f"{text} {i}", 8, pause)
    return {"rows": b - a}


def merge(out_dir, *, shards, text, pause=0.1):
    _log(f"{text}-merge")
    for shard in shards:
        for f in sorted(Path(shard).glob("item-*.txt")):
            (Path(out_dir) / f.name).write_bytes(f.read_bytes())
    return {"rows": len(list(Path(out_dir).glob("item-*.txt")))}
'''

TASK_SRC = f'''"""Luigi tasks of bench/faults_workers.py (the stages are {STAGE_MODULE})."""
import luigi

from pipeline.engine.task import NestTask
from pipeline.engine.sharding import Sharded, range_params


class FwSource(NestTask):
    stage_module = "{STAGE_MODULE}"
    salt = luigi.Parameter(default="")
    items = luigi.IntParameter(default=8)

    def stage_params(self):
        return {{"text": f"source{{self.salt}}", "items": int(self.items)}}


class FwWork(Sharded, NestTask):
    stage_module = "{STAGE_MODULE}"
    label_params = label_if_set = ("start", "end")
    shards = luigi.IntParameter(default=1, significant=False)
    start = luigi.IntParameter(default=0)
    end = luigi.IntParameter(default=-1)

    def requires(self):
        return {{"source": FwSource()}}

    def stage_params(self):
        return {{"text": "work", **range_params(self)}}

    size_source = ("source", "items")  # the stats field ``items`` of the ``source`` input

    def shard_task(self, start, end):
        return self.clone(start=start, end=end, shards=1)
'''

LUIGI_CFG = """
[core]
rpc-retry-attempts = 3
rpc-retry-wait = 1
rpc-connect-timeout = 2
[worker]
ping_interval = 0.3
wait_interval = 0.2
wait_jitter = 0.1
[scheduler]
worker_disconnect_delay = 3
retry_delay = 0.5
retry_count = 3
prune_on_get_work = true
stable_done_cooldown_secs = 0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class _Bench:
    def __init__(self, workdir: Path):
        self.root = Path(workdir)
        self.mods = self.root / "mods"
        self.mods.mkdir(parents=True, exist_ok=True)
        (self.mods / f"{STAGE_MODULE}.py").write_text(STAGE_SRC)
        (self.mods / f"{TASK_MODULE}.py").write_text(TASK_SRC)
        self.cfg = self.root / "luigi-bench.cfg"
        self.cfg.write_text(LUIGI_CFG)
        self.remote = self.root / "remote"
        self.remote.mkdir(exist_ok=True)  # a folder remote must exist (a missing one is refused as a typo)
        self.log = self.root / "calls.log"
        self.luigid: subprocess.Popen | None = None
        self.url = ""

    def env(self, store: str | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEST_", "LUIGI_"))}
        env.update({"PYTHONPATH": os.pathsep.join([str(PROJECT), str(self.mods)]), "LUIGI_CONFIG_PATH": str(self.cfg),
                    "NEST_FW_LOG": str(self.log), "NEST_REMOTE": str(self.remote), "OMP_NUM_THREADS": "1",
                    "NEST_GPU": "0", "TMPDIR": str(self.root), "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost"})
        if store:
            env["NEST_STORE"] = str(self.root / store)
        return env

    def start_luigid(self) -> None:
        folder = self.root / "luigid"
        folder.mkdir(exist_ok=True)
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.luigid = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()",
                                        "--address", "127.0.0.1", "--port", port, "--state-path",
                                        str(folder / "state.pickle"), "--logdir", str(folder)], cwd=folder,
                                       stdout=open(folder / "luigid.log", "a"), stderr=subprocess.STDOUT,
                                       env=self.env())
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/graph", timeout=1):
                    return
            except OSError:
                pass
            if self.luigid.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"luigid did not start: {(folder / 'luigid.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop_luigid(self) -> None:
        if self.luigid is not None and self.luigid.poll() is None:
            self.luigid.terminate()
            try:
                self.luigid.wait(10)
            except subprocess.TimeoutExpired:
                self.luigid.kill()
                self.luigid.wait(10)

    def worker(self, name: str, store: str, salt: str, processes: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "pipeline.cli", "worker", "--scheduler-url", self.url, "--workers",
                str(processes), "FwWork", "--module", TASK_MODULE, "--FwWork-shards", "4", f"--FwSource-salt={salt}"]
        proc = subprocess.Popen(argv, cwd=self.root, env=self.env(store), start_new_session=True,
                                stdout=open(self.root / f"{name}.out", "w"), stderr=open(self.root / f"{name}.err", "w"))
        proc.name = name  # type: ignore[attr-defined]
        return proc

    def stage_pids(self) -> set[int]:
        if not self.log.exists():
            return set()
        return {int(parts[1]) for parts in (line.split() for line in self.log.read_text().splitlines())
                if len(parts) == 3}

    def verify(self, stores: list[str], salt: str) -> tuple[int, list[str], bool]:
        """(artifacts checked, problems, the round's merged FwWork is on the remote)."""

        checked, problems = 0, []
        for name in stores:
            store = Store(self.root / name)
            if not store.root.is_dir():
                continue
            for ref in store.folders():
                if store.complete(ref.stage, ref.key):
                    checked += 1
                    problems += [f"{name} {ref.stage}/{ref.key[:12]}: {p}" for p in store.verify(ref.stage, ref.key)]
        fresh = Store(self.root / f"verify-{salt}")
        remote = Remote(str(self.remote))
        merged_done = False
        for stage, key in remote.list():
            checked += 1
            try:
                remote.pull(fresh, stage, key)
            except RemoteError as e:
                problems.append(f"remote {stage}/{key[:12]}: {e}")
                continue
            m = fresh.manifest(stage, key) or {}
            params = m.get("params") or {}
            if stage == "FwWork" and "start" not in params and m.get("stats", {}).get("rows") == 8:
                src = (m.get("inputs") or {}).get("source") or {}
                src_key = src.get("key") if isinstance(src, dict) else (src[1] if isinstance(src, list) else None)
                if src_key and remote_source_salt(fresh, remote, src_key) == salt:
                    merged_done = True
        return checked, problems, merged_done


def remote_source_salt(store, remote, key: str) -> str | None:
    """The salt of the FwSource artifact ``key`` (its ``text`` parameter is ``source<salt>``)."""
    m = store.manifest("FwSource", key) if store.complete("FwSource", key) else None
    if m is None:
        try:
            m = remote.manifest("FwSource", key)
        except Exception:
            return None
    text = ((m or {}).get("params") or {}).get("text", "")
    return text[len("source"):] if text.startswith("source") else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def worker_rounds(n: int, workdir: Path, rng: random.Random, *, timeout: float = 150.0,
                  kill_window: tuple[float, float] = (0.3, 4.0)) -> dict:
    """``n`` rounds of two workers started together, one ``kill -9``'d at a random moment; the counts (module
    docstring) and each round's details."""
    bench = _Bench(Path(workdir))
    bench.start_luigid()
    t_all = time.perf_counter()
    counts = {"rounds": n, "kills": 0, "hung": 0, "not_finished": 0, "corrupt_complete": 0, "left_running": 0,
              "corrupt_remote": 0, "artifacts_checked": 0}
    details: list[dict] = []
    try:
        for i in range(n):
            salt = f"r{i}-{rng.randrange(1 << 30):x}"
            procs = [bench.worker(f"a{i}", "store-a", salt, rng.choice((1, 2)))]
            time.sleep(rng.uniform(0.0, 1.0))  # "started together": within a second
            procs.append(bench.worker(f"b{i}", "store-b", salt, rng.choice((1, 2))))
            victim_i = rng.randrange(2)
            victim, survivor = procs[victim_i], procs[1 - victim_i]
            t0 = time.monotonic()
            delay = rng.uniform(*kill_window)
            pids_before = bench.stage_pids()
            while time.monotonic() - t0 < delay and victim.poll() is None:
                time.sleep(0.05)
            killed = victim.poll() is None
            victim_rc = None if killed else victim.returncode  # it finished before its kill: it must have exited 0
            _kill_group(victim)
            victim.wait(10)
            counts["kills"] += killed
            hung = False
            try:
                rc = survivor.wait(timeout)
            except subprocess.TimeoutExpired:
                hung, rc = True, None
                _kill_group(survivor)
                survivor.wait(10)
            took = time.monotonic() - t0
            time.sleep(0.5)  # a killed group's processes are reaped by init
            round_pids = (bench.stage_pids() - pids_before) | {p.pid for p in procs}
            left = sorted(pid for pid in round_pids if _alive(pid))
            for pid in left:  # leave nothing behind for the next round (counted first)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            checked, problems, done = bench.verify(["store-a", "store-b"], salt)
            not_finished = hung or rc != 0 or not done or victim_rc not in (None, 0)
            counts["hung"] += hung
            counts["not_finished"] += not_finished
            counts["corrupt_complete"] += len(problems)
            counts["corrupt_remote"] += sum(p.startswith("remote ") for p in problems)
            counts["left_running"] += len(left)
            counts["artifacts_checked"] += checked
            err = (bench.root / f"{survivor.name}.err").read_text(errors="replace")
            details.append({"round": i, "salt": salt, "killed": victim.name, "kill_at_s": round(delay, 2),
                            "landed": killed, "victim_rc": victim_rc, "survivor": survivor.name, "survivor_rc": rc,
                            "hung": hung,
                            "finished": not not_finished, "seconds": round(took, 1), "problems": problems[:3],
                            "left_running": left,
                            "survivor_nest_lines": [ln for ln in err.splitlines() if ln.startswith("nest:")][:3]})
    finally:
        bench.stop_luigid()
    counts["seconds"] = round(time.perf_counter() - t_all, 1)
    counts["details"] = details
    return counts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.faults_workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds a survivor may take before it counts as hung")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder, kept)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nest-faults-workers-"))
    result = worker_rounds(args.rounds, workdir, random.Random(args.seed), timeout=args.timeout)
    result["workdir"] = str(workdir)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "details"}
    print(json.dumps(summary))
    for d in result["details"]:
        if not d["finished"] or d["problems"] or d["left_running"]:
            print(json.dumps(d))
    return result


if __name__ == "__main__":
    main()
