"""Passage-key encoding against the CPU's GEMM roofline: how close on-the-fly key encoding gets to the
matmul throughput of this machine, in fp32 and in bf16, and what lower-precision encoding buys.

    python -m bench.run roofline            # 96 real passages (embedded corpus), 3 interleaved rounds
    python -m bench.run --quick roofline    # 16 passages, 1 round: a smoke test, numbers not meaningful

1. GEMM throughput (GFLOP/s) at torch's default threads, fp32 and bf16 (``torch.nn.functional.linear``, inputs and
   weights both in the dtype, as autocast runs them), at the shapes of SmolLM2-135M's layers: ``tokens`` = one encoding
   batch (16 passages × their mean padded length), ``hidden → hidden`` (q, o), ``hidden → kv`` (k, v),
   ``hidden → intermediate`` (gate, up), ``intermediate → hidden`` (down). The "layer mix" rate is one decoder layer's
   linear FLOPs over the time of its seven GEMMs: the roofline that encoding could reach.
2. Key encoding (:func:`stages.decoding.passage_keys.encode_passages`, batch 16, sorted by length, stopping at the key
   layer) of the same real passages under: fp32 (the paper's arithmetic, ``NestConfig.key_precision = "fp32"``);
   bf16 autocast (``key_precision = "bf16"``); a bf16 copy of the model; int8 dynamic quantization of every Linear
   (``torch.ao.quantization.quantize_dynamic``). Keys per second (median over interleaved rounds), the keys' agreement
   with the fp32 keys (cosine: min and mean over keys; relative Frobenius error), and the fraction of the roofline
   reached: the forward's FLOPs (linear layers up to the key layer and attention, on the padded batches) per second
   over the layer-mix GEMM rate of the same precision (bf16 for the bf16 variants; none for int8).

Passages: the first ``--passages`` articles of the embedded corpus (``{title}. {text}``, cut to 100 words, the
ConvertCorpus passage size), tokenized by the LM; no pipeline artifact is needed. The LM is the embedded SmolLM2 folder
(PrepareLM once, cached like bench_pipeline's). Timings on a machine shared with other work are noisy: compare the
ratios within one run (the settings are interleaved), not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

CACHE = Path.home() / ".cache" / "nest" / "bench"
BATCH = 16


def _log(msg: str) -> None:
    print(f"[bench roofline] {msg}", file=sys.stderr, flush=True)


def real_passages(tokenizer, n: int, max_words: int = 100) -> list[list[int]]:
    """Token ids of the first passage (≤ ``max_words`` words) of the first ``n`` articles of the embedded corpus."""
    from stages.corpus.convert import embedded_corpus_path

    records = list(json.loads(Path(embedded_corpus_path()).read_text(encoding="utf-8")).values())[:n]
    texts = [" ".join(f"{r['title']}. {r['extract']}".split()[:max_words]) for r in records]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


def padded_tokens(passages: list[list[int]], batch: int = BATCH) -> int:
    """Tokens the forward processes with :func:`encode_passages`'s batching (sorted by length, right-padded)."""
    lens = sorted((len(p) for p in passages), reverse=True)
    return sum(max(lens[s:s + batch]) * len(lens[s:s + batch]) for s in range(0, len(lens), batch))


