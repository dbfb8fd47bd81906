"""The layering of docs/architecture.md, checked on the sources (imports anywhere in a module, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _offences(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PROJECT / folder).rglob("*.py")):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PROJECT)} imports {name}")
    return bad


def test_stages_never_import_luigi_or_the_pipeline():
    assert _offences("stages", ("luigi", "pipeline")) == []


def test_the_decoding_library_stands_alone():
    """Usable without the pipeline's stages: no retrieval, corpus, LM-stage or evaluation imports (the demo, which
    retrieves, lives in pipeline/demo.py)."""
    assert _offences("stages/decoding", ("stages.retrieval", "stages.corpus", "stages.lm", "stages.evaluation")) == []


def test_tasks_import_nothing_above_them():
    assert _offences("tasks", ("stages", "pipeline", "luigi")) == []
