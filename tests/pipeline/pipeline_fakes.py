"""Tiny fake stages and a tiny DAG for the pipeline's own tests (no torch, no Java: each stage writes one text file).

DAG:  FkSource ─┬─ FkMid ── FkLeaf
                └─ FkSide
"""

from __future__ import annotations

import sys
from pathlib import Path

import luigi

from pipeline.engine.task import NestTask

FAKE_MODULE = "nest_fake_stage"

FAKE_STAGE_SRC = '''"""A fake stage: writes out.txt from text, scale and upstream out.txt; logs each call to $NEST_FAKE_LOG."""
import os
import time
from pathlib import Path

from stages.errors import InputError

VERSION = "{version}"


def run(out_dir, *, text, upstream=None, scale=1, fail=None, sleep=0.0):
    out_dir = Path(out_dir)
    log = os.environ.get("NEST_FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(text + "\\n")
    body = text * int(scale)
    if upstream is not None:
        body += "|" + (Path(upstream) / "out.txt").read_text()
    (out_dir / "out.txt").write_text(body)
    (out_dir / "sub").mkdir()
    (out_dir / "sub" / "n.txt").write_text(str(len(body)))
    if sleep:
        time.sleep(sleep)
    if fail == "input":
        raise InputError("data.txt", 3, "bad row")
    if fail == "raise":
        raise RuntimeError("stage failed midway")
    if fail == "exit":
        os._exit(17)
    return {{"chars": len(body)}}
'''


def write_fake_stage(folder: Path, version: str = "1", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{FAKE_MODULE}.py"
    path.write_text(FAKE_STAGE_SRC.format(version=version) + extra)
    return path


class FkSource(NestTask):
    stage_module = FAKE_MODULE
    text = luigi.Parameter(default="src")

    def stage_params(self):
        return {"text": self.text}


class FkMid(NestTask):
    stage_module = FAKE_MODULE
    scale = luigi.IntParameter(default=1)

    def requires(self):
        return {"upstream": FkSource()}

    def stage_params(self):
        return {"text": "mid", "scale": self.scale}


class FkLeaf(NestTask):
    stage_module = FAKE_MODULE
    fail = luigi.Parameter(default="")

    def requires(self):
        return {"upstream": FkMid()}

    def stage_params(self):
        return {"text": "leaf", "fail": self.fail or None}


class FkSide(NestTask):
    stage_module = FAKE_MODULE
    label_params = ("tag",)
    tag = luigi.Parameter(default="a")

    def requires(self):
        return {"upstream": FkSource()}

    def stage_params(self):
        return {"text": f"side-{self.tag}"}


class FkAll(luigi.WrapperTask):
    def requires(self):
        return [FkLeaf(), FkSide()]


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def fake_dag_source() -> str:
    """This module's text, for subprocess tests that import it by file."""
    return Path(__file__).read_text()


__all__ = ["FkSource", "FkMid", "FkLeaf", "FkSide", "FkAll", "write_fake_stage", "calls", "FAKE_MODULE", "sys"]
