"""The reproduction check: a run's headline numbers against a recorded table, each with a tolerance (as pyserini's 2CR
pages pin every reproduced number).

    python -m pipeline.reproduction                  # compare the latest run's numbers with tests/reproduction/embedded.json
    python -m pipeline.reproduction --record         # record them (after a deliberate change; commit the file)

The headline numbers of a ``(task, method)`` cell of the main grid are its task family's quality metric (ROUGE-1,
ROUGE-1 vs source, ALR, ∆ROUGE-1), its perplexity, its attribution ratio, its bio topical precision, its mean accepted
span and its speed-up over the base LM in LM forward passes (``pass_speedup``: generated tokens per forward pass ÷ the
base LM's, Σ over the examples). Quality figures are read from the Score stages' ``summary.parquet`` (long rows ``task,
method, variant, metric, value``); forward passes from the counters of the Generate artifact each Score read.

The wall-clock speed-up is not a reproduction number: the stages of ``make all`` run one after the other, each under the
load of its moment, so their tokens/s ratio moved from 3.1× (``bench/results/decoding.md``, interleaved in one run) to
9.1× in one embedded run for the same setting. ``make bench`` measures it as the README says; here its deterministic
part, the forward passes a method saves, is checked instead.

Tolerances (``TOLERANCE``), and why:
- decoding is greedy and the models run in float32 on the CPU, so a rerun on the same machine gives the same numbers;
  another machine's BLAS may sum in another order and flip a near-tie, which changes one example's continuation from
  there on. One diverging example of 8 moves a mean ROUGE or a ratio by at most a few points, hence 3 points absolute for
  ROUGE, ALR, attribution ratio and topical precision, 2% relative for perplexity (it averages every target token) and
  10% relative for the mean accepted span;
- the pass speed-up counts forward passes, which follow the tokens; 10% relative, as the accepted span.
A refactor that changes results moves at least one number out of its band and fails loudly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from pipeline.engine import config as cfg
from pipeline.engine.config import PROJECT_ROOT
from pipeline.storage.runs import latest_run_with
from stages.common import atomic_write_text

RECORDS = PROJECT_ROOT / "tests" / "reproduction"
# metric -> (kind, tolerance): "abs" points, "rel" fraction of the recorded value, "factor" multiplicative band
TOLERANCE: dict[str, tuple[str, float]] = {
    "rouge1": ("abs", 3.0), "rouge1_source": ("abs", 3.0), "alr": ("abs", 3.0), "rouge1_diff": ("abs", 3.0),
    "attribution_ratio": ("abs", 3.0), "topical_precision": ("abs", 3.0),
    "ppl": ("rel", 0.02), "mean_accepted_span": ("rel", 0.10), "pass_speedup": ("rel", 0.10),
}
QUALITY = ("rouge1", "rouge1_source", "alr", "rouge1_diff")
COPYING = ("attribution_ratio", "topical_precision", "mean_accepted_span")


def headline(rows: Iterable[Mapping]) -> dict[str, float]:
    """``{"task/method/metric": value}`` of the main grid's headline numbers (missing and NaN values left out).
    ``rows`` are summary rows, with ``tokens_per_pass`` rows (:func:`pass_rows`) for the pass speed-up."""
    main = {(r["task"], r["method"], r["metric"]): float(r["value"]) for r in rows
            if r.get("variant", "main") == "main" and r["value"] is not None and not math.isnan(float(r["value"]))}
    out: dict[str, float] = {}
    for (task, method, metric), value in sorted(main.items()):
        if metric in QUALITY or metric == "ppl" or (metric in COPYING and method != "base"):
            out[f"{task}/{method}/{metric}"] = round(value, 4)
        if metric == "tokens_per_pass" and method != "base":
            base = main.get((task, "base", "tokens_per_pass"))
            if base:
                out[f"{task}/{method}/pass_speedup"] = round(value / base, 4)
    return out


@dataclass(frozen=True)
class Check:
    name: str
    recorded: float | None
    measured: float | None
    band: str
    ok: bool


def within(metric: str, recorded: float, measured: float) -> tuple[bool, str]:
    """Whether ``measured`` lies in ``recorded``'s band for ``metric``, and the band as text."""
    kind, tol = TOLERANCE[metric]
    if kind == "abs":
        lo, hi = recorded - tol, recorded + tol
    elif kind == "rel":
        lo, hi = recorded * (1 - tol), recorded * (1 + tol)
    else:
        lo, hi = recorded / tol, recorded * tol
    return lo <= measured <= hi, f"[{lo:.4g}, {hi:.4g}]"


