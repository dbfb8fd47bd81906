"""Faults benchmark: random ``kill -9`` during ``nest run``, a rerun after each, every manifest verified.

    python -m bench.run faults                    # 40 kill rounds each of run, push, pull; 20 of the push race, of
                                                  # two workers and of stop signals (about 25 min on 2 cores)
    python -m bench.run faults --kills 20 --worker-rounds 30
    python -m bench.run --quick faults            # 3 rounds of each kind, to check the benchmark itself

One results pair, ``bench/results/faults.md`` / ``.json``: a summary table first (kills landed per kind and in all,
corrupt-but-complete artifacts locally and on the remote, hung runs, runs not finished after a rerun, processes left
running, flipped bytes and crafted names refused, race repeats; each figure with its goal, met or missed), then each
kind's own table. Every process the bench starts carries ``FAULTS_BENCH_MARK`` in its environment (children inherit
it, also the ones in their own session); after every round any such process still running is counted as *left
running*, then killed. Every command is bounded by ``--timeout`` (a run nobody killed that outlives it is *hung*).

The DAG is small and cheap on CPU: the real ConvertCorpus (the embedded corpus with ``limit``, a new limit each round so
that every round has work to do) feeding fake stages (a module written into a scratch folder; stages never import
Luigi) that write several files of a few MB each, in chunks, so that a kill often lands while a file is half written::

    ConvertCorpus ─┬─ FaultA ── FaultB
                   └─ FaultC            (target: FaultTop = FaultB + FaultC)

Each round: start ``nest run FaultTop`` in its own process group, ``kill -9`` the group after a random delay (uniform
between the clean run's first "building" line and its end), then check **every** manifest in the store (size and sha256 of every file):
an artifact that looks complete (it has a manifest) but does not verify is *corrupt-complete* (goal 0). Then rerun the
same command without a kill: a rerun that does not exit 0 or leaves the target incomplete is a *run not finished* (goal
0). Where each kill landed (the stage being built, from the run's ``[nest] X: building`` lines) is tallied.

Then the remote store (a local-folder remote), with the store those rounds filled:

- **push rounds**: ``nest push --all`` into a fresh remote folder, killed after a random delay (uniform over a clean
  push's duration), then rerun. After the kill and after the rerun every artifact the remote *publishes* (its manifest is
  there) is pulled into a scratch store and verified: one that cannot be pulled whole is corrupt-complete on the remote;
- **pull rounds**: ``nest pull --all`` from the complete remote into a fresh store, killed the same way, then rerun;
  the local store is verified after each;
- **flipped bytes**: one byte flipped at a random offset of an archive or of a manifest of a copy of the remote; every
  pull of that artifact must be refused, and leave nothing in the store;
- **push race** (``--race-repeats``, 20 by default): two ``nest push`` of one key to a fresh folder
  remote with ``$TMPDIR`` on another file system (``/dev/shm``); the first is SIGSTOPped once its copy started, the
  second pushes to the end, the first is SIGCONTed and SIGKILLed at a random point of its copy. Counted: published
  artifacts that do not pull whole (goal 0), files left in the killed push's ``$TMPDIR`` (goal 0), temp files left on
  the remote, hung pushes (each bounded by ``--timeout``; goal 0);
- **crafted names**: a listing or manifest naming the stage ``..`` (what s3fs lists for an object key
  ``prefix/../<key>``), ``runs``, ``1bad``, a name with a space, a manifest input ``../../x``, an archive size ``"big"``;
  each must be refused with nothing written;
- **two workers** (``--worker-rounds``, ``bench/faults_workers.py``): two ``nest worker``s under a real ``luigid``
  started together on a sharded DAG, one ``kill -9``'d at a random moment; the survivor must finish;
- **stop rounds** (``--stop-rounds``, ``bench/faults_stop.py``): SIGTERM, SIGINT and ``kill -9`` at random moments
  of the fake DAG (``--workers 1`` and ``2``) and of the real BuildBM25Index (its Lucene indexer a child JVM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.faults_stop import markdown as stop_markdown
from bench.faults_stop import still_running, stop_rounds
from bench.faults_workers import worker_rounds  # two nest workers under luigid, one kill -9'd
from pipeline.sharing.protocol import _digest, remote_manifest
from pipeline.sharing.remote import Remote, RemoteError
from pipeline.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]

STAGE_SRC = '''"""Fake stages of the faults benchmark: several files of a few MB, written in chunks."""
import hashlib
import json
import time
from pathlib import Path

VERSION = "1"


def run(out_dir, *, name, files=3, size=2_000_000, passages=None, upstream=None, seed=0, pause=0.02):
    out_dir = Path(out_dir)
    h = hashlib.sha256(f"{name}:{seed}".encode())
    for src in (passages, upstream):
        if src is not None:
            for p in sorted(Path(src).glob("*.json*")):
                h.update(p.read_bytes())
    block = (h.hexdigest() * (65536 // 64 + 1)).encode()[:65536]
    for i in range(files):
        with open(out_dir / f"part-{i}.bin", "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
                time.sleep(pause / 16)
        time.sleep(pause)
    (out_dir / "info.json").write_text(json.dumps({"name": name, "digest": h.hexdigest()}))
    return {"files": files}
'''

DAG_SRC = '''"""Luigi wiring of the faults benchmark's DAG (the real ConvertCorpus, then fake stages)."""
import luigi

from pipeline.engine.task import NestTask
from pipeline.dag import ConvertCorpus


class _Fault(NestTask):
    stage_module = "bench_fault_stage"
    seed = luigi.IntParameter(default=0)
    size = luigi.IntParameter(default=2_000_000)


class FaultA(_Fault):
    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"name": "A", "seed": self.seed, "size": self.size}


