"""Sharded stages (pipeline/engine/sharding.py): the shard count is a resource, not an identity.

With 1, 3 and 4 shards, PreTokenize, EncodePassages, BuildDenseIndex (an IVF-PQ index string: trained once, added per
range, merged), PreRetrieve (dense mode), Generate and Perplexity (method base, a tiny random Llama) end with the same
keys and byte-identical files, on the micro corpus through the real DAG and Luigi; the IVF stage functions are also
checked alone on random vectors.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from luigi.task_register import Register

from pipeline import dag
from pipeline.engine import config
from pipeline.engine.runlog import RUN_LOG, closure
from pipeline.engine.config import get_store
from pipeline.engine.sharding import artifact_stat, ranges

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_ranges_cover_the_items_in_order_on_block_boundaries():
    assert ranges(0, 10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert ranges(0, 10, 4, block=4) == [(0, 4), (4, 8), (8, 10)]  # only 3 blocks: 3 shards
    assert ranges(5, 12, 2, block=2) == [(5, 9), (9, 12)]
    assert ranges(0, 3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert ranges(0, 0, 4) == [(0, 0)]
    for n, k, b in [(52, 3, 1), (52, 4, 6), (7, 3, 2), (100, 7, 10)]:
        rs = ranges(0, n, k, b)
        assert rs[0][0] == 0 and rs[-1][1] == n and all(r[1] == s[0] for r, s in zip(rs, rs[1:]))
        assert all(a % b == 0 for a, _ in rs) and len(rs) <= k and all(a < e for a, e in rs)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("index_string", ["IVF4,PQ4x4", "IVF8,Flat"])
def test_ivf_train_add_merge_is_the_unsharded_index_byte_for_byte(tmp_path, index_string):
    from stages.retrieval import dense

    emb = tmp_path / "emb"
    emb.mkdir()
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    np.save(emb / "embeddings-00000.npy", x[:200])
    np.save(emb / "embeddings-00001.npy", x[200:])
    (tmp_path / "full").mkdir()
    dense.run_index(tmp_path / "full", embeddings=emb, index_string=index_string, nprobe=2, add_chunk=32)
    (tmp_path / "trained").mkdir()
    dense.run_train(tmp_path / "trained", embeddings=emb, index_string=index_string)
    for k in (1, 3, 4):
        parts = []
        for i, (a, b) in enumerate(ranges(0, 300, k, block=7)):  # boundaries inside add chunks: snapped to them
            parts.append(tmp_path / f"{k}-{i}")
            parts[-1].mkdir()
            dense.run_add_shard(parts[-1], embeddings=emb, trained=tmp_path / "trained", start=a, end=b, add_chunk=32)
        out = tmp_path / f"merged-{k}"
        out.mkdir()
        stats = dense.merge_index(out, shards=parts, trained=tmp_path / "trained", index_string=index_string, nprobe=2)
        assert stats["ntotal"] == 300 and stats["merged_shards"] == k
        assert _digests(out) == _digests(tmp_path / "full")
    with pytest.raises(ValueError, match="starts at row"):  # a missing range is refused, not merged into a hole
        dense.merge_index(tmp_path / "bad", shards=parts[1:], trained=tmp_path / "trained",
                          index_string=index_string)
    assert dense.shardable_index("IVF65536,PQ256") and not dense.shardable_index("Flat")
    assert not dense.shardable_index("IDMap,Flat") and not dense.shardable_index("HNSW32")


# ---- the real DAG, through Luigi ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm_source(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A random 2-layer Llama over the tiny byte-level BPE tokenizer, as an HF folder (PrepareLM's source)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_lm")
    for f in Path(tiny_tokenizer_dir).iterdir():
        shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0,
                      bos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


SHARDED = ("PreTokenize", "EncodePassages", "BuildDenseIndex", "PreRetrieve", "Generate", "Perplexity")


@pytest.fixture
def micro_dag(tmp_path, monkeypatch, tiny_lm_source):
    from stages.retrieval import dense

    monkeypatch.setenv("NEST_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("NEST_REMOTE", raising=False)
    # small encoder chunks and FAISS add chunks, so that shard boundaries cut through the corpus's chunks (they snap)
    monkeypatch.setattr(dense, "ENCODE_CHUNK_ROWS", 6)
    monkeypatch.setattr(dense, "INDEX_ADD_CHUNK", 10)
    # every timing a run measures is 0: the only bytes that differ between any two runs (shards or not)
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
    overrides = {
        "ConvertCorpus": {"source": str(FIXTURES / "pipeline" / "micro_atlas.jsonl"), "fmt": "atlas",
                          "shard_rows": "20", "row_group_size": "8"},
        "PrepareLM": {"source": str(tiny_lm_source)},
        "LoadTask": {"n_examples": "7", "prefix_tokens": "8", "target_tokens": "8"},
        "BuildDenseIndex": {"index_string": "IVF2,PQ8x4", "nprobe": "2"},
        # dense retrieval alone (no JVM); query batches of 2 examples: shard boundaries on even example ids
        "PreRetrieve": {"mode": "dense", "batch_size": "2", "b": "5"},
        "decoding": {"lengths": json.dumps({"completion": 3, "qa": 3})},
    }
    cfg = config.config()
    touched = {(s, o) for s, opts in overrides.items() for o in opts} | {(st, "shards") for st in SHARDED}
    saved = {(s, o): (cfg.get(s, o) if cfg.has_option(s, o) else None) for s, o in touched}
    config.apply_overrides(overrides)

    def set_shards(k: int) -> None:
        config.apply_overrides({st: {"shards": str(k)} for st in SHARDED})
        Register.clear_instance_cache()  # new task instances: shard plans are fixed per instance
        RUN_LOG.reset()

    yield set_shards
    for (s, o), value in saved.items():
        if value is None:
            cfg.remove_option(s, o)
        else:
            cfg.set(s, o, value)
    Register.clear_instance_cache()
    RUN_LOG.reset()


def _roots():
    return [dag.PreTokenize(), dag.BuildDenseIndex(), dag.PreRetrieve(task="completion"),
            dag.Generate(task="completion", method="base"), dag.Perplexity(task="completion", method="base")]


def _merged(roots) -> dict[str, tuple[str, dict]]:
    """{stage: (key, {file: sha256})} of the sharded stages' merged (or whole) artifacts."""
    store = get_store()
    out = {}
    for t in roots + [dag.EncodePassages()]:
        m = store.manifest(t.stage, t.key)
        assert m is not None, f"{t.label} was not built"
        out[t.stage] = (t.key, {f: v["sha256"] for f, v in m["files"].items()}, m["stats"])
    return out


