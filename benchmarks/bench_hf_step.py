"""What a decoding step costs with the Hugging Face adapter (``models.hf.HFMTP``): the reference path
(``HFMTP._reference_forward``: heads one after another, every row of every head unembedded; as fast as the
adapter before the feed plan, within noise) against the fast path (one feed plan per forward, only the rows
the decoding loop uses unembedded, by ``head_logits``).

Not a test. Usage::

    python benchmarks/bench_hf_step.py                     # CPU, float32, 1 thread, 30 rounds
    python benchmarks/bench_hf_step.py --repeats 50 --device cuda --dtype bfloat16

The model is Pythia-160m-shaped with random weights (GPT-NeoX, hidden 768, 12 layers, 12 attention heads,
vocabulary 50304, partial rotary 0.25, parallel residual; ~162M parameters, built from a ``GPTNeoXConfig``,
nothing downloaded) with DynaMo heads 2..3 and sdpa attention. B=1; the cache holds a 128-token prefix
(``--prefix``) and has ``--prefix + 32`` slots; every timed call feeds the positions right after the prefix
(re-writing the same slots). The steps timed, each before and after:

* ``heads=1, T=1`` - an ``ar`` step: head 1's logits at one token;
* ``heads=3, T=1`` - a ``dynamo`` step: all heads' logits at one token;
* ``heads=3, T=3`` - a ``speculative`` step feeding a 3-token draft. Before: all 3 heads on all 3 rows (what
  the loop got from ``forward``). After: ``forward(..., output_hidden=True)``, then ``head_logits`` of head 1
  on the 3 rows (verification) and of heads 2..3 on the last row (the next draft), as the loop unembeds them.

Plus the fast path with heads 2..3 as one vmapped call (``HFMTP.grouped_heads = True``; the default runs
them one after another), and the stem alone (the base's layers 1..L-1, the same in both paths). Each number
is the median (and minimum) of ``--repeats`` rounds after 5 warm-up calls; the rounds are interleaved (every
variant once per round, ``benchmarks.bench_core.time_interleaved``), so load from other processes hits all
of them alike. Results: a Markdown table on stdout and JSON in ``benchmarks/results/hf_step_cpu.json``
(``hf_step_cuda.json``, ``hf_step_cuda_bfloat16.json``, ... for other devices and dtypes); the last stdout
line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from benchmarks.bench_core import time_interleaved  # noqa: E402
from dynamo_sampling.models.hf import HFMTP  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402

PYTHIA_160M = dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                   use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu")
N_HEADS = 3


def build_model(device, dtype) -> HFMTP:
    """Pythia-160m-shaped GPT-NeoX with random weights and heads 2..3, eval mode."""
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_160M, attn_implementation="sdpa")).eval()
    model = HFMTP(base, n_heads=N_HEADS, generator=torch.Generator().manual_seed(1)).eval()
    return model.to(device=device, dtype=dtype)


def step_fns(model: HFMTP, prefix: int) -> dict:
    """``{name: fn}`` for every variant; the cache already holds ``prefix`` tokens."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, prefix + N_HEADS), generator=gen).to(dev)
    cache = model.new_cache(1, max_len=prefix + 32)
    last = torch.full((1, 1), prefix - 1, device=dev)
    model(ids[:, :prefix], torch.arange(prefix, device=dev)[None], cache, logits_index=last)  # prefill every head
    cache.lengths.fill_(prefix)

    def feed(T):
        return ids[:, prefix:prefix + T], (prefix + torch.arange(T, device=dev))[None]  # (1, T) each

    def fast(heads, T, grouped):
        x, pos = feed(T)

        def fn():
            model.grouped_heads = grouped
            if T == 1:
                return model(x, pos, cache, heads=heads)  # (1, 1, heads, V)
            hidden = model(x, pos, cache, heads=heads, output_hidden=True)  # (1, T, heads, d)
            verify = model.head_logits(hidden[:, :, 0])  # head 1 on every fed row: (1, T, V)
            draft = model.head_logits(hidden[:, -1, 1:])  # heads 2..H on the last kept row: (1, H - 1, V)
            return verify, draft
        return fn

    def reference(heads, T):
        x, pos = feed(T)
        return lambda: model._reference_forward(x, pos, cache, heads=heads)  # (1, T, heads, V)

    def stem(T):
        x, pos = feed(T)
        return lambda: model.stem_forward(x, pos, cache)

    fns = {}
    grouped_by_default = model.grouped_heads
    other = "after, heads one by one" if grouped_by_default else "after, heads 2..3 grouped (vmap)"
    for heads, T in ((1, 1), (N_HEADS, 1), (N_HEADS, N_HEADS)):
        fns[("before", heads, T)] = reference(heads, T)
        fns[("after", heads, T)] = fast(heads, T, grouped_by_default)
        if heads > 2:
            fns[(other, heads, T)] = fast(heads, T, grouped=not grouped_by_default)
    for T in (1, N_HEADS):
        fns[("stem only", None, T)] = stem(T)
    return fns


