"""Scale-out benchmark (the scheduler's part): luigid's overhead and two local workers against one.

    python -m bench.run scale            # the real DAG where it is built (make all first), Generate of 16 examples
    python -m bench.run --quick scale    # synthetic fake stages only, to check the benchmark itself

Measured in one run, each contestant a fresh ``nest`` process (its start-up counted), alternating, best of ``--repeats``:

1. **Scheduler overhead**: a no-op ``nest all`` (every stage cached) through a ``luigid`` started on 127.0.0.1 (a free
   port, its state in a temp folder) ÷ the same with Luigi's local scheduler. Goal ≤ 2× and ≤ 5 s. On the real DAG
   when ``nest status`` shows nothing to build (after ``make all``); otherwise, and with ``--quick``, on a synthetic DAG
   of fake stages (one source, ``--shards`` shards, one report), built once first.
2. **Two local workers against one**: ``Generate`` of ``--examples`` examples of ``--task``/``--method`` split into
   ``--shards`` example-range shards (``GenerateShards`` below: ``Generate(start, end)``), ``nest run --workers N`` with
   ``[resources] threads = N`` (one torch thread per worker), ``--force Generate`` (the shards rebuilt each time, their
   inputs cached: the first, untimed run builds them). Goal: wall-time ratio ≤ 0.65. Also: the shards' files are
   identical for one worker and for two (fake shards: every file's sha256; Generate: every generated column, the
   measured ones, wall_s, timings and counters, left out). With ``--quick`` (or ``--synthetic``): fake
   shards that each burn ``--work`` CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import luigi

from pipeline.base import NestTask

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULE = "nest_bench_scale_stage"
STAGE_SRC = '''"""Synthetic stage of bench/bench_scale.py: burns `work` CPU seconds, writes text + its inputs' out.txt."""
import time
from pathlib import Path

VERSION = "1"


def run(out_dir, *, text, work=0.0, **inputs):
    end = time.process_time() + float(work)
    x = 0
    while time.process_time() < end:
        x += 1
    body = text + "".join("|" + (Path(inputs[k]) / "out.txt").read_text() for k in sorted(inputs))
    (Path(out_dir) / "out.txt").write_text(body)
    return {"chars": len(body)}
