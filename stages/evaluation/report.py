"""Report stage: the paper's tables and figures from the scored runs (Markdown + PNG + Parquet).

Input: one or more Score artifact folders (or ``summary.parquet`` files) written by :mod:`stages.evaluation.score`: the
``summary.parquet`` rows ``(task, method, variant, metric, value, n)`` with values already in the paper's table scale
(%): ``variant`` is ``"main"`` for the main runs, ``"gamma=<γ>"`` for the leniency sweep and ``"ablation:<step>"`` for
Table 3. Each run's decoding config comes beside its summary (``configs``): a sweep run's γ is read from it, not from
the variant's name. The methods, their order and row labels come from the registry (stages/decoding/registry.py). Next
to a summary, ``scores.parquet`` (per-example values: the paired bootstrap against the base LM) and, for
the bio tasks, ``copied_sources.parquet`` (the off-topic copies) are read when present. ``key_stores``: per task, the
EncodePassageKeys artifact NEST's main run read (its ``manifest.json`` holds the build time): the section "What the key
store cost" puts that time beside NEST's speed, since no query's seconds hold it. Every number in the report comes
from those rows; a metric that was not computed (no value) is printed as "not computed", never filled in. A section
with no rows (no γ sweep, no ablation, no QA task, ...) is left out, not printed empty.

Outputs: ``report.md``, ``tables.parquet`` (every table cell, long format), ``gamma_sweep.png``, ``latency.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from stages.decoding.config import NestConfig
from stages.decoding.registry import methods
from stages.decoding.types import LATENCY_COMPONENTS
from stages.evaluation import html_report
from stages.evaluation.experiments import ABLATION_STEPS, FULL_ABLATION, SWEEP_METHOD, is_sweep
from tasks import registry
from tasks.base import Column
from tasks.base import QATask
from tasks.metrics import paired_bootstrap

VERSION = "7"

BASE = "base"  # the reference of the speed-ups and of the paired differences
NOT_COMPUTED = "not computed"

BOOTSTRAP = {"resamples": 10_000, "seed": 0, "level": 0.95}


def task_spec(task: str):
    """The task's declarations (:mod:`tasks.registry`: Table-1 ``report_columns``, ``quality_metric`` for Table 3 and
    the γ sweep, ``headline_metrics`` for the bootstrap, ``topical``, ``perplexity``); a task the registry does not
    know is shown as a short-answer QA task."""

    return registry.spec(task) if task in registry.names() else QATask


def quality_column(task: str):
    """The Table-1 column of the task's quality metric (its label, scale and decimals in Table 3)."""
    spec = task_spec(task)
    return next((c for c in spec.report_columns if c.metric == spec.quality_metric), None) \
        or Column(spec.quality_metric, spec.quality_metric)


def registered_methods() -> dict:
    """The registered decoding methods (stages/decoding/registry.py: read from their files, no torch), in table order."""

    return methods()


def method_label(method: str) -> str:
    """A method's row label in the tables: its declared ``label`` (an unregistered method: its name)."""
    info = registered_methods().get(method)
    return info.label if info else method


def method_order(present: Iterable[str]) -> list[str]:
    """The methods among ``present``: the registered ones in their order, then any other, by name."""
    present = set(present)
    order = [m for m in registered_methods() if m in present]
    return order + sorted(present - set(order))


