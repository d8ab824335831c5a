"""Byte-level BPE tokenizer and tokenized-data preparation for the stdlib corpus.

``prepare_data`` trains a byte-level BPE tokenizer on the *train* split of
:mod:`dynamo_sampling.corpus`, then encodes all three splits into flat
uint16 token arrays with ``<|endoftext|>`` (id 0) between documents::

    python -m dynamo_sampling.train.tokenizer --out runs/data --vocab-size 8192

writes ``tokenizer.json``, ``train.npy``, ``val.npy``, ``test.npy`` and
``data.json`` (token/file/byte counts, vocab size, tokenizer sha256).

The tokenizer is lossless: ``decode(encode(text)) == text`` for any text
(every byte is in the base alphabet, there is no normalizer, no prefix space,
and the special token is never matched inside ordinary text).

Loading and using a trained tokenizer (``load_tokenizer``, ``encode``, ``decode``,
``encode_documents``, ``EOS_ID``, ``file_sha256``) lives in :mod:`dynamo_sampling.tokenizer`,
shared with inference; this module re-exports those names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import corpus
from ..tokenizer import (  # noqa: F401  (re-exported: loading is shared with inference)
    EOS_ID,
    EOS_TOKEN,
    MAX_UINT16_VOCAB as _MAX_UINT16_VOCAB,
    configure as _configure,
    decode,
    encode,
    encode_documents,
    file_sha256,
    load_tokenizer,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

__all__ = [
    "EOS_TOKEN",
    "EOS_ID",
    "train_tokenizer",
    "load_tokenizer",
    "encode",
    "decode",
    "encode_documents",
    "pack_documents",
    "prepare_data",
    "file_sha256",
    "main",
]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` as id 0.

    The full 256-symbol byte alphabet is always included, so any text can be
    encoded, and decode(encode(text)) == text exactly.
    """
    if not 257 <= vocab_size <= _MAX_UINT16_VOCAB:
        raise ValueError(f"vocab_size must be in [257, {_MAX_UINT16_VOCAB}] (uint16 ids)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID, "EOS must be id 0"
    return _configure(tok)


def pack_documents(docs: Sequence[np.ndarray], eos_id: int = EOS_ID) -> np.ndarray:
    """Concatenate documents into one uint16 array with ``eos_id`` between them.

    ``[a, b, c] -> a EOS b EOS c`` (no leading/trailing EOS).
    """
    if len(docs) == 0:
        return np.zeros(0, dtype=np.uint16)
    total = sum(len(d) for d in docs) + len(docs) - 1
    out = np.empty(total, dtype=np.uint16)
    pos = 0
    for i, d in enumerate(docs):
        if i:
            out[pos] = eos_id
            pos += 1
        out[pos : pos + len(d)] = d
        pos += len(d)
    assert pos == total
    return out


def prepare_data(
    out_dir,
    vocab_size: int = 8192,
    root=None,
    progress: bool = True,
    min_frequency: int = 2,
    val_fraction: float = corpus.DEFAULT_VAL_FRACTION,
    test_fraction: float = corpus.DEFAULT_TEST_FRACTION,
    tokenizer=None,
) -> dict:
    """Train the tokenizer on the train split and write the tokenized splits.

    ``tokenizer``: path of an existing ``tokenizer.json`` to encode with instead of training one
    (e.g. the bundled model's, so a retrained model keeps its tokenizer and statistics).

    Writes ``out_dir/tokenizer.json``, ``out_dir/{train,val,test}.npy`` (uint16,
    documents separated by EOS id 0, empty files dropped) and
    ``out_dir/data.json``; returns the data.json dict.  Deterministic: the same
    corpus gives byte-identical files (no timestamps or paths in the outputs
    except ``root``).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root_path = corpus.stdlib_root() if root is None else Path(root)

    def log(msg):
        if progress:
            print(f"[prepare_data {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    splits: dict[str, list[tuple[str, str]]] = {}
    skipped: dict[str, list[str]] = {}
    for split in corpus.SPLITS:
        skipped[split] = []
        splits[split] = corpus.load_split(
            split, root_path, val_fraction, test_fraction, skipped=skipped[split]
        )
        log(f"{split}: {len(splits[split])} files ({len(skipped[split])} skipped, not utf-8)")
    if not splits["train"]:
        raise ValueError(f"no training files under {root_path}")

    tok_path = out_dir / "tokenizer.json"
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        log(f"encoding with the existing tokenizer {tokenizer}")
    else:
        log(f"training byte-level BPE (vocab {vocab_size}) on the train split")
        tok = train_tokenizer(
            [t for _, t in splits["train"]],
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=progress,
        )
    tok.save(str(tok_path))
    tok_sha = file_sha256(tok_path)
    log(f"saved {tok_path} (vocab {tok.get_vocab_size()}, sha256 {tok_sha[:16]})")

    info = {
        "format": "uint16 token ids, documents joined with EOS (id 0) between them",
        "eos_token": EOS_TOKEN,
        "eos_id": EOS_ID,
        "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "tokenizer_sha256": tok_sha,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "root": str(root_path),
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "splits": {},
    }
    for split in corpus.SPLITS:
        docs = [(rel, text) for rel, text in splits[split] if text]
        arrays = encode_documents(tok, [text for _, text in docs])
        packed = pack_documents(arrays)
        npy_path = out_dir / f"{split}.npy"
        np.save(npy_path, packed)
        n_bytes = sum(len(t.encode("utf-8")) for _, t in splits[split])
        n_doc_tokens = int(sum(len(a) for a in arrays))
        info["splits"][split] = {
            "files": len(splits[split]),
            "nonempty_files": len(docs),
            "skipped_files": len(skipped[split]),
            "bytes": n_bytes,
            "tokens": int(len(packed)),  # including EOS separators
            "doc_tokens": n_doc_tokens,
            "bytes_per_token": round(n_bytes / max(n_doc_tokens, 1), 4),
            "npy_sha256": file_sha256(npy_path),
        }
        log(f"{split}: {len(packed):,} tokens -> {npy_path}")

    with open(out_dir / "data.json", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")

    if progress:
        print(format_summary(info))
        print(f"done in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    return info


def format_summary(info: dict) -> str:
    lines = [
        f"vocab {info['vocab_size']}  tokenizer sha256 {info['tokenizer_sha256'][:16]}",
        f"{'split':<6} {'files':>6} {'bytes':>12} {'tokens':>11} {'bytes/tok':>9}",
    ]
    for split in corpus.SPLITS:
        s = info["splits"][split]
        lines.append(
            f"{split:<6} {s['files']:>6} {s['bytes']:>12,} {s['tokens']:>11,} {s['bytes_per_token']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dynamo_sampling.train.tokenizer",
        description="Train a byte-level BPE tokenizer on the stdlib train split "
        "and write tokenized train/val/test .npy files.",
    )
    p.add_argument("--out", required=True, help="output directory (e.g. runs/data)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--root", default=None, help="source root (default: this Python's stdlib)")
    p.add_argument("--val-fraction", type=float, default=corpus.DEFAULT_VAL_FRACTION)
    p.add_argument("--test-fraction", type=float, default=corpus.DEFAULT_TEST_FRACTION)
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="encode with this tokenizer.json instead of training one")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    prepare_data(
        a.out,
        vocab_size=a.vocab_size,
        root=a.root,
        progress=not a.quiet,
        min_frequency=a.min_frequency,
        val_fraction=a.val_fraction,
        test_fraction=a.test_fraction,
        tokenizer=a.tokenizer,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
