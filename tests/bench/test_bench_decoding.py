"""The decoding benchmark: pooled ratios with paired bootstrap intervals, medians beside them, targets judged on the
numbers, the key store's per-query share, the held-out bio draw, and the quiet-machine check (bench/quiet.py) with the
runner's refusal (bench/run.py)."""

import json
import sys
import types

import pyarrow as pa
import pytest

from bench import quiet
from bench import run as bench_run

from bench import bench_decoding as bd


def _rec(tokens, seconds, rouge=0.5, counters=None, timings=None, sources=None):
    return {"tokens": tokens, "seconds": seconds, "rouge1": rouge, "counters": counters or {},
            "timings": timings or {}, "sources": sources}


def test_pooled_ratio_median_and_components():
    base = bd.summarise([_rec(10, 1.0), _rec(10, 1.0), _rec(10, 1.0)])
    # one slow example: the pooled ratio falls, the median ratio does not
    nest = bd.summarise([_rec(10, 0.5, counters={"key_cache_hits": 0, "key_cache_misses": 4, "knn_searches": 3},
                              timings={"lm_forward": 0.2, "token_search": 0.01, "passage_encoding": 0.2}),
                         _rec(10, 0.5, counters={"key_cache_hits": 4, "key_cache_misses": 0},
                              timings={"lm_forward": 0.2, "token_search": 0.01}),
                         _rec(10, 5.0, counters={"key_cache_hits": 2, "key_cache_misses": 2},
                              timings={"lm_forward": 0.2, "token_search": 0.01})])
    pooled, median = bd.ratio(nest, base)
    assert pooled == round((30 / 6.0) / (30 / 3.0), 3) and median == 2.0
    assert nest["key_hit_rate"] == 0.5
    assert nest["knn_over_lm"] == 0.05
    comp = nest["components_s_per_query"]
    assert abs(sum(comp.values()) - nest["s_per_query"]) < 1e-3 and comp["passage_encoding"] == round(0.2 / 3, 4)


HL_EQ, HL_NAT, BIO96 = "bio (held out)@256 equal work (min 256)", "bio (held out)@256 natural stops", "bio (held out)@96"


def _result(store_speed, otf_speed, long_speed, note=None):
    base = bd.summarise([_rec(10, 1.0, rouge=0.3)])
    table = {"base": base, "pld10": bd.summarise([_rec(10, 0.5)]), "pld20": bd.summarise([_rec(10, 0.4)]),
             "nest": bd.summarise([_rec(10, 10 / otf_speed, rouge=0.3)])}
    if store_speed:
        table["nest_store"] = bd.summarise([_rec(10, 10 / store_speed, rouge=0.35)], share_s=0.25)
    long = {"base": base, "nest": bd.summarise([_rec(10, 10 / long_speed)])}
    settings = {"completion_excluded@96": dict(table), BIO96: dict(table), HL_EQ: dict(long), HL_NAT: dict(long)}
    for t in settings.values():
        bd.add_intervals(t)
    info = {s["name"]: {k: s.get(k) for k in ("task", "max_new", "min_new", "headline", "label")}
            for s in bd.settings(96, 256)}
    ks = {"note": note} if note else {"build_s": 1.0, "queries": 4, "share_s": 0.25, "scope": "retrieved"}
    return {"settings": settings, "setting_info": info, "key_store": {"bio": ks, "completion_excluded": ks}}


def test_settings_name_what_each_figure_is():
    names = {s["name"]: s for s in bd.settings(96, 256)}
    assert set(names) == {HL_EQ, HL_NAT, BIO96, "completion_excluded@96", "completion@96 (upper bound)"}
    assert names[HL_EQ]["min_new"] == names[HL_EQ]["max_new"] == 256 and names[HL_NAT]["min_new"] == 0
    assert names[HL_EQ]["task"] == "bio" and names[HL_EQ]["headline"] == "equal"
    assert "UPPER BOUND" in names["completion@96 (upper bound)"]["label"]
    assert all(s["label"] for s in names.values())
    quick = bd.settings(16, 32, quick=True)  # the quick corpus has no people: headline on completion_excluded
    assert all(s["task"] != "bio" for s in quick) and any(s.get("headline") for s in quick)


