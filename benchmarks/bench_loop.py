"""The decoding loop's own work: torch ops per step outside the forward, and speculative with heads
whose drafts fail.

Not a test. Usage::

    python benchmarks/bench_loop.py [--prompts 4] [--failing-prompts 12]

1. Torch ops per step outside the step's forward (``_Decoder.feed``), counted with a
   ``TorchDispatchMode`` over held-out prompts (the stdlib test split, 192 tokens each, 64 new tokens,
   greedy; after a warm-up call, which measures the step cost): the unembedding, the policy, the heads'
   catch-up and the prefill's share are included.
   The count is deterministic, so it compares trees exactly (copy this file into an earlier checkout
   and run it there).
2. Heads whose drafts fail: the bundled model with the signs of heads 2..H's output norms
   randomised; ``ar``, ``speculative`` with joint drafts only (``hybrid=False``) and the hybrid, each
   prompt decoded by all three in alternating order, twice; speed-up = median over prompts of the
   faster run's time ratio against ``ar``.
JSON to ``--out`` and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_policy_impl import prompts_from_test_split  # noqa: E402
from dynamo_sampling import decoding, load_pretrained, sample  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inside_feed, self.ops = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops["forward" if self.inside_feed else "loop"] += 1
        return func(*args, **(kwargs or {}))


def op_counts(model, stats, prompts, strategy) -> dict:
    counter, feed = _Count(), decoding._Decoder.feed

    def counted_feed(self, *a, **k):
        counter.inside_feed += 1
        try:
            return feed(self, *a, **k)
        finally:
            counter.inside_feed -= 1

    sample(model, prompts[0], max_new_tokens=8, stats=stats, strategy=strategy)  # measures the step cost: not counted
    decoding._Decoder.feed = counted_feed
    try:
        steps = 0
        with counter:
            for p in prompts:
                steps += int(sample(model, p, max_new_tokens=64, stats=stats, strategy=strategy,
                                    return_dict_in_generate=True).steps.sum())
    finally:
        decoding._Decoder.feed = feed
    return {k: round(v / steps, 1) for k, v in counter.ops.items()}


def failing_heads(model, stats, prompts) -> dict:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in model.head_norms[1:]:
            signs = torch.randint(0, 2, norm.weight.shape, generator=g).float().mul(2).sub(1)
            norm.weight.mul_(signs.to(norm.weight.dtype))
    settings = {"ar": dict(strategy="ar"), "speculative, joint drafts only": dict(strategy="speculative", hybrid=False),
                "speculative (hybrid)": dict(strategy="speculative")}
    for kw in settings.values():
        sample(model, prompts[0], max_new_tokens=16, stats=stats, **kw)  # warm-up, step costs measured
    times, counts = collections.defaultdict(list), collections.defaultdict(lambda: [0, 0])
    for r in range(2):
        for i, p in enumerate(prompts):
            for name in (list(settings) if (i + r) % 2 == 0 else list(settings)[::-1]):
                t0 = time.perf_counter()
                out = sample(model, p, max_new_tokens=64, stats=stats, return_dict_in_generate=True, **settings[name])
                times[(name, i)].append(time.perf_counter() - t0)
                if r == 0:
                    counts[name][0] += int(out.steps.sum())
                    counts[name][1] += int(out.accepted.sum())
    n = len(prompts)
    return {name: {"speedup_vs_ar": round(statistics.median(min(times[("ar", i)]) / min(times[(name, i)])
                                                            for i in range(n)), 3),
                   "tokens_per_step": round(64 * n / counts[name][0], 3), "accepted": counts[name][1]}
            for name in settings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--failing-prompts", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/loop_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    prompts = prompts_from_test_split(tok, max(args.prompts, args.failing_prompts), 192)
    ops = {s: op_counts(model, stats, prompts[:args.prompts], s) for s in ("ar", "lookup", "speculative")}
    fail = failing_heads(model, stats, prompts[:args.failing_prompts])
    info = machine_info()
    Path(args.out).write_text(json.dumps({"machine": info, "ops_per_step": ops, "failing_heads": fail}, indent=2))
    lines = [f"Decoding loop, bundled model, B=1, greedy, 64 new tokens. Machine: {machine_line(info)}.", "",
             f"| torch ops per step ({args.prompts} prompts) | outside the forward | the forward |", "|---|---:|---:|"]
    lines += [f"| {s} | {c.get('loop', 0)} | {c.get('forward', 0)} |" for s, c in ops.items()]
    lines += ["", f"| heads 2..H with randomised output-norm signs ({args.failing_prompts} prompts) | tokens/step | "
              "accepted drafts | speed-up vs ar |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {v['tokens_per_step']} | {v['accepted']} | {v['speedup_vs_ar']} |" for s, v in fail.items()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
