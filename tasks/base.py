"""The evaluation-task interface: an :class:`Example` record (one row of ``examples.parquet``) and the :class:`Task` base.

A task reads its benchmark's official file (``load``), says how long to generate (``max_new_tokens``), and scores one
generation against one example (``score``). Scores are on the paper's table scale (percent for ROUGE, ALR and FactScore;
BLEU points for ∆BLEU), so a report averages them and prints them as they are; ``None`` means "not computed" and is
left out of means. See ``docs/tasks.md`` and ``docs/metrics.md``.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tasks.metrics import truncate_at_eos
from tasks.metrics import alr, alr_first_only
from tasks.prompts import KINDS
SOURCES = ("file", "corpus")  # where a task's examples come from: its benchmark file, or drawn from the corpus

EXAMPLE_COLUMNS = ("example_id", "task", "kind", "query", "question", "prefix", "references", "exclude_doc_ids", "meta")


@dataclass
class Example:
    """One evaluation example; the fields are the columns of ``examples.parquet`` (``meta`` as a dict here, JSON there).

    ``query`` is what retrieval sees (the question, the completion prefix, or the FactScore entity); ``question`` is
    shown to the LM (``qa`` kind), ``prefix`` starts the assistant turn (``completion`` kind); ``references`` holds all
    gold aliases or the reference continuation.
    """

    example_id: int
    task: str
    kind: str
    query: str
    question: str = ""
    prefix: str = ""
    references: list[str] = field(default_factory=list)
    exclude_doc_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {KINDS}")

    def to_row(self, sort_meta: bool = True) -> dict[str, Any]:
        """The Parquet row: ``meta`` serialised as JSON (sorted keys unless ``sort_meta`` is False, UTF-8 kept)."""
        row = asdict(self)
        row["references"] = [str(r) for r in self.references]
        row["exclude_doc_ids"] = [int(d) for d in self.exclude_doc_ids]
        row["meta"] = json.dumps(self.meta, sort_keys=sort_meta, ensure_ascii=False)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Example":
        """Inverse of :meth:`to_row` (``meta`` may be a JSON string or a dict; list columns may be numpy arrays)."""
        meta = row.get("meta") or {}
        if isinstance(meta, (str, bytes)):
            meta = json.loads(meta)
        return cls(example_id=int(row["example_id"]), task=str(row["task"]), kind=str(row["kind"]),
                   query=str(row["query"]), question=str(row.get("question") or ""),
                   prefix=str(row.get("prefix") or ""), references=[str(r) for r in (row.get("references") or [])],
                   exclude_doc_ids=[int(d) for d in (row.get("exclude_doc_ids") or [])], meta=dict(meta))


def examples_schema():
    """The pyarrow schema of ``examples.parquet`` (architecture.md)."""
    import pyarrow as pa

    return pa.schema([("example_id", pa.int64()), ("task", pa.string()), ("kind", pa.string()),
                      ("query", pa.string()), ("question", pa.string()), ("prefix", pa.string()),
                      ("references", pa.list_(pa.string())), ("exclude_doc_ids", pa.list_(pa.int64())),
                      ("meta", pa.string())])


def examples_to_table(examples: Iterable[Example], *, sort_meta: bool = True):
    """A pyarrow Table with :func:`examples_schema` (the caller writes it atomically); ``sort_meta=False`` keeps the
    meta keys in insertion order (``Task.sort_meta``)."""
    import pyarrow as pa

    rows = [e.to_row(sort_meta=sort_meta) for e in examples]
    return pa.Table.from_pylist(rows, schema=examples_schema())


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """Indices of a seeded uniform sample of ``k`` of ``range(n)``, in increasing (file) order.

    All sizes come from one permutation (``random.Random(seed).shuffle``), so for the same seed a smaller sample is a
    subset of a larger one: ``limit=20`` is part of ``limit=100``, which is part of the paper's 2,500.
    """
    if k >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:k])


@dataclass(frozen=True)
class Column:
    """One column of the report's Table 1 for a task: the summary metric, its label, a scale and the decimals shown."""

    metric: str
    label: str
    scale: float = 1
    decimals: int = 1