class Summary:
    """Lookup over summary rows: ``get(task, method, metric, variant="main") -> float | None``. A row may carry the
    decoding ``config`` of its run (a JSON string of NestConfig overrides): :meth:`gamma` reads γ from it."""

    def __init__(self, rows: Iterable[dict]):
        self.rows = list(rows)
        self._index = {(r["task"], r["method"], r["variant"], r["metric"]): r["value"] for r in self.rows}
        self._config = {(r["task"], r["method"], r["variant"]): r["config"] for r in self.rows
                        if r.get("config") is not None}

    @classmethod
    def from_files(cls, paths: Iterable[Path], configs: Iterable[dict | None] | None = None) -> "Summary":
        """Rows of each ``summary.parquet``; ``configs`` (parallel to ``paths``): each run's decoding config."""
        paths = list(paths)
        configs = list(configs) if configs is not None else [None] * len(paths)
        rows: list[dict] = []
        for p, config in zip(paths, configs):
            extra = {} if config is None else {"config": json.dumps(config, sort_keys=True)}
            rows.extend({**r, **extra} for r in pq.read_table(p).to_pylist())
        return cls(rows)

    def methods(self) -> list[str]:
        return method_order(r["method"] for r in self.rows)

    def sweep_variants(self, task: str, method: str = SWEEP_METHOD) -> list[str]:
        """The γ-sweep variants with rows for ``task``/``method``."""
        return sorted({r["variant"] for r in self.rows if r["task"] == task and r["method"] == method
                       and is_sweep(r["variant"])})

    def gamma(self, task: str, method: str, variant: str) -> float:
        """γ of a run, from its decoding config (NestConfig's default when the config leaves it)."""

        config = self._config.get((task, method, variant))
        if config is None:
            raise ValueError(f"no decoding config for {task}/{method}/{variant}: γ is read from the run's config")
        return float(json.loads(config).get("gamma", NestConfig.gamma))

    def get(self, task: str, method: str, metric: str, variant: str = "main") -> float | None:
        v = self._index.get((task, method, variant, metric))
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return float(v)

    def tasks(self, variant: str = "main") -> list[str]:
        seen: list[str] = []
        for r in self.rows:
            if r["variant"] == variant and r["task"] not in seen:
                seen.append(r["task"])
        return seen

    def variants(self, prefix: str) -> list[str]:
        return sorted({r["variant"] for r in self.rows if r["variant"].startswith(prefix)})


def fmt(value: float | None, scale: float = 1, decimals: int = 1) -> str:
    return NOT_COMPUTED if value is None else f"{value * scale:.{decimals}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# metrics about copied spans: "–" in Table 1 for the methods that cannot copy (no token index: the base LM, RA)
COPY_METRICS = frozenset({"answer_in_copied_span", "attribution_ratio", "attribution_span_length", "topical_precision",
                          "chimera_rate"})


def copies(method: str) -> bool:
    """Whether a method can copy from the corpus (its registry entry declares a token index)."""
    info = registered_methods().get(method)
    return bool(info and info.uses_token_index)


def table1(s: Summary, cells: list[dict]) -> str:
    """Quality per method and task (the paper's Table 1, one block per task)."""
    out = []
    for task in s.tasks():
        cols = task_spec(task).report_columns
        rows = []
        for m in s.methods():
            if not any(s.get(task, m, c.metric) is not None for c in cols) and s.get(task, m, "num_tokens") is None:
                continue
            row = [method_label(m)]
            for key, label, scale, dec in ((c.metric, c.label, c.scale, c.decimals) for c in cols):
                v = s.get(task, m, key)
                if key in COPY_METRICS and not copies(m):  # a method that cannot copy has no copied span: "–"
                    row.append("–")
                    cells.append({"table": "1", "task": task, "row": m, "column": label, "value": None})
                    continue
                row.append(fmt(v, scale, dec))
                cells.append({"table": "1", "task": task, "row": m, "column": label, "value": v})
            rows.append(row)
        n = next((r["n"] for r in s.rows if r["task"] == task and r["variant"] == "main"), 0)
        out.append(f"**{task}** ({n} examples)\n\n" + _md_table(["method"] + [c.label for c in cols], rows))
    return "\n\n".join(out)


def table2(s: Summary, cells: list[dict]) -> str:
    """Attribution (the paper's Table 2): the share of copied tokens and the mean copied-span length, beside them the
    share of "supported" tokens (produced one at a time, their value among the neighbours: not copies) and, for the bio
    tasks, the topical precision (copied tokens from the person's own passages). Only the retrieval methods."""
    rows = []
    cols = (("attribution_ratio", "Ratio (%)"), ("attribution_span_length", "Length (tokens)"),
            ("supported_ratio", "Supported (%)"), ("topical_precision", "Topical precision (%)"))
    registered = registered_methods()
    copying = [m for m in s.methods() if m in registered and registered[m].uses_token_index]
    for task in s.tasks():
        for m in copying:
            vals = [s.get(task, m, k) for k, _ in cols]
            if all(v is None for v in vals[:3]):
                continue
            bio = task_spec(task).topical
            rows.append([task, method_label(m)] + [fmt(v, 1, 1) if bio or k != "topical_precision" else "—"
                                                    for (k, _), v in zip(cols, vals)])
            for (k, label), v in zip(cols, vals):
                if bio or k != "topical_precision":
                    cells.append({"table": "2", "task": task, "row": m, "column": label, "value": v})
    if not rows:
        return ""
    return _md_table(["task", "method"] + [c[1] for c in cols], rows)


