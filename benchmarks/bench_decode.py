"""End-to-end decoding benchmark: ``sample()`` per strategy, batch size, greedy/sampled and backend,
and the cost side of a multi-token step on a 1B-shaped model.

Not a test. Usage::

    python benchmarks/bench_decode.py --out decode.json                  # cuda when available, else cpu
    python benchmarks/bench_decode.py --device cpu --smoke --out /tmp/d.json   # tiny sizes, seconds
    python benchmarks/bench_decode.py --skip-1b --batch-sizes 1,8        # the bundled model only

Three parts, in this order and in one process (each variant warmed up first):

1. ``forward_cost``: a random-weight TinyMTP shaped like a 1B model (``BIG_1B``: V = 50304,
   16 layers of d = 2048, 3 heads; bf16 on CUDA) and the bundled model. After a ``--prefix``-token
   prefill, a forward with ``heads=1, T=1`` (an ``ar`` step) against ``heads=H, T=1..H`` with
   every position's logits (the tokens a multi-token step feeds; speculative verification reads
   them all) and ``heads=H, T=H`` with only the last position's logits (a ``dynamo`` step);
   ``ratio`` is each over the ``ar`` step. Rounds are interleaved (every shape once per round). On
   CUDA each shape is also replayed from a captured CUDA graph (``graph_ms``: the launch cost gone).
2. ``decode``: the bundled model (``load_pretrained``, with its co-occurrence statistics) on real
   prompts (``--prompt-len``-token windows of the standard library's test split, bundled
   tokenizer), every strategy of ``decoding.STRATEGIES`` x B in ``--batch-sizes`` x greedy /
   sampled (temperature 0.7, top_k 50: ``sample``'s defaults) x backend (on CUDA ``"cuda"``, the
   fused kernels, ``"torch"``, and ``"cuda+graph"``: the fused kernels with each step's forward
   replayed from a CUDA graph, ``sample(cuda_graph=True)``; on a CPU ``"torch"``), exactly ``--max-new-tokens`` new
   tokens per row (no EOS). Reported: tokens per step (mean over rows), ms per step (wall time
   / steps of the slowest row), tokens/s over the batch, speculative acceptance, and the speed-up
   in tokens/s over ``ar`` with the same B, mode and backend.
3. ``decode_1b``: the 1B-shaped model decoding greedily with ``ar`` and with ``dynamo`` at
   ``eps_b = 0`` without statistics or adaptive threshold (always H tokens a step whatever the
   random heads say: the speed-up a lossy multi-token step would have at full acceptance; the
   blur and Otsu over all k**H cells, which decide nothing here, are timed by bench_kernels.py's
   eps_b = 0 rows), B in ``--batch-sizes``.

Timing: ``time.perf_counter`` with ``torch.cuda.synchronize()`` before and after each run; the
median (and minimum) of ``--repeats`` runs. ``torch.set_num_threads(--threads)`` (default 1).
A variant that fails is recorded under ``errors`` and the others run on; the JSON (``--out``) is
rewritten after every variant, so a run cut short keeps what it measured. Stdout: Markdown tables,
then one JSON summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling import TinyMTP, TinyMTPConfig, kernels, load_pretrained, sample  # noqa: E402
from dynamo_sampling.decoding import STRATEGIES  # noqa: E402
from dynamo_sampling.graphs import cuda_capture  # noqa: E402

#: The cost-side model: about 1.0 B parameters (18 decoder layers of d = 2048 and a 50304-token
#: unembedding), random weights. Speed only: its heads are near uniform.
BIG_1B = dict(vocab_size=50304, n_layer=16, d_model=2048, n_attn_heads=16, d_ff=8192, n_heads=3, max_seq_len=1024)
#: What ``--smoke`` uses instead (a CPU runs the whole script in seconds).
BIG_SMOKE = dict(vocab_size=512, n_layer=2, d_model=64, n_attn_heads=4, d_ff=128, n_heads=3, max_seq_len=256)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn, device: torch.device, repeats: int, warmup: int = 1):
    """(median s, min s, the last run's result) of ``fn()`` over ``repeats`` runs after ``warmup``."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), result


def timed_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 3) -> dict:
    """``{name: (median ms, min ms)}``; every function once per round, so load from other processes
    hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


# ---------------------------------------------------------------- inputs


def stdlib_prompts(tokenizer, n_rows: int, length: int, vocab_size: int):
    """(LongTensor (n_rows, length), source): windows of the standard library's test split (every file
    contributes windows 4 * length apart), else random ids when the split cannot be read."""
    rows = []
    try:
        from dynamo_sampling.corpus import load_split

        for _, text in load_split("test"):
            ids = tokenizer.encode(text).ids
            for start in range(0, len(ids) - length + 1, 4 * length):
                rows.append(ids[start:start + length])
                if len(rows) == n_rows:
                    return torch.tensor(rows, dtype=torch.long), "stdlib test split"
    except Exception as e:  # no standard library source on this machine
        print(f"bench_decode: stdlib prompts unavailable ({type(e).__name__}: {e}); random ids instead",
              file=sys.stderr)
    if rows:  # fewer windows than rows: cycle them
        return torch.tensor([rows[i % len(rows)] for i in range(n_rows)], dtype=torch.long), "stdlib test split"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (n_rows, length), generator=g), "random ids"


def build_big_model(cfg: dict, device: torch.device, dtype: torch.dtype) -> TinyMTP:
    """Random-weight TinyMTP, initialised directly on ``device`` (1B parameters on a CPU would take long)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = TinyMTP(TinyMTPConfig(**cfg))
    return model.to(dtype).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- parts


