"""What one decoding step costs, by component, in each dtype: the premise of every speed-up.

Not a test. Usage::

    python benchmarks/bench_step.py                     # bundled model, fp32 and bf16, 1 thread, B=1
    python benchmarks/bench_step.py --batch-size 8 --repeats 30 --dtypes bfloat16

For each dtype, on the bundled model with a KV cache holding a 128-token prefix of held-out Python
(the stdlib test split), every measurement interleaved with the others (one call of each per round,
median of ``--repeats`` rounds after warm-up, so load from elsewhere hits all alike):

* model parts: the stem, the grouped heads, the unembedding of 1 and of 3 rows;
* forwards as the loop runs them: head 1 on 1 token (an ``ar`` step); all heads on 1 and on H tokens
  (head 1 unembedded at every fed row, heads 2..H at one row); and the same three on the per-layer
  reference path with every row of every head unembedded (what the model did before the grouped
  path; the "before" column);
* the step policy on the model's own head logits: sampled at eps_b 0.03 with statistics, sampled at
  eps_b 0 with statistics (the paper's full joint), and the speculative draft (greedy, k = 10);
* whole steps, from ``sample()``: (time of 33 new tokens - time of 1) / (steps of 33 - steps of 1),
  for ar, dynamo sampled at eps_b 0.03 and at 0, speculative greedy and lookup greedy.

Writes ``benchmarks/results/step_cpu.json`` (or ``--out``) and a Markdown table beside it; the last
stdout line is a JSON summary of the ratios the multi-token-step issue sets targets for.
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

from dynamo_sampling import DynamoConfig, dynamo_step, load_pretrained, sample  # noqa: E402
from dynamo_sampling.models.tiny import grouped_block  # noqa: E402
from dynamo_sampling.pretrained import resolve_dtype  # noqa: E402
from benchmarks.bench_core import time_interleaved  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402


def held_out_tokens(tokenizer, n: int) -> list:
    """The first ``n`` tokens of the stdlib test split's longest files, joined (held-out code)."""
    from dynamo_sampling.corpus import load_split
    docs = sorted(load_split("test"), key=lambda d: -len(d[1]))
    ids = []
    for _, text in docs:
        ids += tokenizer.encode(text).ids
        if len(ids) >= n:
            break
    return ids[:n]


def interleaved(fns: dict, repeats: int, device) -> dict:
    """Median ms of each, rounds interleaved (``bench_core.time_interleaved``)."""
    return {k: med for k, (med, _) in time_interleaved(fns, repeats, device).items()}


