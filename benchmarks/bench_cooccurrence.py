"""Benchmark of ``dynamo_sampling.cooccurrence`` (build throughput, memory, lookup latency).

Not a test.  Usage::

    python benchmarks/bench_cooccurrence.py            # 10M, 30M, 100M tokens
    python benchmarks/bench_cooccurrence.py --quick    # 10M only

Corpus: a synthetic Zipf(1.1) stream, ``(np.random.default_rng(0).zipf(1.1) - 1)
% 50304`` (the tail beyond V is folded back by the modulo), stored as int32,
one document, ``max_order=3``.

Each size is built in a fresh subprocess.  Peak memory of the build is the
increase of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` across the
``CooccurrenceStats.build`` call (the corpus is generated beforehand in 10M
pieces, so the pre-build peak is the corpus plus small temporaries); it
includes the result tables and excludes the corpus itself.

Lookup: on the 10M-token tables, 125,000 triplets = the outer product of three
"top-50" lists (one per head; each a random sample of 50 of the 200 most
frequent tokens), and 2,500 pairs = the outer product of two such lists;
median wall time per call of ``count`` and ``weight`` on CPU (1 torch thread
by default, see ``--threads``).

Results: a Markdown table on stdout and JSON in
``benchmarks/results/cooccurrence_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

V = 50304
MAX_ORDER = 3
GEN_PIECE = 10_000_000


def zipf_stream(n_tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n_tokens, dtype=np.int32)
    for s in range(0, n_tokens, GEN_PIECE):
        m = min(GEN_PIECE, n_tokens - s)
        out[s : s + m] = (rng.zipf(1.1, m) - 1) % V
    return out


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (device cache, allocator)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def worker(n_tokens: int, bucket_tokens: int, lookup: bool, threads: int) -> dict:
    import torch

    from dynamo_sampling.cooccurrence import CooccurrenceStats

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    z = zipf_stream(n_tokens)
    gen_s = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    stats = CooccurrenceStats.build([z], V, max_order=MAX_ORDER, bucket_tokens=bucket_tokens)
    build_s = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {
        "tokens": n_tokens,
        "bucket_tokens": bucket_tokens,
        "generate_s": round(gen_s, 3),
        "build_s": round(build_s, 3),
        "tokens_per_s": n_tokens / build_s,
        "peak_build_mem_bytes": (rss_after - rss_before) * 1024,
        "corpus_bytes": int(z.nbytes),
        "table_bytes": stats.nbytes,
        "num_ngrams": {str(k): v for k, v in stats.num_ngrams.items()},
    }
    if lookup:
        rng = np.random.default_rng(1)
        top = np.argsort(-stats.unigram_counts, kind="stable")[:200]
        heads = [torch.from_numpy(rng.choice(top, 50, replace=False).astype(np.int64)) for _ in range(3)]
        tri = torch.stack(torch.meshgrid(*heads, indexing="ij"), dim=-1)  # [50, 50, 50, 3]
        pair = torch.stack(torch.meshgrid(*heads[:2], indexing="ij"), dim=-1)  # [50, 50, 2]
        reps = 30
        res["lookup"] = {
            "torch_threads": torch.get_num_threads(),
            "triplets": int(tri.shape[0] * tri.shape[1] * tri.shape[2]),
            "pairs": int(pair.shape[0] * pair.shape[1]),
            "triplet_seen_fraction": float((stats.count(tri) > 0).double().mean()),
            "pair_seen_fraction": float((stats.count(pair) > 0).double().mean()),
            "count_triplets_ms": 1e3 * _median_time(lambda: stats.count(tri), reps),
            "weight_triplets_ms": 1e3 * _median_time(lambda: stats.weight(tri, 1.0), reps),
            "weight_triplets_nocheck_ms": 1e3 * _median_time(lambda: stats.weight(tri, 1.0, check=False), reps),
            "count_pairs_ms": 1e3 * _median_time(lambda: stats.count(pair), reps),
            "weight_pairs_ms": 1e3 * _median_time(lambda: stats.weight(pair, 1.0), reps),
        }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10M tokens only")
    ap.add_argument("--sizes", type=str, default=None, help="comma-separated token counts (overrides --quick)")
    ap.add_argument("--bucket-tokens", type=int, default=None, help="build bucket size (default: library default)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the lookups (default 1: on a shared 2-core machine more threads "
        "make OpenMP wait on busy cores)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cooccurrence_cpu.json")
    ap.add_argument("--_worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_lookup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from dynamo_sampling.cooccurrence import DEFAULT_BUCKET_TOKENS

    bucket = args.bucket_tokens or DEFAULT_BUCKET_TOKENS
    if args._worker is not None:
        print(json.dumps(worker(args._worker, bucket, args._lookup, args.threads)))
        return 0

    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    else:
        sizes = [10_000_000] if args.quick else [10_000_000, 30_000_000, 100_000_000]
    results, failures = [], []
    for i, n in enumerate(sizes):
        cmd = [sys.executable, __file__, "--_worker", str(n), "--bucket-tokens", str(bucket),
               "--threads", str(args.threads)]
        if i == 0:
            cmd.append("--_lookup")
        print(f"building {n:,} tokens ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            failures.append({"tokens": n, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]})
            print(f"  failed (rc={proc.returncode}): {proc.stderr[-500:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    machine = {
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    out = {
        "benchmark": "cooccurrence build + lookup (CPU)",
        "corpus": f"Zipf(1.1) stream, (rng.zipf(1.1)-1) % {V}, int32, one document, seed 0",
        "max_order": MAX_ORDER,
        "memory_method": "ru_maxrss increase across build() in a fresh subprocess per size "
        "(result tables included, corpus excluded)",
        "machine": machine,
        "builds": results,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"machine: {machine['processor'] or machine['cpu_model'] or machine['machine']}, {machine['cpu_count']} CPUs, "
          f"numpy {machine['numpy']}, torch {machine['torch']}")
    print()
    print("| tokens | build s | Mtok/s | peak build mem (MiB) | table MiB | distinct 2-grams | distinct 3-grams |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['tokens']:,} | {r['build_s']:.2f} | {r['tokens_per_s'] / 1e6:.2f} | "
            f"{r['peak_build_mem_bytes'] / 2**20:,.0f} | {r['table_bytes'] / 2**20:,.0f} | "
            f"{r['num_ngrams']['2']:,} | {r['num_ngrams']['3']:,} |"
        )
    if results and "lookup" in results[0]:
        lk = results[0]["lookup"]
        print()
        print(f"lookup on the {results[0]['tokens']:,}-token tables (CPU, {lk['torch_threads']} torch threads, median):")
        print()
        print("| query | n | seen | count ms | weight ms |")
        print("|---|---:|---:|---:|---:|")
        print(f"| triplets 50x50x50 | {lk['triplets']:,} | {lk['triplet_seen_fraction']:.1%} | "
              f"{lk['count_triplets_ms']:.2f} | {lk['weight_triplets_ms']:.2f} |")
        print(f"| pairs 50x50 | {lk['pairs']:,} | {lk['pair_seen_fraction']:.1%} | "
              f"{lk['count_pairs_ms']:.3f} | {lk['weight_pairs_ms']:.3f} |")
    for f in failures:
        print(f"\nFAILED at {f['tokens']:,} tokens (rc={f['returncode']})")
    print(f"\nwrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
