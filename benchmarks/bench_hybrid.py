"""Speculative's hybrid drafter against prompt lookup: where its tokens and its time go.

Not a test. Usage::

    python benchmarks/bench_hybrid.py [--prompts 30]

On the stdlib test prompts of ``evals/quality_vs_speed.py`` (192 tokens, 64 new, greedy, B=1, the
bundled model, 1 thread):

1. Offline drafts: each prompt's ``ar`` greedy output is decoded once; at every position the drafts
   each drafter would propose (the joint's: first token fixed, top-10 grid, whole length; lookup's:
   whole length; merged: the joint's, then lookup's continuation of it) are judged against the tokens
   that followed; the corpus's (``lookup.CorpusDrafts``, at most ``LookupConfig.corpus_draft`` tokens)
   too. Tokens per step of a loop that always feeds one kind, or an oracle that feeds the better of
   two or three: upper bounds, no step cost involved. And how often each drafter's first token is
   right, by its own signal (lookup: the length of its match; the corpus: its follower's share of
   the context's count).
2. Step kinds: every step of ``ar``, ``lookup`` and ``speculative`` timed and classed (did the step
   evaluate the joint, did heads 2..H catch up first, how many heads the forward ran); median time
   against an ``ar`` step and tokens kept per step.
3. Paired speed-ups: ``ar``, ``lookup`` (prompt lookup alone, the peer, and with corpus drafts),
   ``speculative`` with and without merged drafts and corpus drafts, and both with a flat step cost (``step_cost=(1.0,)``), each prompt by all settings in alternating order, twice;
   median over prompts of the faster run's time ratio against ``ar``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynamo_sampling import decoding, load_pretrained, sample  # noqa: E402
from dynamo_sampling.lookup import CorpusDrafts, LookupConfig, NgramIndex  # noqa: E402
from dynamo_sampling.policy import DynamoConfig, dynamo_step  # noqa: E402
from evals.assets import machine_info, machine_line  # noqa: E402
from evals.quality_vs_speed import load_sources, select_prompts  # noqa: E402

N_NEW = 64


def _matched(draft, gen, start) -> int:
    a = 0
    while a < len(draft) and start + a < len(gen) and draft[a] == gen[start + a]:
        a += 1
    return a


def _match_length(seq, cfg: LookupConfig) -> int:
    """The n of prompt lookup's match after ``seq`` (the longest suffix n-gram seen earlier), 0 for none."""
    L = len(seq)
    for n in range(cfg.max_ngram, cfg.min_ngram - 1, -1):
        if n < L and any(seq[p:p + n] == seq[L - n:] for p in range(L - n - 1, -1, -1)):
            return n
    return 0


def _corpus_confidence(stats, context) -> float:
    """The corpus's most frequent follower's share of the count of ``context`` (its last two tokens,
    backed off to the last one as ``CorpusDrafts`` does); 0 where neither was seen twice."""
    V = stats.vocab_size
    for m in (2, 1):
        keys, counts = stats.table(m + 1)
        base = 0
        for t in context[-m:]:
            base = base * V + t
        lo, hi = keys.searchsorted((base * V, base * V + V))
        if hi > lo and counts[lo:hi].sum() >= 2:
            return float(counts[lo:hi].max()) / float(counts[lo:hi].sum())
    return 0.0


