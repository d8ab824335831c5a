"""The decoding loop's own work: torch ops per step outside the forward, and speculative with heads
whose drafts fail.

Not a test. Usage::

    python benchmarks/bench_loop.py [--prompts 4] [--failing-prompts 12]

1. Torch ops per step outside the step's forward (``_Decoder.feed``), counted with a
   ``TorchDispatchMode`` over held-out prompts (the stdlib test split, 192 tokens each, 64 new tokens,
   greedy; after a warm-up call, which measures the step cost): the unembedding, the policy, the heads'
   catch-up and the prefill's share are included.
   The count does not depend on timing noise except through the drafting decisions, which read the
   step costs measured at start-up: `speculative`'s count moves by a few percent between runs, the
   others' not at all (copy this file into an earlier checkout to compare trees).
2. Heads whose drafts fail: the bundled model with the signs of heads 2..H's output norms
   randomised; ``ar``, ``speculative`` with joint drafts only (``hybrid=False``) and the hybrid, each
   prompt decoded by all three in alternating order, twice; speed-up = median over prompts of the
   faster run's time ratio against ``ar``.
3. Batches: ragged-length batches of ``--batch-size`` held-out prompts (cut at random lengths of 64-192
   tokens), 64 new tokens, greedy and sampled (temperature 0.7): each strategy with finished rows
   leaving the batch (``decoding.RETIRE_FINISHED``, the default) and without, all settings of a batch
   in rotating order, ``--rounds`` times; per setting the median over batches of the fastest round's
   time ratio (ar without retiring / the setting), and the batch's tokens per step (new tokens /
   (rows x the longest row's steps)) beside the rows' own mean.
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


def randomise_head_signs(model) -> list:
    """Flip the signs of heads 2..H's output-norm weights at random (seed 0): drafts that are never
    accepted. Returns the weights as they were."""
    saved = [norm.weight.detach().clone() for norm in model.head_norms[1:]]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in model.head_norms[1:]:
            signs = torch.randint(0, 2, norm.weight.shape, generator=g).float().mul(2).sub(1)
            norm.weight.mul_(signs.to(norm.weight.dtype))
    return saved


def failing_heads(model, stats, prompts) -> dict:
    saved = randomise_head_signs(model)
    try:
        return _failing_heads(model, stats, prompts)
    finally:  # the caller's model gets its heads back
        with torch.no_grad():
            for norm, w in zip(model.head_norms[1:], saved):
                norm.weight.copy_(w)


def _failing_heads(model, stats, prompts) -> dict:
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


def batches(model, stats, tok, batch_size: int, n_batches: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = prompts_from_test_split(tok, batch_size * n_batches, 192)
    if len(rows) < batch_size * n_batches:
        raise SystemExit(f"the test split has {len(rows)} prompts of 384+ tokens, {batch_size * n_batches} asked")
    groups = []
    for i in range(n_batches):
        cut = [p[0, 192 - int(torch.randint(64, 193, (1,), generator=g)):]
               for p in rows[i * batch_size:(i + 1) * batch_size]]
        S = max(len(c) for c in cut)
        ids = torch.zeros(len(cut), S, dtype=torch.long)
        mask = torch.zeros(len(cut), S, dtype=torch.long)
        for r, c in enumerate(cut):
            ids[r, S - len(c):], mask[r, S - len(c):] = c, 1
        groups.append((ids, mask))
    settings = [(s, mode, retire) for mode in ("greedy", "sampled") for s in ("ar", "dynamo", "speculative", "lookup")
                for retire in (True, False)]

    def run(ids, mask, s, mode, retire):
        decoding.RETIRE_FINISHED = retire
        try:
            return sample(model, ids, mask, strategy=s, max_new_tokens=64, stats=stats, eps_b=0.03,
                          do_sample=mode == "sampled", temperature=0.7, generator=torch.Generator().manual_seed(0),
                          return_dict_in_generate=True)
        finally:
            decoding.RETIRE_FINISHED = True

    for st in settings:  # warm-up: step costs measured
        run(*groups[0], *st)
    times, tps = collections.defaultdict(list), {}
    for r in range(rounds):
        for i, (ids, mask) in enumerate(groups):
            k = (r * len(groups) + i) % len(settings)
            for st in settings[k:] + settings[:k]:
                t0 = time.perf_counter()
                out = run(ids, mask, *st)
                times[st, i].append(time.perf_counter() - t0)
                if r == 0:
                    tps.setdefault(st, []).append((int(out.new_tokens.sum()), int(out.steps.max()) * len(out.steps),
                                                   float(out.tokens_per_step.mean())))
    res = {}
    for st in settings:
        s, mode, retire = st
        base = ("ar", mode, False)
        name = f"{s}/{mode}" + ("" if retire else " (rows kept to the end)")
        res[name] = {"speedup_vs_ar": round(statistics.median(min(times[base, i]) / min(times[st, i])
                                                              for i in range(len(groups))), 3),
                     "ms_per_batch": round(1e3 * statistics.median(min(times[st, i]) for i in range(len(groups))), 1),
                     "batch_tokens_per_step": round(sum(a for a, _, _ in tps[st]) / sum(b for _, b, _ in tps[st]), 3),
                     "row_tokens_per_step": round(statistics.mean(c for _, _, c in tps[st]), 3)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--failing-prompts", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only-batches", action="store_true", help="section 3 alone (into --out)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/loop_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    prompts = prompts_from_test_split(tok, max(args.prompts, args.failing_prompts), 192)
    info = machine_info()
    result, lines = {"machine": info}, [f"Decoding loop, bundled model, 64 new tokens. Machine: {machine_line(info)}."]
    if not args.only_batches:
        ops = {s: op_counts(model, stats, prompts[:args.prompts], s) for s in ("ar", "lookup", "speculative")}
        fail = failing_heads(model, stats, prompts[:args.failing_prompts])
        result.update(ops_per_step=ops, failing_heads=fail)
        lines += ["", f"| torch ops per step (B=1, greedy, {args.prompts} prompts) | outside the forward "
                  "| the forward |",
                  "|---|---:|---:|"]
        lines += [f"| {s} | {c.get('loop', 0)} | {c.get('forward', 0)} |" for s, c in ops.items()]
        lines += ["", f"| heads 2..H with randomised output-norm signs (B=1, greedy, {args.failing_prompts} prompts) | "
                  "tokens/step | accepted drafts | speed-up vs ar |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {v['tokens_per_step']} | {v['accepted']} | {v['speedup_vs_ar']} |" for s, v in fail.items()]
    bat = batches(model, stats, tok, args.batch_size, args.batches, args.rounds)
    result["batches"] = {"batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds, "rows": bat}
    lines += ["", f"| B={args.batch_size}, ragged prompts ({args.batches} batches, eps_b 0.03) | ms per batch | "
              "speed-up vs ar | batch tokens/step | rows' tokens/step |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {s} | {v['ms_per_batch']} | {v['speedup_vs_ar']} | {v['batch_tokens_per_step']} | "
              f"{v['row_tokens_per_step']} |" for s, v in bat.items()]
    Path(args.out).write_text(json.dumps(result, indent=2))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
