"""Prefill cost: a 192-token held-out prompt through the bundled model, B = 1 and 8, head 1 alone and
all heads, with the heads' layers run at each row's last token only (``logits_index``, what ``sample``
does) and at every token (the heads' outputs all read, what the prefill did before). Fastest of
``--repeats``, one torch thread, the auto dtype; a fresh cache each time (its allocation included).

    python benchmarks/bench_prefill.py --out benchmarks/results/prefill_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_policy_impl import prompts_from_test_split  # noqa: E402

from dynamo_sampling.pretrained import load_pretrained  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, _ = load_pretrained(with_stats=False)
    prompts = torch.cat(prompts_from_test_split(tok, 8, 192))
    H, ms = model.n_heads, {}
    with torch.inference_mode():
        for B in (1, 8):
            ids, pos = prompts[:B], torch.arange(192).expand(B, 192)
            last = torch.full((B, 1), 191)
            variants = {(h, only): (h, last if only else None) for h in (1, H) for only in (True, False)}
            best = dict.fromkeys(variants, float("inf"))
            for r in range(a.repeats + 1):
                for key, (heads, index) in variants.items():
                    t0 = time.perf_counter()
                    hidden = model(ids, pos, model.new_cache(B, max_len=256), heads=heads, logits_index=index,
                                   output_hidden=True)
                    model.head_logits(hidden[:, -1])
                    if r:  # round 0 warms up
                        best[key] = min(best[key], time.perf_counter() - t0)
            for (heads, only), t in best.items():
                ms[f"B={B}, heads 1..{heads}, {'last token only' if only else 'every token'}"] = round(t * 1e3, 2)
    lines = [f"Prefill of 192 tokens, bundled model, fastest of {a.repeats}. Machine: {machine_line(machine_info())}.", "",
             "| prefill | ms |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in ms.items()]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": machine_info(), "repeats": a.repeats, "ms": ms}, indent=1))
        Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
