"""End to end, the C policy against the torch policy (``DynamoConfig.impl``), paired in one process.

Not a test. Usage::

    python benchmarks/bench_policy_impl.py [--rounds 7] [--prompts 8]

Each round decodes the same held-out prompts (the stdlib test split, 192 tokens each, 64 new
tokens) once with ``impl="c"`` and once with ``impl="torch"``, in alternating order, for each
setting; the speed-up of a round is the ratio of the two wall times, and the table gives the median
over rounds. Pairing the two runs within a round cancels the drift of a shared VM, which moves
absolute times by 10-20 % between runs. JSON to ``--out`` and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynamo_sampling import cpu_policy, load_pretrained, sample  # noqa: E402
from dynamo_sampling.corpus import load_split  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402

SETTINGS = {
    "dynamo sampled, eps_b 0.03": dict(strategy="dynamo", do_sample=True, eps_b=0.03),
    "dynamo sampled, eps_b 0 (full joint)": dict(strategy="dynamo", do_sample=True, eps_b=0.0),
    "dynamo greedy, eps_b 0.1 (default)": dict(strategy="dynamo"),
    "speculative greedy": dict(strategy="speculative"),
    "speculative greedy, DynaMo thresholds, eps_b 0.1": dict(strategy="speculative", size_by="thresholds"),
}


def prompts_from_test_split(tok, n: int, length: int) -> list:
    out = []
    for _, text in sorted(load_split("test"), key=lambda d: d[0]):
        ids = tok.encode(text).ids
        if len(ids) >= 2 * length:
            out.append(torch.tensor([ids[length:2 * length]]))
        if len(out) == n:
            break
    return out


def run(model, stats, prompts, kw, impl, batch) -> tuple:
    t0, steps = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        ids = torch.cat(prompts[i:i + batch])
        out = sample(model, ids, max_new_tokens=64, stats=stats, impl=impl, return_dict_in_generate=True,
                     generator=torch.Generator().manual_seed(i), **kw)
        steps += int(out.steps.sum())
    return time.perf_counter() - t0, 64 * len(prompts) / max(steps, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_policy_impl.py", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/policy_impl_cpu.json"))
    a = p.parse_args(argv)
    if not cpu_policy.available():
        print(f"the C policy is unavailable here: {cpu_policy.build_error()}")
        return 1
    torch.set_num_threads(a.threads)
    model, tok, stats = load_pretrained()
    prompts = prompts_from_test_split(tok, a.prompts, 192)
    rows = []
    for batch in a.batch_sizes:
        for name, kw in SETTINGS.items():
            run(model, stats, prompts[:batch], kw, "c", batch)  # warm-up (and the C library's first load)
            times = {"c": [], "torch": []}
            tps = {}
            for r in range(a.rounds):
                for impl in (("c", "torch") if r % 2 == 0 else ("torch", "c")):
                    wall, tps[impl] = run(model, stats, prompts, kw, impl, batch)
                    times[impl].append(wall)
            ratio = statistics.median(t / c for t, c in zip(times["torch"], times["c"]))
            rows.append({"setting": name, "batch": batch, "speedup_c_over_torch": ratio,
                         "tokens_per_s_c": 64 * len(prompts) / statistics.median(times["c"]),
                         "tokens_per_s_torch": 64 * len(prompts) / statistics.median(times["torch"]),
                         "tokens_per_step_c": tps["c"], "tokens_per_step_torch": tps["torch"]})
            print(rows[-1], flush=True)
    meta = {"machine": machine_info(), "machine_line": machine_line(machine_info()), "rounds": a.rounds, "prompts": len(prompts),
            "dtype": str(next(model.parameters()).dtype)}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"C policy against torch policy, end to end, {len(prompts)} held-out prompts x 64 new tokens, "
             f"{meta['dtype']}, median of {a.rounds} paired rounds.  ", f"Machine: {meta['machine_line']}.", "",
             "| setting | B | tokens/step (C / torch) | tokens/s C | tokens/s torch | C / torch speed-up |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['batch']} | {r['tokens_per_step_c']:.2f} / {r['tokens_per_step_torch']:.2f} "
                     f"| {r['tokens_per_s_c']:.0f} | {r['tokens_per_s_torch']:.0f} | {r['speedup_c_over_torch']:.2f}x |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
