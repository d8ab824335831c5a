"""The CPU operations behind the inference choices in ``models/tiny.py`` and ``policy.py``, timed.

Not a test. Usage::

    python benchmarks/bench_cpu_ops.py            # 1 torch thread

Each row times two ways of doing the same thing at the bundled model's shapes (d = 256, d_ff = 1024,
V = 8192, 8 attention heads of 32), interleaved, median of ``--repeats`` calls after a warm-up;
weights are 8 distinct copies cycled through, so each call reads its weights as a decode step does:

* bf16 ``F.linear`` against the same weight prepacked for oneDNN (``tiny.pack_linear``), at 1, 3, 8
  and 128 rows, and whether the two are bit-identical;
* the fp32 unembedding: ``F.linear`` with the (V, d) weight against ``x @ W_t`` with a (d, V) copy;
* decode attention (1 query over 140 keys): SDPA in bf16 against fp32; and at 8 rows (230 keys, fp32)
  3 queries per row against 1 (a multi-token feed against ``ar``'s);
* a gather of 28 000 of 0.9 M int64: ``x[i]`` against ``x.index_select(0, i)``.

Writes ``benchmarks/results/cpu_ops.json`` (or ``--out``) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling.models.tiny import linear, pack_linear  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402


def pair(a, b, repeats: int) -> tuple:
    """Median microseconds of ``a`` and ``b``, calls interleaved."""
    ta, tb = [], []
    for _ in range(10):
        a(), b()
    for _ in range(repeats):
        for f, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def cycle(items):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


def measure(repeats: int) -> list:
    rows = []
    g = torch.Generator().manual_seed(0)
    for d_in, d_out in ((256, 768), (256, 1024), (1024, 256), (256, 8192)):
        ws = [torch.randn(d_out, d_in, generator=g).bfloat16() for _ in range(8)]
        packs = [pack_linear(w) for w in ws]
        if packs[0] is None:
            rows.append({"what": f"bf16 linear {d_out}x{d_in}", "note": "this build cannot prepack"})
            continue
        for n in (1, 3, 8, 128):
            x = torch.randn(n, d_in, generator=g).bfloat16()
            pick = cycle(list(zip(ws, packs)))

            def with_pack():
                w, p = pick()
                return linear(x, w, None, p)
            plain, packed = pair(lambda: F.linear(x, pick()[0]), with_pack, repeats)
            same = all(torch.equal(F.linear(x, w), linear(x, w, None, p)) for w, p in zip(ws, packs))
            rows.append({"what": f"bf16 linear {d_out}x{d_in}, {n} rows", "a": "F.linear", "b": "prepacked",
                         "a_us": plain, "b_us": packed, "a/b": plain / packed, "bit_identical": same})
    ws = [torch.randn(8192, 256, generator=g) for _ in range(4)]
    wts = [w.t().contiguous() for w in ws]
    pick = cycle(list(zip(ws, wts)))
    for n in (1, 3, 8):
        x = torch.randn(n, 256, generator=g)
        plain, trans = pair(lambda: F.linear(x, pick()[0]), lambda: x @ pick()[1], repeats)
        rows.append({"what": f"fp32 unembedding 8192x256, {n} rows", "a": "F.linear (V, d)", "b": "x @ W_t (d, V)",
                     "a_us": plain, "b_us": trans, "a/b": plain / trans})
    q = torch.randn(1, 8, 1, 32, generator=g)
    k, v = torch.randn(1, 8, 140, 32, generator=g), torch.randn(1, 8, 140, 32, generator=g)
    mask = torch.ones(1, 1, 1, 140, dtype=torch.bool)
    bf = [t.bfloat16() for t in (q, k, v)]
    t_bf, t_fp = pair(lambda: F.scaled_dot_product_attention(*bf, attn_mask=mask),
                      lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats)
    rows.append({"what": "decode attention, 1 query x 140 keys, 8 heads of 32", "a": "bf16 SDPA", "b": "fp32 SDPA",
                 "a_us": t_bf, "b_us": t_fp, "a/b": t_bf / t_fp})
    q3 = torch.randn(8, 8, 3, 32, generator=g)
    k8, v8 = torch.randn(8, 8, 230, 32, generator=g), torch.randn(8, 8, 230, 32, generator=g)
    m1, m3 = torch.ones(8, 1, 1, 230, dtype=torch.bool), torch.ones(8, 1, 3, 230, dtype=torch.bool)
    t3, t1 = pair(lambda: F.scaled_dot_product_attention(q3, k8, v8, attn_mask=m3),
                  lambda: F.scaled_dot_product_attention(q3[:, :, :1], k8, v8, attn_mask=m1), repeats)
    rows.append({"what": "decode attention, 8 rows x 230 keys, 8 heads of 32, fp32", "a": "3 queries per row",
                 "b": "1 query per row", "a_us": t3, "b_us": t1, "a/b": t3 / t1})
    keys = torch.randint(0, 2 ** 40, (909772,), generator=g).sort().values
    idx = torch.randint(0, keys.numel(), (28000,), generator=g).sort().values
    t_ix, t_is = pair(lambda: keys[idx], lambda: keys.index_select(0, idx), repeats)
    rows.append({"what": "gather 28 000 of 0.9 M int64", "a": "x[i]", "b": "x.index_select(0, i)",
                 "a_us": t_ix, "b_us": t_is, "a/b": t_ix / t_is})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_ops.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = measure(a.repeats)
    info = machine_info()
    out = Path(a.out)
    out.write_text(json.dumps({"machine": info, "threads": a.threads, "rows": rows}, indent=1))
    lines = [f"CPU operations, median of {a.repeats} interleaved calls, {a.threads} thread(s).  ",
             f"Machine: {machine_line(info)}.", "",
             "| operation | a | b | a us | b us | a / b | bit-identical |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "a_us" not in r:
            lines.append(f"| {r['what']} | {r['note']} | | | | | |")
            continue
        lines.append(f"| {r['what']} | {r['a']} | {r['b']} | {r['a_us']:.1f} | {r['b_us']:.1f} | {r['a/b']:.2f} | "
                     f"{r.get('bit_identical', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
