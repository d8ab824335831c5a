"""Corpus co-occurrence statistics for DynaMo multi-token sampling (used by ``policy`` and ``kernels``).

DynaMo (Tuli et al. 2024) re-weights the joint probability of the ``n`` tokens proposed by ``n``
prediction heads with how often those tokens occur together in the training corpus::

    J(x1..xn) *= ( p^(x1..xn) / prod_h p^(x_h) ) ** alpha_c

with ``p^(x1..xn) = count_n / T_n`` for contiguous n-grams, ``T_n = sum_doc max(0, len_doc - n + 1)``
(``T_1``: tokens); an n-gram never seen gets weight exactly 0. :class:`CooccurrenceStats` (a
:class:`~dynamo_sampling.weights.CooccurrenceTables`) counts them (``build``; :func:`split_stream` cuts
a flat stream at a separator id), stores them (``save`` / ``load``) and looks them up in batch on CPU or
CUDA (``count``, ``weight``; ``device_tables`` for the kernels). The CLI's ``cooccur`` builds a file.

Storage: unigrams as a dense ``int64 [V]``; n-grams (``n = 2..max_order``) as sorted unique packed keys
``((x1 * V + x2) * V + x3) ...`` (``int64 [K_n]``, signed for torch; ``V ** max_order <= 2 ** 63``) with
parallel ``int64 [K_n]`` counts: ``8 * V + 16 * sum_n K_n`` bytes (:attr:`CooccurrenceStats.nbytes`).

Counting (numpy only, no merge step): several documents are concatenated (one is used in place), with a
``uint8`` a token giving the distance to the document end so n-grams never cross a boundary. Start
positions are bucketed by ranges of the key's most significant digit ``x1`` (about ``bucket_tokens``
positions a bucket), so each bucket's sorted, run-length encoded keys are final and follow the previous
bucket's: working memory is bounded by the bucket size. Pruning (``min_count``) drops rare n-grams but
keeps ``T_n`` and the unigram counts, so the kept n-grams' frequencies do not move.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch

from .tokenizer import file_sha256

__all__ = ["FORMAT_VERSION", "CooccurrenceStats", "split_stream", "tokenizer_fingerprint"]

#: Version of the ``.npz`` layout written by :meth:`CooccurrenceStats.save`.
FORMAT_VERSION = 1
#: Default number of n-gram start positions counted per bucket in :meth:`CooccurrenceStats.build`.
DEFAULT_BUCKET_TOKENS = 1 << 24  # 16,777,216
_MIN_ORDER, _MAX_ORDER = 2, 4
#: What :meth:`CooccurrenceStats.load` accepts, for its error messages.
_LOAD_EXPECTED = "a co-occurrence statistics .npz written by CooccurrenceStats.save"
#: SHA-256 hex digest of a tokenizer file (64 lowercase hex characters), shared with the tokenizer and training.
tokenizer_fingerprint = file_sha256


def _check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _check_max_order(max_order, vocab_size: int) -> int:
    max_order = _check_int("max_order", max_order, _MIN_ORDER, _MAX_ORDER)
    if vocab_size ** max_order > 2 ** 63:
        raise ValueError(f"vocab_size ** max_order must be <= 2**63 so packed n-gram keys fit in int64; got vocab_size="
                         f"{vocab_size}, max_order={max_order} ({vocab_size}**{max_order} = {vocab_size ** max_order})")
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
    """Split a flat token stream (1-D integer array or tensor, e.g. documents joined by an end-of-text id)
    at ``separator`` (the id that ends or starts each document; dropped, so in no n-gram) for
    :meth:`CooccurrenceStats.build`: numpy views of ``tokens``, one per document, empty ones included
    (build skips them). A stream without a separator is one document."""
    tokens = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D array of token ids, got shape {tuple(tokens.shape)}")
    cuts = np.flatnonzero(tokens == separator)
    return [tokens[a + 1:b] for a, b in zip(np.r_[-1, cuts], np.r_[cuts, tokens.size])]


def _rle_into(s: np.ndarray, out_keys: np.ndarray, out_counts: np.ndarray, min_count: int) -> int:
    """Run-length encode sorted non-empty ``s`` into the heads of the output arrays, keeping the runs of
    at least ``min_count``; returns how many runs were written."""
    ends = np.flatnonzero(s[1:] != s[:-1])  # last index of every run but the final one
    K = int(ends.size) + 1
    np.take(s, ends, out=out_keys[: K - 1])
    out_keys[K - 1] = s[-1]
    if K == 1:
        out_counts[0] = s.size
    else:
        out_counts[0] = ends[0] + 1
        np.subtract(ends[1:], ends[:-1], out=out_counts[1 : K - 1])
        out_counts[K - 1] = s.size - 1 - ends[-1]
    if min_count > 1:  # keep the frequent runs, compacted in place
        run_k, run_c = out_keys[:K], out_counts[:K]
        frequent = run_c >= min_count
        K = int(frequent.sum())
        run_k[:K], run_c[:K] = run_k[frequent], run_c[frequent]
    return K


def _build_tables(t: np.ndarray, lengths: Optional[np.ndarray], V: int, max_order: int, min_count: int,
                  bucket_tokens: int, progress=None):
    """Count unigrams and n-grams of ``t`` (documents of ``lengths``, or one document) bucket by
    bucket of first tokens (see the module docstring): ``(unigrams, {n: (keys, counts)}, totals)``."""
    N, step, orders = int(t.size), 1 << 24, range(2, max_order + 1)
    unigrams = np.zeros(V, dtype=np.int64)
    for s in range(0, N, step):
        unigrams += np.bincount(t[s : s + step], minlength=V)
    doc_lengths = np.array([N]) if lengths is None else lengths
    totals = {n: int(np.maximum(doc_lengths - n + 1, 0).sum()) for n in range(1, max_order + 1)}
    rem = None  # for several documents: rem[i] = min(tokens left in i's document incl. i, max_order)
    if lengths is not None:
        rem = np.full(N, max_order, dtype=np.uint8)
        ends = np.cumsum(lengths)
        for k in range(max_order - 1, 0, -1):
            rem[ends[lengths >= k] - k] = k

    # bucket of each first token, from exclusive prefix sums of unigram counts
    raw = (np.cumsum(unigrams) - unigrams) // bucket_tokens
    lut = np.zeros(V, dtype=np.int64)
    lut[1:] = np.cumsum(raw[1:] != raw[:-1])
    nb = int(lut[-1]) + 1
    bid = None
    if nb > 1:
        lut = lut.astype(np.min_scalar_type(nb - 1))  # the smallest unsigned dtype for the bucket ids
        bid = np.empty(N, dtype=lut.dtype)
        for s in range(0, N, step):
            bid[s : s + step] = lut[t[s : s + step]]

    out_k = {n: np.empty(min(totals[n], V ** n), dtype=np.int64) for n in orders}  # room for every distinct n-gram
    out_c = {n: np.empty_like(out_k[n]) for n in orders}
    used = dict.fromkeys(orders, 0)
    for j in range(nb):
        # p: this bucket's start positions, an int64 array or (one document, one bucket) an int m for range(m)
        if bid is not None:
            p = np.flatnonzero(bid == j)
        else:
            p = N if rem is None else np.arange(N, dtype=np.int64)
        npos = p if isinstance(p, int) else int(p.size)
        key = None  # packed key of the previous order at positions p (unsorted)
        for n in orders:
            # keep the starts whose n-gram ends inside their document
            if isinstance(p, int):
                keep = slice(0, min(p, N - n + 1))
                p = size = keep.stop
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
            used[n] += _rle_into(s, out_k[n][used[n]:], out_c[n][used[n]:], min_count)
            del s
        del p, key
        if progress is not None:
            progress.update(npos)

    for n in orders:  # shrink in place (realloc; untouched pages of np.empty were never resident)
        out_k[n].resize((used[n],), refcheck=False)
        out_c[n].resize((used[n],), refcheck=False)
    return unigrams, {n: (out_k[n], out_c[n]) for n in orders}, totals


class CooccurrenceStats:
    """Unigram and contiguous n-gram counts of a tokenised corpus (a :class:`CooccurrenceTables`), made by
    :meth:`build` or :meth:`load` and read by :meth:`count` and :meth:`weight`. Immutable (:meth:`prune`
    returns a new object); the tables are copied to a torch device on first use and cached per device.

    Constructor parameters: ``vocab_size`` (``V``), ``max_order`` (``2..4``), ``unigram_counts`` (int64
    (V,)), ``tables`` (dict n -> (sorted unique packed keys, counts), both int64 (K_n,), for ``n = 2..
    max_order``), ``totals`` (dict n -> ``T_n``), ``min_count`` (n-grams of order >= 2 counted fewer times
    were dropped) and ``tokenizer_fingerprint`` (str or None; sha256 of the tokenizer file).
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
                raise ValueError(f"tables[{n}]: expected 1-D keys and counts of equal length, got {k.shape}, {c.shape}")
            self._tables[n] = (k, c)
        self._totals = {n: int(totals[n]) for n in range(1, self._max_order + 1)}
        self._min_count = int(min_count)
        self._fingerprint = "" if tokenizer_fingerprint is None else str(tokenizer_fingerprint)
        self._device_cache: Dict[str, dict] = {}
        self.last_prune_report: Optional[dict] = None

    @classmethod
    def build(cls, documents: Iterable, vocab_size: int, max_order: int = 3, min_count: int = 1,
              tokenizer_fingerprint: Optional[str] = None, progress: bool = False,
              bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> "CooccurrenceStats":
        """Count unigrams and contiguous n-grams of a corpus of documents.

        documents : iterable (list, generator) of 1-D integer arrays (numpy of any integer dtype, tensors,
            lists of ints), one per document; n-grams never cross a document boundary, empty documents are
            skipped. One stream is ``[tokens]``; documents joined by a separator id: :func:`split_stream`.
        vocab_size : int; ``V``, every id must be in ``[0, V)``.
        max_order : int, default 3; largest n-gram order, ``2..4``, with ``V ** max_order <= 2 ** 63``.
        min_count : int, default 1; drop n-grams (order >= 2) seen fewer times.
        tokenizer_fingerprint : str, optional; stored with the statistics, checked by :meth:`load`.
        progress : bool, default False; a tqdm progress bar (in tokens).
        bucket_tokens : int, default 2**24; n-gram start positions per counting bucket (a token more
            frequent than this gets a bucket of its own). Working memory is about ``50 * bucket_tokens``
            bytes on top of the corpus (one document is not copied; several are concatenated), ``1`` byte
            a token (``2`` for several documents) and the result.

        Raises TypeError for non-integer token ids or ``documents`` not an iterable; ValueError for a
        document not 1-D (one stream passed bare, not as ``[tokens]``), ids out of ``[0, vocab_size)``,
        an empty corpus, ``max_order`` outside ``2..4`` or too large for ``vocab_size``, ``min_count < 1``.
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

    vocab_size = property(lambda self: self._V, doc="int: ``V``; token ids are in ``[0, V)``.")
    max_order = property(lambda self: self._max_order, doc="int: the largest n-gram order stored (2..4).")
    num_tokens = property(lambda self: self._totals[1], doc="int: tokens counted (``T_1``).")
    totals = property(lambda self: dict(self._totals), doc="dict n -> int: ``T_n``, n-gram positions of each order.")
    min_count = property(lambda self: self._min_count, doc="int: n-grams (order >= 2) seen fewer times are not stored.")
    tokenizer_fingerprint = property(lambda self: self._fingerprint, doc='str: recorded fingerprint or ``""``.')
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
        return (f"CooccurrenceStats(vocab_size={self._V}, max_order={self._max_order}, num_tokens={self.num_tokens}, "
                f"num_ngrams={self.num_ngrams}, min_count={self._min_count}, nbytes={self.nbytes})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CooccurrenceStats):
            return NotImplemented
        return ((self._V, self._max_order, self._totals, self._min_count, self._fingerprint)
                == (other._V, other._max_order, other._totals, other._min_count, other._fingerprint)
                and np.array_equal(self._unigrams, other._unigrams)
                and all(np.array_equal(a, b) for n in self._tables for a, b in zip(self._tables[n], other._tables[n])))

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

    def _counts(self, ngrams, check: bool) -> Tuple[torch.Tensor, dict, torch.Tensor]:
        """``(ngrams as int64 (..., n), the device tables, their counts int64 (...))`` after validation."""
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
        tabs = self.device_tables(ngrams.device)
        if n == 1:
            return ngrams, tabs, tabs["uni"][ngrams[..., 0]]
        keys, counts = tabs["keys"][n], tabs["counts"][n]
        q = ngrams[..., 0]
        for i in range(1, n):
            q = q * self._V + ngrams[..., i]
        if keys.numel() == 0:
            return ngrams, tabs, torch.zeros(q.shape, dtype=torch.int64, device=q.device)
        flat = q.reshape(-1)
        idx = torch.searchsorted(keys, flat).clamp_(max=keys.numel() - 1)  # index_select: ~4x faster than [idx]
        out = torch.where(keys.index_select(0, idx) == flat, counts.index_select(0, idx), 0)
        return ngrams, tabs, out.reshape(q.shape)

    def count(self, ngrams, check: bool = True) -> torch.Tensor:
        """Corpus counts of ``ngrams``, an integer tensor (..., n), ``1 <= n <= max_order``, on CPU or CUDA
        (a numpy array gives a CPU tensor): int64 (...) on that device, 0 for unseen (or pruned) n-grams.
        ``check`` validates that ids are in ``[0, V)`` (one device sync on CUDA); with ``check=False``
        out-of-range ids are the caller's bug (an indexing error or wrong values)."""
        return self._counts(ngrams, check)[2]

    def weight(self, ngrams, alpha_c: float = 1.0, check: bool = True) -> torch.Tensor:
        """DynaMo co-occurrence weights ``(p^(x1..xn) / prod_i p^(x_i)) ** alpha_c`` of ``ngrams``: float32 (...)
        on the device of ``ngrams`` (``ngrams``, ``check``: as in :meth:`count`; ``alpha_c``: a finite float).
        ``p^(x1..xn) = count_n / T_n``, ``p^(x_i) = count_1(x_i) / T_1``; unseen (or pruned) n-grams get
        exactly 0. ``alpha_c = 0`` gives 1 for seen and 0 for unseen n-grams; ``n = 1`` gives 1 for seen
        tokens. Computed in float64 (a very large ``alpha_c`` may overflow to ``inf``)."""
        alpha_c = float(alpha_c)
        if not np.isfinite(alpha_c):
            raise ValueError(f"alpha_c: expected a finite float, got {alpha_c}")
        ngrams, tabs, c = self._counts(ngrams, check)
        seen = c > 0
        if alpha_c == 0.0:
            return seen.to(torch.float32)
        # (c / T_n) / prod_i p1[x_i]; unseen n-grams may give 0/0 here, masked below
        w = c.double() / float(self._totals[ngrams.shape[-1]])
        w /= tabs["p1"].index_select(0, ngrams.reshape(-1)).view(ngrams.shape).prod(dim=-1)
        if alpha_c != 1.0:
            w.pow_(alpha_c)
        return torch.where(seen, w, 0.0).to(torch.float32)

    def prune(self, min_count: int) -> "CooccurrenceStats":
        """A copy without the n-grams (order >= 2) seen fewer than ``min_count`` (``>= 1``) times: kept
        n-grams' weights do not move (unigram counts and totals are kept), pruned ones are 0. Its
        ``last_prune_report`` is a dict with ``min_count``, ``bytes_before``, ``bytes_after``,
        ``ngrams_before`` and ``ngrams_after`` (dicts order -> distinct n-grams); ``None`` on other objects."""
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
        arrays = {"format_version": np.int64(FORMAT_VERSION), "vocab_size": np.int64(self._V),
                  "max_order": np.int64(self._max_order), "num_tokens": np.int64(self._totals[1]),
                  "totals": np.array([self._totals[n] for n in range(1, self._max_order + 1)], dtype=np.int64),
                  "min_count": np.int64(self._min_count), "tokenizer_fingerprint": np.array(self._fingerprint),
                  "unigram_counts": self._unigrams}
        for n, (k, c) in self._tables.items():
            arrays[f"keys_{n}"], arrays[f"counts_{n}"] = k, c
        with open(path, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], vocab_size: Optional[int] = None,
             tokenizer_fingerprint: Optional[str] = None) -> "CooccurrenceStats":
        """Read statistics written by :meth:`save` from the ``.npz`` file ``path``, plain arrays only (pickled
        objects are refused, never unpickled); ``vocab_size`` and ``tokenizer_fingerprint``, if given,
        refuse a file of another vocabulary size or (no) fingerprint.

        Raises FileNotFoundError if ``path`` does not exist (another ``OSError`` if it cannot be read);
        ValueError, naming the file and saying what was expected and what was found, for another format
        version, vocabulary size or fingerprint than expected or a malformed file (not an ``.npz``,
        truncated, a ``.npy``, missing entries, wrong dtypes or shapes)."""
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

        def expect(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"{path}: expected {message}")

        def entry(name: str, kind: str = "iu", ndim: int = 0) -> np.ndarray:
            """Entry ``name`` of ``ndim`` dims whose dtype kind is in ``kind`` ("iu" ints, "U" text)."""
            expect(name in files, f"entry {name!r} in {_LOAD_EXPECTED}, not found (entries: {sorted(files)})")
            try:
                a = z[name]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                # ValueError: an object array (numpy then suggests unsafe loading) or a damaged header
                pickled = isinstance(e, ValueError) and "allow_pickle" in str(e)
                found = "pickled objects" if pickled else f"a damaged array ({type(e).__name__})"
                raise ValueError(f"{path}: expected entry {name!r} to hold a plain array, found {found}") from None
            what = {"iu": "an integer", "U": "a string"}[kind] + (" scalar" if ndim == 0 else f" {ndim}-D array")
            expect(a.dtype.kind in kind and a.ndim == ndim, f"entry {name!r} to be {what}, "
                                                            f"found dtype {a.dtype} with shape {a.shape}")
            return a

        version = int(entry("format_version"))
        expect(version == FORMAT_VERSION, f"format version {FORMAT_VERSION}, found format version {version}")
        V = int(entry("vocab_size"))
        expect(V >= 1, f"vocab_size >= 1, found {V}")
        expect(vocab_size is None or int(vocab_size) == V, f"vocab_size {vocab_size}, found vocab_size {V}")
        fp = str(entry("tokenizer_fingerprint", "U"))
        expect(tokenizer_fingerprint is None or str(tokenizer_fingerprint) == fp,
               f"tokenizer fingerprint {tokenizer_fingerprint!r}, found {fp!r}"
               + (" (file records no fingerprint)" if fp == "" else ""))
        max_order = int(entry("max_order"))
        expect(_MIN_ORDER <= max_order <= _MAX_ORDER and V ** max_order <= 2 ** 63,
               f"max_order in {_MIN_ORDER}..{_MAX_ORDER} with vocab_size ** max_order <= 2**63, "
               f"found max_order {max_order} (vocab_size {V})")
        totals_arr = entry("totals", ndim=1)
        expect(totals_arr.shape == (max_order,) and (totals_arr >= 0).all(),
               f"totals of shape ({max_order},), all >= 0, found {totals_arr.tolist()}")
        totals = {n: int(totals_arr[n - 1]) for n in range(1, max_order + 1)}
        num_tokens = int(entry("num_tokens"))
        expect(num_tokens == totals[1], f"num_tokens == totals[1] = {totals[1]}, found {num_tokens}")
        min_count = int(entry("min_count"))
        unigrams = entry("unigram_counts", ndim=1)
        lowest = unigrams.min() if unigrams.size else None
        expect(unigrams.shape == (V,) and (lowest is None or lowest >= 0),
               f"unigram_counts of shape ({V},), all >= 0, found shape {unigrams.shape}, min {lowest}")
        tables = {}
        for n in range(2, max_order + 1):
            keys, counts = entry(f"keys_{n}", ndim=1), entry(f"counts_{n}", ndim=1)
            expect(keys.shape == counts.shape,
                   f"keys_{n} and counts_{n} of equal length, found shapes {keys.shape} and {counts.shape}")
            keys = keys.astype(np.int64, copy=False)  # lookups binary-search them: sorted, unique, in range
            expect(keys.size == 0 or (keys[0] >= 0 and int(keys[-1]) < V ** n and (keys[1:] > keys[:-1]).all()
                                      and (counts >= 1).all()),
                   f"keys_{n} strictly increasing in [0, vocab_size**{n}) and counts_{n} >= 1, found otherwise")
            tables[n] = (keys, counts)
        return cls(V, max_order, unigrams, tables, totals, min_count, fp)


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v
