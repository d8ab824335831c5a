"""Corpus co-occurrence statistics for DynaMo multi-token sampling.

DynaMo (Tuli et al. 2024) re-weights the joint probability of the ``n`` tokens
proposed by ``n`` prediction heads with how often those tokens actually occur
together in the training corpus::

    J(x1..xn) *= ( p^(x1..xn) / prod_h p^(x_h) ) ** alpha_c

where ``p^`` are corpus frequencies (count / total) of contiguous n-grams and
unigrams.  An n-gram never seen in the corpus gets weight exactly 0.

This module counts those statistics (:meth:`CooccurrenceStats.build`), stores
them (:meth:`CooccurrenceStats.save` / :meth:`CooccurrenceStats.load`) and looks
them up in batch on CPU or CUDA (:meth:`CooccurrenceStats.count`,
:meth:`CooccurrenceStats.weight`).  The step policy
``dynamo_sampling/policy.py`` uses :class:`CooccurrenceStats` as its weight
provider.  The ``cooccur`` CLI subcommand (:func:`add_cli` / :func:`run_cli`)
builds a statistics file from source files and a ``tokenizers`` tokenizer.

Storage
-------
* Unigrams: a dense ``np.int64`` array of shape ``[V]``.
* n-grams, ``n = 2..max_order``: sparse, as a sorted array of unique packed
  keys ``key = ((x1 * V + x2) * V + x3) ...`` (``np.int64``, shape ``[K_n]``)
  plus a parallel ``np.int64`` count array (shape ``[K_n]``).  Keys are kept as
  signed int64 (not uint64) so that torch can use them directly; the build
  refuses ``V ** max_order > 2 ** 63`` so packing never overflows (``V =
  50,304`` with ``max_order = 4`` fits).  Memory is ``8 * V + 16 * sum_n K_n``
  bytes (see :attr:`CooccurrenceStats.nbytes`).

Counting is numpy-only and needs no merge step: the corpus is held as one
integer array (a single 1-D input is used without a copy; several documents
are concatenated, with a ``uint8`` per token recording the distance to the
document end so that n-grams never cross a boundary).  The n-gram start
positions are split into buckets by ranges of the first token ``x1`` (about
``bucket_tokens`` positions each, chosen from the unigram counts); since
``x1`` is the most significant digit of the packed key, every bucket's keys,
sorted with ``np.sort`` and run-length encoded with ``np.flatnonzero``, are
final and the buckets follow each other in key order.  Besides the corpus, 1-2
bytes a token of bookkeeping and the result tables, the working memory is
bounded by the bucket size, not by the corpus size.

Frequencies: ``p^(x1..xn) = count_n(x1..xn) / T_n`` where ``T_n`` is the number
of n-gram positions of order ``n`` in the corpus (``sum_doc max(0, len_doc - n
+ 1)``; ``T_1`` is the number of tokens).  Pruning (``min_count``) drops rare
n-grams but keeps ``T_n`` and the unigram counts unchanged, so frequencies of
the kept n-grams do not move.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .tokenizer import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "CooccurrenceStats",
    "tokenizer_fingerprint",
    "add_cli",
    "run_cli",
]

#: Version of the ``.npz`` layout written by :meth:`CooccurrenceStats.save`.
FORMAT_VERSION = 1

#: Default number of n-gram start positions counted per bucket in :meth:`CooccurrenceStats.build`.
DEFAULT_BUCKET_TOKENS = 1 << 24  # 16,777,216

_MIN_ORDER = 2
_MAX_ORDER = 4

#: What :meth:`CooccurrenceStats.load` accepts, for its error messages.
_LOAD_EXPECTED = "a co-occurrence statistics .npz written by CooccurrenceStats.save"

TokenInput = Union[np.ndarray, torch.Tensor, Iterable]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
#: SHA-256 hex digest of a tokenizer file (``tokenizer_fingerprint(path) -> str``, 64 lowercase hex
#: characters): the one file-fingerprint helper, shared with the tokenizer module and training.
tokenizer_fingerprint = file_sha256


def _check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _check_max_order(max_order, vocab_size: int) -> int:
    max_order = _check_int("max_order", max_order, _MIN_ORDER, _MAX_ORDER)
    if vocab_size ** max_order > 2 ** 63:
        raise ValueError(
            f"vocab_size ** max_order must be <= 2**63 so packed n-gram keys fit in int64; "
            f"got vocab_size={vocab_size}, max_order={max_order} "
            f"({vocab_size}**{max_order} = {vocab_size ** max_order})"
        )
    return max_order


def _as_doc(x, index: Optional[int]) -> np.ndarray:
    """Convert one document to a 1-D integer numpy array (no copy when possible)."""
    where = "token_ids" if index is None else f"document {index}"
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{where}: expected an integer tensor, got dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    else:
        x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D array of token ids, got shape {tuple(x.shape)}")
    if x.size == 0:
        return x.astype(np.int64)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{where}: expected an integer dtype for token ids, got dtype {x.dtype}")
    return x


def _iter_documents(token_ids: TokenInput) -> Iterator[Tuple[Optional[int], np.ndarray]]:
    """Yield ``(document index or None, 1-D integer array)``."""
    if isinstance(token_ids, (np.ndarray, torch.Tensor)):
        ndim = token_ids.ndim
        if ndim == 1:
            yield None, _as_doc(token_ids, None)
            return
        if ndim == 2:
            for i in range(token_ids.shape[0]):
                yield i, _as_doc(token_ids[i], i)
            return
        raise ValueError(
            f"token_ids: expected a 1-D array (one document), a 2-D array (one document per row) "
            f"or an iterable of 1-D arrays, got an array of shape {tuple(token_ids.shape)}"
        )
    if isinstance(token_ids, (str, bytes)):
        raise TypeError("token_ids: expected integer token ids, got a string")
    if isinstance(token_ids, (list, tuple)) and len(token_ids) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in token_ids
    ):
        # A flat list of ints is one document.
        yield None, _as_doc(np.asarray(token_ids), None)
        return
    try:
        it = iter(token_ids)
    except TypeError:
        raise TypeError(
            f"token_ids: expected a 1-D integer array or an iterable of 1-D integer arrays, "
            f"got {type(token_ids).__name__}"
        ) from None
    for i, doc in enumerate(it):
        yield i, _as_doc(doc, i)


def _rle_sorted(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unique values and their counts of a sorted 1-D array."""
    if s.size == 0:
        return s[:0].copy(), np.zeros(0, dtype=np.int64)
    brk = np.flatnonzero(s[1:] != s[:-1])
    starts = np.empty(brk.size + 1, dtype=np.int64)
    starts[0] = 0
    np.add(brk, 1, out=starts[1:])
    keys = s[starts]
    counts = np.empty_like(starts)
    counts[:-1] = starts[1:] - starts[:-1]
    counts[-1] = s.size - starts[-1]
    return keys, counts


