"""A tiny sharded fake DAG for the scheduler tests (no torch, no Java): each stage writes one text file.

DAG:  ShSource ─┬─ ShShard(0, 2) ─┐
                ├─ ShShard(2, 4)  ├─ ShReport
                ├─ ShShard(4, 6)  │
                └─ ShShard(6, 8) ─┘

The stage logs ``<text> <pid> <OMP_NUM_THREADS> <unix time>`` to ``$NEST_FAKE_LOG`` as it starts; ``$NEST_TEST_SLOW`` =
``text:seconds[,text:seconds]`` makes those stages sleep (a resource of the test: not part of any key).
"""

from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.engine.sharding import Sharded, range_params
from pipeline.engine.task import NestTask

SHARD_MODULE = "nest_shard_stage"

SHARD_STAGE_SRC = '''"""A fake sharded stage: out.txt = text + the out.txt of every input, in input-name order."""
import os
import time
from pathlib import Path

VERSION = "1"


def run(out_dir, *, text, **inputs):
    log = os.environ.get("NEST_FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{text} {os.getpid()} {os.environ.get('OMP_NUM_THREADS', '-')} {time.time():.3f}\\n")
    for item in filter(None, os.environ.get("NEST_TEST_SLOW", "").split(",")):
        name, _, seconds = item.partition(":")
        if name == text:
            time.sleep(float(seconds))
    body = text + "".join("|" + (Path(inputs[k]) / "out.txt").read_text() for k in sorted(inputs))
    (Path(out_dir) / "out.txt").write_text(body)
    return {"chars": len(body)}
'''

N_EXAMPLES = 8
N_SHARDS = 4


def write_shard_stage(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SHARD_MODULE}.py"
    path.write_text(SHARD_STAGE_SRC)
    return path


class ShSource(NestTask):
    stage_module = SHARD_MODULE
    salt = luigi.Parameter(default="", description="new keys for the whole DAG (a fresh run)")

    def stage_params(self):
        return {"text": f"source{self.salt}"}


class ShShard(NestTask):
    stage_module = SHARD_MODULE
    label_params = ("start", "end")
    start = luigi.IntParameter()
    end = luigi.IntParameter()

    def requires(self):
        return {"source": ShSource()}

    def stage_params(self):
        return {"text": f"shard-{self.start}-{self.end}"}


class ShReport(NestTask):
    stage_module = SHARD_MODULE

    def requires(self):
        step = N_EXAMPLES // N_SHARDS
        return {f"shard{i:02d}": ShShard(start=i * step, end=(i + 1) * step) for i in range(N_SHARDS)}

    def stage_params(self):
        return {"text": "report"}


class ShAll(luigi.WrapperTask):
    def requires(self):
        return [ShReport()]


# ---- a sharded stage sized by its source (pipeline/engine/sharding.py), as PreTokenize is by ConvertCorpus ---------------------
#
#   SzSource(limit) ── SzWork(shards=N): SzWork(start, end) × N ── merge
#
# SzSource's manifest says how many items there are (``stats.items``); SzWork's shard plan is read from it. The stage
# logs like the one above; ``$NEST_TEST_WAIT`` = ``text:path[,text:path]`` makes a stage wait until ``path`` exists
# (a deterministic hook: the test decides when it may finish).

SIZED_MODULE = "nest_sized_stage"

SIZED_STAGE_SRC = '''"""A fake sized stage: the source writes items.txt (its size); a range of the work writes one line per item."""
import os
import time
from pathlib import Path

VERSION = "1"


def _hooks(text):
    log = os.environ.get("NEST_FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{text} {os.getpid()} {os.environ.get('OMP_NUM_THREADS', '-')} {time.time():.3f}\\n")
    for item in filter(None, os.environ.get("NEST_TEST_WAIT", "").split(",")):
        name, _, path = item.partition(":")
        if name == text:
            deadline = time.monotonic() + 300
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
    for item in filter(None, os.environ.get("NEST_TEST_SLOW", "").split(",")):
        name, _, seconds = item.partition(":")
        if name == text:
            time.sleep(float(seconds))


def run(out_dir, *, text, items=None, start=None, end=None, source=None):
    out = Path(out_dir)
    if source is None:
        _hooks(text)
        (out / "items.txt").write_text(str(items))
        return {"items": int(items)}
    n = int((Path(source) / "items.txt").read_text())
    a, b = int(start or 0), n if end is None else int(end)
    _hooks(f"{text}-{a}-{b}")
    (out / "out.txt").write_text("".join(f"{text} {i}\\n" for i in range(a, b)))
    return {"rows": b - a}


def merge(out_dir, *, shards, text):
    _hooks(f"{text}-merge")
    body = "".join((Path(s) / "out.txt").read_text() for s in shards)
    (Path(out_dir) / "out.txt").write_text(body)
    return {"rows": body.count("\\n")}
'''


def write_sized_stage(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SIZED_MODULE}.py"
    path.write_text(SIZED_STAGE_SRC)
    return path


class SzSource(NestTask):
    stage_module = SIZED_MODULE
    limit = luigi.IntParameter(default=8, description="items (enters the key, as ConvertCorpus.limit does)")
    salt = luigi.Parameter(default="", description="new keys for the whole DAG (a fresh round)")

    def stage_params(self):
        return {"text": f"source{self.salt}", "items": int(self.limit)}


class SzWork(Sharded, NestTask):
    stage_module = SIZED_MODULE
    label_params = label_if_set = ("start", "end")
    shards = luigi.IntParameter(default=1, significant=False)
    start = luigi.IntParameter(default=0)
    end = luigi.IntParameter(default=-1)
    size_source = ("source", "items")  # the stats of its source input give the number of items

    def requires(self):
        return {"source": SzSource()}

    def stage_params(self):
        return {"text": "work", **range_params(self)}
