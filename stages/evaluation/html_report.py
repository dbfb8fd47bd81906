"""The HTML report: one self-contained file (``report.html``) that shows a run: the paper's tables (sortable), the γ
sweep and the latency breakdown as inline SVG charts, and an example browser in which every copied span leads to the
passage it was copied from.

Built by the Report stage from the same Summary as ``report.md`` (:func:`write`) and by ``nest generate --html``
(:func:`demo_page`). The page is the template ``report_viewer.html`` (CSS and a small vanilla script, no framework, no
network fetch) with three slots filled here: the tables (HTML made here from the Markdown report, every piece of text
escaped), the provenance footer, and one JSON blob that the script renders lazily (a page of examples at a time).

Safety: corpus text and generations are untrusted. Text that becomes HTML here goes through :func:`html.escape`; the
JSON blob sits in a ``<script type="application/json">`` with ``<``, ``>`` and ``&`` written as ``\\u003c`` …
(:func:`safe_json`), so no ``</script>`` inside a passage can close it; the script puts passage text and prompts into
the page with ``textContent`` only. The one pre-rendered HTML string of the blob is each output's highlighted text
(:func:`highlight_html`: escaped text and ``<mark>`` elements made here).

Data blob (``window.NEST`` after load), kept compact for 2,500 questions × 5 methods (bench/bench_html.py):

- ``tasks``: ``[{name, examples: [[example_id, prompt, reference, topic], ...]}]``;
- ``runs``: ``[{task, method, label, variant}]``; ``metrics``: ``[[name, label], ...]``;
- ``outputs``: ``[[run index, example_id, highlighted html, [metric values aligned with metrics], retrieved]]``
  (``retrieved``: the ranked doc_ids the output could copy from, or null);
- ``passages``: ``{doc_id: [title, decoded text, token char ends]}`` for every passage an output copied from (or
  retrieved, in ``nest generate``); a copied run ``(pos, len)`` is the text ``[ends[pos-1], ends[pos+len-1])``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from stages.corpus.passages import PassageReader
from stages.decoding.attribution import token_char_ends
from stages.decoding.types import LATENCY_COMPONENTS
from stages.evaluation.score import _num  # one definition of "a finite number or None"
from stages.lm.load import load_tokenizer
from stages.lm.pretokenize import TokenLookup
from tasks.metrics import attribution_runs

TEMPLATE = Path(__file__).with_name("report_viewer.html")

# per-example metrics shown beside an output, in this order (Score's scores.parquet names), then seconds by component
METRIC_LABELS = (
    ("rouge1", "ROUGE-1"), ("rouge1_source", "ROUGE-1 vs source"), ("alr", "answer recall"),
    ("alr_first_sentence", "recall, 1st sentence"), ("factscore", "FactScore"),
    ("attribution_ratio", "copied %"), ("supported_ratio", "supported %"), ("topical_precision", "topical precision"),
    ("answer_in_copied_span", "answer in copied span"), ("num_tokens", "tokens"), ("wall_s", "seconds"),
)


# ---- escaping ---------------------------------------------------------------------------------------------------------

def safe_json(obj) -> str:
    """JSON that can sit inside ``<script type="application/json">``: ``<``, ``>``, ``&`` and the two JS line
    separators are written as escapes, so no text in it can end the element or start a tag."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def doc_colour(doc_id: int) -> str:
    """One colour per source passage: hues spread by the golden angle."""
    return f"hsl({(int(doc_id) * 137.508) % 360:.0f},75%,80%)"


# ---- copied spans -----------------------------------------------------------------------------------------------------

