"""The stdlib source corpus, re-exported for training code and older imports.

The corpus now lives in :mod:`dynamo_sampling.corpus` (inference builds the bundled model's
statistics from it and must not import ``dynamo_sampling.train``); this module keeps the old
import path ``dynamo_sampling.train.corpus`` working for :mod:`dynamo_sampling.train.tokenizer`.
"""
from __future__ import annotations

from ..corpus import (  # noqa: F401  (re-exports)
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    EXCLUDED_PARTS,
    EXCLUDED_PREFIXES,
    SPLITS,
    corpus_summary,
    is_excluded,
    list_source_files,
    load_split,
    relative_posix,
    split_files,
    split_fingerprint,
    split_of,
    stdlib_root,
)

__all__ = [
    "SPLITS",
    "EXCLUDED_PARTS",
    "EXCLUDED_PREFIXES",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_TEST_FRACTION",
    "stdlib_root",
    "is_excluded",
    "list_source_files",
    "split_of",
    "split_files",
    "relative_posix",
    "load_split",
    "corpus_summary",
    "split_fingerprint",
]
