"""``nest show``, ``nest gc``, ``nest query``: the store from the command line (an artifact's manifest, removing what
no recorded run reaches, DuckDB over the manifests and the latest run's Parquet files)."""

from __future__ import annotations

import json
import re
import sys

from pipeline import dag
from pipeline.engine.config import get_store
from pipeline.engine.errors import CliError
from pipeline.storage.catalog import format_table, open_catalog, safe_text
from pipeline.storage.runs import apply_gc, human_bytes, plan_gc


def add_parsers(sub) -> None:
    p = sub.add_parser("show", help="an artifact's manifest")
    p.add_argument("key", help="a key or a unique prefix of one")
    p.add_argument("--verify", action="store_true", help="check every file's size and sha256 against the manifest")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("gc", help="remove artifacts no recorded run reaches (dry run unless --yes)")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="keep what the latest N runs reached (default: all)")
    p.add_argument("--yes", action="store_true", help="really remove")
    p.set_defaults(fn=cmd_gc)

    p = sub.add_parser("query", help="SQL (DuckDB) over manifests and the latest run's outputs")
    p.add_argument("sql")
    p.add_argument("--task", default=None, help="task shown by examples/retrievals (default: the first configured; all)")
    p.add_argument("--max-rows", type=int, default=100)
    p.set_defaults(fn=cmd_query)


def cmd_show(args) -> int:
    store = get_store()
    refs = store.find(args.key)
    if not refs:
        bad = [d for d in store.damaged() if d[1].startswith(args.key.lower())]
        if bad:
            stage, key, why = bad[0]
            raise CliError(f"show: {stage}/{key[:16]}: {why}: not complete (a build of it moves it aside and rebuilds)")
        raise CliError(f"show: no complete artifact with a key starting {args.key!r} in {store.root}")
    if len(refs) > 1:
        listing = ", ".join(f"{r.stage}/{r.key[:16]}" for r in refs[:10])
        raise CliError(f"show: {len(refs)} artifacts match {args.key!r} ({listing}); give more of the key")
    ref = refs[0]
    m = store.manifest(ref.stage, ref.key)
    if args.json:
        print(json.dumps(m, indent=1, sort_keys=True))
    else:
        timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
        print(f"stage      {m['stage']} (version {m.get('stage_version')})")
        print(f"key        {m['key']}")
        print(f"path       {ref.path}")
        print(f"created    {m.get('created_at')}  (built in {timings.get('build_s')} s)")
        print(f"size       {human_bytes(m.get('size', 0))} in {len(m['files'])} files")
        print(f"params     {json.dumps(m.get('params'), sort_keys=True, ensure_ascii=False)}")
        for name, i in sorted(m.get("inputs", {}).items()):
            print(f"input      {name}: {i['stage']}/{i['key']}")
        print(f"stats      {json.dumps(m.get('stats', {}), sort_keys=True, ensure_ascii=False)}")
        print(f"tools      {' '.join(f'{k}={v}' for k, v in sorted(m.get('tools', {}).items()))}")
    if args.verify:
        problems = store.verify(ref.stage, ref.key)
        if problems:
            for p in problems:
                print(f"verify: {p}", file=sys.stderr)
            return 1
        print(f"verify     ok ({len(m['files'])} files match the manifest)")
    return 0


def cmd_gc(args) -> int:
    store = get_store()
    try:
        plan = plan_gc(store, args.keep)
    except RuntimeError as e:
        raise CliError(f"gc: {e}") from None
    for stage, key, path, size in plan.remove:
        kind = "" if path.name == key else " (crash leftover)"
        print(f"{'remove' if args.yes else 'would remove'}  {stage}/{key[:16]}{kind}  {human_bytes(size)}")
    verb = "removed" if args.yes else "would free"
    print(f"{len(plan.remove)} unreached ({verb} {human_bytes(plan.bytes)}); keeping {len(plan.keep)} artifacts "
          f"reached by {plan.kept_runs} recorded run(s)" + ("" if args.yes or not plan.remove else "; --yes removes them"))
    if args.yes:
        apply_gc(store, plan)
    return 0


def cmd_query(args) -> int:
    cat = open_catalog(get_store(), task=args.task, preferred_tasks=list(dag.nest().tasks))
    if cat.task is not None and len(cat.tasks) > 1:
        print(f"(views examples, retrievals show task {cat.task!r}; --task all or --task NAME for others: "
              f"{', '.join(cat.tasks)})", file=sys.stderr)
    _read_only_sql(args.sql)
    try:
        cur = cat.con.execute(args.sql)
        if cur.description is None:  # not a query
            return 0
        columns = [d[0] for d in cur.description]
        rows = cur.fetchmany(args.max_rows + 1)
    except Exception as e:  # duckdb errors: one line, with the views that exist and the columns of those it names
        views = ", ".join(sorted(cat.views))
        columns = "".join(f"; columns of {v}: {', '.join(cols)}" for v, cols in _named_view_columns(cat, args.sql))
        raise CliError(safe_text(f"query: {str(e).splitlines()[0]} (views: {views}{columns})")) from None
    print(format_table(columns, rows[: args.max_rows]))
    if len(rows) > args.max_rows:
        print(f"... (first {args.max_rows} rows; --max-rows N for more)")
    return 0


def _named_view_columns(cat, sql: str) -> list[tuple[str, list[str]]]:
    """``(view, its column names)`` for each view the query names: a query that names a missing column, or a reserved
    word such as ``references`` (the examples view calls it ``refs``), is told which columns exist."""

    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    out = []
    for view in sorted(cat.views):
        if view.lower() not in words:
            continue
        try:
            out.append((view, [str(r[0]) for r in cat.con.execute(f'DESCRIBE "{view}"').fetchall()]))
        except Exception:  # a view that cannot be described adds nothing to the message
            continue
    return out


def _read_only_sql(sql: str) -> None:
    """Refuse, in one line, anything but queries (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN): ``nest query`` reads the
    store, it never writes into it (``COPY … TO`` a file inside the store would pass DuckDB's directory allowance)."""
    import duckdb  # lazy: start-up time

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # a syntax error: DuckDB's own message comes from execute
    allowed = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
    for st in statements:
        if st.type not in allowed:
            raise CliError(f"query: read-only: {st.type.name} statements are refused (SELECT, DESCRIBE, SHOW, "
                           f"SUMMARIZE and EXPLAIN are allowed)")
        if st.type == duckdb.StatementType.EXPLAIN and _explained_type(st.query) != duckdb.StatementType.SELECT:
            # EXPLAIN ANALYZE runs its statement: EXPLAIN ANALYZE COPY … TO would write (the catalog also allows
            # no file access at all; this says why in one line)
            raise CliError("query: read-only: EXPLAIN is allowed of a query only (SELECT, DESCRIBE, SHOW, SUMMARIZE)")


def _explained_type(sql: str):
    """The statement type that an ``EXPLAIN [ANALYZE | (options)]`` statement explains; None when it cannot be told
    (then the statement is refused)."""
    import duckdb  # lazy: start-up time

    m = re.match(r"\s*EXPLAIN\s+(?:ANALYZE\s+|\([^()]*\)\s*)?", sql, flags=re.IGNORECASE)
    if not m:
        return None
    try:
        inner = duckdb.extract_statements(sql[m.end():])
    except duckdb.Error:
        return None
    return inner[0].type if len(inner) == 1 else None
