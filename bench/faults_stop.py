"""Stop rounds of the faults benchmark: SIGTERM, SIGINT and ``kill -9`` at random moments.

    python -m bench.faults_stop --rounds 8        # a few minutes on 2 cores
    python -m bench.faults_stop --rounds 3 --json
    python -m bench.run faults --stop-rounds 20   # these rounds within the whole fault bench (bench/bench_faults.py)

Each round starts a build in its own process group, waits for its first ``building`` line, signals it after a random
delay (uniform up to a clean run's length), and checks:

- **exit code**: 143 after SIGTERM (sent to the command only, as ``timeout`` or a batch scheduler does), 130 after SIGINT
  (sent to the whole process group, as a terminal's Ctrl-C does); a run that finished first may exit 0;
- **one line**: exactly one ``nest:`` line, no ``Traceback``;
- **hung**: a run still alive ``timeout`` seconds after its signal (then killed);
- **processes left**: :func:`leftover_processes` over everything that was below the run when it was signalled and
  anything whose command line names the scratch folder (the Lucene indexer's names its input there) — 0 allowed, also
  after ``kill -9``;
- **temp folders left** after a SIGTERM/SIGINT (a ``kill -9`` leaves them to the next build, by design);
- **corrupt-complete**: an artifact with a manifest whose files do not verify;
- **not finished on rerun**: the same command rerun without a signal must exit 0.

Round kinds, in turn: the fake DAG (``StSource ── StSlow ── StAfter`` plus ``StSide``, stages writing a few MB in
chunks and holding a child process, a stand-in for the JVM), with ``--workers 1`` and ``--workers 2``; and the real
``BuildBM25Index`` on the embedded corpus (a new ``ConvertCorpus.limit`` each round, so there is always work), where
the Lucene indexer runs as a child process. ``bench.bench_faults``'s kill rounds can use :func:`leftover_processes`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipeline.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]

STAGE_SRC = '''"""Fake stages of the stop rounds: a few MB written in chunks, and a child process held while writing."""
import hashlib
import subprocess
import sys
import time
from pathlib import Path

VERSION = "1"


def run(out_dir, *, name, seed=0, upstream=None, chunks=40, pause=0.02):
    out_dir = Path(out_dir)
    # a stand-in for a stage's external tool (the JVM indexer): its own session, as bm25.indexer_process starts one
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        block = hashlib.sha256(f"{name}:{seed}".encode()).hexdigest().encode() * 2048
        with open(out_dir / "data.bin", "wb") as f:
            for _ in range(chunks):
                f.write(block)
                time.sleep(pause)
        if upstream is not None:
            (out_dir / "up.txt").write_text((Path(upstream) / "info.txt").read_text()[:64])
        (out_dir / "info.txt").write_text(f"{name} {seed}")
    finally:
        child.kill()
        child.wait()
    return {"chunks": chunks}
'''

DAG_SRC = '''"""Luigi wiring of the stop rounds' fake DAG."""
import luigi

from pipeline.engine.task import NestTask


class _Stop(NestTask):
    stage_module = "bench_stop_stage"
    seed = luigi.IntParameter(default=0)


class StopSource(_Stop):
    def stage_params(self):
        return {"name": "source", "seed": self.seed}


class StopSlow(_Stop):
    def requires(self):
        return {"upstream": StopSource(seed=self.seed)}

    def stage_params(self):
        return {"name": "slow", "seed": self.seed, "chunks": 80}


class StopSide(_Stop):
    def requires(self):
        return {"upstream": StopSource(seed=self.seed)}

    def stage_params(self):
        return {"name": "side", "seed": self.seed, "chunks": 60}


class StopAfter(_Stop):
    def requires(self):
        return {"upstream": StopSlow(seed=self.seed)}

    def stage_params(self):
        return {"name": "after", "seed": self.seed}


class StopTop(luigi.WrapperTask):
    seed = luigi.IntParameter(default=0)

    def requires(self):
        return [StopAfter(seed=self.seed), StopSide(seed=self.seed)]
