"""Model, tokenizer and co-occurrence statistics for the eval and benchmark scripts.

Used by ``evals/quality_vs_speed.py``, ``evals/perplexity.py`` and ``benchmarks/``. Resolution order
for the model:

1. ``--model-dir DIR`` (a directory written by ``TinyMTP.save_pretrained``);
2. ``--random-model``: a randomly initialised TinyMTP of the bundled shape (development only);
3. ``dynamo_sampling.load_pretrained()`` when the library has it (returns model, tokenizer, stats);
4. ``runs/tiny/final`` (the training run's output).

Statistics: ``--stats FILE`` when it exists; else the statistics ``load_pretrained`` returned; else
built from ``--train-tokens`` (default ``runs/data/train.npy``) with ``max_order = H`` and saved to
``--stats FILE`` when one was named; else none (DynaMo without co-occurrence weighting).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as ``python evals/x.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from dynamo_sampling.cooccurrence import CooccurrenceStats, tokenizer_fingerprint  # noqa: E402
from dynamo_sampling.models.tiny import TinyMTP, TinyMTPConfig, load_model  # noqa: E402
from dynamo_sampling.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_MODEL_DIR = "runs/tiny/final"
DEFAULT_TOKENIZER = "runs/data/tokenizer.json"
DEFAULT_TRAIN_TOKENS = "runs/data/train.npy"
# the shape of the bundled model (runs/tiny/final): what --random-model and the benchmarks build
BUNDLED_SHAPE = dict(n_layer=6, n_heads=3, d_model=256, n_attn_heads=8, d_ff=1024, vocab_size=8192, max_seq_len=512)


@dataclass
class Assets:
    """What a script runs on. ``info`` says where each part came from (written into results)."""

    model: TinyMTP
    tokenizer: object = None  # tokenizers.Tokenizer or None
    stats: Optional[CooccurrenceStats] = None
    info: dict = field(default_factory=dict)


def add_asset_args(parser: argparse.ArgumentParser, tokenizer: bool = True, stats: bool = True):
    """The shared ``--model-dir / --random-model / --tokenizer / --stats / --train-tokens / --device`` flags."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model-dir", default=None,
                   help=f"model directory from save_model (default: load_pretrained() if the library has it, "
                        f"else {DEFAULT_MODEL_DIR})")
    g.add_argument("--random-model", action="store_true",
                   help="use a random TinyMTP of the bundled shape (vocab from the tokenizer); development only")
    if tokenizer:
        g.add_argument("--tokenizer", default=None, help=f"tokenizer.json (default {DEFAULT_TOKENIZER})")
    if stats:
        g.add_argument("--stats", default=None,
                       help="co-occurrence statistics .npz; built from --train-tokens (and saved here) if missing")
        g.add_argument("--train-tokens", default=DEFAULT_TRAIN_TOKENS,
                       help="token stream (.npy) to build the statistics from when --stats is absent")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a small model decodes "
                   "fastest on one, and far slower on two when another process busies a core)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="inference dtype (default auto: bf16 where the hardware runs it natively)")
    return parser


def _pretrained(device, with_stats: bool, log):
    """``load_pretrained()``'s (model, tokenizer, stats), or None when the library has no such function
    or no bundled weights yet (``FileNotFoundError``)."""
    try:
        from dynamo_sampling import load_pretrained
    except (ImportError, AttributeError):
        return None
    try:
        try:
            return load_pretrained(device=device, with_stats=with_stats)
        except TypeError:  # an older signature
            return load_pretrained()
    except FileNotFoundError as e:
        log(f"[assets] load_pretrained(): {e}; trying {DEFAULT_MODEL_DIR}")
        return None