def compare(recorded: Mapping[str, float], measured: Mapping[str, float]) -> list[Check]:
    """One check per recorded number; a number that was recorded but is missing now fails, and so does a new one."""
    checks = []
    for name in sorted(set(recorded) | set(measured)):
        r, m = recorded.get(name), measured.get(name)
        if r is None or m is None:
            checks.append(Check(name, r, m, "missing now" if m is None else "not recorded", False))
            continue
        ok, band = within(name.rsplit("/", 1)[1], r, m)
        checks.append(Check(name, r, m, band, ok))
    return checks


def failures(checks: list[Check]) -> list[str]:
    return [f"{c.name}: measured {c.measured} vs recorded {c.recorded} (band {c.band})" for c in checks if not c.ok]


def render(checks: list[Check]) -> str:
    lines = ["| number | recorded | measured | band | ok |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.recorded if c.recorded is not None else '—'} | "
                     f"{c.measured if c.measured is not None else '—'} | {c.band} | {'yes' if c.ok else '**no**'} |")
    return "\n".join(lines)


def summary_rows(store, run: dict) -> list[dict]:
    """Every summary row of the Score stages that ``run`` reached."""
    import pyarrow.parquet as pq  # lazy: start-up time

    rows: list[dict] = []
    for r in run.get("reached", []):
        if r["stage"] == "Score":
            path = store.path("Score", r["key"]) / "summary.parquet"
            if path.exists():
                rows.extend(pq.read_table(path).to_pylist())
    return rows


def pass_rows(store, run: dict) -> list[dict]:
    """``tokens_per_pass`` rows (Σ generated tokens ÷ Σ LM forward passes) of the Generate artifact each main-grid Score
    of ``run`` read."""
    import pyarrow.parquet as pq  # lazy: start-up time

    out = []
    for r in run.get("reached", []):
        if r["stage"] != "Score":
            continue
        m = store.manifest("Score", r["key"])
        gen = (m or {}).get("inputs", {}).get("generations")
        params = (m or {}).get("params", {})
        if not gen or params.get("variant", "main") != "main":
            continue
        path = store.path(gen["stage"], gen["key"]) / "generations.parquet"
        if not path.exists():
            continue
        t = pq.read_table(path, columns=["num_tokens", "counters"]).to_pylist()
        passes = sum(int(json.loads(x["counters"] or "{}").get("lm_forward_passes", 0)) for x in t)
        if passes:
            out.append({"task": params["task"], "method": params["method"], "variant": "main",
                        "metric": "tokens_per_pass", "value": sum(int(x["num_tokens"]) for x in t) / passes})
    return out


def load(name: str) -> dict[str, float]:
    return json.loads((RECORDS / f"{name}.json").read_text(encoding="utf-8"))["numbers"]


def save(name: str, numbers: Mapping[str, float], setting: str) -> Path:
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.json"
    doc = {"setting": setting, "tolerance": {k: list(v) for k, v in TOLERANCE.items()}, "numbers": dict(numbers)}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.reproduction", description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="write the latest run's numbers as the recorded table")
    ap.add_argument("--name", default="embedded", help="the recorded table (tests/reproduction/<name>.json)")
    args = ap.parse_args(argv)
    store = cfg.get_store()
    run = latest_run_with(store, "Report")
    if run is None:
        print(f"no run with a report in {store.root}; run `make all` first", file=sys.stderr)
        return 2
    measured = headline(summary_rows(store, run) + pass_rows(store, run))
    if args.record:
        path = save(args.name, measured, setting=f"run {run.get('id', '?')} of {store.root}")
        print(f"recorded {len(measured)} numbers in {path.relative_to(PROJECT_ROOT)}")
        return 0
    checks = compare(load(args.name), measured)
    print(render(checks))
    bad = failures(checks)
    print(f"{len(checks) - len(bad)}/{len(checks)} numbers within their bands", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
