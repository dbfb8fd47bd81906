"""The review guard over declared stage versions (reading them is ``pipeline.engine.stage_code``'s job).

A stage's version is a declared constant (``VERSION = "1"``): a comment or a refactor must not invalidate a large index.
To catch a forgotten bump, ``tests/stage_versions.json`` records, per stage module, its declared versions and a hash of its
code: the ASTs (no comments, no formatting) of the module and of every project module (``stages.*``, ``tasks.*``) it
imports, transitively, without the version assignments themselves, one hash per source file. The test fails when a
recorded file's code moved (or a file went away) but no version did, and also when a version moved but the record was
not refreshed. Refresh deliberately:

    python -m pipeline.stage_versions --update

Additions pass without a refresh, so that extending the pipeline is one new file (docs/extending.md): a new file in a
plugin folder or a discovered package (a method, a task, a retriever) cannot change what the recorded code computes,
and a stage not recorded yet is at its first version (``"1"``) with nothing to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pipeline.dag  # noqa: F401  (defines the stage tasks)
from pipeline.engine.config import PROJECT_ROOT
from pipeline.engine.stage_code import (code_hash, code_parts, declared_versions, dependencies,  # noqa: F401
                                        module_files, read_version)
from pipeline.engine.task import NestTask, subclasses

RECORD = PROJECT_ROOT / "tests" / "stage_versions.json"


def stage_modules() -> dict[str, tuple[str, ...]]:
    """``{module: version attrs}`` of every stage the DAG wires (modules not written yet are skipped)."""
    out: dict[str, set[str]] = {}
    for cls in subclasses(NestTask):
        if cls.stage_module.startswith("stages."):  # the project's stages (test doubles live elsewhere)
            out.setdefault(cls.stage_module, set()).add(cls.version_attr)
    present = {}
    for module, attrs in sorted(out.items()):
        try:
            importlib.util.find_spec(module)
        except ModuleNotFoundError:
            continue
        if importlib.util.find_spec(module) is not None:
            present[module] = tuple(sorted(attrs))
    return present


def current(modules: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    out = {}
    for m, attrs in modules.items():
        parts = code_parts(m, attrs)
        out[m] = {"versions": declared_versions(m, attrs), "code_sha256": code_hash(m, attrs),
                  "covers": dependencies(m), "parts": parts}
    return out


def _changed_parts(rec: dict, cur: dict) -> list[str] | None:
    """The recorded source files whose code moved or that went away (None: the record predates per-file parts)."""
    if "parts" not in rec:
        return None
    return sorted(f for f, digest in rec["parts"].items() if cur["parts"].get(f) != digest)


def check(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """Problems between the recorded and the current state of each module (empty: consistent)."""
    problems = []
    fix = "python -m pipeline.stage_versions --update"
    for module, cur in sorted(now.items()):
        rec = recorded.get(module)
        if rec is None:
            if any(v != "1" for v in cur["versions"].values()):
                problems.append(f"{module}: not recorded at version {cur['versions']}; record it with `{fix}`")
            continue  # a new stage at its first version: nothing to compare yet
        changed = _changed_parts(rec, cur)
        code_moved = rec.get("code_sha256") != cur["code_sha256"] if changed is None else bool(changed)
        version_moved = rec.get("versions") != cur["versions"]
        if code_moved and not version_moved:
            covers = ", ".join(changed or cur.get("covers", [module]))
            names = ", ".join(cur["versions"]) or "VERSION"
            problems.append(f"{module}: code changed (in {covers}) but {names} did not ({cur['versions']}). "
                            f"Bump it if outputs can change; otherwise refresh with `{fix}`")
        elif version_moved:
            problems.append(f"{module}: version {rec.get('versions')} -> {cur['versions']}; record it with `{fix}`")
    return problems


def load_record(path: Path = RECORD) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def update(path: Path = RECORD) -> dict:
    now = current(stage_modules())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return now


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.stage_versions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help=f"rewrite {RECORD.relative_to(PROJECT_ROOT)} from the sources")
    args = ap.parse_args(argv)
    if args.update:
        now = update()
        for module, rec in now.items():
            print(f"{module}: {rec['versions']} {rec['code_sha256'][:12]}")
        return 0
    problems = check(load_record(), current(stage_modules()))
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
