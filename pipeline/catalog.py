"""DuckDB over the store: ``artifacts`` (every manifest) and views over the Parquet files of the latest run's artifacts.

A data view is one line of :data:`VIEWS`: its name, the stage whose artifacts it reads, the file glob inside an artifact
folder, and the SELECT over one artifact (placeholders: ``{files}`` that artifact's files, ``{passages}`` the passage
files of the corpus it descends from, each a relation; ``{task}`` the evaluation task it belongs to, as an SQL
literal). The view is the UNION ALL of that SELECT over every artifact of the stage in the latest run that reached the
stage.

**Read-only by construction.** The Parquet files are handed to DuckDB as Arrow datasets (read lazily by pyarrow, with
column and filter push-down), registered before the connection is locked: DuckDB itself then needs no file access at
all, so external access is switched off with no directory allowed and the configuration locked. Nothing a query
says (``COPY … TO``, ``EXPLAIN ANALYZE COPY``, ``read_text``, ``ATTACH``) can read or write a file, inside the store or
out of it.

``task`` filter: several evaluation tasks give several artifacts whose ``example_id`` both start at 0. Unless told
otherwise (``task="all"``), the task-bearing views show one task: the first configured task present in the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.runs import latest_run, load_runs, walk_upstream
from pipeline.store import Store


@dataclass(frozen=True)
class View:
    name: str
    stage: str
    glob: str
    select: str = "SELECT * FROM {files}"
    per_task: bool = False
    named: tuple[str, ...] = ()  # ``{others}``: every other column of the artifact's file, as ``r."col", ``


VIEWS: list[View] = [
    View("passages", "ConvertCorpus", "passages-*.parquet"),
    View("tokens", "PreTokenize", "tokens-*.parquet",
         "SELECT doc_id, len(token_ids) AS n_tokens, token_ids FROM {files}"),
    # ``references`` is a reserved word in DuckDB: the view calls the column ``refs``
    View("examples", "LoadTask", "examples.parquet",
         'SELECT * RENAME ("references" AS refs) FROM {files}', per_task=True),
    # one raw-score column per retriever, named after it (bm25, dense, ...: ``{others}``), between fused and text
    View("retrievals", "PreRetrieve", "retrievals.parquet",
         "SELECT {task} AS task, r.example_id, r.rank, r.doc_id, p.title, r.fused, {others}p.text "
         "FROM {files} r LEFT JOIN {passages} p USING (doc_id)", per_task=True,
         named=("example_id", "rank", "doc_id", "fused", "search_s")),
    # one row per (task, method, example); ``source_doc_ids``/``source_positions`` per token, -1 = not from the corpus.
    # Every decoding config of the grid has its own Generate artifact: ``config`` tells them apart.
    View("generations", "Generate", "generations.parquet"),
    # per-example metrics, long format (task, method, variant, metric, value) and the aggregates the report shows
    View("scores", "Score", "scores.parquet"),
    View("summary", "Score", "summary.parquet"),
]


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _others(path: Path, named: tuple[str, ...]) -> str:
    """``r."a", r."b", `` for the columns of a Parquet file not in ``named`` (empty without ``named``)."""
    if not named:
        return ""
    import pyarrow.parquet as pq

    cols = [c for c in pq.read_schema(path).names if c not in named]
    return "".join(f'r."{c.replace(chr(34), chr(34) * 2)}", ' for c in cols)


class _Relations:
    """Parquet files registered on the connection as Arrow datasets, one relation name per distinct list of files."""

    def __init__(self, con):
        self.con, self.names = con, {}

    def __call__(self, paths: Iterable[Path]) -> str:
        import pyarrow.dataset as ds

        paths = tuple(str(p) for p in paths)
        name = self.names.get(paths)
        if name is None:
            name = self.names[paths] = f"_nest_files_{len(self.names)}"
            self.con.register(name, ds.dataset(list(paths), format="parquet"))
        return name


def _upstream(store: Store, stage: str, key: str, want: str) -> tuple[str, dict] | None:
    """The nearest artifact of stage ``want`` that ``(stage, key)`` was built from (itself included)."""
    return next(((ref[1], m) for ref, m in walk_upstream(store, [(stage, key)]) if m is not None and ref[0] == want),
                None)


def _task_of(store: Store, stage: str, key: str) -> str:
    found = _upstream(store, stage, key, "LoadTask")
    return str(found[1]["params"].get("task", "")) if found else ""


def _latest_per_stage(store: Store, stages: set[str]) -> list[tuple[str, str]]:
    """For each stage, the complete artifacts of the most recent run that reached any (``nest run OneStage`` does not
    hide the outputs of the last full run)."""
    out: list[tuple[str, str]] = []
    runs = load_runs(store)
    latest = latest_run(store)
    if latest and all(latest.get("id") != r.get("id") for r in runs):
        runs.append(latest)
    for stage in sorted(stages):
        for run in reversed(runs):
            refs = [(r["stage"], r["key"]) for r in run.get("reached", [])  # a merge's shards: in the merged artifact
                    if r["stage"] == stage and not r.get("shard") and store.complete(r["stage"], r["key"])]
            if refs:
                out.extend(dict.fromkeys(refs))
                break
    return out


def _artifacts_table(store: Store, latest: set[tuple[str, str]]):
    import pyarrow as pa

    rows = {k: [] for k in ("stage", "key", "stage_version", "params", "inputs", "created_at", "size", "n_files",
                            "build_s", "in_latest_run", "path")}
    for m in store.manifests():
        rows["stage"].append(m["stage"])
        rows["key"].append(m["key"])
        rows["stage_version"].append(str(m.get("stage_version")))
        rows["params"].append(json.dumps(m.get("params", {}), sort_keys=True, ensure_ascii=False))
        rows["inputs"].append(json.dumps({n: i["key"] for n, i in m.get("inputs", {}).items()}, sort_keys=True))
        rows["created_at"].append(m.get("created_at"))
        rows["size"].append(int(m.get("size", 0)))
        rows["n_files"].append(len(m.get("files", {})))
        rows["build_s"].append(float(m.get("timings", {}).get("build_s") or 0.0))
        rows["in_latest_run"].append((m["stage"], m["key"]) in latest)
        rows["path"].append(str(store.path(m["stage"], m["key"])))
    schema = pa.schema([("stage", pa.string()), ("key", pa.string()), ("stage_version", pa.string()),
                        ("params", pa.string()), ("inputs", pa.string()), ("created_at", pa.string()),
                        ("size", pa.int64()), ("n_files", pa.int64()), ("build_s", pa.float64()),
                        ("in_latest_run", pa.bool_()), ("path", pa.string())])
    return pa.table(rows, schema=schema)


@dataclass
class Catalog:
    con: object             # duckdb.DuckDBPyConnection
    views: dict[str, int]   # view name -> number of artifacts behind it
    task: str | None        # the task the per-task views show (None: all)
    tasks: list[str]        # every task present in the latest run


def lock_down(con, store: Store) -> None:
    """After the views exist: no file access at all, not even inside the store (the views read Arrow datasets, not
    files: ``COPY … TO``, ``EXPLAIN ANALYZE COPY``, ``ATTACH``, ``INSTALL``, ``read_csv``/``read_text`` are refused), and
    a locked configuration so that a query cannot switch it back on. ``store`` is kept for callers' sake."""
    del store
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def open_catalog(store: Store, task: str | None = None, preferred_tasks: Iterable[str] = (),
                 locked: bool = True) -> Catalog:
    """An in-memory DuckDB connection with the views, then locked down (:func:`lock_down`). ``task``: ``None`` picks the
    first of ``preferred_tasks`` present (else the first present), ``"all"`` shows every task."""
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    run = latest_run(store) or {}
    latest = {(r["stage"], r["key"]) for r in run.get("reached", []) if store.complete(r["stage"], r["key"])}
    con.register("_nest_artifacts", _artifacts_table(store, latest))
    reached = _latest_per_stage(store, {v.stage for v in VIEWS} | {"LoadTask"})
    con.execute("CREATE VIEW artifacts AS SELECT * REPLACE (CAST(created_at AS TIMESTAMP) AS created_at) "
                "FROM _nest_artifacts")

    tasks_present: list[str] = []
    per_task_stages = {v.stage for v in VIEWS if v.per_task}
    for stage, key in reached:
        if stage in per_task_stages:
            t = _task_of(store, stage, key)
            if t not in tasks_present:
                tasks_present.append(t)
    if task is None:
        preferred = [t for t in preferred_tasks if t in tasks_present]
        task = preferred[0] if preferred else (tasks_present[0] if tasks_present else None)
    elif task == "all":
        task = None

    counts: dict[str, int] = {"artifacts": -1}
    relation = _Relations(con)
    for view in VIEWS:
        parts = []
        for stage, key in reached:
            if stage != view.stage:
                continue
            this_task = _task_of(store, stage, key)
            if view.per_task and task is not None and this_task != task:
                continue
            folder = store.path(stage, key)
            files = sorted(folder.glob(view.glob))
            if not files:
                continue
            corpus = _upstream(store, stage, key, "ConvertCorpus")
            passages = sorted(store.path("ConvertCorpus", corpus[0]).glob("passages-*.parquet")) if corpus else []
            if "{passages}" in view.select and not passages:
                continue
            parts.append(view.select.format(files=relation(files), passages=relation(passages) if passages else "",
                                            task=_sql_str(this_task), others=_others(files[0], view.named)))
        if parts:
            con.execute(f"CREATE VIEW {view.name} AS " + " UNION ALL BY NAME ".join(f"({p})" for p in parts))
            counts[view.name] = len(parts)
    if locked:
        lock_down(con, store)
    return Catalog(con, counts, task, tasks_present)


# characters a terminal acts on: C0 and C1 controls, DEL, and the Unicode bidirectional overrides that reorder what is
# shown (e.g. U+202E). Corpus text reaches the table as it is, so each is printed as an escape, never sent raw.
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def safe_text(s: str) -> str:
    """``s`` with newlines and tabs as spaces and every other control character as ``\\xNN`` / ``\\uNNNN``."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in "\n\t":
            out.append(" ")
        elif o < 0x20 or 0x7F <= o <= 0x9F:
            out.append(f"\\x{o:02x}")
        elif o in _BIDI:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    """A plain text table (no box drawing: easy to paste and to diff); control characters escaped (:func:`safe_text`)."""
    def cell(v) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            return f"{v:.4g}"
        s = safe_text(str(v))
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    columns = [safe_text(str(c)) for c in columns]
    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in body:
        cells = (v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
