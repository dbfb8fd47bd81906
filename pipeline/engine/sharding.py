"""Sharded stages: one stage split into shard tasks, each its own Luigi task and artifact, merged into
the artifact the unsharded stage writes.

**The shard count is a resource, not an identity.** A sharded stage declares ``shards`` (a Luigi parameter,
``[Stage] shards = 4`` or ``--set Stage.shards=4``; default 1 = one task, as before). It is not a key ingredient: the
merged task has the unsharded task's key, and the stage's ``merge`` writes the files its ``run`` writes, byte for byte.
The shards are *build dependencies* (``NestTask.build_requires()``), not identity inputs; each shard is the same stage
over a range (``start``/``end``: doc_ids for EncodePassages and PreTokenize, example_ids for PreRetrieve, Generate and
Perplexity), with its own key, and BuildDenseIndex (IVF index strings) trains once (TrainDenseIndex), adds each range
(AddDenseShard) and merges the inverted lists.

**Where the ranges come from.** A range plan needs the number of items: the passages of ConvertCorpus or the examples
of LoadTask, read from the ``stats`` of that artifact's manifest (local, or on the remote in distributed mode). Before
that artifact exists the stage is built as one task (same key, same files); ``nest all``/``run``/``worker`` therefore
build those size sources first when a stage of the run has ``shards > 1`` (:func:`size_sources`). A plan is fixed for a
task instance once computed (Luigi asks for a task's dependencies again just before it runs).

Boundaries fall on multiples of the stage's batch (``shard_block``) where its output depends on how rows are batched
(PreRetrieve's query batches, Generate's decoding batches); EncodePassages and AddDenseShard snap to the encoder's and
FAISS's chunks themselves (a shard takes the chunks that start in its range), so any plan gives the same bits.
"""

from __future__ import annotations

from typing import Iterable

import luigi

from pipeline.engine.params import accepts, at_least
from pipeline.sharing.remote import active_remote