@torch.inference_mode()
def forward_cost(model, name: str, B: int, prefix: int, repeats: int, device: torch.device) -> list:
    """Rows of part 1 for one model and batch size."""
    H, V = model.n_heads, model.vocab_size
    ids = torch.randint(0, V, (B, prefix + H), generator=torch.Generator().manual_seed(B)).to(device)
    cache = model.new_cache(B, max_len=prefix + H)
    pos = torch.arange(prefix, device=device).expand(B, prefix)
    model(ids[:, :prefix], pos, cache, heads=H, logits_index=torch.full((B, 1), prefix - 1, device=device))
    shapes = [("ar step: heads=1, T=1", 1, 1, False)]
    shapes += [(f"heads={H}, T={T}, all logits", H, T, False) for T in range(1, H + 1)]
    shapes += [(f"dynamo step: heads={H}, T={H}, last logits", H, H, True)]
    fns = {}
    for label, heads, T, last_only in shapes:
        feed = ids[:, prefix:prefix + T]
        feed_pos = (prefix + torch.arange(T, device=device)).expand(B, T)
        index = torch.full((B, 1), T - 1, device=device) if last_only else None
        fns[label] = (lambda feed=feed, feed_pos=feed_pos, heads=heads, index=index:
                      model(feed, feed_pos, cache, heads=heads, logits_index=index))
    timed = timed_interleaved(fns, device, repeats)
    base = timed[shapes[0][0]][0]
    graphed = {}
    if device.type == "cuda":  # the same forwards replayed from CUDA graphs: the launch cost gone
        try:
            replays = {label: cuda_capture(fn, device)[0] for label, fn in fns.items()}
            graphed = timed_interleaved(replays, device, repeats)
        except Exception as e:  # recorded per row; the eager numbers stand
            graphed = {label: (None, f"{type(e).__name__}: {e}") for label in fns}
    rows = []
    for label, heads, T, last_only in shapes:
        row = {"model": name, "B": B, "prefix": prefix, "shape": label, "heads": heads, "T": T,
               "last_logits_only": last_only, "ms": timed[label][0], "min_ms": timed[label][1],
               "ratio_to_ar_step": timed[label][0] / base, "graph_ms": None, "graph_ratio_to_ar_step": None}
        g = graphed.get(label)
        if g is not None and g[0] is not None:
            row["graph_ms"] = g[0]
            row["graph_ratio_to_ar_step"] = g[0] / graphed[shapes[0][0]][0]
        elif g is not None:
            row["graph_error"] = g[1]
        rows.append(row)
    return rows


