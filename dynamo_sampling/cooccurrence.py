"""Corpus co-occurrence statistics for DynaMo multi-token sampling (used by ``policy`` and ``kernels``).

DynaMo (Tuli et al. 2024) re-weights the joint probability of the ``n`` tokens proposed by ``n``
prediction heads with how often those tokens occur together in the training corpus::

    J(x1..xn) *= ( p^(x1..xn) / prod_h p^(x_h) ) ** alpha_c

where ``p^`` are corpus frequencies (count / total) of contiguous n-grams and unigrams. An n-gram
never seen in the corpus gets weight exactly 0.

:class:`CooccurrenceStats` counts them (:meth:`~CooccurrenceStats.build`, from documents; a flat
stream with a separator id goes through :func:`split_stream`), stores them (``save`` / ``load``) and
looks them up in batch on CPU or CUDA (``count``, ``weight``). It is what ``weights.py`` names a
:class:`~dynamo_sampling.weights.CooccurrenceTables`: the weights the step policy (``policy.py``)
needs and the device tables the CUDA kernels (``kernels.py``) read, from one cache per device. The
``cooccur`` CLI subcommand (``cli.py``) builds a statistics file from source files.

Storage: unigrams as a dense ``int64 [V]`` array; n-grams (``n = 2..max_order``) as a sorted array
of unique packed keys ``key = ((x1 * V + x2) * V + x3) ...`` (``int64 [K_n]``, signed so torch can
use them; ``V ** max_order <= 2 ** 63`` is required) with a parallel ``int64 [K_n]`` count array.
Memory is ``8 * V + 16 * sum_n K_n`` bytes (:attr:`CooccurrenceStats.nbytes`).

Counting (:meth:`CooccurrenceStats.build`, numpy only, no merge step): the documents are held as one
integer array (one document without a copy; several concatenated, with a ``uint8`` a token recording
the distance to the document end so n-grams never cross a boundary). The start positions are split
into buckets by ranges of the first token ``x1`` (about ``bucket_tokens`` positions each); since
``x1`` is the key's most significant digit, each bucket's sorted, run-length encoded keys are final
and the buckets follow each other in key order. Working memory is bounded by the bucket size.

Frequencies: ``p^(x1..xn) = count_n / T_n`` with ``T_n = sum_doc max(0, len_doc - n + 1)`` (``T_1``:
tokens). Pruning (``min_count``) drops rare n-grams but keeps ``T_n`` and the unigram counts, so the
kept n-grams' frequencies do not move.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch

from .tokenizer import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "CooccurrenceStats",
    "split_stream",
    "tokenizer_fingerprint",
]

#: Version of the ``.npz`` layout written by :meth:`CooccurrenceStats.save`.
FORMAT_VERSION = 1

#: Default number of n-gram start positions counted per bucket in :meth:`CooccurrenceStats.build`.
DEFAULT_BUCKET_TOKENS = 1 << 24  # 16,777,216

_MIN_ORDER, _MAX_ORDER = 2, 4

#: What :meth:`CooccurrenceStats.load` accepts, for its error messages.
_LOAD_EXPECTED = "a co-occurrence statistics .npz written by CooccurrenceStats.save"

#: SHA-256 hex digest of a tokenizer file (64 lowercase hex characters): the one file-fingerprint
#: helper, shared with the tokenizer module and training.
tokenizer_fingerprint = file_sha256


# ---------------------------------------------------------------- counting


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
        raise ValueError(f"vocab_size ** max_order must be <= 2**63 so packed n-gram keys fit in int64; got "
                         f"vocab_size={vocab_size}, max_order={max_order} ({vocab_size}**{max_order} = "
                         f"{vocab_size ** max_order})")
    return max_order


def _as_doc(x, index: int, vocab_size: int) -> np.ndarray:
    """Document ``index`` as a 1-D integer numpy array in ``[0, vocab_size)`` (no copy when possible)."""
    where = f"document {index}"
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{where}: expected an integer tensor, got dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        hint = " (build takes an iterable of documents: pass one stream as [tokens])" if x.ndim == 0 else ""
        raise ValueError(f"{where}: expected a 1-D array of token ids, got shape {tuple(x.shape)}{hint}")
    if x.size == 0:
        return x.astype(np.int64)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{where}: expected an integer dtype for token ids, got dtype {x.dtype}")
    lo, hi = x.min(), x.max()
    if lo < 0:
        raise ValueError(f"{where}: token ids must be >= 0, found {int(lo)} at position {int(np.argmin(x))}")
    if hi >= vocab_size:
        raise ValueError(f"{where}: token ids must be < vocab_size={vocab_size}, found {int(hi)} "
                         f"at position {int(np.argmax(x))}")
    return x.astype(np.int64) if x.dtype == np.uint64 else x  # uint64 does not mix with int64 arithmetic


def _corpus(documents: Iterable, vocab_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(tokens (N,), document lengths (D,) or None for one document)``; one document is not copied."""
    if isinstance(documents, (str, bytes)) or not hasattr(documents, "__iter__"):
        raise TypeError(f"documents: expected an iterable of 1-D integer arrays, got {type(documents).__name__}")
    docs: List[np.ndarray] = [a for i, d in enumerate(documents) if (a := _as_doc(d, i, vocab_size)).size]
    if len(docs) <= 1:
        return (docs[0] if docs else np.zeros(0, dtype=np.int64)), None
    cdtype = np.int32 if vocab_size <= np.iinfo(np.int32).max else np.int64
    lengths = np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
    return np.concatenate(docs, dtype=cdtype, casting="unsafe"), lengths  # ids checked to fit above