def layer_shapes(cfg) -> dict[str, tuple[int, int, int]]:
    """(in, out, count per layer) of a Llama decoder layer's linear maps."""
    h, i = int(cfg.hidden_size), int(cfg.intermediate_size)
    head = int(getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    kv = head * int(cfg.num_key_value_heads)
    return {"hidden→hidden (q, o)": (h, h, 2), "hidden→kv (k, v)": (h, kv, 2),
            "hidden→intermediate (gate, up)": (h, i, 2), "intermediate→hidden (down)": (i, h, 1)}


def encoding_flops(cfg, passages: list[list[int]], key_layer: str, batch: int = BATCH) -> float:
    """FLOPs of the forward up to the key layer over the padded batches: ``paper`` = every layer but the last's
    feed-forward; ``code`` = every layer but the last. Linear maps 2·in·out per token; attention 4·L·(heads·head_dim)
    per token (QKᵀ and AV over the batch's padded length L)."""
    shapes = layer_shapes(cfg)
    attn_lin = sum(2 * a * b * c for k, (a, b, c) in shapes.items() if "intermediate" not in k)
    mlp_lin = sum(2 * a * b * c for k, (a, b, c) in shapes.items() if "intermediate" in k)
    n = int(cfg.num_hidden_layers)
    width = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * cfg.num_attention_heads
    lens = sorted((len(p) for p in passages), reverse=True)
    total = 0.0
    for s in range(0, len(lens), batch):
        L, b = max(lens[s:s + batch]), len(lens[s:s + batch])
        per_layer_attn = b * L * (attn_lin + 4 * L * width)
        total += (n - 1) * (per_layer_attn + b * L * mlp_lin)
        if key_layer == "paper":
            total += per_layer_attn
    return total


def gemm_rates(cfg, tokens: int, dtype, seconds: float) -> dict[str, float]:
    """GFLOP/s of each layer shape (best of a few timed loops of about ``seconds`` each) and of the layer mix."""
    import torch
    import torch.nn.functional as F

    rates, mix_flops, mix_time = {}, 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for name, (a, b, count) in layer_shapes(cfg).items():
        x = torch.randn(tokens, a, generator=gen).to(dtype)
        w = (torch.randn(b, a, generator=gen) / a ** 0.5).to(dtype)
        with torch.inference_mode():
            F.linear(x, w)
            t0, reps = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds / 4:
                F.linear(x, w)
                reps += 1
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    F.linear(x, w)
                best = min(best, (time.perf_counter() - t0) / reps)
        flops = 2.0 * tokens * a * b
        rates[name] = flops / best / 1e9
        mix_flops += count * flops
        mix_time += count * best
    rates["layer mix"] = mix_flops / mix_time / 1e9
    return rates


def variants(model):
    """(label, model, autocast to bf16, roofline dtype) of each encoding setting that can be built here."""
    import torch

    out = [("fp32 (key_precision=fp32)", model, False, "fp32"),
           ("bf16 autocast (key_precision=bf16)", model, True, "bf16"),
           ("bf16 copy of the model", copy.deepcopy(model).to(torch.bfloat16), False, "bf16")]
    notes = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            q = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        out.append(("int8 dynamic quantization (Linear)", q, False, None))
    except Exception as e:  # noqa: BLE001  (reported, not fatal: the API is deprecated in favour of torchao)
        notes["int8"] = f"quantize_dynamic failed: {type(e).__name__}: {e}"
    return out, notes


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--passages", type=int, default=None, help="real passages to encode (default 96; quick 16)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the prepared LM folder is cached")
    args = ap.parse_args(argv or [])
    n = args.passages or (16 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 3)
    gemm_s = 0.2 if args.quick else 1.0
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    import torch

    from bench.bench_pipeline import ensure_lm
    from stages.decoding.config import NestConfig
    from stages.decoding.passage_keys import encode_passages
    from stages.lm.load import load_lm

    model, tok = load_lm(ensure_lm(args.cache))
    cfg, key_layer = model.config, NestConfig().key_layer
    passages = real_passages(tok, n)
    n_keys = sum(len(p) - 1 for p in passages)
    padded = padded_tokens(passages)
    batch_tokens = round(padded / -(-len(passages) // BATCH))
    threads = torch.get_num_threads()
    _log(f"{len(passages)} passages, {n_keys} keys, {padded} padded tokens, {threads} threads")

    gemm = {"fp32": gemm_rates(cfg, batch_tokens, torch.float32, gemm_s),
            "bf16": gemm_rates(cfg, batch_tokens, torch.bfloat16, gemm_s)}
    flops = encoding_flops(cfg, passages, key_layer)
    settings, notes = variants(model)

    def encode(m, autocast):
        if autocast:
            return encode_passages(m, passages, key_layer, None, BATCH, precision="bf16")
        return encode_passages(m, passages, key_layer, None, BATCH)

    reference = torch.cat(encode(model, False))
    times = {label: [] for label, *_ in settings}
    agree = {}
    for label, m, ac, _ in settings:  # warm-up, and the keys' agreement with fp32
        keys = torch.cat(encode(m, ac))
        cos = torch.nn.functional.cosine_similarity(keys, reference, dim=1)
        agree[label] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                        "rel_err": float((keys - reference).norm() / reference.norm())}
    for r in range(repeats):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for label, m, ac, _ in order:
            t0 = time.perf_counter()
            encode(m, ac)
            times[label].append(time.perf_counter() - t0)
        _log(f"round {r + 1}/{repeats} done")

    rows, fp32_s = [], statistics.median(times[settings[0][0]])
    for label, _, _, roof in settings:
        med = statistics.median(times[label])
        gflops = flops / med / 1e9
        rows.append({"setting": label, "seconds": round(med, 3), "keys_per_s": round(n_keys / med, 1),
                     "speedup_vs_fp32": round(fp32_s / med, 3), "gflops": round(gflops, 2),
                     "roofline": roof, "roofline_fraction": round(gflops / gemm[roof]["layer mix"], 3) if roof else None,
                     **{k: round(v, 6) for k, v in agree[label].items()}})
    result = {"quick": args.quick, "passages": len(passages), "keys": n_keys, "padded_tokens": padded,
              "batch_tokens": batch_tokens, "threads": threads, "key_layer": key_layer, "repeats": repeats,
              "encoding_gflop": round(flops / 1e9, 3), "torch": torch.__version__,
              "gemm_gflops": {d: {k: round(v, 2) for k, v in r.items()} for d, r in gemm.items()}, "rows": rows,
              "notes": notes}
    lines = [f"# Key encoding vs the GEMM roofline{' (quick: numbers not meaningful)' if args.quick else ''}", "",
             f"torch {torch.__version__}, {threads} threads. GEMMs at one encoding batch ({batch_tokens} tokens = "
             f"{BATCH} passages × their mean padded length), best of 3 loops:", "",
             "| shape (in→out) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 ÷ fp32 |", "|---|---|---|---|"]
    for k in gemm["fp32"]:
        lines.append(f"| {k} | {gemm['fp32'][k]:.1f} | {gemm['bf16'][k]:.1f} | "
                     f"{gemm['bf16'][k] / gemm['fp32'][k]:.2f} |")
    lines += ["", f"Encoding {len(passages)} real passages ({n_keys} keys, {padded} padded tokens, "
                  f"{flops / 1e9:.1f} GFLOP up to key layer `{key_layer}`), batch {BATCH}; median of {repeats} "
                  "interleaved rounds; agreement with the fp32 keys:", "",
              "| setting | keys/s | × fp32 | GFLOP/s | of the roofline | cos min | cos mean | rel. error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{100 * r['roofline_fraction']:.0f}% of {r['roofline']}" if r["roofline"] else "–"
        lines.append(f"| {r['setting']} | {r['keys_per_s']:.0f} | {r['speedup_vs_fp32']:.2f} | {r['gflops']:.1f} | "
                     f"{frac} | {r['cos_min']:.4f} | {r['cos_mean']:.5f} | {r['rel_err']:.4f} |")
    for k, v in notes.items():
        lines += ["", f"- {k}: {v}"]
    result["markdown"] = "\n".join(lines)
    return result


if __name__ == "__main__":
    res = main(sys.argv[1:])
    print(res.pop("markdown"))
