"""``dynamo-sampling`` command line: train, cooccur, generate (users of the library, never imported by it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.add_argument("--prompt", required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="dynamo")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--eps-b", type=float, default=None, help="DynaMo static threshold (default: DynamoConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="a save_model directory with tokenizer.json (default: bundled)")
    p.add_argument("--no-stats", action="store_true", help="no co-occurrence statistics")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: 1 suits a model this small, and torch's default (one per core) "
                        "runs up to 100x slower while another process busies a core")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="inference dtype; auto: bf16 where the hardware runs it natively, else fp32")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import torch

    from .pretrained import load_pretrained
    from .sampling import sample

    if args.threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    model, tok, stats = load_pretrained(args.model_dir, with_stats=not args.no_stats, dtype=args.dtype)
    ids = torch.tensor([tok.encode(args.prompt).ids])
    if ids.shape[1] == 0:
        raise SystemExit("error: the prompt encodes to no tokens")
    overrides = {} if args.eps_b is None else {"eps_b": args.eps_b}
    streamer = TextStreamer(tok) if args.stream else None
    if streamer:
        sys.stdout.write(args.prompt)
    out = sample(model, ids, strategy=args.strategy, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                 temperature=args.temperature, top_k=args.top_k, eos_token_id=0, stats=stats,
                 generator=torch.Generator().manual_seed(args.seed), streamer=streamer,
                 return_dict_in_generate=True, **overrides)
    if not streamer:
        print(args.prompt + tok.decode(out.sequences[0, ids.shape[1]:out.sequences.shape[1]].tolist()
                                       [:int(out.new_tokens[0])]))
    print(f"[{args.strategy}] {int(out.new_tokens[0])} tokens in {int(out.steps[0])} steps "
          f"({out.tokens_per_step[0].item():.2f} tokens/step), {out.wall_time:.2f} s", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .cooccurrence import add_cli as add_cooccur

    parser = argparse.ArgumentParser(prog="dynamo-sampling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    add_cooccur(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