'''


# ---- checks usable by other fault rounds ---------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, now (take it just before a kill: a killed parent's children move away)."""
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def leftover_processes(pids=(), marker: str | None = None, grace: float = 15.0) -> list[dict]:
    """Processes still running ``grace`` seconds after a kill: those of ``pids`` (e.g. :func:`process_tree` of the killed
    run) and any whose command line contains ``marker`` (e.g. the scratch store's path: the Lucene indexer names its
    input and index folders there). Zombies do not count. ``[{pid, cmdline}]``; empty when everything is gone."""
    me = os.getpid()

    def living() -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for pid in pids:
            try:
                found[pid] = psutil.Process(pid)
            except psutil.Error:
                pass
        if marker:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if p.pid != me and marker in " ".join(p.info.get("cmdline") or ()):
                    found.setdefault(p.pid, p)
        out = []
        for p in found.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    return [d for _, d in still_running(living, grace)]


def still_running(living, grace: float) -> list[tuple[psutil.Process, dict]]:
    """Poll ``living()`` (the processes that count) until it is empty or ``grace`` seconds pass; the survivors, each with
    ``{pid, cmdline}``."""
    deadline = time.monotonic() + grace
    left = living()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = living()
    out = []
    for p in left:
        try:
            out.append((p, {"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]}))
        except psutil.Error:
            pass
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _verify(root: Path) -> tuple[int, list[str]]:
    """(complete artifacts, problems of those that do not verify)."""

    store = Store(root)
    n, bad = 0, []
    for ref in store.folders():
        if store.complete(ref.stage, ref.key):
            n += 1
            found = store.verify(ref.stage, ref.key)
            if found:
                bad.append(f"{ref.stage}/{ref.key[:12]}: {found[0]}")
    return n, bad


def _temp_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/.tmp-*"))


# ---- one round -----------------------------------------------------------------------------------------------------

class _Run:
    """A command in its own process group, its stderr lines collected with their times."""

    def __init__(self, argv: list[str], env: dict, cwd: Path):
        self.t0 = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.perf_counter() - self.t0, line.rstrip("\n")))

    def wait_for(self, kind: str, timeout: float) -> bool:
        """Wait until the run prints the line after which ``kind``'s signal may land (:func:`_starts`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(_starts(kind, line) for _t, line in list(self.lines)):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None when still running after ``timeout`` s (then the group is killed)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        self.reader.join(timeout=10)
        return rc

    @property
    def text(self) -> str:
        return "\n".join(line for _t, line in self.lines)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def _starts(kind: str, line: str) -> bool:
    """The line after which a round's signal lands: the first stage's ``building`` line; for ``bm25`` the
    BuildBM25Index one (then the signal lands while the collection is written or the indexer, the JVM, runs)."""
    return line.endswith(": building") and (kind != "bm25" or "BuildBM25Index" in line)


def _argv(kind: str, i: int) -> list[str]:
    cli = [sys.executable, "-m", "pipeline.cli", "run"]
    if kind == "bm25":
        return [*cli, "--set", f"ConvertCorpus.limit={3000 + i}", "BuildBM25Index"]
    workers = "2" if kind == "fake-w2" else "1"
    return [*cli, "--workers", workers, "StopTop", "--module", "bench_stop_dag", "--seed", str(i)]


def _one_round(kind: str, sig: signal.Signals, i: int, rng: random.Random, env: dict, store: Path, marker: str,
               clean_s: dict, timeout: float) -> dict:
    argv = _argv(kind, i)
    run = _Run(argv, env, ROOT)
    started = run.wait_for(kind, timeout)
    delay = rng.uniform(0.0, clean_s.get(kind, 2.0))
    time.sleep(delay)
    tree = process_tree(run.proc.pid)
    indexer = any("pyserini" in " ".join(_cmdline(p)) for p in tree[1:])  # the JVM indexer was running
    finished_first = run.proc.poll() is not None
    if not finished_first:
        with _suppress():
            if sig == signal.SIGINT:
                os.killpg(run.proc.pid, sig)  # a terminal's Ctrl-C: the whole group
            else:
                os.kill(run.proc.pid, sig)  # timeout / a batch scheduler / kill -9 of the command
    rc = run.wait(timeout)
    text = run.text
    # after kill -9 nothing cleans up but the kernel: the indexer must be gone at once (PR_SET_PDEATHSIG), not when it
    # finishes its work (an orphaned indexer of a small corpus would end by itself within a longer grace)
    left = leftover_processes(tree[1:], marker=marker, grace=2.0) if sig == signal.SIGKILL else \
        leftover_processes(tree, marker=marker)
    nest_lines = [ln for ln in text.splitlines() if ln.startswith("nest:")]
    expected = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -9}[sig]
    wrong_exit = rc is not None and not finished_first and rc != expected and not (rc == 0 and finished_first)
    one_line = sig == signal.SIGKILL or finished_first or ("Traceback" not in text and len(nest_lines) == 1)
    temps = len(_temp_folders(store)) if sig != signal.SIGKILL else 0
    _n, bad_after_stop = _verify(store)
    rerun = _Run(argv, env, ROOT)
    rc_rerun = rerun.wait(timeout)
    _n, bad_after_rerun = _verify(store)
    left_after_rerun = leftover_processes([rerun.proc.pid], marker=marker, grace=5.0)
    for p in left + left_after_rerun:  # never leave anything running on a shared machine
        with _suppress():
            os.kill(p["pid"], signal.SIGKILL)
    return {"round": i, "kind": kind, "signal": sig.name, "delay_s": round(delay, 2), "reached_build": started,
            "finished_first": finished_first, "indexer_at_signal": indexer, "exit": rc, "hung": rc is None, "wrong_exit": bool(wrong_exit),
            "one_line": bool(one_line), "line": nest_lines[-1][:240] if nest_lines else "",
            "processes_left": left + left_after_rerun, "temp_folders_left": temps,
            "corrupt_complete": bad_after_stop + bad_after_rerun, "rerun_exit": rc_rerun,
            "rerun_ok": rc_rerun == 0}


def stop_rounds(n: int, workdir: Path, rng: random.Random, *, timeout: float = 300.0,
                kinds: tuple[str, ...] = ("fake-w1", "fake-w2", "bm25")) -> dict:
    """``n`` stop rounds in ``workdir`` (a scratch folder): kinds and signals in turn (SIGTERM, SIGINT, and ``kill -9``
    for BuildBM25Index), each signal after a random delay. Returns the counts (goal 0 each) and the rounds."""
    workdir = Path(workdir)
    mods = workdir / "mods"
    mods.mkdir(parents=True, exist_ok=True)
    (mods / "bench_stop_stage.py").write_text(STAGE_SRC)
    (mods / "bench_stop_dag.py").write_text(DAG_SRC)
    store = workdir / "store"
    env = {**os.environ, "NEST_STORE": str(store), "PYTHONPATH": os.pathsep.join([str(ROOT), str(mods)]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("NEST_REMOTE", None)

    clean_s: dict[str, float] = {}  # a clean run's time from its first building line to its end, per kind
    for j, kind in enumerate(dict.fromkeys(kinds)):
        run = _Run(_argv(kind, -1 - j), env, ROOT)  # keys no round uses: the clean run builds everything
        rc = run.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"the clean {kind} run failed (exit {rc}): {run.text[-400:]}")
        first = next((t for t, line in run.lines if _starts(kind, line)), 0.0)
        clean_s[kind] = max(0.5, run.lines[-1][0] - first if run.lines else 1.0)

    plan = []
    for i in range(1, n + 1):
        kind = kinds[(i - 1) % len(kinds)]
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL) if kind == "bm25" else (signal.SIGTERM, signal.SIGINT)
        plan.append((kind, sigs[((i - 1) // len(kinds)) % len(sigs)]))
    rounds = []
    for i, (kind, sig) in enumerate(plan, start=1):
        r = _one_round(kind, sig, i, rng, env, store, str(workdir), clean_s, timeout)
        rounds.append(r)
        print(f"[faults-stop] round {i}/{n}: {kind} {sig.name} after {r['delay_s']} s: exit {r['exit']}, "
              f"{len(r['processes_left'])} left running, rerun exit {r['rerun_exit']}", file=sys.stderr, flush=True)
    return {
        "rounds_run": n, "clean_s": {k: round(v, 1) for k, v in clean_s.items()},
        "signalled_mid_build": sum(not r["finished_first"] for r in rounds),
        "signalled_while_the_indexer_ran": sum(r["indexer_at_signal"] for r in rounds),
        "corrupt_complete_artifacts": sum(len(r["corrupt_complete"]) for r in rounds),
        "hung_runs": sum(r["hung"] for r in rounds),
        "processes_left_running": sum(len(r["processes_left"]) for r in rounds),
        "wrong_exit_codes": sum(r["wrong_exit"] for r in rounds),
        "not_one_line": sum(not r["one_line"] for r in rounds),
        "temp_folders_left": sum(r["temp_folders_left"] for r in rounds),
        "runs_not_finished_on_rerun": sum(not r["rerun_ok"] for r in rounds),
        "rounds": rounds,
        "goals": {"corrupt_complete_artifacts": 0, "hung_runs": 0, "processes_left_running": 0,
                  "wrong_exit_codes": 0, "not_one_line": 0, "temp_folders_left": 0, "runs_not_finished_on_rerun": 0},
    }


def markdown(result: dict) -> str:
    keys = [k for k in result["goals"]]
    lines = [f"# Stops: SIGTERM / SIGINT / kill -9 at random moments ({result['rounds_run']} rounds, "
             f"{result['signalled_mid_build']} landed mid-build, {result['signalled_while_the_indexer_ran']} while "
             f"the Lucene indexer ran)", "", "| measure | value | goal |", "|---|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {result[k]} | 0 |" for k in keys]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take after its signal (hung)")
    ap.add_argument("--kinds", default="fake-w1,fake-w2,bm25", help="comma-separated: fake-w1, fake-w2, bm25")
    ap.add_argument("--json", action="store_true", help="print every round as JSON, not only the table")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nest-stops-") as scratch:
        result = stop_rounds(args.rounds, Path(scratch), random.Random(args.seed), timeout=args.timeout,
                             kinds=tuple(args.kinds.split(",")))
    result["markdown"] = markdown(result)
    print(json.dumps(result, indent=1) if args.json else result["markdown"])
    return result


if __name__ == "__main__":
    main()
