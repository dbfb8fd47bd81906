"""Fixture helpers shared by the pipeline tests (store in a temp folder, fake stage module on sys.path, clean Luigi)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from luigi.task_register import Register

from pipeline.engine.runlog import RUN_LOG
from pipeline_fakes import FAKE_MODULE, write_fake_stage

PROJECT = Path(__file__).resolve().parents[2]


class FakeEnv:
    def __init__(self, root: Path):
        self.root = root
        self.store_root = root / "store"
        self.mods = root / "mods"
        self.log = root / "calls.log"

    def set_version(self, version: str, extra: str = "") -> None:
        write_fake_stage(self.mods, version, extra)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    env = FakeEnv(tmp_path)
    write_fake_stage(env.mods)
    monkeypatch.setenv("NEST_STORE", str(env.store_root))
    monkeypatch.setenv("NEST_FAKE_LOG", str(env.log))
    monkeypatch.syspath_prepend(str(env.mods))
    monkeypatch.delitem(sys.modules, FAKE_MODULE, raising=False)
    Register.clear_instance_cache()
    RUN_LOG.reset()
    yield env
    RUN_LOG.reset()
    Register.clear_instance_cache()
    sys.modules.pop(FAKE_MODULE, None)
