"""In-process A/B of a module-level boolean of the library (a switch kept beside a fast path), of
an int constant's two values (``--values``), or of two values of a ``sample()`` keyword (a config
field: ``sample.NAME --values A B``, e.g. ``sample.corpus_draft --values 0 4``).

Runs ``ar`` and the given strategies with the flag off and on, interleaved per prompt (the order
alternating between prompts and rounds), and prints each setting's total time (best of the rounds
per prompt), its speed-up against ``ar`` and its tokens per step, as a table and as JSON::

    python benchmarks/ab_flag.py dynamo_sampling.drafters.MISS_BACKOFF --mode sampled --out results.json

Prompts: ``--prompts`` held-out windows of 192 tokens from the stdlib test split, 64 new tokens, one by
one or (``--batch-size B``) in batches of B, the bundled model, one torch thread. ``--failing``
randomises the signs of heads 2..H's output norms first (drafts that are never accepted), as
``bench_loop.py`` does.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import randomise_head_signs  # noqa: E402
from bench_policy_impl import prompts_from_test_split  # noqa: E402

from dynamo_sampling import sample  # noqa: E402
from dynamo_sampling.pretrained import load_pretrained  # noqa: E402

STRATEGIES = {"speculative": dict(strategy="speculative"), "joint": dict(strategy="speculative", hybrid=False),
              "lookup": dict(strategy="lookup"), "dynamo": dict(strategy="dynamo", eps_b=0.03)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flag", help="module.NAME of a boolean, e.g. dynamo_sampling.drafters.MISS_BACKOFF, or of an "
                                "int with --values, e.g. dynamo_sampling.drafters.PROBE_EVERY --values 16 32, or "
                                "sample.NAME of a sample() keyword (a bool, or an int with --values, e.g. sample.corpus_draft "
                                "--values 0 4)")
    p.add_argument("--values", type=int, nargs=2, default=None, help="an int constant's two settings")
    p.add_argument("--strategies", nargs="+", default=["speculative", "joint"], choices=list(STRATEGIES))
    p.add_argument("--mode", choices=["greedy", "sampled"], default="greedy")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--failing", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    module, name = a.flag.rsplit(".", 1)
    keyword = module == "sample"  # a sample() keyword: passed per call, no module state
    mod = None if keyword else importlib.import_module(module)
    current = (False if a.values is None else 0) if keyword else getattr(mod, name, None)  # a keyword: bool or int
    if a.values is None and not isinstance(current, bool):
        raise SystemExit(f"{a.flag} is not a boolean of {module} (an int constant takes --values A B)")
    if a.values is not None and (isinstance(current, bool) or not isinstance(current, int)):
        raise SystemExit(f"--values needs an int constant; {a.flag} is {current!r}")
    values = (False, True) if a.values is None else tuple(a.values)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    if a.failing:
        randomise_head_signs(model)
    prompts = prompts_from_test_split(tok, a.prompts, 192)
    if a.batch_size > 1:  # the windows are all 192 tokens: batches of B stacked
        prompts = [torch.cat(prompts[i:i + a.batch_size]) for i in range(0, len(prompts), a.batch_size)]
    sampled = a.mode == "sampled"
    settings = {"ar": (current, dict(strategy="ar"))}
    for value in values:
        for s in a.strategies:
            settings[f"{s}/{name}={value}"] = (value, {**STRATEGIES[s], **({name: value} if keyword else {})})

    def run(key, ids, seed):
        value, kw = settings[key]
        if not keyword:
            setattr(mod, name, value)
        g = torch.Generator().manual_seed(seed) if sampled else None
        return sample(model, ids, max_new_tokens=64, stats=stats, do_sample=sampled, generator=g,
                      return_dict_in_generate=True, **kw)

    for key in settings:  # warm-up: step costs, statistics
        run(key, prompts[0][:, :64], 0)
    times, steps = collections.defaultdict(list), collections.Counter()
    keys = list(settings)
    for r in range(a.rounds):
        for i, ids in enumerate(prompts):
            for key in (keys if (i + r) % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                out = run(key, ids, i)
                times[key].append(time.perf_counter() - t0)
                if r == 0:
                    steps[key] += int(out.steps.sum())
    n = len(prompts)
    rows_fed = sum(len(p) for p in prompts)  # prompts: with --batch-size, n batches of them
    tokens = 64 * rows_fed
    best = {k: sum(min(t[i + n * r] for r in range(a.rounds)) for i in range(n)) for k, t in times.items()}
    rows = [dict(setting=k, seconds=round(best[k], 3), speedup_vs_ar=round(best["ar"] / best[k], 3),
                 tokens_per_step=round(tokens / steps[k], 3)) for k in keys]
    print(f"| {a.mode}, B={a.batch_size}, {rows_fed} prompts{', failing heads' if a.failing else ''} | s | vs ar | "
          f"tokens/step |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['seconds']} | {r['speedup_vs_ar']} | {r['tokens_per_step']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(flag=a.flag, mode=a.mode, failing=a.failing, prompts=rows_fed,
                                               batch_size=a.batch_size,
                                               rounds=a.rounds, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
