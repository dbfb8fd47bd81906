"""Distributed runs that must never hang nor fail silently, on a real ``luigid`` at 127.0.0.1.

- Two ``nest worker``s started together on a sharded DAG whose size source is still being built: both finish (or one
  finishes and the other has nothing left), also when either is ``kill -9``'d in the middle of a shard.
- Luigi task ids carry the artifact key: two configurations of one stage never share an id on one ``luigid``, so a
  stage DONE (or disabled after failing) under one configuration does not stop another.

The DAG is tests/scheduler_fakes.py's ``SzSource ─ SzWork(shards=4)``; hooks (``$NEST_TEST_WAIT``) hold a stage until a
file exists, so each interleaving is reached on purpose, not by timing.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from luigi.task_register import Register

from test_scheduler import Luigid, Site, _alive, _until, _wait, luigid, site  # noqa: F401  (fixtures)

SZ = ["SzWork", "--module", "scheduler_fakes"]
SHARDED = [*SZ, "--SzWork-shards", "4"]
SHARDS = ["work-0-2", "work-2-4", "work-4-6", "work-6-8"]


def _worker(site: Site, url: str, store: str, name: str, args: list[str], **extra):
    return site.start(["worker", "--scheduler-url", url, *args], store, name, NEST_REMOTE=str(site.remote), **extra)


def _texts(site: Site) -> list[str]:
    return [t for t, _p, _th in site.calls()]


def _nest_lines(site: Site, name: str) -> list[str]:
    return [line for line in site.text(name).splitlines() if line.startswith("nest:")]


def _remote_complete(site: Site) -> dict[str, int]:
    """Stage -> number of artifacts on the remote (each pulled into a fresh store: checked against its digests)."""
    from pipeline.sharing.remote import Remote
    from pipeline.storage.store import Store

    remote, fresh, out = Remote(str(site.remote)), Store(site.root / "fresh"), {}
    for stage, key in remote.list():
        remote.pull(fresh, stage, key)
        assert fresh.verify(stage, key) == []
        out[stage] = out.get(stage, 0) + 1
    return out


# ---- two workers started together --------------------------------------------------------------------------------------

def test_second_worker_started_while_the_first_builds_the_size_source(site, luigid):
    go = site.root / "go-source"
    a = _worker(site, luigid.url, "store-a", "a", SHARDED, NEST_TEST_WAIT=f"source:{go}",
                NEST_TEST_SLOW=",".join(f"{s}:0.3" for s in SHARDS))
    _until(lambda: "source" in _texts(site), 90, "worker a to start building the size source")
    b = _worker(site, luigid.url, "store-b", "b", SHARDED, NEST_TEST_SLOW=",".join(f"{s}:0.3" for s in SHARDS))
    _until(lambda: (site.root / "b.err").exists() and "sharded stages" in site.text("b"), 90,
           "worker b to look for the size source")
    time.sleep(2.0)  # b has had time to hand its DAG to luigid, while a still builds
    go.touch()
    rc_a, rc_b = _wait(a, site, timeout=120), _wait(b, site, timeout=120)
    assert (rc_a, rc_b) == (0, 0), site.text("a")[-3000:] + "\n----\n" + site.text("b")[-3000:]
    texts = _texts(site)
    for shard in SHARDS + ["work-merge", "source"]:
        assert texts.count(shard) == 1, texts
    assert "work-0-8" not in texts, texts  # the merge of the shards, not an unsharded build
    assert _remote_complete(site) == {"SzSource": 1, "SzWork": 5}


@pytest.mark.handover
@pytest.mark.parametrize("victim", ["first", "second"])
def test_kill_9_of_either_worker_mid_shard_the_survivor_finishes(site, luigid, victim):
    """The second worker starts while the first builds the size source; then the victim is killed while it holds a
    shard (its shards wait for a file that never appears). luigid hands the shard to the survivor once the victim's
    heartbeat lapses (``worker_disconnect_delay`` = 3 s here): the survivor finishes every shard and the merge."""
    go, never = site.root / "go-source", site.root / "never"
    hold = ",".join(f"{s}:{never}" for s in SHARDS)
    slow = ",".join(f"{s}:0.5" for s in SHARDS)
    first_env = {"NEST_TEST_WAIT": f"source:{go}" + ("," + hold if victim == "first" else "")}
    second_env = {"NEST_TEST_WAIT": hold} if victim == "second" else {}
    a = _worker(site, luigid.url, "store-a", "a", SHARDED, **first_env,
                **({} if victim == "first" else {"NEST_TEST_SLOW": slow}))
    _until(lambda: "source" in _texts(site), 90, "worker a to start building the size source")
    b = _worker(site, luigid.url, "store-b", "b", SHARDED, **second_env,
                **({} if victim == "second" else {"NEST_TEST_SLOW": slow}))
    _until(lambda: (site.root / "b.err").exists() and "sharded stages" in site.text("b"), 90,
           "worker b to look for the size source")
    time.sleep(1.0)
    go.touch()
    dead, survivor = (a, b) if victim == "first" else (b, a)
    _until(lambda: any(t in SHARDS and p == dead.pid for t, p, _th in site.calls()), 90,
           f"worker {dead.name} to start a shard")
    held = [t for t, p, _th in site.calls() if p == dead.pid and t in SHARDS][0]
    dead.send_signal(signal.SIGKILL)
    dead.wait(10)
    assert _wait(survivor, site, timeout=150) == 0, site.text(survivor.name)[-3000:]
    texts = _texts(site)
    assert all(s in texts for s in SHARDS) and texts.count(held) == 2 and texts.count("work-merge") == 1, texts
    assert _remote_complete(site) == {"SzSource": 1, "SzWork": 5}
    record = site.record("store-a" if survivor is a else "store-b")
    assert record["ok"], record
    assert not _alive(dead.pid)


# ---- task ids carry the key ---------------------------------------------------------------------------------------------

def test_task_ids_differ_with_any_key_ingredient_and_keys_do_not_move(tmp_path, monkeypatch):
    from scheduler_fakes import SzWork, write_sized_stage

    from pipeline.engine.config import apply_overrides

    write_sized_stage(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    Register.clear_instance_cache()
    try:
        apply_overrides({"SzSource": {"limit": "8"}})
        w8, key8 = SzWork(), SzWork().key
        Register.clear_instance_cache()
        apply_overrides({"SzSource": {"limit": "6"}})
        w6 = SzWork()
        assert w6.key != key8 and w6.task_id != w8.task_id  # the id follows the source's limit, through the key
        assert w6.task_id.startswith("SzWork_")
        assert SzWork(shards=4).task_id == w6.task_id  # a resource (not in the key): the same task
        assert SzWork(start=0, end=2).task_id != w6.task_id
        assert hash(SzWork()) == hash(w6) and SzWork() == w6
    finally:
        from pipeline.engine.config import config

        if config().has_option("SzSource", "limit"):
            config().remove_option("SzSource", "limit")
        Register.clear_instance_cache()


def test_two_configurations_share_one_luigid(site):
    """Luigi's defaults for luigid's [scheduler] (a DONE task is not re-run for 10 s, ``stable_done_cooldown_secs``):
    the second configuration, run right after the first, and a third after a fourth failed and was disabled, build."""
    site.cfg.write_text(site.cfg.read_text().replace("stable_done_cooldown_secs = 0\n", ""))
    server = Luigid(site).start()
    try:
        def run(name, limit, **extra):
            proc = _worker(site, server.url, "store-a", name, [*SZ, f"--SzSource-limit={limit}"], **extra)
            return _wait(proc, site, timeout=120)

        assert run("c8", 8) == 0, site.text("c8")
        assert run("c6", 6) == 0, site.text("c6")
        record = site.record("store-a")
        assert record["ok"] and {r["status"] for r in record["reached"]} == {"built"}, record
        assert run("c5", 5, NEST_TEST_SLOW="work-0-5:oops") == 1
        assert len(_nest_lines(site, "c5")) == 1, site.text("c5")
        assert run("c7", 7) == 0, site.text("c7")  # SzWork of limit 5 is disabled; limit 7's is another task
        # the disabled configuration itself: the worker stops at once and says so in one line (never silent)
        assert run("c5b", 5) == 1
        lines = _nest_lines(site, "c5b")
        assert len(lines) == 1 and "1 stage(s) not built (SzWork " in lines[0] and server.url in lines[0], \
            site.text("c5b")
        assert [t for t in _texts(site) if t.startswith("work")] == ["work-0-8", "work-0-6", "work-0-5", "work-0-5",
                                                                      "work-0-5", "work-0-7"]
    finally:
        server.stop()
