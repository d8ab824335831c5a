"""``dynamo-sampling`` command line: train, cooccur, generate (users of the library, never imported by it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _add_train(sub):
    from .train.trainer import TrainConfig

    p = sub.add_parser("train", help="train a TinyMTP on tokenised data (see train/trainer.py for the recipe)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        default = getattr(defaults, f.name)
        kind = type(default)
        if kind is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"),
                           default=default, metavar="BOOL")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    p.add_argument("--model", type=json.loads, default={}, help='TinyMTPConfig fields as JSON, e.g. \'{"n_heads": 3}\'')
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.set_defaults(func=_run_train)


def add_cooccur(sub):
    """Register the ``cooccur`` subcommand (``func=run_cooccur``) on an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "cooccur",
        help="count corpus n-gram co-occurrence statistics for DynaMo weighting",
        description="Tokenise source files (each file is one document; directories are walked for *.py, "
                    "skipping hidden directories) and write unigram/n-gram counts to an .npz file.",
    )
    p.add_argument("files", nargs="+", metavar="FILES_OR_DIRS", help="files, or directories to walk for *.py")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="Hugging Face tokenizers tokenizer.json")
    p.add_argument("--max-order", type=int, default=3, help="largest n-gram order, 2..4 (default 3)")
    p.add_argument("--min-count", type=int, default=1, help="drop n-grams seen fewer times (default 1)")
    p.add_argument("--out", default="stats.npz", help="output .npz path (default stats.npz)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size of the model (default: the tokenizer's; may be larger, e.g. padded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cooccur)
    return p


def _collect_files(paths):
    """The files named, and the *.py files under the directories named (hidden directories skipped)."""
    from pathlib import Path

    out = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend(Path(root) / f for f in sorted(files) if f.endswith(".py"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"expected an existing file or directory, got {raw!r}")
    return out


def run_cooccur(args) -> int:
    """Run the ``cooccur`` subcommand; returns the exit code (0 on success, 2 on a bad input)."""
    import time

    import numpy as np
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from .cooccurrence import CooccurrenceStats, tokenizer_fingerprint

    try:
        files = _collect_files(args.files)
    except FileNotFoundError as e:
        print(f"cooccur: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"cooccur: no *.py files found under {list(args.files)}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.tokenizer):
        print(f"cooccur: tokenizer file not found: {args.tokenizer!r}", file=sys.stderr)
        return 2
    tok = Tokenizer.from_file(args.tokenizer)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if args.vocab_size is not None:
        if args.vocab_size < vocab_size:
            print(f"cooccur: --vocab-size must be >= the tokenizer's vocabulary ({vocab_size}), "
                  f"got {args.vocab_size}", file=sys.stderr)
            return 2
        vocab_size = args.vocab_size

    def documents():
        for f in tqdm(files, desc="cooccur", unit="file", disable=args.no_progress):
            text = f.read_text(encoding="utf-8", errors="replace")
            yield np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    t0 = time.perf_counter()
    try:
        stats = CooccurrenceStats.build(documents(), vocab_size=vocab_size, max_order=args.max_order,
                                        min_count=args.min_count,
                                        tokenizer_fingerprint=tokenizer_fingerprint(args.tokenizer))
    except (TypeError, ValueError) as e:
        print(f"cooccur: {e}", file=sys.stderr)
        return 2
    stats.save(args.out)
    secs = time.perf_counter() - t0
    print(f"files:            {len(files)}")
    print(f"tokens:           {stats.num_tokens}")
    for n, count in stats.num_ngrams.items():
        print(f"distinct {n}-grams: {count}")
    print(f"bytes:            {stats.nbytes}")
    print(f"seconds:          {secs:.2f}")
    print(f"wrote:            {args.out}")
    return 0


def _run_train(args) -> int:
    from .train.trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    summary = train(cfg, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("model", "history")}))
    return 0