def decode_run(model, ids, *, strategy, do_sample, backend, stats, max_new_tokens, repeats, device, **overrides):
    """One decode variant: a row of part 2 or 3 (without the speed-up, filled in later). ``backend``
    ``"cuda+graph"``: the fused kernels with the steps' forwards replayed from CUDA graphs."""
    mask = torch.ones_like(ids)
    graph = backend.endswith("+graph")

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        return sample(model, ids, mask, strategy=strategy, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      return_dict_in_generate=True, stats=stats, backend=backend.split("+")[0],
                      cuda_graph=graph, generator=gen, **overrides)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    med, fastest, out = timed_runs(run, device, repeats)
    steps = int(out.steps.max())
    new = int(out.new_tokens.sum())
    drafted = int(out.drafted.sum())
    row = {"strategy": strategy, "B": int(ids.shape[0]), "mode": "sampled" if do_sample else "greedy",
           "backend": backend, "prompt_len": int(ids.shape[1]), "new_tokens": new, "steps_max": steps,
           "tokens_per_step": float(out.tokens_per_step.mean()), "wall_s": med, "min_wall_s": fastest,
           "ms_per_step": 1e3 * med / max(steps, 1), "tokens_per_s": new / med,
           "acceptance": (int(out.accepted.sum()) / drafted) if drafted else None,
           "histogram": out.histogram.sum(0).tolist(), "overrides": overrides}
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return row


def add_speedups(rows: list):
    """``speedup_vs_ar``: tokens/s over the ``ar`` row with the same B, mode and backend;
    ``kept_of_b1``: that speed-up over the same setting's at B = 1 (how much of the single-row
    speed-up a batch keeps; None without a B = 1 row)."""
    ar = {(r["B"], r["mode"], r["backend"]): r["tokens_per_s"] for r in rows if r["strategy"] == "ar"}
    for r in rows:
        base = ar.get((r["B"], r["mode"], r["backend"]))
        r["speedup_vs_ar"] = r["tokens_per_s"] / base if base else None
    one = {(r["strategy"], r["mode"], r["backend"]): r["speedup_vs_ar"] for r in rows if r["B"] == 1}
    for r in rows:
        b1 = one.get((r["strategy"], r["mode"], r["backend"]))
        r["kept_of_b1"] = r["speedup_vs_ar"] / b1 if b1 and r["speedup_vs_ar"] is not None else None


# ---------------------------------------------------------------- report


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    out = []
    if result["forward_cost"]:
        out += ["### Forward cost (ms; ratio to the ar step)", "",
                "| model | B | shape | ms | ratio |", "| --- | ---: | --- | ---: | ---: |"]
        out[-2:] = ["| model | B | shape | ms | ratio | graph ms | graph ratio |",
                    "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['model']} | {r['B']} | {r['shape']} | {r['ms']:.3f} | {r['ratio_to_ar_step']:.2f} | "
                f"{_fmt(r.get('graph_ms'), '.3f')} | {_fmt(r.get('graph_ratio_to_ar_step'), '.2f')} |"
                for r in result["forward_cost"]]
        out.append("")
    for part, title in (("decode", "Decoding, bundled model"), ("decode_1b", "Decoding, 1B-shaped random model")):
        if not result[part]:
            continue
        per_row = result[part][0]["new_tokens"] // result[part][0]["B"]
        out += [f"### {title} ({per_row} new tokens a row)", "",
                "| B | mode | strategy | backend | tokens/step | ms/step | tokens/s | accept | speed-up | of B = 1's |",
                "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {r['B']} | {r['mode']} | {r['strategy']} | {r['backend']} | {r['tokens_per_step']:.2f} | "
                f"{r['ms_per_step']:.2f} | {r['tokens_per_s']:.0f} | {_fmt(r['acceptance'], '.2f')} | "
                f"{_fmt(r['speedup_vs_ar'], '.2f')} | {_fmt(r.get('kept_of_b1'), '.2f')} |" for r in result[part]]
        out.append("")
    if result["errors"]:
        out += ["### Errors", ""] + [f"- {e['where']}: {e['error']}" for e in result["errors"]] + [""]
    return "\n".join(out)


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "cupy": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if kernels.cupy_available():
        import cupy

        info["cupy"] = cupy.__version__
    return info


