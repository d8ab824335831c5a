"""Greedy completions of held-out function headers (the README's examples).

Takes top-level functions with a one-line docstring from the stdlib test split (never trained
on), prompts with just ``def ...:`` + docstring (no trailing newline), and completes greedily
with each strategy.

    python evals/completions.py --n 3 --out evals/results/completions.md
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_sampling import load_pretrained, sample  # noqa: E402
from dynamo_sampling.corpus import load_split  # noqa: E402


def function_headers(n: int):
    """First ``n`` top-level functions (by file path) whose docstring is one line: (path, header, body)."""
    out = []
    for rel, text in load_split("test"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if ast.get_docstring(node) is None or doc.lineno != doc.end_lineno or node.lineno != doc.lineno - 1:
                continue
            # the prompt ends before the newline: BPE merges it with the next line's indentation
            header = "".join(lines[node.lineno - 1:doc.end_lineno]).rstrip("\n")
            body = "\n" + "".join(lines[doc.end_lineno:node.end_lineno])
            out.append((rel, header, body))
            break  # one per file, for variety
        if len(out) == n:
            break
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="evals/results/completions.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok, stats = load_pretrained()
    parts = ["# Greedy completions of held-out function headers\n",
             f"Bundled model, stdlib test split, greedy, {a.max_new_tokens} new tokens, stops at EOS. "
             "Command: `python evals/completions.py`.\n"]
    for rel, header, body in function_headers(a.n):
        ids = torch.tensor([tok.encode(header).ids])
        parts.append(f"\n## `{rel}`\n")
        for strategy in ("ar", "dynamo", "speculative"):
            out = sample(model, ids, strategy=strategy, max_new_tokens=a.max_new_tokens, eos_token_id=0,
                         stats=stats, return_dict_in_generate=True)
            new = out.sequences[0, ids.shape[1]:ids.shape[1] + int(out.new_tokens[0])].tolist()
            text = tok.decode([t for t in new if t != 0])
            parts.append(f"\n**{strategy}** ({out.tokens_per_step[0].item():.2f} tokens/step):\n\n"
                         f"```python\n{header}{text}\n```\n")
        parts.append(f"\n**the file's own body:**\n\n```python\n{header}{body[:400]}\n```\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("".join(parts))
    print("".join(parts))


if __name__ == "__main__":
    main()
