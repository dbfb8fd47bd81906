"""Remote-store benchmark: push and pull throughput vs raw zstandard, and peak memory vs artifact size.

    python -m bench.run remote                  # 1 GiB artifact (and 100 MiB for the memory check)
    python -m bench.run remote --size-mib 256   # a smaller run on a busy machine
    python -m bench.run --quick remote          # tiny sizes, to check the benchmark itself

Measured in one run, on one artifact of ``--size-mib`` MiB (four files of float32 embeddings and JSONL passages,
compressed to about 0.47 of their size; see :func:`make_store`) published in a scratch store, and a local-folder remote on the same disk:

1. ``nest push`` throughput (``Remote.push``: read every file, check its size against the manifest, write the tar
   stream straight into zstandard level 3 multi-threaded (no hash of the archive: zstd's checksum covers it), write
   it to a temp name beside the final one, fsync, rename, read its size and last bytes back, then the manifest) ÷ raw
   zstandard compression of the same bytes with the same compressor settings (read the files, compress, write one
   file). Target ≥ 0.7.
2. ``nest pull`` throughput (``Remote.pull``: read the archive, decompress, check the archive's size, first bytes and
   zstd checksum and every file's sha256 and size, write and fsync every file, publish) ÷ raw zstandard decompression of the same archive (read, decompress,
   write one file). Target ≥ 0.9. Also ÷ the same decompression followed by an fsync of its output (a pull's
   durability), since on a slow disk the fsync alone is a large share.
3. Peak RSS (``VmHWM``) of push and of pull at 100 MiB and at the full size, each in a fresh child process. Target: flat.

Each timing runs in a fresh child process (its own peak RSS); raw and remote runs alternate and the best of
``--repeats`` is kept (the machine is shared). Files are in the page cache for every contestant alike.

The other §5 ratio, pull the whole store and then ``make all`` ÷ a cold ``make all``, needs the real DAG and is run
by hand (see docs/pipeline.md, "Sharing the cache")::

    NEST_STORE=/tmp/a bash -c 'time make all'                        # cold
    NEST_STORE=/tmp/a nest push --all --remote /tmp/nest-remote
    NEST_STORE=/tmp/b bash -c 'time (nest pull --all --remote /tmp/nest-remote && make all)'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.sharing.remote import Remote
from pipeline.storage.archive import LEVEL
from pipeline.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]
STAGE = "BenchArtifact"
KEY = "b" * 64
N_FILES = 4
CHUNK = 1 << 20


def _log(msg: str) -> None:
    print(f"[bench remote] {msg}", file=sys.stderr, flush=True)


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_store(scratch: Path, size: int) -> Path:
    """A store holding one artifact of ``size`` bytes in ``N_FILES`` files, alternating 1 MiB blocks of float32
    embeddings (barely compressible, like a dense index) and JSONL passages of the test corpus in random order
    (compressible text): about 0.47 of its size once compressed."""
    import numpy as np  # lazy: start-up time


    root = scratch / f"store-{size}"
    store = Store(root)
    lines = (ROOT / "tests" / "fixtures" / "pipeline" / "micro_atlas.jsonl").read_text().splitlines()

    def build(out: Path) -> dict:
        rng = np.random.default_rng(0)
        per_file = size // N_FILES
        for i in range(N_FILES):
            with open(out / f"part-{i:02d}.bin", "wb") as f:
                left, block = per_file, 0
                while left:
                    n = min(left, CHUNK)
                    if block % 2 == 0:
                        data = rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes()[:n]
                    else:
                        picks = rng.integers(0, len(lines), n // 200 + 2)
                        data = "\n".join(lines[j] for j in picks).encode()
                        while len(data) < n:
                            data += data
                        data = data[:n]
                    f.write(data)
                    left -= n
                    block += 1
        return {}

    store.publish(STAGE, KEY, build, version="1", params={"size": size}, inputs={})
    return root


def _child(op: str, spec: dict) -> None:
    """One measured operation in this fresh process; prints ``{"seconds", "peak_kib"}`` as JSON."""
    import zstandard  # lazy: start-up time


    store = Store(spec["store"])
    t0 = time.perf_counter()
    if op == "push":
        remote = Remote(spec["remote"])
        assert remote.push(store, STAGE, KEY) is not None
    elif op == "pull":
        dst = Store(spec["dest"])
        Remote(spec["remote"]).pull(dst, STAGE, KEY)
    elif op == "compress":
        files = sorted(store.manifest(STAGE, KEY)["files"])
        cctx = zstandard.ZstdCompressor(level=LEVEL, threads=-1, write_checksum=True)
        with open(spec["out"], "wb") as raw, cctx.stream_writer(raw, closefd=False, write_size=CHUNK) as z:
            for rel in files:
                with open(store.path(STAGE, KEY) / rel, "rb") as f:
                    while chunk := f.read(CHUNK):
                        z.write(chunk)
    elif op in ("decompress", "decompress_fsync"):
        dctx = zstandard.ZstdDecompressor()
        with open(spec["archive"], "rb") as src, open(spec["out"], "wb") as dst:
            dctx.copy_stream(src, dst, read_size=CHUNK, write_size=CHUNK)
            if op == "decompress_fsync":  # the same durability as a pull, which fsyncs every file it publishes
                dst.flush()
                os.fsync(dst.fileno())
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_kib": _peak_rss_kib()}))


def _run_child(op: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.bench_remote", "--child", op, json.dumps(spec)], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench child {op} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(scratch: Path, size: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds and the peak RSS of push, pull, compress and decompress for one artifact size."""
    store = make_store(scratch, size)
    remote = scratch / f"remote-{size}"
    best: dict[str, dict] = {}

    def keep(op: str, r: dict) -> None:
        if op not in best or r["seconds"] < best[op]["seconds"]:
            best[op] = {**r, "peak_kib": max(r["peak_kib"], best.get(op, {}).get("peak_kib", 0))}
        else:
            best[op]["peak_kib"] = max(best[op]["peak_kib"], r["peak_kib"])

    for i in range(repeats):
        shutil.rmtree(remote, ignore_errors=True)
        out = scratch / "raw.zst"
        keep("compress", _run_child("compress", {"store": str(store), "out": str(out)}))
        out.unlink()
        keep("push", _run_child("push", {"store": str(store), "remote": str(remote)}))
        archive = remote / STAGE / f"{KEY}.tar.zst"
        raw_out = scratch / "raw.tar"
        keep("decompress", _run_child("decompress", {"store": str(store), "archive": str(archive),
                                                     "out": str(raw_out)}))
        raw_out.unlink()
        keep("decompress_fsync", _run_child("decompress_fsync", {"store": str(store), "archive": str(archive),
                                                                 "out": str(raw_out)}))
        raw_out.unlink()
        dest = scratch / f"pulled-{i}"
        keep("pull", _run_child("pull", {"store": str(store), "remote": str(remote), "dest": str(dest)}))
        shutil.rmtree(dest)
        _log(f"{size / 2**20:.0f} MiB, repeat {i + 1}: " + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in best.items()))
    archive_size = (remote / STAGE / f"{KEY}.tar.zst").stat().st_size
    shutil.rmtree(store)
    shutil.rmtree(remote)
    mib = size / 2**20
    return {"size_bytes": size, "archive_bytes": archive_size,
            "seconds": {k: round(v["seconds"], 3) for k, v in best.items()},
            "mib_per_s": {k: round(mib / v["seconds"], 1) for k, v in best.items()},
            "peak_rss_mib": {k: round(v["peak_kib"] / 1024, 1) for k, v in best.items()},
            "push_vs_compress": round(best["compress"]["seconds"] / best["push"]["seconds"], 3),
            "pull_vs_decompress": round(best["decompress"]["seconds"] / best["pull"]["seconds"], 3),
            "pull_vs_decompress_fsync": round(best["decompress_fsync"]["seconds"] / best["pull"]["seconds"], 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (4 MiB and 16 MiB, one repeat)")
    ap.add_argument("--size-mib", type=int, help="the large artifact (default 1024)")
    ap.add_argument("--small-mib", type=int, help="the small artifact of the memory check (default 100)")
    ap.add_argument("--repeats", type=int, help="timings per operation, best kept (default 2, quick 1)")
    ap.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--child", nargs=2, metavar=("OP", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], json.loads(args.child[1]))
        return {}
    large = (args.size_mib or (16 if args.quick else 1024)) << 20
    small = (args.small_mib or (4 if args.quick else 100)) << 20
    repeats = args.repeats or (1 if args.quick else 2)
    scratch = Path(tempfile.mkdtemp(prefix="nest-bench-remote-", dir=args.scratch))
    try:
        results = {}
        for label, size in (("small", small), ("large", large)):
            _log(f"{label}: {size / 2**20:.0f} MiB artifact, {repeats} repeat(s)")
            results[label] = measure(scratch, size, repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    big, little = results["large"], results["small"]
    flat = {op: round(big["peak_rss_mib"][op] / little["peak_rss_mib"][op], 3) for op in ("push", "pull")}
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "repeats": repeats,
           "results": results, "peak_rss_large_over_small": flat,
           "targets": {"push_vs_compress": ">= 0.7", "pull_vs_decompress": ">= 0.9", "peak_rss": "flat"},
           "load_average_start": os.getloadavg()[0]}
    rows = []
    for label in ("small", "large"):
        r = results[label]
        rows.append(f"| {r['size_bytes'] / 2**20:.0f} MiB ({r['archive_bytes'] / 2**20:.0f} MiB .tar.zst) "
                    f"| {r['mib_per_s']['push']} | {r['mib_per_s']['compress']} | **{r['push_vs_compress']}** "
                    f"| {r['mib_per_s']['pull']} | {r['mib_per_s']['decompress']} | **{r['pull_vs_decompress']}** "
                    f"| {r['mib_per_s']['decompress_fsync']} | {r['pull_vs_decompress_fsync']} "
                    f"| {r['peak_rss_mib']['push']} | {r['peak_rss_mib']['pull']} |")
    out["markdown"] = "\n".join([
        "# Remote store: push/pull throughput and memory",
        "",
        f"Local-folder remote on the same disk; {os.cpu_count()} CPUs (shared); best of {repeats}; each operation in a "
        "fresh process. Throughput in MiB/s of artifact bytes. Targets: push ÷ zstd ≥ 0.7, pull ÷ unzstd ≥ 0.9, peak "
        "memory flat.",
        "",
        "| artifact | push | zstd | push ÷ zstd | pull | unzstd | pull ÷ unzstd | unzstd + fsync | pull ÷ (unzstd + fsync) "
        "| push peak RSS MiB | pull peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Peak RSS, large ÷ small: push {flat['push']}, pull {flat['pull']} (1.0 = flat).",
        "",
        "Push writes the tar stream straight into zstd (the archive is not hashed: zstd's content checksum covers it) "
        "(files are re-hashed against their manifest only with `nest push --verify`); it fsyncs the archive and reads "
        "its size and last bytes back before the manifest; pull "
        "checks the archive's size, first bytes and zstd checksum and every file's sha256 (the archive's own sha256 "
        "only for older manifests) and fsyncs every file before publishing. The raw zstd runs do "
        "no hashing; `unzstd + fsync` also fsyncs its output, the durability a pull gives. "
        f"Load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work shares them).",
    ])
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