def test_sharded_stages_keep_the_unsharded_keys_and_files(micro_dag):
    from pipeline.cli import build

    store_keys = {}
    micro_dag(1)
    assert build(_roots(), profile=None, command=["test"], quiet=True) == 0
    whole = _merged(_roots())
    assert {s: st.get("merged_shards") for s, (_, _, st) in whole.items()} == dict.fromkeys(SHARDED)
    assert not any(isinstance(t, (dag.TrainDenseIndex, dag.AddDenseShard)) for t in closure(_roots()))
    store = get_store()
    for k in (3, 4):
        micro_dag(k)
        roots = _roots()
        # the count is no identity: the merged tasks have the unsharded keys before anything is built
        assert {t.stage: t.key for t in roots} == {t.stage: whole[t.stage][0] for t in roots}
        for stage, (key, _, _) in whole.items():  # rebuild the merged artifacts (their inputs stay cached)
            store.remove(stage, key)
        Register.clear_instance_cache()
        RUN_LOG.reset()
        assert build(_roots(), profile=None, command=["test"], quiet=True) == 0
        merged = _merged(_roots())
        for stage in SHARDED:
            assert merged[stage][0] == whole[stage][0]
            assert merged[stage][1] == whole[stage][1], f"{stage} with {k} shards: files differ"
            assert merged[stage][2]["merged_shards"] == k, stage
        record = json.loads((store.runs_dir / "latest.json").read_text())
        labels = {r["label"]: r["status"] for r in record["reached"]}
        n_ex = artifact_stat(dag.LoadTask(task="completion"), "num_examples")
        for a, b in ranges(0, n_ex, k):
            assert labels[f"Generate(task=completion, method=base, start={a}, end={b})"] == "built"
            assert labels[f"Perplexity(task=completion, method=base, start={a}, end={b})"] == "built"
        for a, b in ranges(0, n_ex, k, block=2):  # 3 shards: 0-4, 4-6, 6-7; 4 shards reuse the last two
            assert labels[f"PreRetrieve(task=completion, start={a}, end={b})"] == (
                "cached" if k == 4 and a >= 4 else "built")
        for a, b in ranges(0, 52, k):
            assert labels[f"PreTokenize(start={a}, end={b})"] == "built"
            assert labels[f"EncodePassages(start={a}, end={b})"] == "built"
            assert labels[f"AddDenseShard(start={a}, end={b})"] == "built"
        assert labels["PreTokenize"] == "built" and labels["BuildDenseIndex"] == "built"
        # the trained index does not depend on the count: trained once, reused by the 4-shard build
        assert labels["TrainDenseIndex"] == ("built" if k == 3 else "cached")
        # distributed mode pulls what a merge reads: its shards (and the trained index), not the LM or the passages
        gen, index = dag.Generate(task="completion", method="base"), dag.BuildDenseIndex()
        assert set(gen.run_inputs()) == {f"shard-{i:05d}" for i in range(len(ranges(0, n_ex, k)))}
        assert set(index.run_inputs()) == {"trained"} | {f"shard-{i:05d}" for i in range(len(ranges(0, 52, k)))}
        from pipeline.status import dag_status

        rows = dag_status(_roots(), store)  # `nest status`: every shard listed, with its range, and cached
        assert {r.state for r in rows} == {"cached"}
        assert {r.task.label for r in rows} >= {f"PreTokenize(start={a}, end={b})" for a, b in ranges(0, 52, k)}
        store_keys[k] = {m["key"] for m in store.manifests("PreTokenize")}
        n_shards = 3 * len(ranges(0, 52, k)) + 2 * len(ranges(0, n_ex, k)) + len(ranges(0, n_ex, k, block=2))
        assert sum(r.get("shard", False) for r in record["reached"]) == n_shards + 1  # and the trained index
        from pipeline.storage.catalog import open_catalog

        cat = open_catalog(store)
        con = cat.con
        assert cat.views["generations"] == 1 and cat.views["tokens"] == 1
        # the views read the merged artifacts, not their shards too
        assert con.execute("SELECT count(*) FROM generations").fetchone()[0] == n_ex
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == 52
        assert con.execute("SELECT count(DISTINCT example_id) FROM retrievals").fetchone()[0] == n_ex
        assert con.execute("SELECT count(*) FROM retrievals").fetchone()[0] == 5 * n_ex
    assert len(store_keys[4] - store_keys[3]) == 4  # each count has its own shard artifacts, one merged artifact


