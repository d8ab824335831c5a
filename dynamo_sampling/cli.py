"""``dynamo-sampling`` command line: train, cooccur, generate, demo (users of the library, never imported by it)."""
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


def main(argv=None) -> int:
    from .cooccurrence import add_cli as add_cooccur

    parser = argparse.ArgumentParser(prog="dynamo-sampling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    add_cooccur(sub)
    try:
        from .generate_cli import add_cli as add_generate

        add_generate(sub)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
