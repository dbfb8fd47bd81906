"""The HTML report's builder (stages/evaluation/html_report.py): untrusted text is escaped, one highlighted element per
copied run carries its source's doc_id, and, in headless Chromium when it is installed, a span opens its source passage
with the same tokens highlighted. Beside it, the report's smaller fixes: "–" for methods that cannot copy, each task's
length and stop rule in the header, Generate's progress lines in a log, and `nest query` naming the columns."""

from __future__ import annotations

import io
import json
import re

import pytest

from stages.evaluation import html_report as hr

EVIL = "</script><script>window.pwned = 1</script></textarea><img src=x onerror=\"window.pwned = 2\">&amp;"


def _blob_from(path_text: str) -> dict:
    m = re.search(r'<script type="application/json" id="nest-data">(.*?)</script>', path_text, re.S)
    assert m, "the data blob is missing"
    return json.loads(m.group(1))


def _ends(tokens):
    out, n = [], 0
    for t in tokens:
        n += len(t)
        out.append(n)
    return out


def _evil_page(tmp_path):
    """A page whose passage, prompt, output and table hold markup; output 0 copies tokens 1-2 of passage 7 from its
    positions 3-4, then token 4 of passage 9 (off-topic) from its position 0."""
    out_tokens = [" Ada", " </script>", "<b>", " x", " </textarea>"]
    blob = hr.Blob()
    blob.add_example("bio", 0, "Tell me a bio of <script>alert(1)</script>.", "ref </textarea>", "Ada")
    run = blob.add_run("bio", "nest", "+NEST")
    blob.add_output(run, 0, "".join(out_tokens), _ends(out_tokens), [-1, 7, 7, -1, 9], [-1, 3, 4, -1, 0],
                    {"attribution_ratio": 60.0, "num_tokens": 5}, off_topic=[9])
    p_tokens = ["Ada", " Lovelace", " wrote", " </script>", "<b>", " " + EVIL]
    blob.add_passage(7, ["<i>Ada</i> Lovelace", "".join(p_tokens), _ends(p_tokens)])
    blob.add_passage(9, ["Other", " </textarea> more", _ends([" </textarea>", " more"])])
    tables = hr.markdown_html("## Table <1>\n\n| method | RG-1 |\n|---|---|\n| <script>x</script> | 2.0 |\n"
                              "| +NEST | 10.0 |\n| Base LM | – |\n")
    text = hr.page("report <title>", tables, blob.to_dict("t"), {"report key": "k" * 64, "date": "2026-12-02",
                                                                 "inputs": {"x</li>": "y"}})
    path = tmp_path / "report.html"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_untrusted_text_cannot_close_the_data_blob_or_open_a_tag(tmp_path):
    path, text = _evil_page(tmp_path)
    # the page's own two scripts and nothing else: every "<" of the data is \u003c, every "<" of a table escaped
    assert text.count("<script") == 2 and text.count("</script>") == 2
    assert "</textarea>" not in text and "<img" not in text and "<b>" not in text.split("<style>")[0]
    assert "&lt;script&gt;x&lt;/script&gt;" in text and "report &lt;title&gt;" in text and "x&lt;/li&gt;" in text
    data = _blob_from(text)
    assert data["passages"]["7"][1].endswith(EVIL)  # the text itself comes back intact
    assert data["tasks"][0]["examples"][0][1] == "Tell me a bio of <script>alert(1)</script>."


def test_one_mark_per_copied_run_with_its_source_doc_id_and_position():
    tokens = [" The", " Eiffel", " Tower", " is", " <tall>", " and", " old"]
    runs = hr.copied_runs([-1, 5, 5, 5, -1, 8, 5], [-1, 10, 11, 12, -1, 2, 40])
    assert runs == [(1, 3, 5, 10), (5, 1, 8, 2), (6, 1, 5, 40)]  # a jump in position starts a new run
    html = hr.highlight_html("".join(tokens), _ends(tokens), runs, off_topic=[8])
    marks = re.findall(r'<mark class="([^"]+)" data-doc-id="(\d+)" data-pos="(\d+)" data-len="(\d+)"[^>]*>(.*?)</mark>',
                       html)
    assert [(c, d, p, n) for c, d, p, n, _ in marks] == [("cp", "5", "10", "3"), ("cp off", "8", "2", "1"),
                                                         ("cp", "5", "40", "1")]
    assert [t for *_, t in marks] == [" Eiffel Tower is", " and", " old"]
    assert " &lt;tall&gt;" in html and "<tall>" not in html


