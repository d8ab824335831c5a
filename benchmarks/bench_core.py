"""Core costs of one decoding step: the model forward vs the DynaMo step policy.

Not a test. Usage::

    python benchmarks/bench_core.py                    # trained model if present, else random of the bundled shape
    python benchmarks/bench_core.py --random-model     # always the random model of the bundled shape
    python benchmarks/bench_core.py --model-dir DIR --repeats 100

Measured at batch size ``--batch-size`` (default 1) with a KV cache already holding a ``--prefix``-token
prefix (default 128; real test-split tokens when ``runs/data/test.npy`` matches the vocabulary):

* forward with ``heads=1`` and T=1 new token (the ``ar`` step);
* forward with ``heads=H`` and T = 1..H new tokens (``dynamo`` / ``speculative`` steps feed 1..H);
* the step policy ``dynamo_step`` (k = ``--k``, default 50, eps_b 0.1, the other DynamoConfig defaults),
  greedy without statistics, greedy with statistics and sampled with statistics, on the model's
  head logits at the end of the prefix and on synthetic peaked logits (N(0, 4^2) per entry: a
  random model's near-uniform heads let every cell fall below the threshold at once, which is cheap);
* the ratio of each to the ``heads=H, T=1`` forward.

Each number is the median (and the minimum) wall time of ``--repeats`` calls after 5 warm-up calls;
the rounds are interleaved (every measurement once per round) so load from other processes on a
shared machine hits all of them alike (``torch.cuda.synchronize`` around each call on CUDA). Results: a Markdown table on stdout (also ``core_cpu.md``) and JSON in
``benchmarks/results/core_cpu.json``; the last stdout line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling import DynamoConfig, dynamo_step  # noqa: E402
from evals.assets import add_asset_args, assets_or_random, load_assets, machine_info, machine_line  # noqa: E402


def time_interleaved(fns: dict, repeats: int, device) -> dict:
    """``{name: (median_ms, min_ms)}``. 5 warm-up calls each, then ``repeats`` rounds that call every
    function once in turn, so a burst of load from other processes hits all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(5):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(t), 1e3 * min(t)) for name, t in times.items()}


def prefix_tokens(n: int, batch: int, vocab: int) -> torch.Tensor:
    """(batch, n) int64: test-split tokens when available and in the vocabulary, else random ids."""
    path = ROOT / "runs/data/test.npy"
    if path.is_file():
        t = np.load(path)
        if t.size >= batch * n and int(t.max()) < vocab:
            return torch.from_numpy(t[:batch * n].astype(np.int64)).view(batch, n)
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def run(model, stats, prefix: int, batch: int, k: int, repeats: int) -> list:
    dev = next(model.parameters()).device
    H, V = model.n_heads, model.vocab_size
    ids = prefix_tokens(prefix, batch, V).to(dev)
    rows, fns = [], {}

    def forward_fn(heads, T):
        """A forward feeding T tokens after a cached prefix (re-writes the same slots every call)."""
        cache = model.new_cache(batch, max_len=prefix + H)
        pos = torch.arange(prefix, device=dev).expand(batch, prefix)
        last = model(ids, pos, cache, heads=heads)[:, -1]  # (B, heads, V)
        feed = ids[:, :T]
        feed_pos = (prefix + torch.arange(T, device=dev)).expand(batch, T)
        return (lambda: model(feed, feed_pos, cache, heads=heads)), last

    name = "forward heads=1, T=1 (ar step)"
    fns[name], _ = forward_fn(1, 1)
    rows.append({"name": name, "kind": "forward", "heads": 1, "T": 1})
    head_logits = None
    for T in range(1, H + 1):
        name = f"forward heads={H}, T={T}"
        fns[name], last = forward_fn(H, T)
        head_logits = last if head_logits is None else head_logits
        rows.append({"name": name, "kind": "forward", "heads": H, "T": T})
    cfg = DynamoConfig(k=k)
    gen = torch.Generator(device=dev).manual_seed(0)
    # a random model's heads are near uniform, so every cell falls below the threshold at once; the
    # synthetic logits (N(0, 4^2) per entry) are peaked like a trained model's and make the policy work
    synthetic = 4.0 * torch.randn(batch, H, V, generator=torch.Generator().manual_seed(0)).to(dev)
    policies = []
    for src, logits in (("model logits", head_logits), ("synthetic logits", synthetic)):
        policies.append((f"policy greedy, no statistics ({src})", logits, None, False))
        if stats is not None:
            policies += [(f"policy greedy, statistics ({src})", logits, stats, False),
                         (f"policy sampled, statistics ({src})", logits, stats, True)]
    for name, logits, st, do_sample in policies:
        fn = lambda logits=logits, st=st, do_sample=do_sample: dynamo_step(  # noqa: E731
            logits, cfg, stats=st, do_sample=do_sample, temperature=0.7, top_k=50, generator=gen)
        fns[name] = fn
        rows.append({"name": name, "kind": "policy", "heads": H, "T": None,
                     "tokens_chosen": fn().n.float().mean().item()})
    timed = time_interleaved(fns, repeats, dev)
    for r in rows:
        r["ms"], r["min_ms"] = timed[r["name"]]
    base = next(r for r in rows if r["kind"] == "forward" and r["heads"] == H and r["T"] == 1)
    for r in rows:
        r["ratio_to_forward_H_T1"] = r["ms"] / base["ms"]
    return rows


def markdown(rows, meta) -> str:
    lines = [f"Core step costs — {meta['model']}; B={meta['batch_size']}, prefix {meta['prefix']} tokens, "
             f"k={meta['k']}, median of {meta['repeats']}.  ", f"Machine: {meta['machine_line']}.", "",
             "| measurement | median ms | min ms | median / forward(heads=H, T=1) | tokens chosen |",
             "|---|---|---|---|---|"]
    for r in rows:
        n = f"{r['tokens_chosen']:.2f}" if "tokens_chosen" in r else ""
        lines.append(f"| {r['name']} | {r['ms']:.3f} | {r['min_ms']:.3f} | {r['ratio_to_forward_H_T1']:.2f} | {n} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_core.py", description=__doc__.split("\n")[0])
    add_asset_args(p, tokenizer=False, stats=True)
    p.add_argument("--prefix", type=int, default=128, help="tokens already in the cache (default 128)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--k", type=int, default=50, help="top-k per head of the step policy (default 50)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/core_cpu.json"))
    args = p.parse_args(argv)
    if args.model_dir or args.random_model:
        assets = load_assets(args, need_tokenizer=False)
    else:
        assets = assets_or_random(None, threads=args.threads)
    model = assets.model.to(args.device)
    rows = run(model, assets.stats, args.prefix, args.batch_size, args.k, args.repeats)
    machine = machine_info()
    meta = {"model": assets.info["model"], "model_config": assets.info.get("config"), "stats": assets.info.get("stats"),
            "batch_size": args.batch_size, "prefix": args.prefix, "k": args.k, "repeats": args.repeats,
            "device": args.device, "machine": machine, "machine_line": machine_line(machine)}
    table = markdown(rows, meta)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps({r["name"]: round(r["ms"], 4) for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