def offline_drafts(model, stats, prompts) -> tuple:
    per = collections.defaultdict(list)
    corpus, cap = CorpusDrafts(stats), LookupConfig().corpus_draft
    first = collections.defaultdict(lambda: [0, 0])  # signal -> [first draft token right, drafts]
    for p in prompts:
        ids = torch.tensor([p.ids])
        S = ids.shape[1]
        seq = sample(model, ids, strategy="ar", max_new_tokens=N_NEW)[0]
        gen = seq[S:].tolist()
        with torch.no_grad():
            logits = model(seq[None], torch.arange(seq.numel())[None], None, heads=model.n_heads)[0].float()
        # a step whose first token is gen[t]: heads at position S + t - 1
        pol = dynamo_step(logits[S - 1:S - 1 + N_NEW], DynamoConfig(k=10, eps_b=0.0, adaptive_threshold=False),
                          stats=stats, first_tokens=torch.tensor(gen))
        joint_tokens, joint_n = pol.tokens.tolist(), pol.n.tolist()

        def lookup_after(u):  # lookup's draft after gen[:u + 1]
            idx = NgramIndex(seq[None, :S + u + 1], torch.ones(1, S + u + 1, dtype=torch.long), LookupConfig())
            return idx.drafts([N_NEW - u - 1])[0]
        look = [_matched(lookup_after(t), gen, t + 1) for t in range(N_NEW)]
        joint = [_matched(joint_tokens[t][1:joint_n[t]], gen, t + 1) for t in range(N_NEW)]
        full = model.n_heads - 1
        merged = [j if j < full or t + full + 1 >= N_NEW else j + _matched(lookup_after(t + full), gen, t + full + 1)
                  for t, j in enumerate(joint)]

        def tokens_per_step(accepted):
            t = steps = 0
            while t < N_NEW:
                t, steps = t + 1 + accepted[t], steps + 1
            return N_NEW / steps
        per["lookup"].append(tokens_per_step(look))
        per["joint"].append(tokens_per_step(joint))
        per["merged"].append(tokens_per_step(merged))
        per["oracle: better of joint and lookup"].append(tokens_per_step([max(a, b) for a, b in zip(joint, look)]))
        per["oracle: better of merged and lookup"].append(tokens_per_step([max(a, b) for a, b in zip(merged, look)]))
        toks = seq.tolist()
        cor = [_matched(corpus.draft(toks[S + t + 1 - corpus.context:S + t + 1], min(cap, N_NEW - t - 1)), gen, t + 1)
               for t in range(N_NEW)]
        per["corpus"].append(tokens_per_step(cor))
        for t in range(N_NEW - 1):  # the first draft token, by each drafter's own signal
            ctx = toks[:S + t + 1]
            n = _match_length(ctx, LookupConfig())
            if n:
                first[f"lookup, match of {n}"][0] += look[t] > 0
                first[f"lookup, match of {n}"][1] += 1
                first["lookup, any match"][0] += look[t] > 0
                first["lookup, any match"][1] += 1
            conf = _corpus_confidence(stats, ctx)
            if conf:
                b = min(int(conf * 5), 4)
                key = f"corpus, confidence {b / 5:.1f}-{(b + 1) / 5:.1f}"
                first[key][0] += cor[t] > 0
                first[key][1] += 1
                first["corpus, any"][0] += cor[t] > 0
                first["corpus, any"][1] += 1
            if conf and cor[t] > 0 and look[t] == 0:
                first["corpus right where lookup is wrong or has no draft"][0] += 1
            first["corpus right where lookup is wrong or has no draft"][1] += 1
        per["oracle: better of lookup and corpus"].append(tokens_per_step([max(a, b) for a, b in zip(look, cor)]))
        per["oracle: best of merged, lookup and corpus"].append(
            tokens_per_step([max(a, b, c) for a, b, c in zip(merged, look, cor)]))
    return ({k: round(statistics.mean(v), 3) for k, v in per.items()},
            {k: {"right": round(a / c, 3), "positions": c} for k, (a, c) in sorted(first.items())})


