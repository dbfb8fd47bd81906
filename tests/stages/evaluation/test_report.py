"""Report stage: tables and trend checks from hand-made summary rows."""

import json

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from stages.evaluation import report
from stages.evaluation.experiments import ABLATION_STEPS


def _rows():
    rows = []
    def add(task, method, metric, value, variant="main", config=None):
        rows.append({"task": task, "method": method, "variant": variant, "metric": metric, "value": value, "n": 4,
                     "config": config})
    for m, ppl, r1 in (("base", 9.0, 20.0), ("ra", 5.0, 60.0), ("knnlm", 7.0, 25.0), ("nest", 6.0, 30.0),
                       ("ra_nest", 4.0, 62.0)):
        add("completion", m, "ppl", ppl)
        add("completion", m, "rouge1", r1)
        add("completion", m, "tokens_per_s", 10.0 if m == "base" else 20.0)
        add("completion", m, "seconds_per_query", 3.0)
        for c in report.LATENCY_COMPONENTS:
            add("completion", m, f"time_{c}", {"lm_forward": 1.0, "other": 2.0}.get(c, 0.0))
        add("completion", m, "tokens_per_s_median", 11.0 if m == "base" else 25.0)
    add("completion", "nest", "attribution_ratio", 50.0)
    add("completion", "nest", "attribution_span_length", 7.0)
    add("bio", "nest", "factscore", None)
    add("bio", "nest", "num_tokens", 80.0)
    for g, ratio, span, tps in (("0.5", 20.0, 3.0, 12.0), ("0.0005", 90.0, 20.0, 30.0)):
        config = json.dumps({"gamma": float(g)})  # the run's decoding config: where the report reads γ
        add("completion", "nest", "attribution_ratio", ratio, f"gamma={g}", config)
        add("completion", "nest", "mean_accepted_span", span, f"gamma={g}", config)
        add("completion", "nest", "tokens_per_s", tps, f"gamma={g}", config)
    for step, v in zip(ABLATION_STEPS, (20.0, 25.0, 24.0, 27.0)):
        add("completion", step.method, "rouge1", v, step.variant)
    return rows


def test_report_renders_tables_and_trends(tmp_path):
    pq.write_table(pa.Table.from_pylist(_rows()), tmp_path / "summary.parquet")
    out = tmp_path / "out"
    out.mkdir()
    stats = report.run(out, summaries=[tmp_path])
    text = (out / "report.md").read_text()
    assert "| +NEST | 6.00 | 30.0 |" in text          # PPL and RG-1 ×100
    assert "not computed" in text                       # FactScore without a judge
    assert "holds: completion: PPL base > kNN-LM > NEST > RA-NEST" in text
    assert "holds: completion: attribution ratio falls as γ rises" in text
    assert "| completion | 0.0005 | 30.0 | 3.00 | not computed | 20.0 | 90.0 |" in text   # speedup 30/10
    assert "| + Relative Retrieval Confidence | 25.0 |" in text     # a kNN-LM run with the RRC λ_t
    assert (out / "gamma_sweep.png").stat().st_size > 1000
    assert (out / "latency.png").stat().st_size > 1000
    # latency: every component, the remainder of the total, pooled and median tok/s, the hit rate where there is one
    assert "| s/query | lm_forward | passage_search | passage_encoding | token_index_build |" in text
    assert "| completion | Base LM | 3.00 | 1.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 2.00 | 10.0 | 11.0 | – |" in text
    cells = pq.read_table(out / "tables.parquet").to_pylist()
    assert stats["cells"] == len(cells)
    fs = [c for c in cells if c["column"] == "FS"]
    assert fs and fs[0]["value"] is None


def test_trend_reported_as_failing_when_order_breaks():
    rows = [r for r in _rows() if not (r["metric"] == "ppl" and r["method"] == "nest")]
    rows.append({"task": "completion", "method": "nest", "variant": "main", "metric": "ppl", "value": 99.0, "n": 4})
    checks = dict((n, ok) for n, ok, _ in report.trend_checks(report.Summary(rows)))
    assert checks["completion: PPL base > kNN-LM > NEST > RA-NEST"] is False


# -- paired bootstrap, off-topic copies, answer length beside ALR, empty sections left out ------------
def _score_dir(folder, summary_rows, score_rows, copied_rows=None):
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(summary_rows), folder / "summary.parquet")
    pq.write_table(pa.Table.from_pylist(score_rows), folder / "scores.parquet")
    if copied_rows is not None:
        pq.write_table(pa.Table.from_pylist(copied_rows), folder / "copied_sources.parquet")
    return folder


