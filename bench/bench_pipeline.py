"""Pipeline benchmark: stage throughput as ratios to the raw library calls, BM25 build time, memory flatness.

    python -m bench.run pipeline            # full sizes (minutes; run on a quiet machine)
    python -m bench.run --quick pipeline    # tiny sizes, to check the benchmark itself

Measured in one run, on passages made from the embedded corpus:

1. PreTokenize throughput vs the raw batched fast tokenizer (``tokenizer(texts, add_special_tokens=False)``, batches of
   2,000) on the same ``"{title}. {text}"`` strings. Stage time includes reading passages and writing token shards.
   Target ≥ 0.8.
2. EncodePassages throughput vs sentence-transformers ``encode(texts, batch_size=64, normalize_embeddings=True)`` of
   all-MiniLM-L6-v2 on the same texts. Stage time includes loading the model, reading and writing. Target ≥ 0.9.
3. BuildBM25Index time on the small corpus (10k passages in the full run), JVM start included.
4. Peak RSS of ConvertCorpus and of PreTokenize at the small and at the large size (10k and 1M passages), each run in
   a fresh child process that reports its own peak (``VmHWM``; see :func:`_peak_rss_kib`). The large corpus repeats the embedded passages under new
   ids in an Atlas ``.jsonl.zst`` file. Target: large/small within ±20% (memory flat in the corpus size).

Throughput runs alternate the raw call and the stage and keep the best of ``--repeats`` timings of each (the machine
is shared). The raw baselines time only the library call on texts already in memory; the stage timings include
everything the stage does (loading the tokenizer or model, reading Parquet, writing outputs). Scratch files go to a temporary folder
under ``--cache`` (default ``~/.cache/nest/bench``) and are removed at the end; the prepared LM folder stays cached there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZE_BATCH = 2_000
ENCODE_BATCH = 64


# --- helpers ----------------------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[bench pipeline] {msg}", file=sys.stderr, flush=True)


def _best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn()`` (each call must redo the whole work)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _alternate(raw, stage, repeats: int) -> tuple[float, float]:
    """Best times of ``raw()`` and ``stage()``, run in turns so that a noisy neighbour hurts both alike."""
    t_raw, t_stage = [], []
    for _ in range(repeats):
        t_raw.append(_best(raw, 1))
        t_stage.append(_best(stage, 1))
    return min(t_raw), min(t_stage)


def _fresh(parent: Path, name: str) -> Path:
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ensure_lm(cache: Path) -> Path:
    """PrepareLM on the embedded GGUF, built once into ``cache/lm-<key>/`` (about 20 s) and reused."""
    from stages.lm import prepare as prepare_lm

    source = prepare_lm.embedded_lm_source()
    key = json.dumps({"identity": prepare_lm.source_identity(source), "version": prepare_lm.VERSION}, sort_keys=True)
    final = cache / f"lm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (final / prepare_lm.LM_INFO).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".lm-"))
    try:
        _log("preparing the embedded LM folder (once)")
        prepare_lm.run(tmp, source=source, dtype="float32")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def base_records(scratch: Path) -> list[dict]:
    """The embedded corpus as passages (ConvertCorpus), one Atlas record per passage."""
    import pyarrow.parquet as pq

    from stages.corpus import convert as corpus

    out = _fresh(scratch, "embedded_passages")
    corpus.run(out, source=corpus.embedded_corpus_path())
    records = []
    for shard in sorted(out.glob("passages-*.parquet")):
        for row in pq.read_table(shard, columns=["source_id", "part", "title", "section", "text"]).to_pylist():
            records.append({"id": f"{row['source_id']}#{row['part']}", "title": row["title"],
                            "section": row["section"], "text": row["text"]})
    shutil.rmtree(out)
    return records


def write_atlas(path: Path, records: list[dict], n: int) -> Path:
    """``n`` Atlas records (zstd JSONL), cycling through ``records`` with a copy number in every id.

    Each record is one passage already (≤ max_words words), so ConvertCorpus makes exactly ``n`` passages of it.
    """
    import zstandard

    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
        out = io.TextIOWrapper(zw, encoding="utf-8")
        for i in range(n):
            rec = records[i % len(records)]
            copy = i // len(records)
            out.write(json.dumps({**rec, "id": f"{copy}:{rec['id']}"}, ensure_ascii=False))
            out.write("\n")
        out.flush()
        out.detach()
    return path


def child_peak_rss(stage: str, **kwargs) -> dict:
    """Run one stage in a fresh Python process; return its wall time, peak RSS (MiB) and stats."""
    cmd = [sys.executable, "-m", "bench.bench_pipeline", "--child", stage, json.dumps({k: str(v) for k, v in
                                                                                       kwargs.items()})]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {stage} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(stage: str, kwargs: dict) -> None:
    t0 = time.perf_counter()
    if stage == "convert":
        from stages.corpus import convert as corpus

        stats = corpus.run(Path(kwargs["out"]), source=Path(kwargs["source"]))
    elif stage == "pretokenize":
        from stages.lm import pretokenize

        stats = pretokenize.run(Path(kwargs["out"]), passages=Path(kwargs["passages"]), lm=Path(kwargs["lm"]))
    else:
        raise SystemExit(f"unknown child stage {stage!r}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(_peak_rss_kib() / 1024, 1), "stats": stats}))


def _peak_rss_kib() -> int:
    """This process's peak resident set (KiB).

    ``VmHWM`` from /proc where there is one: ``ru_maxrss`` survives ``exec`` on Linux, so a child started from a big
    parent would report the parent's size (measured: 1,178 MiB for every child after the LM was loaded).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


