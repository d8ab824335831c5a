"""The bundled model: ``load_pretrained()`` (used by the demo, the CLI, evals and users).

Package data in ``dynamo_sampling/pretrained/``: ``config.json`` + ``model.safetensors`` (a TinyMTP
trained on the Python standard library, see README "The bundled model"), ``tokenizer.json`` and
``recorded.json`` (a greedy completion recorded when the weights were made, for tests). The
co-occurrence statistics are not shipped (tens of MB): they are built on first use from this
interpreter's standard library train split with the bundled tokenizer (a few seconds, reported in
one line on stderr) and cached as ``.npz`` under ``$DYNAMO_SAMPLING_CACHE`` or
``~/.cache/dynamo_sampling``; a damaged cached file is rebuilt, also with one line on stderr. The
cache file's name (:func:`stats_cache_path`) holds what the statistics were built from: the
tokenizer's sha256, the order, the Python version and :func:`corpus.split_fingerprint` of the train
split, so two interpreters never share statistics of different standard libraries.

Depends on ``models``, ``cooccurrence``, ``tokenizer`` and ``corpus`` only: loading the bundled
model never imports ``dynamo_sampling.train``.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import corpus

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_dtype(device="cpu") -> torch.dtype:
    """The inference dtype this hardware runs fastest, by the rule measured in benchmarks/bench_step.py:
    bfloat16 on a GPU that supports it and on a CPU with native bf16 matmuls (``avx512_bf16`` or
    ``amx_bf16``: a small model's decode step is bound by reading its weights, and bf16 halves that),
    else float32 (without those units bf16 runs emulated and slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """``"auto"`` / ``"float32"`` / ``"bfloat16"`` / a torch.dtype -> torch.dtype, checked."""
    if dtype == "auto" or dtype is None:
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16' (or the torch dtype), got {dtype!r}")


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAMO_SAMPLING_CACHE", Path.home() / ".cache" / "dynamo_sampling"))


def build_stdlib_stats(tokenizer_path, vocab_size: int, max_order: int, root=None, progress: bool = False):
    """Co-occurrence statistics of the standard library's train split, tokenised with ``tokenizer_path``."""
    from .cooccurrence import CooccurrenceStats, tokenizer_fingerprint
    from .tokenizer import encode_documents, load_tokenizer

    tok = load_tokenizer(str(tokenizer_path))
    docs = encode_documents(tok, [text for _, text in corpus.load_split("train", root)])
    return CooccurrenceStats.build(docs, vocab_size=vocab_size, max_order=max_order,
                                   tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path), progress=progress)


def stats_cache_path(tokenizer_fingerprint: str, max_order: int, root=None) -> Path:
    """Where :func:`load_pretrained` caches the statistics built by :func:`build_stdlib_stats`.

    The name holds everything they were built from: the tokenizer's sha256, the order, this
    interpreter's Python version and :func:`corpus.split_fingerprint` of the train split under
    ``root`` (default: this interpreter's standard library; relative paths, sizes, mtimes, no
    file reads), e.g. ``stdlib-stats-<tok 16 hex>-o3-py3.11.4-<corpus 16 hex>.npz``.
    """
    corpus_fp = corpus.split_fingerprint("train", root)
    return cache_dir() / (f"stdlib-stats-{tokenizer_fingerprint[:16]}-o{max_order}"
                          f"-py{platform.python_version()}-{corpus_fp[:16]}.npz")


def load_pretrained(path: Optional[str] = None, device="cpu", with_stats: bool = True, dtype="auto"):
    """Load the bundled MTP model offline.

    Parameters
    ----------
    path : directory with config.json, model.safetensors, tokenizer.json (default: the bundled one).
    device : torch device for the model.
    with_stats : also return co-occurrence statistics (built and cached on first use).
    dtype : "auto" (default: :func:`auto_dtype`, bf16 where the hardware runs it natively), "float32",
        "bfloat16" or a torch dtype. Greedy tokens can differ between dtypes.

    Returns
    -------
    (model TinyMTP in eval mode, tokenizer ``tokenizers.Tokenizer``, stats ``CooccurrenceStats`` or None)
    """
    from .cooccurrence import CooccurrenceStats, tokenizer_fingerprint
    from .models.tiny import TinyMTP
    from .tokenizer import load_tokenizer

    root = Path(path) if path is not None else PRETRAINED_DIR
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"pretrained model directory {root} lacks {missing}; expected {list(REQUIRED_FILES)}")
    dtype = resolve_dtype(dtype, device)
    model = TinyMTP.from_pretrained(str(root), device=device, dtype=dtype)
    try:
        tokenizer = load_tokenizer(str(root / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer {root / 'tokenizer.json'} is corrupted: {e}") from e
    if tokenizer.get_vocab_size() != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model {model.vocab_size}")
    stats = None
    if with_stats:
        fp = tokenizer_fingerprint(root / "tokenizer.json")
        order = max(2, model.n_heads)
        cached = stats_cache_path(fp, order)
        if cached.is_file():
            try:
                stats = CooccurrenceStats.load(str(cached), vocab_size=model.vocab_size, tokenizer_fingerprint=fp)
            except (ValueError, OSError) as e:  # stale or damaged cache: rebuild below
                print(f"dynamo_sampling: cached co-occurrence statistics unusable, rebuilding them: {e}",
                      file=sys.stderr)
        if stats is None:
            t0 = time.perf_counter()
            stats = build_stdlib_stats(root / "tokenizer.json", model.vocab_size, order)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
            stats.save(str(tmp))
            os.replace(tmp, cached)
            print(f"dynamo_sampling: built co-occurrence statistics of the standard library in "
                  f"{time.perf_counter() - t0:.1f} s (cached at {cached})", file=sys.stderr)
    return model, tokenizer, stats