def ranges(start: int, end: int, shards: int, block: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` split into at most ``shards`` contiguous, non-empty ranges of nearly equal size, every boundary
    but the last at ``start`` + a multiple of ``block``."""
    n = max(0, end - start)
    block = max(1, int(block))
    blocks = -(-n // block)
    k = max(1, min(int(shards), blocks))
    if n == 0:
        return [(start, end)]
    out, b0 = [], 0
    for i in range(k):
        b1 = b0 + blocks // k + (1 if i < blocks % k else 0)
        out.append((start + b0 * block, min(end, start + b1 * block)))
        b0 = b1
    return out


_STATS: dict[tuple[str, str, str, str], int] = {}  # (store, stage, key, field) -> value, once found (never changes)


def artifact_stat(task, name: str) -> int | None:
    """``stats[name]`` of ``task``'s artifact: from the local store's manifest, else (distributed mode, or a remote
    to pull from) from the remote's; None when neither has the artifact."""
    memo = (str(task.store.root), task.stage, task.key, name)
    if memo in _STATS:
        return _STATS[memo]
    m = task.store.manifest(task.stage, task.key) if task.store.complete(task.stage, task.key) else None
    if m is None:
        try:
            remote = active_remote("pull")
            m = remote.manifest(task.stage, task.key) if remote is not None else None
        except Exception:  # no remote, or it does not answer: the stage is built as one task
            m = None
    value = (m or {}).get("stats", {}).get(name)
    if value is None:
        return None
    _STATS[memo] = int(value)
    return int(value)


def shards_param():
    """``shards``: a resource, not an identity: no key moves with it (nor Luigi's task id). Its default (1) is
    luigi.cfg's, in each sharded stage's section."""
    return accepts(luigi.IntParameter(significant=False, description="split into this many range shards, "
                                      "each its own task (a resource: the merged artifact is the unsharded one)"),
                   at_least(1))


def range_pair():
    """``start``/``end``: the range of a shard (doc_ids or example_ids; ``end`` -1: to the last); only shards set them."""
    return (accepts(luigi.IntParameter(default=0, description="a shard's first item"), at_least(0)),
            accepts(luigi.IntParameter(default=-1, description="a shard's end (exclusive; -1: the last item)"),
                    at_least(-1)))


class Sharded:
    """Mixin of a NestTask that can split into range shards. A sharded stage declares, as data:

    - ``shards = shards_param()`` and ``start, end = range_pair()`` (the range this task covers; ``end`` -1: to the last
      item; only a shard sets them);
    - ``size_source = (input path, stats field)``: where the number of items is read, e.g. ``("passages",
      "num_passages")`` (the manifest stats of its ``passages`` input) or ``("embeddings.passages", "num_passages")``
      (the ``passages`` input of its ``embeddings`` input);
    - ``shard_block`` (or :meth:`block`): boundaries on its multiples.

    A shard is the same stage over its range with ``shards=1`` (:meth:`shard_task`; BuildDenseIndex overrides it).
    """

    size_source: tuple[str, str] = ("", "")
    shard_block: int = 1

    def size_task(self):
        """``(task, stats field)`` giving the number of items, from the declared :attr:`size_source`."""
        path, field = self.size_source
        task = self
        for name in path.split("."):
            task = task.requires()[name]
        return task, field

    def shard_task(self, start: int, end: int):
        return self.clone(start=start, end=end, shards=1)

    def block(self) -> int:
        return self.shard_block

    def sharding_enabled(self) -> bool:
        return int(getattr(self, "shards", 1)) > 1

    def shard_plan(self) -> list[tuple[int, int]] | None:
        """The ranges of the shards (at least two), or None: built as one task (one shard, or the number of items is
        not known yet). Computed once per task instance."""
        memo = self.__dict__.get("_nest_shard_plan", False)
        if memo is not False:
            return memo
        plan = None
        if self.sharding_enabled():
            task, field = self.size_task()
            n = artifact_stat(task, field)
            if n is not None:
                start = int(getattr(self, "start", 0))
                end = int(getattr(self, "end", -1))
                end = n if end < 0 else min(end, n)
                plan = ranges(start, end, int(self.shards), self.block())
                plan = plan if len(plan) > 1 else None
        self.__dict__["_nest_shard_plan"] = plan
        return plan

    def shard_tasks(self) -> dict:
        plan = self.shard_plan()
        return {f"shard-{i:05d}": self.shard_task(a, b) for i, (a, b) in enumerate(plan or ())}

    def build_requires(self):
        return self.shard_tasks()


def range_params(task) -> dict:
    """``{"start": s, "end": e}`` for a shard (a task whose range is not the whole), else ``{}``: the keys of unsharded
    tasks stay what they were before stages could be sharded."""
    start, end = int(task.start), int(task.end)
    if start == 0 and end < 0:
        return {}
    return {"start": start, "end": None if end < 0 else end}


def _identity_walk(roots: Iterable[luigi.Task]) -> list[luigi.Task]:
    """Every task reachable through identity inputs (``requires()``) only: computes no shard plan."""
    seen, out = set(), []
    stack = list(roots)
    while stack:
        t = stack.pop()
        if t.task_id in seen:
            continue
        seen.add(t.task_id)
        out.append(t)
        stack.extend(luigi.task.flatten(t.requires()))
    return out


def size_sources(roots: Iterable[luigi.Task]) -> list:
    """The size sources (ConvertCorpus, LoadTask…) of the stages under ``roots`` that have ``shards > 1`` and whose
    size is not known yet: what to build first so that those stages split into shards."""
    out, seen = [], set()
    for t in _identity_walk(roots):
        if isinstance(t, Sharded) and t.sharding_enabled():
            src, field = t.size_task()
            if src.task_id not in seen and artifact_stat(src, field) is None:
                seen.add(src.task_id)
                out.append(src)
    return out