def test_targets_pass_and_fail_from_the_numbers():
    t = {x["figure"]: x for x in bd.check_targets(_result(40.0, 9.0, 20.0), 96, 256)}
    store = t[f"NEST + key store ÷ base, pooled tok/s, {BIO96}, quality ≥ base"]
    assert store["measured"] == 4.0 and store["pass"] is True
    # the build share: 10 tokens in 0.25 + 0.25 s = 20 tok/s, 2× base
    assert "earlier stage" in store["note"] and "counted: 2.0×" in store["note"]
    vs_pld = t[f"NEST + key store ÷ best HF prompt lookup (10/20), {BIO96}"]
    assert vs_pld["measured"] == 1.6 and vs_pld["pass"] is True  # best prompt lookup: 25 tok/s
    assert t[f"NEST end to end on the fly ÷ base, every cost counted, {BIO96}"]["pass"] is False  # 0.9×
    assert t[f"NEST end to end on the fly ÷ base, every cost counted, {HL_EQ}"]["pass"] is True  # 2.0×
    assert t[f"NEST end to end on the fly ÷ base, every cost counted, {HL_NAT}"]["pass"] is True
    # without a key store the rows say so instead of passing or failing
    res = _result(None, 12.0, 20.0, note="absent")
    t = {x["figure"]: x for x in bd.check_targets(res, 96, 256)}
    row = t[f"NEST + key store ÷ base, pooled tok/s, {BIO96}, quality ≥ base"]
    assert row["pass"] is None and row["note"] == "absent"
    assert t[f"NEST end to end on the fly ÷ base, every cost counted, {BIO96}"]["pass"] is True
    verdict = quiet.judge(_load(0.1), _load(0.2), cpus=2, allowed=False)
    text = bd.markdown({**res, "quick": True, "n_examples": 1, "threads": 2, "threads_info": {"cpus": 2},
                        "quiet": {**verdict, "line": quiet.describe(verdict, _load(0.1), _load(0.2))},
                        "nest_config": {}, "targets": bd.check_targets(res, 96, 256)})
    assert "| not measured | absent |" in text and f"## {HL_EQ}" in text and "## Headline" in text
    assert "What it is: UPPER BOUND" not in text  # no upper-bound table in this result
    assert "torch threads 2 of 2 CPUs" in text and "Quiet: the figures are headline figures" in text


def test_pooled_ratio_interval():
    # every example 2× faster: the interval is [2, 2]
    ci = bd.pooled_ratio_ci([10, 20, 30], [0.5, 1.0, 1.5], [10, 20, 30], [1.0, 2.0, 3.0])
    assert ci == {"ratio": 2.0, "low": 2.0, "high": 2.0, "n": 3}
    # spread examples: the pooled ratio lies inside its interval, which is wider than a point
    ci = bd.pooled_ratio_ci([10, 10, 10, 10], [0.5, 1.0, 2.0, 0.25], [10] * 4, [1.0] * 4)
    assert ci["low"] < ci["ratio"] < ci["high"] and ci["ratio"] == round((40 / 3.75) / (40 / 4.0), 3)
    # deterministic (seed 0), paired: the same resample for the method and the base
    assert ci == bd.pooled_ratio_ci([10, 10, 10, 10], [0.5, 1.0, 2.0, 0.25], [10] * 4, [1.0] * 4)
    with pytest.raises(ValueError):
        bd.pooled_ratio_ci([1], [1], [1, 2], [1, 2])


def test_key_store_row_with_and_without_its_share():
    base = bd.summarise([_rec(10, 1.0), _rec(10, 1.0)])
    store = bd.summarise([_rec(10, 0.25), _rec(10, 0.25)], share_s=0.25)
    table = {"base": base, "nest_store": store}
    bd.add_intervals(table)
    assert store["tok_per_s"] == 40.0 and store["tok_per_s_with_share"] == 20.0
    assert store["s_per_query_with_share"] == 0.5
    assert store["ci_over_base"]["ratio"] == 4.0 and store["ci_over_base_with_share"]["ratio"] == 2.0
    line = bd.key_store_line("bio", {"scope": "retrieved", "build_s": 2.0, "queries": 8, "share_s": 0.25}, store, base)
    assert "encoded by an earlier stage (EncodePassageKeys) for these very queries" in line
    assert "build 2.0 s, 0.25 s per query" in line and "20.0 tok/s with that share counted, 40.0 without" in line
    assert bd.key_store_line("bio", {"note": "absent"}) == "- bio (held out): absent"


# --- the held-out bio draw ------------------------------------------------------------------------------------------

class _Corpus:
    """A corpus of ``n`` people (one passage each) and a band, as tasks.bio.draw_bios reads it."""

    def __init__(self, n):
        self.rows = [{"doc_id": i, "source_id": f"s{i}", "title": f"P{i}", "text": f"text {i}",
                      "meta": json.dumps({"topic": "People", "description": "a person"})} for i in range(n)]
        self.rows.append({"doc_id": n, "source_id": "band", "title": "Band", "text": "x",
                          "meta": json.dumps({"topic": "People", "description": "a rock band"})})

    def iter_batches(self, columns=None, batch_size=10_000):
        cols = columns or list(self.rows[0])
        yield pa.RecordBatch.from_pydict({c: [r[c] for r in self.rows] for c in cols})

    def get(self, doc_ids, columns=None):
        return [{c: self.rows[d][c] for c in (columns or self.rows[d])} for d in doc_ids]