class TextStreamer:
    """Prints row 0's text as tokens arrive (``put`` gets a list of per-row token tensors)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def put(self, tokens):
        self.ids.extend(tokens[0].tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self):
        self.out.write("\n")
        self.out.flush()


def _add_generate(sub):
    from .decoding import STRATEGIES

    p = sub.add_parser("generate", help="complete a prompt with the bundled (or a given) model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': standard input)")
    p.add_argument("--strategy", choices=STRATEGIES, default="dynamo", help="decoding strategy (README)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to write per sample, at most")
    p.add_argument("--num-samples", type=int, default=1,
                   help="completions of the same prompt, decoded as one batch (identical unless --do-sample)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --do-sample only")
    p.add_argument("--top-k", type=int, default=50, help="with --do-sample only")
    p.add_argument("--eps-b", type=float, default=None, help="DynaMo static threshold (default: DynamoConfig's)")
    p.add_argument("--corpus-draft", type=int, default=None, metavar="N",
                   help="lookup / speculative: corpus drafts of at most N tokens from the statistics' n-grams "
                        "(0: none; default: LookupConfig's)")
    p.add_argument("--lookup-tree", choices=("auto", "on", "off"), default="auto",
                   help="lookup / speculative with corpus drafts: feed the losing lookup draft as a second branch "
                        "where it pays (auto: lookup with one row, README 'Lookup trees')")
    p.add_argument("--dynamo", default=None, metavar="JSON",
                   help='other DynamoConfig fields as a JSON object, e.g. the setting with ar\'s variety (README): '
                        '\'{"adaptive_threshold": false, "repetition_penalty": 20, "alpha_c": 1.1}\'')
    p.add_argument("--eos", type=int, action="append", default=None, metavar="ID",
                   help="stop a row at this token id (repeatable; default: 0, the bundled tokenizer's end of text)")
    p.add_argument("--no-eos", action="store_true", help="never stop early: always write --max-new-tokens")
    p.add_argument("--truncate", choices=("none", "left"), default="none",
                   help="a prompt longer than the context allows: an error (none) or keep its last tokens (left)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--model-dir", default=None, help="a save_model directory with tokenizer.json (default: bundled)")
    p.add_argument("--no-stats", action="store_true", help="no co-occurrence statistics")
    p.add_argument("--stream", action="store_true", help="print text as it is produced (the first sample)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --device cuda: replay each step's forward from a captured CUDA graph (same tokens)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: 1 suits a model this small, and torch's default (one per core) "
                        "runs up to 100x slower while another process busies a core")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="inference dtype; auto: bf16 where the hardware runs it natively, else fp32")
    p.set_defaults(func=_run_generate)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompt-file {args.prompt_file}: {e}") from e


def _dynamo_overrides(text) -> dict:
    """``--dynamo`` JSON -> DynamoConfig fields (a ValueError naming what was wrong)."""
    import dataclasses
    from .policy import DynamoConfig

    if text is None:
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--dynamo must be a JSON object of DynamoConfig fields, got {text!r} ({e})") from e
    if not isinstance(fields, dict):
        raise ValueError(f"--dynamo must be a JSON object of DynamoConfig fields, got {type(fields).__name__} {text!r}")
    known = {f.name for f in dataclasses.fields(DynamoConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--dynamo: unknown DynamoConfig field(s) {unknown}; expected some of {sorted(known)}")
    return fields


def _run_generate(args) -> int:
    import torch

    from .pretrained import load_pretrained
    from .text import encode_batch
    from .sampling import sample

    for name in ("threads", "num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    prompt = _read_prompt(args)
    torch.set_num_threads(args.threads)
    model, tok, stats = load_pretrained(args.model_dir, device=args.device, with_stats=not args.no_stats,
                                        dtype=args.dtype)
    room = model.max_seq_len - args.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.max_seq_len} tokens")
    ids, mask = encode_batch(tok, [prompt] * args.num_samples, args.device, room, args.truncate)
    eos = None if args.no_eos else (args.eos if args.eos is not None else [0])
    overrides = _dynamo_overrides(args.dynamo)
    if args.eps_b is not None:
        overrides["eps_b"] = args.eps_b
    if args.corpus_draft is not None:
        overrides["corpus_draft"] = args.corpus_draft
    if args.lookup_tree != "auto":
        overrides["tree"] = args.lookup_tree == "on"
    streamer = TextStreamer(tok) if args.stream else None
    if streamer:
        sys.stdout.write(prompt)
    out = sample(model, ids, mask, strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                 do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, eos_token_id=eos,
                 stats=stats, generator=torch.Generator(device=args.device).manual_seed(args.seed),
                 streamer=streamer, return_dict_in_generate=True, cuda_graph=args.cuda_graph, **overrides)
    S = ids.shape[1]
    for b in range(args.num_samples):
        if streamer and b == 0:
            continue
        if args.num_samples > 1:
            print(f"----- sample {b + 1} -----")
        print(prompt + tok.decode(out.sequences[b, S:S + int(out.new_tokens[b])].tolist()))
    for b in range(args.num_samples):
        print(f"[{args.strategy}] {int(out.new_tokens[b])} tokens in {int(out.steps[b])} steps "
              f"({out.tokens_per_step[b].item():.2f} tokens/step)" + (f", {out.wall_time:.2f} s" if b == 0 else ""),
              file=sys.stderr)
    return 0


def _check_outputs(args):
    """Refuse an output path whose directory is missing or not writable, before any work."""
    for attr in ("out", "out_dir"):
        path = getattr(args, attr, None)
        if not isinstance(path, str):
            continue
        target = os.path.abspath(path if attr == "out_dir" else os.path.dirname(os.path.abspath(path)))
        while not os.path.exists(target):  # out_dir is created by the run: its nearest existing ancestor counts
            if attr == "out":
                raise ValueError(f"--out {path}: directory {target} does not exist")
            target = os.path.dirname(target)
        if not os.path.isdir(target) or not os.access(target, os.W_OK):
            raise ValueError(f"--{attr.replace('_', '-')} {path}: {target} is not a writable directory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dynamo-sampling", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    add_cooccur(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    try:
        _check_outputs(args)
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # the library's boundary errors: one line, exit 2
        if args.debug:
            raise
        print(f"dynamo-sampling: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