def test_a_cold_run_builds_the_size_source_first_and_plain_luigi_builds_one_task(micro_dag):
    """``nest``'s build: ConvertCorpus first (its manifest gives the number of passages), then PreTokenize in 3 shards.
    Plain Luigi on a cold store cannot know the size when it plans: one task, with the same key."""
    import luigi

    from pipeline.cli import build

    micro_dag(3)
    key = dag.PreTokenize().key
    assert key == dag.PreTokenize(shards=1).key
    assert dag.PreTokenize().build_requires() == {}  # ConvertCorpus not built: no plan (fixed for this instance)
    assert luigi.build([dag.PreTokenize()], local_scheduler=True, workers=1, log_level="WARNING")
    one = get_store().manifest("PreTokenize", key)
    assert "merged_shards" not in one["stats"]
    get_store().remove("PreTokenize", key)
    micro_dag(3)  # fresh instances: now the size is known
    assert [t.label for t in dag.PreTokenize().build_requires().values()] == [
        f"PreTokenize(start={a}, end={b})" for a, b in ranges(0, 52, 3)]
    for stage in ("PreTokenize", "ConvertCorpus"):
        for m in list(get_store().manifests(stage)):
            get_store().remove(stage, m["key"])
    micro_dag(3)
    assert build([dag.PreTokenize()], profile=None, command=["test"], quiet=True) == 0
    merged = get_store().manifest("PreTokenize", key)
    assert merged["stats"]["merged_shards"] == 3
    assert {f: v["sha256"] for f, v in merged["files"].items()} == {f: v["sha256"] for f, v in one["files"].items()}


def test_two_local_workers_share_one_sharded_stage(micro_dag):
    """``--workers 2``: the shards of one stage run in Luigi's two worker processes; the merge is the unsharded
    artifact."""
    from pipeline.cli import build

    micro_dag(1)
    assert build([dag.PreTokenize()], profile=None, command=["test"], quiet=True) == 0
    key = dag.PreTokenize().key
    whole = {f: v["sha256"] for f, v in get_store().manifest("PreTokenize", key)["files"].items()}
    get_store().remove("PreTokenize", key)
    micro_dag(4)
    assert build([dag.PreTokenize()], profile=None, command=["test"], quiet=True, workers=2) == 0
    merged = get_store().manifest("PreTokenize", key)
    assert merged["stats"]["merged_shards"] == 4
    assert {f: v["sha256"] for f, v in merged["files"].items()} == whole
    record = json.loads((get_store().runs_dir / "latest.json").read_text())
    built = [r["label"] for r in record["reached"] if r["status"] == "built"]
    assert sorted(built) == sorted(["PreTokenize"] + [f"PreTokenize(start={a}, end={b})" for a, b in ranges(0, 52, 4)])
