"""Faults benchmark: random ``kill -9`` during ``nest run``, a rerun after each, every manifest verified.

    python -m bench.run faults                    # 20 kills (a few minutes)
    python -m bench.run faults --kills 40
    python -m bench.run --quick faults            # 3 kills, to check the benchmark itself

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
  each must be refused with nothing written.
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
        corrupt += bad_k + bad_r
        unfinished += rc_r != 0 or n_r != n_clean
        rounds.append({"round": i, "kill_after_s": round(delay, 2), "killed": rc_k == -signal.SIGKILL,
                       "published_after_kill": n_k, "corrupt_after_kill": bad_k, "rerun_exit": rc_r,
                       "published_after_rerun": n_r, "corrupt_after_rerun": bad_r, "problems": (problems + problems2)[:3],
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
        rc = proc.wait(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=10)
    return rc, lines, time.perf_counter() - t0


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--size", type=int, default=2_000_000, help="bytes per fake file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--race-repeats", type=int, default=20, help="rounds of the two-push race (quick: 3)")
    ap.add_argument("--race-mib", type=int, default=128, help="MiB of the raced artifact (quick: 32)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds before a process counts as hung")
    args = ap.parse_args(argv)
    kills = 3 if args.quick else args.kills
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="nest-faults-") as scratch:
        scratch = Path(scratch)
        mods = scratch / "mods"
        mods.mkdir()
        (mods / "bench_fault_stage.py").write_text(STAGE_SRC)
        (mods / "bench_fault_dag.py").write_text(DAG_SRC)
        store = scratch / "store"
        env = {**os.environ, "NEST_STORE": str(store), "PYTHONPATH": os.pathsep.join([str(ROOT), str(mods)]),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

        rc, err, clean_s = _run(_nest_argv(200, 0, args.size), env, ROOT, None)
        if rc != 0:
            raise RuntimeError(f"the clean run failed (exit {rc}): {[line for _t, line in err[-3:]]}")
        startup_s = _first_build_s(err)  # kills land between the first stage starting and the run's end
        rounds, landed = [], {}
        corrupt_total = unfinished = 0
        t_start = time.perf_counter()
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
            ok = rc_r == 0
            unfinished += not ok
            corrupt_total += bad_after_kill + bad_after_rerun
            rounds.append({"round": i, "kill_after_s": round(delay, 2), "killed": rc_k == -signal.SIGKILL,
                           "landed_in": where, "complete_after_kill": n_after_kill,
                           "corrupt_after_kill": bad_after_kill, "leftovers_after_kill": left_after_kill,
                           "rerun_exit": rc_r, "rerun_s": round(rerun_s, 1), "corrupt_after_rerun": bad_after_rerun,
                           "leftovers_after_rerun": _leftovers(store),
                           "problems": (problems + problems2)[:3],
                           "rerun_error": "" if ok else (err_r[-1][1] if err_r else "")})
            print(f"[faults] round {i}/{kills}: killed after {delay:.1f} s in {where}; corrupt {bad_after_kill}"
                  f"+{bad_after_rerun}; rerun exit {rc_r}", file=sys.stderr, flush=True)
        complete_remote = scratch / "remote"
        rc_p, err_p, _ = _run(_cli("push", "--all", "--remote", str(complete_remote)), env, ROOT, None)
        if rc_p != 0:
            raise RuntimeError(f"pushing the store failed (exit {rc_p}): {[line for _t, line in err_p[-3:]]}")
        remote_rounds = {kind: _remote_rounds(kind, kills, rng, env, scratch, store, complete_remote)
                         for kind in ("push", "pull")}
        flips = _flips(max(4, kills // 2), rng, scratch, complete_remote)
        race = _push_race(3 if args.quick else args.race_repeats, rng, env, scratch,
                          32 if args.quick else args.race_mib, args.timeout)
        crafted = _crafted_names(scratch)
        corrupt_total += race["corrupt_published"]
        corrupt_total += sum(r["corrupt"] for r in remote_rounds.values())
        unfinished += sum(r["not_finished"] for r in remote_rounds.values())
        elapsed = time.perf_counter() - t_start
        n_final, bad_final, _ = _verify_store(store)

    killed = sum(r["killed"] for r in rounds)
    result = {
        "kills_attempted": kills, "kills_landed": killed, "clean_run_s": round(clean_s, 1),
        "startup_s": round(startup_s, 1), "corrupt_complete_artifacts": corrupt_total, "runs_not_finished_after_rerun": unfinished,
        "artifacts_verified_at_end": n_final, "corrupt_at_end": bad_final, "landed_in": landed,
        "leftovers_after_kills": sum(r["leftovers_after_kill"] for r in rounds),
        "leftovers_after_reruns": sum(r["leftovers_after_rerun"] for r in rounds[-1:]),
        "rounds": rounds, "remote": remote_rounds, "flips": flips, "push_race": race, "crafted_names": crafted,
        "elapsed_s": round(elapsed, 1), "quick": args.quick,
        "goals": {"corrupt_complete_artifacts": 0, "runs_not_finished_after_rerun": 0, "push_race_corrupt": 0,
                  "push_race_tmpdir_files": 0, "push_race_hung": 0, "crafted_names_refused": "all"},
    }
    lines = [
        "# Faults: random `kill -9` during `nest run`, rerun after each",
        "",
        f"{kills} rounds ({killed} killed mid-run" + (", the rest finished first" if killed < kills else "") + ") on a DAG of the real ConvertCorpus "
        f"(embedded corpus, limit 200+round) and three fake stages writing {args.size / 1e6:.0f} MB files in chunks; "
        f"clean run {clean_s:.1f} s, its first stage starting at {startup_s:.1f} s; kill delay uniform in between. "
        "Every manifest of the store verified "
        "(size and sha256 of each file) after each kill and each rerun.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| artifacts that look complete but are corrupt (local and remote) | {corrupt_total} | 0 |",
        f"| runs not finished after a rerun (run, push, pull rounds) | {unfinished} of {3 * kills} | 0 |",
        f"| artifacts verified at the end | {n_final} ({bad_final} corrupt) | all verify |",
        f"| leftovers (temp / manifest-less folders) right after the kills, summed | "
        f"{result['leftovers_after_kills']} | cleared by the next build |",
        "",
        "Where the kills landed: " + ", ".join(f"{k} ×{v}" for k, v in sorted(landed.items())) + ".",
        "",
        "Then a local-folder remote, with the store those rounds filled "
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
        f"Push race, {race['repeats']} rounds: two `nest push` of one {race['artifact_mib']} MiB "
        f"artifact to a fresh folder remote, `$TMPDIR` on {race['tmpdir_on']}; A SIGSTOPped once its copy started, B "
        f"pushed to the end, A SIGCONTed and SIGKILLed at a random point of its copy (uniform over a clean push's "
        f"copy, {race['clean_push_s']} s); every published artifact pulled and verified.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| A killed while its temp file was being written (mid-copy) | {race['killed_mid_copy']} of "
        f"{race['repeats']} | |",
        f"| published artifacts that do not pull whole | {race['corrupt_published']} of {race['published']} | 0 |",
        f"| files left in A's `$TMPDIR` | {race['tmpdir_files_left']} | 0 |",
        f"| temp files left on the remote (A's, never read; `nest push --clean-stale`) | "
        f"{race['remote_temp_files_left']} | |",
        f"| hung pushes (over {args.timeout:.0f} s) | {race['hung']} | 0 |",
        "",
        f"Crafted names from a remote listing or manifest: {crafted['refused']} of {crafted['cases']} refused with nothing written, "
        f"{crafted['written']} wrote something (goal 0): "
        + "; ".join(f"{d['case']}: {'refused' if d['refused'] else 'NOT refused'}" for d in crafted["details"]) + ".",
    ]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in main(sys.argv[1:]).items() if k != "markdown"}, indent=1))


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
            rounds.append({"round": i, "a_in_copy_when_stopped": started, "a_killed_mid_copy": in_copy, "b_exit": rc_b, "a_exit": rc_a,
                           "kill_after_cont_s": round(delay, 2), "published": n, "corrupt_published": bad,
                           "tmpdir_files_left": left, "remote_temp_files": on_remote, "hung": hang,
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
            "killed_mid_copy": killed_mid_copy, "published": published, "corrupt_published": corrupt,
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
