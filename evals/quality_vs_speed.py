"""Quality against speed: ``ar`` vs ``dynamo`` vs ``speculative`` (GitHub issue "evals/: quality against speed").

Usage::

    python evals/quality_vs_speed.py --quick                        # CI-sized, a few minutes on 2 CPU cores
    python evals/quality_vs_speed.py --model-dir runs/tiny/final    # the full sweep
    python evals/quality_vs_speed.py --random-model --quick          # development, before a model exists

What it does
------------
*Prompts* come from held-out files (the stdlib test split, or ``--source-dir``): two kinds of cut
points, half each, chosen deterministically from ``--prompt-seed`` and spread over files round-robin:

* ``header``: right after the docstring of a ``def`` / ``class`` (the body is the real continuation);
* ``mid``: at the start of a statement inside a function body (not its first statement, so the text
  before the cut is complete Python).

The model sees the last ``--prompt-tokens`` tokens of the file up to the cut; the continuation is the
file's text after it. Every row generates exactly ``--max-new-tokens`` tokens (no EOS stop, so every
strategy does the same work); quality metrics use the completion cut at its first EOS.

*Settings*: ``ar``; ``dynamo`` at every ``--eps-b`` value; ``speculative`` (drafts sized by step cost,
lookup drafts competing with the heads' joint), its variants ``no_lookup`` (joint drafts only) and
``thresholds`` (DynaMo's thresholds size the drafts, at every ``--eps-b``), ``no_corpus`` (no lookup
drafts from the corpus's n-grams) and ``tree`` (lookup trees: a second branch); ``lookup`` (prompt-lookup decoding,
no heads: the peer a user without heads picks), ``lookup/corpus`` (with the corpus's drafts beside the
row's own, the losing one fed as a second branch where it pays) and ``lookup/corpus_no_tree``; the ``dynamo`` ablations
``no_cooc`` (alpha_c = 0: no co-occurrence weighting or mask), ``no_adaptive`` (no Otsu threshold)
and ``no_blur`` (Otsu without the blur) at every ``--ablation-eps-b`` value; each greedy and sampled
(temperature ``--temperature``, top-k ``--top-k``). Greedy runs use the first seed only (they are
deterministic); sampled runs use every ``--seeds`` value, with the same generator seed for every setting.
For each prompt batch and seed all settings run back to back, their order rotated per batch, so a
slow-down of the machine hits every setting alike.

*Speed*: tokens per step (forward passes after prefill) = total new tokens / total steps; wall-clock
speed-up = the median over calls (prompt batch, seed) of (tokens/s of the setting's call) / (tokens/s of
the ``ar`` call of the same mode, batch and seed) — prefill included, same ``max_new_tokens``, warm-up
calls excluded; the median keeps a burst of load on a shared machine from swaying the result.
``speedup_total`` is the ratio of the totals instead (tokens/s over all calls); ``timings.csv`` has
every call.

*Quality* (see ``evals/metrics.py`` for the exact rules):

* win rate against ``ar``: for each (prompt, seed) the completion with the higher head-1 likelihood
  wins — the mean log-probability per token of the completion (to its first EOS, inclusive) under
  head 1 of the same model at temperature 1 without top-k, given the prompt; ties (|diff| <= 1e-6,
  e.g. identical text) are excluded; normalized win rate = win rate / 0.5 (1.0 = parity);
* agreement with the real continuation: exact-match lines, character similarity (difflib);
* valid Python: the file up to the cut + the completion cut at its last complete line parses, or is
  only incomplete at its end (open block / bracket), see ``metrics.is_valid_completion``; the share
  is over completions with at least one complete non-blank line (``judged_share`` says how many);
* repetition: distinct-1/2/3 over the completion's tokens.

*Same-quality speed-up* (DynaMo): for each (strategy, ablation, mode) a least-squares line of
normalized win rate against speed-up over its eps_b points; the largest speed-up in [1, cap] where the
line is >= 1.0, cap = min(largest measured speed-up, H); 1.0 when there is none.

Outputs in ``--out`` (default ``evals/results``): ``results.csv`` and ``results.json`` (one row per
setting; the JSON adds the configuration, the machine, the prompts, the same-quality table and the
definitions), ``samples.csv`` (one row per completion), ``timings.csv`` (one row per generate call),
``completions.jsonl`` (texts),
``results.md`` and the plots ``speedup_vs_eps.png`` and ``quality_vs_speedup.png``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling import DynamoConfig, corpus, sample  # noqa: E402
from dynamo_sampling.tokenizer import EOS_ID, decode, encode  # noqa: E402
from evals import metrics  # noqa: E402
from evals.assets import add_asset_args, load_assets, machine_info, machine_line  # noqa: E402

STRATEGIES = ("ar", "dynamo", "speculative", "lookup")
MODES = ("greedy", "sampled")
ABLATIONS = {  # name -> DynamoConfig overrides; applied to the dynamo strategy
    "no_cooc": {"alpha_c": 0.0},
    "no_adaptive": {"adaptive_threshold": False},
    "no_blur": {"blur": False},
}
# speculative variants beside its default (drafts sized by cost, lookup drafts competing with the joint)
SPEC_ABLATIONS = {
    "no_lookup": {"hybrid": False},  # the heads' joint drafts only
    "no_merge": {"merge": False},  # lookup and joint drafts compete; no joint draft is continued by lookup
    "thresholds": {"size_by": "thresholds", "hybrid": False},  # DynaMo's thresholds size the drafts (eps_b sweep)
    "no_corpus": {"corpus_draft": 0},  # lookup drafts from the row's own tokens only, none from the corpus
    "tree": {"tree": True},  # lookup trees: the losing lookup draft fed as a second branch where it pays
}
# the lookup strategy's rows: the peer (prompt lookup alone, as transformers has it) and the library's
# default with statistics given (the corpus's drafts competing with the row's own: lookup.CorpusDrafts)
LOOKUP_VARIANTS = {"none": {"corpus_draft": 0}, "corpus": {}, "corpus_no_tree": {"tree": False}}
# Defaults of the full run and of --quick; an explicit flag wins over both.
FULL = dict(n_prompts=16, seeds=[0, 1], eps_b=[0.0, 0.05, 0.1, 0.25, 1.0], ablation_eps_b=None,
            max_new_tokens=64, prompt_tokens=192, batch_size=1)
QUICK = dict(n_prompts=4, seeds=[0], eps_b=[0.0, 0.1, 1.0], ablation_eps_b=[0.0, 0.1],
             max_new_tokens=24, prompt_tokens=96, batch_size=1)
REFERENCE_CHARS = 4000  # real continuation kept per prompt (far more than max_new_tokens can write)
TIE_TOL = 1e-6


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One cut point. ``context`` = file text before the cut; ``ids`` = its last prompt tokens."""

    id: int
    path: str
    line: int  # 1-based line of the file where the continuation starts
    kind: str  # "header" | "mid"
    context: str
    reference: str
    ids: List[int] = field(default_factory=list)