def table3(s: Summary, cells: list[dict]) -> str:
    """Ablation (the paper's Table 3): kNN-LM → +RRC → +dynamic span selection → +relaxed speculative decoding."""
    tasks = [t for t in s.tasks(FULL_ABLATION)]
    if not tasks:
        return ""
    header = ["variant"]
    metric_of = {}
    for t in tasks:
        col = quality_column(t)
        metric_of[t] = (col.metric, col.scale, col.decimals)
        header.append(f"{t} {col.label}")
    rows = []
    for step in ABLATION_STEPS:
        row = [step.label]
        for t in tasks:
            key, scale, dec = metric_of[t]
            v = s.get(t, step.method, key, step.variant)
            row.append(fmt(v, scale, dec))
            cells.append({"table": "3", "task": t, "row": step.name, "column": key, "value": v})
        rows.append(row)
    return _md_table(header, rows)


def gamma_sweep(s: Summary, cells: list[dict], out_dir: Path | None) -> str:
    """Speedup over the base LM and mean accepted span length against γ (the paper's Fig. 2b)."""
    rows, series = [], {}
    for task in {r["task"] for r in s.rows if is_sweep(r["variant"])}:
        pts = []
        for v in s.sweep_variants(task):
            g = s.gamma(task, SWEEP_METHOD, v)
            speed = s.get(task, SWEEP_METHOD, "tokens_per_s", v)
            base = s.get(task, BASE, "tokens_per_s")
            speedup = speed / base if speed and base else None
            span = s.get(task, SWEEP_METHOD, "mean_accepted_span", v)
            proposed = s.get(task, SWEEP_METHOD, "mean_proposed_span", v)
            ratio = s.get(task, SWEEP_METHOD, "attribution_ratio", v)
            quality = task_spec(task).quality_metric
            rouge = s.get(task, SWEEP_METHOD, quality, v)
            pts.append((g, speedup, span))
            rows.append([task, f"{g:g}", fmt(speed, 1, 1), fmt(speedup, 1, 2), fmt(proposed, 1, 1), fmt(span, 1, 1),
                         fmt(ratio, 1, 1),
                         fmt(rouge, 1, 1)])
            for col, val in (("tokens_per_s", speed), ("speedup", speedup), ("mean_accepted_span", span),
                             ("attribution_ratio", ratio), (quality, rouge)):
                cells.append({"table": "gamma", "task": task, "row": f"{g:g}", "column": col, "value": val})
        series[task] = sorted(pts, reverse=True)
    if not rows:
        return ""
    if out_dir is not None and series:
        _plot_gamma(series, out_dir / "gamma_sweep.png")
    return _md_table(["task", "γ", "tokens/s", "speedup vs base", "mean proposed span", "mean accepted span",
                      "attribution %", "quality (Table 3 metric)"], rows)