def _rle_sorted_into(s: np.ndarray, out_keys: np.ndarray, out_counts: np.ndarray) -> int:
    """Run-length encode sorted non-empty ``s`` into the heads of the output arrays; returns K."""
    ends = np.flatnonzero(s[1:] != s[:-1])  # last index of every run but the final one
    K = int(ends.size) + 1
    np.take(s, ends, out=out_keys[: K - 1])
    out_keys[K - 1] = s[-1]
    if K == 1:
        out_counts[0] = s.size
        return 1
    out_counts[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=out_counts[1 : K - 1])
    out_counts[K - 1] = s.size - 1 - ends[-1]
    return K


def _corpus_from_input(token_ids: TokenInput, vocab_size: int):
    """Validate the input and return ``(tokens [N], doc_lengths [D] or None)``.

    A single 1-D input is used as is (no copy); several documents are
    concatenated into one compact integer array.
    """
    V = vocab_size
    cdtype = np.int32 if V <= np.iinfo(np.int32).max else np.int64

    def check_range(doc: np.ndarray, index: Optional[int]) -> None:
        where = "token_ids" if index is None else f"document {index}"
        lo, hi = doc.min(), doc.max()
        if lo < 0:
            raise ValueError(
                f"{where}: token ids must be >= 0, found {int(lo)} at position {int(np.argmin(doc))}"
            )
        if hi >= V:
            raise ValueError(
                f"{where}: token ids must be < vocab_size={V}, found {int(hi)} "
                f"at position {int(np.argmax(doc))}"
            )

    docs: List[np.ndarray] = []
    single = None
    for index, doc in _iter_documents(token_ids):
        if doc.size == 0:
            continue
        check_range(doc, index)
        if index is None:
            single = doc
        else:
            docs.append(doc.astype(cdtype, copy=False))
    if single is not None:
        if single.dtype == np.uint64:  # uint64 does not mix with int64 arithmetic
            single = single.astype(np.int64)
        return single, None
    if not docs:
        return np.zeros(0, dtype=cdtype), None
    lengths = np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
    if len(docs) == 1:
        return docs[0], None
    return np.concatenate(docs), lengths


