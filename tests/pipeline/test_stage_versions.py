"""A stage's declared VERSION must move when its code does: tests/stage_versions.json records both, per stage module.

If this fails after you edited a stage: bump its VERSION if the same inputs can now give different outputs (the keys
move and the stage reruns), or, for a pure refactor, refresh the record deliberately:

    python -m pipeline.stage_versions --update
"""

from __future__ import annotations

import sys

import pytest

from pipeline import stage_versions as sv


def test_every_stage_module_is_recorded_and_its_version_follows_its_code():
    modules = sv.stage_modules()
    assert "stages.corpus.convert" in modules and "stages.retrieval.bm25" in modules
    problems = sv.check(sv.load_record(), sv.current(modules))
    assert problems == [], "\n".join(problems)


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mods"
    pkg.mkdir()
    path = pkg / "sv_fake_stage.py"
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "sv_fake_stage", raising=False)

    def write(version: str, body: str = "def run(out_dir):\n    return {'n': 1}\n", comment: str = "") -> None:
        path.write_text(f'"""A fake stage."""\n{comment}\nVERSION = "{version}"\n\n{body}')

    return write


def _state():
    return sv.current({"sv_fake_stage": ("VERSION",)})


def test_comments_and_layout_do_not_count_as_code_changes(fake_module):
    fake_module("1")
    recorded = _state()
    fake_module("1", body="def run(out_dir):\n\n    # why: nothing\n    return {'n':   1}\n", comment="# note")
    assert sv.check(recorded, _state()) == []


def test_code_change_without_a_version_bump_fails(fake_module):
    fake_module("1")
    recorded = _state()
    fake_module("1", body="def run(out_dir):\n    return {'n': 2}\n")
    problems = sv.check(recorded, _state())
    assert len(problems) == 1 and "code changed" in problems[0] and "but VERSION did not" in problems[0]


def test_version_bump_asks_for_a_deliberate_refresh_and_then_passes(fake_module):
    fake_module("1")
    recorded = _state()
    fake_module("2", body="def run(out_dir):\n    return {'n': 2}\n")
    problems = sv.check(recorded, _state())
    assert len(problems) == 1 and "version {'VERSION': '1'} -> {'VERSION': '2'}" in problems[0]
    assert sv.check(_state(), _state()) == []


def test_unrecorded_module_past_its_first_version_fails(fake_module):
    fake_module("1")
    assert sv.check({}, _state()) == []  # a new stage at version 1: nothing to compare yet
    fake_module("2")
    assert "not recorded" in sv.check({}, _state())[0]


def test_version_is_read_without_importing_the_module(fake_module):
    fake_module("7", body="import this_module_does_not_exist\n")
    assert sv.read_version("sv_fake_stage") == "7"
    assert "sv_fake_stage" not in sys.modules


def test_base_does_not_import_the_dag_or_the_guard():
    """``pipeline.engine.task`` reads versions through ``pipeline.engine.stage_code`` only: no cycle base -> stage_versions -> dag -> base."""
    import subprocess
    import sys

    code = ("import sys, pipeline.engine.task; bad = {'pipeline.dag', 'pipeline.stage_versions'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=sv.PROJECT_ROOT)


def _rec(parts: dict, version: str = "1") -> dict:
    return {"versions": {"VERSION": version}, "code_sha256": "|".join(f"{k}={v}" for k, v in sorted(parts.items())),
            "covers": sorted({k.split(":")[0] for k in parts}), "parts": parts}


def test_an_added_file_passes_a_changed_or_removed_one_does_not():
    """Extending is one new file (a method, a task, a retriever): it cannot change what the recorded code computes."""
    recorded = {"stages.x": _rec({"stages.x:x.py": "a", "stages.decoding.methods:nest.py": "b"})}
    added = {"stages.x": _rec({"stages.x:x.py": "a", "stages.decoding.methods:nest.py": "b",
                               "stages.decoding.methods:no_echo.py": "c"})}
    assert sv.check(recorded, added) == []
    changed = {"stages.x": _rec({"stages.x:x.py": "a", "stages.decoding.methods:nest.py": "B"})}
    problems = sv.check(recorded, changed)
    assert len(problems) == 1 and "stages.decoding.methods:nest.py" in problems[0] and "did not" in problems[0]
    removed = {"stages.x": _rec({"stages.x:x.py": "a"})}
    assert len(sv.check(recorded, removed)) == 1


def test_a_new_stage_is_at_its_first_version_until_recorded():
    assert sv.check({}, {"stages.new": _rec({"stages.new:new.py": "a"})}) == []
    problems = sv.check({}, {"stages.new": _rec({"stages.new:new.py": "a"}, version="2")})
    assert len(problems) == 1 and "not recorded" in problems[0]
