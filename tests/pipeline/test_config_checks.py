"""Configuration checked before anything builds, the documented `nest run` forms, and the read-only `nest query`."""

from __future__ import annotations

import pytest

from pipeline import cli
from pipeline.engine import config
from pipeline.engine.params import ConfigError, check_config


@pytest.fixture
def clean_config(tmp_path, monkeypatch):
    """Luigi's configuration restored after the test (``--set`` writes into the process-wide parser)."""
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    cfg = config.config()
    before = {s: dict(cfg.items(s, raw=True)) for s in cfg.sections()}
    yield tmp_path / "store"
    for s in cfg.sections():
        if s not in before:
            cfg.remove_section(s)
            continue
        for option, _ in cfg.items(s, raw=True):
            if option not in before[s]:
                cfg.remove_option(s, option)
            elif cfg.get(s, option, raw=True) != before[s][option]:
                cfg.set(s, option, before[s][option])


@pytest.mark.parametrize("item, words", [
    ("PreRetreive.b=10", "unknown config section [PreRetreive]; did you mean [PreRetrieve]?"),
    ("PreRetrieve.bb=10", "unknown option PreRetrieve.bb; did you mean PreRetrieve.b?"),
    ("PreRetrieve.b=abc", "PreRetrieve.b = 'abc': expected an integer >= 1"),
    ("PreRetrieve.b=0", "PreRetrieve.b = '0': expected an integer >= 1"),
    ("PreRetrieve.b=-1", "PreRetrieve.b = '-1': expected an integer >= 1"),
    ("ConvertCorpus.fmt=bogus", "ConvertCorpus.fmt = 'bogus': expected one of auto, ovos, atlas"),
    ("PreRetrieve.dense_weight=nan", "PreRetrieve.dense_weight = 'nan': expected a number in [0, 1]"),
    ("ConvertCorpus.max_words=0", "ConvertCorpus.max_words = '0': expected an integer >= 1"),
    ("ConvertCorpus.shard_rows=0", "ConvertCorpus.shard_rows = '0': expected an integer >= 1"),
    ('nest.tasks=["completion", "nope"]', "nest.tasks = '[\"completion\", \"nope\"]': expected a list of known tasks"),
    ("encoder.pooling=max", "encoder.pooling = 'max': expected one of cls, mean"),
])
def test_a_bad_config_value_or_name_is_one_line_before_anything_builds(clean_config, capsys, item, words):
    assert cli.main(["status", "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("nest: ") and words in err, err
    assert not clean_config.exists()  # nothing built, not even the store folder


@pytest.mark.parametrize("item, words", [
    ('decoding.config={"gama": 0.5}', "decoding.config: unknown key 'gama'; did you mean 'gamma'?"),
    ('decoding.config={"gamma": -1}', "decoding.config: NestConfig.gamma (γ) must be in (0, 1], got -1"),
    ('decoding.config={"max_new_tokens": 0}', "decoding.config: max_new_tokens = 0: expected an integer >= 1"),
    ('decoding.config={"gamma": "x"}', "decoding.config: "),
    ('decoding.lengths={"longform": -5}',
     "decoding.lengths['longform'] = -5: expected a positive integer, 'reference' or null"),
    ('decoding.lengths={"longfrom": 5}', "decoding.lengths: unknown task family 'longfrom'; did you mean 'longform'?"),
    ('decoding.stops={"qa": "bogus"}', "decoding.stops['qa'] = \"bogus\": expected one of none, paragraph"),
    ('decoding.stops={"qa": "sentense"}', "did you mean 'sentence'?"),
    ('decoding.task_config={"boi": {"gamma": 0.5}}', "decoding.task_config: unknown task 'boi'; did you mean 'bio'?"),
    ('decoding.task_config={"bio": {"document_end": "bogus"}}',
     "decoding.task_config['bio'] (over decoding.config): NestConfig.document_end='bogus'; expected one of"),
    ('decoding.task_config={"bio": {"span_start_pasages": 1}}',
     "decoding.task_config['bio']: unknown key 'span_start_pasages'; did you mean 'span_start_passages'?"),
    ('decoding.method_config={"nosuchmethod": {"gamma": 0.5}}', "decoding.method_config: unknown method 'nosuchmethod'"),
    ('decoding.method_config={"ra_nets": {"gamma": 0.5}}', "did you mean 'ra_nest'?"),
    ('decoding.method_config={"ra_nest": {"gamma": 2}}',
     "decoding.method_config['ra_nest'] (over decoding.config): NestConfig.gamma (γ) must be in (0, 1], got 2"),
    ('stage_resources.needs={"BuildDenseIndex": {"memory_gib": "x"}}',
     "stage_resources.needs['BuildDenseIndex']['memory_gib'] = \"x\": expected an integer >= 0"),
    ('stage_resources.needs={"BuildDenseIdx": {"memory_gib": 4}}',
     "stage_resources.needs: unknown stage 'BuildDenseIdx'; did you mean 'BuildDenseIndex'?"),
    ('stage_resources.needs={"BuildDenseIndex": 4}', "stage_resources.needs['BuildDenseIndex'] = 4: expected"),
])
def test_the_keys_inside_the_decoding_dicts_are_checked_before_anything_builds(clean_config, capsys, item, words):
    """Each key and value of [decoding]'s dicts and [stage_resources] needs, one line, exit 2, before
    any stage (``nest status`` builds nothing; ``nest all`` would otherwise reach Generate first)."""
    assert cli.main(["status", "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("nest: ") and words in err and "Traceback" not in err, err
    assert not clean_config.exists()


def test_the_project_decoding_config_passes_its_check(clean_config):
    from pipeline import dag
    from pipeline.engine.task import check_needs

    dag.check_decoding()
    check_needs()


def test_a_misspelt_option_in_a_config_file_is_refused(clean_config, tmp_path):
    from luigi.configuration.cfg_parser import LuigiConfigParser

    cfg = LuigiConfigParser()
    cfg.read_string("[core]\nno_configure_logging = true\n[PreRetrieve]\nb = 20\ncandidates = 4000\nmoed = dense\n")
    with pytest.raises(ConfigError, match=r"unknown option PreRetrieve.moed; did you mean PreRetrieve.mode\?"):
        check_config(cfg)


def test_the_project_config_passes_the_check(clean_config):
    from pipeline import dag  # noqa: F401

    check_config(extra_sections=config.PROFILES)


def test_a_bad_value_on_the_command_line_is_one_line(clean_config, capsys):
    assert cli.main(["run", "PreRetrieve", "--task", "bio", "--b", "0"]) == 2
    assert "PreRetrieve.b = '0': expected an integer >= 1" in capsys.readouterr().err
    assert cli.main(["run", "PreRetrieve", "--task", "bogus"]) == 2
    err = capsys.readouterr().err  # the known tasks: at least the built-ins (a task file added later is one more)
    assert "PreRetrieve.task = 'bogus': expected one of " in err and err.count("\n") == 1
    assert {"bio", "completion", "completion_excluded", "factscore"} <= set(err.split("expected one of ")[1].strip().split(", "))
    assert not clean_config.exists()


def test_the_documented_nest_run_form_parses(clean_config, monkeypatch):
    seen = {}

    def fake_build(roots, **kw):
        seen["task"], seen["force"] = roots[0], kw.get("force")
        return 0

    monkeypatch.setattr(cli, "build", fake_build)
    assert cli.main(["run", "PreRetrieve", "--task", "bio", "--b", "20"]) == 0  # `--b` was an ambiguous prefix
    assert seen["task"].b == 20 and seen["task"].task == "bio"
    assert cli.main(["run", "--set", "PreRetrieve.candidates=50", "PreRetrieve", "--task", "bio", "--force",
                     "PreRetrieve"]) == 0
    assert seen["task"].candidates == 50 and seen["force"] == ["PreRetrieve"]


def test_report_inputs_are_named_by_what_they_score():
    from pipeline import dag

    req = dag.Report().requires()
    names = [n for n, t in req.items() if isinstance(t, dag.Score)]
    assert names and all(n.count("/") == 2 for n in names) and len(set(names)) == len(names)
    assert any(n.startswith("completion/nest/") for n in names)
    # and the key stores NEST's main runs read (their build time goes beside NEST's speed), one per task
    stores = {n: t for n, t in req.items() if n.startswith(dag.Report.KEY_STORE_INPUT)}
    assert all(t.stage == "EncodePassageKeys" and n == f"passage_keys/{t.task}" for n, t in stores.items())
    # report.html reads each run's generations (named after the run), each task's examples, passages, tokens, the LM
    assert {n for n, t in req.items() if isinstance(t, dag.Generate)} == {dag.GENERATIONS + n for n in names}
    assert {"passages", "tokens", "lm"} <= set(req) and "examples:completion" in req


# ---- nest query: read-only, no file access outside the store -----------------------------------------------------------

@pytest.fixture
def query_store(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.storage.runs import write_run
    from pipeline.storage.store import Store

    store = Store(tmp_path / "store")
    key = "e" * 64
    store.publish("LoadTask", key, lambda out: pq.write_table(pa.table({
        "example_id": [0], "task": ["completion"], "references": [["the gold text"]]}), out / "examples.parquet"),
        version="1", params={"task": "completion"}, inputs={})
    write_run(store, {"id": "20000101T000000.000000Z-1", "started_at": "2000-01-01T00:00:00Z", "ok": True,
                      "reached": [{"stage": "LoadTask", "key": key, "label": "LoadTask", "status": "built"}]})
    monkeypatch.setenv("NEST_STORE", str(store.root))
    return store


def test_query_renames_the_reserved_references_column(query_store, capsys):
    assert cli.main(["query", "SELECT refs FROM examples"]) == 0
    assert "the gold text" in capsys.readouterr().out


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{outside}/x.csv'",
    "COPY (SELECT 1) TO '{store}/LoadTask/x.csv'",
    "ATTACH '{outside}/y.duckdb'",
    "INSTALL httpfs",
    "SELECT * FROM read_csv('{outside}/secret.csv')",
    "SET enable_external_access = true",
    "SELECT 1; COPY (SELECT 1) TO '{outside}/z.csv'",
])
def test_query_refuses_writes_and_files_outside_the_store(query_store, tmp_path, capsys, sql):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    before = sorted(p.name for p in outside.iterdir())
    assert cli.main(["query", sql.format(outside=outside, store=query_store.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("nest: query: ")
    assert sorted(p.name for p in outside.iterdir()) == before
    assert not (query_store.root / "LoadTask" / "x.csv").exists()


def test_report_finds_the_latest_run_with_a_report(query_store, capsys):
    from pipeline.storage.runs import write_run

    store = query_store
    rkey = "a" * 64
    store.publish("Report", rkey, lambda out: (out / "report.md").write_text("# the tables\n"), version="1",
                  params={}, inputs={})
    write_run(store, {"id": "20000102T000000.000000Z-1", "started_at": "2000-01-02T00:00:00Z", "ok": True,
                      "reached": [{"stage": "Report", "key": rkey, "label": "Report", "status": "built"}]})
    # a later `nest generate` becomes the latest run; it reached no Report
    write_run(store, {"id": "20000103T000000.000000Z-1", "started_at": "2000-01-03T00:00:00Z", "ok": True,
                      "reached": [{"stage": "LoadTask", "key": "e" * 64, "label": "LoadTask", "status": "cached"}]})
    assert cli.main(["report"]) == 0
    assert capsys.readouterr().out == "# the tables\n"
