"""Training recipes and model shapes compared on short runs of equal wall time.

Usage::

    python -m dynamo_sampling.train.tokenizer --out runs/data --tokenizer dynamo_sampling/pretrained/tokenizer.json
    python evals/train_compare.py --minutes 10 --variants dynamo joint joint_distill dynamo_distill
    python evals/train_compare.py --eval-only --variants ...   # re-score finished runs

Every variant trains in its own process with one torch thread, all variants at once (so each gets
the same share of the CPU for the same wall time), then each final model is scored on the stdlib
*val* split: PPL_1..H, each head's top-1 agreement with head 1 (what speculative decoding keeps),
speculative greedy tokens per step over held-out val prompts (heads only: the lookup drafter off,
so the number measures the heads), and the measured cost of a 3-head step relative to a 1-head
step (``drafting.measure_step_cost``, bf16 where the CPU runs it natively). Writes
``OUT/train_compare.json`` and ``OUT/train_compare.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals.assets import machine_info, machine_line  # noqa: E402
from evals.perplexity import perplexities  # noqa: E402
from evals.quality_vs_speed import load_sources, select_prompts  # noqa: E402

# name -> (TrainConfig fields, TinyMTPConfig fields); "base" shape = the bundled model's
BASE_SHAPE = {"n_layer": 6, "d_model": 256, "n_attn_heads": 8, "d_ff": 1024, "max_seq_len": 512}
VARIANTS = {
    "dynamo": ({"recipe": "dynamo", "pretrain_fraction": 0.5}, BASE_SHAPE),
    "joint": ({"recipe": "joint"}, BASE_SHAPE),
    "joint_distill": ({"recipe": "joint", "distill": 0.5}, BASE_SHAPE),
    "dynamo_distill": ({"recipe": "dynamo", "pretrain_fraction": 0.5, "distill": 0.5}, BASE_SHAPE),
    "joint_distill_narrow_deep": ({"recipe": "joint", "distill": 0.5},
                                  {**BASE_SHAPE, "n_layer": 8, "d_model": 192, "n_attn_heads": 6, "d_ff": 768}),
    "joint_distill_small": ({"recipe": "joint", "distill": 0.5},
                            {**BASE_SHAPE, "n_layer": 6, "d_model": 192, "n_attn_heads": 6, "d_ff": 768}),
}
# the same recipes continuing from the bundled model (stem and heads already trained; phase 2 from the start)
_BUNDLED = {"init_from": "dynamo_sampling/pretrained", "lr": 1e-3, "warmup_steps": 10}
VARIANTS.update({
    "bundled+dynamo": ({**_BUNDLED, "recipe": "dynamo", "pretrain_fraction": 0.0}, {}),
    "bundled+joint": ({**_BUNDLED, "recipe": "joint"}, {}),
    "bundled+joint_distill": ({**_BUNDLED, "recipe": "joint", "distill": 0.5}, {}),
    "bundled+dynamo_distill": ({**_BUNDLED, "recipe": "dynamo", "pretrain_fraction": 0.0, "distill": 0.5}, {}),
})


def launch(name: str, args) -> subprocess.Popen:
    train_fields, shape = VARIANTS[name]
    cmd = [sys.executable, "-m", "dynamo_sampling", "train", "--data-dir", args.data_dir,
           "--out-dir", str(Path(args.runs, name)), "--threads", "1", "--steps", "1000000",
           "--time-budget-s", str(args.minutes * 60), "--eval-every", "1000000",
           "--checkpoint-every", "1000000", "--model", json.dumps(shape)]
    for k, v in {"warmup_steps": 30, **train_fields}.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = open(Path(args.runs, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


@torch.inference_mode()
def tokens_per_step(model, prompts, max_new: int) -> float:
    from dynamo_sampling import DraftConfig, sample

    steps = new = 0
    for p in prompts:
        out = sample(model, torch.tensor([p.ids]), strategy="speculative", max_new_tokens=max_new,
                     draft=DraftConfig(hybrid=False), return_dict_in_generate=True)
        steps += int(out.steps.sum())
        new += int(out.new_tokens.sum())
    return new / max(steps, 1)


def score(name: str, args, val_tokens, prompts, model_dir: str = None) -> dict:
    """One row: a variant's run (``runs/NAME/final``), or any saved model (``model_dir``)."""
    from dynamo_sampling.drafting import measure_step_cost
    from dynamo_sampling.models.tiny import load_model
    from dynamo_sampling.pretrained import auto_dtype

    if model_dir is None:
        summary = json.loads((Path(args.runs, name) / "summary.json").read_text())
        model_dir = str(Path(args.runs, name, "final"))
        train_fields, shape = VARIANTS[name]
        run = f"{args.minutes:g} min, {len(args.variants)} at once"
    else:
        record = Path(model_dir, "recorded.json")  # a bundled model records its training
        summary = json.loads(record.read_text()).get("training", {}) if record.is_file() else {}
        train_fields, shape, run = {"model_dir": model_dir}, {}, "saved model"
    model = load_model(model_dir).eval()
    ppl = perplexities(model, val_tokens, seq_len=256, batch_size=8, max_windows=args.windows)
    dtype = auto_dtype(torch.device("cpu"))
    fast = model.to(dtype)
    cost = measure_step_cost(fast, 1, model.n_heads)
    return {"name": name, "run": run, "train": train_fields, "shape": shape,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": summary.get("steps", 0), "tokens": summary.get("tokens", 0), "seconds": summary.get("seconds", 0),
            "ppl": ppl["ppl"], "top1_acc": ppl["top1_acc"], "agree": ppl["agree"],
            "spec_tokens_per_step": tokens_per_step(fast, prompts, args.max_new_tokens),
            "step_cost_dtype": str(dtype).replace("torch.", ""),
            "step_ms_1head": cost["seconds"] * 1e3, "cost_3head_1tok": cost[model.n_heads][0],
            "cost_3head_3tok": cost[model.n_heads][-1]}