def cut_points(text: str) -> List[tuple]:
    """``[(line, kind)]``: 1-based line numbers where a continuation may start (see module doc)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        body = node.body
        has_doc = ast.get_docstring(node, clean=False) is not None
        if has_doc and len(body) >= 2 and body[1].lineno > body[0].end_lineno:
            out.append((body[0].end_lineno + 1, "header"))
        if isinstance(node, ast.ClassDef):
            continue
        for i in range(2 if has_doc else 1, len(body)):
            stmt = body[i]
            start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            if start > body[i - 1].end_lineno:  # the statement starts its own line
                out.append((start, "mid"))
    return sorted(set(out))


def load_sources(source_dir: Optional[str], split: str) -> List[tuple]:
    """``[(rel_path, text)]`` from ``source_dir`` (every .py below it) or the stdlib ``split``."""
    if source_dir is None:
        return corpus.load_split(split)
    root = Path(source_dir)
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"--source-dir {source_dir} holds no .py files")
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def select_prompts(docs, tokenizer, n_prompts: int, prompt_tokens: int, seed: int) -> List[Prompt]:
    """Deterministic selection of ``n_prompts`` cut points, half ``header`` and half ``mid``.

    Per kind: files are shuffled with ``random.Random(seed)``, each file's cut points too, and files
    are visited round-robin, one cut point per visit, so prompts spread over files.
    """
    rng = random.Random(seed)
    by_kind: Dict[str, Dict[str, list]] = {"header": defaultdict(list), "mid": defaultdict(list)}
    texts = dict(docs)
    for path, text in docs:
        lines = text.splitlines(keepends=True)
        for line, kind in cut_points(text):
            if line > len(lines):
                continue
            offset = sum(len(x) for x in lines[:line - 1])
            if not text[offset:].strip():
                continue
            by_kind[kind][path].append((line, offset))
    wanted = {"header": (n_prompts + 1) // 2, "mid": n_prompts // 2}
    chosen = []
    for kind in ("header", "mid"):
        files = sorted(by_kind[kind])
        rng.shuffle(files)
        queues = {f: rng.sample(by_kind[kind][f], len(by_kind[kind][f])) for f in files}
        picked = 0
        while picked < wanted[kind] and any(queues.values()):
            for f in files:
                if picked == wanted[kind]:
                    break
                while queues[f]:
                    line, offset = queues[f].pop()
                    # the text before the cut must be Python that more lines can complete (see metrics)
                    if metrics.syntax_status(texts[f][:offset])[0] != "error":
                        chosen.append((f, kind, line, offset))
                        picked += 1
                        break
    if len(chosen) < n_prompts:
        print(f"[prompts] only {len(chosen)} cut points available (asked for {n_prompts})", file=sys.stderr)
    prompts = []
    for i, (path, kind, line, offset) in enumerate(chosen):
        text = texts[path]
        context, reference = text[:offset], text[offset:offset + REFERENCE_CHARS]
        ids = encode(tokenizer, context)[-prompt_tokens:] if context else []
        if not ids:  # a cut at the very top of a file: give the model an end-of-text token to start from
            ids = [EOS_ID]
        prompts.append(Prompt(i, path, line, kind, context, reference, ids))
    return prompts


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    strategy: str
    mode: str
    eps_b: Optional[float] = None  # None for ar
    ablation: str = "none"

    @property
    def name(self) -> str:
        parts = [self.strategy] + ([self.ablation] if self.ablation != "none" else []) + [self.mode]
        if self.eps_b is not None:
            parts.append(f"eps_b={self.eps_b:g}")
        return "/".join(parts)

    @property
    def group(self) -> str:
        """The sweep this setting belongs to (same-quality speed-up is fitted per group)."""
        return "/".join([self.strategy] + ([self.ablation] if self.ablation != "none" else []) + [self.mode])

    def overrides(self, variants: Optional[dict] = None) -> dict:
        """The sample() keyword arguments of this setting; ``variants``: extra dynamo ablations
        (``--dynamo-variant``), name -> DynamoConfig overrides."""
        eps = {} if self.eps_b is None else {"eps_b": float(self.eps_b)}
        extra = {"speculative": SPEC_ABLATIONS, "lookup": LOOKUP_VARIANTS}.get(self.strategy,
                                                                             {**ABLATIONS, **(variants or {})})
        return {**eps, **extra.get(self.ablation, {})}


def build_settings(strategies, modes, eps_values, ablations, ablation_eps, spec_ablations=()) -> List[Setting]:
    """ar; dynamo at every eps_b (+ its ablations); speculative (cost-sized, hybrid) and its
    ablations (``thresholds`` at every eps_b); lookup."""
    out = []
    for mode in modes:
        out.append(Setting("ar", mode))
        for strategy in strategies:
            if strategy == "dynamo":
                out += [Setting(strategy, mode, e) for e in eps_values]
            elif strategy == "speculative":
                out.append(Setting(strategy, mode))
                for abl in spec_ablations:
                    out += [Setting(strategy, mode, e, abl) for e in eps_values] if abl == "thresholds" \
                        else [Setting(strategy, mode, None, abl)]
            elif strategy == "lookup":
                out += [Setting(strategy, mode), Setting(strategy, mode, None, "corpus"),
                        Setting(strategy, mode, None, "corpus_no_tree")]
        if "dynamo" in strategies:
            for abl in ablations:
                out += [Setting("dynamo", mode, e, abl) for e in ablation_eps]
    return out


# ---------------------------------------------------------------- generation


def _batch_inputs(prompts: List[Prompt], device):
    """Left-padded ``input_ids`` and ``attention_mask``, both (B, S) int64."""
    S = max(len(p.ids) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, S - len(p.ids):] = torch.tensor(p.ids)
        mask[r, S - len(p.ids):] = 1
    return ids.to(device), mask.to(device)


def run_generations(model, prompts, settings, seeds, args, stats, progress=True):
    """Generate every (prompt, setting, seed). Returns (samples, timings).

    samples: dicts with the row's new tokens and step statistics; timings: one dict per
    (setting, seed, batch) with the batch's wall time and token count.
    """
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    jobs = []
    for b, batch in enumerate(batches):
        for mode in MODES:
            group = [s for s in settings if s.mode == mode]
            if not group:
                continue
            rot = b % len(group)
            group = group[rot:] + group[:rot]
            for seed in (seeds if mode == "sampled" else seeds[:1]):
                jobs += [(b, seed, s) for s in group]

    def call(batch, setting, seed, max_new):
        ids, mask = _batch_inputs(batch, dev)
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        return sample(model, ids, mask, strategy=setting.strategy, max_new_tokens=max_new,
                      do_sample=setting.mode == "sampled", temperature=args.temperature, top_k=args.top_k,
                      eos_token_id=None, generator=gen, return_dict_in_generate=True,
                      stats=stats if setting.strategy != "ar" else None, **setting.overrides(args.variants))

    for s in sorted({(x.strategy, x.mode) for x in settings}):  # warm-up: first calls pay allocations
        warm = next(x for x in settings if (x.strategy, x.mode) == s)
        call(batches[0], warm, 0, min(4, args.max_new_tokens))

    samples, timings = [], []
    for b, seed, setting in tqdm(jobs, desc="generate", unit="call", disable=not progress, dynamic_ncols=True):
        batch = batches[b]
        out = call(batch, setting, seed, args.max_new_tokens)
        S = out.sequences.shape[1] - args.max_new_tokens
        timings.append({"setting": setting.name, "seed": seed, "batch": b, "wall_s": out.wall_time,
                        "new_tokens": int(out.new_tokens.sum()), "steps": int(out.steps.sum())})
        for r, p in enumerate(batch):
            new = out.sequences[r, S:S + int(out.new_tokens[r])].tolist()
            samples.append({"setting": setting, "prompt": p.id, "seed": seed, "tokens": new,
                            "steps": int(out.steps[r]), "new_tokens": int(out.new_tokens[r]),
                            "histogram": out.histogram[r].tolist(), "drafted": int(out.drafted[r]),
                            "accepted": int(out.accepted[r])})
    return samples, timings


def cut_at_eos(tokens: List[int]) -> List[int]:
    """The completion up to its first end-of-text token (inclusive)."""
    return tokens[:tokens.index(EOS_ID) + 1] if EOS_ID in tokens else list(tokens)


@torch.inference_mode()
def head1_loglik(model, pairs, batch_size: int = 8, progress: bool = True) -> List[float]:
    """Mean log p_head1(continuation token | everything before it) per (prompt_ids, continuation_ids).

    One forward (``heads=1``, no cache) per batch of right-padded rows; logits only at the
    continuation's positions. Temperature 1, no top-k. Empty continuations give NaN.
    """
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    result = [float("nan")] * len(pairs)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="score", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk = [i for i in chunk if pairs[i][1]]
        if not chunk:
            continue
        T = max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk)
        C = max(len(pairs[i][1]) for i in chunk)
        B = len(chunk)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        idx = torch.zeros(B, C, dtype=torch.long)  # index of the position predicting continuation token j
        tgt = torch.zeros(B, C, dtype=torch.long)
        valid = torch.zeros(B, C, dtype=torch.bool)
        for r, i in enumerate(chunk):
            prompt, cont = pairs[i]
            seq = list(prompt) + list(cont)
            ids[r, :len(seq)] = torch.tensor(seq)
            pos[r, :len(seq)] = torch.arange(len(seq))
            idx[r, :len(cont)] = torch.arange(len(prompt) - 1, len(seq) - 1)
            tgt[r, :len(cont)] = torch.tensor(cont)
            valid[r, :len(cont)] = True
        logits = model(ids.to(dev), pos.to(dev), None, heads=1, logits_index=idx.to(dev))[:, :, 0]  # (B, C, V)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.to(dev)[..., None])[..., 0].cpu()  # (B, C)
        mean = (logp * valid).sum(-1) / valid.sum(-1)
        for r, i in enumerate(chunk):
            result[i] = float(mean[r])
    return result


# ---------------------------------------------------------------- metrics per setting


def evaluate_samples(samples, prompts, tokenizer, model, args, progress=True):
    """Fills per-sample quality fields in place: text, loglik, line_em, char_sim, valid, distinct_n."""
    by_id = {p.id: p for p in prompts}
    keys, pairs = {}, []
    for s in samples:
        cont = cut_at_eos(s["tokens"])
        s["completion_ids"] = cont
        key = (s["prompt"], tuple(cont))
        if key not in keys:
            keys[key] = len(pairs)
            pairs.append((by_id[s["prompt"]].ids, cont))
        s["_pair"] = keys[key]
    scores = head1_loglik(model, pairs, batch_size=args.score_batch_size, progress=progress)
    for s in samples:
        p = by_id[s["prompt"]]
        text_ids = [t for t in s["completion_ids"] if t != EOS_ID]
        text = decode(tokenizer, text_ids)
        s["text"] = text
        s["loglik"] = scores[s.pop("_pair")]
        s["line_em"] = metrics.line_exact_match(text, p.reference)
        s["char_sim"] = metrics.char_similarity(text, p.reference)
        s["complete_lines"] = sum(1 for x in metrics.cut_at_last_line(text).splitlines() if x.strip())  # non-blank
        s["valid"] = metrics.is_valid_completion(p.context, text)
        for n in (1, 2, 3):
            s[f"distinct_{n}"] = metrics.distinct_n(text_ids, n)


def aggregate(samples, timings, settings, n_heads: int) -> List[dict]:
    """One row per setting (see the module doc for every column's definition)."""
    by_setting = defaultdict(list)
    for s in samples:
        by_setting[s["setting"].name].append(s)
    time_by = defaultdict(lambda: [0.0, 0])
    call_rate = {}  # (setting, seed, batch) -> tokens / s of that call
    for t in timings:
        time_by[t["setting"]][0] += t["wall_s"]
        time_by[t["setting"]][1] += t["new_tokens"]
        call_rate[(t["setting"], t["seed"], t["batch"])] = t["new_tokens"] / max(t["wall_s"], 1e-12)
    rows = []
    for st in settings:
        rows_s = by_setting[st.name]
        ar = Setting("ar", st.mode)
        base = {(s["prompt"], s["seed"]): s["loglik"] for s in by_setting[ar.name]}
        mine = [s["loglik"] for s in rows_s]
        ref = [base.get((s["prompt"], s["seed"]), float("nan")) for s in rows_s]
        wins, losses, ties = metrics.win_loss_tie(mine, ref, TIE_TOL)
        rate = metrics.win_rate(mine, ref, TIE_TOL)
        wall, toks = time_by[st.name]
        ar_wall, ar_toks = time_by[ar.name]
        total_speed = (toks / wall) / (ar_toks / ar_wall) if wall > 0 and ar_wall > 0 and ar_toks else float("nan")
        ratios = [rate / call_rate[(ar.name, seed, b)] for (name, seed, b), rate in call_rate.items()
                  if name == st.name and (ar.name, seed, b) in call_rate]
        speed = float(np.median(ratios)) if ratios else float("nan")
        steps = sum(s["steps"] for s in rows_s)
        width = max([n_heads] + [len(s["histogram"]) for s in rows_s])  # ar: 1, lookup: 1 + draft length
        hist = np.sum([np.pad(s["histogram"], (0, width - len(s["histogram"]))) for s in rows_s], axis=0) \
            if rows_s else np.zeros(width)
        drafted = sum(s["drafted"] for s in rows_s)
        row = {
            "setting": st.name, "group": st.group, "strategy": st.strategy, "mode": st.mode,
            "eps_b": st.eps_b if st.eps_b is not None else "", "ablation": st.ablation,
            "n": len(rows_s),
            "tokens_per_step": sum(s["new_tokens"] for s in rows_s) / steps if steps else float("nan"),
            "wall_s": wall, "tokens_per_s": toks / wall if wall > 0 else float("nan"), "speedup": speed,
            "speedup_total": total_speed,
            "wins": wins, "losses": losses, "ties": ties, "win_rate": rate,
            "norm_win_rate": metrics.normalized_win_rate(rate),
            "mean_loglik": metrics.nanmean(mine),
            "line_em": metrics.nanmean(s["line_em"] for s in rows_s),
            "char_sim": metrics.nanmean(s["char_sim"] for s in rows_s),
            # judged = completions with a complete non-blank line (otherwise nothing was written to parse)
            "valid_share": metrics.nanmean(float(s["valid"]) for s in rows_s if s["complete_lines"]),
            "judged_share": metrics.nanmean(float(s["complete_lines"] > 0) for s in rows_s),
            "distinct_1": metrics.nanmean(s["distinct_1"] for s in rows_s),
            "distinct_2": metrics.nanmean(s["distinct_2"] for s in rows_s),
            "distinct_3": metrics.nanmean(s["distinct_3"] for s in rows_s),
            "acceptance": sum(s["accepted"] for s in rows_s) / drafted if drafted else "",
        }
        total_steps = max(1, int(hist.sum()))
        for n in range(1, n_heads + 1):
            row[f"share_steps_n{n}"] = float(hist[n - 1]) / total_steps
        row[f"share_steps_over_{n_heads}"] = float(hist[n_heads:].sum()) / total_steps
        rows.append(row)
    return rows


def same_quality_table(rows, n_heads: int) -> List[dict]:
    """Same-quality speed-up per sweep group (strategies other than ar)."""
    out = []
    groups = defaultdict(list)
    for r in rows:
        if r["strategy"] != "ar":
            groups[r["group"]].append(r)
    for g, rs in groups.items():
        sq = metrics.same_quality_speedup([r["speedup"] for r in rs], [r["norm_win_rate"] for r in rs],
                                          max_speedup=n_heads)
        out.append({"group": g, "strategy": rs[0]["strategy"], "ablation": rs[0]["ablation"],
                    "mode": rs[0]["mode"], "eps_b": [r["eps_b"] for r in rs],
                    "max_tokens_per_step": max(r["tokens_per_step"] for r in rs), **sq.to_dict(),
                    "same_quality_speedup": sq.speedup})
    return out


# ---------------------------------------------------------------- outputs


def _fmt(x, nd=3):
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def write_markdown(path, rows, sq_rows, header: dict):
    cols = [("setting", "setting"), ("tokens_per_step", "tok/step"), ("speedup", "speed-up"), ("speedup_total", "(total)"),
            ("win_rate", "win rate"), ("wlt", "W/L/T"), ("norm_win_rate", "norm. WR"), ("mean_loglik", "loglik"),
            ("line_em", "line EM"), ("char_sim", "char sim"), ("valid_share", "valid"), ("judged_share", "judged"),
            ("distinct_1", "dist-1"), ("distinct_2", "dist-2"), ("distinct_3", "dist-3")]
    lines = ["# Quality against speed", "",
             f"Model: {header['model']}; statistics: {header['stats']}.  ",
             f"Machine: {header['machine']}.  ",
             f"{header['n_prompts']} prompts ({header['prompt_source']}), max_new_tokens {header['max_new_tokens']}, "
             f"seeds {header['seeds']} (greedy: first seed), batch size {header['batch_size']}, "
             f"temperature {header['temperature']}, top-k {header['top_k']}; {header['elapsed_s']:.0f} s.", "",
             "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        r = dict(r, wlt=f"{r['wins']}/{r['losses']}/{r['ties']}")
        lines.append("| " + " | ".join(_fmt(r[c[0]], 2 if c[0] in ("tokens_per_step", "speedup", "speedup_total") else 3)
                                       for c in cols) + " |")
    lines += ["", "## Same-quality speed-up (DynaMo)", "",
              "| sweep | eps_b points | max tok/step | slope | intercept | crossing | cap | same-quality speed-up |",
              "|---|---|---|---|---|---|---|---|"]
    for s in sq_rows:
        lines.append(f"| {s['group']} | {len(s['eps_b'])} | {_fmt(s['max_tokens_per_step'], 2)} | "
                     f"{_fmt(s['slope'])} | {_fmt(s['intercept'])} | {_fmt(s['crossing'], 2)} | {_fmt(s['cap'], 2)} | "
                     f"**{_fmt(s['speedup'], 2)}** |")
    lines += ["", "Definitions: see `evals/quality_vs_speed.py` (module docstring) and `evals/metrics.py`. "
              "Speed-up = median over calls of tokens/s over the matching `ar` call (same mode, prompts, seed) "
              "in the same run; win rate = wins/(wins+losses) "
              "against `ar` by head-1 mean log-prob (ties excluded, 0.5 if all tie); norm. WR = win rate / 0.5; "
              "same-quality speed-up = largest speed-up in [1, min(max measured, H)] where the least-squares "
              "line of norm. WR against speed-up is >= 1 (1.0 if none).", ""]
    Path(path).write_text("\n".join(lines))


def _group_style(group_rows):
    strategy, ablation = group_rows[0]["strategy"], group_rows[0]["ablation"]
    if strategy == "speculative":
        return dict(marker="D", linestyle="--", color="tab:red")
    colors = {"none": "tab:blue", "no_cooc": "tab:orange", "no_adaptive": "tab:green", "no_blur": "tab:purple"}
    return dict(marker="o", linestyle="-", color=colors.get(ablation, "tab:gray"))


def write_plots(out: Path, rows, sq_rows, modes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r["strategy"] != "ar":
            groups[(r["mode"], r["group"])].append(r)
    # speed-up and tokens/step against eps_b
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for c, mode in enumerate(modes):
        for (m, g), rs in sorted(groups.items()):
            if m != mode:
                continue
            label = g.rsplit("/", 1)[0]
            if any(r["eps_b"] == "" for r in rs):  # no eps_b sweep (speculative, lookup): a level line
                for ax, key in ((axes[0, c], "speedup"), (axes[1, c], "tokens_per_step")):
                    ax.axhline(rs[0][key], label=label, linewidth=1.2,
                               color={"lookup": "tab:brown"}.get(rs[0]["strategy"], "tab:red"),
                               linestyle={"none": "-", "no_lookup": "--"}.get(rs[0]["ablation"], "-."))
                continue
            rs = sorted(rs, key=lambda r: r["eps_b"])
            for ax, key in ((axes[0, c], "speedup"), (axes[1, c], "tokens_per_step")):
                ax.plot([r["eps_b"] for r in rs], [r[key] for r in rs], label=label, **_group_style(rs))
        axes[0, c].axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="ar")
        axes[1, c].axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        for ax in axes[:, c]:
            ax.set_xscale("symlog", linthresh=0.05)  # the interesting eps_b are near 0
        axes[0, c].set(title=f"{mode}: wall-clock speed-up over ar", xlabel="eps_b", ylabel="speed-up")
        axes[1, c].set(title=f"{mode}: tokens per step", xlabel="eps_b", ylabel="tokens / step")
        axes[0, c].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_eps.png", dpi=110)
    plt.close(fig)
    # quality against speed-up
    panels = [("norm_win_rate", "normalized win rate vs ar"), ("char_sim", "char similarity to the file"),
              ("valid_share", "valid Python share")]
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(5.5 * len(panels), 4.5 * len(modes)), squeeze=False)
    for rr, mode in enumerate(modes):
        ar = next((r for r in rows if r["strategy"] == "ar" and r["mode"] == mode), None)
        for c, (key, title) in enumerate(panels):
            ax = axes[rr, c]
            for (m, g), rs in sorted(groups.items()):
                if m != mode:
                    continue
                rs = sorted(rs, key=lambda r: r["speedup"])
                ax.plot([r["speedup"] for r in rs], [r[key] for r in rs], label=g.rsplit("/", 1)[0],
                        **_group_style(rs))
                if key == "norm_win_rate":
                    for r in (r for r in rs if r["eps_b"] != ""):
                        ax.annotate(f"{r['eps_b']:g}", (r["speedup"], r[key]), fontsize=6, alpha=0.6,
                                    xytext=(2, 2), textcoords="offset points")
            if ar is not None:
                ax.plot([1.0], [ar[key]], marker="*", markersize=14, color="black", linestyle="none", label="ar")
            if key == "norm_win_rate":
                ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
                for s in sq_rows:
                    if s["mode"] == mode and s["strategy"] == "dynamo" and s["ablation"] == "none":
                        ax.axvline(s["speedup"], color="tab:blue", linewidth=0.8, linestyle=":",
                                   label=f"same-quality speed-up {s['speedup']:.2f}")
            ax.set(title=f"{mode}: {title}", xlabel="wall-clock speed-up over ar", ylabel=key)
            if c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_speedup.png", dpi=110)
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python evals/quality_vs_speed.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_asset_args(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--source-dir", default=None, help="directory of .py files to cut prompts from "
                                                      "(default: the stdlib test split)")
    g.add_argument("--split", default="test", choices=corpus.SPLITS, help="stdlib split (default test)")
    g.add_argument("--n-prompts", type=int, default=None, help=f"default {FULL['n_prompts']} ({QUICK['n_prompts']} quick)")
    g.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt selection")
    g.add_argument("--prompt-tokens", type=int, default=None,
                   help=f"prompt = last N tokens before the cut (default {FULL['prompt_tokens']}, quick {QUICK['prompt_tokens']})")
    g = p.add_argument_group("sweep")
    g.add_argument("--quick", action="store_true", help="CI-sized run (few prompts, eps_b values, tokens)")
    g.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    g.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    g.add_argument("--eps-b", type=float, nargs="+", default=None, help=f"default {FULL['eps_b']} (quick {QUICK['eps_b']})")
    g.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    g.add_argument("--spec-ablations", nargs="*", default=list(SPEC_ABLATIONS), choices=list(SPEC_ABLATIONS),
                   help="speculative variants beside the default (cost-sized drafts, lookup hybrid)")
    g.add_argument("--dynamo-variant", action="append", default=[], metavar="NAME=JSON",
                   help="an extra dynamo ablation: DynamoConfig overrides as a JSON object, e.g. "
                        "'rep2={\"repetition_penalty\": 2.0}' (repeatable; run at --ablation-eps-b)")
    g.add_argument("--ablation-eps-b", type=float, nargs="+", default=None,
                   help="eps_b values for the ablations (default: --eps-b; quick " f"{QUICK['ablation_eps_b']})")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {FULL['seeds']} (quick {QUICK['seeds']})")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {FULL['max_new_tokens']} (quick {QUICK['max_new_tokens']})")
    g.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 1)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--score-batch-size", type=int, default=8, help="rows per likelihood forward")
    p.add_argument("--out", default="evals/results", help="output directory (default evals/results)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, default in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.ablation_eps_b is None:
        args.ablation_eps_b = args.eps_b
    args.variants = {}
    for spec in args.dynamo_variant:
        name, _, text = spec.partition("=")
        try:
            overrides = json.loads(text)
            if not isinstance(overrides, dict):
                raise ValueError("not a JSON object")
            DynamoConfig(**overrides).validate()
        except (ValueError, TypeError) as e:
            p.error(f"--dynamo-variant expects NAME=JSON with DynamoConfig fields, got {spec!r}: {e}")
        if not name or name in ABLATIONS or name in SPEC_ABLATIONS or name in args.variants or "/" in name:
            p.error(f"--dynamo-variant name {name!r} is empty, has a '/' or is taken")
        args.variants[name] = overrides
        args.ablations.append(name)
    for e in args.eps_b + args.ablation_eps_b:
        if not 0.0 <= e <= 1.0:
            p.error(f"--eps-b values must be in [0, 1], got {e}")
    for key in ("n_prompts", "max_new_tokens", "prompt_tokens", "batch_size", "score_batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    progress = not args.no_progress
    assets = load_assets(args)
    model, tokenizer, stats = assets.model, assets.tokenizer, assets.stats
    H = model.n_heads
    room = model.max_seq_len - args.max_new_tokens
    if room < 1:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.max_seq_len}")
    args.prompt_tokens = min(args.prompt_tokens, room)
    docs = load_sources(args.source_dir, args.split)
    prompts = select_prompts(docs, tokenizer, args.n_prompts, args.prompt_tokens, args.prompt_seed)
    if not prompts:
        raise SystemExit("no prompts: the sources hold no def/class with a docstring or function body to cut")
    strategies = [s for s in args.strategies if s != "ar"]
    settings = build_settings(strategies, args.modes, args.eps_b,
                              args.ablations if "dynamo" in strategies else [], args.ablation_eps_b,
                              args.spec_ablations)
    print(f"[quality_vs_speed] {len(prompts)} prompts, {len(settings)} settings, seeds {args.seeds}, "
          f"max_new_tokens {args.max_new_tokens}, model {assets.info['model']}, H={H}", flush=True)
    samples, timings = run_generations(model, prompts, settings, args.seeds, args, stats, progress)
    evaluate_samples(samples, prompts, tokenizer, model, args, progress)
    rows = aggregate(samples, timings, settings, H)
    sq_rows = same_quality_table(rows, H)
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    header = {"model": assets.info["model"], "dtype": assets.info.get("dtype"), "stats": assets.info.get("stats"),
              "machine": machine_line(machine), "threads": torch.get_num_threads(),
              "n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "seeds": args.seeds,
              "batch_size": args.batch_size, "temperature": args.temperature, "top_k": args.top_k,
              "elapsed_s": elapsed,
              "prompt_source": args.source_dir or f"stdlib {args.split} split"}
    fieldnames = list(rows[0].keys())
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    sample_cols = ["setting", "prompt", "seed", "new_tokens", "steps", "completion_tokens", "complete_lines",
                   "loglik", "line_em", "char_sim", "valid", "distinct_1", "distinct_2", "distinct_3", "drafted", "accepted"]
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sample_cols)
        w.writeheader()
        for s in samples:
            w.writerow({**{k: s[k] for k in sample_cols if k in s}, "setting": s["setting"].name,
                        "completion_tokens": len(s["completion_ids"])})
    with open(out / "timings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(timings[0].keys()))
        w.writeheader()
        w.writerows(timings)
    with open(out / "completions.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps({"setting": s["setting"].name, "prompt": s["prompt"], "seed": s["seed"],
                                "text": s["text"]}) + "\n")
    config = {k: v for k, v in vars(args).items()}
    result = {
        "config": config, "assets": assets.info, "machine": machine, "elapsed_s": elapsed, "n_heads": H,
        "settings": rows, "same_quality": sq_rows,
        "prompts": [{"id": p.id, "path": p.path, "line": p.line, "kind": p.kind, "prompt_tokens": len(p.ids),
                     "context_parses": metrics.syntax_status(p.context)[0]} for p in prompts],
        "definitions": {
            "tokens_per_step": "total new tokens / total forward passes after prefill",
            "speedup": "median over calls (prompt batch, seed) of (new tokens / wall s of the call) / (the same "
                       "for the ar call of the same mode, batch and seed); same max_new_tokens, prefill included",
            "speedup_total": "(total new tokens / total wall s) of the setting / the same for ar of the same mode",
            "win_rate": "wins / (wins + losses) against ar of the same mode, per (prompt, seed); score = mean "
                        "head-1 log-prob per token of the completion (to its first EOS, inclusive) given the "
                        "prompt, temperature 1, no top-k; |diff| <= 1e-6 is a tie and excluded; 0.5 if all tie",
            "norm_win_rate": "win_rate / 0.5 (1.0 = parity with ar)",
            "same_quality_speedup": "least-squares line norm_win_rate = a + b * speedup over the eps_b points "
                                    "of one (strategy, ablation, mode); the largest speed-up in [1, min(max "
                                    "measured speed-up, H)] where the line is >= 1.0; 1.0 if none",
            "line_em": "share of the completion's complete non-blank lines equal (rstrip) to the file's "
                       "non-blank line of the same rank after the cut",
            "char_sim": "difflib.SequenceMatcher(None, completion, reference[:len(completion)], "
                        "autojunk=False).ratio()",
            "valid_share": "share of completions with at least one complete non-blank line for which "
                           "metrics.is_valid_completion(file text before the cut, completion) holds: cut at the "
                           "last complete line; parses, or only incomplete at the end; if the context itself has "
                           "an error, no new error",
            "judged_share": "share of completions with a complete non-blank line (those valid_share judges)",
            "distinct_n": "unique n-grams / n-grams over the completion's tokens (EOS excluded), n = 1..3",
        },
    }
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=2))
    write_markdown(out / "results.md", rows, sq_rows, header)
    write_plots(out, rows, sq_rows, args.modes)
    print((out / "results.md").read_text())
    print(json.dumps({"out": str(out), "elapsed_s": round(elapsed, 1), "settings": len(rows),
                      "same_quality": {s["group"]: round(s["speedup"], 3) for s in sq_rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
