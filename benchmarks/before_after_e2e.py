"""End-to-end wall time of each strategy at B = 1 and B = 8, for before/after comparisons of two trees.

Run it from each tree (``PYTHONPATH`` set to that tree), alternating, and compare the JSON lines it
prints; each setting is the best of two rounds (load from other processes only ever adds time)::

    for i in 1 2; do for t in /tmp/before /work/main; do
      (cd $t && PYTHONPATH=$t python benchmarks/before_after_e2e.py > /tmp/e2e_$(basename $t)_$i.json); done; done

Prompts: 24 held-out windows of 192 tokens (tokens 192..383 of the stdlib test split's longer files),
64 new tokens; B = 1 runs the first 12 one by one, B = 8 all 24 in three batches. Sampled settings
draw with ``Generator().manual_seed(i)`` per call. The bundled model, one torch thread.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policy_impl import prompts_from_test_split  # noqa: E402

from dynamo_sampling import sample  # noqa: E402
from dynamo_sampling.pretrained import load_pretrained  # noqa: E402

SETTINGS = {"ar/greedy": dict(strategy="ar"), "ar/sampled": dict(strategy="ar", do_sample=True),
            "dynamo/sampled": dict(strategy="dynamo", do_sample=True, eps_b=0.03),
            "dynamo/greedy": dict(strategy="dynamo", eps_b=0.03),
            "speculative/greedy": dict(strategy="speculative"), "lookup/greedy": dict(strategy="lookup")}


def main() -> int:
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    prompts = [p[0] for p in prompts_from_test_split(tok, 24, 192)]
    res = {}
    for B in (1, 8):
        batches = [torch.stack(prompts[i:i + B]) for i in range(0, 24 if B == 8 else 12, B)]
        for name, kw in SETTINGS.items():
            sample(model, batches[0], max_new_tokens=8, stats=stats, **kw)  # warm-up: step costs, statistics
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                for i, b in enumerate(batches):
                    sample(model, b, max_new_tokens=64, stats=stats, generator=torch.Generator().manual_seed(i), **kw)
                best = min(best, time.perf_counter() - t0)
            res[f"B{B} {name}"] = best
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
