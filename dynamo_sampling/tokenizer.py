"""Loading and using the byte-level BPE tokenizer, and the file fingerprint that names it.

Used by inference (:mod:`dynamo_sampling.pretrained`, the evals) and by training
(:mod:`dynamo_sampling.train.tokenizer`, which trains the tokenizer and re-exports these), so
that loading a model never imports ``dynamo_sampling.train``. :func:`file_sha256` is also the
co-occurrence statistics' ``tokenizer_fingerprint`` (:mod:`dynamo_sampling.cooccurrence`).

``tokenizers`` is imported on first use, so :func:`file_sha256` costs nothing but ``hashlib``.
"""
from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "EOS_TOKEN",
    "EOS_ID",
    "MAX_UINT16_VOCAB",
    "configure",
    "load_tokenizer",
    "encode",
    "decode",
    "encode_documents",
    "file_sha256",
]

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
MAX_UINT16_VOCAB = 1 << 16  # token arrays are uint16


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 hex digest of a file's bytes (e.g. a ``tokenizer.json``), read in 1 MiB blocks.

    Parameters
    ----------
    path : str or os.PathLike
        Path of the file.

    Returns
    -------
    str
        64-character lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def configure(tok: "Tokenizer") -> "Tokenizer":
    """Make ``tok`` encode text containing ``<|endoftext|>`` as plain bytes.

    EOS only ever enters token streams by id (``train.tokenizer.pack_documents``).
    """
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path) -> "Tokenizer":
    """Load a tokenizer saved by ``train.tokenizer.prepare_data`` / ``Tokenizer.save``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise ValueError(f"{path}: {EOS_TOKEN!r} is not id {EOS_ID}")
    return configure(tok)


def encode(tokenizer: "Tokenizer", text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: "Tokenizer", ids: Sequence[int]) -> str:
    """Exact inverse of :func:`encode` (special tokens are kept, not skipped)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def encode_documents(tokenizer: "Tokenizer", texts: Sequence[str]) -> list[np.ndarray]:
    """Encode each text (parallel ``encode_batch``) to a uint16 array, shape ``(n_tokens,)`` each."""
    if tokenizer.get_vocab_size() > MAX_UINT16_VOCAB:
        raise ValueError("vocab too large for uint16 ids")
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint16) for e in encs]