def write_table(rows, path: Path, header: str):
    lines = [header, "",
             "| variant | run | params | tokens seen | PPL_1 | PPL_2 | PPL_3 | agree 2 | agree 3 | spec tok/step "
             "| 1-head step ms | 3 heads, 1 tok | 3 heads, 3 tok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['run']} | {r['params'] / 1e6:.2f} M | {r['tokens'] / 1e6:.2f} M | {r['ppl'][0]:.1f} | "
                     f"{r['ppl'][1]:.1f} | {r['ppl'][2]:.1f} | {r['agree'][1]:.3f} | {r['agree'][2]:.3f} | "
                     f"{r['spec_tokens_per_step']:.2f} | {r['step_ms_1head']:.2f} | {r['cost_3head_1tok']:.2f}x | "
                     f"{r['cost_3head_3tok']:.2f}x |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python evals/train_compare.py", description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="*", default=["dynamo", "joint", "joint_distill", "dynamo_distill"],
                   choices=sorted(VARIANTS))
    p.add_argument("--score", nargs="*", default=[], metavar="NAME=DIR",
                   help="also score these saved models (no training), e.g. bundled=dynamo_sampling/pretrained")
    p.add_argument("--minutes", type=float, default=10.0, help="wall time of every run")
    p.add_argument("--data-dir", default="runs/data")
    p.add_argument("--runs", default="runs/compare")
    p.add_argument("--prompts", type=int, default=20, help="val prompts for tokens/step")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=160, help="val windows of 256 tokens for PPL and agreement")
    p.add_argument("--eval-only", action="store_true", help="score finished runs, train nothing")
    p.add_argument("--out", default="evals/results")
    args = p.parse_args(argv)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if not args.eval_only and args.variants:
        procs = {n: launch(n, args) for n in args.variants}
        for n, proc in procs.items():
            if proc.wait():
                raise SystemExit(f"run {n} failed: see {Path(args.runs, n + '.log')}")
    torch.set_num_threads(1)
    from dynamo_sampling.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(args.data_dir, "tokenizer.json"))
    val_tokens = np.load(Path(args.data_dir, "val.npy"))
    prompts = select_prompts(load_sources(None, "val"), tok, args.prompts, 128, seed=0)
    rows = [score(n, args, val_tokens, prompts) for n in args.variants]
    rows += [score(n, args, val_tokens, prompts, d) for n, d in (x.split("=", 1) for x in args.score)]
    info = machine_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "train_compare.json").read_text()) if (out / "train_compare.json").is_file() else {}
    merged = {r["name"]: r for r in old.get("rows", [])}
    merged.update({r["name"]: r for r in rows})
    rows_all = list(merged.values())
    (out / "train_compare.json").write_text(json.dumps({"machine": info, "minutes": args.minutes,
                                                        "concurrent": args.variants, "rows": rows_all}, indent=2))
    write_table(rows_all, out / "train_compare.md",
                f"Variants trained concurrently for equal wall time, one torch thread each, fp32; all scored "
                f"on the stdlib val split ({machine_line(info)}). Rows from "
                f"`python evals/train_compare.py --minutes M --variants ...` (and `--score NAME=DIR` for "
                f"saved models, trained elsewhere)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