def test_bootstrap_off_topic_and_no_empty_sections(tmp_path):
    base = [10.0, 20.0, 30.0, 40.0] * 5                       # 20 examples
    per_method = {"base": base,
                  "nest": [v + 5.0 for v in base],              # +5 on every example: interval [5, 5]
                  "knnlm": [v + (1.0 if i % 2 else -1.0) for i, v in enumerate(base)]}  # ±1: mean 0
    dirs = []
    for m, vals in per_method.items():
        summ = [{"task": "completion", "method": m, "variant": "main", "metric": "rouge1",
                 "value": sum(vals) / len(vals), "n": 20}]
        sc = [{"example_id": i, "task": "completion", "method": m, "variant": "main", "metric": "rouge1", "value": v}
              for i, v in enumerate(vals)]
        dirs.append(_score_dir(tmp_path / f"c_{m}", summ, sc))
    # a bio run: one example, NEST copied 2 tokens of the person's passage and 3 of another's
    summ = [{"task": "bio", "method": "nest", "variant": "main", "metric": k, "value": v, "n": 1}
            for k, v in (("rouge1_source", 30.0), ("topical_precision", 40.0), ("attribution_ratio", 50.0),
                         ("supported_ratio", 20.0), ("num_tokens", 10.0))]
    sc = [{"example_id": 0, "task": "bio", "method": "nest", "variant": "main", "metric": "topical_precision",
           "value": 40.0}]
    cp = [{"example_id": 0, "task": "bio", "method": "nest", "variant": "main", "topic": "Ada Lovelace", "doc_id": d,
           "title": t, "tokens": n, "on_topic": on}
          for d, t, n, on in ((4, "Ada Lovelace", 2, True), (9, "Cesare Beccaria", 3, False))]
    dirs.append(_score_dir(tmp_path / "bio_nest", summ, sc, cp))
    # a QA run: answer length beside ALR
    summ = [{"task": "nq", "method": "nest", "variant": "main", "metric": k, "value": v, "n": 3}
            for k, v in (("alr", 66.7), ("num_tokens", 42.0), ("answer_in_copied_span", 50.0))]
    dirs.append(_score_dir(tmp_path / "nq_nest", summ, []))
    out = tmp_path / "out"
    out.mkdir()
    report.run(out, summaries=dirs)
    text = (out / "report.md").read_text()
    assert "| completion | rouge1 | +NEST | 20 | +5.00 | [+5.00, +5.00] | yes |" in text
    knn = next(line for line in text.splitlines() if line.startswith("| completion | rouge1 | +kNN-LM | 20 | +0.00 |"))
    assert knn.endswith("| no |")
    assert "| bio | 0 | Ada Lovelace | +NEST | 40.0 | 5 | Cesare Beccaria (3) |" in text
    assert "Topical precision over all copied tokens: bio +NEST: 40.0%." in text
    assert "| method | ALR | answer length (tokens) | answer in a copied span (% of correct) |" in text
    assert "| +NEST | 66.7 | 42.0 | 50.0 |" in text
    # no γ sweep, no ablation in these runs: those sections are left out, not printed empty
    for absent in ("## Table 3", "## Leniency sweep", "gamma_sweep.png", "## The paper's trends"):
        assert absent not in text
    cells = pq.read_table(out / "tables.parquet").to_pylist()
    boot = {(c["row"], c["column"]): c["value"] for c in cells if c["table"] == "bootstrap"}
    assert boot[("nest", "rouge1 diff")] == 5.0 and boot[("nest", "rouge1 significant")] == 1.0
    assert boot[("knnlm", "rouge1 low")] < 0 < boot[("knnlm", "rouge1 high")]
    assert boot[("knnlm", "rouge1 significant")] == 0.0


