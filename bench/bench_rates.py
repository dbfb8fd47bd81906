"""Per-item rates of every stage, measured here, and their extrapolation to the paper's scale.

    python -m bench.run rates            # reads the latest run with a report in the store (run `make all` first)
    python -m bench.run --quick rates    # the same, with a smaller FAISS IVF/PQ training sample

Measured: each stage's build seconds and item counts come from the manifests of the latest embedded run (a cold
``make all``: every stage built once, on this machine, with the other work of that moment). FAISS train/add rates for
an IVF/PQ index (the paper's is IVF65536,PQ256) are measured here on the run's MiniLM embeddings, at a size that fits
(IVF256,PQ16 on d = 384), with faiss's own threads at 1.

Extrapolated: each figure at 33M passages with the formula in its row; the LM and encoder factors are the ratio of
parameters (compute per token grows with parameters for a forward pass), stated where used; GPU figures from FLOPs ÷
an assumed 50% of the datasheet peak. Every row says which it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_PASSAGES = 33_000_000
# parameters (published model cards): the embedded models and the paper's
SMOLLM2, LLAMA2_7B = 135e6, 6.74e9
MINILM_L6, DRAGON_PLUS = 22.7e6, 110e6  # DRAGON+ is a BERT-base pair (query and context encoders)
A100_BF16 = 312e12  # dense peak FLOP/s (datasheet); 50% assumed for batched fixed-length forwards


def _log(msg: str) -> None:
    print(f"[bench rates] {msg}", file=sys.stderr, flush=True)


def _manifests(store, run: dict) -> list[dict]:
    out = []
    for r in run.get("reached", []):
        m = store.manifest(r["stage"], r["key"])
        if m is not None:
            out.append({**m, "label": r.get("label", r["stage"])})
    return out


def stage_rates(manifests: list[dict]) -> list[dict]:
    """One row per stage kind: items, seconds (summed over its artifacts), items/s."""
    rows: dict[str, dict] = {}

    def add(stage: str, unit: str, items: float, seconds: float) -> None:
        row = rows.setdefault(stage, {"stage": stage, "unit": unit, "items": 0.0, "seconds": 0.0, "artifacts": 0})
        row["items"] += items
        row["seconds"] += seconds
        row["artifacts"] += 1

    for m in manifests:
        st, stats, secs = m["stage"], m.get("stats") or {}, (m.get("timings") or {}).get("build_s", 0.0)
        if st in ("ConvertCorpus", "PreTokenize", "BuildBM25Index", "EncodePassages"):
            add(st, "passages", stats.get("num_passages", stats.get("num_docs", 0)), secs)
        elif st == "BuildDenseIndex":
            add(st, "passages", stats.get("ntotal", stats.get("num_vectors", 0)), secs)
        elif st == "EncodePassageKeys":
            add(st, "passages", stats.get("passages", 0), secs)
        elif st in ("PreRetrieve", "LoadTask"):
            add(st, "examples", stats.get("num_examples", stats.get("examples", 0)), secs)
        elif st in ("Generate", "Perplexity"):
            method = (m.get("params") or {}).get("method", "?")
            n = stats.get("num_examples", stats.get("examples", stats.get("rows", 0)))
            add(f"{st} ({method})", "examples", n, secs)
    for row in rows.values():
        row["rate"] = row["items"] / row["seconds"] if row["seconds"] > 0 else None
    return sorted(rows.values(), key=lambda r: r["stage"])


def faiss_rates(store, manifests: list[dict], quick: bool) -> dict:
    """Train and add rates of IVF/PQ on the run's passage embeddings (faiss at 1 thread)."""
    import faiss
    import numpy as np

    enc = next((m for m in manifests if m["stage"] == "EncodePassages"), None)
    if enc is None:
        return {}
    folder = store.path("EncodePassages", enc["key"])
    x = np.concatenate([np.load(p) for p in sorted(folder.glob("embeddings-*.npy"))]).astype("float32")
    faiss.omp_set_num_threads(1)
    nlist, m_pq = (64, 8) if quick else (256, 16)
    d = int(x.shape[1])
    train = x[: min(len(x), 39 * nlist)]  # FAISS's rule of thumb: ≥ 39 training points per list
    t0 = time.perf_counter()
    coarse = faiss.Kmeans(d, nlist, niter=20, seed=0)
    coarse.train(train)
    kmeans_s = time.perf_counter() - t0
    index = faiss.index_factory(d, f"IVF{nlist},PQ{m_pq}", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(x[: min(len(x), 39 * nlist)])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(x)
    add_s = time.perf_counter() - t0
    flops = 2.0 * len(train) * nlist * d * 20  # the distance computations of 20 k-means iterations
    return {"factory": f"IVF{nlist},PQ{m_pq}", "d": d, "train_vectors": len(train), "kmeans_s": kmeans_s,
            "kmeans_gflops": flops / kmeans_s / 1e9, "train_s": train_s, "added": len(x), "add_s": add_s,
            "add_rate": len(x) / add_s if add_s else None}


def _h(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def extrapolate(rates: list[dict], fa: dict, tokens_per_passage: float) -> list[list[str]]:
    """Rows ``[quantity, value, how]`` at 33M passages."""
    by = {r["stage"]: r for r in rates}
    out = []

    def per_passage(stage: str) -> float | None:
        r = by.get(stage)
        return 1 / r["rate"] if r and r["rate"] else None

    for stage, note in (("ConvertCorpus", "streamed, one process; splits by file across workers"),
                        ("PreTokenize", "the fast tokenizer; the Llama-2 tokenizer is of the same kind"),
                        ("BuildBM25Index", "Lucene, 1 indexing thread here; Anserini scales with --threads")):
        s = per_passage(stage)
        if s:
            out.append([f"{stage}, 1 CPU worker", _h(s * PAPER_PASSAGES),
                        f"extrapolated: 33M × measured {1 / s:,.0f} passages/s"])
    s = per_passage("EncodePassages")
    if s:
        cpu = s * PAPER_PASSAGES * DRAGON_PLUS / MINILM_L6
        out.append(["EncodePassages with DRAGON+, 1 CPU worker (this machine's 2 cores)", _h(cpu),
                    f"extrapolated: 33M × measured {1 / s:,.0f} passages/s (MiniLM-L6) × {DRAGON_PLUS / MINILM_L6:.1f} "
                    "(parameter ratio DRAGON+ ÷ MiniLM-L6)"])
        flops = 2 * DRAGON_PLUS * 128  # 2 FLOPs per parameter per token, ≈128 tokens per 100-word passage (BERT WordPiece)
        gpu = PAPER_PASSAGES * flops / (0.5 * A100_BF16)
        out.append(["EncodePassages with DRAGON+, 1 A100", _h(gpu),
                    f"extrapolated: 33M × 2 × 110M parameters × 128 tokens ÷ (50% of 312 TFLOP/s)"])
        out.append(["EncodePassages with DRAGON+, 8 A100 (sharded by doc_id)", _h(gpu / 8), "extrapolated: ÷ 8 shards"])
    if fa:
        # IVF65536 training: k-means over 39 × 65536 vectors of d = 768, 20 iterations: 2·n·k·d FLOPs per iteration
        flops = 2.0 * 39 * 65536 * 65536 * 768 * 20
        out.append(["FAISS IVF65536 coarse k-means (d = 768), 1 CPU thread", _h(flops / (fa["kmeans_gflops"] * 1e9)),
                    f"extrapolated: {flops:.1e} FLOPs (2·n·k·d·20 iterations, n = 39·65536) ÷ the measured "
                    f"{fa['kmeans_gflops']:.1f} GFLOP/s of k-means here ({fa['factory'].split(',')[0]}, d = {fa['d']})"])
        out.append(["same, 1 A100 (faiss GPU k-means, fp32 19.5 TFLOP/s peak, 50%)", _h(flops / (0.5 * 19.5e12)),
                    "extrapolated: FLOPs ÷ 9.75 TFLOP/s"])
        t_add = PAPER_PASSAGES / fa["add_rate"] * (768 / fa["d"]) * (65536 / 256)
        out.append(["FAISS add of 33M vectors to IVF65536,PQ256, 1 CPU thread", _h(t_add),
                    f"extrapolated: measured {fa['add_rate']:,.0f} vectors/s ({fa['factory']}) × 768/{fa['d']} × "
                    "65536/256 (the coarse assignment scans every list; an upper bound: PQ encoding does not grow); "
                    "shards add in parallel"])
        out.append(["FAISS IVF65536,PQ256 index size", f"{PAPER_PASSAGES * (256 + 8) / 1e9:.1f} GB",
                    "extrapolated: 33M × (256 B codes + 8 B ids); shards add into their own inverted lists, merged "
                    "on disk (OnDiskInvertedLists) so no machine holds all of it while adding"])
    out.append(["Lucene index size (BM25)", "≈ 25-30 GB", "extrapolated: measured bytes per passage × 33M (below)"])
    out.append(["pre-tokenized shards", f"{PAPER_PASSAGES * tokens_per_passage * 4 / 1e9:.0f} GB",
                f"extrapolated: 33M × {tokens_per_passage:.0f} tokens × 4 B (int32)"])
    for m in ("base", "nest"):
        r = by.get(f"Generate ({m})")
        if r and r["rate"]:
            sec = 1 / r["rate"] * LLAMA2_7B / SMOLLM2
            out.append([f"Generate ({m}) with Llama-2-7B on this CPU, per example", _h(sec),
                        f"extrapolated: measured {1 / r['rate']:.1f} s/example (SmolLM2) × {LLAMA2_7B / SMOLLM2:.0f} "
                        "(parameter ratio)"])
    return out


def main(argv: list[str] | None = None) -> dict:
    from pipeline import config as cfg
    from pipeline.runs import latest_run_with

    ap = argparse.ArgumentParser(prog="bench rates")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    store = cfg.get_store()
    run = latest_run_with(store, "Report")
    if run is None:
        raise SystemExit(f"bench rates: no run with a report in {store.root}; run `make all` first")
    manifests = _manifests(store, run)
    rates = stage_rates(manifests)
    _log(f"{len(manifests)} artifacts of run {run.get('id')}; FAISS IVF/PQ rates")
    fa = faiss_rates(store, manifests, args.quick)
    pretok = next((m for m in manifests if m["stage"] == "PreTokenize"), None)
    tpp = (pretok or {}).get("stats", {}).get("mean_tokens_per_passage", 90.0) * 100 / 62.7  # per 100 words
    bm25 = next((m for m in manifests if m["stage"] == "BuildBM25Index"), None)
    bm25_bpp = bm25["size"] / max(1, bm25["stats"].get("num_passages", 1)) if bm25 else None
    lines = ["# Per-item rates of every stage (measured) and the paper's scale (extrapolated)", "",
             f"Run {run.get('id')} of the embedded profile (the store's latest run with a report), x86_64, "
             f"{os.cpu_count()} cores; build seconds from the manifests (each stage built once, cold).", "",
             "| stage | items | seconds | rate (items/s) | measured |", "|---|---|---|---|---|"]
    for r in rates:
        lines.append(f"| {r['stage']} | {r['items']:,.0f} {r['unit']} | {r['seconds']:.1f} | "
                     f"{r['rate']:,.2f} | measured |" if r["rate"] else f"| {r['stage']} | – | – | – | – |")
    if fa:
        lines.append(f"| FAISS k-means, {fa['factory'].split(',')[0]} (d = {fa['d']}, 20 iterations, 1 thread) | "
                     f"{fa['train_vectors']:,} vectors | {fa['kmeans_s']:.2f} | {fa['kmeans_gflops']:.1f} GFLOP/s | measured |")
        lines.append(f"| FAISS {fa['factory']} train, IVF + PQ (1 thread) | {fa['train_vectors']:,} vectors | "
                     f"{fa['train_s']:.2f} | {fa['train_vectors'] / fa['train_s']:,.0f} | measured |")
        lines.append(f"| FAISS {fa['factory']} add (1 thread) | {fa['added']:,} vectors | {fa['add_s']:.2f} | "
                     f"{fa['add_rate']:,.0f} | measured |")
    if bm25_bpp:
        lines += ["", f"Lucene index: {bm25_bpp:,.0f} bytes per passage (measured) → "
                  f"{bm25_bpp * PAPER_PASSAGES / 1e9:.0f} GB at 33M (extrapolated)."]
    lines += ["", "| at 33M passages | value | how |", "|---|---|---|"]
    ext = extrapolate(rates, fa, tpp)
    if bm25_bpp:
        ext = [[q, f"{bm25_bpp * PAPER_PASSAGES / 1e9:.0f} GB", f"extrapolated: {bm25_bpp:,.0f} B/passage measured × 33M"]
               if q.startswith("Lucene") else [q, v, h] for q, v, h in ext]
    lines += [f"| {q} | {v} | {h} |" for q, v, h in ext]
    return {"run": run.get("id"), "rates": rates, "faiss": fa, "extrapolated": ext, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    out = main(sys.argv[1:])
    print(out.pop("markdown"))
    print(json.dumps(out, indent=1, default=str))
