"""Sharing the cache: pull the whole embedded store from a local-folder remote into an empty store, then
``make all``; its time ÷ a cold ``make all``. Goal ≤ 0.1.

    python -m bench.run share                          # cold run into a scratch store (~20-30 min on 2 cores)
    python -m bench.run share --cold-store artifacts   # build the cold run into the project's store (kept)
    python -m bench.run --quick share                  # the micro corpus of the tests, to check the benchmark itself

Measured in one run, in order:
1. cold: ``nest all`` into an empty store A (every stage built);
2. ``nest push --all`` from A into an empty local-folder remote (timed, reported apart: it is the colleague's cost);
3. shared: ``nest pull --all`` from the remote into an empty store B, then ``nest all`` on B with the remote switched
   off, so that nothing is built or pulled behind the measurement's back. Both are timed together.
The ratio is (3) ÷ (1). The benchmark also counts the stages that (3)'s ``nest all`` built (goal: 0), and compares the
keys A and B reached and the report bytes (goal: identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["--set", f"ConvertCorpus.source={ROOT / 'tests' / 'fixtures' / 'pipeline' / 'micro_atlas.jsonl'}",
         "--set", "ConvertCorpus.fmt=atlas", "--set", 'nest.tasks=["completion"]', "--set", "LoadTask.n_examples=2",
         "--set", "PreRetrieve.b=4", "--set", "PreRetrieve.candidates=50", "--set", 'decoding.methods=["base", "nest"]',
         "--set", 'decoding.config={"max_new_tokens": 8, "passages": 4}', "--set", "decoding.gammas=[]",
         "--set", "decoding.ablation_tasks=[]", "--set", 'decoding.ppl_tasks=[]', "--set", 'decoding.sweep_tasks=[]']


def _log(msg: str) -> None:
    print(f"[bench share] {msg}", file=sys.stderr, flush=True)


def _nest(store: Path, *args: str, remote: str = "") -> float:
    env = {**os.environ, "NEST_STORE": str(store), "NEST_REMOTE": remote, "NEST_REMOTE_MODE": "off" if not remote
           else "pull", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"nest {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def _latest(store: Path) -> dict:
    return json.loads((store / "runs" / "latest.json").read_text(encoding="utf-8"))


def _report_bytes(store: Path, run: dict) -> bytes:
    for r in run["reached"]:
        if r["stage"] == "Report":
            return (store / "Report" / r["key"] / "report.md").read_bytes()
    return b""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench share")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cold-store", type=Path, default=None, help="where the cold run builds (must be empty)")
    args = ap.parse_args(argv)
    extra = MICRO if args.quick else []
    scratch = Path(tempfile.mkdtemp(prefix="nest-bench-share-"))
    try:
        a = (args.cold_store if args.cold_store else scratch / "a").resolve()
        if a.exists() and any(p.name != "README.md" for p in a.iterdir()):
            raise SystemExit(f"bench share: --cold-store {a} is not empty; a cold run needs an empty store")
        remote, b = scratch / "remote", scratch / "b"
        _log(f"cold nest all into {a}")
        cold = _nest(a, "all", *extra)
        run_a = _latest(a)
        _log(f"cold: {cold:.1f} s, {sum(r.get('status') == 'built' for r in run_a['reached'])} stages built; push --all")
        push = _nest(a, "push", "--all", "--remote", str(remote))
        _log(f"push: {push:.1f} s; pull --all into an empty store, then nest all")
        pull = _nest(b, "pull", "--all", "--remote", str(remote))
        after = _nest(b, "all", *extra)
        run_b = _latest(b)
        built_b = [r for r in run_b["reached"] if r.get("status") in ("built", "pulled")]
        keys_a = sorted((r["stage"], r["key"]) for r in run_a["reached"])
        keys_b = sorted((r["stage"], r["key"]) for r in run_b["reached"])
        same_report = _report_bytes(a, run_a) == _report_bytes(b, run_b) and bool(_report_bytes(a, run_a))
        ratio = (pull + after) / cold
        remote_bytes = sum(p.stat().st_size for p in remote.rglob("*") if p.is_file())
        result = {"quick": args.quick, "cold_s": round(cold, 1), "push_s": round(push, 1), "pull_s": round(pull, 1),
                  "all_after_pull_s": round(after, 1), "ratio": round(ratio, 4), "goal": 0.1, "met": ratio <= 0.1,
                  "stages_built_after_pull": len(built_b), "artifacts": len(keys_a), "same_keys": keys_a == keys_b,
                  "same_report_bytes": same_report, "remote_mib": round(remote_bytes / 2**20, 1),
                  "load_average": os.getloadavg()[0]}
        result["markdown"] = "\n".join([
            "# Sharing the cache: pull the whole store, then make all, ÷ a cold make all",
            "",
            f"Setting: {'the micro corpus of the tests (--quick: not meaningful)' if args.quick else 'the embedded profile'}; "
            f"a local-folder remote on the same disk; one run; load average at the end {result['load_average']:.1f}.",
            "",
            "| step | seconds |", "|---|---|",
            f"| cold `nest all` (store A, every stage built) | {cold:.1f} |",
            f"| `nest push --all` A → remote ({result['remote_mib']} MiB, {len(keys_a)} artifacts) | {push:.1f} |",
            f"| `nest pull --all` remote → empty store B | {pull:.1f} |",
            f"| `nest all` on B (remote off) | {after:.1f} |",
            "",
            f"**(pull + make all) ÷ cold make all = {ratio:.3f}** (goal ≤ 0.1: {'met' if ratio <= 0.1 else 'missed'}). "
            f"Stages built after the pull: {len(built_b)} (goal 0). Same keys: {keys_a == keys_b}. "
            f"Same report bytes: {same_report}.",
        ])
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    out = main()
    print(out.pop("markdown"))
    print(json.dumps(out, indent=2))
