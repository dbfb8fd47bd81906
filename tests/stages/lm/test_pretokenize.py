"""PreTokenize and TokenLookup on the micro corpus (tiny BPE tokenizer; one check with the real LM tokenizer)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.lm import pretokenize
from stages.lm.load import load_tokenizer
from stages.corpus.passages import PassageReader
from stages.lm.pretokenize import TokenLookup, fill_template, template_fields, token_list_array


def test_template_fields():
    assert template_fields("{title}. {text}") == [("", "title"), (". ", "text")]
    assert template_fields("Title: {title}\n{text}!") == [("Title: ", "title"), ("\n", "text"), ("!", None)]
    for bad in ("{title:>10}", "{text!r}", "{0}"):
        with pytest.raises(ValueError):
            template_fields(bad)


def test_fill_template_is_str_format():
    batch = pa.record_batch({"title": ["A", "B é"], "text": ["x y", ""], "doc_id": [0, 1]})
    for template in ("{title}. {text}", "{text}", "[{title}]", "no fields"):
        assert fill_template(batch, template) == [template.format(title=t, text=x) for t, x in
                                                  [("A", "x y"), ("B é", "")]]


def test_token_list_array():
    arr = token_list_array([[1, 2, 3], [], [7]])
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == [[1, 2, 3], [], [7]]


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, micro_passages_dir, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("tokens")
    stats = pretokenize.run(out, passages=micro_passages_dir, lm=tiny_tokenizer_dir)
    assert stats["num_passages"] == 60
    return out


def expected_ids(passages_dir, lm_dir, template="{title}. {text}"):
    tok = load_tokenizer(lm_dir)
    rows = PassageReader(passages_dir).get(range(60))
    return tok([template.format(**r) for r in rows], add_special_tokens=False)["input_ids"]


def test_tokens_equal_the_plain_tokenizer_call(tokens_dir, micro_passages_dir, tiny_tokenizer_dir):
    table = pq.read_table(sorted(tokens_dir.glob("tokens-*.parquet")))
    assert table.column("doc_id").to_pylist() == list(range(60))
    assert table.column("token_ids").to_pylist() == expected_ids(micro_passages_dir, tiny_tokenizer_dir)
    assert [(f.name, str(f.type)) for f in table.schema] == [("doc_id", "int64"), ("token_ids", "list<element: int32>")]


def test_same_sharding_as_the_passages(tokens_dir, micro_passages_dir):
    def layout(folder, prefix):
        files = sorted(folder.glob(f"{prefix}-*.parquet"))
        return [(f.name.split("-")[1], [pq.ParquetFile(f).metadata.row_group(i).num_rows
                                        for i in range(pq.ParquetFile(f).metadata.num_row_groups)]) for f in files]

    assert layout(tokens_dir, "tokens") == layout(micro_passages_dir, "passages")
    info = json.loads((tokens_dir / "tokens.json").read_text())
    assert info["num_rows"] == 60 and info["shard_rows"] == 25 and info["template"] == "{title}. {text}"
    assert pq.ParquetFile(tokens_dir / "tokens-00000.parquet").metadata.row_group(0).column(1).compression == "ZSTD"


def test_token_lookup_reads_only_needed_row_groups(tokens_dir, micro_passages_dir, tiny_tokenizer_dir):
    expected = expected_ids(micro_passages_dir, tiny_tokenizer_dir)
    lookup = TokenLookup(tokens_dir)
    assert len(lookup) == 60
    assert lookup.get([42]) == [expected[42]]
    assert lookup.row_groups_read == 1
    got = lookup.get([59, 0, 42, 24, 25])
    assert got == [expected[i] for i in (59, 0, 42, 24, 25)]
    assert lookup.row_groups_read == 5  # 42 was cached; 59, 0, 24, 25 each in another row group
    with pytest.raises(IndexError):
        lookup.get([60])


def test_other_template(tmp_path, micro_passages_dir, tiny_tokenizer_dir):
    pretokenize.run(tmp_path, passages=micro_passages_dir, lm=tiny_tokenizer_dir, template="{text}")
    assert TokenLookup(tmp_path).get([3]) == [expected_ids(micro_passages_dir, tiny_tokenizer_dir, "{text}")[3]]
    with pytest.raises(ValueError, match="lack"):
        pretokenize.run(tmp_path, passages=micro_passages_dir, lm=tiny_tokenizer_dir, template="{nope}")


def test_real_tokenizer_matches_raw_call(tmp_path, micro_passages_dir, real_lm_dir):
    pretokenize.run(tmp_path, passages=micro_passages_dir, lm=real_lm_dir)
    ids = expected_ids(micro_passages_dir, real_lm_dir)
    assert TokenLookup(tmp_path).get(range(60)) == ids
    assert max(max(x) for x in ids) > 400  # really the 49k-vocabulary tokenizer
