"""Damaged local artifacts end absent or right: a truncated manifest is "not complete" and
every command reports it in one line; ``verify = true`` with a remote re-pulls a corrupt file instead of saying ``ok``."""

from __future__ import annotations

import json

from luigi.task_register import Register

from pipeline import cli
from pipeline.engine import config
from pipeline.engine.config import get_store
from pipeline_conftest_helpers import fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkAll, FkLeaf, FkMid, calls
from test_store_hardening import _env, _nest


def _build(*tasks) -> int:
    return cli.build(list(tasks), profile=None, command=["test"])


def _truncate_manifest(store, stage: str, key: str, size: int = 100) -> None:
    path = store.manifest_path(stage, key)
    path.write_bytes(path.read_bytes()[:size])


def _one_line(text: str) -> bool:
    return "Traceback" not in text and len([ln for ln in text.splitlines() if ln.startswith("nest")]) == 1


def test_a_truncated_manifest_is_not_complete_and_the_stage_rebuilds(fake_env, capsys):
    assert _build(FkMid()) == 0
    store, key = get_store(), FkMid().key
    _truncate_manifest(store, "FkMid", key)
    assert not store.complete("FkMid", key) and store.manifest("FkMid", key) is None
    assert "unreadable" in store.manifest_damage("FkMid", key)
    Register.clear_instance_cache()
    before = len(calls(fake_env.log))
    assert _build(FkMid()) == 0
    assert calls(fake_env.log)[before:] == ["mid"]  # rebuilt, not "cached"
    assert store.complete("FkMid", key) and store.verify("FkMid", key) == []
    assert len(list((store.root / "FkMid").glob(f".corrupt-{key}-*"))) == 1  # moved aside in one rename
    assert "moved aside" in capsys.readouterr().err


def test_verify_true_and_a_truncated_manifest_rebuilds_instead_of_reporting_ok(fake_env):
    assert _build(FkMid()) == 0
    store, key = get_store(), FkMid().key
    _truncate_manifest(store, "FkMid", key)
    proc = _nest(fake_env, "run", "FkLeaf", "--module", "pipeline_fakes", "--set", "nest.verify=true")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error in complete" not in proc.stderr
    run = json.loads((store.runs_dir / "latest.json").read_text())
    assert {r["stage"]: r["status"] for r in run["reached"]}["FkMid"] == "built"
    assert store.verify("FkMid", key) == []


def test_gc_show_query_and_push_report_a_damaged_manifest_in_one_line(fake_env, tmp_path):
    assert _build(FkAll()) == 0
    store, key = get_store(), FkMid().key
    _truncate_manifest(store, "FkMid", key)
    for args in (["gc"], ["show", key[:12]], ["query", "SELECT count(*) AS n FROM artifacts"],
                 ["push", "--all", "--remote", str(tmp_path / "remote")]):
        proc = _nest(fake_env, *args)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert f"FkMid/{key[:12]}" in proc.stderr and "not complete" in proc.stderr, (args, proc.stderr)
        assert _one_line(proc.stderr), (args, proc.stderr)
    assert _nest(fake_env, "gc").returncode == 0
    assert _nest(fake_env, "query", "SELECT 1 AS x").returncode == 0
    assert _nest(fake_env, "show", key[:12]).returncode == 2  # not complete: nothing to show


def test_verify_true_with_a_remote_pulls_a_corrupt_file_again(fake_env, tmp_path):
    assert _build(FkMid()) == 0
    store, key = get_store(), FkMid().key
    remote = tmp_path / "remote"
    assert _nest(fake_env, "push", "--all", "--remote", str(remote)).returncode == 0
    target = store.path("FkMid", key) / "out.txt"
    target.write_text(target.read_text().replace("mid", "MID"))  # same size, other bytes
    before = len(calls(fake_env.log))
    proc = _nest(fake_env, "run", "FkMid", "--module", "pipeline_fakes", "--set", "nest.verify=true",
                 env=_env(fake_env, NEST_REMOTE=str(remote)))
    assert proc.returncode == 0, proc.stderr
    assert "corrupt" in proc.stderr and "pulled" in proc.stderr
    assert store.verify("FkMid", key) == [] and "MID" not in target.read_text()
    assert len(calls(fake_env.log)) == before  # pulled, not built
    show = _nest(fake_env, "show", "--verify", key[:12])
    assert show.returncode == 0, show.stderr


def test_verify_true_without_a_remote_still_rebuilds(fake_env):
    assert _build(FkMid()) == 0
    store, key = get_store(), FkMid().key
    (store.path("FkMid", key) / "sub" / "n.txt").write_text("99")  # same size
    before = config.config().get("nest", "verify", raw=True)
    config.apply_overrides({"nest": {"verify": "true"}})
    try:
        Register.clear_instance_cache()
        assert _build(FkLeaf()) == 0
    finally:
        config.config().set("nest", "verify", before)
    assert store.verify("FkMid", key) == []