def load_assets(args: argparse.Namespace, need_tokenizer: bool = True, need_stats: bool = True,
                log=print) -> Assets:
    """Resolve model, tokenizer and statistics from parsed :func:`add_asset_args` flags."""
    torch.set_num_threads(max(1, int(getattr(args, "threads", 1) or 1)))
    info = {}
    tok_path = getattr(args, "tokenizer", None)
    tokenizer = load_tokenizer(tok_path) if tok_path else None
    pre_stats = None
    if args.model_dir:
        model = load_model(args.model_dir)
        info["model"] = f"model_dir:{args.model_dir}"
    elif args.random_model:
        if tokenizer is None and need_tokenizer and Path(DEFAULT_TOKENIZER).is_file():
            tok_path, tokenizer = DEFAULT_TOKENIZER, load_tokenizer(DEFAULT_TOKENIZER)
        vocab = tokenizer.get_vocab_size() if tokenizer is not None else BUNDLED_SHAPE["vocab_size"]
        torch.manual_seed(0)
        model = TinyMTP(TinyMTPConfig(**{**BUNDLED_SHAPE, "vocab_size": vocab})).eval()
        info["model"] = f"random TinyMTP of the bundled shape (vocab {vocab}, seed 0)"
    else:
        pre = _pretrained(args.device, need_stats and not getattr(args, "stats", None), log)
        if pre is not None:
            model, pre_tok, pre_stats = pre
            tokenizer = tokenizer if tokenizer is not None else pre_tok
            info["model"] = "dynamo_sampling.load_pretrained()"
        elif Path(DEFAULT_MODEL_DIR, "config.json").is_file():
            model = load_model(DEFAULT_MODEL_DIR)
            info["model"] = f"model_dir:{DEFAULT_MODEL_DIR}"
        else:
            raise FileNotFoundError(f"no model: load_pretrained() has no bundled weights and {DEFAULT_MODEL_DIR} "
                                    f"does not exist; pass --model-dir DIR (or --random-model for development)")
    from dynamo_sampling.pretrained import resolve_dtype
    dtype = resolve_dtype(getattr(args, "dtype", "auto"), args.device)
    model = model.to(device=args.device, dtype=dtype).eval()
    info["dtype"] = str(dtype).replace("torch.", "")
    if need_tokenizer and tokenizer is None:
        tok_path = DEFAULT_TOKENIZER
        tokenizer = load_tokenizer(tok_path)
    if tokenizer is not None and tokenizer.get_vocab_size() > model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{model.vocab_size}; pass the tokenizer the model was trained with")
    info["tokenizer"] = str(tok_path) if tok_path else ("load_pretrained()" if tokenizer is not None else None)
    stats = None
    if need_stats:
        stats, info["stats"] = _resolve_stats(args, model, tok_path, pre_stats, log)
    info["config"] = {k: getattr(model.config, k) for k in model.config.__dataclass_fields__} \
        if hasattr(model, "config") else {}
    return Assets(model, tokenizer, stats, info)


def _resolve_stats(args, model, tok_path, pre_stats, log):
    H, V = model.n_heads, model.vocab_size
    if H < 2:
        return None, "none (one head: no n-grams to weight)"
    path = getattr(args, "stats", None)
    if path and Path(path).is_file():
        return CooccurrenceStats.load(path, vocab_size=V), f"file:{path}"
    if pre_stats is not None and not path:
        return pre_stats, "load_pretrained()"
    tokens_path = getattr(args, "train_tokens", None)
    if not tokens_path or not Path(tokens_path).is_file():
        log(f"[assets] no statistics: {path or '--stats'} and {tokens_path} are missing; "
            f"DynaMo runs without co-occurrence weighting")
        return None, "none (no --stats file and no --train-tokens)"
    if H > 4:
        log(f"[assets] no statistics: n-gram statistics stop at order 4, the model has {H} heads")
        return None, f"none (H={H} > 4)"
    tokens = np.load(tokens_path)
    if tokens.size and int(tokens.max()) >= V:
        raise ValueError(f"{tokens_path} holds token id {int(tokens.max())} >= the model's vocabulary {V}; "
                         f"it was made with another tokenizer")
    fp = tokenizer_fingerprint(tok_path) if tok_path and Path(tok_path).is_file() else None
    stats = CooccurrenceStats.build([tokens], vocab_size=V, max_order=H, tokenizer_fingerprint=fp)
    where = f"built from {tokens_path} ({tokens.size:,} tokens, max_order {H})"
    if path:
        os.makedirs(Path(path).parent, exist_ok=True)
        stats.save(path)
        where += f", saved to {path}"
    log(f"[assets] statistics {where}")
    return stats, where


def machine_info() -> dict:
    """Where a measurement ran: host, CPU model, cores, torch threads, versions, GPU if any."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        info["cpus_allowed"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    """One human line for a table caption."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['host']}: {info['cpu']} ({info.get('cpus_allowed', info['cpu_count'])} CPUs usable, "
            f"{info['torch_threads']} torch thread(s)){gpu}; Python {info['python']}, torch {info['torch']}")


def assets_or_random(model_dir: Optional[str] = None, need_stats: bool = True, threads: int = 1,
                     log=print) -> Assets:
    """For benchmarks: the trained model (``model_dir``, ``load_pretrained()`` or ``runs/tiny/final``)
    when there is one, else a random TinyMTP of the bundled shape; ``info["model"]`` says which."""
    ns = argparse.Namespace(model_dir=model_dir, random_model=False, tokenizer=None, stats=None,
                            train_tokens=DEFAULT_TRAIN_TOKENS, device="cpu", threads=threads)
    try:
        return load_assets(ns, need_tokenizer=False, need_stats=need_stats, log=log)
    except FileNotFoundError:
        ns.random_model = True
        assets = load_assets(ns, need_tokenizer=False, need_stats=need_stats, log=log)
        assets.info["model"] += " - no trained model found"
        return assets
