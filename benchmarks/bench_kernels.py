"""Benchmark of the fused CUDA kernels (``dynamo_sampling.kernels``) against the torch reference.

Not a test. Needs a CUDA device and CuPy; on a machine without them it prints why and exits 0.
Usage::

    python benchmarks/bench_kernels.py            # the full grid below
    python benchmarks/bench_kernels.py --quick    # B in {1, 64}, V = 50304
    python benchmarks/bench_kernels.py --dtype float32 --repeats 200

Per configuration (H = 3 heads, bf16 logits by default, greedy, DynamoConfig defaults with
``k`` from the grid, co-occurrence statistics of order H built from a synthetic Zipf corpus; plus
H = 4 at V = 50304, B in {1, 64}, k in {8, 50}: k = 50 is 6.25 M cells per row, few blocks):

* ``read``: ``logits.sum()``, the time to read the logits once (a floor for any fused step);
* ``topk_fused`` / ``topk_torch``: :func:`kernels.topk_softmax` vs ``log_softmax(x).topk(k)``;
* ``step_fused`` / ``step_torch``: :func:`kernels.cuda_dynamo_step` vs
  :func:`policy.dynamo_step` (the reference synchronises with the host inside; its time is the
  wall time of the step as the decoding loop sees it);
* ``agree``: fraction of rows where the fused step's greedy decision equals the reference's.

Timing: CUDA events on the current stream around each call, after warm-up (which includes the
one-time NVRTC compilation, reported separately as ``compile_s``); the median over
``--repeats`` calls. Results: a table on stdout and JSON in
``benchmarks/results/kernels_<device>.json`` (or ``--out``), rewritten after every row; a failing
configuration is recorded under ``errors`` and the others still run (exit code 1 then). At the end
the fused step is replayed from a CUDA graph (``graph_rows``, H = 3, V = 50304): the launch cost
gone, and a proof that the step has no host sync (the capture would fail).
"""
from __future__ import annotations

import argparse
import functools
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
from dynamo_sampling.graphs import cuda_capture  # noqa: E402

H = 3
GRID_B = (1, 8, 64, 256)
GRID_V = (50304, 151936)
GRID_K = (8, 50)
GRID_H4 = {"V": 50304, "B": (1, 64), "k": (8, 50)}  # H = 4 rows (issue: dense passes over k**4 cells)
GRAPH_V, GRAPH_B = 50304, (1, 64, 256)  # the fused step replayed from a CUDA graph


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


@functools.cache
def _stats(V: int, H: int, n_tokens: int = 2_000_000) -> CooccurrenceStats:
    rng = np.random.default_rng(0)
    toks = ((rng.zipf(1.1, n_tokens) - 1) % V).astype(np.int32)
    return CooccurrenceStats.build([toks], vocab_size=V, max_order=H)