#: Table-1 columns shared by several tasks (a task may declare its own).
COMPLETION_COLUMNS = (Column("ppl", "PPL", 1, 2), Column("rouge1", "RG-1"), Column("rouge2", "RG-2"),
                      Column("rougeL", "RG-L"), Column("num_tokens", "Avg.Len"))
QA_COLUMNS = (Column("alr", "ALR"), Column("num_tokens", "answer length (tokens)"),
              Column("answer_in_copied_span", "answer in a copied span (% of correct)"),
              Column("alr_first_only", "ALR (first alias, as released code)"))
LONGFORM_COLUMNS = (Column("factscore", "FS"), Column("num_facts", "#Facts"), Column("rouge1_source", "RG-1 vs source"),
                    Column("num_tokens", "Avg.Len"))


class Task(ABC):
    """One task, built-in or paper benchmark. Subclasses set the class attributes below and implement ``read`` (a file
    task) or ``draw`` (a corpus task) and ``score_text``; ``@tasks.registry.register("name")`` makes the task known
    to LoadTask, Score, the report and the DAG (docs/extending.md, "A task").

    Declared per task (class attributes, readable without an instance):

    - ``kind`` (the prompt: ``completion`` | ``qa``) and ``family`` (:mod:`tasks.stopping`: completion, qa,
      multiple_choice, longform: the generation length and stop rule);
    - ``source``: ``file`` (read from the benchmark file set in ``[paper_tasks] <name>``) or ``corpus`` (drawn from
      the corpus by LoadTask through :meth:`draw`);
    - ``metrics`` (what :meth:`score` returns), ``quality_metric`` (the one metric of Table 3 and the γ sweep),
      ``headline_metrics`` (those that get a paired bootstrap against the base LM), ``report_columns`` (Table 1);
    - ``topical``: the examples are about one entity (topical precision of the copied tokens, the off-topic section);
      ``uses_judge``: scoring takes ``judge``/``retrieve`` options (FactScore; Score passes the ``[factscore]`` judge);
      ``needs_tokenizer``: loading takes the LM's ``tokenizer``; ``perplexity``: the examples carry
      ``meta["target_ids"]``, so evaluation-mode PPL applies;
    - ``data_help``: what the ``[paper_tasks]`` option of a file task names.

    ``sample_size``: the paper's subsample (2,500 for HotpotQA and MedMCQA), drawn with ``seed``; ``None`` keeps all.
    """

    name: str = ""
    kind: str = "qa"
    family: str = "qa"  # tasks.stopping: sets the generation length and stop rule of the task's examples
    source: str = "file"
    metrics: tuple[str, ...] = ()
    quality_metric: str = "alr"
    headline_metrics: tuple[str, ...] = ("alr",)
    report_columns: tuple[Column, ...] = QA_COLUMNS
    topical: bool = False
    uses_judge: bool = False
    needs_tokenizer: bool = False
    perplexity: bool = False
    data_help: str = ""
    cut_at_eos: bool = True  # score(): cut the text at the first EOS marker first
    sort_meta: bool = True  # examples.parquet: meta JSON with sorted keys
    max_new_tokens: int = 128
    sample_size: int | None = None

    def __init__(self, *, max_new_tokens: int | None = None, sample_size: int | None | str = "default"):
        if max_new_tokens is not None:
            if int(max_new_tokens) < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            self.max_new_tokens = int(max_new_tokens)
        if sample_size != "default":
            self.sample_size = None if sample_size is None else int(sample_size)
        self.last_stats: dict[str, Any] = {}

    # -- loading -----------------------------------------------------------------------------------------------------
    def read(self, path: Path, stats: dict[str, int]) -> Iterator[Example]:
        """Every usable example of the file in file order (``example_id`` is reassigned by :meth:`load`). Count
        dropped rows in ``stats`` (e.g. ``stats["filtered_yes_no"] += 1``); raise :class:`TaskInputError` on bad
        input. A file task implements it."""
        raise NotImplementedError(f"task {self.name!r} is drawn from the corpus, not read from a file")

    def draw(self, corpus, *, n_examples: int, seed: int, **options) -> tuple[list[Example], dict[str, Any]]:
        """A corpus task's examples and counts, drawn from ``corpus`` (:class:`tasks.corpus.Corpus`: passage batches,
        rows by ``doc_id``, the LM's tokenizer). ``options``: LoadTask's ``prefix_tokens``/``target_tokens`` and the
        task's own. A corpus task implements it."""
        raise NotImplementedError(f"task {self.name!r} is read from a file, not drawn from the corpus")

    def load(self, path: str | Path, limit: int | None = None, seed: int = 0) -> list[Example]:
        """Read ``path``, draw the paper's seeded subsample (``sample_size``), then at most ``limit`` examples (a seeded
        uniform subset of that, kept in file order); ``example_id`` = 0..N-1. Counts go to ``self.last_stats``."""
        examples, self.last_stats = self.load_with_stats(path, limit=limit, seed=seed)
        return examples

    def load_with_stats(self, path: str | Path, limit: int | None = None, seed: int = 0
                        ) -> tuple[list[Example], dict[str, Any]]:
        """:meth:`load` plus its counts: ``available`` (after filters), ``loaded``, and each loader's drop reasons."""
        if limit is not None and int(limit) < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        stats: dict[str, Any] = {}
        rows = list(self.read(Path(path), stats))
        k = len(rows)
        if self.sample_size is not None:
            k = min(k, self.sample_size)
        if limit is not None:
            k = min(k, int(limit))
        keep = seeded_subset(len(rows), k, seed)
        out = []
        for new_id, i in enumerate(keep):
            ex = rows[i]
            ex.example_id = new_id
            ex.task = self.name
            out.append(ex)
        stats.update(available=len(rows), loaded=len(out), seed=int(seed))
        return out, stats

    # -- scoring -----------------------------------------------------------------------------------------------------
    def score(self, generation_text: str, example: Example) -> dict[str, Any]:
        """Metrics of one generation (the generated continuation/answer only, not the prompt or prefix).

        The text is cut at the first end-of-sequence marker first (bug B9 of the released code scored text after
        ``</s>``); the decoders already stop at EOS, so this is a guard for generations from elsewhere.
        """
        return self.score_text(truncate_at_eos(generation_text) if self.cut_at_eos else generation_text, example)

    @abstractmethod
    def score_text(self, text: str, example: Example) -> dict[str, Any]:
        """Metrics of an EOS-free generation; keys = ``self.metrics`` (plus optional extras)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_new_tokens={self.max_new_tokens})"


class QATask(Task):
    """Short-answer QA scored by answer-level recall (ALR) over all gold aliases (and the released code's first-alias
    variant, for comparison; bug B2)."""

    kind = "qa"
    metrics = ("alr", "alr_first_only")
    max_new_tokens = 128  # paper; the released code generates 256 (B12): pass max_new_tokens=256 to match it

    def score_text(self, text: str, example: Example) -> dict[str, Any]:

        return {"alr": 100.0 * alr(text, example.references),
                "alr_first_only": 100.0 * alr_first_only(text, example.references)}


def qa_example(task: str, question: str, answers: list[str], **meta: Any) -> Example:
    """A ``qa`` example: the question is both shown to the LM and the retrieval query; references = all aliases."""
    question = " ".join(question.split())
    return Example(example_id=-1, task=task, kind="qa", query=question, question=question,
                   references=list(answers), meta=meta)


class CompletionFamily:
    """What every completion task declares (mix in before :class:`Task`): ROUGE-1/2/L against the reference
    continuation, ROUGE-1 as its quality, and an evaluation-mode PPL."""

    kind = "completion"
    family = "completion"
    metrics = ("rouge1", "rouge2", "rougeL")
    quality_metric = "rouge1"
    headline_metrics = ("rouge1", "rouge2", "rougeL")
    report_columns = COMPLETION_COLUMNS
    perplexity = True  # meta["target_ids"]: evaluation-mode PPL

