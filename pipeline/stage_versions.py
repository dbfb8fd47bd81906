"""Declared stage versions, read without importing the stage, and the review guard over them.

A stage's version is a declared constant (``VERSION = "1"``): a comment or a refactor must not invalidate a large index.
To catch a forgotten bump, ``tests/stage_versions.json`` records, per stage module, its declared versions and a hash of its
code: the ASTs (no comments, no formatting) of the module and of every project module (``stages.*``, ``tasks.*``) it
imports, transitively, without the version assignments themselves. The test fails when the
code hash moved but no version did, and also when a version moved but the record was not refreshed. Refresh deliberately:

    python -m pipeline.stage_versions --update
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

from pipeline.config import PROJECT_ROOT

RECORD = PROJECT_ROOT / "tests" / "stage_versions.json"


def module_files(module: str, whole_package: bool = True) -> list[Path]:
    """Source files of ``module`` (one file, or every ``.py`` of a package unless ``whole_package`` is False: then its
    ``__init__.py``), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage module {module} not found")
    origin = Path(spec.origin)
    if spec.submodule_search_locations and whole_package:  # a package stage: all its sources
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [origin]


def _is_version_assign(node: ast.stmt, attrs: frozenset[str]) -> str | None:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in attrs:
            return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in attrs:
        return node.target.id
    return None


def _parse(path: Path) -> ast.Module:
    return _parse_text(path.read_text(encoding="utf-8"), str(path))


@lru_cache(maxsize=256)
def _parse_text(text: str, filename: str) -> ast.Module:
    return ast.parse(text, filename=filename)


def declared_versions(module: str, attrs: tuple[str, ...] = ("VERSION",)) -> dict[str, str]:
    """``{attr: value}`` for the top-level string constants ``attrs`` of ``module`` (its ``__init__`` for a package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage module {module} not found")
    wanted = frozenset(attrs)
    out = {}
    for node in _parse(Path(spec.origin)).body:
        name = _is_version_assign(node, wanted)
        if name and isinstance(node.value, ast.Constant):
            out[name] = str(node.value.value)
    return out


def read_version(module: str, attr: str = "VERSION") -> str:
    """The declared version of a stage, by parsing its source (importing it could take seconds: torch)."""
    got = declared_versions(module, (attr,))
    if attr not in got:
        raise AttributeError(f"{module} declares no top-level {attr} = \"...\" string constant")
    return got[attr]


LOCAL_PACKAGES = ("stages", "tasks")


def _local_imports(tree: ast.Module, package: str | None) -> set[str]:
    """Project modules (``stages.*``, ``tasks.*``) imported anywhere in ``tree`` (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and package:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in LOCAL_PACKAGES:
                try:
                    if importlib.util.find_spec(name) is not None:
                        found.add(name)
                except (ModuleNotFoundError, ValueError):
                    continue
    return found


def _discovered(tree: ast.Module) -> set[str]:
    """The modules of the package a registry imports by discovery or by name at run time (a top-level
    ``DISCOVERS = "package"``, as in ``tasks/registry.py`` and ``stages/retrieval/searchers.py``): code the importing
    stage runs, though no import statement names it."""
    found = set()
    for node in tree.body:
        if _is_version_assign(node, frozenset({"DISCOVERS"})) and isinstance(node.value, ast.Constant):
            spec = importlib.util.find_spec(str(node.value.value))
            for loc in (spec.submodule_search_locations or []) if spec else []:
                found |= {f"{node.value.value}.{p.stem}" for p in Path(loc).glob("*.py") if p.stem != "__init__"}
    return found


def dependencies(module: str) -> list[str]:
    """``module`` and every project module it imports, transitively (their code changes a stage's output too)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        spec = importlib.util.find_spec(m)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        package = m if spec.submodule_search_locations else m.rpartition(".")[0]
        for path in module_files(m, whole_package=(m == module)):
            tree = _parse(path)
            todo.extend((_local_imports(tree, package) | _discovered(tree)) - seen)
    return sorted(seen)


def code_hash(module: str, attrs: tuple[str, ...] = ("VERSION",)) -> str:
    """sha256 of the ASTs (comments and layout ignored) of the module and of the project modules it imports, the
    module's own version assignments left out."""
    wanted = frozenset(attrs)
    h = hashlib.sha256()
    for dep in dependencies(module):
        for path in module_files(dep, whole_package=(dep == module)):
            tree = _parse(path)
            body = [n for n in tree.body if not (dep == module and _is_version_assign(n, wanted))]
            h.update(f"{dep}:{path.name}".encode())
            h.update(ast.dump(ast.Module(body=body, type_ignores=[])).encode())
    return h.hexdigest()


def stage_modules() -> dict[str, tuple[str, ...]]:
    """``{module: version attrs}`` of every stage the DAG wires (modules not written yet are skipped)."""
    from pipeline.base import NestTask
    import pipeline.dag  # noqa: F401  (registers the tasks)

    out: dict[str, set[str]] = {}
    for cls in _subclasses(NestTask):
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


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def current(modules: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    return {m: {"versions": declared_versions(m, attrs), "code_sha256": code_hash(m, attrs),
                "covers": dependencies(m)} for m, attrs in modules.items()}


def check(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """Problems between the recorded and the current state of each module (empty: consistent)."""
    problems = []
    fix = "python -m pipeline.stage_versions --update"
    for module, cur in sorted(now.items()):
        rec = recorded.get(module)
        if rec is None:
            problems.append(f"{module}: not recorded; record it with `{fix}`")
            continue
        code_moved = rec.get("code_sha256") != cur["code_sha256"]
        version_moved = rec.get("versions") != cur["versions"]
        if code_moved and not version_moved:
            covers = ", ".join(cur.get("covers", [module]))
            names = ", ".join(cur["versions"]) or "VERSION"
            problems.append(f"{module}: code changed (the hash covers {covers}) but {names} did not ({cur['versions']}). "
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