# --- measurements -----------------------------------------------------------------------------------------------------

def bench_pretokenize(scratch: Path, passages: Path, lm: Path, repeats: int) -> dict:
    import pyarrow.parquet as pq

    from stages.lm import pretokenize
    from stages.lm.load import load_tokenizer

    texts = []
    for shard in sorted(passages.glob("passages-*.parquet")):
        t = pq.read_table(shard, columns=["title", "text"])
        texts += [f"{a}. {b}" for a, b in zip(t.column("title").to_pylist(), t.column("text").to_pylist())]
    tok = load_tokenizer(lm)
    tok(texts[:100], add_special_tokens=False)  # warm-up

    def raw():
        for i in range(0, len(texts), TOKENIZE_BATCH):
            tok(texts[i:i + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]

    def stage():
        pretokenize.run(_fresh(scratch, "tokens_bench"), passages=passages, lm=lm)

    t_raw, t_stage = _alternate(raw, stage, repeats)
    n = len(texts)
    return {"passages": n, "raw_seconds": round(t_raw, 3), "stage_seconds": round(t_stage, 3),
            "raw_per_s": round(n / t_raw, 1), "stage_per_s": round(n / t_stage, 1), "ratio": round(t_raw / t_stage, 3)}


def bench_encode(scratch: Path, passages: Path, repeats: int) -> dict:
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from stages.retrieval import dense

    spec = dense.embedded_encoder()
    texts = []
    for shard in sorted(passages.glob("passages-*.parquet")):
        t = pq.read_table(shard, columns=["title", "text"])
        texts += [spec.passage_template.format(title=a or "", text=b or "").strip()
                  for a, b in zip(t.column("title").to_pylist(), t.column("text").to_pylist())]
    st = SentenceTransformer(spec.query_model, device="cpu")
    st.encode(texts[:ENCODE_BATCH], batch_size=ENCODE_BATCH)  # warm-up (also warms the OS file cache for the stage)

    def raw():
        st.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, show_progress_bar=False)

    def stage():
        dense.run_encode(_fresh(scratch, "emb_bench"), passages=passages, encoder=spec, batch_size=ENCODE_BATCH)

    r, s = _alternate(raw, stage, repeats)
    n = len(texts)
    return {"passages": n, "batch_size": ENCODE_BATCH, "raw_seconds": round(r, 3), "stage_seconds": round(s, 3),
            "raw_per_s": round(n / r, 1), "stage_per_s": round(n / s, 1), "ratio": round(r / s, 3)}


def bench_bm25(scratch: Path, passages: Path, n: int) -> dict:
    from stages.retrieval import bm25

    t0 = time.perf_counter()
    stats = bm25.run(_fresh(scratch, "bm25_bench"), passages=passages)
    seconds = time.perf_counter() - t0
    return {"passages": n, "num_docs": stats["num_docs"], "seconds": round(seconds, 2),
            "per_s": round(n / seconds, 1)}