def test_heldout_draw_has_no_eval_or_dev_person():
    corpus = _Corpus(200)
    people = bd.bio_people(corpus)
    assert len(people) == 200 and "band" not in people
    ex = bd.excluded_people(corpus, people, profile_n=8)  # checks draw_indices against tasks.bio.draw_bios
    assert ex["eval"] <= ex["excluded"] and ex["dev"] <= ex["excluded"] and len(ex["eval"]) == 8
    m = bd.heldout_size(people, ex["excluded"], 5)
    drawn = [people[i] for i in bd.draw_indices(len(people), m, bd.HELDOUT_SEED)]
    examples = [{"meta": json.dumps({"source_id": s})} for s in drawn]
    plan = {"people": len(people), "excluded": ex["excluded"], "eval": ex["eval"], "dev": ex["dev"],
            "sizes": ex["sizes"], "drawn": m, "needed": 5}
    kept, info = bd.heldout_rows(examples, plan)
    assert len(kept) == 5 and info["overlap"] == 0 and info["overlap_with_eval_draw"] == 0
    assert info["overlap_with_dev_draw"] == 0 and info["excluded_people"] == len(ex["excluded"])
    with pytest.raises(RuntimeError):  # a draw that cannot hold enough held-out people is refused, not used
        bd.heldout_rows(examples, {**plan, "needed": m + 1})


# --- quiet machine or no headline ------------------------------------------------------------------------------------

def _load(others, own=0.0, when="before the timed part"):
    return {"when": when, "loadavg": [others + own, 0.0, 0.0], "own_1min": own, "others_1min": others}


def test_load_check_refuses_a_busy_machine(monkeypatch):
    monkeypatch.delenv(quiet.ALLOW_ENV, raising=False)
    assert quiet.judge(_load(0.5), _load(0.6, when="after the timed part"), cpus=2)["quiet"] is True  # limit 0.3 × 2 = 0.6
    v = quiet.judge(_load(0.7), _load(0.1, when="after the timed part"), cpus=2)
    assert v["refused"] and "before the timed part 0.7" in v["refused"] and "0.6" in v["refused"]
    v = quiet.judge(_load(0.1), _load(2.5, when="after the timed part"), cpus=4)
    assert v["refused"] and "after the timed part 2.5" in v["refused"]
    monkeypatch.setenv(quiet.ALLOW_ENV, "1")  # the escape hatch: not refused, labelled
    v = quiet.judge(_load(0.7), cpus=2)
    assert v["refused"] is None and v["busy"] and v["allow_busy"] is True
    assert "measured under load" in quiet.describe(v, _load(0.7), None).lower()


def test_monitor_subtracts_the_process_own_load(monkeypatch):
    clock = {"t": 1000.0, "cpu": 0.0}
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (2.3, 1.5, 0.8))
    mon = quiet.LoadMonitor(clock=lambda: clock["t"], cpu=lambda: clock["cpu"], age_s=0)
    for _ in range(60):  # ten minutes of this process on 2 cores
        clock["t"] += 10
        clock["cpu"] += 20
        mon.mark()
    s = mon.sample("after the timed part")
    assert s["loadavg"] == [2.3, 1.5, 0.8] and abs(s["own_1min"] - 2.0) < 0.01 and s["others_1min"] == 0.3
    assert quiet.judge(_load(0.0), s, cpus=2, allowed=False)["quiet"] is True  # 0.3 ≤ 0.6: our own load is not
    monkeypatch.setattr(quiet.os, "getloadavg", lambda: (3.0, 1.5, 0.8))         # another job's
    s = mon.sample("after the timed part")
    assert s["others_1min"] == 1.0 and quiet.judge(_load(0.0), s, cpus=2, allowed=False)["refused"]
    # an idle minute later most of our own share has decayed
    clock["t"] += 60
    assert mon.sample("after the timed part")["own_1min"] < 0.8


def test_runner_keeps_the_headline_files_when_refused(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("bench.bench_fake")
    fake.main = lambda argv: {"refused": "machine busy: 1-minute load 3.0 > 0.6", "markdown": "# busy"}
    monkeypatch.setitem(sys.modules, "bench.bench_fake", fake)
    monkeypatch.setattr(bench_run, "available", lambda: ["fake"])
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path)
    (tmp_path / "fake.md").write_text("headline\n")
    assert bench_run.main(["fake"]) == 1
    assert (tmp_path / "fake.md").read_text() == "headline\n"  # untouched
    assert (tmp_path / "fake-busy.md").read_text() == "# busy\n"
    assert json.loads((tmp_path / "fake-busy.json").read_text())["refused"].startswith("machine busy")
    assert "no headline figures (machine busy: 1-minute load 3.0 > 0.6)" in capsys.readouterr().err
    fake.main = lambda argv: {"markdown": "# fine"}
    assert bench_run.main(["fake"]) == 0 and (tmp_path / "fake.md").read_text() == "# fine\n"
