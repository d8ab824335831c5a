"""Per-head perplexity PPL_n, joint perplexity PPL_1:n and top-1 accuracy of an MTP model.

Usage::

    python evals/perplexity.py --model-dir runs/tiny/final --split test
    python evals/perplexity.py --model-dir DIR --tokens some.npy --seq-len 128 --out ppl.json

Definitions (``nll_h(t) = -log p_h(x[t+h] | x[..t])``, head ``h`` = 1..H predicting ``h`` tokens
ahead, natural log, full softmax at temperature 1):

* ``PPL_n  = exp(mean_t nll_n(t))`` — head ``n`` alone;
* ``PPL_1:n = exp(mean_t (1/n) * sum_{h=1..n} nll_h(t))`` — DynaMo's Eq. 4 as used here: the
  perplexity per token of the joint n-token prediction ``prod_{h<=n} p_h(x[t+h])`` (the heads'
  product, the quantity DynaMo's joint J scores). Because every head is averaged over the same
  positions it equals the geometric mean of ``PPL_1 .. PPL_n``; ``PPL_1:1 = PPL_1``;
* ``top1_acc_n`` = share of positions where head ``n``'s argmax is ``x[t+n]``;
* ``agree_n`` = share of positions where head ``n``'s argmax at ``t`` equals head 1's argmax at
  ``t+n-1`` (both predict ``x[t+n]``; pairs within one window): what greedy speculative decoding
  needs for head ``n``'s draft to be kept. ``agree_1 = 1``.

Positions: the token stream (documents joined by EOS, as in training) is cut into non-overlapping
windows of ``seq_len`` input tokens; window ``w`` feeds ``x[w*L .. w*L+L-1]`` with no cache (each
window starts from an empty context) and scores targets up to ``H`` tokens past its end, so every
head is scored on every input position. Windows whose targets would run past the stream are dropped
(a stream shorter than ``L + H`` gives one window of ``len - H`` inputs).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evals.assets import add_asset_args, load_assets, machine_info  # noqa: E402


@torch.inference_mode()
def perplexities(model, tokens_np, seq_len: int = 256, batch_size: int = 4, max_windows: int = None,
                 progress: bool = False) -> dict:
    """PPL_n, PPL_1:n and top-1 accuracy per head (see the module docstring).

    Parameters
    ----------
    model : MTP model (``forward(input_ids, positions, cache, heads)``, ``n_heads``, ``max_seq_len``).
    tokens_np : 1-D integer array (any int dtype), shape (N,); the token stream.
    seq_len : int >= 1, input tokens per window (at most the model's context).
    batch_size : windows per forward.
    max_windows : int or None; score only the first ``max_windows`` windows.

    Returns
    -------
    dict with ``n_heads``, ``seq_len``, ``n_windows``, ``n_positions`` and lists indexed by head - 1:
    ``nll`` (mean nats), ``ppl`` (PPL_n), ``ppl_joint`` (PPL_1:n), ``top1_acc``.
    """
    tokens = np.asarray(tokens_np)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    H, V = model.n_heads, model.vocab_size
    N = int(tokens.size)
    if N <= H:
        raise ValueError(f"need more than H={H} tokens to score every head, got {N}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(f"token ids must be in [0, {V}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    if seq_len < 1 or seq_len > model.max_seq_len:
        raise ValueError(f"seq_len must be in 1..{model.max_seq_len} (the model's context), got {seq_len}")
    L = min(seq_len, N - H)
    n_windows = (N - H) // L
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    dev = next(model.parameters()).device
    t = torch.from_numpy(tokens[:n_windows * L + H].astype(np.int64))
    starts = torch.arange(n_windows) * L
    offsets = torch.arange(L + H)
    nll_sum = torch.zeros(H, dtype=torch.float64)
    correct = torch.zeros(H, dtype=torch.float64)
    agree = torch.zeros(H, dtype=torch.float64)
    agree_n = torch.zeros(H, dtype=torch.float64)
    positions = torch.arange(L, device=dev)
    batches = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", dynamic_ncols=True)
    for b0 in batches:
        x = t[starts[b0:b0 + batch_size, None] + offsets].to(dev)  # (B, L + H)
        B = x.shape[0]
        logits = model(x[:, :L], positions.expand(B, L), None, heads=H)  # (B, L, H, V)
        top = logits.argmax(-1)  # (B, L, H)
        for h in range(H):
            agree[h] += (top[:, :L - h, h] == top[:, h:, 0]).double().sum().cpu()
            agree_n[h] += B * (L - h)
            target = x[:, h + 1:h + 1 + L]  # (B, L): head h+1 predicts x[t + h + 1]
            logp = torch.log_softmax(logits[:, :, h].float(), dim=-1)
            nll_sum[h] -= logp.gather(-1, target[..., None]).double().sum().cpu()
            correct[h] += (logits[:, :, h].argmax(-1) == target).double().sum().cpu()
    count = n_windows * L
    nll = (nll_sum / count).tolist()
    return {
        "n_heads": H, "seq_len": L, "n_windows": n_windows, "n_positions": count,
        "nll": nll,
        "ppl": [math.exp(v) for v in nll],
        "ppl_joint": [math.exp(sum(nll[:n]) / n) for n in range(1, H + 1)],
        "top1_acc": (correct / count).tolist(),
        "agree": (agree / agree_n.clamp(min=1)).tolist(),
    }


def format_table(res: dict) -> str:
    lines = [f"{'head n':>6} | {'NLL_n':>7} | {'PPL_n':>9} | {'PPL_1:n':>9} | {'top-1 acc':>9} | {'agree w/ 1':>10}",
             "-" * 65]
    for h in range(res["n_heads"]):
        lines.append(f"{h + 1:>6} | {res['nll'][h]:7.4f} | {res['ppl'][h]:9.3f} | {res['ppl_joint'][h]:9.3f} | "
                     f"{res['top1_acc'][h]:9.4f} | {res['agree'][h]:10.4f}")
    lines.append(f"({res['n_windows']} windows x {res['seq_len']} tokens = {res['n_positions']:,} positions)")
    return "\n".join(lines)


def load_tokens(args, tokenizer) -> tuple:
    """The token stream: --tokens FILE, else DATA_DIR/SPLIT.npy, else the split tokenized now."""
    if args.tokens:
        return np.load(args.tokens), f"file:{args.tokens}"
    path = Path(args.data_dir, f"{args.split}.npy")
    if path.is_file():
        return np.load(path), f"file:{path}"
    from dynamo_sampling import corpus
    from dynamo_sampling.tokenizer import encode_documents
    from dynamo_sampling.train.tokenizer import pack_documents

    docs = [text for _, text in corpus.load_split(args.split) if text]
    return pack_documents(encode_documents(tokenizer, docs)), f"stdlib {args.split} split, tokenized now"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python evals/perplexity.py", description=__doc__.split("\n")[0])
    add_asset_args(p, tokenizer=True, stats=False)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--data-dir", default="runs/data", help="directory with {split}.npy (default runs/data)")
    p.add_argument("--tokens", default=None, help="a .npy token stream instead of the split")
    p.add_argument("--seq-len", type=int, default=256, help="input tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=None, help="score only this many windows")
    p.add_argument("--out", default="evals/results/perplexity.json", help="JSON output file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    need_tok = not args.tokens and not Path(args.data_dir, f"{args.split}.npy").is_file()
    assets = load_assets(args, need_tokenizer=need_tok, need_stats=False)
    tokens, source = load_tokens(args, assets.tokenizer)
    res = perplexities(assets.model, tokens, args.seq_len, args.batch_size, args.max_windows,
                       progress=not args.no_progress)
    res.update({"model": assets.info["model"], "tokens": source, "split": None if args.tokens else args.split,
                "seconds": time.perf_counter() - t0, "machine": machine_info(),
                "definitions": {"ppl": "exp(mean_t -log p_n(x[t+n]))",
                                "ppl_joint": "exp(mean_t (1/n) sum_{h<=n} -log p_h(x[t+h])) (DynaMo Eq. 4)",
                                "top1_acc": "share of positions where argmax p_n = x[t+n]",
                                "agree": "share of positions where argmax p_n at t = argmax p_1 at t+n-1"}})
    print(format_table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("ppl", "ppl_joint", "top1_acc", "agree", "n_positions")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
