"""``nest query`` writes nothing and drives no terminal: EXPLAIN ANALYZE COPY, COPY … TO inside the
store and over ``runs/latest.json`` are refused in one line; corpus control characters are printed escaped."""

from __future__ import annotations

import os

import pytest

from pipeline import cli
from pipeline.storage.catalog import format_table, safe_text
from test_config_checks import query_store  # noqa: F401  (fixture)


def _snapshot(root) -> dict:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


@pytest.mark.parametrize("sql", [
    "EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{artifact}/examples.parquet'",
    "EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{store}/runs/latest.json' (FORMAT json)",
    "EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{store}/pwn_explain.csv'",
    "explain   analyze\nCOPY (SELECT 42 AS x) TO '{store}/pwn2.csv'",
    "EXPLAIN (ANALYZE) COPY (SELECT 42 AS x) TO '{store}/pwn3.csv'",
    "EXPLAIN /* c */ ANALYZE COPY (SELECT 42 AS x) TO '{store}/pwn4.csv'",
    "COPY (SELECT 42 AS x) TO '{store}/runs/latest.json'",
    "COPY (SELECT 42 AS x) TO '{artifact}/examples.parquet'",
    "SELECT * FROM read_text('{store}/runs/latest.json')",
])
def test_query_cannot_write_or_read_files_even_inside_the_store(query_store, capsys, sql):
    before = _snapshot(query_store.root)
    artifact = query_store.path("LoadTask", "e" * 64)
    rc = cli.main(["query", sql.format(store=query_store.root, artifact=artifact)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("nest: query: "), err
    assert _snapshot(query_store.root) == before


def test_explain_of_a_query_and_the_views_still_work(query_store, capsys):
    assert cli.main(["query", "EXPLAIN SELECT refs FROM examples"]) == 0
    assert cli.main(["query", "SELECT count(*) AS n FROM artifacts"]) == 0
    assert cli.main(["query", "SELECT refs FROM examples"]) == 0
    assert "the gold text" in capsys.readouterr().out


def test_control_characters_are_printed_escaped(query_store, capsys):
    evil = "a\rb\x00c\x1b[31md\x9be\u202ef\tg\nh"
    sql = ("SELECT 'a' || chr(13) || 'b' || chr(0) || 'c' || chr(27) || '[31md' || chr(155) || 'e' || chr(8238) "
           "|| 'f' || chr(9) || 'g' || chr(10) || 'h' AS t")
    assert cli.main(["query", sql]) == 0
    out = capsys.readouterr().out
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) <= 0x9F or ord(c) == 0x202E for c in out), repr(out)
    assert "a\\x0db\\x00c\\x1b[31md\\x9be\\u202ef g h" in out
    assert safe_text(evil) == "a\\x0db\\x00c\\x1b[31md\\x9be\\u202ef g h"
    table = format_table(["c\x1b"], [(evil,)])
    assert "\x1b" not in table and "\r" not in table