def split_stream(tokens, separator: int) -> List[np.ndarray]:
    """Split a flat token stream into documents at ``separator`` (dropped) for :meth:`CooccurrenceStats.build`.

    Parameters
    ----------
    tokens : 1-D integer array or tensor, shape (N,); e.g. a training file of documents joined by an
        end-of-text id.
    separator : int; the id that ends (or starts) each document. It is not part of any n-gram.

    Returns
    -------
    list of np.ndarray views of ``tokens``, one per document (empty ones included; build skips them).
    A stream without a separator is one document.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D array of token ids, got shape {tuple(tokens.shape)}")
    cuts = np.flatnonzero(tokens == separator)
    return [tokens[a + 1:b] for a, b in zip(np.r_[-1, cuts], np.r_[cuts, tokens.size])]


def _rle_into(s: np.ndarray, out_keys: np.ndarray, out_counts: np.ndarray) -> int:
    """Run-length encode sorted non-empty ``s`` into the heads of the output arrays; returns the runs K."""
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


def _build_tables(t: np.ndarray, lengths: Optional[np.ndarray], V: int, max_order: int, min_count: int,
                  bucket_tokens: int, progress=None):
    """Count unigrams and n-grams of ``t`` (documents of ``lengths``, or one document) bucket by
    bucket of first tokens (see the module docstring): ``(unigrams, {n: (keys, counts)}, totals)``."""
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
            K = _rle_into(s, out_k[n][u:], out_c[n][u:])
            if min_count > 1:  # keep the frequent runs, compacted in place
                run_k, run_c = out_k[n][u : u + K], out_c[n][u : u + K]
                keep = run_c >= min_count
                K = int(keep.sum())
                run_k[:K], run_c[:K] = run_k[keep], run_c[keep]
            used[n] = u + K
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


# ---------------------------------------------------------------- the statistics


class CooccurrenceStats:
    """Unigram and contiguous n-gram counts of a tokenised corpus (a :class:`CooccurrenceTables`).

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, look up with :meth:`count`
    and :meth:`weight`. Immutable once built (:meth:`prune` returns a new object); the tables are
    copied to a torch device on first use and cached per device (:meth:`device_tables`).

    Parameters
    ----------
    vocab_size : int; ``V``, token ids are in ``[0, V)``.
    max_order : int; largest n-gram order stored, in ``2..4``.
    unigram_counts : np.ndarray, int64 (V,).
    tables : dict n -> (keys, counts), for ``n = 2..max_order``: sorted unique packed keys and their
        counts, both int64 (K_n,).
    totals : dict n -> int; ``T_n``, the number of n-gram positions of order ``n`` (``T_1``: tokens).
    min_count : int; n-grams (order >= 2) with a count below this were dropped.
    tokenizer_fingerprint : str or None; identifier of the tokenizer (sha256 of its file).

    Most users call :meth:`build` or :meth:`load` instead of the constructor.
    """

    def __init__(self, vocab_size: int, max_order: int, unigram_counts: np.ndarray,
                 tables: Dict[int, Tuple[np.ndarray, np.ndarray]], totals: Dict[int, int], min_count: int = 1,
                 tokenizer_fingerprint: Optional[str] = None) -> None:
        self._V = _check_int("vocab_size", vocab_size, lo=1)
        self._max_order = _check_max_order(max_order, self._V)
        self._unigrams = np.ascontiguousarray(unigram_counts, dtype=np.int64)
        if self._unigrams.shape != (self._V,):
            raise ValueError(f"unigram_counts: expected shape ({self._V},), got {self._unigrams.shape}")
        self._tables: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        for n in range(2, self._max_order + 1):
            if n not in tables:
                raise ValueError(f"tables: missing order {n} (max_order={self._max_order})")
            k, c = (np.ascontiguousarray(a, dtype=np.int64) for a in tables[n])
            if k.ndim != 1 or k.shape != c.shape:
                raise ValueError(f"tables[{n}]: expected 1-D keys and counts of equal length, "
                                 f"got shapes {k.shape} and {c.shape}")
            self._tables[n] = (k, c)
        self._totals = {n: int(totals[n]) for n in range(1, self._max_order + 1)}
        self._min_count = int(min_count)
        self._fingerprint = "" if tokenizer_fingerprint is None else str(tokenizer_fingerprint)
        self._device_cache: Dict[str, dict] = {}
        #: Set on objects returned by :meth:`prune` (``None`` otherwise).
        self.last_prune_report: Optional[dict] = None

    @classmethod
    def build(cls, documents: Iterable, vocab_size: int, max_order: int = 3, min_count: int = 1,
              tokenizer_fingerprint: Optional[str] = None, progress: bool = False,
              bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> "CooccurrenceStats":
        """Count unigrams and contiguous n-grams of a corpus of documents.

        Parameters
        ----------
        documents : iterable of 1-D integer arrays (numpy arrays of any integer dtype, tensors or
            lists of ints), one per document, e.g. a list or a generator. n-grams never cross a
            document boundary; empty documents are skipped. One stream is ``[tokens]``; a stream of
            documents joined by a separator id is ``split_stream(tokens, separator)``.
        vocab_size : int; ``V``, every id must be in ``[0, V)``.
        max_order : int, default 3; largest n-gram order, ``2..4``, with ``V ** max_order <= 2 ** 63``.
        min_count : int, default 1; drop n-grams (order >= 2) seen fewer times.
        tokenizer_fingerprint : str, optional; stored with the statistics, checked by :meth:`load`.
        progress : bool, default False; a tqdm progress bar (in tokens).
        bucket_tokens : int, default 2**24; n-gram start positions per counting bucket: working memory
            is about ``50 * bucket_tokens`` bytes on top of the corpus (one document is not copied;
            several are concatenated), ``1`` byte a token (``2`` for several documents) and the
            result. A token more frequent than this gets a bucket of its own.

        Raises
        ------
        TypeError : non-integer token ids, or ``documents`` not an iterable.
        ValueError : a document not 1-D (one stream passed bare, not as ``[tokens]``), ids out of
            ``[0, vocab_size)``, an empty corpus, ``max_order`` outside ``2..4`` or too large for
            ``vocab_size``, ``min_count < 1``.
        """
        V = _check_int("vocab_size", vocab_size, lo=1)
        max_order = _check_max_order(max_order, V)
        min_count = _check_int("min_count", min_count, lo=1)
        bucket_tokens = _check_int("bucket_tokens", bucket_tokens, lo=1)
        t, lengths = _corpus(documents, V)
        if t.size == 0:
            raise ValueError("documents: expected a non-empty corpus, got 0 tokens")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(t.size), unit="tok", unit_scale=True, desc="cooccur")
        try:
            unigrams, tables, totals = _build_tables(t, lengths, V, max_order, min_count, bucket_tokens, bar)
        finally:
            if bar is not None:
                bar.close()
        return cls(V, max_order, unigrams, tables, totals, min_count, tokenizer_fingerprint)

    # ---------------------------------------------------------------- properties
    vocab_size = property(lambda self: self._V, doc="int: ``V``; token ids are in ``[0, V)``.")
    max_order = property(lambda self: self._max_order, doc="int: the largest n-gram order stored (2..4).")
    num_tokens = property(lambda self: self._totals[1], doc="int: tokens counted (``T_1``).")
    totals = property(lambda self: dict(self._totals),
                      doc="dict n -> int: ``T_n``, n-gram positions of each order (denominators of ``p^``).")
    min_count = property(lambda self: self._min_count, doc="int: n-grams (order >= 2) seen fewer times are not stored.")
    tokenizer_fingerprint = property(lambda self: self._fingerprint,
                                     doc='str: the tokenizer fingerprint recorded at build time (``""`` if none).')
    unigram_counts = property(lambda self: _read_only(self._unigrams), doc="np.ndarray: int64 (V,), read-only.")

    @property
    def num_ngrams(self) -> Dict[int, int]:
        """dict n -> int: distinct n-grams stored per order (order 1: distinct tokens seen)."""
        return {1: int(np.count_nonzero(self._unigrams)), **{n: int(k.size) for n, (k, _) in self._tables.items()}}

    @property
    def nbytes(self) -> int:
        """int: bytes held by the host tables (device caches not included)."""
        return int(self._unigrams.nbytes + sum(k.nbytes + c.nbytes for k, c in self._tables.values()))

    def table(self, order: int) -> Tuple[np.ndarray, np.ndarray]:
        """Read-only views of one order's sorted unique packed keys ``(x1 * V + x2) * V + ...`` and
        their counts, both int64 (K,); ``order`` in ``2..max_order``."""
        order = _check_int("order", order, 2, self._max_order)
        return tuple(_read_only(a) for a in self._tables[order])

    def __repr__(self) -> str:
        return (f"CooccurrenceStats(vocab_size={self._V}, max_order={self._max_order}, "
                f"num_tokens={self.num_tokens}, num_ngrams={self.num_ngrams}, "
                f"min_count={self._min_count}, nbytes={self.nbytes})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CooccurrenceStats):
            return NotImplemented
        return ((self._V, self._max_order, self._totals, self._min_count, self._fingerprint)
                == (other._V, other._max_order, other._totals, other._min_count, other._fingerprint)
                and np.array_equal(self._unigrams, other._unigrams)
                and all(np.array_equal(a, b) for n in self._tables
                        for a, b in zip(self._tables[n], other._tables[n])))

    __hash__ = None  # a container of arrays

    # ---------------------------------------------------------------- lookup
    def device_tables(self, device: torch.device) -> dict:
        """The tables on ``device``, built on first use and cached (the one device copy, shared with
        the CUDA kernels): ``{"uni": int64 (V,), "p1": float64 (V,) unigram frequencies,
        "keys": {n: int64 (K_n,)}, "counts": {n: int64 (K_n,)}}``."""
        device = torch.device(device)
        tabs = self._device_cache.get(str(device))
        if tabs is None:
            uni = torch.from_numpy(self._unigrams).to(device)
            tabs = {"uni": uni, "p1": uni.double() / float(self._totals[1]),
                    "keys": {n: torch.from_numpy(k).to(device) for n, (k, _) in self._tables.items()},
                    "counts": {n: torch.from_numpy(c).to(device) for n, (_, c) in self._tables.items()}}
            self._device_cache[str(device)] = tabs
        return tabs

    def clear_device_cache(self) -> None:
        """Drop the per-device copies of the tables."""
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
            raise ValueError(f"ngrams: expected last dimension n in 1..{self._max_order} (max_order), "
                             f"got n={n} (shape {tuple(ngrams.shape)})")
        ngrams = ngrams.long()
        if check and ngrams.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(ngrams))
            if lo < 0 or hi >= self._V:
                raise ValueError(f"ngrams: expected token ids in [0, {self._V}), found {lo if lo < 0 else hi}")
        return ngrams

    def _lookup(self, ngrams: torch.Tensor, tabs: dict) -> torch.Tensor:
        """Counts int64 (...) of validated ``ngrams`` (..., n)."""
        n = ngrams.shape[-1]
        if n == 1:
            return tabs["uni"][ngrams[..., 0]]
        keys, counts = tabs["keys"][n], tabs["counts"][n]
        q = ngrams[..., 0]
        for i in range(1, n):
            q = q * self._V + ngrams[..., i]
        if keys.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.int64, device=q.device)
        flat = q.reshape(-1)
        idx = torch.searchsorted(keys, flat).clamp_(max=keys.numel() - 1)
        out = torch.where(keys[idx] == flat, counts[idx], torch.zeros((), dtype=torch.int64, device=flat.device))
        return out.reshape(q.shape)

    def count(self, ngrams, check: bool = True) -> torch.Tensor:
        """Corpus counts of n-grams.

        Parameters
        ----------
        ngrams : integer tensor (..., n), ``1 <= n <= max_order``, CPU or CUDA (a numpy array gives a
            CPU tensor).
        check : bool, default True; validate that ids are in ``[0, V)`` (one device sync on CUDA).
            With ``check=False`` out-of-range ids are the caller's bug (an indexing error or wrong values).

        Returns
        -------
        int64 tensor (...) on the device of ``ngrams``; 0 for unseen (or pruned) n-grams.
        """
        ngrams = self._prepare(ngrams, check)
        return self._lookup(ngrams, self.device_tables(ngrams.device))

    def weight(self, ngrams, alpha_c: float = 1.0, check: bool = True) -> torch.Tensor:
        """DynaMo co-occurrence weights ``(p^(x1..xn) / prod_i p^(x_i)) ** alpha_c``.

        ``p^(x1..xn) = count_n / T_n``, ``p^(x_i) = count_1(x_i) / T_1``; unseen (or pruned) n-grams
        get exactly 0. ``alpha_c = 0`` gives 1 for seen and 0 for unseen n-grams; ``n = 1`` gives 1
        for seen tokens. Computed in float64 (a CPU or CUDA device), returned as float32 (a very
        large ``alpha_c`` may overflow to ``inf``).

        Parameters
        ----------
        ngrams : integer tensor (..., n), ``1 <= n <= max_order``.
        alpha_c : float, default 1.0; the exponent of the co-occurrence ratio.
        check : bool, default True; validate that ids are in ``[0, V)`` (see :meth:`count`).

        Returns
        -------
        float32 tensor (...) on the device of ``ngrams``.
        """
        alpha_c = float(alpha_c)
        if not np.isfinite(alpha_c):
            raise ValueError(f"alpha_c: expected a finite float, got {alpha_c}")
        ngrams = self._prepare(ngrams, check)
        tabs = self.device_tables(ngrams.device)
        c = self._lookup(ngrams, tabs)
        seen = c > 0
        if alpha_c == 0.0:
            return seen.to(torch.float32)
        # (c / T_n) / prod_i p1[x_i]; unseen n-grams may give 0/0 here, masked below
        w = c.double() / float(self._totals[ngrams.shape[-1]])
        w /= tabs["p1"][ngrams].prod(dim=-1)
        if alpha_c != 1.0:
            w.pow_(alpha_c)
        return torch.where(seen, w, torch.zeros((), dtype=w.dtype, device=w.device)).to(torch.float32)

    # ---------------------------------------------------------------- prune, save, load
    def prune(self, min_count: int) -> "CooccurrenceStats":
        """Drop n-grams (order >= 2) seen fewer than ``min_count`` (``>= 1``) times.

        Returns a new object (``self`` is unchanged) whose weights of the kept n-grams are unchanged
        (unigram counts and totals are kept) and pruned ones are 0. Its ``last_prune_report`` is a
        dict with ``min_count``, ``bytes_before``, ``bytes_after``, ``ngrams_before`` and
        ``ngrams_after`` (dicts order -> distinct n-grams).
        """
        min_count = _check_int("min_count", min_count, lo=1)
        tables = {n: (k[c >= min_count], c[c >= min_count]) for n, (k, c) in self._tables.items()}
        out = CooccurrenceStats(self._V, self._max_order, self._unigrams.copy(), tables, self._totals,
                                max(min_count, self._min_count), self._fingerprint)
        out.last_prune_report = {"min_count": min_count, "bytes_before": self.nbytes, "bytes_after": out.nbytes,
                                 "ngrams_before": self.num_ngrams, "ngrams_after": out.num_ngrams}
        return out

    def save(self, path: Union[str, os.PathLike], compress: bool = False) -> None:
        """Write the statistics to ``path`` (an ``.npz``, written exactly at ``path``);
        ``compress``: ``np.savez_compressed`` (smaller, much slower for big tables)."""
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
            arrays[f"keys_{n}"], arrays[f"counts_{n}"] = k, c
        with open(path, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], vocab_size: Optional[int] = None,
             tokenizer_fingerprint: Optional[str] = None) -> "CooccurrenceStats":
        """Read statistics written by :meth:`save`; only plain arrays are read (a file holding
        pickled objects is refused, never unpickled).

        Parameters
        ----------
        path : str or os.PathLike; the ``.npz`` file.
        vocab_size : int, optional; refuse a file built for another vocabulary size.
        tokenizer_fingerprint : str, optional; refuse a file with another (or no) fingerprint.

        Raises
        ------
        FileNotFoundError : ``path`` does not exist (another ``OSError`` when it cannot be read).
        ValueError : another format version, vocabulary size or fingerprint than expected, or a
            malformed file (not an ``.npz``, truncated, a ``.npy``, missing entries, wrong dtypes or
            shapes); the message names the file and says expected vs found.
        """
        # numpy leaks the file it opened when the zip directory is damaged: open it here
        with open(path, "rb") as f:
            try:
                z = np.load(f, allow_pickle=False)
            except (zipfile.BadZipFile, EOFError, ValueError) as e:
                # numpy suggests unsafe loading for bytes it does not recognise: its message is never passed on
                found = (f"a truncated or damaged zip archive ({e})" if isinstance(e, zipfile.BadZipFile)
                         else "an empty file" if isinstance(e, EOFError)
                         else "data that is not an .npz archive (pickled objects are never loaded)"
                         if "allow_pickle" in str(e) else f"a damaged .npy array ({e})")
                raise ValueError(f"{path}: expected {_LOAD_EXPECTED}, found {found}") from None
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(f"{path}: expected {_LOAD_EXPECTED}, found a single .npy array "
                                 f"(shape {z.shape}, dtype {z.dtype})")
            with z:
                return cls._from_npz(path, z, vocab_size, tokenizer_fingerprint)

    @classmethod
    def _from_npz(cls, path, z, vocab_size, tokenizer_fingerprint) -> "CooccurrenceStats":
        """The body of :meth:`load` once ``path`` is known to be an ``.npz`` archive."""
        files = set(z.files)

        def fail(message: str):
            raise ValueError(f"{path}: expected {message}")

        def entry(name: str, kind: str, ndim: int) -> np.ndarray:
            """Entry ``name`` of ``ndim`` dims whose dtype kind is in ``kind`` ("iu" ints, "U" text)."""
            if name not in files:
                fail(f"entry {name!r} in {_LOAD_EXPECTED}, not found (entries: {sorted(files)})")
            try:
                a = z[name]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                # ValueError: an object array (numpy then suggests unsafe loading) or a damaged header
                pickled = isinstance(e, ValueError) and "allow_pickle" in str(e)
                found = "pickled objects" if pickled else f"a damaged array ({type(e).__name__})"
                raise ValueError(f"{path}: expected entry {name!r} to hold a plain array, found {found}") from None
            if a.dtype.kind not in kind or a.ndim != ndim:
                what = {"iu": "an integer", "U": "a string"}[kind]
                fail(f"entry {name!r} to be {what} {'scalar' if ndim == 0 else f'{ndim}-D array'}, "
                     f"found dtype {a.dtype} with shape {a.shape}")
            return a

        if "format_version" not in files:
            fail(f"a co-occurrence statistics file with format_version {FORMAT_VERSION}, "
                 f"found no format_version entry (entries: {sorted(files)})")
        version = int(entry("format_version", "iu", 0))
        if version != FORMAT_VERSION:
            fail(f"format version {FORMAT_VERSION}, found format version {version}")
        V = int(entry("vocab_size", "iu", 0))
        if V < 1:
            fail(f"vocab_size >= 1, found {V}")
        if vocab_size is not None and int(vocab_size) != V:
            fail(f"vocab_size {int(vocab_size)}, found vocab_size {V}")
        fp = str(entry("tokenizer_fingerprint", "U", 0))
        if tokenizer_fingerprint is not None and str(tokenizer_fingerprint) != fp:
            fail(f"tokenizer fingerprint {tokenizer_fingerprint!r}, found {fp!r}"
                 + (" (file records no fingerprint)" if fp == "" else ""))
        max_order = int(entry("max_order", "iu", 0))
        if not _MIN_ORDER <= max_order <= _MAX_ORDER or V ** max_order > 2 ** 63:
            fail(f"max_order in {_MIN_ORDER}..{_MAX_ORDER} with vocab_size ** max_order <= 2**63, "
                 f"found max_order {max_order} (vocab_size {V})")
        totals_arr = entry("totals", "iu", 1)
        if totals_arr.shape != (max_order,) or (totals_arr < 0).any():
            fail(f"totals of shape ({max_order},), all >= 0, found {totals_arr.tolist()}")
        totals = {n: int(totals_arr[n - 1]) for n in range(1, max_order + 1)}
        num_tokens = int(entry("num_tokens", "iu", 0))
        if num_tokens != totals[1]:
            fail(f"num_tokens == totals[1] = {totals[1]}, found {num_tokens}")
        min_count = int(entry("min_count", "iu", 0))
        unigrams = entry("unigram_counts", "iu", 1)
        if unigrams.shape != (V,) or (unigrams < 0).any():
            fail(f"unigram_counts of shape ({V},), all >= 0, found shape {unigrams.shape}, "
                 f"min {unigrams.min() if unigrams.size else None}")
        tables = {}
        for n in range(2, max_order + 1):
            keys, counts = entry(f"keys_{n}", "iu", 1), entry(f"counts_{n}", "iu", 1)
            if keys.shape != counts.shape:
                fail(f"keys_{n} and counts_{n} of equal length, found shapes {keys.shape} and {counts.shape}")
            # lookups binary-search the keys: they must be sorted, unique and in range
            keys = keys.astype(np.int64, copy=False)
            if keys.size and ((keys[1:] <= keys[:-1]).any() or keys[0] < 0 or int(keys[-1]) >= V ** n
                              or (counts < 1).any()):
                fail(f"keys_{n} strictly increasing in [0, vocab_size**{n}) and counts_{n} >= 1, found otherwise")
            tables[n] = (keys, counts)
        return cls(V, max_order, unigrams, tables, totals, min_count, fp)


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v