def test_page_has_the_tables_sortable_the_charts_and_the_footer():
    cells = [{"table": "gamma", "task": "bio", "row": g, "column": c, "value": v}
             for g, sp, span in (("0.5", 1.2, 3.0), ("0.005", 2.0, 9.0))
             for c, v in (("speedup", sp), ("mean_accepted_span", span))]
    cells += [{"table": "latency", "task": "bio", "row": "nest", "column": "lm_forward", "value": 1.5},
              {"table": "latency", "task": "bio", "row": "nest", "column": "other", "value": 0.5}]
    md = "# t\n\n## Leniency sweep (γ)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![gamma sweep](gamma_sweep.png)\n"
    body = hr.markdown_html(md, {"gamma_sweep": hr.gamma_chart(cells), "latency": hr.latency_chart(cells)})
    assert '<table class="sortable">' in body and "gamma_sweep.png" not in body
    assert "<title>bio, γ = 0.005: 9</title>" in body  # a point's value on hover
    assert "lm_forward 1.5 s (total 2 s)" in hr.latency_chart(cells)
    text = hr.page("t", body, hr.Blob().to_dict("t"), {"report key": "abc", "profile": "embedded", "date": "d",
                                                       "inputs": {"bio/nest/main": "123"}})
    assert "<code>abc</code>" in text and "<code>123</code> bio/nest/main" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched


# ---- in a real browser -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    from bench.browser import browser, unavailable

    why = unavailable()
    if why:
        pytest.skip(f"no headless browser: {why}")
    with browser() as b:
        yield b


def test_browser_renders_hostile_text_as_text_and_a_span_opens_its_source(tmp_path, chromium):
    from bench.browser import open_report

    path, _ = _evil_page(tmp_path)
    page, _ms = open_report(chromium, path)
    assert page.nest_errors == [] and page.evaluate("window.pwned") is None
    marks = page.locator("mark.cp")
    assert marks.count() == 2 and marks.nth(0).get_attribute("data-doc-id") == "7"
    assert "</script><b>" in marks.nth(0).inner_text()
    assert marks.nth(1).get_attribute("class") == "cp off"
    marks.nth(0).click()
    assert page.locator("#source").is_visible()
    assert page.locator("#source-title").inner_text() == "<i>Ada</i> Lovelace"  # a title is text, too
    assert page.locator("#source-text mark.src").inner_text().strip() == marks.nth(0).inner_text().strip()
    assert EVIL in page.locator("#source-text").inner_text()  # the passage's markup shows as text
    assert page.locator("#source-text img").count() == 0 and page.evaluate("window.pwned") is None
    # sorting: RG-1 ascending puts 2.0 first, "–" last; again: descending
    th = page.locator("table.sortable th", has_text="RG-1")
    th.click()
    col = page.locator("table.sortable tbody tr td:nth-child(2)")
    assert col.all_inner_texts() == ["2.0", "10.0", "–"]
    th.click()
    assert col.all_inner_texts() == ["10.0", "2.0", "–"]
    page.close()


def test_browser_filters_by_method_and_searches_prompts(tmp_path, chromium):
    from bench.bench_html import synthetic_page
    from bench.browser import open_report

    path = tmp_path / "syn.html"
    synthetic_page(path, 60, tasks=2)
    page, ms = open_report(chromium, path)
    assert page.nest_errors == [] and ms > 0
    assert page.locator(".ex").count() == 20 and page.locator("#more").is_visible()  # lazily, a page at a time
    assert page.locator(".ex").first.locator(".out").count() == 5
    page.locator("input.f-method[value=base]").uncheck()
    assert page.locator(".ex").first.locator(".out").count() == 4
    first_word = page.locator(".ex .prompt").first.inner_text().split()[2]
    page.fill("#search", first_word)
    page.wait_for_function(f"document.querySelectorAll('.ex').length > 0 && [...document.querySelectorAll('.ex "
                           f".prompt')].every(p => p.textContent.toLowerCase().includes({json.dumps(first_word)}))")
    page.close()