def markdown(rows: list, meta: dict) -> str:
    lines = [f"HF adapter step costs: {meta['model']}, {meta['dtype']}, {meta['device']}, B=1, prefix "
             f"{meta['prefix']} tokens, median of {meta['repeats']} interleaved rounds.  ",
             f"Machine: {meta['machine_line']}.", "",
             "| path | step | median ms | min ms | / same path heads=1, T=1 | before / after |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        step = f"heads={r['heads']}, T={r['T']}" if r["heads"] else f"T={r['T']}"
        rel = f"{r['ratio_to_h1_t1']:.2f}x" if r.get("ratio_to_h1_t1") else ""
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        lines.append(f"| {r['path']} | {step} | {r['ms']:.2f} | {r['min_ms']:.2f} | {rel} | {speedup} |")
    return "\n".join(lines)


@torch.inference_mode()
def run(model: HFMTP, prefix: int, repeats: int) -> list:
    default = model.grouped_heads
    fns = step_fns(model, prefix)
    timed = time_interleaved(fns, repeats, next(model.parameters()).device)
    model.grouped_heads = default
    rows = [{"path": path, "heads": heads, "T": T, "ms": timed[(path, heads, T)][0],
             "min_ms": timed[(path, heads, T)][1]} for path, heads, T in fns]
    for r in rows:
        own = timed.get(("after" if r["path"].startswith("after") else r["path"], 1, 1))
        if own is not None and r["heads"]:
            r["ratio_to_h1_t1"] = r["ms"] / own[0]
        if r["path"] == "after":
            r["speedup"] = timed[("before", r["heads"], r["T"])][0] / r["ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_hf_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--prefix", type=int, default=128, help="tokens already in the cache (default 128)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None,
                   help="JSON file (default: benchmarks/results/hf_step_{cpu,cuda}[_dtype].json)")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        args.out = str(ROOT / f"benchmarks/results/hf_step_{torch.device(args.device).type}{suffix}.json")
    torch.set_num_threads(args.threads)
    model = build_model(torch.device(args.device), getattr(torch, args.dtype))
    rows = run(model, args.prefix, args.repeats)
    machine = machine_info()
    n_params = sum(p.numel() for p in model.base.parameters())
    meta = {"model": f"Pythia-160m-shaped GPT-NeoX, random weights ({n_params / 1e6:.0f}M base parameters), "
                     f"{N_HEADS} heads", "model_config": PYTHIA_160M, "attn_implementation": "sdpa",
            "dtype": args.dtype, "device": args.device, "prefix": args.prefix, "cache_max_len": args.prefix + 32,
            "repeats": args.repeats, "machine": machine, "machine_line": machine_line(machine)}
    print(markdown(rows, meta))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(json.dumps({f"{r['path']} heads={r['heads']} T={r['T']}": round(r["ms"], 3) for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