def _limit_passages(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` passages of ``src`` as a one-shard passages folder (doc_id 0..n-1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, have = [], 0
    for shard in sorted(src.glob("passages-*.parquet")):
        t = pq.read_table(shard)
        tables.append(t.slice(0, n - have))
        have += tables[-1].num_rows
        if have >= n:
            break
    pq.write_table(pa.concat_tables(tables), _fresh(dst.parent, dst.name) / "passages-00000.parquet",
                   compression="zstd")
    return dst


# --- main -------------------------------------------------------------------------------------------------------------

def _markdown(res: dict) -> str:
    p, e, b, m = res["pretokenize"], res["encode"], res["bm25"], res["memory"]
    small, large = res["sizes"]["small"], res["sizes"]["large"]
    ok = lambda x: "yes" if x else "**no**"  # noqa: E731
    lines = [
        f"# Pipeline benchmark{' (quick: tiny sizes, numbers not meaningful)' if res['quick'] else ''}",
        "",
        f"{res['machine']}; {res['date']}. Best of {res['repeats']} for throughputs. Command: `{res['command']}`.",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        f"| PreTokenize vs raw batched fast tokenizer ({p['passages']:,} passages) | {p['ratio']:.2f}× "
        f"({p['stage_per_s']:,.0f} vs {p['raw_per_s']:,.0f} passages/s) | ≥ 0.8× | {ok(p['ratio'] >= 0.8)} |",
        f"| EncodePassages vs sentence-transformers encode, batch 64 ({e['passages']:,} passages) | {e['ratio']:.2f}× "
        f"({e['stage_per_s']:,.0f} vs {e['raw_per_s']:,.0f} passages/s) | ≥ 0.9× | {ok(e['ratio'] >= 0.9)} |",
        f"| BuildBM25Index, {b['passages']:,} passages | {b['seconds']:.1f} s ({b['per_s']:,.0f} passages/s) | – | – |",
    ]
    for stage in ("convert", "pretokenize"):
        s, l = m[stage]["small"], m[stage]["large"]
        name = {"convert": "ConvertCorpus", "pretokenize": "PreTokenize"}[stage]
        ratio = m[stage]["ratio"]
        lines.append(f"| peak RSS {name}: {small:,} → {large:,} passages | {s['peak_rss_mib']:.0f} → "
                     f"{l['peak_rss_mib']:.0f} MiB ({ratio:.2f}×; {s['seconds']:.1f} s → {l['seconds']:.1f} s) "
                     f"| within ±20% | {ok(abs(ratio - 1) <= 0.2)} |")
    lines += ["", "No-op `make all` time: measured separately by the lead (not part of this script)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (1k / 20k passages, 200 encoded)")
    ap.add_argument("--small", type=int, help="passages in the small corpus (default 10,000)")
    ap.add_argument("--large", type=int, help="passages in the large corpus (default 1,000,000)")
    ap.add_argument("--encode-passages", type=int, help="passages encoded for the encode ratio (default 2,000)")
    ap.add_argument("--repeats", type=int, help="timings per throughput (best kept; default 3, quick 1)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("NEST_BENCH_CACHE",
                                                                      Path.home() / ".cache" / "nest" / "bench")))
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], json.loads(args.child[1]))
        return {}
    small = args.small or (1_000 if args.quick else 10_000)
    large = args.large or (20_000 if args.quick else 1_000_000)
    n_encode = args.encode_passages or (200 if args.quick else 2_000)
    repeats = args.repeats or (1 if args.quick else 3)

    args.cache.mkdir(parents=True, exist_ok=True)
    lm = ensure_lm(args.cache)
    scratch = Path(tempfile.mkdtemp(dir=args.cache, prefix="run-"))
    try:
        records = base_records(scratch)
        _log(f"{len(records):,} embedded passages; small {small:,}, large {large:,}, encode {n_encode:,}")
        memory: dict = {"convert": {}, "pretokenize": {}}
        dirs = {}
        for label, n in (("small", small), ("large", large)):
            source = write_atlas(scratch / f"corpus-{label}.jsonl.zst", records, n)
            passages = _fresh(scratch, f"passages-{label}")
            _log(f"ConvertCorpus {n:,} passages (child process)")
            memory["convert"][label] = child_peak_rss("convert", source=source, out=passages)
            tokens = _fresh(scratch, f"tokens-{label}")
            _log(f"PreTokenize {n:,} passages (child process)")
            memory["pretokenize"][label] = child_peak_rss("pretokenize", passages=passages, lm=lm, out=tokens)
            shutil.rmtree(tokens)
            dirs[label] = passages
        for stage in memory.values():
            stage["ratio"] = round(stage["large"]["peak_rss_mib"] / stage["small"]["peak_rss_mib"], 3)
        shutil.rmtree(dirs.pop("large"))

        _log("PreTokenize vs raw tokenizer")
        pre = bench_pretokenize(scratch, dirs["small"], lm, repeats)
        _log("BuildBM25Index")
        bm = bench_bm25(scratch, dirs["small"], small)
        _log("EncodePassages vs sentence-transformers")
        enc = bench_encode(scratch, _limit_passages(dirs["small"], scratch / "passages-encode", n_encode), repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    import torch

    res = {
        "name": "pipeline",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads)",
        "command": "python -m bench.run" + (" --quick" if args.quick else "") + " pipeline",
        "repeats": repeats,
        "sizes": {"small": small, "large": large, "encode": n_encode},
        "pretokenize": pre,
        "encode": enc,
        "bm25": bm,
        "memory": memory,
    }
    res["targets"] = {
        "pretokenize_ratio_ge_0.8": pre["ratio"] >= 0.8,
        "encode_ratio_ge_0.9": enc["ratio"] >= 0.9,
        "convert_rss_flat_20pct": abs(memory["convert"]["ratio"] - 1) <= 0.2,
        "pretokenize_rss_flat_20pct": abs(memory["pretokenize"]["ratio"] - 1) <= 0.2,
    }
    res["all_targets_met"] = all(res["targets"].values())
    res["markdown"] = _markdown(res)
    return res


if __name__ == "__main__":
    out = main()
    if out:
        print(out.pop("markdown"))
        print(json.dumps(out, indent=2))