# ---- the smaller things -----------------------------------------------------------------------------------------------

def test_table1_prints_a_dash_for_a_method_that_cannot_copy(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.evaluation import report

    rows = [{"task": "nq", "method": m, "variant": "main", "metric": k, "value": v, "n": 4}
            for m in ("base", "nest") for k, v in (("alr", 30.0), ("num_tokens", 12.0), ("answer_in_copied_span", 0.0))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "summary.parquet")
    text, cells = report.render(report.Summary.from_files([tmp_path / "summary.parquet"]))
    base = next(line for line in text.splitlines() if line.startswith("| Base LM |"))
    nest = next(line for line in text.splitlines() if line.startswith("| +NEST |"))
    assert base.endswith("| – | not computed |") and nest.endswith("| 0.0 | not computed |")


def test_report_header_states_each_tasks_length_and_stop_rule():
    from pipeline import dag

    line = dag.Report().stage_params()["context"]["length and stop rule per task (as Generate applied them)"]
    for task in dag.configured_tasks():
        rule = dag.stop_rule(task)
        assert f"{task}: " in line and f"stop {rule['stop']}" in line


def test_progress_is_a_line_every_few_seconds_when_stderr_is_a_log():
    from stages.progress import LogProgress, progress, progress_line

    assert progress_line("Generate nest", 12, 40, 34.3, "examples") == "[Generate nest] 12/40 examples, 0.35/s, ETA 1m20s"
    now = [0.0]
    log = io.StringIO()
    bar = LogProgress("Generate ra_nest", 10, "examples", every=5.0, stream=log, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 2.0
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "[Generate ra_nest] 3/10 examples, 0.50/s, ETA 14s"  # first line after 6 s (> 5 s)
    assert len(lines) == 4 and lines[-1].endswith("10/10 examples, 0.50/s, done in 20s")
    assert isinstance(progress("x", 3, stream=io.StringIO()), LogProgress)  # not a terminal: log lines, no bar


def test_query_naming_a_missing_or_reserved_column_lists_the_columns(tmp_path, monkeypatch, capsys):
    from pipeline import cli
    from tests.pipeline.test_cli import _fake_retrieval_store

    _fake_retrieval_store(tmp_path / "store")
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    for sql in ("SELECT references FROM examples", "SELECT reference FROM examples"):
        assert cli.main(["query", sql]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith("nest: query: ") and "columns of examples: example_id, task, query" in err, err


def test_generate_html_lists_the_retrieved_passages_and_marks_the_copied_ones(tmp_path):
    from stages.decoding.types import Generation, Passage
    from decoding_tiny import TinyTokenizer

    tok = TinyTokenizer()
    passages = [Passage(4, [10, 11, 12, 13, 14], "Ada <Lovelace>"), Passage(8, [20, 21, 22], "Other")]
    gen = Generation(example_id=0, text=tok.decode([30, 12, 13, 14, 31]), token_ids=[30, 12, 13, 14, 31],
                     sources=[None, (4, 2), (4, 3), (4, 4), None], spans=[(1, 3, 4)], counters={},
                     timings={"total": 1.5, "lm_forward": 1.0})
    path = hr.demo_page(tmp_path / "demo.html", [("Tell me a bio of <Ada>.", gen, passages)], tok, "nest", "+NEST",
                        {"inputs": {"lm": "abc"}})
    data = _blob_from(path.read_text(encoding="utf-8"))
    out = data["outputs"][0]
    assert out[4] == [4, 8]  # the retrieved passages, ranked
    assert re.findall(r'data-doc-id="(\d+)" data-pos="(\d+)" data-len="(\d+)"', out[2]) == [("4", "2", "3")]
    title, text, ends = data["passages"]["4"]
    assert title == "Ada <Lovelace>" and text[ends[1]:ends[4]] == tok.decode([12, 13, 14])  # positions 2-4
    assert data["tasks"][0]["examples"][0][1] == "Tell me a bio of <Ada>."