def _plot_gamma(series: dict, path: Path) -> None:
    # lazy: matplotlib takes seconds to import
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib takes seconds to import
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for task, pts in series.items():
        gs = [p[0] for p in pts]
        a1.plot(gs, [p[1] if p[1] is not None else float("nan") for p in pts], marker="o", label=task)
        a2.plot(gs, [p[2] if p[2] is not None else float("nan") for p in pts], marker="o", label=task)
    for ax, title in ((a1, "speedup over base LM"), (a2, "mean accepted span (tokens)")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("leniency γ")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(s: Summary, cells: list[dict], out_dir: Path | None) -> str:
    """Seconds per query by component (the paper's Fig. 2a), for each method on each task: every cost a query paid
    (retrieval, key encoding, index building) is in its total; pooled tokens/s first, the median beside it."""
    rows, bars = [], []
    for task in s.tasks():
        for m in s.methods():
            total = s.get(task, m, "seconds_per_query")
            if total is None:
                continue
            comps = [s.get(task, m, f"time_{c}") for c in LATENCY_COMPONENTS]
            hit = s.get(task, m, "key_hit_rate")
            rows.append([task, method_label(m), fmt(total, 1, 2)] + [fmt(c, 1, 2) for c in comps] +
                        [fmt(s.get(task, m, "tokens_per_s"), 1, 1), fmt(s.get(task, m, "tokens_per_s_median"), 1, 1),
                         fmt(hit, 1, 0) if hit is not None else "–"])
            bars.append((f"{task}\n{m}", [max(c or 0.0, 0.0) for c in comps]))
            cells.append({"table": "latency", "task": task, "row": m, "column": "seconds_per_query", "value": total})
            for c, v in zip(LATENCY_COMPONENTS, comps):
                cells.append({"table": "latency", "task": task, "row": m, "column": c, "value": v})
    if not rows:
        return ""
    if out_dir is not None and bars:
        _plot_latency(bars, out_dir / "latency.png")
    return _md_table(["task", "method", "s/query"] + list(LATENCY_COMPONENTS) +
                     ["tok/s (pooled)", "tok/s (median)", "key hit %"], rows)


def _plot_latency(bars: list, path: Path) -> None:
    # lazy: matplotlib takes seconds to import
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib takes seconds to import
    import matplotlib.pyplot as plt

    labels = list(LATENCY_COMPONENTS)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars) + 2), 4))
    bottom = [0.0] * len(bars)
    for i, lab in enumerate(labels):
        vals = [b[1][i] for b in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, label=lab)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=90)
    ax.set_ylabel("seconds per query (all costs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trend_checks(s: Summary) -> list[tuple[str, bool | None, str]]:
    """The paper's trends that should survive shrinking the setup, each judged on this run's numbers."""
    checks = []
    comp = [t for t in s.tasks() if task_spec(t).perplexity]
    for t in comp:
        ppl = [s.get(t, m, "ppl") for m in ("base", "knnlm", "nest", "ra_nest")]
        if all(v is not None for v in ppl):
            ok = ppl[0] > ppl[1] > ppl[2] > ppl[3]
            checks.append((f"{t}: PPL base > kNN-LM > NEST > RA-NEST", ok, " > ".join(f"{v:.2f}" for v in ppl)))
    for t in s.tasks(FULL_ABLATION):
        key = task_spec(t).quality_metric
        vals = [s.get(t, step.method, key, step.variant) for step in ABLATION_STEPS]
        if all(v is not None for v in vals):
            ok = vals[0] <= vals[1] and vals[2] <= vals[3]
            checks.append((f"{t}: ablation, RRC and relaxed speculative decoding each help ({key})", ok,
                           " → ".join(f"{v:.3f}" for v in vals)))
    for t in {r["task"] for r in s.rows if is_sweep(r["variant"])}:
        pts = sorted((s.gamma(t, SWEEP_METHOD, v), s.get(t, SWEEP_METHOD, "attribution_ratio", v),
                      s.get(t, SWEEP_METHOD, "mean_accepted_span", v)) for v in s.sweep_variants(t))
        ratios = [p[1] for p in pts if p[1] is not None]
        spans = [p[2] for p in pts if p[2] is not None]
        if len(ratios) >= 2:
            checks.append((f"{t}: attribution ratio falls as γ rises", ratios[0] >= ratios[-1],
                           ", ".join(f"γ={p[0]:g}: {p[1]:.3f}" for p in pts if p[1] is not None)))
        if len(spans) >= 2:
            checks.append((f"{t}: accepted span length rises as γ falls", spans[0] >= spans[-1],
                           ", ".join(f"γ={p[0]:g}: {p[2]:.1f}" for p in pts if p[2] is not None)))
    return checks


def paired_differences(scores: list[dict], cells: list[dict]) -> str:
    """Every method's difference from the base LM on each headline quality metric of each task (main runs), with a
    95% paired-bootstrap interval over the examples both have a value for (:func:`tasks.metrics.paired_bootstrap`,
    seeded, 10k resamples); significant when the interval excludes 0."""

    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in scores:
        if r["variant"] != "main" or r["value"] is None or (isinstance(r["value"], float) and math.isnan(r["value"])):
            continue
        values.setdefault((r["task"], r["method"], r["metric"]), {})[int(r["example_id"])] = float(r["value"])
    rows = []
    tasks = list(dict.fromkeys(r["task"] for r in scores if r["variant"] == "main"))
    for task in tasks:
        for metric in task_spec(task).headline_metrics:
            base = values.get((task, BASE, metric))
            if not base:
                continue
            for m in method_order(k[1] for k in values if k[1] != BASE):
                mine = values.get((task, m, metric))
                if not mine:
                    continue
                shared = sorted(set(base) & set(mine))
                if not shared:
                    continue
                b = paired_bootstrap([mine[e] for e in shared], [base[e] for e in shared], **BOOTSTRAP)
                rows.append([task, metric, method_label(m), str(b["n"]), f"{b['diff']:+.2f}",
                             f"[{b['low']:+.2f}, {b['high']:+.2f}]", "yes" if b["significant"] else "no"])
                for col in ("diff", "low", "high", "n"):
                    cells.append({"table": "bootstrap", "task": task, "row": m, "column": f"{metric} {col}",
                                  "value": b[col]})
                cells.append({"table": "bootstrap", "task": task, "row": m, "column": f"{metric} significant",
                              "value": float(b["significant"])})
    if not rows:
        return ""
    return _md_table(["task", "metric", "method", "examples", "difference from base LM", "95% interval",
                      "significant"], rows)


def off_topic_copies(s: Summary, scores: list[dict], copied: list[dict], cells: list[dict]) -> str:
    """For each bio example and method that copied anything: its topical precision and the off-topic passages it
    copied from (title, copied tokens), most tokens first."""
    prec = {(r["task"], r["method"], int(r["example_id"])): r["value"] for r in scores
            if r["variant"] == "main" and r["metric"] == "topical_precision"}
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in copied:
        if r["variant"] == "main":
            groups.setdefault((r["task"], int(r["example_id"]), r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(method_order(k[2] for k in groups))}
    rows = []
    for (task, eid, m) in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], 99))):
        rs = groups[(task, eid, m)]
        off = sorted((r for r in rs if not r["on_topic"]), key=lambda r: (-r["tokens"], r["title"]))
        p = prec.get((task, m, eid))
        listed = "; ".join(f"{r['title']} ({r['tokens']})" for r in off) or "none"
        rows.append([task, str(eid), rs[0]["topic"] or "", method_label(m), fmt(p, 1, 1),
                     str(sum(r["tokens"] for r in rs)), listed])
        cells.append({"table": "off_topic", "task": task, "row": f"{m}:{eid}", "column": "topical_precision",
                      "value": p})
        cells.append({"table": "off_topic", "task": task, "row": f"{m}:{eid}", "column": "off_topic_tokens",
                      "value": float(sum(r["tokens"] for r in off))})
    if not rows:
        return ""
    pooled = []
    for task in dict.fromkeys(k[0] for k in groups):
        for m in s.methods():
            v = s.get(task, m, "topical_precision")
            if v is not None:
                pooled.append(f"{task} {method_label(m)}: {v:.1f}%")
    head = ("Topical precision over all copied tokens: " + ", ".join(pooled) + ".\n\n") if pooled else ""
    return head + _md_table(["task", "example", "topic", "method", "topical precision (%)", "copied tokens",
                             "off-topic sources (copied tokens)"], rows)