def _build_tables(
    t: np.ndarray,
    lengths: Optional[np.ndarray],
    V: int,
    max_order: int,
    min_count: int,
    bucket_tokens: int,
    progress=None,
):
    """Count unigrams and n-grams of ``t`` (documents of ``lengths``, or one document).

    The n-gram start positions are split into buckets by ranges of the first
    token ``x1`` (about ``bucket_tokens`` positions each, from the unigram
    counts).  Because ``x1`` is the most significant digit of the packed key,
    each bucket's sorted, run-length encoded keys are final and the buckets
    simply follow each other in the output: no merge step.
    """
    N = int(t.size)
    step = 1 << 24
    unigrams = np.zeros(V, dtype=np.int64)
    for s in range(0, N, step):
        unigrams += np.bincount(t[s : s + step], minlength=V)
    totals = {1: N}
    if lengths is None:
        for n in range(2, max_order + 1):
            totals[n] = max(0, N - n + 1)
        rem = None
    else:
        for n in range(2, max_order + 1):
            totals[n] = int(np.maximum(lengths - n + 1, 0).sum())
        # rem[i] = min(tokens left in i's document incl. i, max_order)
        rem = np.full(N, max_order, dtype=np.uint8)
        ends = np.cumsum(lengths)
        for k in range(max_order - 1, 0, -1):
            ok = lengths >= k
            rem[ends[ok] - k] = k

    # bucket of each first token, from exclusive prefix sums of unigram counts
    prefix = np.cumsum(unigrams) - unigrams
    raw = prefix // bucket_tokens
    lut = np.zeros(V, dtype=np.int64)
    lut[1:] = np.cumsum(raw[1:] != raw[:-1])
    nb = int(lut[-1]) + 1 if V else 1
    bdtype = np.uint8 if nb <= 255 else (np.uint16 if nb <= 65535 else np.uint32)
    lut = lut.astype(bdtype)
    bid = None
    if nb > 1:
        bid = np.empty(N, dtype=bdtype)
        for s in range(0, N, step):
            bid[s : s + step] = lut[t[s : s + step]]

    out_k, out_c, used = {}, {}, {}
    for n in range(2, max_order + 1):
        ub = min(totals[n], V ** n)
        out_k[n] = np.empty(ub, dtype=np.int64)
        out_c[n] = np.empty(ub, dtype=np.int64)
        used[n] = 0

    for j in range(nb):
        # p: candidate start positions of this bucket, either an int64 array or,
        # for a single document in a single bucket, an int m meaning range(m).
        if bid is None and rem is None:
            p = N
        elif bid is None:
            p = np.arange(N, dtype=np.int64)
        else:
            p = np.flatnonzero(bid == j)
        npos = p if isinstance(p, int) else int(p.size)
        key = None  # packed key of the previous order at positions p (unsorted)
        for n in range(2, max_order + 1):
            # keep the starts whose n-gram ends inside their document
            if isinstance(p, int):
                keep = slice(0, min(p, N - n + 1))
                p = keep.stop
                size = p
            else:
                if rem is None:
                    keep = slice(0, int(np.searchsorted(p, N - n, side="right")))
                else:
                    keep = rem[p] >= n
                p = p[keep]
                size = int(p.size)
            if size <= 0:
                break
            if key is None:
                key = (t[:p] if isinstance(p, int) else t[p]).astype(np.int64)
            else:
                key = key[keep]  # view for a slice: the previous key is no longer needed
            key *= V
            key += t[n - 1 : n - 1 + p] if isinstance(p, int) else t[p + (n - 1)]
            if n < max_order:
                s = np.sort(key)  # key is reused for the next order
            else:
                key.sort()
                s = key
            u = used[n]
            if min_count > 1:
                k, c = _rle_sorted(s)
                m = c >= min_count
                k, c = k[m], c[m]
                out_k[n][u : u + k.size] = k
                out_c[n][u : u + k.size] = c
                used[n] = u + k.size
                del k, c, m
            else:
                used[n] = u + _rle_sorted_into(s, out_k[n][u:], out_c[n][u:])
            del s
        del p, key
        if progress is not None:
            progress.update(npos)

    tables = {}
    for n in range(2, max_order + 1):
        k, c = out_k.pop(n), out_c.pop(n)
        # shrink in place (realloc; untouched pages of np.empty were never resident)
        k.resize((used[n],), refcheck=False)
        c.resize((used[n],), refcheck=False)
        tables[n] = (k, c)
    return unigrams, tables, totals


