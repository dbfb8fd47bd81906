"""The layering of docs/architecture.md ("Layers"), checked on the sources.

The imports are read from every module of bench/, pipeline/, stages/ and tasks/: at the top of a file and inside
functions, absolute and relative. The project's modules must form no circle, and each room may import only the rooms
its row of :data:`MAY_IMPORT` names (besides itself). A new back-edge fails here, with the module and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "pipeline", "stages", "tasks")

# room -> the rooms it may import (a room is a package prefix; the longest prefix that names a module is its room).
# Keep it the table of docs/architecture.md.
STAGES = ("stages", "stages.corpus", "stages.retrieval", "stages.lm", "stages.decoding", "stages.evaluation")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "tasks": (),
    "stages": ("tasks",),  # stages/common.py, stages/errors.py
    "stages.corpus": ("stages", "tasks"),
    "stages.decoding": ("stages", "tasks"),  # the decoding library: never another stage
    "stages.retrieval": ("stages", "stages.corpus", "tasks"),
    "stages.lm": ("stages", "stages.corpus", "stages.decoding", "tasks"),
    "stages.evaluation": (*STAGES, "tasks"),
    "pipeline.storage": ("stages",),  # the store: content keys, manifests, runs, archives, the catalog
    "pipeline.sharing": ("pipeline.storage", "pipeline.engine.config"),  # the remote: where it is, its mode
    "pipeline.engine": ("pipeline.storage", "pipeline.sharing", "stages", "stages.corpus", "tasks"),
    "pipeline.wiring": ("pipeline.engine", "pipeline.storage", *STAGES, "tasks"),
    "pipeline": ("pipeline.wiring", "pipeline.engine", "pipeline.sharing", "pipeline.storage", *STAGES, "tasks"),
    "bench": ("bench", "pipeline", "pipeline.wiring", "pipeline.engine", "pipeline.sharing", "pipeline.storage",
              *STAGES, "tasks"),
}

# Edges another change removes (fixed in parallel; delete an entry once that change is merged).
PENDING_ELSEWHERE: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((PROJECT / pkg).rglob("*.py")):
            parts = list(path.relative_to(PROJECT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _module_of(name: str) -> str | None:
    """The project module an imported name lives in (``pipeline.engine.config.get_store`` → ``pipeline.engine.config``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> set[str]:
    """The project modules ``module`` imports, anywhere in it (top level, functions, relative imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod (and pkg's __init__, which the room check need not see twice)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        for t in targets:
            m = _module_of(t)
            if m is not None and m != module:
                out.add(m)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def room(module: str) -> str:
    return max((r for r in MAY_IMPORT if module == r or module.startswith(r + ".")), key=len)


def allowed(src: str, dst: str) -> bool:
    """Within its room, into a room its row names, or into a module its row names (``pipeline.engine.config``)."""
    may = MAY_IMPORT[room(src)]
    return room(src) == room(dst) or room(dst) in may or dst in may or (src, dst) in PENDING_ELSEWHERE


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_imports_inside_functions_and_relative_ones():
    assert "pipeline.engine.config" in GRAPH["pipeline.engine.task"]
    assert "stages.decoding.key_store" in GRAPH["stages.lm.encode_passage_keys"]  # inside a function
    assert room("pipeline.engine.config") == "pipeline.engine" and room("pipeline.cli") == "pipeline"
    assert room("stages.common") == "stages" and room("stages.decoding.methods.nest") == "stages.decoding"


def test_no_import_circle_among_the_projects_modules():
    assert circles(GRAPH) == []


def test_every_import_follows_the_layer_table():
    bad = [f"{src} imports {dst} ({room(src)} may import {', '.join(MAY_IMPORT[room(src)]) or 'nothing above it'})"
           for src in sorted(GRAPH) for dst in sorted(GRAPH[src]) if not allowed(src, dst)]
    assert bad == []


def test_pending_allowances_are_still_needed():
    """An allowance whose edge is gone must be deleted, so that the edge cannot come back unnoticed."""
    assert [e for e in sorted(PENDING_ELSEWHERE) if e[1] not in GRAPH.get(e[0], ())] == []


def test_function_level_imports_in_pipeline_are_lazy_on_purpose():
    """Imports inside functions hide the order of the modules; in pipeline/ each one left says why it waits (start-up
    time: torch, numpy, pyarrow, duckdb...) with a ``# lazy:`` comment."""
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("pipeline"):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "# lazy" not in lines[node.lineno - 1]:
                        bad.append(f"{path.relative_to(PROJECT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert bad == []


def _says_lazy(lines: list[str], lineno: int) -> bool:
    """A ``# lazy`` comment on the import's line or above it, over the block of imports and comments it sits in."""
    i = lineno - 1
    while i >= 0 and (lines[i].strip().startswith(("#", "from ", "import ")) or lines[i].strip() == ""):
        if "# lazy" in lines[i]:
            return True
        if lines[i].strip() == "" and i < lineno - 1:
            break
        i -= 1
    return False


def test_function_level_imports_of_project_modules_say_why():
    """Outside pipeline/ too, a project module imported inside a function says why it waits (it loads torch,
    transformers, faiss or the JVM): no function-level import hides an arrow of the graph."""
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                project = any(n.split(".")[0] in ("pipeline", "stages", "tasks", "bench") for n in names)
                if project and not _says_lazy(lines, node.lineno):
                    bad.append(f"{path.relative_to(PROJECT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert bad == []


def test_stages_never_import_luigi_or_the_pipeline():
    offences = [f"{m} imports {d}" for m in GRAPH if m.startswith("stages") for d in GRAPH[m] if d.startswith("pipeline")]
    luigi = [m for m in MODULES if m.startswith("stages") and "luigi" in _third_party(m)]
    assert offences == [] and luigi == []


def test_tasks_never_import_luigi():
    assert [m for m in MODULES if m.startswith("tasks") and "luigi" in _third_party(m)] == []


def _third_party(module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out