def _logits(B: int, H: int, V: int, dtype, stats: CooccurrenceStats, seed: int = 0) -> torch.Tensor:
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
    ap.add_argument("--no-h4", action="store_true", help="skip the H = 4 rows")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replays of the fused step")
    args = ap.parse_args(argv)

    if not kernels.cuda_available():
        why = "CuPy is not importable" if not kernels.cupy_available() else "torch sees no CUDA device"
        print(f"bench_kernels: nothing to measure here ({why}); run it on a machine with a CUDA GPU and "
              f"CuPy (e.g. pip install cupy-cuda13x).")
        return 0

    dtype = getattr(torch, args.dtype)
    grid_b = (1, 64) if args.quick else GRID_B
    grid_v = (50304,) if args.quick else GRID_V
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"kernels_{_device_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
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
        "compile_s": None,
        "config": "DynamoConfig defaults except k; greedy; statistics of order H (Zipf(1.1) corpus, 2M tokens)",
        "compile_options": list(kernels.compile_options()),
        "notes": {"graph_rows": "the fused step replayed from a CUDA graph (capture fails on a host sync)",
                  "agree": "rows where fused and torch steps decide alike; torch.topk breaks bf16 ties in its "
                           "own order, so ties can lower it"},
        "rows": [],
        "graph_rows": [],
        "errors": [],
    }

    def save():  # after every row: a run cut short by a timeout still leaves its numbers
        out.write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    try:
        for src in kernels.SOURCES:
            for name in (["topk_softmax_partial_bf16", "topk_softmax_merge"] if src.startswith("topk")
                         else ["dynamo_step_kernel"]):
                kernels._cupy_function(src, name, torch.cuda.current_device())
    except Exception as e:  # an NVRTC error: nothing else can run
        result["errors"].append({"where": "compile", "error": f"{type(e).__name__}: {e}"})
        save()
        print(f"compile failed: {type(e).__name__}: {e}")
        return 1
    result["compile_s"] = compile_s = time.perf_counter() - t0

    header = (f"{'H':>2} {'B':>4} {'V':>7} {'k':>3} | {'read':>7} | {'topk_fused':>10} {'topk_torch':>10} | "
              f"{'step_fused':>10} {'step_torch':>10} {'speed-up':>8} | {'agree':>6}")
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  (median ms of {args.repeats})")
    print(f"first compile (NVRTC, all kernels): {compile_s:.2f} s")
    print(header)
    print("-" * len(header))
    grid = [(H, V, grid_b, GRID_K) for V in grid_v]
    if not args.no_h4:
        grid.append((4, GRID_H4["V"], GRID_H4["B"], GRID_H4["k"]))
    for H_, V, batch_sizes, ks in grid:
        stats = _stats(V, H_)
        for B in batch_sizes:
            x = _logits(B, H_, V, dtype, stats)
            for k in ks:
                try:
                    row = _measure(x, k, stats, args.dtype, args.repeats)
                except Exception as e:
                    err = {"H": H_, "B": B, "V": V, "k": k, "error": f"{type(e).__name__}: {e}"}
                    result["errors"].append(err)
                    save()
                    print(f"{H_:>2} {B:>4} {V:>7} {k:>3} | failed: {err['error']}")
                    continue
                result["rows"].append(row)
                save()
                print(f"{H_:>2} {B:>4} {V:>7} {k:>3} | {row['read_ms']:7.3f} | {row['topk_fused_ms']:10.3f} "
                      f"{row['topk_torch_ms']:10.3f} | {row['step_fused_ms']:10.3f} "
                      f"{row['step_torch_ms']:10.3f} {row['step_torch_ms'] / row['step_fused_ms']:7.1f}x | "
                      f"{row['agree']:6.3f}")
            del x
    if not args.no_graph:  # last: a failed capture could leave the context unusable for what follows
        print("fused step replayed from a CUDA graph (H = 3, V = 50304, eps_b 0.1 unless given):")
        stats = _stats(GRAPH_V, H)
        for B in GRAPH_B:
            x = _logits(B, H, GRAPH_V, dtype, stats)
            for k, eps_b in [(k, 0.1) for k in GRID_K] + [(50, 0.0)]:  # eps_b = 0: every cell a candidate
                cfg = policy.DynamoConfig(k=k, eps_b=eps_b)
                ms, why = _graph_ms(lambda: kernels.cuda_dynamo_step(x, cfg, stats=stats), args.repeats)
                tk_ms, _ = _graph_ms(lambda: kernels.topk_softmax(x, k), args.repeats)
                result["graph_rows"].append({"B": B, "V": GRAPH_V, "H": H, "k": k, "eps_b": eps_b,
                                             "step_graph_ms": ms, "topk_graph_ms": tk_ms, "error": why})
                save()
                print(f"   B={B:>4} k={k:>2} eps_b={eps_b}: " + (
                    f"step {ms:.3f} ms, of which top-k alone {_fmt_ms(tk_ms)}" if ms is not None
                    else f"capture failed: {why}"))
    save()
    print(f"wrote {out}")
    print(json.dumps({"bench": "kernels", "out": str(out), "rows": len(result["rows"]),
                      "errors": len(result["errors"]), "compile_s": round(compile_s, 3)}))
    return 1 if result["errors"] else 0


def _fmt_ms(ms):
    return "-" if ms is None else f"{ms:.3f} ms"


def _graph_ms(fn, repeats: int):
    """(median ms of ``fn`` replayed from a CUDA graph, None) or (None, why the capture failed)."""
    try:  # the warm-up run on the side stream also fills the caches (device tables)
        replay, _ = cuda_capture(fn, torch.device("cuda", torch.cuda.current_device()))
        return _median_ms(replay, repeats), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _measure(x: torch.Tensor, k: int, stats, dtype_name: str, repeats: int) -> dict:
    B, H_, V = x.shape
    cfg = policy.DynamoConfig(k=k)
    read = _median_ms(lambda: x.sum(), repeats)
    topk_fused = _median_ms(lambda: kernels.topk_softmax(x, k), repeats)
    topk_torch = _median_ms(lambda: torch.log_softmax(x.float(), -1).topk(k, -1), repeats)
    step_fused = _median_ms(lambda: kernels.cuda_dynamo_step(x, cfg, stats=stats), repeats)
    step_torch = _median_ms(lambda: policy.dynamo_step(x, cfg, stats=stats), repeats)
    a = kernels.cuda_dynamo_step(x, cfg, stats=stats)
    b = policy.dynamo_step(x, cfg, stats=stats)
    agree = ((a.n == b.n) & (a.tokens == b.tokens).all(-1)).float().mean().item()
    return {"B": B, "V": V, "H": H_, "k": k, "dtype": dtype_name, "read_ms": read,
            "topk_fused_ms": topk_fused, "topk_torch_ms": topk_torch, "step_fused_ms": step_fused,
            "step_torch_ms": step_torch,
            "agree": agree, "fused_n_histogram": torch.bincount(a.n, minlength=H_ + 1)[1:].tolist(),
            "reference_n_histogram": torch.bincount(b.n, minlength=H_ + 1)[1:].tolist()}


if __name__ == "__main__":
    sys.exit(main())