def test_gamma_is_read_from_the_run_config_not_the_variant_name(tmp_path):
    """γ is data: the sweep's γ column and its trend check come from each run's config, which the DAG hands
    in beside the summaries; the variant name only groups the sweep."""
    def summary(folder, variant, ratio):
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist([
            {"task": "bio", "method": "nest", "variant": variant, "metric": m, "value": v, "n": 4}
            for m, v in (("attribution_ratio", ratio), ("tokens_per_s", 5.0))]), folder / "summary.parquet")
        return folder

    summaries = {"a": summary(tmp_path / "a", "gamma=first", 80.0), "b": summary(tmp_path / "b", "gamma=second", 10.0)}
    out = tmp_path / "out"
    out.mkdir()
    report.run(out, summaries=summaries, configs={"a": {"gamma": 0.003}, "b": {"gamma": 0.7, "passages": 10}})
    text = (out / "report.md").read_text()
    assert "| bio | 0.003 | 5.0 |" in text and "| bio | 0.7 | 5.0 |" in text
    assert "holds: bio: attribution ratio falls as γ rises (γ=0.003: 80.000, γ=0.7: 10.000)" in text
    # a sweep run without its config: a clear error, never a γ guessed from a name
    out2 = tmp_path / "out2"
    out2.mkdir()
    with pytest.raises(ValueError, match="γ is read from the run's config"):
        report.run(out2, summaries=summaries)


def test_key_store_cost_beside_nest_speed(tmp_path):
    """The key store NEST read was built for these very queries; its build seconds, their per-query share
    and NEST's speed with that share counted stand beside the speed without (read from the store's manifest)."""
    folder = tmp_path / "bio_nest"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"task": "bio", "method": "nest", "variant": "main", "metric": m, "value": v, "n": 8}
        for m, v in (("tokens_per_s", 40.0), ("seconds_per_query", 2.0), ("rouge1", 30.0))]), folder / "summary.parquet")
    store = tmp_path / "EncodePassageKeys" / "k1"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps({"stage": "EncodePassageKeys", "params": {
        "scope": "retrieved", "passages": 10}, "timings": {"build_s": 16.0}}))
    out = tmp_path / "out"
    out.mkdir()
    report.run(out, summaries={"bio/nest/main": folder}, key_stores={"bio": store}, key_store_readers={"bio": 3})
    text = (out / "report.md").read_text()
    assert "## What the key store cost" in text
    assert "The `retrieved` keys of bio were encoded by an earlier stage (EncodePassageKeys) for these very queries" in text
    # 16 s over 8 queries: 2 s each; 80 tokens per query in 2 + 2 s: 20 tok/s with the share, 40 without
    assert "| bio | `retrieved`, b = 10 | 16.0 | 8 | 2.00 | 4.00 | 2.00 | 20.0 | 40.0 | 3 |" in text
    cells = {c["column"]: c["value"] for c in pq.read_table(out / "tables.parquet").to_pylist()
             if c["table"] == "key_store"}
    assert cells["share_s_per_query"] == 2.0 and cells["tokens_per_s_with_share"] == 20.0
    # no key store (key_store = off): no section
    out2 = tmp_path / "out2"
    out2.mkdir()
    report.run(out2, summaries={"bio/nest/main": folder})
    assert "key store cost" not in (out2 / "report.md").read_text()


def test_answers_section_shows_stop_reasons_cap_hits_first_sentence_recall_and_chimeras(tmp_path):
    rows = []
    for m, vals in (("base", dict(alr=40.0, alr_first_sentence=40.0, stopped_by_stop_rule=75.0, stopped_by_eos=25.0,
                                  stopped_by_length=0.0, num_tokens=20.0)),
                    ("nest", dict(alr=50.0, alr_first_sentence=25.0, stopped_by_stop_rule=0.0, stopped_by_eos=25.0,
                                  stopped_by_length=75.0, chimera_rate=12.5, num_tokens=110.0))):
        rows += [{"task": "nq", "method": m, "variant": "main", "metric": k, "value": v, "n": 4, "config": None}
                 for k, v in vals.items()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "summary.parquet")
    out = tmp_path / "out"
    out.mkdir()
    report.run(out, summaries=[tmp_path])
    text = (out / "report.md").read_text()
    assert "## How the answers ended (QA)" in text
    assert ("| method | ALR (%) | ALR, first sentence (%) | ended by its rule (%) | ended by EOS (%) | "
            "hit the length cap (%) | chimera sentences (%) | mean tokens |") in text
    assert "| Base LM | 40.0 | 40.0 | 75.0 | 25.0 | 0.0 | – | 20.0 |" in text
    assert "| +NEST | 50.0 | 25.0 | 0.0 | 25.0 | 75.0 | 12.5 | 110.0 |" in text
    cells = pq.read_table(out / "tables.parquet").to_pylist()
    cap = [c for c in cells if c["table"] == "answers" and c["column"] == "hit the length cap"]
    assert sorted((c["row"], c["value"]) for c in cap) == [("base", 0.0), ("nest", 75.0)]