# ----------------------------------------------------------------------------
# main class
# ----------------------------------------------------------------------------
class CooccurrenceStats:
    """Unigram and contiguous n-gram counts of a tokenised corpus.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, look up
    with :meth:`count` and :meth:`weight`.  Objects are immutable once built
    (:meth:`prune` returns a new object); lookup tables are copied to a torch
    device on first use and cached per device.

    Parameters
    ----------
    vocab_size : int
        ``V``; token ids are in ``[0, V)``.
    max_order : int
        Largest n-gram order stored, in ``2..4``.
    unigram_counts : np.ndarray
        ``int64 [V]`` token counts.
    tables : dict of int -> (np.ndarray, np.ndarray)
        For each order ``n`` in ``2..max_order``: sorted unique packed keys
        (``int64 [K_n]``) and their counts (``int64 [K_n]``).
    totals : dict of int -> int
        ``T_n``, the number of n-gram positions of order ``n`` (``T_1`` = tokens).
    min_count : int
        n-grams (order >= 2) with a count below this were dropped.
    tokenizer_fingerprint : str
        Free-form identifier of the tokenizer (sha256 of its file), may be ``""``.

    Most users call :meth:`build` or :meth:`load` instead of the constructor.
    """

    def __init__(
        self,
        vocab_size: int,
        max_order: int,
        unigram_counts: np.ndarray,
        tables: Dict[int, Tuple[np.ndarray, np.ndarray]],
        totals: Dict[int, int],
        min_count: int = 1,
        tokenizer_fingerprint: Optional[str] = None,
    ) -> None:
        self._V = _check_int("vocab_size", vocab_size, lo=1)
        self._max_order = _check_max_order(max_order, self._V)
        uni = np.ascontiguousarray(unigram_counts, dtype=np.int64)
        if uni.shape != (self._V,):
            raise ValueError(f"unigram_counts: expected shape ({self._V},), got {uni.shape}")
        self._unigrams = uni
        self._tables: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        for n in range(2, self._max_order + 1):
            if n not in tables:
                raise ValueError(f"tables: missing order {n} (max_order={self._max_order})")
            k = np.ascontiguousarray(tables[n][0], dtype=np.int64)
            c = np.ascontiguousarray(tables[n][1], dtype=np.int64)
            if k.ndim != 1 or k.shape != c.shape:
                raise ValueError(
                    f"tables[{n}]: expected 1-D keys and counts of equal length, "
                    f"got shapes {k.shape} and {c.shape}"
                )
            self._tables[n] = (k, c)
        self._totals = {n: int(totals[n]) for n in range(1, self._max_order + 1)}
        self._min_count = int(min_count)
        self._fingerprint = "" if tokenizer_fingerprint is None else str(tokenizer_fingerprint)
        self._device_cache: Dict[str, dict] = {}
        #: Set on objects returned by :meth:`prune` (``None`` otherwise).
        self.last_prune_report: Optional[dict] = None

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        token_ids: TokenInput,
        vocab_size: int,
        max_order: int = 3,
        min_count: int = 1,
        tokenizer_fingerprint: Optional[str] = None,
        progress: bool = False,
        bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
    ) -> "CooccurrenceStats":
        """Count unigrams and contiguous n-grams of a corpus.

        Parameters
        ----------
        token_ids : np.ndarray, torch.Tensor or iterable
            Either one document as a 1-D integer array / tensor ``[N]`` (any
            integer dtype), a 2-D integer array ``[D, L]`` (one document per
            row), a flat list of ints (one document), or an iterable (e.g. a
            generator) of 1-D integer arrays, one per document.  n-grams never
            cross a document boundary.  Empty documents are skipped.
        vocab_size : int
            ``V``; every id must be in ``[0, V)``.
        max_order : int, default 3
            Largest n-gram order, in ``2..4``; ``V ** max_order`` must be
            ``<= 2 ** 63``.
        min_count : int, default 1
            Drop n-grams (order >= 2) seen fewer times than this.
        tokenizer_fingerprint : str, optional
            Stored with the statistics and checked by :meth:`load`.
        progress : bool, default False
            Show a tqdm progress bar (in tokens).
        bucket_tokens : int, default 2**24
            Target number of n-gram start positions per counting bucket; the
            working memory is at most about ``50 * bucket_tokens`` bytes (0.8
            GiB at the default) on top of the corpus, ``1`` byte a token (``2``
            for multi-document input, plus a concatenated copy of the
            documents) and the result tables.  A single token more frequent
            than this gets a bucket of its own (larger than the target).

        Returns
        -------
        CooccurrenceStats

        Raises
        ------
        TypeError
            Non-integer token ids or an unsupported input type.
        ValueError
            Negative ids or ids ``>= vocab_size``, an empty corpus, ``max_order``
            outside ``2..4`` or too large for ``vocab_size``, ``min_count < 1``.
        """
        V = _check_int("vocab_size", vocab_size, lo=1)
        max_order = _check_max_order(max_order, V)
        min_count = _check_int("min_count", min_count, lo=1)
        bucket_tokens = _check_int("bucket_tokens", bucket_tokens, lo=1)
        t, lengths = _corpus_from_input(token_ids, V)
        if t.size == 0:
            raise ValueError("token_ids: expected a non-empty corpus, got 0 tokens")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(t.size), unit="tok", unit_scale=True, desc="cooccur")
        try:
            unigrams, tables, totals = _build_tables(
                t, lengths, V, max_order, min_count, bucket_tokens, bar
            )
        finally:
            if bar is not None:
                bar.close()
        return cls(V, max_order, unigrams, tables, totals, min_count, tokenizer_fingerprint)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """int: ``V``."""
        return self._V

    @property
    def max_order(self) -> int:
        """int: largest n-gram order stored (2..4)."""
        return self._max_order

    @property
    def num_tokens(self) -> int:
        """int: number of tokens counted (``T_1``)."""
        return self._totals[1]

    @property
    def totals(self) -> Dict[int, int]:
        """dict of int -> int: ``T_n``, n-gram positions of each order (denominators of ``p^``)."""
        return dict(self._totals)

    @property
    def num_ngrams(self) -> Dict[int, int]:
        """dict of int -> int: distinct n-grams stored per order (order 1: distinct tokens seen)."""
        out = {1: int(np.count_nonzero(self._unigrams))}
        for n, (k, _) in self._tables.items():
            out[n] = int(k.size)
        return out

    @property
    def nbytes(self) -> int:
        """int: bytes held by the host numpy tables (device caches not included)."""
        return int(self._unigrams.nbytes + sum(k.nbytes + c.nbytes for k, c in self._tables.values()))

    @property
    def min_count(self) -> int:
        """int: n-grams (order >= 2) with a count below this are not stored."""
        return self._min_count

    @property
    def tokenizer_fingerprint(self) -> str:
        """str: tokenizer fingerprint recorded at build time (``""`` if none)."""
        return self._fingerprint

    @property
    def unigram_counts(self) -> np.ndarray:
        """np.ndarray: ``int64 [V]`` unigram counts (read-only view)."""
        v = self._unigrams.view()
        v.flags.writeable = False
        return v

    def table(self, order: int) -> Tuple[np.ndarray, np.ndarray]:
        """Sorted packed keys and counts of one order (read-only views).

        Parameters
        ----------
        order : int
            In ``2..max_order``.

        Returns
        -------
        keys : np.ndarray
            ``int64 [K]``, sorted, unique, ``key = (x1 * V + x2) * V + ...``.
        counts : np.ndarray
            ``int64 [K]``.
        """
        order = _check_int("order", order, 2, self._max_order)
        k, c = (a.view() for a in self._tables[order])
        k.flags.writeable = False
        c.flags.writeable = False
        return k, c

    def __repr__(self) -> str:
        return (
            f"CooccurrenceStats(vocab_size={self._V}, max_order={self._max_order}, "
            f"num_tokens={self.num_tokens}, num_ngrams={self.num_ngrams}, "
            f"min_count={self._min_count}, nbytes={self.nbytes})"
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, CooccurrenceStats):
            return NotImplemented
        return (
            self._V == other._V
            and self._max_order == other._max_order
            and self._totals == other._totals
            and self._min_count == other._min_count
            and self._fingerprint == other._fingerprint
            and np.array_equal(self._unigrams, other._unigrams)
            and all(
                np.array_equal(self._tables[n][0], other._tables[n][0])
                and np.array_equal(self._tables[n][1], other._tables[n][1])
                for n in self._tables
            )
        )

    __hash__ = None  # mutable-ish container of arrays

    # ---------------------------------------------------------------- lookup
    def _device_tables(self, device: torch.device) -> dict:
        key = str(device)
        tabs = self._device_cache.get(key)
        if tabs is None:
            fdtype = torch.float32 if device.type == "mps" else torch.float64
            uni = torch.from_numpy(self._unigrams).to(device)
            p1 = uni.to(fdtype) / float(self._totals[1])
            tabs = {"uni": uni, "p1": p1, "logp1": torch.log(p1), "fdtype": fdtype}
            for n, (k, c) in self._tables.items():
                tabs[n] = (torch.from_numpy(k).to(device), torch.from_numpy(c).to(device))
            self._device_cache[key] = tabs
        return tabs

    def clear_device_cache(self) -> None:
        """Drop the per-device copies of the lookup tables."""
        self._device_cache.clear()

    def _prepare(self, ngrams, check: bool) -> torch.Tensor:
        if not isinstance(ngrams, torch.Tensor):
            ngrams = torch.as_tensor(np.asarray(ngrams))
        if ngrams.is_floating_point() or ngrams.is_complex() or ngrams.dtype == torch.bool:
            raise TypeError(f"ngrams: expected an integer tensor [..., n], got dtype {ngrams.dtype}")
        if ngrams.dim() < 1:
            raise ValueError("ngrams: expected a tensor shaped [..., n], got a 0-d tensor")
        n = ngrams.shape[-1]
        if not 1 <= n <= self._max_order:
            raise ValueError(
                f"ngrams: expected last dimension n in 1..{self._max_order} (max_order), "
                f"got n={n} (shape {tuple(ngrams.shape)})"
            )
        ngrams = ngrams.long()
        if check and ngrams.numel() > 0:
            lo, hi = torch.aminmax(ngrams)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self._V:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"ngrams: expected token ids in [0, {self._V}), found {bad}"
                )
        return ngrams

    def _lookup(self, ngrams: torch.Tensor, tabs: dict) -> torch.Tensor:
        """Counts ``int64 [...]`` of already validated ``ngrams [..., n]``."""
        n = ngrams.shape[-1]
        if n == 1:
            return tabs["uni"][ngrams[..., 0]]
        keys, counts = tabs[n]
        q = ngrams[..., 0]
        for i in range(1, n):
            q = q * self._V + ngrams[..., i]
        if keys.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.int64, device=q.device)
        flat = q.reshape(-1)
        idx = torch.searchsorted(keys, flat).clamp_(max=keys.numel() - 1)
        found = keys[idx] == flat
        out = torch.where(found, counts[idx], torch.zeros((), dtype=torch.int64, device=flat.device))
        return out.reshape(q.shape)

    def count(self, ngrams, check: bool = True) -> torch.Tensor:
        """Corpus counts of n-grams.

        Parameters
        ----------
        ngrams : torch.Tensor
            Integer tensor ``[..., n]`` with ``1 <= n <= max_order``, on CPU or
            CUDA (numpy arrays are accepted and give a CPU tensor).
        check : bool, default True
            Validate that ids are in ``[0, V)`` (one device sync on CUDA).
            With ``check=False`` out-of-range ids are the caller's bug: they
            may raise an indexing error or return wrong values.

        Returns
        -------
        torch.Tensor
            ``int64 [...]`` on the device of ``ngrams``; 0 for unseen (or pruned)
            n-grams.
        """
        ngrams = self._prepare(ngrams, check)
        return self._lookup(ngrams, self._device_tables(ngrams.device))

    def weight(self, ngrams, alpha_c: float = 1.0, check: bool = True) -> torch.Tensor:
        """DynaMo co-occurrence weights ``(p^(x1..xn) / prod_i p^(x_i)) ** alpha_c``.

        ``p^(x1..xn) = count_n / T_n`` and ``p^(x_i) = count_1(x_i) / T_1``;
        unseen (or pruned) n-grams get exactly 0.  ``alpha_c = 0`` gives 1 for
        seen and 0 for unseen n-grams; ``n = 1`` gives 1 for seen tokens.
        Computed in float64, returned as float32 (very large ``alpha_c`` may
        overflow to ``inf``).

        Parameters
        ----------
        ngrams : torch.Tensor
            Integer tensor ``[..., n]``, ``1 <= n <= max_order``, CPU or CUDA.
        alpha_c : float, default 1.0
            Exponent of the co-occurrence ratio.
        check : bool, default True
            Validate that ids are in ``[0, V)`` (see :meth:`count`).

        Returns
        -------
        torch.Tensor
            ``float32 [...]`` on the device of ``ngrams``.
        """
        alpha_c = float(alpha_c)
        if not np.isfinite(alpha_c):
            raise ValueError(f"alpha_c: expected a finite float, got {alpha_c}")
        ngrams = self._prepare(ngrams, check)
        tabs = self._device_tables(ngrams.device)
        n = ngrams.shape[-1]
        c = self._lookup(ngrams, tabs)
        seen = c > 0
        fd = tabs["fdtype"]
        if alpha_c == 0.0:
            w = seen.to(torch.float32)
        elif fd == torch.float64:
            # (c / T_n) / prod_i p1[x_i]; unseen n-grams may give 0/0 here, masked below
            w = c.to(fd) / float(self._totals[n])
            w /= tabs["p1"][ngrams].prod(dim=-1)
            if alpha_c != 1.0:
                w.pow_(alpha_c)
        else:  # devices without float64 (mps): log space in float32
            logw = torch.log(c.to(fd)) - float(np.log(self._totals[n]))
            logw -= tabs["logp1"][ngrams].sum(dim=-1)
            w = torch.exp(logw * alpha_c)
        w = torch.where(seen, w, torch.zeros((), dtype=w.dtype, device=w.device))
        return w.to(torch.float32)

    # ----------------------------------------------------------------- prune
    def prune(self, min_count: int) -> "CooccurrenceStats":
        """Drop n-grams (order >= 2) seen fewer than ``min_count`` times.

        Not in place: returns a new object; ``self`` is unchanged.  Unigram
        counts and the totals ``T_n`` are kept, so the weights of the kept
        n-grams are unchanged and pruned ones become 0.

        Parameters
        ----------
        min_count : int
            ``>= 1``.

        Returns
        -------
        CooccurrenceStats
            The pruned statistics; its ``last_prune_report`` is a dict with
            ``min_count``, ``bytes_before``, ``bytes_after``, ``ngrams_before``
            and ``ngrams_after`` (dicts order -> distinct n-grams).
        """
        min_count = _check_int("min_count", min_count, lo=1)
        tables = {}
        for n, (k, c) in self._tables.items():
            keep = c >= min_count
            tables[n] = (k[keep], c[keep])
        out = CooccurrenceStats(
            self._V,
            self._max_order,
            self._unigrams.copy(),
            tables,
            self._totals,
            max(min_count, self._min_count),
            self._fingerprint,
        )
        out.last_prune_report = {
            "min_count": min_count,
            "bytes_before": self.nbytes,
            "bytes_after": out.nbytes,
            "ngrams_before": self.num_ngrams,
            "ngrams_after": out.num_ngrams,
        }
        return out

    # ------------------------------------------------------------- save/load
    def save(self, path: Union[str, os.PathLike], compress: bool = False) -> None:
        """Write the statistics to ``path`` (``.npz``, written exactly at ``path``).

        Parameters
        ----------
        path : str or os.PathLike
            Destination file.
        compress : bool, default False
            Use ``np.savez_compressed`` (smaller, much slower for big tables).
        """
        arrays = {
            "format_version": np.int64(FORMAT_VERSION),
            "vocab_size": np.int64(self._V),
            "max_order": np.int64(self._max_order),
            "num_tokens": np.int64(self._totals[1]),
            "totals": np.array([self._totals[n] for n in range(1, self._max_order + 1)], dtype=np.int64),
            "min_count": np.int64(self._min_count),
            "tokenizer_fingerprint": np.array(self._fingerprint),
            "unigram_counts": self._unigrams,
        }
        for n, (k, c) in self._tables.items():
            arrays[f"keys_{n}"] = k
            arrays[f"counts_{n}"] = c
        saver = np.savez_compressed if compress else np.savez
        with open(path, "wb") as f:
            saver(f, **arrays)

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        vocab_size: Optional[int] = None,
        tokenizer_fingerprint: Optional[str] = None,
    ) -> "CooccurrenceStats":
        """Read statistics written by :meth:`save`.

        Only plain arrays are read (``allow_pickle=False``): a file holding
        pickled objects is refused, never unpickled.

        Parameters
        ----------
        path : str or os.PathLike
            ``.npz`` file.
        vocab_size : int, optional
            If given, refuse a file built for another vocabulary size.
        tokenizer_fingerprint : str, optional
            If given, refuse a file with another (or no) tokenizer fingerprint.

        Returns
        -------
        CooccurrenceStats

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist (other ``OSError`` when it cannot be read).
        ValueError
            Another format version, vocabulary size or fingerprint than
            expected, or a malformed file (not an ``.npz``, truncated, a
            ``.npy``, missing entries, wrong dtypes or shapes); the message
            names the file and says expected vs found.
        """
        # numpy leaks the file it opened when the zip directory is damaged: open it here
        with open(path, "rb") as f:
            try:
                z = np.load(f, allow_pickle=False)
            except (zipfile.BadZipFile, EOFError, ValueError) as e:
                # numpy reads bytes it does not recognise as a pickle and then suggests unsafe
                # loading: its message is never passed on.
                if isinstance(e, zipfile.BadZipFile):
                    found = f"a truncated or damaged zip archive ({e})"
                elif isinstance(e, EOFError):
                    found = "an empty file"
                elif "allow_pickle" in str(e):
                    found = "data that is not an .npz archive (pickled objects are never loaded)"
                else:
                    found = f"a damaged .npy array ({e})"
                raise ValueError(f"{path}: expected {_LOAD_EXPECTED}, found {found}") from None
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(
                    f"{path}: expected {_LOAD_EXPECTED}, found a single .npy array "
                    f"(shape {z.shape}, dtype {z.dtype})"
                )
            with z:
                return cls._from_npz(path, z, vocab_size, tokenizer_fingerprint)

    @classmethod
    def _from_npz(cls, path, z, vocab_size, tokenizer_fingerprint) -> "CooccurrenceStats":
        """The body of :meth:`load` once ``path`` is known to be an ``.npz`` archive."""
        files = set(z.files)

        def entry(name: str, kind: str, ndim: int) -> np.ndarray:
            """Entry ``name`` of ``ndim`` dims whose dtype kind is in ``kind`` ("iu" ints, "U" text)."""
            if name not in files:
                raise ValueError(
                    f"{path}: expected entry {name!r} in {_LOAD_EXPECTED}, not found "
                    f"(entries: {sorted(files)})"
                )
            try:
                a = z[name]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                # ValueError: an object array (numpy's message then suggests unsafe loading) or a damaged header
                pickled = isinstance(e, ValueError) and "allow_pickle" in str(e)
                found = "pickled objects" if pickled else f"a damaged array ({type(e).__name__})"
                raise ValueError(f"{path}: expected entry {name!r} to hold a plain array, found {found}") from None
            what = {"iu": "an integer", "U": "a string"}[kind]
            if a.dtype.kind not in kind or a.ndim != ndim:
                raise ValueError(
                    f"{path}: expected entry {name!r} to be {what} {'scalar' if ndim == 0 else f'{ndim}-D array'}, "
                    f"found dtype {a.dtype} with shape {a.shape}"
                )
            return a

        if "format_version" not in files:
            raise ValueError(
                f"{path}: expected a co-occurrence statistics file with format_version "
                f"{FORMAT_VERSION}, found no format_version entry (entries: {sorted(files)})"
            )
        version = int(entry("format_version", "iu", 0))
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: expected format version {FORMAT_VERSION}, found format version {version}"
            )
        V = int(entry("vocab_size", "iu", 0))
        if V < 1:
            raise ValueError(f"{path}: expected vocab_size >= 1, found {V}")
        if vocab_size is not None and int(vocab_size) != V:
            raise ValueError(f"{path}: expected vocab_size {int(vocab_size)}, found vocab_size {V}")
        fp = str(entry("tokenizer_fingerprint", "U", 0))
        if tokenizer_fingerprint is not None and str(tokenizer_fingerprint) != fp:
            raise ValueError(
                f"{path}: expected tokenizer fingerprint {tokenizer_fingerprint!r}, "
                f"found {fp!r}" + (" (file records no fingerprint)" if fp == "" else "")
            )
        max_order = int(entry("max_order", "iu", 0))
        if not _MIN_ORDER <= max_order <= _MAX_ORDER or V ** max_order > 2 ** 63:
            raise ValueError(
                f"{path}: expected max_order in {_MIN_ORDER}..{_MAX_ORDER} with vocab_size ** max_order "
                f"<= 2**63, found max_order {max_order} (vocab_size {V})"
            )
        totals_arr = entry("totals", "iu", 1)
        if totals_arr.shape != (max_order,) or (totals_arr < 0).any():
            raise ValueError(
                f"{path}: expected totals of shape ({max_order},), all >= 0, found {totals_arr.tolist()}"
            )
        totals = {n: int(totals_arr[n - 1]) for n in range(1, max_order + 1)}
        num_tokens = int(entry("num_tokens", "iu", 0))
        if num_tokens != totals[1]:
            raise ValueError(f"{path}: expected num_tokens == totals[1] = {totals[1]}, found {num_tokens}")
        min_count = int(entry("min_count", "iu", 0))
        unigrams = entry("unigram_counts", "iu", 1)
        if unigrams.shape != (V,) or (unigrams < 0).any():
            raise ValueError(
                f"{path}: expected unigram_counts of shape ({V},), all >= 0, found shape {unigrams.shape}, "
                f"min {unigrams.min() if unigrams.size else None}"
            )
        tables = {}
        for n in range(2, max_order + 1):
            keys, counts = entry(f"keys_{n}", "iu", 1), entry(f"counts_{n}", "iu", 1)
            if keys.shape != counts.shape:
                raise ValueError(
                    f"{path}: expected keys_{n} and counts_{n} of equal length, "
                    f"found shapes {keys.shape} and {counts.shape}"
                )
            # lookups binary-search the keys: they must be sorted, unique and in range
            keys = keys.astype(np.int64, copy=False)
            if keys.size and (
                (keys[1:] <= keys[:-1]).any() or keys[0] < 0 or int(keys[-1]) >= V ** n or (counts < 1).any()
            ):
                raise ValueError(
                    f"{path}: expected keys_{n} strictly increasing in [0, vocab_size**{n}) "
                    f"and counts_{n} >= 1, found otherwise"
                )
            tables[n] = (keys, counts)
        return cls(V, max_order, unigrams, tables, totals, min_count, fp)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register the ``cooccur`` subcommand on an ``argparse`` subparsers object.

    Sets ``func=run_cli`` as the parser default, so a dispatcher can call
    ``args.func(args)``.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser.
    """
    p = subparsers.add_parser(
        "cooccur",
        help="count corpus n-gram co-occurrence statistics for DynaMo weighting",
        description=(
            "Tokenise source files (each file is one document; directories are walked for *.py, "
            "skipping hidden directories) and write unigram/n-gram counts to an .npz file."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILES_OR_DIRS", help="files, or directories to walk for *.py")
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="Hugging Face tokenizers tokenizer.json")
    p.add_argument("--max-order", type=int, default=3, help="largest n-gram order, 2..4 (default 3)")
    p.add_argument("--min-count", type=int, default=1, help="drop n-grams seen fewer times (default 1)")
    p.add_argument("--out", default="stats.npz", help="output .npz path (default stats.npz)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size of the model (default: the tokenizer's; may be larger, e.g. padded)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)
    return p


def _collect_files(paths: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(Path(root) / f for f in sorted(files) if f.endswith(".py"))
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"expected an existing file or directory, got {raw!r}")
    return out


def run_cli(args: argparse.Namespace) -> int:
    """Run the ``cooccur`` subcommand; returns the process exit code (0 on success)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        print("cooccur: the 'tokenizers' package is required", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    try:
        files = _collect_files(args.files)
    except FileNotFoundError as e:
        print(f"cooccur: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"cooccur: no *.py files found under {list(args.files)}", file=sys.stderr)
        return 2
    tok_path = Path(args.tokenizer)
    if not tok_path.is_file():
        print(f"cooccur: tokenizer file not found: {str(tok_path)!r}", file=sys.stderr)
        return 2
    tok = Tokenizer.from_file(str(tok_path))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if getattr(args, "vocab_size", None) is not None:
        if args.vocab_size < vocab_size:
            print(
                f"cooccur: --vocab-size must be >= the tokenizer's vocabulary ({vocab_size}), "
                f"got {args.vocab_size}",
                file=sys.stderr,
            )
            return 2
        vocab_size = args.vocab_size
    fingerprint = tokenizer_fingerprint(tok_path)
    show = not getattr(args, "no_progress", False)

    def documents() -> Iterator[np.ndarray]:
        for f in tqdm(files, desc="cooccur", unit="file", disable=not show):
            text = f.read_text(encoding="utf-8", errors="replace")
            yield np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    t0 = time.perf_counter()
    try:
        stats = CooccurrenceStats.build(
            documents(),
            vocab_size=vocab_size,
            max_order=args.max_order,
            min_count=args.min_count,
            tokenizer_fingerprint=fingerprint,
        )
    except (TypeError, ValueError) as e:
        print(f"cooccur: {e}", file=sys.stderr)
        return 2
    stats.save(args.out)
    secs = time.perf_counter() - t0
    ng = stats.num_ngrams
    print(f"files:            {len(files)}")
    print(f"tokens:           {stats.num_tokens}")
    for n in range(1, stats.max_order + 1):
        print(f"distinct {n}-grams: {ng[n]}")
    print(f"bytes:            {stats.nbytes}")
    print(f"seconds:          {secs:.2f}")
    print(f"wrote:            {args.out}")
    return 0
