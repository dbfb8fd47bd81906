"""The HTML report at scale: a synthetic run of 2,500 questions × 5 methods (the goal: it opens in under 3 s),
its file size and its load time measured in headless Chromium (bench/browser.py).

    python -m bench.run html [--quick] [--report PATH ...]

The synthetic run goes through the same builder as the Report stage (stages/evaluation/html_report.py: ``Blob``,
``highlight_html``, ``page``): per question a prompt, a reference and one output per method (64 tokens; the copying
methods copy 1-3 runs from 1-3 of the question's 10 retrieved passages), each copied passage stored once (~100 tokens).
Load time: ``window.nestReady``, milliseconds from navigation start until the tables and the first page of examples are
rendered (the data blob parsed and indexed), the median of 3 fresh pages. Also measured: switching to another task
(the index of every output is built at load, so this is one page of examples) and a prompt search over all questions.
``--report PATH`` also measures an existing report.html (e.g. the end-to-end test's or the embedded run's).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

GOAL_MS = 3000.0
METHODS = (("base", "Base LM", False), ("ra", "+RA", False), ("knnlm", "+kNN-LM", False), ("nest", "+NEST", True),
           ("ra_nest", "+RA-NEST", True))
WORDS = ("the of and in to was is for as by with on from at his her an which that were are it be their has also first "
         "city river king war born died century university american british french german music film album team "
         "season league school party government president church island county village station north south").split()


def _tokens(rng: random.Random, n: int) -> list[str]:
    return [" " + rng.choice(WORDS) for _ in range(n)]


def _ends(tokens: list[str]) -> list[int]:
    out, total = [], 0
    for t in tokens:
        total += len(t)
        out.append(total)
    return out


def synthetic_page(path: Path, questions: int, tasks: int = 1, seed: int = 0, output_tokens: int = 64,
                   passage_tokens: int = 100) -> dict:
    """Write a synthetic report.html of ``questions`` questions (split over ``tasks`` tasks) × the 5 methods."""
    from stages.evaluation import html_report as hr

    rng = random.Random(seed)
    blob = hr.Blob()
    passages: dict[int, list[str]] = {}
    next_doc = 0
    for t in range(tasks):
        task = f"qa{t}"
        runs = {m: blob.add_run(task, m, label) for m, label, _ in METHODS}
        for q in range(questions // tasks):
            eid = q
            blob.add_example(task, eid, "Question:" + "".join(_tokens(rng, 12)) + "?", "".join(_tokens(rng, 4)).strip())
            retrieved = list(range(next_doc, next_doc + 10))
            next_doc += 10
            for m, _, copies in METHODS:
                toks = _tokens(rng, output_tokens)
                docs, pos = [-1] * output_tokens, [-1] * output_tokens
                if copies:
                    at = 0
                    for _ in range(rng.randint(1, 3)):
                        doc = rng.choice(retrieved[:3])
                        src = passages.setdefault(doc, _tokens(rng, passage_tokens))
                        start, length = rng.randrange(0, passage_tokens // 2), rng.randint(5, 20)
                        at += rng.randint(0, 6)
                        for k in range(length):
                            if at >= output_tokens:
                                break
                            toks[at], docs[at], pos[at] = src[start + k], doc, start + k
                            at += 1
                copied = sum(d >= 0 for d in docs)
                metrics = {"alr": float(rng.random() < 0.4) * 100, "attribution_ratio": 100.0 * copied / output_tokens,
                           "num_tokens": output_tokens, "wall_s": rng.uniform(0.5, 4.0),
                           "s_lm_forward": rng.uniform(0.3, 2.0), "s_passage_search": rng.uniform(0.01, 0.1)}
                text = "".join(toks)
                blob.add_output(runs[m], eid, text, _ends(toks), docs, pos, metrics)
    for doc, toks in passages.items():
        blob.add_passage(doc, [f"Passage {doc}", "".join(toks).lstrip(), [e - 1 for e in _ends(toks)]])
    header = "| method | ALR | copied % |\n|---|---|---|\n" + "\n".join(
        f"| {label} | {rng.uniform(20, 50):.1f} | {'–' if not c else f'{rng.uniform(40, 90):.1f}'} |"
        for _, label, c in METHODS)
    tables = hr.markdown_html(f"## Table 1: quality per method and task\n\n{header}\n")
    text = hr.page("synthetic NEST report", tables, blob.to_dict("synthetic NEST report"),
                   {"report key": "synthetic", "profile": "synthetic", "date": time.strftime("%Y-%m-%d")})
    hr.write_page(path, text)
    return {"outputs": len(blob.outputs), "passages": len(blob.passages), "bytes": path.stat().st_size}


def measure(path: Path, loads: int = 3) -> dict:
    """Load time (median of ``loads`` fresh pages), a task switch and a search, in headless Chromium."""
    from bench.browser import browser, open_report

    ready, switch, search = [], [], []
    with browser() as b:
        for _ in range(loads):
            page, ms = open_report(b, path)
            ready.append(ms)
            if page.nest_errors:
                raise RuntimeError(f"{path}: {page.nest_errors[0]}")
            sw, se = page.evaluate("""() => {
                const sel = document.getElementById('f-task'), q = document.getElementById('search');
                let t0 = performance.now();
                if (sel.options.length > 1) { sel.selectedIndex = 1; nestView.setupFilters(); nestView.render(); }
                const sw = performance.now() - t0;
                q.value = 'river'; t0 = performance.now(); nestView.render();
                return [sw, performance.now() - t0];
            }""")
            switch.append(sw)
            search.append(se)
            page.close()
    return {"bytes": path.stat().st_size, "mib": round(path.stat().st_size / 2**20, 2),
            "load_ms": round(statistics.median(ready), 1), "load_ms_all": [round(x, 1) for x in ready],
            "task_switch_ms": round(statistics.median(switch), 1), "search_ms": round(statistics.median(search), 1)}


def main(argv: list[str] | None = None) -> dict:
    from bench.browser import unavailable

    ap = argparse.ArgumentParser(prog="bench html")
    ap.add_argument("--quick", action="store_true", help="100 questions")
    ap.add_argument("--questions", type=int, default=None)
    ap.add_argument("--report", type=Path, action="append", default=[], help="also measure this report.html")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        return {"skipped": why, "markdown": f"**HTML report**: not measured: {why}"}
    n = args.questions or (100 if args.quick else 2500)
    rows, result = [], {"quick": args.quick, "goal_ms": GOAL_MS}
    with tempfile.TemporaryDirectory(prefix="nest-bench-html-") as tmp:
        path = Path(tmp) / "report.html"
        t0 = time.perf_counter()
        built = synthetic_page(path, n, tasks=2)
        build_s = time.perf_counter() - t0
        m = measure(path)
        result["synthetic"] = {"questions": n, "methods": len(METHODS), **built, "build_s": round(build_s, 2), **m,
                               "met": m["load_ms"] < GOAL_MS}
        rows.append((f"synthetic: {n} questions × {len(METHODS)} methods ({built['outputs']:,} outputs, "
                     f"{built['passages']:,} passages)", m))
    for report in args.report:
        m = measure(report)
        result.setdefault("reports", {})[str(report)] = m
        rows.append((f"`{report.name}` ({report.parent.name[:12]})", m))
    from bench.browser import chromium_path

    lines = [f"**HTML report in headless Chromium** (`{chromium_path()}`; load = navigation start to the tables and the "
             f"first 20 examples rendered, median of 3 fresh pages; goal < {GOAL_MS / 1000:g} s)", "",
             "| page | size (MiB) | load (ms) | another task (ms) | prompt search (ms) |", "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['mib']} | {m['load_ms']} | {m['task_switch_ms']} | {m['search_ms']} |")
    result["markdown"] = "\n".join(lines) + "\n"
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
