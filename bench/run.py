"""Run every ``bench/bench_*.py`` (or the ones named) and write ``bench/results/<name>.json`` and ``<name>.md``.

    python -m bench.run [--quick] [NAME ...]        # NAME: "pipeline" for bench_pipeline.py

Each module's ``main(argv) -> dict`` returns a JSON-serialisable result with a ``markdown`` entry (the summary table);
the runner writes the markdown to ``<name>.md`` and the rest to ``<name>.json``. ``--quick`` runs tiny sizes (a smoke
test of the benchmark itself, numbers not meaningful) and writes ``<name>-quick.json`` / ``<name>-quick.md`` instead, so
that a quick run never overwrites the real figures.

A benchmark that times things checks that the machine is quiet (``bench/quiet.py``). When it is not, the result holds
``refused`` (the reason, one line): the runner then writes ``<name>-busy.json`` / ``<name>-busy.md`` instead of the
headline files, prints the reason, and exits 1 after the other benchmarks (``make bench`` fails).
``NEST_BENCH_ALLOW_BUSY=1`` lets such a run write its files, labelled "measured under load".
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes; writes <name>-quick.*")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    args, rest = ap.parse_known_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    refused = []
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        print(f"== bench {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = module.main((["--quick"] if args.quick else []) + rest)
        result.setdefault("wall_seconds", round(time.perf_counter() - t0, 1))
        stem = f"{name}-quick" if args.quick else name
        if result.get("refused"):  # a busy machine: never overwrite the headline figures
            stem += "-busy"
            refused.append(name)
        markdown = result.pop("markdown", "")
        _atomic_write(RESULTS / f"{stem}.json", json.dumps(result, indent=2) + "\n")
        _atomic_write(RESULTS / f"{stem}.md", markdown.rstrip() + "\n")
        print(markdown)
        if result.get("refused"):
            print(f"bench {name}: no headline figures ({result['refused']}); wrote {stem}.md instead; "
                  f"run on a quiet machine, or set NEST_BENCH_ALLOW_BUSY=1 to label them measured under load",
                  file=sys.stderr, flush=True)
    # a missed target is reported in the results, not turned into a failed make; a busy machine is
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
