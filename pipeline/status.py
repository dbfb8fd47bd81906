"""``nest status``: for each stage of the DAG, cached, or why it would rerun.

A stage whose key has no manifest is compared with the closest earlier artifact of the same stage in the store (the one
differing in the fewest key ingredients; ties go to the latest run's, then the newest): the reasons are the ingredients
that differ: a parameter, the declared stage version, or an input artifact (with the upstream stage that changed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import luigi

from pipeline.engine.runlog import closure
from pipeline.engine.task import NestTask
from pipeline.storage.runs import latest_run, load_runs
from pipeline.storage.store import Store


@dataclass
class StageStatus:
    task: NestTask
    state: str                      # "cached" | "rerun" | "new"
    reasons: list[str] = field(default_factory=list)
    compared_with: str | None = None  # key of the artifact the reasons are relative to


def _short(value: Any, width: int = 60) -> str:
    if isinstance(value, dict):
        for digest in ("sha256", "tree_sha256"):
            if digest in value:  # a file identity: its name and a short digest say enough
                name = value.get("name") or value.get("id") or ""
                return f"{name}@{str(value[digest])[:10]}".lstrip("@")
    text = json.dumps(value, sort_keys=True, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _differences(ing: dict, manifest: dict) -> list[tuple[str, str, Any, Any]]:
    """(kind, name, old, new) for every key ingredient that differs from ``manifest``."""
    diffs = []
    if str(manifest.get("stage_version")) != str(ing["stage_version"]):
        diffs.append(("version", "", manifest.get("stage_version"), ing["stage_version"]))
    old_params, new_params = manifest.get("params", {}), ing["params"]
    for name in sorted(set(old_params) | set(new_params)):
        if old_params.get(name, "<absent>") != new_params.get(name, "<absent>"):
            diffs.append(("param", name, old_params.get(name, "<absent>"), new_params.get(name, "<absent>")))
    old_inputs = {n: i["key"] for n, i in manifest.get("inputs", {}).items()}
    for name in sorted(set(old_inputs) | set(ing["inputs"])):
        if old_inputs.get(name) != ing["inputs"].get(name):
            diffs.append(("input", name, old_inputs.get(name), ing["inputs"].get(name)))
    return diffs


def _same_instance(task: NestTask, manifest: dict, labels: dict[tuple[str, str], str]) -> bool:
    """Whether ``manifest`` is an earlier build of the same stage *instance* (same task/method/variant...): its recorded
    label when a run recorded it, else the label parameters that enter the key. A Generate for ``method=base`` is then
    "new", not a "rerun" of the ``ra`` one."""
    if not task.label_params:
        return True
    label = labels.get((task.stage, manifest.get("key")))
    if label is not None:
        return label == task.label
    params, mine = manifest.get("params", {}), task.key_params
    return all(params.get(p) == mine[p] for p in task.label_params if p in mine)


def run_labels(store: Store) -> dict[tuple[str, str], str]:
    """{(stage, key): label} of every artifact a recorded run reached."""
    out: dict[tuple[str, str], str] = {}
    for run in load_runs(store) + [latest_run(store) or {}]:
        for r in run.get("reached", []):
            if r.get("label"):
                out[(r["stage"], r["key"])] = r["label"]
    return out


def explain(task: NestTask, store: Store, latest_keys: set[tuple[str, str]] | None = None,
            states: dict[str, StageStatus] | None = None,
            labels: dict[tuple[str, str], str] | None = None) -> StageStatus:
    """Cached, or the reasons ``task`` would rerun, relative to the closest earlier artifact of the same stage instance
    (``new`` when there is none)."""
    if store.complete(task.stage, task.key):
        return StageStatus(task, "cached")
    ing = task.key_ingredients()
    latest_keys = latest_keys or set()
    labels = labels if labels is not None else run_labels(store)
    best = None
    for m in store.manifests(task.stage):
        if not _same_instance(task, m, labels):
            continue
        diffs = _differences(ing, m)
        rank = (len(diffs), 0 if (task.stage, m["key"]) in latest_keys else 1, _neg(m.get("created_at", "")))
        if best is None or rank < best[0]:
            best = (rank, m, diffs)
    if best is None:
        return StageStatus(task, "new", ["never built"])
    _rank, manifest, diffs = best
    upstream = {name: t for name, t in task.inputs().items()}
    reasons = []
    for kind, name, old, new in diffs:
        if kind == "version":
            reasons.append(f"stage version {old} -> {new}")
        elif kind == "param":
            reasons.append(f"param {name}: {_short(old)} -> {_short(new)}")
        else:
            up = upstream.get(name)
            what = up.label if up is not None else name
            st = states.get(up.task_id) if (states is not None and up is not None) else None
            tail = " (rebuilds first)" if st is not None and st.state != "cached" else ""
            reasons.append(f"upstream {name} changed: {what} {str(old)[:12]} -> {str(new)[:12]}{tail}")
    if not reasons:
        reasons.append("key changed with the same ingredients (key format changed?)")
    return StageStatus(task, "rerun", reasons, manifest["key"])


def _neg(text: str) -> tuple:
    """Sort newer ISO timestamps first."""
    return tuple(-ord(c) for c in text)


def dag_status(roots: Iterable[luigi.Task], store: Store) -> list[StageStatus]:
    """Status of every stage reachable from ``roots``, dependencies first."""
    latest = latest_run(store)
    latest_keys = {(r["stage"], r["key"]) for r in (latest or {}).get("reached", [])}
    states: dict[str, StageStatus] = {}
    labels = run_labels(store)
    out = []
    for task in closure(roots):
        st = explain(task, store, latest_keys, states, labels)
        states[task.task_id] = st
        out.append(st)
    return out
