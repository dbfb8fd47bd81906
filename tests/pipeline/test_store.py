"""The content-addressed store: canonical keys, atomic publication under crashes, manifests, verification, locks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.storage.keys import Identified, canonical_json, content_key, key_form
from pipeline.storage.store import Store

PROJECT = Path(__file__).resolve().parents[2]
KEY = "ab" * 32


def _py(code: str, env_extra: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          check=check, cwd=PROJECT)


# ---- keys --------------------------------------------------------------------------------------------------------------

def test_canonical_json_sorts_keys_at_every_level_and_has_no_whitespace():
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    b = {"a": {"x": "é", "y": (1, 2)}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":"é","y":[1,2]},"b":1}'


def test_content_key_is_sha256_of_the_documented_canonical_form():
    doc = ('{"inputs":{"passages":"' + "0" * 64 + '"},"params":{"b":0.4,"k1":0.9},'
           '"stage":"BuildBM25Index","stage_version":"1"}')
    want = hashlib.sha256(doc.encode()).hexdigest()
    assert content_key("BuildBM25Index", "1", {"k1": 0.9, "b": 0.4}, {"passages": "0" * 64}) == want


def test_key_changes_with_each_ingredient():
    base = content_key("S", "1", {"p": 1}, {"i": "k"})
    assert content_key("S", "2", {"p": 1}, {"i": "k"}) != base
    assert content_key("S", "1", {"p": 2}, {"i": "k"}) != base
    assert content_key("S", "1", {"p": 1}, {"i": "k2"}) != base
    assert content_key("T", "1", {"p": 1}, {"i": "k"}) != base
    assert content_key("S", "1", {"p": 1.0}, {"i": "k"}) != base  # 1 and 1.0 are different JSON values


def test_paths_never_enter_a_key_only_identities():
    with pytest.raises(TypeError):
        key_form({"source": Path("/data/x.json")})
    with pytest.raises(ValueError):
        key_form({"source": "/data/x.json"})
    ident = Identified(Path("/data/x.json"), {"name": "x.json", "sha256": "f" * 64})
    assert key_form({"source": ident}) == {"source": {"name": "x.json", "sha256": "f" * 64}}
    assert ident.value == Path("/data/x.json")
    lazy = Identified(lambda: "built", "id", lazy=True)
    assert lazy.value == "built" and key_form(lazy) == "id"


def test_key_is_stable_across_processes_and_hash_seeds():
    code = """
        from pipeline.storage.keys import content_key
        print(content_key("S", "1", {"z": [1, {"b": 2, "a": 1}], "a": "x", "f": 0.1}, {"in": "k"}))
    """
    keys = {_py(code, {"PYTHONHASHSEED": seed}, check=True).stdout.strip() for seed in ("0", "1", "12345")}
    here = content_key("S", "1", {"a": "x", "f": 0.1, "z": [1, {"a": 1, "b": 2}]}, {"in": "k"})
    assert keys == {here}


# ---- publish -----------------------------------------------------------------------------------------------------------

def _build_two_files(out: Path) -> dict:
    (out / "a.txt").write_text("hello")
    (out / "d").mkdir()
    (out / "d" / "b.bin").write_bytes(b"\x00\x01")
    return {"rows": 2}


def _publish(store: Store, build=_build_two_files, key: str = KEY):
    return store.publish("Stage", key, build, version="3", params={"p": 1}, inputs={"up": ("Up", "cd" * 32)})


def test_publish_writes_files_and_a_manifest_that_describes_them(tmp_path):
    store = Store(tmp_path / "s")
    folder = _publish(store)
    assert folder == tmp_path / "s" / "Stage" / KEY
    m = json.loads((folder / "manifest.json").read_text())
    assert m["key"] == KEY and m["stage"] == "Stage" and m["stage_version"] == "3"
    assert m["params"] == {"p": 1}
    assert m["inputs"] == {"up": {"stage": "Up", "key": "cd" * 32}}
    assert m["files"] == {
        "a.txt": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        "d/b.bin": {"size": 2, "sha256": hashlib.sha256(b"\x00\x01").hexdigest()},
    }
    assert m["size"] == 7 and m["stats"] == {"rows": 2}
    assert m["tools"]["python"] and "build_s" in m["timings"] and m["created_at"].endswith("Z")
    assert store.complete("Stage", KEY) and store.verify("Stage", KEY) == []
    assert not list((tmp_path / "s" / "Stage").glob(".tmp-*"))


def test_manifest_is_location_independent(tmp_path):
    store = Store(tmp_path / "s")
    _publish(store)
    text = (store.path("Stage", KEY) / "manifest.json").read_text()
    assert str(tmp_path) not in text
    moved = Store(tmp_path / "elsewhere")
    shutil.copytree(store.root, moved.root)
    assert moved.complete("Stage", KEY) and moved.verify("Stage", KEY) == []


def test_publish_is_idempotent_and_does_not_rebuild(tmp_path):
    store = Store(tmp_path / "s")
    _publish(store)
    calls = []
    _publish(store, build=lambda out: calls.append(out))
    assert calls == []


def test_verify_reports_changed_missing_and_extra_files(tmp_path):
    store = Store(tmp_path / "s")
    folder = _publish(store)
    (folder / "a.txt").write_text("HELLO")          # same size, other content
    (folder / "d" / "b.bin").unlink()
    (folder / "stray.txt").write_text("x")
    problems = store.verify("Stage", KEY)
    assert any(p.startswith("a.txt: sha256") for p in problems)
    assert "d/b.bin: missing" in problems
    assert "stray.txt: not in the manifest" in problems


def test_a_stage_that_raises_leaves_nothing(tmp_path):
    store = Store(tmp_path / "s")

    def boom(out: Path):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError):
        _publish(store, build=boom)
    assert not store.complete("Stage", KEY)
    assert not store.path("Stage", KEY).exists()
    assert not list((tmp_path / "s" / "Stage").glob(".tmp-*"))


def test_unserialisable_stats_fail_before_the_artifact_appears(tmp_path):
    store = Store(tmp_path / "s")
    with pytest.raises(TypeError):
        _publish(store, build=lambda out: {"bad": object()})
    assert not store.path("Stage", KEY).exists()


def test_process_killed_midway_leaves_no_complete_artifact_and_next_run_rebuilds(tmp_path):
    root = tmp_path / "s"
    proc = _py(f"""
        import os
        from pathlib import Path
        from pipeline.storage.store import Store
        def build(out):
            (out / "a.txt").write_text("partial")
            os._exit(9)   # killed: no exception handler, no cleanup
        Store({str(root)!r}).publish("Stage", {KEY!r}, build, version="1", params={{}}, inputs={{}})
    """)
    assert proc.returncode == 9
    store = Store(root)
    assert not store.complete("Stage", KEY) and not store.path("Stage", KEY).exists()
    leftovers = store.stale_temp_folders()
    assert [(s, k) for s, k, _ in leftovers] == [("Stage", KEY)]
    _publish(store, key="cd" * 32)  # any later build of the stage clears leftovers nobody is building
    assert store.stale_temp_folders() == []
    _publish(store)  # and the killed key builds normally
    assert store.verify("Stage", KEY) == []


def test_killed_between_rename_and_manifest_is_not_complete_and_is_rebuilt(tmp_path):
    root = tmp_path / "s"
    proc = _py(f"""
        import os
        import pipeline.storage.store as st
        st.atomic_write_json = lambda path, doc: os._exit(9)   # die right before the manifest
        def build(out):
            (out / "a.txt").write_text("stale")
        st.Store({str(root)!r}).publish("Stage", {KEY!r}, build, version="1", params={{}}, inputs={{}})
    """)
    assert proc.returncode == 9
    store = Store(root)
    assert store.path("Stage", KEY).is_dir() and not store.complete("Stage", KEY)
    assert KEY not in [r.key for r in store.find(KEY[:8])]
    _publish(store)
    assert (store.path("Stage", KEY) / "a.txt").read_text() == "hello"
    assert store.verify("Stage", KEY) == []


def test_lock_makes_a_second_worker_wait_and_reuse_the_artifact(tmp_path):
    root = tmp_path / "s"
    started, release = tmp_path / "started", tmp_path / "release"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pipeline.storage.store import Store
        def build(out):
            Path({str(started)!r}).write_text("1")
            while not Path({str(release)!r}).exists():
                time.sleep(0.02)
            (out / "a.txt").write_text("from worker 1")
        Store({str(root)!r}).publish("Stage", {KEY!r}, build, version="1", params={{}}, inputs={{}})
    """)], env={**os.environ, "PYTHONPATH": str(PROJECT)}, cwd=PROJECT)
    try:
        for _ in range(3000):
            if started.exists() or worker.poll() is not None:
                break
            time.sleep(0.01)
        assert started.exists(), "worker 1 never started building"
        store = Store(root)
        assert store.is_locked("Stage", KEY)
        with store.lock("Stage", KEY, blocking=False) as held:
            assert held is False
        calls, result = [], {}

        def second_worker():
            result["folder"] = store.publish("Stage", KEY, lambda out: calls.append(1), version="1", params={},
                                             inputs={})

        import threading
        t = threading.Thread(target=second_worker)
        t.start()
        time.sleep(0.3)  # let it reach the lock (without a lock it would build now)
        release.write_text("go")
        t.join(timeout=60)
        assert calls == [], "the second worker rebuilt an artifact the first one was building"
        assert (result["folder"] / "a.txt").read_text() == "from worker 1"
    finally:
        release.write_text("go")
        worker.wait(timeout=60)
    assert worker.returncode == 0
    assert not Store(root).is_locked("Stage", KEY)


def test_find_and_remove(tmp_path):
    store = Store(tmp_path / "s")
    _publish(store)
    other = "ac" * 32
    _publish(store, key=other)
    assert [r.key for r in store.find("ab")] == [KEY]
    assert len(store.find("a")) == 2
    store.remove("Stage", KEY)
    assert not store.path("Stage", KEY).exists() and [r.key for r in store.find("a")] == [other]


def test_publish_refuses_a_malformed_key(tmp_path):
    with pytest.raises(ValueError):
        Store(tmp_path).publish("Stage", "../escape", _build_two_files, version="1", params={}, inputs={})
