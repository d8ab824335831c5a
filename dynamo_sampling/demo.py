"""``make demo``: the bundled model completes a few code prompts with every strategy.

Prints each completion, tokens per step, and the wall-clock speed-up over ``ar`` measured in
this run (same prompt, same number of new tokens, greedy; ``lookup`` is the no-heads peer, prompt
lookup alone, and ``lookup+corpus`` adds drafts from the co-occurrence statistics' n-grams).
Runs on one torch thread (``--threads``): a model this small decodes fastest on one, and up to
100x slower on two while another process busies a core.
"""
from __future__ import annotations

import argparse

import torch

from .sampling import sample

# Prompts end before the newline: the BPE merges a newline with the next line's indentation, so a
# prompt ending in a bare "\n" is a token sequence the model never saw in training.
PROMPTS = [
    'def is_palindrome(text):\n    """Return True if text reads the same forwards and backwards."""',
    "import os\n\n\ndef list_python_files(root):",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
]

# (label, strategy, sample() overrides): lookup's peer row is prompt lookup alone, as transformers has it
RUNS = [("ar", "ar", {}), ("dynamo", "dynamo", {}), ("speculative", "speculative", {}),
        ("lookup", "lookup", {"corpus_draft": 0}), ("lookup+corpus", "lookup", {})]


def load_model():
    """The bundled model (a checkout without its files raises FileNotFoundError naming them)."""
    from .pretrained import load_pretrained

    return load_pretrained()


def run(max_new_tokens: int = 64, repeats: int = 2, threads: int = 1):
    torch.set_num_threads(threads)
    model, tok, stats = load_model()
    print(f"model: TinyMTP, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{str(next(model.parameters()).dtype).replace('torch.', '')}, {threads} thread(s), "
          f"{model.n_heads} heads, trained (bundled); "
          f"co-occurrence statistics: {'%d tokens' % stats.num_tokens if stats is not None else 'none'}\n")
    totals = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        print("=" * 72 + "\n" + prompt.rstrip() + "\n" + "-" * 72)
        times = {}
        for label, strategy, kw in RUNS:
            best = None
            for _ in range(repeats):  # best of `repeats`: the first run warms caches
                out = sample(model, ids, strategy=strategy, max_new_tokens=max_new_tokens, stats=stats,
                             return_dict_in_generate=True, **kw)
                best = out if best is None or out.wall_time < best.wall_time else best
            times[label] = best.wall_time
            totals.setdefault(label, []).append(best.wall_time)
            text = tok.decode(best.sequences[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
            speed = times["ar"] / best.wall_time
            print(f"[{label}] {best.tokens_per_step[0].item():.2f} tokens/step, "
                  f"{best.wall_time * 1e3:.0f} ms, speed-up over ar x{speed:.2f}")
            print("    " + text.replace("\n", "\n    ").rstrip())
    print("=" * 72)
    for s, ts in totals.items():
        print(f"{s:14s} total {sum(ts) * 1e3:7.0f} ms   speed-up over ar x{sum(totals['ar']) / sum(ts):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    run(a.max_new_tokens, a.repeats, a.threads)


if __name__ == "__main__":
    main()
