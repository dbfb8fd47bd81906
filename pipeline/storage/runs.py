"""Run records: which artifacts each run reached (``<store>/runs/<timestamp>.json`` and ``runs/latest.json``).

``nest gc`` keeps what the recorded runs reached (and everything those artifacts were built from); the DuckDB views read
the artifacts of the latest run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.storage.files import atomic_write_json, folder_size
from pipeline.storage.store import Store, utc_now

LATEST = "latest.json"


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ") + f"-{os.getpid()}"


def write_run(store: Store, record: dict) -> Path:
    """Write a run record under its id and as ``latest.json`` (both atomically)."""
    store.runs_dir.mkdir(parents=True, exist_ok=True)
    path = store.runs_dir / f"{record['id']}.json"
    atomic_write_json(path, record)
    atomic_write_json(store.runs_dir / LATEST, record)
    return path


ACTIVE = "active"


def start_run(store: Store, run_id: str, planned: Iterable[tuple[str, str]], command: list[str] | None = None) -> Path | None:
    """Record a run as it starts (``runs/active/<id>.json``: host, pid and every artifact it may read or build), so
    that ``nest gc`` never removes an input of a run in progress. Best effort: None when the store is read-only."""

    doc = {"id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": utc_now(),
           "command": command or [], "planned": [{"stage": s, "key": k} for s, k in dict.fromkeys(planned)]}
    folder = store.runs_dir / ACTIVE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}.json"
        atomic_write_json(path, doc)
        return path
    except OSError:
        return None


def end_run(path: Path | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _alive(doc: dict) -> bool:
    """Whether the process of an active-run record still runs (a record from another host counts as alive)."""

    if doc.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(doc.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def active_runs(store: Store) -> list[dict]:
    """Run-in-progress records whose process is alive (records of killed runs are ignored)."""
    folder = store.runs_dir / ACTIVE
    out = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _alive(doc):
            out.append(doc)
    return out


def load_runs(store: Store) -> list[dict]:
    """Every recorded run, oldest first (``latest.json`` is a copy and is not counted twice)."""
    if not store.runs_dir.is_dir():
        return []
    runs = []
    for p in sorted(store.runs_dir.glob("*.json")):
        if p.name == LATEST:
            continue
        try:
            runs.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    runs.sort(key=lambda r: (r.get("started_at", ""), r.get("id", "")))
    return runs


def latest_run_with(store: Store, stage: str) -> dict | None:
    """The newest recorded run that reached a complete artifact of ``stage`` (``nest generate`` records runs too, so
    the latest run of any kind may have no report)."""
    runs = load_runs(store)
    latest = latest_run(store)
    if latest and all(latest.get("id") != r.get("id") for r in runs):
        runs.append(latest)
    for run in reversed(runs):
        if any(r.get("stage") == stage and store.complete(stage, r["key"]) for r in run.get("reached", [])):
            return run
    return None


def latest_run(store: Store) -> dict | None:
    try:
        return json.loads((store.runs_dir / LATEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        runs = load_runs(store)
        return runs[-1] if runs else None


def walk_upstream(store: Store, refs: Iterable[tuple[str, str]]) -> Iterator[tuple[tuple[str, str], dict | None]]:
    """``(ref, manifest)`` for ``refs`` and every artifact they were built from, nearest first (breadth-first over the
    manifests' input keys; each artifact once; ``None`` for one that is not in the store)."""
    todo, seen = deque(refs), set()
    while todo:
        ref = todo.popleft()
        if ref in seen:
            continue
        seen.add(ref)
        m = store.manifest(*ref)
        yield ref, m
        if m:
            todo.extend((i["stage"], i["key"]) for i in m.get("inputs", {}).values())


def upstream_closure(store: Store, refs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """``refs`` plus every artifact they were built from, following the manifests' input keys."""
    return {ref for ref, _ in walk_upstream(store, refs)}


@dataclass
class GcPlan:
    kept_runs: int
    keep: set[tuple[str, str]]
    remove: list[tuple[str, str, Path, int]]  # stage, key, folder, bytes

    @property
    def bytes(self) -> int:
        return sum(r[3] for r in self.remove)


def plan_gc(store: Store, keep_runs: int | None = None) -> GcPlan:
    """Artifacts no kept run reaches (the latest ``keep_runs`` runs; all recorded runs when None; runs in progress always),
    and crash leftovers (temp folders the store named, corrupt artifacts moved aside). Only folders with a manifest, or
    named by the store, are ever listed; symlinks are never followed. Writes nothing."""
    runs = load_runs(store)
    if not runs:
        raise RuntimeError(f"no recorded runs under {store.runs_dir}: nothing says what to keep, so nothing is removed")
    kept = runs if keep_runs is None else runs[-keep_runs:] if keep_runs > 0 else []
    reached = {(r["stage"], r["key"]) for run in kept for r in run.get("reached", [])}
    reached |= {(r["stage"], r["key"]) for run in active_runs(store) for r in run.get("planned", [])}
    keep = upstream_closure(store, reached)
    remove = []
    for ref in store.folders():  # real key-named folders only, never through a symlink
        if not store.complete(ref.stage, ref.key):
            continue  # only artifacts (a manifest) are removed; a manifest-less folder is the next build's to clear
        if (ref.stage, ref.key) not in keep and not store.is_locked(ref.stage, ref.key):
            remove.append((ref.stage, ref.key, ref.path, folder_size(ref.path)))
    for stage, key, tmp in store.stale_temp_folders():
        remove.append((stage, key, tmp, folder_size(tmp)))
    return GcPlan(len(kept), keep, remove)


def apply_gc(store: Store, plan: GcPlan) -> None:
    for stage, key, path, _size in plan.remove:
        if path.is_symlink():
            continue
        if path.name == key:
            store.remove(stage, key)
        else:  # a crash leftover (.tmp-...) or a corrupt artifact moved aside (.corrupt-...)
            shutil.rmtree(path, ignore_errors=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def command_line() -> list[str]:
    return [os.path.basename(sys.argv[0])] + sys.argv[1:]


__all__ = ["new_run_id", "write_run", "start_run", "end_run", "active_runs", "latest_run_with", "load_runs", "latest_run", "upstream_closure", "walk_upstream", "plan_gc", "apply_gc", "GcPlan",
           "human_bytes", "command_line", "utc_now"]
