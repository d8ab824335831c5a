"""Benchmark of the fused CUDA kernels (``dynamo_sampling.kernels``) against the torch reference.

Not a test. Needs a CUDA device and CuPy; on a machine without them it prints why and exits 0.
Usage::

    python benchmarks/bench_kernels.py            # the full grid below
    python benchmarks/bench_kernels.py --quick    # B in {1, 64}, V = 50304
    python benchmarks/bench_kernels.py --dtype float32 --repeats 200

Per configuration (H = 3 heads, bf16 logits by default, greedy, DynamoConfig defaults with
``k`` from the grid, co-occurrence statistics of order 3 built from a synthetic Zipf corpus):

* ``read``: ``logits.sum()``, the time to read the logits once (a floor for any fused step);
* ``topk_fused`` / ``topk_torch``: :func:`kernels.topk_softmax` vs ``log_softmax(x).topk(k)``;
* ``step_fused`` / ``step_torch``: :func:`kernels.cuda_dynamo_step` vs
  :func:`policy.dynamo_step` (the reference synchronises with the host inside; its time is the
  wall time of the step as the decoding loop sees it);
* ``agree``: fraction of rows where the fused step's greedy decision equals the reference's.

Timing: CUDA events on the current stream around each call, after warm-up (which includes the
one-time NVRTC compilation, reported separately as ``compile_s``); the median over
``--repeats`` calls. Results: a table on stdout and JSON in
``benchmarks/results/kernels_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynamo_sampling import kernels, policy  # noqa: E402
from dynamo_sampling.cooccurrence import CooccurrenceStats  # noqa: E402

H = 3
GRID_B = (1, 8, 64, 256)
GRID_V = (50304, 151936)
GRID_K = (8, 50)


def _median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _stats(V: int, n_tokens: int = 2_000_000) -> CooccurrenceStats:
    rng = np.random.default_rng(0)
    toks = ((rng.zipf(1.1, n_tokens) - 1) % V).astype(np.int32)
    return CooccurrenceStats.build(toks, vocab_size=V, max_order=H)


def _logits(B: int, V: int, dtype, stats: CooccurrenceStats, seed: int = 0) -> torch.Tensor:
    """Noise of a per-row scale plus a boosted frequent n-gram per row: rows emit 1..H tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.tensor([0.5, 1.5, 3.0], device="cuda")[torch.randint(0, 3, (B,), generator=g, device="cuda")]
    x = torch.randn(B, H, V, generator=g, device="cuda") * scale[:, None, None]
    keys, _ = stats.table(H)
    pick = torch.from_numpy(np.asarray(keys[np.random.default_rng(seed).integers(0, len(keys), B)])).cuda()
    boost = torch.rand(B, generator=g, device="cuda") * 14
    for h in reversed(range(H)):
        x[torch.arange(B, device="cuda"), h, pick % V] += boost
        pick = pick // V
    return x.to(dtype)


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 64}, V = 50304 only")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = ap.parse_args(argv)

    if not kernels.cuda_available():
        why = "CuPy is not importable" if not kernels.cupy_available() else "torch sees no CUDA device"
        print(f"bench_kernels: nothing to measure here ({why}); run it on a machine with a CUDA GPU and "
              f"CuPy (e.g. pip install cupy-cuda13x).")
        return 0

    dtype = getattr(torch, args.dtype)
    grid_b = (1, 64) if args.quick else GRID_B
    grid_v = (50304,) if args.quick else GRID_V

    t0 = time.perf_counter()
    for src in kernels.SOURCES:
        for name in (["topk_softmax_partial_bf16", "topk_softmax_merge"] if src.startswith("topk")
                     else ["dynamo_step_kernel"]):
            kernels._cupy_function(src, name, torch.cuda.current_device())
    compile_s = time.perf_counter() - t0

    rows = []
    header = (f"{'B':>4} {'V':>7} {'k':>3} | {'read':>7} | {'topk_fused':>10} {'topk_torch':>10} | "
              f"{'step_fused':>10} {'step_torch':>10} {'speed-up':>8} | {'agree':>6}")
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  H={H}  (median ms of {args.repeats})")
    print(f"first compile (NVRTC, all kernels): {compile_s:.2f} s")
    print(header)
    print("-" * len(header))
    for V in grid_v:
        stats = _stats(V)
        for B in grid_b:
            x = _logits(B, V, dtype, stats)
            for k in GRID_K:
                cfg = policy.DynamoConfig(k=k)
                read = _median_ms(lambda: x.sum(), args.repeats)
                topk_fused = _median_ms(lambda: kernels.topk_softmax(x, k), args.repeats)
                topk_torch = _median_ms(lambda: torch.log_softmax(x.float(), -1).topk(k, -1), args.repeats)
                step_fused = _median_ms(lambda: kernels.cuda_dynamo_step(x, cfg, stats=stats), args.repeats)
                step_torch = _median_ms(lambda: policy.dynamo_step(x, cfg, stats=stats), args.repeats)
                a = kernels.cuda_dynamo_step(x, cfg, stats=stats)
                b = policy.dynamo_step(x, cfg, stats=stats)
                agree = ((a.n == b.n) & (a.tokens == b.tokens).all(-1)).float().mean().item()
                n_hist = torch.bincount(b.n, minlength=H + 1)[1:].tolist()
                row = {"B": B, "V": V, "H": H, "k": k, "dtype": args.dtype, "read_ms": read,
                       "topk_fused_ms": topk_fused, "topk_torch_ms": topk_torch, "step_fused_ms": step_fused,
                       "step_torch_ms": step_torch, "agree": agree, "reference_n_histogram": n_hist}
                rows.append(row)
                print(f"{B:>4} {V:>7} {k:>3} | {read:7.3f} | {topk_fused:10.3f} {topk_torch:10.3f} | "
                      f"{step_fused:10.3f} {step_torch:10.3f} {step_torch / step_fused:7.1f}x | {agree:6.3f}")
            del x
        del stats

    import cupy

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "compile_s": compile_s,
        "config": "DynamoConfig defaults except k; greedy; statistics of order 3 (Zipf(1.1) corpus, 2M tokens)",
        "rows": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"kernels_{_device_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
