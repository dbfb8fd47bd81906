"""Fake stages for the stop tests (``--module stop_fakes``): StSource ── StSlow ── StAfter.

StSlow, when ``$NEST_STOP_SLOW`` is set (seconds), starts a child process (a stand-in for the JVM indexer), appends its
pid to ``$NEST_STOP_PIDS``, writes a partial file, prints ``stop-fake: sleeping`` and sleeps: a test sends its signal
after that line, mid-build, without timing anything. Without the variable every stage finishes at once (the rerun).
"""

from __future__ import annotations

import luigi

from pipeline.engine.task import NestTask

STOP_MODULE = "nest_stop_stage"

STOP_STAGE_SRC = '''
import os
import subprocess
import sys
import time
from pathlib import Path

VERSION = "1"


def run(out_dir, *, text, upstream=None):
    out = Path(out_dir)
    (out / "out.txt").write_text(text)
    slow = float(os.environ.get("NEST_STOP_SLOW") or 0) if text == "slow" else 0
    if slow:
        # its own session, as bm25.indexer_process starts the JVM: a Ctrl-C to the terminal's group does not reach it
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        with open(os.environ["NEST_STOP_PIDS"], "a") as f:
            f.write(f"{child.pid}\\n")
        (out / "partial.bin").write_bytes(b"x" * 1000)
        print(f"stop-fake: sleeping in {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(slow)
        child.kill()
    return {"chars": len(text)}
'''


def write_stop_stage(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{STOP_MODULE}.py").write_text(STOP_STAGE_SRC)


class StSource(NestTask):
    stage_module = STOP_MODULE

    def stage_params(self):
        return {"text": "source"}


class StSlow(NestTask):
    stage_module = STOP_MODULE

    def requires(self):
        return {"upstream": StSource()}

    def stage_params(self):
        return {"text": "slow"}


class StSide(NestTask):
    stage_module = STOP_MODULE

    def requires(self):
        return {"upstream": StSource()}

    def stage_params(self):
        return {"text": "side"}


class StAfter(NestTask):
    stage_module = STOP_MODULE

    def requires(self):
        return {"upstream": StSlow()}

    def stage_params(self):
        return {"text": "after"}


class StAll(luigi.WrapperTask):
    def requires(self):
        return [StAfter(), StSide()]