def copied_runs(source_doc_ids: Sequence[int], source_positions: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(start token, length, doc_id, first position)`` of every run of tokens copied from consecutive positions of
    one passage (:func:`tasks.metrics.attribution_runs`; −1 = not copied).

    >>> copied_runs([-1, 7, 7, 7, 9], [-1, 3, 4, 9, 0])
    [(1, 2, 7, 3), (3, 1, 7, 9), (4, 1, 9, 0)]
    """

    sources = [None if int(d) < 0 else (int(d), int(p)) for d, p in zip(source_doc_ids, source_positions)]
    return [(s, n, d, sources[s][1]) for s, n, d in attribution_runs(sources)]


def highlight_html(text: str, char_ends: Sequence[int], runs: Iterable[tuple[int, int, int, int]],
                   off_topic: Iterable[int] = ()) -> str:
    """The escaped ``text`` with one ``<mark class="cp" data-doc-id data-pos data-len>`` per copied run (token ``start``
    to ``start + length``, characters from ``char_ends``: token i spans ``[ends[i-1], ends[i])``). A run whose source
    is in ``off_topic`` also gets the class ``off``."""
    off = {int(d) for d in off_topic}
    ends = list(char_ends)
    out, prev = [], 0
    for start, length, doc, pos in sorted(runs):
        if length <= 0 or start + length > len(ends):
            continue
        a = ends[start - 1] if start > 0 else 0
        b = ends[start + length - 1]
        a, b = max(a, prev), max(b, prev)
        if b <= a:
            continue
        cls = "cp off" if doc in off else "cp"
        tip = "off-topic source: " if doc in off else "copied from "
        out.append(esc(text[prev:a]))
        out.append(f'<mark class="{cls}" data-doc-id="{int(doc)}" data-pos="{int(pos)}" data-len="{int(length)}" '
                   f'style="background:{doc_colour(doc)}" title="{tip}doc {int(doc)}">{esc(text[a:b])}</mark>')
        prev = b
    out.append(esc(text[prev:]))
    return "".join(out)


def passage_entry(tokenizer, token_ids: Sequence[int], title: str) -> list:
    """``[title, decoded text, ends]`` of a passage: the decode of its token ids (the tokens copied from it are
    ``ends``-addressable by their positions, which index these ids)."""

    ids = [int(t) for t in token_ids]
    return [title or "", tokenizer.decode(ids, skip_special_tokens=True), token_char_ends(tokenizer, ids)]


# ---- the tables: the Markdown report as HTML ---------------------------------------------------------------------------

_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>")]
_IMAGE = re.compile(r"^!\[[^\]]*\]\(([^)]+)\)\s*$")


def _inline(text: str) -> str:
    s = esc(text)
    for pattern, repl in _INLINE:
        s = pattern.sub(repl, s)
    return s


def markdown_html(md: str, figures: Mapping[str, str] | None = None) -> str:
    """The report's Markdown (headings, pipe tables, bullet lists, paragraphs, ``**bold**``, `` `code` ``) as HTML;
    a figure line ``![..](name.png)`` becomes ``figures[name]`` (an inline chart) or is dropped. Tables get the class
    ``sortable``; every cell is escaped."""
    figures = figures or {}
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table_html(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        m = re.match(r"^(#{1,4}) (.*)$", line)
        image = _IMAGE.match(line)
        if m:
            level = min(len(m.group(1)) + 1, 5)  # the page's h1 is its title
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif image:
            fig = figures.get(Path(image.group(1)).stem)
            if fig:
                out.append(fig)
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_html(block: list[str]) -> str:
    header = _cells(block[0])
    body = [_cells(b) for b in block[1:] if not re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", b)]
    head = "".join(f'<th title="sort">{_inline(h)}</th>' for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


# ---- inline charts (SVG; each point and bar carries its value in a <title>: shown on hover) ---------------------------

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")




def gamma_chart(cells: list[dict]) -> str:
    """Speed-up over the base LM and mean accepted span against γ (log scale, γ falling to the right), per task."""
    series: dict[str, list[tuple[float, float | None, float | None]]] = {}
    vals: dict[tuple[str, str], dict[str, float | None]] = {}
    for c in cells:
        if c["table"] == "gamma":
            vals.setdefault((c["task"], c["row"]), {})[c["column"]] = _num(c["value"])
    for (task, g), v in vals.items():
        series.setdefault(task, []).append((float(g), v.get("speedup"), v.get("mean_accepted_span")))
    if not series:
        return ""
    panels = [_line_panel("speed-up over the base LM", {t: [(g, s) for g, s, _ in pts] for t, pts in series.items()}),
              _line_panel("mean accepted span (tokens)", {t: [(g, a) for g, _, a in pts] for t, pts in series.items()})]
    legend = "".join(f'<span class="lg"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{esc(t)}</span>'
                     for i, t in enumerate(series))
    return f'<figure class="chart" id="chart-gamma">{"".join(panels)}<figcaption>{legend} (leniency γ, log scale)' \
           f'</figcaption></figure>'


def _line_panel(title: str, series: dict[str, list[tuple[float, float | None]]], w: int = 380, h: int = 220) -> str:
    pts = [(g, y) for s in series.values() for g, y in s if y is not None and g > 0]
    if not pts:
        return ""
    xs = [math.log10(g) for g, _ in pts]
    ys = [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys) or 1.0
    pad = 36

    def px(g):  # γ falls to the right, as in the paper's Fig. 2b
        return pad + (w - 2 * pad) * (0.5 if x1 == x0 else (x1 - math.log10(g)) / (x1 - x0))

    def py(y):
        return h - pad - (h - 2 * pad) * ((y - y0) / (y1 - y0) if y1 > y0 else 0.5)

    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><text x="{w / 2}" y="14" '
             f'text-anchor="middle" class="ct">{esc(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" class="ax"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" class="ax"/>',
             f'<text x="{pad - 4}" y="{py(y1) + 4:.1f}" text-anchor="end" class="tk">{y1:.3g}</text>',
             f'<text x="{pad - 4}" y="{py(y0) + 4:.1f}" text-anchor="end" class="tk">{y0:.3g}</text>']
    for g in sorted({g for g, _ in pts}):
        parts.append(f'<text x="{px(g):.1f}" y="{h - pad + 14}" text-anchor="middle" class="tk">{g:g}</text>')
    for i, (task, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        s = sorted((g, y) for g, y in s if y is not None and g > 0)
        if len(s) > 1:
            path = " ".join(f"{px(g):.1f},{py(y):.1f}" for g, y in s)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for g, y in s:
            parts.append(f'<circle cx="{px(g):.1f}" cy="{py(y):.1f}" r="5" fill="{colour}" class="pt">'
                         f'<title>{esc(task)}, γ = {g:g}: {y:.3g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def latency_chart(cells: list[dict], method_label=lambda m: m) -> str:
    """Seconds per query stacked by component, one bar per (task, method)."""
    bars: dict[tuple[str, str], dict[str, float]] = {}
    for c in cells:
        if c["table"] == "latency" and c["column"] in LATENCY_COMPONENTS:
            bars.setdefault((c["task"], c["row"]), {})[c["column"]] = max(_num(c["value"]) or 0.0, 0.0)
    if not bars:
        return ""
    bw, gap, pad, h = 26, 10, 40, 260
    w = pad + len(bars) * (bw + gap) + 170
    top = max(sum(v.values()) for v in bars.values()) or 1.0

    def py(y):
        return h - pad - (h - 2 * pad) * y / top

    parts = [f'<svg viewBox="0 0 {w} {h + 90}" width="{w}" height="{h + 90}" role="img">',
             f'<text x="{pad}" y="14" class="ct">seconds per query, by component (every cost a query paid)</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 170}" y2="{h - pad}" class="ax"/>',
             f'<text x="{pad - 4}" y="{py(top) + 4:.1f}" text-anchor="end" class="tk">{top:.3g}</text>',
             f'<text x="{pad - 4}" y="{py(0) + 4:.1f}" text-anchor="end" class="tk">0</text>']
    for i, ((task, method), comps) in enumerate(bars.items()):
        x = pad + gap + i * (bw + gap)
        y = 0.0
        for j, comp in enumerate(LATENCY_COMPONENTS):
            v = comps.get(comp, 0.0)
            if v <= 0:
                continue
            parts.append(f'<rect x="{x}" y="{py(y + v):.1f}" width="{bw}" height="{py(y) - py(y + v):.1f}" '
                         f'fill="{PALETTE[j % len(PALETTE)]}" class="bar"><title>{esc(task)}, '
                         f'{esc(method_label(method))}: {comp} {v:.3g} s (total {sum(comps.values()):.3g} s)</title>'
                         f'</rect>')
            y += v
        label = f"{task} · {method_label(method)}"
        parts.append(f'<text transform="translate({x + bw / 2},{h - pad + 8}) rotate(60)" class="tk">{esc(label)}'
                     f'</text>')
    for j, comp in enumerate(LATENCY_COMPONENTS):
        parts.append(f'<rect x="{w - 160}" y="{30 + 16 * j}" width="10" height="10" '
                     f'fill="{PALETTE[j % len(PALETTE)]}"/><text x="{w - 145}" y="{39 + 16 * j}" class="tk">{comp}</text>')
    parts.append("</svg>")
    return f'<figure class="chart" id="chart-latency">{"".join(parts)}</figure>'


# ---- the page ---------------------------------------------------------------------------------------------------------

def footer_html(provenance: Mapping | None) -> str:
    """The provenance footer: the Report key, the keys of the artifacts it read, the profile and the date."""
    p = dict(provenance or {})
    rows = []
    for k in ("report key", "profile", "date"):
        if p.get(k):
            rows.append(f"<div><b>{esc(k)}</b>: <code>{esc(p[k])}</code></div>")
    inputs = p.get("inputs") or {}
    if inputs:
        items = "".join(f"<li><code>{esc(v)}</code> {esc(k)}</li>" for k, v in sorted(inputs.items()))
        rows.append(f"<details><summary>{len(inputs)} input artifacts</summary><ul>{items}</ul></details>")
    return "".join(rows)


def page(title: str, tables_html: str, data: dict, provenance: Mapping | None = None) -> str:
    """The self-contained page: the template with its title, tables, data blob and footer."""
    t = TEMPLATE.read_text(encoding="utf-8")
    # one pass over the slots: text put into one slot is never searched for another
    slots = {"TITLE": esc(title), "TABLES": tables_html, "DATA": safe_json(data), "FOOTER": footer_html(provenance)}
    return re.sub(r"<!--@(TITLE|TABLES|DATA|FOOTER)@-->", lambda m: slots[m.group(1)], t)


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename (a reader never sees half a page)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- the data blob ----------------------------------------------------------------------------------------------------

class Blob:
    """Collects the data blob: tasks and their examples, runs, outputs and the passages they copied from."""

    def __init__(self):
        self.tasks: dict[str, list] = {}
        self.runs: list[dict] = []
        self.outputs: list[list] = []
        self.passages: dict[str, list] = {}
        self.metric_names: list[str] = []

    def add_example(self, task: str, example_id: int, prompt: str, reference: str = "", topic: str = "") -> None:
        self.tasks.setdefault(task, []).append([int(example_id), prompt, reference, topic])

    def add_run(self, task: str, method: str, label: str, variant: str = "main") -> int:
        self.runs.append({"task": task, "method": method, "label": label, "variant": variant})
        return len(self.runs) - 1

    def add_output(self, run: int, example_id: int, text: str, char_ends: Sequence[int], source_doc_ids, source_positions,
                   metrics: Mapping[str, float | None], off_topic: Iterable[int] = (),
                   retrieved: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
        """One method's output on one example; returns its copied runs."""
        ends = list(char_ends) if char_ends is not None else []
        runs = copied_runs(source_doc_ids or [], source_positions or []) if len(ends) else []
        for name in metrics:
            if name not in self.metric_names:
                self.metric_names.append(name)
        self.outputs.append([run, int(example_id), highlight_html(text, ends, runs, off_topic), dict(metrics),
                             None if retrieved is None else [int(d) for d in retrieved]])
        return runs

    def add_passage(self, doc_id: int, entry: list) -> None:
        self.passages[str(int(doc_id))] = entry

    def to_dict(self, title: str) -> dict:
        order = [m for m, _ in METRIC_LABELS if m in self.metric_names]
        order += [m for m in self.metric_names if m not in order]
        labels = dict(METRIC_LABELS)
        for o in self.outputs:
            o[3] = [_round(o[3].get(m)) for m in order]
        return {"title": title, "tasks": [{"name": t, "examples": ex} for t, ex in self.tasks.items()],
                "runs": self.runs, "metrics": [[m, labels.get(m, f"{m[2:]} s" if m.startswith("s_") else m)] for m in order],
                "outputs": self.outputs, "passages": self.passages}


def _round(v):
    v = _num(v)
    return None if v is None else round(v, 3)


def timing_metrics(timings: Mapping[str, float] | str | None) -> dict[str, float]:
    """Seconds by component of one output (the non-zero ones), named ``s_<component>``."""
    t = json.loads(timings) if isinstance(timings, str) else dict(timings or {})
    return {f"s_{c}": float(t[c]) for c in LATENCY_COMPONENTS if float(t.get(c) or 0.0) > 0}


def example_prompt(ex: Mapping) -> str:
    """What the LM was asked: the question (QA, bio) or the text it continues (completion)."""
    return str(ex.get("question") or ex.get("prefix") or ex.get("query") or "")


def example_reference(ex: Mapping) -> str:
    refs = ex.get("references")
    refs = [str(r) for r in (refs if refs is not None else [])]
    # answer aliases on one line; long references (a continuation, a person's passages) as paragraphs
    return " | ".join(refs) if refs and max(map(len, refs)) < 80 else "\n\n".join(refs)


def example_topic(ex: Mapping) -> str:
    meta = ex.get("meta") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    return str(meta.get("title") or meta.get("entity") or "")


def write(out_dir: Path, *, markdown: str, cells: list[dict], title: str, runs: Mapping[str, Path],
          generations: Mapping[str, Path], examples: Mapping[str, Path], passages: Path, tokens: Path, lm: Path,
          provenance: Mapping | None = None, method_label=lambda m: m) -> dict:
    """``report.html`` in ``out_dir``: the tables of ``markdown`` (the rendered report.md) with inline charts from
    ``cells``, and the example browser over every run. ``runs``: ``{"task/method/variant": Score folder}``;
    ``generations``: the Generate folder of each run (same names); ``examples``: ``{task: LoadTask folder}``;
    ``passages``/``tokens``/``lm``: ConvertCorpus, PreTokenize and PrepareLM (titles, token ids, tokenizer) of the
    copied passages. Returns the file's size and counts."""
    import pyarrow.parquet as pq

    blob = Blob()
    for task, folder in examples.items():
        for ex in pq.read_table(Path(folder) / "examples.parquet").to_pylist():
            blob.add_example(task, ex["example_id"], example_prompt(ex), example_reference(ex), example_topic(ex))
    copied: set[int] = set()
    for name, gen_dir in generations.items():
        task, method, variant = name.rstrip("+").split("/", 2)
        score_dir = Path(runs[name]) if name in runs else None
        metrics: dict[int, dict] = {}
        off: dict[int, set[int]] = {}
        if score_dir is not None and (score_dir / "scores.parquet").exists():
            t = pq.read_table(score_dir / "scores.parquet", columns=["example_id", "metric", "value"])
            for e, m, v in zip(*(t.column(c).to_pylist() for c in ("example_id", "metric", "value"))):
                metrics.setdefault(int(e), {})[m] = v
        if score_dir is not None and (score_dir / "copied_sources.parquet").exists():
            for r in pq.read_table(score_dir / "copied_sources.parquet").to_pylist():
                if not r["on_topic"]:
                    off.setdefault(int(r["example_id"]), set()).add(int(r["doc_id"]))
        run = blob.add_run(task, method, method_label(method), variant)
        for g in pq.read_table(Path(gen_dir) / "generations.parquet").to_pylist():
            eid = int(g["example_id"])
            shown = {k: v for k, v in metrics.get(eid, {}).items() if k in dict(METRIC_LABELS)}
            shown.update(timing_metrics(g.get("timings")))
            runs_ = blob.add_output(run, eid, g["text"], g.get("token_char_ends"), g["source_doc_ids"],
                                    g["source_positions"], shown, off.get(eid, ()))
            copied.update(d for _, _, d, _ in runs_)
    if copied:
        ids = sorted(copied)
        tokenizer = load_tokenizer(lm)
        titles = PassageReader(passages).get(ids, ("doc_id", "title"))
        for d, toks, row in zip(ids, TokenLookup(tokens).get(ids), titles):
            blob.add_passage(d, passage_entry(tokenizer, toks, row.get("title") or ""))
    figures = {"gamma_sweep": gamma_chart(cells), "latency": latency_chart(cells, method_label)}
    body = markdown_html(markdown, figures)
    text = page(title, body, blob.to_dict(title), provenance)
    path = write_page(Path(out_dir) / "report.html", text)
    return {"html_bytes": path.stat().st_size, "html_outputs": len(blob.outputs), "html_passages": len(blob.passages)}


def demo_page(path: Path, answers: Sequence[tuple[str, object, Sequence]], tokenizer, method: str, label: str,
              provenance: Mapping | None = None) -> Path:
    """The viewer for ``nest generate --html FILE``: one example per prompt, the output with its copied spans, and the
    retrieved passages listed (the ones copied from marked). ``answers``: ``(prompt, Generation, passages)``."""

    blob = Blob()
    run = blob.add_run("generate", method, label)
    for i, (prompt, gen, passages) in enumerate(answers):
        blob.add_example("generate", i, prompt)
        ids = list(gen.token_ids)
        docs = [-1 if s is None else int(s[0]) for s in gen.sources]
        pos = [-1 if s is None else int(s[1]) for s in gen.sources]
        n = len(ids)
        copied = sum(d >= 0 for d in docs)
        metrics = {"attribution_ratio": 100.0 * copied / n if n else None, "num_tokens": n,
                   "wall_s": gen.timings.get("total"), **timing_metrics(gen.timings)}
        blob.add_output(run, i, gen.text, token_char_ends(tokenizer, ids), docs, pos, metrics,
                        retrieved=[p.doc_id for p in passages])
        for p in passages:
            if str(int(p.doc_id)) not in blob.passages:
                blob.add_passage(p.doc_id, passage_entry(tokenizer, p.token_ids, p.title))
    prov = {"date": _dt.date.today().isoformat(), **dict(provenance or {})}
    return write_page(Path(path), page("nest generate", "", blob.to_dict("nest generate"), prov))