def _rows_n(s: Summary, task: str, method: str, metric: str, variant: str = "main") -> int | None:
    for r in s.rows:
        if (r["task"], r["method"], r["variant"], r["metric"]) == (task, method, variant, metric) and r.get("n"):
            return int(r["n"])
    return None


def key_store_costs(s: Summary, key_stores: dict[str, dict] | None, cells: list[dict], method: str = "nest") -> str:
    """What each task's passage-key store cost: its build seconds, its per-query share (build seconds ÷ the
    queries that read it: the task's examples) and NEST's tokens/s with that share counted beside the tokens/s
    without. ``key_stores``: ``{task: {"build_s", "scope", "passages", "readers"}}`` (:func:`read_key_stores`). The
    latency table's seconds hold no part of the store's build: the keys were encoded before the first query."""
    rows = []
    retrieved = []
    for task, ks in (key_stores or {}).items():
        build = ks.get("build_s")
        n = _rows_n(s, task, method, "seconds_per_query")
        spq, tps = s.get(task, method, "seconds_per_query"), s.get(task, method, "tokens_per_s")
        share = build / n if build is not None and n else None
        with_share = (tps * spq / (spq + share) if tps is not None and spq is not None and share is not None
                      and spq + share > 0 else None)
        scope = ks.get("scope") or "retrieved"
        if scope == "retrieved":
            retrieved.append(task)
        rows.append([task, f"`{scope}`" + (f", b = {ks['passages']}" if ks.get("passages") else ""),
                     fmt(build, 1, 1), str(n) if n else NOT_COMPUTED, fmt(share, 1, 2),
                     fmt(spq + share if spq is not None and share is not None else None, 1, 2), fmt(spq, 1, 2),
                     fmt(with_share, 1, 1), fmt(tps, 1, 1), str(ks.get("readers") or "–")])
        for column, value in (("build_s", build), ("queries", n), ("share_s_per_query", share),
                              ("tokens_per_s_with_share", with_share), ("tokens_per_s", tps)):
            cells.append({"table": "key_store", "task": task, "row": method, "column": column, "value": value})
    if not rows:
        return ""
    head = []
    if retrieved:
        head.append(f"The `retrieved` keys of {', '.join(retrieved)} were encoded by an earlier stage "
                    f"(EncodePassageKeys) for these very queries (the passages pre-retrieval returned for them): their "
                    f"build time is in no query's seconds above, so here it is shared out over the queries that read "
                    f"it and counted.")
    return "\n\n".join(head + [_md_table(
        ["task", "key store", "build (s)", "queries", "share (s/query)", f"{method_label(method)} s/query with share",
         "without", f"{method_label(method)} tok/s with share", "without", "runs reading it"], rows)])