@torch.inference_mode()
def measure(model, stats, prompt, batch: int, repeats: int, device) -> dict:
    H, cfg = model.n_heads, model.config
    P = prompt.shape[1]
    ids = prompt.expand(batch, P).to(device)
    cache = model.new_cache(batch, max_len=P + H)
    pos = torch.arange(P, device=device).expand(batch, P)
    logits = model(ids, pos, cache)[:, -1]  # (B, H, V) the heads at the prefix's end
    feed = {T: (ids[:, :T], (P + torch.arange(T, device=device)).expand(batch, T)) for T in range(1, H + 1)}

    def loop_forward(heads, T, reference=False):
        def run():
            hidden = model(*feed[T], cache, heads=heads, output_hidden=True, reference=reference)
            if reference:  # before: every row of every head unembedded
                model.head_logits(hidden)
            else:
                model.head_logits(hidden[:, :, 0])
                if heads > 1:
                    model.head_logits(hidden[:, -1, 1:])
        return run

    stem_w, head_groups, _, _ = model.inference_weights()
    x1 = model.embed(feed[1][0])
    plan1 = model._plan(feed[1][1], cache)
    hid1 = torch.randn(batch, 1, cfg.d_model, device=device, dtype=x1.dtype)
    hid3 = torch.randn(batch, 3, cfg.d_model, device=device, dtype=x1.dtype)

    def stem_only():
        x = x1
        for i, w in enumerate(stem_w):
            x = grouped_block(x, w, plan1, cache, i, cfg)[0]

    gen = torch.Generator(device=device).manual_seed(0)
    first = logits[:, 0].argmax(-1)
    fns = {
        "stem (T=1)": stem_only,
        f"heads 1..{H} grouped (T=1)": lambda: grouped_block(x1, head_groups[0, H], plan1, cache, len(stem_w), cfg),
        "head 1 alone (T=1)": lambda: grouped_block(x1, head_groups[0, 1], plan1, cache, len(stem_w), cfg),
        "unembedding, 1 row": lambda: model.head_logits(hid1),
        "unembedding, 3 rows": lambda: model.head_logits(hid3),
        "forward head 1, T=1 (ar)": loop_forward(1, 1),
        f"forward heads 1..{H}, T=1": loop_forward(H, 1),
        f"forward heads 1..{H}, T={H}": loop_forward(H, H),
        "before: forward head 1, T=1": loop_forward(1, 1, True),
        f"before: forward heads 1..{H}, T=1": loop_forward(H, 1, True),
        f"before: forward heads 1..{H}, T={H}": loop_forward(H, H, True),
    }

    def policies(impl: str, tag: str) -> dict:
        # as the loop calls it: no boundary checks (sample() checked its inputs once)
        return {
            f"policy sampled, eps_b 0.03, statistics{tag}": lambda: dynamo_step(
                logits, DynamoConfig(eps_b=0.03, impl=impl), stats=stats, do_sample=True, temperature=0.7, top_k=50,
                generator=gen, validate=False),
            f"policy sampled, eps_b 0, statistics{tag}": lambda: dynamo_step(
                logits, DynamoConfig(eps_b=0.0, impl=impl), stats=stats, do_sample=True, temperature=0.7, top_k=50,
                generator=gen, validate=False),
            f"policy speculative draft (greedy, k=10){tag}": lambda: dynamo_step(
                logits, DynamoConfig(k=10, eps_b=0.0, adaptive_threshold=False, impl=impl), stats=stats,
                first_tokens=first, validate=False),
        }
    fns.update(policies("auto", ""))  # the C policy where it compiled
    fns.update(policies("torch", " (torch)"))  # the torch reference beside it
    parts = interleaved(fns, repeats, device)

    # whole steps through sample(): the difference between 33 and 1 new tokens, per step
    steps_cfg = {
        "step ar": dict(strategy="ar"),
        "step dynamo sampled, eps_b 0.03": dict(strategy="dynamo", do_sample=True, eps_b=0.03),
        "step dynamo sampled, eps_b 0, statistics": dict(strategy="dynamo", do_sample=True, eps_b=0.0),
        "step dynamo sampled, eps_b 0.03 (torch policy)": dict(strategy="dynamo", do_sample=True, eps_b=0.03,
                                                              impl="torch"),
        "step dynamo sampled, eps_b 0, statistics (torch policy)": dict(strategy="dynamo", do_sample=True, eps_b=0.0,
                                                                       impl="torch"),
        "step speculative greedy": dict(strategy="speculative"),
        "step speculative greedy (torch policy)": dict(strategy="speculative", impl="torch"),
        "step lookup greedy": dict(strategy="lookup"),
    }
    step_fns, step_counts = {}, {}
    for name, kw in steps_cfg.items():
        for n in (1, 33):
            def run(kw=kw, n=n, name=name):
                out = sample(model, ids, strategy=kw["strategy"], max_new_tokens=n, return_dict_in_generate=True,
                             stats=stats, generator=torch.Generator(device=device).manual_seed(0),
                             **{k: v for k, v in kw.items() if k != "strategy"})
                step_counts[(name, n)] = int(out.steps.max())
            step_fns[(name, n)] = run
    st = interleaved(step_fns, max(5, repeats // 2), device)
    for name in steps_cfg:
        tok = 32 * batch
        steps = step_counts[(name, 33)] - step_counts[(name, 1)]
        parts[name] = (st[(name, 33)] - st[(name, 1)]) / max(steps, 1)
        parts[name + " (tokens/step)"] = 33 / step_counts[(name, 33)]
        parts[name + " (ms per token)"] = (st[(name, 33)] - st[(name, 1)]) / tok * batch
    return parts


def ratios(p: dict, H: int) -> dict:
    ar_fwd = p["forward head 1, T=1 (ar)"]
    return {
        f"forward heads 1..{H} T={H} / head 1 T=1": p[f"forward heads 1..{H}, T={H}"] / ar_fwd,
        f"forward heads 1..{H} T=1 / head 1 T=1": p[f"forward heads 1..{H}, T=1"] / ar_fwd,
        f"before: forward heads 1..{H} T={H} / head 1 T=1":
            p[f"before: forward heads 1..{H}, T={H}"] / p["before: forward head 1, T=1"],
        f"before: forward heads 1..{H} T=1 / head 1 T=1":
            p[f"before: forward heads 1..{H}, T=1"] / p["before: forward head 1, T=1"],
        "ar step / its forward": p["step ar"] / ar_fwd,
        "dynamo sampled step eps_b 0.03 / ar step": p["step dynamo sampled, eps_b 0.03"] / p["step ar"],
        "dynamo sampled step eps_b 0 + statistics / ar step": p["step dynamo sampled, eps_b 0, statistics"] / p["step ar"],
        "speculative greedy step / ar step": p["step speculative greedy"] / p["step ar"],
        "torch policy: dynamo sampled step eps_b 0.03 / ar step":
            p["step dynamo sampled, eps_b 0.03 (torch policy)"] / p["step ar"],
        "torch policy: dynamo sampled step eps_b 0 + statistics / ar step":
            p["step dynamo sampled, eps_b 0, statistics (torch policy)"] / p["step ar"],
        "torch policy: speculative greedy step / ar step": p["step speculative greedy (torch policy)"] / p["step ar"],
        "lookup greedy step / ar step": p["step lookup greedy"] / p["step ar"],
    }


def markdown(results: dict, meta: dict) -> str:
    dtypes = list(results)
    lines = [f"Step costs — bundled model, B={meta['batch_size']}, 128-token held-out prefix, median of "
             f"{meta['repeats']} interleaved rounds.  ", f"Machine: {meta['machine_line']}.", "",
             "| measurement | " + " | ".join(f"{d} ms" for d in dtypes) + " |", "|---" * (len(dtypes) + 1) + "|"]
    for name in results[dtypes[0]]["ms"]:
        if name.endswith(")") and ("tokens/step" in name or "per token" in name):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{results[d]['ms'][name]:.3f}" for d in dtypes) + " |")
    lines += ["", "| ratio | " + " | ".join(dtypes) + " |", "|---" * (len(dtypes) + 1) + "|"]
    for name in results[dtypes[0]]["ratios"]:
        lines.append(f"| {name} | " + " | ".join(f"{results[d]['ratios'][name]:.2f}" for d in dtypes) + " |")
    lines += ["", "| whole step | " + " | ".join(f"{d} tokens/step" for d in dtypes) + " |",
              "|---" * (len(dtypes) + 1) + "|"]
    for name in results[dtypes[0]]["ms"]:
        if name.endswith("(tokens/step)"):
            lines.append(f"| {name[:-14]} | " + " | ".join(f"{results[d]['ms'][name]:.2f}" for d in dtypes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README 'Threads')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/step_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for name in args.dtypes:
        model, tok, stats = load_pretrained(device=device, dtype=resolve_dtype(name))
        prompt = torch.tensor([held_out_tokens(tok, 128)])
        ms = measure(model, stats, prompt, args.batch_size, args.repeats, device)
        results[name] = {"ms": ms, "ratios": ratios(ms, model.n_heads)}
    machine = machine_info()
    meta = {"batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads, "device": args.device,
            "machine": machine, "machine_line": machine_line(machine)}
    table = markdown(results, meta)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(json.dumps({d: {k: round(v, 3) for k, v in r["ratios"].items()} for d, r in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
