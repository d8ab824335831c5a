"""This tree against an earlier checkout, on the same prompts: decoding speed and step costs.

Not a test. Usage::

    git worktree add /tmp/before 67cc7ff        # any earlier commit with load_pretrained + sample
    python benchmarks/bench_before_after.py --before /tmp/before --rounds 3

Each round runs one subprocess per tree (before, then this one; alternating rounds start with the
other), each on one torch thread, decoding the same held-out prompts (the stdlib test split, 128
tokens each) greedily for 64 new tokens per strategy at B = 1, then times the step costs both trees
can run (forwards through the model protocol, whole steps through ``sample()``) on the first prompt.
A tree's tokens/s and step costs are its best round
(load from other processes only slows a run down). This tree runs in each ``--dtypes`` entry; the
earlier one in its own default. JSON to ``--out`` and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import dynamo_sampling
from dynamo_sampling import load_pretrained, sample
from dynamo_sampling.corpus import load_split
strategies, n_prompts, dtype = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]
kw = {} if dtype == "default" else {"dtype": dtype}
model, tok, stats = load_pretrained(**kw)
docs = sorted(load_split("test"), key=lambda d: d[0])
prompts = []
for _, text in docs:
    ids = tok.encode(text).ids
    if len(ids) >= 400:
        prompts.append(torch.tensor([ids[200:328]]))
    if len(prompts) == n_prompts:
        break
res = {"file": dynamo_sampling.__file__, "dtype": str(next(model.parameters()).dtype)}
for s in strategies:
    sample(model, prompts[0], strategy=s, max_new_tokens=8, stats=stats)  # warm-up
    t0, toks, outs = time.perf_counter(), 0, []
    for p in prompts:
        out = sample(model, p, strategy=s, max_new_tokens=64, stats=stats)
        toks += out.shape[1] - p.shape[1]
        outs.append(out[0, p.shape[1]:].tolist())
    res[s] = {"tokens_per_s": toks / (time.perf_counter() - t0), "tokens": outs}
# step costs, as both trees can run them: forwards through the model protocol (every logit), and
# whole steps through sample() as (time of 33 new tokens - time of 1) / (steps of 33 - steps of 1)
H, P = model.n_heads, prompts[0][:, :128]
cache = model.new_cache(1, max_len=128 + H)
with torch.inference_mode():
    model(P, torch.arange(128)[None], cache, heads=H)
    fwd = {f"forward heads={h}, T={T}": (h, T) for h, T in ((1, 1), (H, 1), (H, H))}
    times = {k: [] for k in fwd}
    for r in range(33):
        for k, (h, T) in fwd.items():
            t0 = time.perf_counter()
            model(P[:, :T], (128 + torch.arange(T))[None], cache, heads=h)
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
steps = {"step ar": dict(strategy="ar"), "step dynamo sampled eps_b 0.03": dict(strategy="dynamo", do_sample=True,
         eps_b=0.03), "step speculative greedy": dict(strategy="speculative")}
stimes = {(k, n): [] for k in steps for n in (1, 33)}
nsteps = {}
for r in range(6):
    for (k, n) in stimes:
        t0 = time.perf_counter()
        o = sample(model, P, max_new_tokens=n, stats=stats, return_dict_in_generate=True,
                   generator=torch.Generator().manual_seed(0), **steps[k])
        if r:
            stimes[(k, n)].append(time.perf_counter() - t0)
        nsteps[(k, n)] = int(o.steps[0])
med = lambda v: sorted(v)[len(v) // 2]
res["step_ms"] = {k: 1e3 * med(v) for k, v in times.items()}
for k in steps:
    res["step_ms"][k] = 1e3 * (med(stimes[(k, 33)]) - med(stimes[(k, 1)])) / max(nsteps[(k, 33)] - nsteps[(k, 1)], 1)
    res["step_ms"][k + " (tokens/step)"] = 33 / nsteps[(k, 33)]
print(json.dumps(res))
"""


def run_tree(tree: Path, strategies, n_prompts, dtype) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, ",".join(strategies), str(n_prompts), dtype],
                         env=env, cwd=str(tree), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_before_after.py", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="a checkout of the earlier commit")
    p.add_argument("--strategies", nargs="+", default=["ar"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--n-prompts", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/before_after_cpu.json"))
    args = p.parse_args(argv)
    runs = {"before": (Path(args.before), "default")}
    runs.update({f"after {d}": (ROOT, d) for d in args.dtypes})
    best, step_ms = {}, {}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            tree, dtype = runs[name]
            res = run_tree(tree, args.strategies, args.n_prompts, dtype)
            for k, v in res["step_ms"].items():  # fastest round (tokens/step are the same every round)
                step_ms.setdefault(name, {})[k] = min(v, step_ms.get(name, {}).get(k, float("inf")))
            for s in args.strategies:
                key = (name, s)
                if key not in best or res[s]["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = {**res[s], "dtype": res["dtype"]}
    sys.path.insert(0, str(ROOT))
    import torch
    from evals.assets import machine_info, machine_line
    torch.set_num_threads(1)  # as the runs themselves (for the machine line)
    machine = machine_info()
    lines = [f"Before/after — bundled model, {args.n_prompts} held-out prompts x 64 new tokens, greedy, B=1, "
             f"1 thread, best of {args.rounds} alternating rounds.  ", f"Machine: {machine_line(machine)}.", "",
             "| tree | strategy | dtype | tokens/s | vs before | same tokens as before |", "|---|---|---|---:|---:|---|"]
    rows = []
    for (name, s), v in best.items():
        base = best[("before", s)]
        row = {"tree": name, "strategy": s, "dtype": v["dtype"], "tokens_per_s": v["tokens_per_s"],
               "vs_before": v["tokens_per_s"] / base["tokens_per_s"], "same_tokens": v["tokens"] == base["tokens"]}
        rows.append(row)
        lines.append(f"| {name} | {s} | {row['dtype'].replace('torch.', '')} | {row['tokens_per_s']:.1f} | "
                     f"{row['vs_before']:.2f} | {row['same_tokens']} |")
    names = list(runs)
    lines += ["", "Step costs (ms, fastest round; forwards unembed every row of every head, as the earlier code "
              "did; a whole step is (time of 33 new tokens - time of 1) / steps):", "",
              "| measurement | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in step_ms["before"]:
        fmt = "{:.2f}" if k.endswith("(tokens/step)") else "{:.3f}"
        lines.append(f"| {k} | " + " | ".join(fmt.format(step_ms[n][k]) for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "before": str(args.before), "rows": rows, "step_ms": step_ms},
                              indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps({f"{r['tree']}/{r['strategy']}": round(r["vs_before"], 3) for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