def read_key_stores(key_stores: dict[str, Path] | None, readers: dict[str, int] | None = None) -> dict[str, dict]:
    """``{task: EncodePassageKeys folder}`` → ``{task: {"build_s", "scope", "passages", "readers"}}`` from each
    folder's ``manifest.json`` (its ``timings.build_s``: the store's own build, whichever run built it)."""
    out: dict[str, dict] = {}
    for task, folder in (key_stores or {}).items():
        f = Path(folder) / "manifest.json"
        m = json.loads(f.read_text()) if f.exists() else {}
        params = m.get("params") or {}
        build = (m.get("timings") or {}).get("build_s")
        out[task] = {"build_s": None if build is None else float(build), "scope": params.get("scope", "retrieved"),
                     "passages": params.get("passages"), "readers": (readers or {}).get(task)}
    return out


ANSWER_COLUMNS = (  # (metric, label): how each answer ended, and what it said first (Score's summary, in %)
    ("alr", "ALR"), ("alr_first_sentence", "ALR, first sentence"), ("stopped_by_stop_rule", "ended by its rule"),
    ("stopped_by_eos", "ended by EOS"), ("stopped_by_length", "hit the length cap"),
    ("chimera_rate", "chimera sentences"), ("num_tokens", "mean tokens"),
)


def answers(s: Summary, cells: list[dict]) -> str:
    """Per QA task (the tasks scored by ALR) and method: ALR beside ALR on the answer's first sentence (text copied
    after the answer cannot score there), which rule ended the answers (stop rule, EOS, or the length cap), and the
    chimera rate: sentences whose copied tokens come from two or more articles."""
    out = []
    for task in s.tasks():
        if not any(s.get(task, m, "alr") is not None for m in s.methods()):
            continue
        rows = []
        for m in s.methods():
            if s.get(task, m, "alr") is None:
                continue
            row = [method_label(m)]
            for metric, label in ANSWER_COLUMNS:
                v = s.get(task, m, metric)
                row.append("–" if v is None and metric == "chimera_rate" else fmt(v))
                cells.append({"table": "answers", "task": task, "row": m, "column": label, "value": v})
            rows.append(row)
        out.append(f"**{task}**\n\n" + _md_table(["method"] + [c[1] + (" (%)" if c[0] != "num_tokens" else "")
                                                                 for c in ANSWER_COLUMNS], rows))
    return "\n\n".join(out)