# ---------------------------------------------------------------- main


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<device>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: B 1,2, 8 new tokens, a small 'big' model")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default 1,8,64)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (smoke 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 64 (smoke 16)")
    ap.add_argument("--prefix", type=int, default=None, help="cached prefix of the forward-cost part (default 256)")
    ap.add_argument("--repeats", type=int, default=None, help="decode runs per variant (default 3, smoke 1)")
    ap.add_argument("--forward-repeats", type=int, default=None, help="forward rounds (default 20, smoke 3)")
    ap.add_argument("--skip-1b", action="store_true", help="no 1B-shaped model (parts 1 and 3 use only the bundled)")
    ap.add_argument("--skip-bundled", action="store_true", help="no bundled model (part 2 skipped)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.batch_sizes = args.batch_sizes or ((1, 2) if smoke else (1, 8, 64))
    args.max_new_tokens = args.max_new_tokens or (8 if smoke else 64)
    args.prompt_len = args.prompt_len or (16 if smoke else 64)
    args.prefix = args.prefix or (32 if smoke else 256)
    args.repeats = args.repeats or (1 if smoke else 3)
    args.forward_repeats = args.forward_repeats or (3 if smoke else 20)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_decode: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    fused = device.type == "cuda" and kernels.cuda_available()
    backends = ("cuda", "torch") if fused else ("torch",)
    if device.type == "cuda":  # the steps' forwards replayed from CUDA graphs
        backends += ("cuda+graph",) if fused else ("torch+graph",)
    big_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "_")
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"decode_{slug}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    result = {"bench": "decode", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(device),
              "args": vars(args), "backends": list(backends), "strategies": list(STRATEGIES), "models": {},
              "forward_cost": [], "decode": [], "decode_1b": [], "errors": []}
    if device.type == "cuda" and not fused:
        result["errors"].append({"where": "setup", "error": "CuPy not importable: backend 'cuda' not measured"})

    def save():
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    def attempt(where: str, fn):
        """fn() or None; a failure is recorded and printed, and the benchmark goes on."""
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            result["errors"].append({"where": where, "error": f"{type(e).__name__}: {e}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    t_start = time.perf_counter()
    print(f"bench_decode on {result['machine'].get('gpu', device)}; backends {backends}; "
          f"strategies {STRATEGIES}; B {args.batch_sizes}; {args.max_new_tokens} new tokens", flush=True)

    # the models
    big = None
    if not args.skip_1b:
        cfg = BIG_SMOKE if smoke else BIG_1B
        t0 = time.perf_counter()
        big = attempt("build 1B-shaped model", lambda: build_big_model(cfg, device, big_dtype))
        if big is not None:
            result["models"]["1b"] = {"config": cfg, "dtype": str(big_dtype), "params": n_params(big),
                                      "build_s": time.perf_counter() - t0}
    bundled = stats = tokenizer = None
    if not args.skip_bundled:
        t0 = time.perf_counter()
        loaded = attempt("load_pretrained", lambda: load_pretrained(device=device))
        if loaded is not None:
            bundled, tokenizer, stats = loaded
            bundled.eval()
            result["models"]["bundled"] = {"config": dict(vars(bundled.config)), "dtype": "float32",
                                           "params": n_params(bundled), "load_s": time.perf_counter() - t0}

    # 1. forward cost
    for name, model in (("1b", big), ("bundled", bundled)):
        if model is None:
            continue
        for B in args.batch_sizes:
            rows = attempt(f"forward_cost {name} B={B}",
                           lambda: forward_cost(model, name, B, args.prefix, args.forward_repeats, device))
            result["forward_cost"] += rows or []
            if rows:
                print(f"forward cost {name} B={B}: " + ", ".join(f"{r['ratio_to_ar_step']:.2f}" for r in rows),
                      flush=True)

    # 2. decoding with the bundled model
    if bundled is not None:
        prompts, source = stdlib_prompts(tokenizer, max(args.batch_sizes), args.prompt_len, bundled.vocab_size)
        result["prompts"] = source
        prompts = prompts.to(device)
        for B in args.batch_sizes:
            for do_sample in (False, True):
                for strategy in STRATEGIES:
                    for backend in backends:
                        where = f"decode {strategy} B={B} {'sampled' if do_sample else 'greedy'} {backend}"
                        row = attempt(where, lambda: decode_run(
                            bundled, prompts[:B], strategy=strategy, do_sample=do_sample, backend=backend,
                            stats=stats, max_new_tokens=args.max_new_tokens, repeats=args.repeats, device=device))
                        if row is not None:
                            result["decode"].append(row)
                            add_speedups(result["decode"])
                            save()
                            print(f"{where}: {row['tokens_per_step']:.2f} tokens/step, "
                                  f"{row['ms_per_step']:.2f} ms/step", flush=True)

    # 3. decoding with the 1B-shaped model: ar vs always-H-tokens dynamo
    if big is not None:
        g = torch.Generator().manual_seed(1)
        ids_all = torch.randint(0, big.vocab_size, (max(args.batch_sizes), args.prompt_len), generator=g).to(device)
        n_new = max(2, args.max_new_tokens // 2)
        for B in args.batch_sizes:
            for strategy, overrides in (("ar", {}), ("dynamo", {"eps_b": 0.0, "alpha_c": 0.0,
                                                                 "adaptive_threshold": False})):
                for backend in (backends if strategy != "ar" else dict.fromkeys((backends[0], backends[-1]))):
                    where = f"decode_1b {strategy} B={B} {backend}"
                    row = attempt(where, lambda: decode_run(
                        big, ids_all[:B], strategy=strategy, do_sample=False, backend=backend, stats=None,
                        max_new_tokens=n_new, repeats=args.repeats, device=device, **overrides))
                    if row is not None:
                        result["decode_1b"].append(row)
                        print(f"{where}: {row['tokens_per_step']:.2f} tokens/step, {row['ms_per_step']:.2f} ms/step",
                              flush=True)
        for r in result["decode_1b"]:  # ar ran eager and graphed: compare every backend with its kind
            kind = r["backend"].endswith("+graph")
            base = next((a for a in result["decode_1b"] if a["strategy"] == "ar" and a["B"] == r["B"]
                         and a["backend"].endswith("+graph") == kind), None)
            r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None

    result["total_s"] = time.perf_counter() - t_start
    save()
    print()
    print(markdown(result))
    summary = {"bench": "decode", "out": str(out_path), "device": result["machine"].get("gpu", str(device)),
               "forward_rows": len(result["forward_cost"]), "decode_rows": len(result["decode"]),
               "decode_1b_rows": len(result["decode_1b"]), "errors": len(result["errors"]),
               "total_s": round(result["total_s"], 1)}
    ratios = [r for r in result["forward_cost"] if r["model"] == "1b" and r["B"] == 1 and r["T"] == 1 and r["heads"] > 1]
    if ratios:
        summary["1b_B1_heads3_T1_over_ar"] = round(ratios[0]["ratio_to_ar_step"], 3)
    print(json.dumps(summary))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