def step_kinds(model, stats, prompts) -> dict:
    D = decoding._Decoder
    step, joint_draft, catch_up = D.step, D._joint_draft, D._catch_up_heads
    flags, log = {}, collections.defaultdict(list)

    def timed_step(self, streamer):
        flags.clear()
        t0 = time.perf_counter()
        out = step(self, streamer)
        kind = (self.strategy, "joint" if flags.get("joint") else "no joint",
                "catch-up" if flags.get("catch") else "", f"{self.step_heads} head(s)")
        log[kind].append((time.perf_counter() - t0, self.kept_h[0]))
        return out

    def flag_joint(self, *a, **k):
        flags["joint"] = True
        return joint_draft(self, *a, **k)

    def flag_catch(self, *a, **k):
        flags["catch"] = bool((self.cache.lengths - self.heads_len).max() > 0)
        return catch_up(self, *a, **k)
    D.step, D._joint_draft, D._catch_up_heads = timed_step, flag_joint, flag_catch
    try:
        for s in ("ar", "lookup", "speculative"):  # warm-up, step costs measured (lookup: with corpus drafts)
            sample(model, torch.tensor([prompts[0].ids]), strategy=s, max_new_tokens=16, stats=stats)
        log.clear()
        for p in prompts:
            for s in ("ar", "lookup", "speculative"):
                sample(model, torch.tensor([p.ids]), strategy=s, max_new_tokens=N_NEW, stats=stats)
    finally:
        D.step, D._joint_draft, D._catch_up_heads = step, joint_draft, catch_up
    ar = statistics.median(d for d, _ in log["ar", "no joint", "", "1 head(s)"])
    return {" / ".join(x for x in k if x): {"steps": len(v), "ms": round(1e3 * statistics.median(d for d, _ in v), 2),
                                            "x_ar_step": round(statistics.median(d for d, _ in v) / ar, 2),
                                            "tokens_per_step": round(sum(n for _, n in v) / len(v), 2)}
            for k, v in sorted(log.items())}


def paired(model, stats, prompts) -> dict:
    settings = {"ar": dict(strategy="ar"), "lookup (prompt lookup alone)": dict(strategy="lookup", corpus_draft=0),
                "lookup + corpus": dict(strategy="lookup"),
                "speculative": dict(strategy="speculative"),
                "speculative, corpus_draft=0": dict(strategy="speculative", corpus_draft=0),
                "speculative, merge=False": dict(strategy="speculative", merge=False),
                "speculative, flat step cost": dict(strategy="speculative", step_cost=(1.0,)),
                "speculative, flat step cost, merge=False": dict(strategy="speculative", step_cost=(1.0,),
                                                                  merge=False)}
    for kw in settings.values():
        sample(model, torch.tensor([prompts[0].ids]), max_new_tokens=16, stats=stats, **kw)
    times, steps = collections.defaultdict(list), collections.Counter()
    for r in range(2):
        for i, p in enumerate(prompts):
            for name in (list(settings) if (i + r) % 2 == 0 else list(settings)[::-1]):
                t0 = time.perf_counter()
                out = sample(model, torch.tensor([p.ids]), max_new_tokens=N_NEW, stats=stats,
                             return_dict_in_generate=True, **settings[name])
                times[name, i].append(time.perf_counter() - t0)
                if r == 0:
                    steps[name] += int(out.steps.sum())
    n = len(prompts)
    return {name: {"speedup_vs_ar": round(statistics.median(min(times["ar", i]) / min(times[name, i])
                                                            for i in range(n)), 3),
                   "tokens_per_step": round(N_NEW * n / steps[name], 3)} for name in settings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/hybrid_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    prompts = select_prompts(load_sources(None, "test"), tok, args.prompts, 192, 0)
    info = machine_info()
    offline, first = offline_drafts(model, stats, prompts)
    res = {"machine": info, "offline_tokens_per_step": offline, "offline_first_token": first,
           "step_kinds": step_kinds(model, stats, prompts), "paired": paired(model, stats, prompts)}
    Path(args.out).write_text(json.dumps(res, indent=2))
    lines = [f"Hybrid drafter, bundled model, {len(prompts)} stdlib test prompts, greedy, B=1, {N_NEW} new tokens. "
             f"Machine: {machine_line(info)}.", "", "| offline, whole drafts | tokens/step |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in res["offline_tokens_per_step"].items()]
    lines += ["", "| offline, first draft token by signal | right | positions |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['right']} | {v['positions']} |" for k, v in res["offline_first_token"].items()]
    lines += ["", "| step kind | steps | median ms | x ar step | tokens/step |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['steps']} | {v['ms']} | {v['x_ar_step']} | {v['tokens_per_step']} |"
              for k, v in res["step_kinds"].items()]
    lines += ["", "| paired | speed-up vs ar | tokens/step |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['speedup_vs_ar']} | {v['tokens_per_step']} |" for k, v in res["paired"].items()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