class FaultB(_Fault):
    def requires(self):
        return {"upstream": FaultA(seed=self.seed, size=self.size)}

    def stage_params(self):
        return {"name": "B", "seed": self.seed, "size": self.size}


class FaultC(_Fault):
    def requires(self):
        return {"passages": ConvertCorpus()}

    def stage_params(self):
        return {"name": "C", "seed": self.seed, "size": self.size, "files": 2}


class FaultTop(luigi.WrapperTask):
    seed = luigi.IntParameter(default=0)
    size = luigi.IntParameter(default=2_000_000)

    def requires(self):
        return [FaultB(seed=self.seed, size=self.size), FaultC(seed=self.seed, size=self.size)]
'''

# Hook for more fault rounds (helper "remote": push/pull): (name, argv(round_index) -> list[str]). Each command is
# killed at a random moment, rerun, and the local store verified like the `nest run` rounds.
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _verify_remote(url: Path, scratch: Path) -> tuple[int, int, list[str]]:
    """(published artifacts, ones that do not pull whole, their problems): every artifact with a remote manifest is
    pulled into a scratch store and verified there."""
    import shutil


    if not url.exists():  # a push killed before it made the remote's folder: nothing published
        return 0, 0, []
    remote = Remote(str(url))
    check = scratch / "verify-store"
    shutil.rmtree(check, ignore_errors=True)
    store = Store(check)
    n = bad = 0
    problems = []
    for stage, key in remote.list():
        n += 1
        try:
            remote.pull(store, stage, key)
            found = store.verify(stage, key)
        except Exception as e:  # noqa: BLE001  (any refusal of a published artifact counts)
            found = [str(e)]
        if found:
            bad += 1
            problems.append(f"{stage}/{key[:12]}: {found[0]}")
    shutil.rmtree(check, ignore_errors=True)
    return n, bad, problems


def _remote_rounds(kind: str, kills: int, rng: random.Random, env: dict, scratch: Path, store: Path,
                   complete_remote: Path) -> dict:
    """``kind`` = push | pull: ``kills`` rounds of kill, verify, rerun, verify (see the module docstring)."""
    import shutil

    def target(i: int) -> tuple[list[str], dict, Path]:
        if kind == "push":
            dest = scratch / f"push-{i}"
            return _cli("push", "--all", "--remote", str(dest)), env, dest
        dest = scratch / f"pull-{i}"
        return _cli("pull", "--all", "--remote", str(complete_remote)), {**env, "NEST_STORE": str(dest)}, dest

    def verify(dest: Path) -> tuple[int, int, list[str]]:
        return _verify_remote(dest, scratch) if kind == "push" else _verify_store(dest)

    argv, env0, dest0 = target(0)
    rc, err, clean_s = _run(argv, env0, ROOT, None)
    if rc != 0:
        raise RuntimeError(f"the clean {kind} failed (exit {rc}): {[line for _t, line in err[-3:]]}")
    n_clean = verify(dest0)[0]
    shutil.rmtree(dest0, ignore_errors=True)
    corrupt = unfinished = killed = 0
    rounds = []
    for i in range(1, kills + 1):
        argv, env_i, dest = target(i)
        delay = rng.uniform(0.4 * clean_s, max(0.5, clean_s))  # past the start-up, into the transfers
        rc_k, _err, _ = _run(argv, env_i, ROOT, delay)
        killed += rc_k == -signal.SIGKILL
        n_k, bad_k, problems = verify(dest)
        rc_r, err_r, _ = _run(argv, env_i, ROOT, None)
        n_r, bad_r, problems2 = verify(dest)
        left = _check_left(kind, i)
        corrupt += bad_k + bad_r
        unfinished += rc_r != 0 or n_r != n_clean
        rounds.append({"round": i, "kill_after_s": round(delay, 2), "killed": rc_k == -signal.SIGKILL,
                       "published_after_kill": n_k, "corrupt_after_kill": bad_k, "rerun_exit": rc_r,
                       "published_after_rerun": n_r, "corrupt_after_rerun": bad_r, "problems": (problems + problems2)[:3],
                       "processes_left": left,
                       "rerun_error": "" if rc_r == 0 else (err_r[-1][1] if err_r else "")})
        print(f"[faults] {kind} round {i}/{kills}: killed after {delay:.1f} s with {n_k} of {n_clean} published; "
              f"corrupt {bad_k}+{bad_r}; rerun exit {rc_r}", file=sys.stderr, flush=True)
        shutil.rmtree(dest, ignore_errors=True)
    return {"clean_s": round(clean_s, 1), "artifacts": n_clean, "kills_landed": killed, "corrupt": corrupt,
            "not_finished": unfinished, "rounds": rounds}


def _flips(n: int, rng: random.Random, scratch: Path, complete_remote: Path) -> dict:
    """``n`` flipped bytes, alternately in an archive and in a manifest: (refused pulls, pulls that let it in)."""
    import shutil


    refused = accepted = 0
    for i in range(n):
        copy = scratch / f"flip-{i}"
        shutil.copytree(complete_remote, copy)
        remote = Remote(str(copy))
        stage, key = rng.choice(remote.list())
        path = Path(remote.archive_path(stage, key) if i % 2 == 0 else remote.manifest_path(stage, key))
        data = bytearray(path.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        store = Store(scratch / f"flip-store-{i}")
        try:
            remote.pull(store, stage, key)
            accepted += 1
        except Exception:  # noqa: BLE001
            refused += 1 if not store.complete(stage, key) else 0
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(store.root, ignore_errors=True)
    return {"flips": n, "refused": refused, "accepted": accepted}


def _nest_argv(limit: int, seed: int, size: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--set", f"ConvertCorpus.limit={limit}", "FaultTop",
            "--module", "bench_fault_dag", "--seed", str(seed), "--size", str(size)]


def _verify_store(root: Path) -> tuple[int, int, list[str]]:
    """(complete artifacts, corrupt-complete ones, their problems) over every manifest of the store."""

    store = Store(root)
    n = bad = 0
    problems = []
    for ref in store.folders():
        if not store.complete(ref.stage, ref.key):
            continue
        n += 1
        found = store.verify(ref.stage, ref.key)
        if found:
            bad += 1
            problems.append(f"{ref.stage}/{ref.key[:12]}: {found[0]}")
    return n, bad, problems


def _leftovers(root: Path) -> int:
    """Temp folders and manifest-less key folders (what a kill leaves until the next build of that stage clears it)."""

    store = Store(root)
    tmp = sum(1 for s in store.stages() for _ in store._tmp_folders(s))
    half = sum(1 for r in store.folders() if not store.complete(r.stage, r.key))
    return tmp + half


def _run(argv: list[str], env: dict, cwd: Path, kill_after: float | None) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``argv`` in its own process group, ``kill -9`` the group after ``kill_after`` seconds (None: no kill).
    Returns the exit status, the stderr lines with their times since the start, and the wall time."""
    import threading

    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)

    def read():
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=kill_after if kill_after is not None else WATCH["timeout"])
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        if kill_after is None:  # a run nobody killed that did not end within the timeout: hung
            WATCH["hung"].append({"kind": WATCH["kind"], "argv": " ".join(argv[2:])[:200]})
    reader.join(timeout=10)
    return rc, lines, time.perf_counter() - t0


# ---- every process the bench starts carries MARK_VAR in its environment (children inherit it, also those in their own
# session, the JVM indexer's included): after each round, any still running is a process left behind -------------------

MARK_VAR = "FAULTS_BENCH_MARK"
WATCH: dict = {"timeout": 180.0, "kind": "run", "hung": [], "left": {}, "checks": 0}


def _strays(mark: str, grace: float = 5.0) -> list[dict]:
    """Processes whose environment holds ``MARK_VAR=mark``, still running ``grace`` s after the round (zombies do not
    count); each is then killed so that the next round starts clean."""
    import psutil

    me = os.getpid()

    def living() -> list:
        out = []
        for p in psutil.process_iter(["pid", "environ", "status"], ad_value=None):
            env = p.info.get("environ") or {}
            if p.pid != me and env.get(MARK_VAR) == mark and p.info.get("status") != psutil.STATUS_ZOMBIE:
                out.append(p)
        return out

    found = still_running(living, grace)
    for p, _ in found:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [d for _, d in found]


def _check_left(kind: str, round_no: int | str) -> int:
    """Count (under ``kind``) the marked processes still running after a round; returns how many."""
    mark = os.environ.get(MARK_VAR)
    if not mark:
        return 0
    WATCH["checks"] += 1
    found = _strays(mark)
    if found:
        WATCH["left"].setdefault(kind, []).extend({"round": round_no, **f} for f in found)
        print(f"[faults] {kind} round {round_no}: {len(found)} process(es) left running: "
              f"{[f['cmdline'][:80] for f in found]}", file=sys.stderr, flush=True)
    return len(found)


def _landed(lines: list[tuple[float, str]]) -> str:
    """The stage the run was building when it died (its last ``building`` line without a ``built`` line)."""
    building, seen = None, False
    for _t, line in lines:
        if line.startswith("[nest] ") and line.endswith(": building"):
            building, seen = line[len("[nest] "):].split()[0], True
        elif line.startswith("[nest] ") and ": built in " in line:
            building = None
    if building:
        return building
    return "between two stages" if seen else "start-up (before the first stage)"


def _first_build_s(lines: list[tuple[float, str]]) -> float:
    return next((t for t, line in lines if line.endswith(": building")), 0.3)


def _goal(value_ok: bool) -> str:
    return "met" if value_ok else "**missed**"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 rounds of each kind (checks the benchmark itself)")
    ap.add_argument("--kills", type=int, default=40,
                    help="kill rounds of each of nest run, push --all, pull --all (40: >= 100 kills land in all)")
    ap.add_argument("--size", type=int, default=2_000_000, help="bytes per fake file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--race-repeats", type=int, default=20, help="rounds of the two-push race (quick: 3)")
    ap.add_argument("--race-mib", type=int, default=128, help="MiB of the raced artifact (quick: 32)")
    ap.add_argument("--worker-rounds", type=int, default=20,
                    help="rounds of two nest workers under luigid, one kill -9'd (bench/faults_workers.py; quick: 3)")
    ap.add_argument("--stop-rounds", type=int, default=20,
                    help="SIGTERM / SIGINT / kill -9 rounds (bench/faults_stop.py; quick: 3)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a process counts as hung")
    args = ap.parse_args(argv)
    quick = args.quick
    kills = 3 if quick else args.kills
    race_n = 3 if quick else args.race_repeats
    worker_n = 3 if quick else args.worker_rounds
    stop_n = 3 if quick else args.stop_rounds
    rng = random.Random(args.seed)
    WATCH.update(timeout=args.timeout, kind="run", hung=[], left={}, checks=0)
    errors: dict[str, str] = {}
    t_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="nest-faults-") as scratch:
        scratch = Path(scratch)
        os.environ[MARK_VAR] = str(scratch)  # every process the bench starts inherits it (see _strays)
        try:
            mods = scratch / "mods"
            mods.mkdir()
            (mods / "bench_fault_stage.py").write_text(STAGE_SRC)
            (mods / "bench_fault_dag.py").write_text(DAG_SRC)
            store = scratch / "store"
            env = {**os.environ, "NEST_STORE": str(store), "PYTHONPATH": os.pathsep.join([str(ROOT), str(mods)]),
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            env.pop("NEST_REMOTE", None)

            WATCH["kind"] = "local build"
            rc, err, clean_s = _run(_nest_argv(200, 0, args.size), env, ROOT, None)
            if rc != 0:
                raise RuntimeError(f"the clean run failed (exit {rc}): {[line for _t, line in err[-3:]]}")
            startup_s = _first_build_s(err)  # kills land between the first stage starting and the run's end
            rounds, landed = [], {}
            corrupt_local_rounds = unfinished_local = 0
            for i in range(1, kills + 1):
                cmd = _nest_argv(200 + i, i, args.size)  # new keys every round: there is always work to kill
                delay = rng.uniform(startup_s, max(startup_s + 0.3, clean_s))
                rc_k, err_k, _ = _run(cmd, env, ROOT, delay)
                where = _landed(err_k) if rc_k == -signal.SIGKILL else f"finished before the kill (exit {rc_k})"
                landed[where] = landed.get(where, 0) + 1
                n_after_kill, bad_after_kill, problems = _verify_store(store)
                left_after_kill = _leftovers(store)
                rc_r, err_r, rerun_s = _run(cmd, env, ROOT, None)
                n_after_rerun, bad_after_rerun, problems2 = _verify_store(store)
                left_running = _check_left("local build", i)
                ok = rc_r == 0
                unfinished_local += not ok
                corrupt_local_rounds += bad_after_kill + bad_after_rerun
                rounds.append({"round": i, "kill_after_s": round(delay, 2), "killed": rc_k == -signal.SIGKILL,
                               "landed_in": where, "complete_after_kill": n_after_kill,
                               "corrupt_after_kill": bad_after_kill, "leftovers_after_kill": left_after_kill,
                               "rerun_exit": rc_r, "rerun_s": round(rerun_s, 1), "corrupt_after_rerun": bad_after_rerun,
                               "leftovers_after_rerun": _leftovers(store), "processes_left": left_running,
                               "problems": (problems + problems2)[:3],
                               "rerun_error": "" if ok else (err_r[-1][1] if err_r else "")})
                print(f"[faults] round {i}/{kills}: killed after {delay:.1f} s in {where}; corrupt {bad_after_kill}"
                      f"+{bad_after_rerun}; rerun exit {rc_r}", file=sys.stderr, flush=True)
            complete_remote = scratch / "remote"
            WATCH["kind"] = "push"
            rc_p, err_p, _ = _run(_cli("push", "--all", "--remote", str(complete_remote)), env, ROOT, None)
            if rc_p != 0:
                raise RuntimeError(f"pushing the store failed (exit {rc_p}): {[line for _t, line in err_p[-3:]]}")
            remote_rounds = {}
            for kind in ("push", "pull"):
                WATCH["kind"] = kind
                remote_rounds[kind] = _remote_rounds(kind, kills, rng, env, scratch, store, complete_remote)
            flips = _flips(max(4, kills // 2), rng, scratch, complete_remote)
            WATCH["kind"] = "push race"
            race = _push_race(race_n, rng, env, scratch, 32 if quick else args.race_mib, args.timeout)
            crafted = _crafted_names(scratch)
            n_final, bad_final, _ = _verify_store(store)

            WATCH["kind"] = "two-worker"
            try:
                workers = worker_rounds(worker_n, scratch / "workers", rng, timeout=max(150.0, args.timeout))
            except Exception as e:  # noqa: BLE001  (reported, and the other kinds' figures kept)
                errors["two-worker"] = f"{type(e).__name__}: {e}"[:400]
                workers = {"rounds": worker_n, "kills": 0, "hung": 0, "not_finished": worker_n, "corrupt_complete": 0,
                           "corrupt_remote": 0, "left_running": 0, "artifacts_checked": 0, "details": []}
            _check_left("two-worker", "after all")


            WATCH["kind"] = "stop signals"
            try:
                stops = stop_rounds(stop_n, scratch / "stops", rng, timeout=args.timeout)
            except Exception as e:  # noqa: BLE001
                errors["stop signals"] = f"{type(e).__name__}: {e}"[:400]
                stops = None
            _check_left("stop signals", "after all")
            _check_left("end of the bench", "sweep")
        finally:
            os.environ.pop(MARK_VAR, None)
    elapsed = time.perf_counter() - t_all

    # ---- the figures -----------------------------------------------------------------------------------------------
    left = {k: len(v) for k, v in WATCH["left"].items()}
    hung_watch = {}
    for h in WATCH["hung"]:
        hung_watch[h["kind"]] = hung_watch.get(h["kind"], 0) + 1
    st_rounds = stops["rounds"] if stops else []
    st_landed = [r for r in st_rounds if not r["finished_first"]]
    st_k9 = sum(r["signal"] == "SIGKILL" for r in st_landed)
    st_by_sig = {s: sum(r["signal"] == s for r in st_landed) for s in ("SIGTERM", "SIGINT", "SIGKILL")}
    w_corrupt_remote = workers.get("corrupt_remote", 0)
    w_corrupt_local = workers["corrupt_complete"] - w_corrupt_remote
    kinds = [  # (label, rounds, kill -9s landed, landed text, corrupt local, corrupt remote, not finished, hung, left)
        ("local `nest run` (kill -9 of the group)", kills, sum(r["killed"] for r in rounds), None,
         corrupt_local_rounds, 0, unfinished_local, hung_watch.get("local build", 0), left.get("local build", 0)),
        ("`nest push --all` (kill -9)", kills, remote_rounds["push"]["kills_landed"], None, 0,
         remote_rounds["push"]["corrupt"], remote_rounds["push"]["not_finished"], hung_watch.get("push", 0),
         left.get("push", 0)),
        ("`nest pull --all` (kill -9)", kills, remote_rounds["pull"]["kills_landed"], None,
         remote_rounds["pull"]["corrupt"], 0, remote_rounds["pull"]["not_finished"], hung_watch.get("pull", 0),
         left.get("pull", 0)),
        ("push race: two `nest push` of one key, A kill -9'd (item 1)", race_n, race["killed"],
         f"{race['killed']} ({race['killed_mid_copy']} mid-copy)", 0, race["corrupt_published"],
         race["b_not_finished"], race["hung"] + hung_watch.get("push race", 0), left.get("push race", 0)),
        ("two `nest worker`s under luigid, one kill -9'd (item 4)", worker_n, workers["kills"], None, w_corrupt_local,
         w_corrupt_remote, workers["not_finished"], workers["hung"],
         workers["left_running"] + left.get("two-worker", 0)),
        ("stop rounds: SIGTERM / SIGINT / kill -9 (fake DAG w1, w2; BuildBM25Index)", stop_n, st_k9,
         f"{len(st_landed)} (SIGTERM {st_by_sig['SIGTERM']}, SIGINT {st_by_sig['SIGINT']}, kill -9 {st_k9})",
         stops["corrupt_complete_artifacts"] if stops else 0, 0,
         stops["runs_not_finished_on_rerun"] if stops else stop_n, stops["hung_runs"] if stops else 0,
         (stops["processes_left_running"] if stops else 0) + left.get("stop signals", 0)),
    ]
    total_k9 = sum(k[2] for k in kinds)
    all_landed = total_k9 + len(st_landed) - st_k9
    corrupt_local = sum(k[4] for k in kinds) + bad_final
    corrupt_remote = sum(k[5] for k in kinds)
    not_finished = sum(k[6] for k in kinds)
    runs_total = sum(k[1] for k in kinds)
    hung = sum(k[7] for k in kinds) + sum(v for k, v in hung_watch.items()
                                          if k not in ("local build", "push", "pull", "push race"))
    procs_left = sum(k[8] for k in kinds) + left.get("end of the bench", 0)
    stop_other = {k: stops[k] for k in ("wrong_exit_codes", "not_one_line", "temp_folders_left")} if stops else {}
    summary = {
        "kill9_landed": {k[0]: k[2] for k in kinds}, "kill9_landed_total": total_k9,
        "signals_landed_total": all_landed, "corrupt_complete_local": corrupt_local,
        "corrupt_complete_remote": corrupt_remote, "hung_runs": hung, "runs_not_finished_after_rerun": not_finished,
        "rounds_total": runs_total, "processes_left_running": procs_left, "process_checks": WATCH["checks"],
        "flips_refused": flips["refused"], "flips": flips["flips"], "crafted_refused": crafted["refused"],
        "crafted": crafted["cases"], "push_race_repeats": race_n, "worker_race_repeats": worker_n,
        "stop_other": stop_other, "errors": errors,
    }
    goals = {
        "kill9_landed_total": (total_k9, ">= 100", total_k9 >= 100),
        "corrupt_complete_local": (corrupt_local, "0", corrupt_local == 0),
        "corrupt_complete_remote": (corrupt_remote, "0", corrupt_remote == 0),
        "hung_runs": (hung, "0", hung == 0),
        "runs_not_finished_after_rerun": (not_finished, "0", not_finished == 0),
        "processes_left_running": (procs_left, "0", procs_left == 0),
        "flips_refused": (flips["refused"], f"all {flips['flips']}", flips["refused"] == flips["flips"]),
        "crafted_refused": (crafted["refused"], f"all {crafted['cases']}", crafted["refused"] == crafted["cases"]),
        "push_race_repeats": (race_n, ">= 20", race_n >= 20),
        "worker_race_repeats": (worker_n, ">= 20", worker_n >= 20),
        "stop_wrong_exit_not_one_line_temp_left": (sum(stop_other.values()), "0",
                                                    bool(stops) and sum(stop_other.values()) == 0),
        "no_errors": (len(errors), "0", not errors),
    }
    summary["goals"] = {k: {"value": v, "goal": g, "met": ok} for k, (v, g, ok) in goals.items()}
    summary["all_goals_met"] = all(ok for _v, _g, ok in goals.values())

    killed = sum(r["killed"] for r in rounds)
    result = {
        "summary": summary, "seed": args.seed, "timeout_s": args.timeout,
        "kills_attempted": kills, "kills_landed": killed, "clean_run_s": round(clean_s, 1),
        "startup_s": round(startup_s, 1), "corrupt_complete_artifacts": corrupt_local + corrupt_remote,
        "runs_not_finished_after_rerun": not_finished,
        "artifacts_verified_at_end": n_final, "corrupt_at_end": bad_final, "landed_in": landed,
        "leftovers_after_kills": sum(r["leftovers_after_kill"] for r in rounds),
        "leftovers_after_reruns": sum(r["leftovers_after_rerun"] for r in rounds[-1:]),
        "processes_left": WATCH["left"], "hung": WATCH["hung"],
        "rounds": rounds, "remote": remote_rounds, "flips": flips, "push_race": race, "crafted_names": crafted,
        "workers": workers, "stops": stops, "errors": errors,
        "elapsed_s": round(elapsed, 1), "quick": quick,
    }
    cmdline = "python -m bench.run " + ("--quick " if quick else "") + "faults " + " ".join(
        a for a in (argv or []) if a != "--quick")
    g = summary["goals"]
    lines = [
        "# Faults: kills during builds, pushes, pulls, races and two-worker runs; a rerun after each",
        "",
        f"`{cmdline.strip()}` (seed {args.seed}), {elapsed / 60:.0f} min"
        + (" (quick: a few rounds of each kind, figures not meaningful)" if quick else "") + ". "
        "Every round is bounded by a timeout "
        f"({args.timeout:.0f} s; two-worker survivors {max(150.0, args.timeout):.0f} s); after every round, any process "
        "the bench started (all carry a marker in their environment, inherited by children in their own session, the "
        "Lucene indexer's JVM included) still running counts as left running, and is then killed.",
        "",
        "| kind | rounds | landed mid-work | corrupt-complete (local / remote) | not finished after a rerun | hung "
        "| left running |",
        "|---|---|---|---|---|---|---|",
        *[f"| {k[0]} | {k[1]} | {k[3] or k[2]} | {k[4]} / {k[5]} | {k[6]} | {k[7]} | {k[8]} |" for k in kinds],
        "",
        "| figure | value | goal | |",
        "|---|---|---|---|",
        f"| `kill -9`s landed mid-work, all kinds above | **{total_k9}** (with SIGTERM / SIGINT: {all_landed}) "
        f"| ≥ 100 | {_goal(g['kill9_landed_total']['met'])} |",
        f"| corrupt-but-complete artifacts, local (incl. {n_final} verified at the end) | {corrupt_local} | 0 "
        f"| {_goal(corrupt_local == 0)} |",
        f"| corrupt-but-complete artifacts, remote | {corrupt_remote} | 0 | {_goal(corrupt_remote == 0)} |",
        f"| hung runs | {hung} | 0 | {_goal(hung == 0)} |",
        f"| runs not finished after a rerun | {not_finished} of {runs_total} | 0 | {_goal(not_finished == 0)} |",
        f"| processes left running ({WATCH['checks']} sweeps, plus each kind's own per-round check) | {procs_left} "
        f"| 0 | {_goal(procs_left == 0)} |",
        f"| flipped bytes refused | {flips['refused']} of {flips['flips']} | all | "
        f"{_goal(g['flips_refused']['met'])} |",
        f"| crafted names refused | {crafted['refused']} of {crafted['cases']} | all | "
        f"{_goal(g['crafted_refused']['met'])} |",
        f"| push race repeats (item 1) | {race_n} | ≥ 20 | {_goal(race_n >= 20)} |",
        f"| two-worker race repeats (item 4) | {worker_n} | ≥ 20 | {_goal(worker_n >= 20)} |",
        f"| stop rounds: wrong exit codes / not one `nest:` line / temp folders left | "
        + (" / ".join(str(v) for v in stop_other.values()) if stops else "not run")
        + f" | 0 | {_goal(g['stop_wrong_exit_not_one_line_temp_left']['met'])} |",
    ]
    if errors:
        lines += ["", "Errors (a kind that could not run): " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    if WATCH["left"]:
        lines += ["", "Left running: " + "; ".join(f"{k} round {d['round']}: `{d['cmdline'][:120]}`"
                                                    for k, v in WATCH["left"].items() for d in v)]
    if WATCH["hung"]:
        lines += ["", "Hung: " + "; ".join(f"{h['kind']}: `{h['argv']}`" for h in WATCH["hung"])]
    lines += [
        "",
        "## Local kill rounds",
        "",
        f"{kills} rounds ({killed} killed mid-run" + (", the rest finished first" if killed < kills else "") + ") on a DAG of the real ConvertCorpus "
        f"(embedded corpus, limit 200+round) and three fake stages writing {args.size / 1e6:.0f} MB files in chunks; "
        f"clean run {clean_s:.1f} s, its first stage starting at {startup_s:.1f} s; kill delay uniform in between. "
        "Every manifest of the store verified "
        "(size and sha256 of each file) after each kill and each rerun.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| artifacts that look complete but are corrupt | {corrupt_local_rounds} | 0 |",
        f"| runs not finished after a rerun | {unfinished_local} of {kills} | 0 |",
        f"| artifacts verified at the end | {n_final} ({bad_final} corrupt) | all verify |",
        f"| leftovers (temp / manifest-less folders) right after the kills, summed | "
        f"{result['leftovers_after_kills']} | cleared by the next build |",
        "",
        "Where the kills landed: " + ", ".join(f"{k} ×{v}" for k, v in sorted(landed.items())) + ".",
        "",
        "## Push and pull kill rounds, flipped bytes",
        "",
        "A local-folder remote, with the store those rounds filled "
        f"({remote_rounds['push']['artifacts']} artifacts; a clean push {remote_rounds['push']['clean_s']} s, "
        f"a clean pull {remote_rounds['pull']['clean_s']} s): every published remote artifact pulled and verified "
        "after each push kill and rerun, the local store verified after each pull kill and rerun.",
        "",
        "| remote | kills landed | corrupt-complete | not finished after a rerun |",
        "|---|---|---|---|",
        *[f"| `nest {k} --all` | {r['kills_landed']} of {kills} | {r['corrupt']} | {r['not_finished']} |"
          for k, r in remote_rounds.items()],
        "",
        f"Flipped bytes (archives and manifests alternately, random offsets): {flips['refused']} of {flips['flips']} "
        f"pulls refused with nothing published, {flips['accepted']} let in (goal 0).",
        "",
        "## Push race (item 1)",
        "",
        f"{race['repeats']} rounds: two `nest push` of one {race['artifact_mib']} MiB "
        f"artifact to a fresh folder remote, `$TMPDIR` on {race['tmpdir_on']}; A SIGSTOPped once its copy started, B "
        f"pushed to the end, A SIGCONTed and SIGKILLed at a random point of its copy (uniform over a clean push's "
        f"copy, {race['clean_push_s']} s); every published artifact pulled and verified.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| A killed while still running | {race['killed']} of {race['repeats']} | |",
        f"| ... while its temp file was being written (mid-copy) | {race['killed_mid_copy']} of "
        f"{race['repeats']} | |",
        f"| B not finished (exit ≠ 0) | {race['b_not_finished']} | 0 |",
        f"| published artifacts that do not pull whole | {race['corrupt_published']} of {race['published']} | 0 |",
        f"| files left in A's `$TMPDIR` | {race['tmpdir_files_left']} | 0 |",
        f"| temp files left on the remote (A's, never read; `nest push --clean-stale`) | "
        f"{race['remote_temp_files_left']} | |",
        f"| hung pushes (over {args.timeout:.0f} s) | {race['hung']} | 0 |",
        "",
        f"Crafted names from a remote listing or manifest: {crafted['refused']} of {crafted['cases']} refused with nothing written, "
        f"{crafted['written']} wrote something (goal 0): "
        + "; ".join(f"{d['case']}: {'refused' if d['refused'] else 'NOT refused'}" for d in crafted["details"]) + ".",
        "",
        "## Two workers under luigid (item 4)",
        "",
        f"{worker_n} rounds (`bench/faults_workers.py`): a `luigid` on 127.0.0.1, a folder remote, one store per worker; "
        "two `nest worker FwWork --FwWork-shards 4` (1 or 2 processes each, at random) started within a second of "
        "each other on new keys, one of them (at random) `kill -9`'d (its process group) 0.3-4 s in; the survivor must "
        "finish the merged artifact on the remote. Every artifact with a manifest (both stores) and every published one "
        f"(pulled into a scratch store) verified: {workers['artifacts_checked']} checks.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| kills landed (the victim still running) | {workers['kills']} of {worker_n} | |",
        f"| survivor hung | {workers['hung']} | 0 |",
        f"| not finished (survivor exit ≠ 0 or no merged artifact on the remote) | {workers['not_finished']} | 0 |",
        f"| corrupt-complete (local / remote) | {w_corrupt_local} / {w_corrupt_remote} | 0 |",
        f"| processes of the round left running | {workers['left_running']} | 0 |",
        "",
    ]
    if stops:
        lines += ["## " + stop_markdown(stops).lstrip("# "), "",
                  f"Clean runs (first building line to end): "
                  + ", ".join(f"{k} {v} s" for k, v in stops["clean_s"].items())
                  + ". Kinds in turn (fake DAG `--workers 1`, `--workers 2`, the real BuildBM25Index whose Lucene "
                  "indexer is a child JVM); signals in turn (SIGTERM to the command, SIGINT to the group, and "
                  "`kill -9` for BuildBM25Index)."]
    result["markdown"] = "\n".join(lines)
    return result




# ---- two pushes of one key racing, one killed mid-copy; crafted names from a remote -------------------------------

RACE_KEY = "e" * 64


def _race_store(scratch: Path, mib: int) -> Path:
    """A store with one artifact of ``mib`` MiB of random hex text: compressible, so zstd works on every block (random
    bytes are stored raw, and their copy is over before a kill can land in it)."""

    root = scratch / "race-store"
    Store(root).publish("RaceBig", RACE_KEY, lambda out: (out / "big.bin").write_bytes(os.urandom(mib << 19).hex().encode()),
                        version="1", params={"mib": mib}, inputs={})
    return root


def _temp_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _push_race(repeats: int, rng: random.Random, env: dict, scratch: Path, mib: int, timeout_s: float) -> dict:
    """Two pushes of one key to a folder remote (``$TMPDIR`` on another file system when ``/dev/shm`` exists, as NFS
    is): A is SIGSTOPped once its copy has started, B pushes to the end, A is SIGCONTed and SIGKILLed at a random point
    of the rest of its copy. Counted: published artifacts that do not pull whole (goal 0), files left in A's
    ``$TMPDIR`` (goal 0), temp files left on the remote (A's, under a name nothing reads), hung pushes (goal 0)."""
    import shutil


    store = _race_store(scratch, mib)
    shm = Path("/dev/shm")
    tmp_base = Path(tempfile.mkdtemp(prefix="nest-race-", dir=shm if shm.is_dir() else scratch))
    argv = lambda remote: _cli("push", "RaceBig", "--remote", str(remote))  # noqa: E731
    env_s = {**env, "NEST_STORE": str(store)}
    # a clean push: how long its copy takes (from its temp file appearing on the remote to its exit)
    clean_dir = scratch / "race-clean"
    (clean_dir / "RaceBig").mkdir(parents=True)
    proc = subprocess.Popen(argv(clean_dir), env=env_s, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t_copy = None
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if t_copy is None and any(p.name.startswith(".") for p in (clean_dir / "RaceBig").iterdir()):
            t_copy = time.perf_counter()
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    clean_s = time.perf_counter() - (t_copy or time.perf_counter())
    clean_s = max(clean_s, 0.05)
    shutil.rmtree(clean_dir, ignore_errors=True)
    corrupt = tmp_left = remote_temps = hung = killed_mid_copy = published = 0
    rounds = []
    try:
        for i in range(1, repeats + 1):
            remote_dir = scratch / f"race-{i}"
            (remote_dir / "RaceBig").mkdir(parents=True)
            tmpdir = tmp_base / f"r{i}"
            tmpdir.mkdir()
            env_a = {**env_s, "TMPDIR": str(tmpdir)}
            a = subprocess.Popen(argv(remote_dir), env=env_a, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + timeout_s
            started = False
            while time.monotonic() < deadline and a.poll() is None:  # A's copy started: a temp file on the remote
                if any(p.name.startswith(".") for p in (remote_dir / "RaceBig").iterdir()):
                    started = True
                    break
                time.sleep(0.005)
            hang = False
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGSTOP)
            try:
                b = subprocess.run(argv(remote_dir), env=env_s, cwd=ROOT, capture_output=True, timeout=timeout_s)
                rc_b = b.returncode
            except subprocess.TimeoutExpired:
                rc_b, hang = None, True
            delay = rng.uniform(0.0, clean_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.pid, signal.SIGCONT)
            in_copy = False
            try:
                rc_a = a.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                in_copy = any(p.name.startswith(".") for p in (remote_dir / "RaceBig").iterdir())  # its temp file
                os.killpg(a.pid, signal.SIGKILL)
                rc_a = a.wait(timeout=30)
            killed_mid_copy += rc_a == -signal.SIGKILL and in_copy
            hung += hang
            n, bad, problems = _verify_remote(remote_dir, scratch)
            published += n
            corrupt += bad
            left = _temp_files(tmpdir)
            tmp_left += left
            on_remote = sum(1 for p in (remote_dir / "RaceBig").iterdir() if p.name.startswith("."))
            remote_temps += on_remote
            left_running = _check_left("push race", i)
            rounds.append({"round": i, "a_in_copy_when_stopped": started, "a_killed_mid_copy": in_copy, "b_exit": rc_b, "a_exit": rc_a,
                           "kill_after_cont_s": round(delay, 2), "published": n, "corrupt_published": bad,
                           "tmpdir_files_left": left, "remote_temp_files": on_remote, "hung": hang,
                           "processes_left": left_running,
                           "problems": problems[:2]})
            print(f"[faults] push race {i}/{repeats}: A {'killed' if rc_a == -signal.SIGKILL else f'exit {rc_a}'} "
                  f"{delay:.2f} s after CONT; B exit {rc_b}; published {n}, corrupt {bad}; $TMPDIR left {left}, "
                  f"remote temp {on_remote}", file=sys.stderr, flush=True)
            shutil.rmtree(remote_dir, ignore_errors=True)
            shutil.rmtree(tmpdir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_base, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return {"repeats": repeats, "artifact_mib": mib, "clean_push_s": round(clean_s, 2), "clean_copy_s": round(clean_s, 2),
            "killed": sum(r["a_exit"] == -signal.SIGKILL for r in rounds), "killed_mid_copy": killed_mid_copy,
            "b_not_finished": sum(r["b_exit"] != 0 for r in rounds), "published": published, "corrupt_published": corrupt,
            "tmpdir_files_left": tmp_left, "remote_temp_files_left": remote_temps, "hung": hung,
            "tmpdir_on": "/dev/shm (another file system)" if shm.is_dir() else "the scratch folder", "rounds": rounds}


def _forged_size(manifest: bytes) -> bytes:
    d = json.loads(manifest)
    d["remote"]["archive"]["size"] = "big"
    d["manifest_sha256"] = _digest(d)
    return json.dumps(d).encode()


def _crafted_names(scratch: Path) -> dict:
    """Crafted stage names and keys in a remote listing or manifest: each pull must be refused with
    nothing written outside the store's own stage folders."""
    import hashlib
    import io
    import shutil
    import tarfile

    import zstandard  # lazy: start-up time


    key = "d" * 64
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue())
    files = {"x.txt": {"size": 2, "sha256": hashlib.sha256(b"hi").hexdigest()}}

    def doc(stage: str, **extra) -> bytes:
        d = remote_manifest({"format": 1, "stage": stage, "key": key, "files": files, **extra},
                            {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        return json.dumps(d).encode()

    # (case, folder the objects go in, manifest document, listing paths forced: None = the folder's own)
    cases = [
        ("listing stage '..' (an S3 key prefix/../<key>)", "Ok", doc(".."), ".."),
        ("listing stage 'runs'", "runs", doc("runs"), None),
        ("listing stage '1bad'", "1bad", doc("1bad"), None),
        ("listing stage with a space", "a b", doc("a b"), None),
        ("manifest stage '..' in a good folder", "Ok", doc(".."), None),
        ("manifest input '../../x'", "Ok", doc("Ok", inputs={"p": {"stage": "../../x", "key": "zz"}}), None),
        ("manifest archive size 'big' (digest recomputed)", "Ok", _forged_size(doc("Ok")), None),
    ]
    refused = written = 0
    out = []
    for i, (name, folder, manifest, forced) in enumerate(cases):
        box = scratch / f"crafted-{i}"
        remote_dir = box / "remote"
        (remote_dir / folder).mkdir(parents=True)
        (remote_dir / folder / f"{key}.tar.zst").write_bytes(blob)
        (remote_dir / folder / f"{key}.manifest.json").write_bytes(manifest)
        store = Store(box / "store")
        remote = Remote(str(remote_dir))
        if forced:  # what s3fs lists for an object key with a '..' segment
            real_glob = remote.fs.glob
            remote.fs.glob = lambda pattern, _f=forced, _r=str(remote_dir): [f"{_r}/{_f}/{key}.manifest.json"]
        before = {p for p in box.rglob("*")}
        said = ""
        try:
            refs = remote.list()
            said = "; ".join(remote.refused)
            for stage, k in refs:
                remote.pull(store, stage, k)
            ok = bool(remote.refused) or not refs
        except RemoteError as e:
            said, ok = str(e), True
        if forced:
            remote.fs.glob = real_glob
        new = {p for p in box.rglob("*")} - before
        outside = [p for p in new if store.root not in p.parents and p != store.root]
        in_store = [p for p in new if p.is_file() and store.root in p.parents]
        good = ok and not outside and not in_store
        refused += good
        written += bool(outside or in_store)
        out.append({"case": name, "refused": good, "said": said[:160], "written": [str(p) for p in outside + in_store]})
        shutil.rmtree(box, ignore_errors=True)
    return {"cases": len(cases), "refused": refused, "written": written, "details": out}


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in main(sys.argv[1:]).items() if k != "markdown"}, indent=1))
