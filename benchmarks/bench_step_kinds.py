"""What each kind of decoding step costs inside the loop, and what its parts cost.

Not a test. Usage::

    python benchmarks/bench_step_kinds.py                      # B = 1, 16 held-out windows
    python benchmarks/bench_step_kinds.py --batch-size 8 --prompts 24 --failing

Runs ``ar``, ``lookup`` and ``speculative`` (greedy, 64 new tokens, the bundled model, one torch
thread) on held-out windows of 192 tokens from the stdlib test split (``--failing``: heads 2..H's
output-norm signs randomised first, as ``bench_loop.py`` does), one warm-up call each, then times
every step of the loop by its kind (heads in the forward, tokens fed, whether the joint was
evaluated) and the joint's parts per call (the heads' catch-up, a no-op where they are current;
the joint's draft: the policy and the sizing).
A step's time is wall clock around ``_Decoder.step`` (everything the loop does for it); "x ar step"
is its median over the median ``ar`` step of the same run. Writes JSON (``--out``) and a Markdown
table beside it.
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

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_loop import randomise_head_signs  # noqa: E402
from bench_policy_impl import prompts_from_test_split  # noqa: E402

from dynamo_sampling import decoding, sample  # noqa: E402
from dynamo_sampling.pretrained import load_pretrained  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402

PARTS = ("_catch_up_heads", "_joint_draft", "_policy")


def _instrument(steps: list, parts: dict):
    """Wrap the loop's methods: every step appends (strategy, heads, T, kept tokens, joint evaluated,
    seconds) to ``steps``; every call of a part appends its seconds to ``parts[name]``. Returns an
    undo function."""
    cls, saved = decoding._Decoder, {}

    def timed(name, fn):
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            out = fn(self, *a, **k)
            parts[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    def step(self, streamer):
        t0 = time.perf_counter()
        out = saved["step"](self, streamer)
        steps.append((self.strategy, self.step_heads, self._fed_T, sum(self.kept_h), any(self.joint_eval_h),
                      time.perf_counter() - t0))
        return out

    def feed(self, prop, T, rows=None):
        self._fed_T = T
        return saved["feed"](self, prop, T, rows)

    for name in ("step", "feed") + PARTS:
        saved[name] = getattr(cls, name)
    cls.step, cls.feed = step, feed
    for name in PARTS:
        setattr(cls, name, timed(name, saved[name]))
    return lambda: [setattr(cls, n, f) for n, f in saved.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--failing", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_kinds_cpu.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    if a.failing:
        randomise_head_signs(model)
    prompts = prompts_from_test_split(tok, a.prompts, 192)
    batches = [torch.cat(prompts[i:i + a.batch_size]) for i in range(0, len(prompts), a.batch_size)]
    steps, parts = [], collections.defaultdict(list)
    undo = _instrument(steps, parts)
    try:
        totals = {}
        for strategy in ("ar", "lookup", "speculative"):
            n0 = len(steps)
            sample(model, batches[0], max_new_tokens=64, stats=stats, strategy=strategy)  # warm-up: the cost tables of this context
            del steps[n0:]
            parts.clear()  # only speculative calls them: its own calls remain
            t0 = time.perf_counter()
            for b in batches:
                sample(model, b, max_new_tokens=64, stats=stats, strategy=strategy)
            totals[strategy] = time.perf_counter() - t0
    finally:
        undo()
    kinds = collections.defaultdict(list)
    for strategy, heads, T, kept, joint, sec in steps:
        kinds[(strategy, heads, T, joint)].append((kept, sec))
    ar_ms = statistics.median(s for _, s in kinds[("ar", 1, 1, False)]) * 1e3
    rows = []
    for (strategy, heads, T, joint), v in sorted(kinds.items()):
        ms = statistics.median(s for _, s in v) * 1e3
        rows.append(dict(strategy=strategy, heads=heads, T=T, joint_evaluated=joint, steps=len(v),
                         median_ms=round(ms, 3), x_ar_step=round(ms / ar_ms, 2),
                         kept_per_step=round(sum(k for k, _ in v) / len(v), 2)))
    part_rows = [dict(part=n, calls=len(parts[n]), mean_ms=round(statistics.mean(parts[n]) * 1e3, 3),
                      median_ms=round(statistics.median(parts[n]) * 1e3, 3)) for n in PARTS if parts[n]]
    speedup = {s: round(totals["ar"] / t, 3) for s, t in totals.items()}
    head = (f"Steps by kind, B={a.batch_size}, {a.prompts} held-out windows of 192 tokens, greedy, 64 new tokens"
            f"{', failing heads' if a.failing else ''}. Machine: {machine_line(machine_info())}.")
    lines = [head, "", "| strategy | heads | tokens fed | joint evaluated | steps | median ms | x ar step | kept/step |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['strategy']} | {r['heads']} | {r['T']} | {'yes' if r['joint_evaluated'] else 'no'} | {r['steps']} | "
              f"{r['median_ms']} | {r['x_ar_step']} | {r['kept_per_step']} |" for r in rows]
    lines += ["", "| speculative's joint, per call | calls | mean ms | median ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['part']} | {r['calls']} | {r['mean_ms']} | {r['median_ms']} |" for r in part_rows]
    lines += ["", "| strategy | seconds | speed-up vs ar |", "|---|---:|---:|"]
    lines += [f"| {s} | {round(t, 3)} | {speedup[s]} |" for s, t in totals.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.write_text(json.dumps(dict(batch_size=a.batch_size, prompts=a.prompts, failing=a.failing,
                                   machine=machine_line(machine_info()), steps=rows, parts=part_rows, seconds=totals,
                                   speedup_vs_ar=speedup), indent=1))
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