'''


# ---- tasks (imported by the `nest` subprocesses through --module bench.bench_scale) -----------------------------------

class BsSource(NestTask):
    stage_module = STAGE_MODULE

    def stage_params(self):
        return {"text": "source"}


class BsShard(NestTask):
    stage_module = STAGE_MODULE
    label_params = ("i",)
    i = luigi.IntParameter()
    work = luigi.FloatParameter(default=0.0)

    def requires(self):
        return {"source": BsSource()}

    def stage_params(self):
        return {"text": f"shard-{self.i}", "work": self.work}


class BsReport(NestTask):
    stage_module = STAGE_MODULE
    shards = luigi.IntParameter(default=8)
    work = luigi.FloatParameter(default=0.0)

    def requires(self):
        return {f"s{i:04d}": BsShard(i=i, work=self.work) for i in range(self.shards)}

    def stage_params(self):
        return {"text": "report"}


class BsAll(luigi.WrapperTask):
    shards = luigi.IntParameter(default=8)
    work = luigi.FloatParameter(default=0.0)

    def requires(self):
        return [BsReport(shards=self.shards, work=self.work)]


class GenerateShards(luigi.WrapperTask):
    """``Generate`` of ``task``/``method`` (its main configuration of the report's grid) over examples ``[0, examples)``
    in ``shards`` example ranges: each shard its own task and artifact. These are the shard tasks of the sharded
    Generate (``--set Generate.shards=N``, pipeline/sharding.py) when the task has ``examples`` examples, without
    their merge: the benchmark times the shards alone, over a fixed number of examples."""

    task = luigi.Parameter(default="completion")
    method = luigi.Parameter(default="nest")
    examples = luigi.IntParameter(default=16)
    shards = luigi.IntParameter(default=4)

    def requires(self):
        from pipeline import dag

        config = next((r.config for r in dag.experiment_runs()
                       if r.task == self.task and r.method == self.method and r.variant == "main"), {})
        step = math.ceil(self.examples / self.shards)
        return [dag.Generate(task=self.task, method=self.method, config=config, start=i * step,
                             end=min(self.examples, (i + 1) * step)) for i in range(self.shards)
                if i * step < self.examples]


# ---- helpers -----------------------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[bench scale] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Luigid:
    """``luigid`` on 127.0.0.1, a free port, its state and logs in ``folder``."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, env
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc = None

    def __enter__(self) -> "Luigid":
        self.folder.mkdir(parents=True, exist_ok=True)
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()",
                                      "--address", "127.0.0.1", "--port", port,
                                      "--state-path", str(self.folder / "state.pickle"), "--logdir", str(self.folder)],
                                     cwd=self.folder, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/graph", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"luigid did not start on {self.url}")
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _nest(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"nest {' '.join(args)}: exit {proc.returncode}: {tail}")
    return seconds


def _real_dag_cached(env: dict) -> bool:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "status"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode == 0 and " 0 to build" in last


# the columns a generation is made of; wall_s, timings and counters (key-cache hits) are measurements of the run
_GENERATED = ("example_id", "task", "method", "text", "token_ids", "source_doc_ids", "source_positions", "spans",
              "num_tokens", "supported_doc_ids", "supported_positions", "token_char_ends")


def _digests(store: Path, stage: str) -> dict[str, dict]:
    """Per artifact of ``stage``: the sha256 of each file (fake stages), or for Generate of what was generated (the
    measured columns, which differ between any two runs, left out)."""
    import hashlib

    import pyarrow.parquet as pq

    out = {}
    for m in sorted((store / stage).glob("*/manifest.json")):
        doc = json.loads(m.read_text())
        if stage == "Generate":
            table = pq.read_table(m.parent / "generations.parquet")
            cols = [c for c in _GENERATED if c in table.column_names]
            out[doc["key"]] = hashlib.sha256(json.dumps(table.select(cols).to_pylist(), sort_keys=True,
                                                        default=str).encode()).hexdigest()
        else:
            out[doc["key"]] = {name: f["sha256"] for name, f in doc["files"].items()}
    return out


# ---- the measures ------------------------------------------------------------------------------------------------------

def measure_overhead(env: dict, scratch: Path, repeats: int, real: bool, shards: int) -> dict:
    target = ["all"] if real else ["run", "BsAll", "--module", "bench.bench_scale", "--shards", str(shards)]
    if not real:
        _nest(target, env)  # build once: the timed runs are no-ops
    local, remote = [], []
    with Luigid(scratch / "luigid", env) as server:
        for r in range(repeats):
            local.append(_nest(target, env))
            remote.append(_nest(target[:1] + ["--scheduler-url", server.url] + target[1:], env))
            _log(f"no-op round {r + 1}/{repeats}: local {local[-1]:.2f} s, luigid {remote[-1]:.2f} s")
    best_local, best_remote = min(local), min(remote)
    return {"dag": "real (nest all)" if real else f"synthetic ({shards + 2} fake stages)",
            "local_s": [round(x, 2) for x in local], "luigid_s": [round(x, 2) for x in remote],
            "best_local_s": round(best_local, 2), "best_luigid_s": round(best_remote, 2),
            "ratio": round(best_remote / best_local, 2),
            "goal_met": best_remote / best_local <= 2.0 and best_remote <= 5.0}


def measure_workers(env: dict, repeats: int, synthetic: bool, args) -> dict:
    if synthetic:
        target = ["BsAll", "--module", "bench.bench_scale", "--shards", str(args.shards), "--work", str(args.work)]
        stage, force = "BsShard", "BsShard"
        what = f"synthetic: {args.shards} fake shards of {args.work} CPU s each"
    else:
        target = ["GenerateShards", "--module", "bench.bench_scale", "--task", args.task, "--method", args.method,
                  "--examples", str(args.examples), "--shards", str(args.shards),
                  "--set", f"LoadTask.n_examples={args.examples}"]
        stage, force = "Generate", "Generate"
        what = f"Generate {args.method} on {args.task}, {args.examples} examples in {args.shards} shards"
    store = Path(env["NEST_STORE"])
    _log(f"workers: warm-up ({what}; builds the inputs)")
    _nest(["run", "--workers", "2", "--set", "resources.threads=2", *target], env)
    times: dict[int, list[float]] = {1: [], 2: []}
    outputs: dict[int, dict] = {}
    for r in range(repeats):
        for n in (1, 2):
            times[n].append(_nest(["run", "--workers", str(n), "--set", f"resources.threads={n}", "--force", force,
                                   *target], env))
            outputs[n] = _digests(store, stage)
            _log(f"workers round {r + 1}/{repeats}: {n} worker(s) {times[n][-1]:.1f} s")
    ratio = min(times[2]) / min(times[1])
    return {"what": what, "one_worker_s": [round(x, 2) for x in times[1]],
            "two_workers_s": [round(x, 2) for x in times[2]], "ratio": round(ratio, 3), "goal_met": ratio <= 0.65,
            "outputs_identical": outputs[1] == outputs[2], "shards": len(outputs[2])}


def measure_shard_identity(env: dict, args) -> dict:
    """The real sharded Generate with 1 shard and with ``--shards``: the merged stage's key (the shard count is a
    resource, not an identity) and what it generated (every column but the measured ones), each built afresh."""
    store = Path(env["NEST_STORE"])
    seen = {}
    for n in (1, args.shards):
        _nest(["run", "Generate", "--task", args.task, "--method", args.method, "--set",
               f"LoadTask.n_examples={args.examples}", "--set", f"Generate.shards={n}", "--force", "Generate"], env)
        run = json.loads((store / "runs" / "latest.json").read_text())
        key = next(r["key"] for r in run["reached"] if r["stage"] == "Generate" and not r.get("shard"))
        seen[n] = (key, _digests(store, "Generate")[key])
        _log(f"shards: {n} -> Generate {key[:12]}")
    (k1, d1), (kn, dn) = seen[1], seen[args.shards]
    return {"shards": args.shards, "same_key": k1 == kn, "same_generations": d1 == dn, "key": k1}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="fake stages only, even where the real DAG is built")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="completion")
    ap.add_argument("--method", default="nest")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--work", type=float, default=1.0, help="synthetic shards: CPU seconds each")
    args = ap.parse_args(argv)
    synthetic = args.quick or args.synthetic
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.shards, args.work = 4, 0.3

    with tempfile.TemporaryDirectory(prefix="nest-scale-") as tmp:
        scratch = Path(tmp)
        mods = scratch / "mods"
        mods.mkdir()
        (mods / f"{STAGE_MODULE}.py").write_text(STAGE_SRC)
        base = {k: v for k, v in os.environ.items() if not k.startswith("LUIGI_CONFIG")}
        base.update({"PYTHONPATH": os.pathsep.join([str(ROOT), str(mods)]), "OMP_NUM_THREADS": "1",
                     "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        real = not synthetic and _real_dag_cached(base)
        overhead_env = dict(base) if real else {**base, "NEST_STORE": str(scratch / "noop-store")}
        overhead_env["NEST_REMOTE_MODE"] = "off"  # one machine, one store: nothing is pushed or pulled
        _log("scheduler overhead: " + ("the real DAG (all cached)" if real else "a synthetic DAG"))
        overhead = measure_overhead(overhead_env, scratch, repeats, real, 40 if not args.quick else 8)
        workers_env = {**base, "NEST_STORE": str(scratch / "workers-store") if synthetic
                       else base.get("NEST_STORE", str(ROOT / "artifacts"))}
        workers_env["NEST_REMOTE_MODE"] = "off"
        try:
            workers = measure_workers(workers_env, repeats, synthetic, args)
        except RuntimeError as e:
            workers = {"what": "not measured", "error": str(e), "goal_met": False}
        identity = None
        if not synthetic:
            try:
                identity = measure_shard_identity(workers_env, args)
            except RuntimeError as e:
                identity = {"error": str(e)}

    result = {"quick": args.quick, "cpus": os.cpu_count(), "overhead": overhead, "workers": workers,
              "shard_identity": identity}
    lines = ["# Scale-out: luigid's overhead and local workers (bench/bench_scale.py)", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| no-op `nest all` through luigid ÷ local scheduler ({overhead['dag']}) | {overhead['ratio']}× "
             f"({overhead['best_luigid_s']} s vs {overhead['best_local_s']} s) | ≤ 2× and ≤ 5 s: "
             f"{'met' if overhead['goal_met'] else 'missed'} |"]
    if "ratio" in workers:
        lines.append(f"| two local workers ÷ one, 1 torch thread each ({workers['what']}) | {workers['ratio']} "
                     f"({min(workers['two_workers_s'])} s vs {min(workers['one_worker_s'])} s) | ≤ 0.65: "
                     f"{'met' if workers['goal_met'] else 'missed'} |")
        lines.append(f"| shard outputs identical for one worker and for two | "
                     f"{'yes' if workers['outputs_identical'] else 'NO'} ({workers['shards']} artifacts compared) | yes |")
    else:
        lines.append(f"| two local workers ÷ one | not measured: {workers['error']} | ≤ 0.65 |")
    if identity and "error" not in identity:
        lines.append(f"| Generate with 1 shard and with {identity['shards']}: the merged key / what it generated | "
                     f"{'same' if identity['same_key'] else 'DIFFERENT'} ({identity['key'][:12]}) / "
                     f"{'identical' if identity['same_generations'] else 'DIFFERENT'} | same / identical |")
    elif identity:
        lines.append(f"| Generate with 1 shard and with {args.shards} | not measured: {identity['error']} | same |")
    lines += ["", f"Each figure is the best of {repeats} fresh `nest` processes (start-up included), contestants "
              f"alternating; {os.cpu_count()} CPUs, shared." + (" Quick run: synthetic, numbers not meaningful."
                                                                 if args.quick else "")]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in main(sys.argv[1:]).items() if k != "markdown"}, indent=1))
