"""The local store, hardened: gc safety, verify repair, fsync order, read-only stores, force rebuilds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from luigi.task_register import Register

from pipeline import cli
from pipeline.engine.config import get_store
from pipeline.storage.runs import active_runs, end_run, start_run
from pipeline.storage.store import Store, StoreError
from pipeline_conftest_helpers import PROJECT, fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkAll, FkLeaf, FkMid, FkSide, FkSource, calls

TESTS = Path(__file__).resolve().parent


def _build(*tasks, force=()) -> int:
    return cli.build(list(tasks), profile=None, command=["test"], force=force)


def _fresh():
    Register.clear_instance_cache()


def _env(fake_env, **extra):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS), str(fake_env.mods)]),
            "NEST_STORE": str(fake_env.store_root), "NEST_FAKE_LOG": str(fake_env.log), **extra}


def _nest(fake_env, *args, env=None, wrap=None):
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if wrap:
        cmd = wrap + [" ".join(map(_quote, cmd))]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(fake_env), cwd=fake_env.root)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed) with its kind, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# ---- gc --------------------------------------------------------------------------------------------------------------

def test_gc_leaves_foreign_folders_and_symlinks_alone_and_a_dry_run_writes_nothing(fake_env, tmp_path, capsys):
    assert _build(FkAll()) == 0
    store = get_store()
    outside = tmp_path / "elsewhere"
    (outside / "project1").mkdir(parents=True)
    (outside / "project1" / "precious.txt").write_text("keep me")
    os.symlink(outside, store.root / "Mirror")                        # a symlinked "stage" leading out of the store
    (store.root / "datasets" / "wiki").mkdir(parents=True)            # a user's folder two levels down
    (store.root / "FkSide" / "notes").mkdir()                         # a non-key folder inside a stage folder
    os.symlink(outside / "project1", store.root / "FkSide" / ("f" * 64))  # a key-named symlink
    before = _snapshot(store.root)

    assert cli.main(["gc", "--keep", "0"]) == 0  # dry run: every artifact unreached, but nothing written
    out = capsys.readouterr().out
    assert "Mirror" not in out and "datasets" not in out and "notes" not in out and "f" * 16 not in out
    assert _snapshot(store.root) == before  # not even a lock file

    assert cli.main(["gc", "--keep", "0", "--yes"]) == 0
    assert (outside / "project1" / "precious.txt").read_text() == "keep me"
    assert (store.root / "datasets" / "wiki").is_dir() and (store.root / "FkSide" / "notes").is_dir()
    assert (store.root / "Mirror").is_symlink() and (store.root / "FkSide" / ("f" * 64)).is_symlink()
    assert not store.complete("FkLeaf", FkLeaf().key)  # the real artifacts did go


def test_gc_keeps_the_inputs_of_a_run_in_progress(fake_env, capsys):
    assert _build(FkMid()) == 0
    store = get_store()
    src, mid = (("FkSource", FkSource().key), ("FkMid", FkMid().key))
    active = start_run(store, "20990101T000000.000000Z-1", [src, mid, ("FkLeaf", "a" * 64)])
    try:
        assert [r["id"] for r in active_runs(store)] == ["20990101T000000.000000Z-1"]
        assert cli.main(["gc", "--keep", "0", "--yes"]) == 0
        assert store.complete(*src) and store.complete(*mid)
    finally:
        end_run(active)
    assert active_runs(store) == []
    assert cli.main(["gc", "--keep", "0", "--yes"]) == 0  # the run ended: now they are unreached
    assert not store.complete(*src) and not store.complete(*mid)


def test_gc_ignores_the_record_of_a_killed_run(fake_env):
    assert _build(FkSource()) == 0
    store = get_store()
    path = start_run(store, "20990101T000000.000000Z-2", [("FkSource", FkSource().key)])
    doc = json.loads(path.read_text())
    doc["pid"] = 2 ** 22 + 12345  # no such process
    path.write_text(json.dumps(doc))
    assert active_runs(store) == []


def test_build_records_the_run_while_it_runs(fake_env, monkeypatch):
    seen = []
    import pipeline.engine.task as base

    real = base.NestTask.run

    def spy(self):
        seen.append({(r["stage"], r["key"]) for run in active_runs(get_store()) for r in run["planned"]})
        return real(self)

    monkeypatch.setattr(base.NestTask, "run", spy)
    assert _build(FkLeaf()) == 0
    assert seen and all(("FkSource", FkSource().key) in s and ("FkLeaf", FkLeaf().key) in s for s in seen)
    assert active_runs(get_store()) == []  # removed at the end


# ---- verify = true repairs ------------------------------------------------------------------------------------------

def test_verify_true_moves_a_corrupt_artifact_aside_and_rebuilds_it(fake_env, monkeypatch, capsys):
    from pipeline.engine import config

    assert _build(FkMid()) == 0
    store = get_store()
    key = FkMid().key
    target = store.path("FkMid", key) / "out.txt"
    target.write_text(target.read_text().replace("mid", "MID"))  # same size, other bytes
    assert store.verify("FkMid", key)
    before = config.config().get("nest", "verify", raw=True)
    config.apply_overrides({"nest": {"verify": "true"}})
    try:
        _fresh()
        assert _build(FkLeaf()) == 0  # FkLeaf is new: Luigi checks its input FkMid, finds it corrupt, rebuilds it
    finally:
        config.config().set("nest", "verify", before)  # luigi.cfg's value
    assert store.verify("FkMid", key) == []
    asides = list((store.root / "FkMid").glob(f".corrupt-{key}-*"))
    assert len(asides) == 1 and "MID" in (asides[0] / "out.txt").read_text()
    assert "corrupt" in capsys.readouterr().err
    assert cli.main(["gc", "--yes"]) == 0  # gc removes what verify moved aside
    assert not asides[0].exists() and store.complete("FkMid", key)


# ---- fsync order ----------------------------------------------------------------------------------------------------

def test_data_files_are_fsynced_before_the_manifest_is_written(tmp_path, monkeypatch):
    import pipeline.storage.files as files
    import pipeline.storage.store as st

    events = []
    real_fsync, real_write = st.fsync_path, st.atomic_write_json
    spy = lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p))  # noqa: E731
    monkeypatch.setattr(st, "fsync_path", spy)
    monkeypatch.setattr(files, "fsync_path", spy)  # fsync_tree's, over the data files
    monkeypatch.setattr(st, "atomic_write_json", lambda p, d: (events.append(("manifest", p.name)), real_write(p, d)))

    def build(d: Path):
        (d / "a.bin").write_bytes(b"x" * 1000)
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(b"y")

    store = Store(tmp_path / "s")
    store.publish("S", "c" * 64, build, version="1", params={}, inputs={})
    names = [e for e in events]
    at = names.index(("manifest", "manifest.json"))
    assert ("fsync", "a.bin") in names[:at] and ("fsync", "b.bin") in names[:at]
    assert ("fsync", "S") in names[:at]  # the stage folder, after the rename into place
    assert ("fsync", "c" * 64) in names[at:]  # the artifact folder, after the manifest's rename


# ---- read-only stores and bad NEST_STORE ----------------------------------------------------------------------------

def test_nest_store_pointing_at_a_file_is_one_line(fake_env, tmp_path):
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    proc = _nest(fake_env, "run", "FkSource", "--module", "pipeline_fakes", env=_env(fake_env, NEST_STORE=str(f)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_publish_into_an_unwritable_store_is_a_store_error(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StoreError, match="no write access"):
        store.publish("S", "d" * 64, lambda d: None, version="1", params={}, inputs={})


def _can_mount_read_only(folder: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    f = _quote(str(folder))
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {f} {f} && mount -o remount,bind,ro {f}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_read_only_store_serves_a_cached_run_and_refuses_new_builds_in_one_line(fake_env):
    if os.geteuid() == 0 and not _can_mount_read_only(fake_env.store_root):
        pytest.skip("root without user namespaces: no way to make a read-only store here")
    assert _build(FkMid()) == 0
    root = fake_env.store_root
    if os.geteuid() == 0:
        wrap = ["unshare", "-rm", "sh", "-c",
                f"mount --bind {_quote(str(root))} {_quote(str(root))} && "
                f"mount -o remount,bind,ro {_quote(str(root))} && exec \"$0\" \"$@\""]
        run = lambda *a: subprocess.run(wrap + [sys.executable, "-m", "pipeline.cli", *a], capture_output=True,
                                        text=True, env=_env(fake_env), cwd=fake_env.root)
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            os.chmod(dirpath, 0o555)
        run = lambda *a: _nest(fake_env, *a)
    try:
        before = _snapshot(root)
        cached = run("run", "FkMid", "--module", "pipeline_fakes")
        assert cached.returncode == 0, cached.stderr
        assert "cached" in cached.stdout and "run not recorded" in cached.stderr and "Traceback" not in cached.stderr
        new = run("run", "FkLeaf", "--module", "pipeline_fakes")
        assert new.returncode == 2, new.stderr
        lines = [line for line in new.stderr.splitlines() if line.startswith("nest:")]
        assert len(lines) == 1 and "write" in lines[0] and "Traceback" not in new.stderr
        assert _snapshot(root) == before
    finally:
        for dirpath, dirnames, filenames in os.walk(root):
            os.chmod(dirpath, 0o755)


# ---- --force ---------------------------------------------------------------------------------------------------------

def test_force_rebuilds_a_stage_and_what_depends_on_it(fake_env, capsys):
    assert _build(FkAll()) == 0
    assert sorted(calls(fake_env.log)) == ["leaf", "mid", "side-a", "src"]
    fake_env.log.unlink()
    _fresh()
    assert _build(FkAll(), force=["FkMid"]) == 0
    assert sorted(calls(fake_env.log)) == ["leaf", "mid"]  # FkMid and its dependant FkLeaf; not FkSource, FkSide
    store = get_store()
    assert len(list((store.root / "FkMid").glob(".replaced-*"))) == 1
    assert store.verify("FkLeaf", FkLeaf().key) == []
    _fresh()
    with pytest.raises(cli.CliError, match="--force Nope: not a stage of this run"):
        _build(FkAll(), force=["Nope"])


def test_nest_run_takes_set_and_force(fake_env):
    env = _env(fake_env)
    first = _nest(fake_env, "run", "--set", "FkMid.scale=3", "FkLeaf", "--module", "pipeline_fakes", env=env)
    assert first.returncode == 0, first.stderr
    assert "midmidmid" in next((get_store().root / "FkLeaf").glob("*/out.txt")).read_text()
    fake_env.log.unlink()
    again = _nest(fake_env, "run", "FkLeaf", "--module", "pipeline_fakes", "--set", "FkMid.scale=3", "--force",
                  "FkMid", env=env)
    assert again.returncode == 0, again.stderr
    assert sorted(calls(fake_env.log)) == ["leaf", "mid"]