def render(s: Summary, out_dir: Path | None = None, title: str = "NEST reproduction report",
           context: dict | None = None, scores: list[dict] | None = None,
           copied: list[dict] | None = None, key_stores: dict[str, dict] | None = None) -> tuple[str, list[dict]]:
    """The Markdown report and its cells. ``scores``: per-example rows of ``scores.parquet`` (bootstrap, per-example
    topical precision); ``copied``: rows of ``copied_sources.parquet`` (off-topic copies). Empty sections are left
    out."""
    cells: list[dict] = []
    parts = [f"# {title}", ""]
    if context:
        parts += [f"- {k}: `{v}`" for k, v in context.items()] + [""]
    sections = [
        ("## Table 1: quality per method and task", table1(s, cells), None),
        ("## Differences from the base LM (95% paired bootstrap)", paired_differences(scores or [], cells), None),
        ("## How the answers ended (QA)", answers(s, cells), None),
        ("## Table 2: attribution (copied tokens; supported tokens apart)", table2(s, cells), None),
        ("## Off-topic copies per biography", off_topic_copies(s, scores or [], copied or [], cells), None),
        ("## Table 3: ablation", table3(s, cells), None),
        ("## Leniency sweep (γ)", gamma_sweep(s, cells, out_dir), "![gamma sweep](gamma_sweep.png)"),
        ("## Latency breakdown (seconds per query)", latency(s, cells, out_dir), "![latency](latency.png)"),
        ("## What the key store cost", key_store_costs(s, key_stores, cells), None),
    ]
    for heading, body, figure in sections:
        if not body:
            continue
        parts += [heading, "", body, ""]
        if figure and out_dir is not None:
            parts += [figure, ""]
    checks = trend_checks(s)
    if checks:
        parts += ["## The paper's trends on this run", ""]
        for name, ok, detail in checks:
            parts.append(f"- {'holds' if ok else 'does NOT hold'}: {name} ({detail})")
    return "\n".join(parts) + "\n", cells


def _read_next_to(paths: list[Path], name: str) -> list[dict]:
    rows: list[dict] = []
    for p in paths:
        f = p.parent / name
        if f.exists():
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def run(out_dir: Path, *, summaries: dict[str, Path] | list[Path], context: dict | None = None,
        configs: dict[str, dict] | list[dict] | None = None, key_stores: dict[str, Path] | None = None,
        key_store_readers: dict[str, int] | None = None, generations: dict[str, Path] | None = None,
        **html_inputs) -> dict:
    """Write ``report.md``, ``tables.parquet`` and the PNG figures from the given ``summary.parquet`` folders/files.
    ``configs``: each run's decoding config (NestConfig overrides), keyed like ``summaries`` (or parallel to it): the
    γ of a sweep run is read from there. ``key_stores``: ``{task: EncodePassageKeys folder}`` of the stores NEST's
    main runs read; ``key_store_readers``: how many of the grid's runs read each. ``generations`` (each run's Generate
    folder, keyed like ``summaries``) with ``html_inputs`` (examples, passages, tokens, lm, provenance): also
    ``report.html`` (stages/evaluation/html_report.py)."""
    out_dir = Path(out_dir)
    names = list(summaries) if isinstance(summaries, dict) else list(range(len(summaries)))
    paths = []
    for p in (summaries.values() if isinstance(summaries, dict) else summaries):
        p = Path(p)
        paths.append(p / "summary.parquet" if p.is_dir() else p)
    if configs is not None:
        configs = [configs.get(n) for n in names] if isinstance(configs, dict) else list(configs)
    s = Summary.from_files(paths, configs)
    text, cells = render(s, out_dir, context=context, scores=_read_next_to(paths, "scores.parquet"),
                         copied=_read_next_to(paths, "copied_sources.parquet"),
                         key_stores=read_key_stores(key_stores, key_store_readers))
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    table = pa.Table.from_pylist(
        [{**c, "value": None if c["value"] is None else float(c["value"])} for c in cells],
        schema=pa.schema([("table", pa.string()), ("task", pa.string()), ("row", pa.string()),
                          ("column", pa.string()), ("value", pa.float64())]))
    pq.write_table(table, out_dir / "tables.parquet", compression="zstd")
    stats = {"cells": len(cells), "summaries": len(paths)}
    if generations is not None and isinstance(summaries, dict):

        stats.update(html_report.write(out_dir, markdown=text, cells=cells, title="NEST reproduction report",
                                       runs=summaries, generations=generations, method_label=method_label,
                                       **html_inputs))
    (out_dir / "report.json").write_text(json.dumps({"cells": len(cells)}))
    return stats
