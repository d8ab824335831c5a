"""The DynaMo step policy in plain torch (used by ``decoding``; the CPU path and the CUDA reference).

From the head logits at a row's last position, ``(B, H, V)``, decide how many tokens the row
emits this step and which ones. The algorithm (Tuli et al. 2024; the choices where the paper is
ambiguous are marked *choice* and listed in README.md, "Design choices where the paper is
ambiguous") per row:

1. temperature (sampling only), then per head the top-``k`` tokens and their probabilities
   under the full softmax;
2. for order ``n = H .. 2``, over the cells ``(i1..in)`` of the heads' top-k lists:

   * ``J = prod_h p_h(x_h)``, the heads' independent joint probability;
   * static threshold (*choice:* one order-dependent threshold ``tau_n = eps_b ** (n-1)``,
     applied to the heads' joint *probability* before co-occurrence weighting, which makes
     the paper's two rules, zero the cells below ``eps_b`` and back off when every cell is below
     ``eps_b ** (n-1)``, one rule): cells with ``J <= tau_n`` are dropped. ``eps_b = 1``
     therefore always backs off to one token and ``eps_b = 0`` keeps every cell;
   * co-occurrence weighting ``J *= w(x1..xn)``, ``w = (p^(x1..xn) / prod p^(x_h)) ** alpha_c``;
     an n-gram the statistics never saw has ``w = 0`` and is dropped. (*Choice:* no
     renormalisation of the weighted ``J``: everything after this point — Otsu, argmax, a draw
     proportional to ``J`` — is invariant to a per-row scale.)
   * adaptive threshold: ``J`` is optionally blurred with a 3-tap Gaussian along every top-k
     axis (sorted by probability; dropped cells count as 0), the Otsu threshold of the blurred
     values of the remaining cells is computed, and cells whose blurred value is below it are
     dropped (the cell with the largest blurred value always remains);
   * repetition penalty: a cell is divided by ``penalty`` once for each of its tokens that
     already occurs in the row;
   * back-off: if no cell remains, try ``n - 1``; otherwise emit the n-gram: the argmax of ``J``
     when greedy (lowest cell index on ties), a draw proportional to ``J`` when sampling.
3. ``n = 1``: head 1 alone, with the ordinary temperature / top-k sampler (:func:`head_probs`).

Two implementations of step 2 produce the same *candidates* (row, cell, J) sorted by (row, cell):
:func:`sparse_candidates` (the fast path) grows n-grams head by head, keeping only prefixes whose
probability already exceeds ``tau_n`` (the remaining factors are <= 1) and whose adjacent pairs the
statistics have seen (by lookup, or by a join over the sorted n-gram tables where that reads
fewer entries), so at most ``1 / tau_n`` cells per row are ever touched;
:func:`dense_candidates` (the reference) builds the whole ``k**n`` grid. Everything after the
candidates is shared, so the two give identical tokens; the tests compare them. Speculative's
cost-sized draft (first token fixed, ``eps_b = 0``, no adaptive threshold) skips the candidate
list: :func:`_draft_from_grid` scores the ``k**(n-1)`` cells after the first token as one grid per
row, with the same tokens, lengths and draft conditionals (compared in the tests).

On a CPU, everything after the top-k lists (the orders H..2 above, with statistics, blur, Otsu,
penalty, choice and draft conditionals) runs as one C call by default (:mod:`.cpu_policy`,
``csrc/dynamo_policy_cpu.c``; ``DynamoConfig.impl``): the same cells in the same order with the same
float32 arithmetic, so greedy decisions match this module's (the tests compare them row by row);
sampled draws come from the C code's own counter-based noise. The code here is the reference and the
path on other devices.

Speculative decoding passes ``first_tokens``: the first token is already fixed (drawn exactly
from head 1), candidates are restricted to cells that start with it, and the policy returns the
conditional draft distributions ``q(x_j | x_1..x_{j-1})`` that rejection sampling needs.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_policy
from .samplers import draw, head_probs
from .samplers import exp1 as _exp1
from .weights import CooccurrenceWeights, check_stats


@dataclass
class DynamoConfig:
    """Every constant of the DynaMo step. Defaults follow the paper unless noted."""

    k: int = 50  # top-k per head for the joint (paper: 50)
    alpha_c: float = 1.0  # co-occurrence exponent; 0 turns the statistics off entirely (no mask)
    eps_b: float = 0.1  # static threshold base, tau_n = eps_b ** (n-1); 0 -> always H tokens, 1 -> always 1
    adaptive_threshold: bool = True  # Otsu threshold on J after the static one
    blur: bool = True  # 3-tap Gaussian blur of J before Otsu
    blur_sigma: float = 1.0  # taps are exp(-1/(2 sigma^2)), 1, exp(-1/(2 sigma^2)), normalised
    otsu_bins: int = 256
    repetition_penalty: float = 1.1  # divides J once per token of the cell already in the row
    # "sparse" (fast path), "dense" (the k**n reference) or "auto": sparse unless nothing prunes
    # (tau_n = 0 and no statistics), where the plain grid is ~3x cheaper. Same tokens either way.
    candidates: str = "auto"
    # "auto": on a CPU, everything after the top-k lists in one C call (cpu_policy.py) where the C
    # compiler built it and candidates is "auto"; else torch. "torch": always torch (the reference).
    # "c": the C path (an error where it is unavailable). Greedy tokens agree; sampled draws differ.
    impl: str = "auto"

    def validate(self):
        """Check every field's type and range (``TypeError`` / ``ValueError`` naming it); numpy
        integers and floats become Python ones, bools are refused where numbers are expected."""
        import numbers

        import numpy as np
        for name in ("k", "otsu_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
            setattr(self, name, int(value))
        for name in ("alpha_c", "eps_b", "blur_sigma", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            setattr(self, name, float(value))
        for name in ("adaptive_threshold", "blur"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
            setattr(self, name, bool(value))
        if not isinstance(self.candidates, str):
            raise TypeError(f"candidates must be a str ('auto', 'sparse' or 'dense'), got "
                            f"{type(self.candidates).__name__} ({self.candidates!r})")
        if not 0.0 <= self.eps_b <= 1.0:
            raise ValueError(f"eps_b must be in [0, 1], got {self.eps_b}")
        if self.k < 1:
            raise ValueError(f"k (top-k per head for the joint) must be >= 1, got {self.k}")
        if self.alpha_c < 0:
            raise ValueError(f"alpha_c must be >= 0, got {self.alpha_c}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
        if self.otsu_bins < 2:
            raise ValueError(f"otsu_bins must be >= 2, got {self.otsu_bins}")
        if self.candidates not in ("auto", "sparse", "dense"):
            raise ValueError(f"candidates must be 'auto', 'sparse' or 'dense', got {self.candidates!r}")
        if not isinstance(self.impl, str) or self.impl not in ("auto", "torch", "c"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'c', got {self.impl!r}")


@dataclass
class StepOutput:
    """What one policy call decided.

    tokens : LongTensor (B, H); the emitted n-gram left-aligned, -1 after ``n``.
    n : LongTensor (B,); tokens emitted per row, 1..H.
    topk_ids : LongTensor (B, H, k); each head's top-k tokens (sorted by probability).
    draft_probs : FloatTensor (B, H, k) or None; row ``j`` is ``q(x_j | x_1..x_{j-1})`` over
        ``topk_ids[:, j]`` for ``1 <= j < n`` (speculative only; zero elsewhere).
    """

    tokens: torch.Tensor
    n: torch.Tensor
    topk_ids: torch.Tensor
    draft_probs: Optional[torch.Tensor] = None


# ---------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """The cells of one order that passed the static threshold and the co-occurrence mask,
    sorted by (row, cell). rows (M,) int64; idx (M, n) top-k indices; J (M,) float32."""

    rows: torch.Tensor
    idx: torch.Tensor
    J: torch.Tensor

    def keys(self, k: int) -> torch.Tensor:
        """(M,) int64 ``row * k**n + flat cell``: sorted, unique."""
        n = self.idx.shape[1]
        return self.rows * k ** n + (self.idx * _powers(k, n, self.idx.device)).sum(-1)

    def select(self, keep: torch.Tensor) -> "Candidates":
        """The candidates where the bool mask ``keep`` (M,) holds (order kept)."""
        at = keep.nonzero().squeeze(1)
        return Candidates(self.rows.index_select(0, at), self.idx.index_select(0, at), self.J.index_select(0, at))


# On a CPU, ``x.index_select(0, i)`` is ~4x faster than ``x[i]`` (benchmarks/bench_cpu_ops.py): the
# helpers below gather through it, with several tensor indices folded into one flat one.
def _at(x: torch.Tensor, rows: torch.Tensor, head, cols: torch.Tensor) -> torch.Tensor:
    """``x[rows, head, cols]`` of a contiguous (B, H, k) tensor; the indices broadcast together."""
    B, H, k = x.shape
    flat = (rows * H + head) * k + cols
    return x.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)


def _ngrams(ids: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token ids of candidate cells: ids (B, H, k) top-k ids -> (M, n) int64 for heads start..start+n-1."""
    B, H, k = ids.shape
    n = idx.shape[1]
    heads = torch.arange(start * k, (start + n) * k, k, device=idx.device)  # (n,) offsets of the heads
    return ids.reshape(-1).index_select(0, ((rows * (H * k))[:, None] + heads + idx).reshape(-1)).view(-1, n)


def sparse_candidates(p, ids, n, tau, stats, alpha_c, first_idx, active, join=None) -> Candidates:
    """Fast path: grow prefixes head by head, keeping ``prefix probability > tau`` (later factors
    are <= 1, so no surviving cell is lost) and, with statistics, only prefixes that were seen.
    p, ids (B, H, k); first_idx (B,) or None; active (B,) bool.

    With statistics, each extension by one head is either a *lookup* (every prefix x every top-k
    token of the next head, then the adjacent pair looked up) or, where the statistics expose their
    sorted tables (:class:`~dynamo_sampling.weights.CooccurrenceTables`), a *join* (:func:`_join_seen`:
    the table's continuations of each prefix, kept where the next token is in that head's top-k).
    ``join=None`` joins where more than ``_JOIN_MIN`` cells pass the threshold and the table ranges
    hold fewer entries than that; both give the same cells, since every prefix of a seen n-gram was
    seen too."""
    B, H, k = p.shape
    keep = (p[:, 0] > tau) & active[:, None]
    if first_idx is not None:
        keep &= torch.arange(k, device=p.device) == first_idx[:, None]
    flat = keep.reshape(-1).nonzero().squeeze(1)
    rows, idx, val = flat // k, (flat % k)[:, None], p[:, 0].reshape(-1).index_select(0, flat)
    joinable = join is not False and stats is not None and hasattr(stats, "device_tables")  # a CooccurrenceTables
    for h in range(1, n):
        ext = val[:, None] * p[:, h].index_select(0, rows)  # (M, k)
        flat = (ext > tau).reshape(-1).nonzero().squeeze(1)
        if joinable and (join or (join is None and flat.numel() > _JOIN_MIN)):
            joined = _join_seen(stats.device_tables(p.device), stats.vocab_size, ids, p, rows, idx, val, tau,
                                None if join else flat.numel())
            if joined is not None:
                rows, idx, val = joined
                continue
        m = flat // k
        rows, idx = rows.index_select(0, m), torch.cat([idx.index_select(0, m), (flat % k)[:, None]], 1)
        val = ext.reshape(-1).index_select(0, flat)
        # prune prefixes whose last pair was never seen (the n-gram lookup checks the last one) where
        # that saves more than the lookup costs: below _JOIN_MIN cells, one lookup at the end is cheaper
        if stats is not None and h < n - 1 and rows.numel() * k > _JOIN_MIN:
            seen = Candidates(rows, idx, val).select(
                stats.weight(_ngrams(ids, rows, idx[:, h - 1:h + 1], start=h - 1), alpha_c) > 0)
            rows, idx, val = seen.rows, seen.idx, seen.J
    cand = Candidates(rows, idx, val.float())
    return _weigh(cand, ids, stats, alpha_c)


_JOIN_MIN = 4096  # below this many cells to look up, a lookup costs less than finding the ranges


def _join_seen(tables, V, ids, p, rows, idx, val, tau, limit):
    """Extend prefixes (rows (M,), idx (M, h), probabilities val (M,)) by head ``h`` through the
    statistics' sorted ``(h+1)``-gram table: every seen continuation of each prefix is read (one
    contiguous key range per prefix), kept where its last token is in head ``h``'s top-k and the
    product exceeds ``tau``. Returns (rows, idx, val) sorted by (row, cell), or None where the
    ranges hold ``limit`` entries or more (the cells a lookup would test; None: no limit)."""
    M, h = idx.shape
    B, H, k = ids.shape
    if M == 0 or B * V > 1 << 24:  # the rank map below would be large: look up instead
        return None
    keys = tables["keys"][h + 1]
    ngram = _ngrams(ids, rows, idx)
    base = ngram[:, 0]
    for i in range(1, h):
        base = base * V + ngram[:, i]
    base = base * V
    lo, hi = torch.searchsorted(keys, base), torch.searchsorted(keys, base + V)
    lengths = hi - lo
    total = int(lengths.sum())
    if limit is not None and total >= limit:
        return None
    dev = keys.device
    m = torch.repeat_interleave(torch.arange(M, device=dev), lengths, output_size=total)
    entry = torch.arange(total, device=dev) + (lo - (lengths.cumsum(0) - lengths)).index_select(0, m)
    rm = rows.index_select(0, m)
    slot = keys.index_select(0, entry) - base.index_select(0, m) + rm * V  # row * V + the continuation token
    # rank of each continuation in head h's top-k (-1: not in it), from a (B, V) map
    rank = torch.full((B * V,), -1, dtype=torch.long, device=dev)
    rank.scatter_(0, (torch.arange(B, device=dev)[:, None] * V + ids[:, h]).reshape(-1),
                  torch.arange(k, device=dev).repeat(B))
    j = rank.index_select(0, slot)
    ext = val.index_select(0, m) * _at(p, rm, h, j.clamp(min=0))
    ok = ((j >= 0) & (ext > tau)).nonzero().squeeze(1)
    m, j, ext = m.index_select(0, ok), j.index_select(0, ok), ext.index_select(0, ok)
    order = torch.sort(m * k + j).indices  # continuations come by token id; cells go by rank
    m, j, ext = m.index_select(0, order), j.index_select(0, order), ext.index_select(0, order)
    return rows.index_select(0, m), torch.cat([idx.index_select(0, m), j[:, None]], 1), ext


def dense_candidates(p, ids, n, tau, stats, alpha_c, first_idx, active) -> Candidates:
    """Reference: the whole ``k**n`` grid of every row, then the same threshold and weights."""
    B, H, k = p.shape
    J = p[:, 0]
    for h in range(1, n):
        J = (J[:, :, None] * p[:, h, None, :]).reshape(B, -1)  # (B, k**(h+1)), row-major cells
    keep = (J > tau) & active[:, None]
    if first_idx is not None:
        keep &= (torch.arange(k ** n, device=p.device) // k ** (n - 1)) == first_idx[:, None]
    rows, cells = keep.nonzero(as_tuple=True)
    idx = torch.stack([(cells // k ** (n - 1 - h)) % k for h in range(n)], dim=-1)
    return _weigh(Candidates(rows, idx, J[rows, cells]), ids, stats, alpha_c)


def _weigh(cand: Candidates, ids, stats, alpha_c) -> Candidates:
    if stats is None or cand.rows.numel() == 0:
        return cand
    w = stats.weight(_ngrams(ids, cand.rows, cand.idx), alpha_c).float()
    cand = Candidates(cand.rows, cand.idx, cand.J * w)
    return cand.select(w > 0)


# ---------------------------------------------------------------- thresholds on candidates


def blur_candidates(cand: Candidates, k: int, sigma: float, method: str = "auto") -> torch.Tensor:
    """3-tap Gaussian along every top-k axis, zero outside the candidates: the separable blur of
    the dense grid, evaluated at the candidate cells. Returns (M,) float32.

    ``method``: "grid" scatters the candidates into the dense grid and blurs it (cheap when most
    cells are candidates), "lookup" sums the ``3**n`` neighbours found by binary search (cheap
    when few are), "auto" picks by count: a probe of the lookup (a binary search and gathers) costs
    ~16 grid cells on a CPU (measured with k = 50, n = 3). Both give the same values up to float rounding."""
    side = math.exp(-1.0 / (2 * sigma * sigma))
    taps = {-1: side / (1 + 2 * side), 0: 1.0 / (1 + 2 * side), 1: side / (1 + 2 * side)}
    n = cand.idx.shape[1]
    keys = cand.keys(k)  # sorted
    rows_present = torch.unique(cand.rows)
    if method == "grid" or (method == "auto" and cand.J.numel() * 3 ** n * 16 > rows_present.numel() * k ** n):
        slot = torch.searchsorted(rows_present, cand.rows)
        grid = torch.zeros(rows_present.numel() * k ** n, dtype=cand.J.dtype, device=cand.J.device)
        local = keys - cand.rows * k ** n
        grid[slot * k ** n + local] = cand.J
        x = grid.view(-1, *([k] * n))
        for axis in range(1, n + 1):
            pad = [0, 0] * (n - axis) + [1, 1]
            xp = torch.nn.functional.pad(x, pad)
            x = taps[0] * x + taps[-1] * (xp.narrow(axis, 0, k) + xp.narrow(axis, 2, k))
        return x.reshape(-1)[slot * k ** n + local]
    # all 3**n neighbours at once: (M, 3**n, n) indices, one binary search over the sorted keys
    offsets, tap = _neighbours(n, sigma, cand.idx.device)
    nb = cand.idx[:, None, :] + offsets[None]  # (M, 3**n, n)
    clamped = nb.clamp(0, k - 1)
    inside = (nb == clamped).all(-1)
    nb_key = (cand.rows * k ** n)[:, None] + (clamped * _powers(k, n, nb.device)).sum(-1)  # (M, 3**n)
    pos = torch.searchsorted(keys, nb_key.reshape(-1)).clamp_(max=keys.numel() - 1)
    hit = inside & (keys.index_select(0, pos).view_as(nb_key) == nb_key)
    return (torch.where(hit, cand.J.index_select(0, pos).view_as(nb_key), 0.0) * tap).sum(-1)


@functools.lru_cache(maxsize=32)
def _powers(k: int, n: int, device: torch.device) -> torch.Tensor:
    """(n,) int64 ``k**(n-1) .. k**0``: a cell's top-k indices -> its row-major flat index (cached)."""
    return torch.tensor([k ** (n - 1 - h) for h in range(n)], device=device)


@functools.lru_cache(maxsize=32)
def _neighbours(n: int, sigma: float, device: torch.device):
    """The 3**n offsets (3**n, n) int64 and their blur weights (3**n,) float32 (cached)."""
    side = math.exp(-1.0 / (2 * sigma * sigma))
    taps = {-1: side / (1 + 2 * side), 0: 1.0 / (1 + 2 * side), 1: side / (1 + 2 * side)}
    offsets = list(itertools.product((-1, 0, 1), repeat=n))
    return (torch.tensor(offsets, device=device),
            torch.tensor([math.prod(taps[o] for o in off) for off in offsets], dtype=torch.float32, device=device))


def otsu_threshold(values: torch.Tensor, rows: torch.Tensor, n_rows: int, bins: int) -> torch.Tensor:
    """Per-row Otsu threshold of ragged ``values`` (M,) grouped by ``rows`` (M,) -> (n_rows,) float32.

    Histogram with ``bins`` equal bins between the row's smallest and largest value; the
    threshold is the lower edge of the first bin of the upper class that maximises the
    between-class variance. Rows with fewer than two distinct values get their minimum
    (everything remains).
    """
    lo = values.new_full((n_rows,), float("inf")).scatter_reduce_(0, rows, values, "amin")
    hi = values.new_full((n_rows,), float("-inf")).scatter_reduce_(0, rows, values, "amax")
    width = (hi - lo).clamp_(min=1e-30)
    b = ((values - lo.index_select(0, rows)) / width.index_select(0, rows) * bins).long().clamp_(0, bins - 1)
    hist = torch.bincount(rows * bins + b, minlength=n_rows * bins).view(n_rows, bins).double()
    w0 = hist.cumsum(-1)  # weight of classes [0..t]
    m0 = (hist * _bin_centers(bins, values.device)).cumsum(-1)
    w1 = w0[:, -1:] - w0
    gap = m0 / w0.clamp(min=1e-30) - (m0[:, -1:] - m0) / w1.clamp(min=1e-30)
    between = torch.where((w0 > 0) & (w1 > 0), w0 * w1 * gap ** 2, -1.0)
    best, t = between.max(-1)  # t: last bin of the lower class (the first maximum)
    thr = lo + (t + 1).to(values.dtype) * width / bins
    return torch.where((best <= 0) | ~(hi > lo), lo, thr).float()


@functools.lru_cache(maxsize=8)
def _bin_centers(bins: int, device: torch.device) -> torch.Tensor:
    return torch.arange(bins, device=device, dtype=torch.float64) + 0.5


def _segment_argmax(score: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Position (into M) of the first maximum of ``score`` within each row; -1 for empty rows."""
    M = score.numel()
    best = score.new_full((n_rows,), float("-inf")).scatter_reduce_(0, rows, score, "amax")
    pos = torch.where(score == best.index_select(0, rows), torch.arange(M, device=score.device), M)
    first = torch.full((n_rows,), M, device=score.device, dtype=torch.long).scatter_reduce_(0, rows, pos, "amin")
    return torch.where(first < M, first, -1)


# ---------------------------------------------------------------- the step


def _check_step_args(head_logits, cfg, stats, do_sample, temperature, top_k, seen_tokens, first_tokens, max_tokens):
    """The boundary of :func:`dynamo_step`: shapes and types without a host sync, then one sync for
    the values (+inf logits, first tokens out of range). Returns ``head_logits`` with NaN as -inf."""
    if not isinstance(head_logits, torch.Tensor) or not head_logits.dtype.is_floating_point:
        got = f"dtype {head_logits.dtype}" if isinstance(head_logits, torch.Tensor) else type(head_logits).__name__
        raise TypeError(f"head_logits must be a floating-point tensor of shape (B, H, V), got {got}")
    if head_logits.dim() != 3 or 0 in head_logits.shape:
        raise ValueError(f"head_logits must have shape (B, H, V) with B, H, V >= 1, got {tuple(head_logits.shape)}")
    B, H, V = head_logits.shape
    if not isinstance(cfg, DynamoConfig):
        raise TypeError(f"cfg must be a DynamoConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.alpha_c > 0:
        check_stats(stats, V, H)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__} ({do_sample!r})")
    if do_sample and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                      or not 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0 when do_sample=True, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    for name, t, shape, kind in (("seen_tokens", seen_tokens, (B, V), "bool"),
                                 ("first_tokens", first_tokens, (B,), "int"),
                                 ("max_tokens", max_tokens, (B,), "int")):
        if t is None:
            continue
        ok_dtype = isinstance(t, torch.Tensor) and (
            t.dtype == torch.bool if kind == "bool" else not (t.dtype.is_floating_point or t.dtype.is_complex
                                                              or t.dtype == torch.bool))
        if not ok_dtype:
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a {kind} tensor of shape {shape} or None, got {got}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (head_logits is {(B, H, V)}), got {tuple(t.shape)}")
    top = head_logits.amax(-1)  # (B, H): NaN where a NaN is, +inf where a +inf is
    flags = [(top == math.inf).any(), torch.isnan(top).any()]
    if first_tokens is not None:
        flags.append(((first_tokens < 0) | (first_tokens >= V)).any())
    bad = torch.stack(flags).tolist()  # the one host sync
    if bad[0]:
        r, h = (top == math.inf).nonzero()[0].tolist()
        raise ValueError(f"head_logits must be finite or -inf (a zero-probability token), got +inf at row {r}, "
                         f"head {h}")
    if len(bad) > 2 and bad[2]:
        out = first_tokens[(first_tokens < 0) | (first_tokens >= V)]
        raise ValueError(f"first_tokens must be in [0, {V}), got {out[0].item()}")
    if bad[1]:  # as the CUDA kernels read them: a NaN logit is a zero-probability token
        return head_logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return head_logits


def dynamo_step(head_logits: torch.Tensor, cfg: DynamoConfig, *, stats: Optional[CooccurrenceWeights] = None,
                do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None, seen_tokens: Optional[torch.Tensor] = None,
                first_tokens: Optional[torch.Tensor] = None, max_tokens: Optional[torch.Tensor] = None,
                validate: bool = True) -> StepOutput:
    """One DynaMo step for a batch (see the module docstring).

    Parameters
    ----------
    head_logits : float tensor, shape (B, H, V); logits of heads 1..H at each row's last position.
    cfg : DynamoConfig.
    stats : a :class:`~dynamo_sampling.weights.CooccurrenceWeights` or None (weight 1
        everywhere): ``stats.weight(ngrams (M, n) int64, alpha_c) -> (M,)``, exact zeros for unseen n-grams.
    do_sample, temperature, top_k : the sampler; ``temperature`` also scales the joint when
        sampling (greedy uses the raw softmax). ``top_k`` is head 1's sampler at ``n = 1``.
    generator : torch.Generator for every random draw.
    seen_tokens : bool tensor (B, V) or None; tokens already in each row (repetition penalty).
    first_tokens : LongTensor (B,) or None; speculative mode (first token fixed, see module doc).
    max_tokens : LongTensor (B,) or None; cap on the n-gram length per row (e.g. tokens left).
    validate : check the arguments (one host sync for the values). The decoding loop passes False:
        ``sample()`` checked its inputs once, and the loop refuses NaN logits itself.

    Returns
    -------
    StepOutput

    Raises
    ------
    TypeError / ValueError : an argument of the wrong type, shape or range (the message names it),
        or +inf in ``head_logits``. NaN logits count as -inf (zero probability), as in the CUDA
        kernels; a head whose logits are all -inf contributes no n-gram, and where it is head 1
        the row emits token 0.
    """
    if validate:
        head_logits = _check_step_args(head_logits, cfg, stats, do_sample, temperature, top_k, seen_tokens,
                                       first_tokens, max_tokens)
    B, H, V = head_logits.shape
    k = min(cfg.k, V)
    dev = head_logits.device
    logits = head_logits.float()
    if do_sample:
        logits = logits / temperature
    top_logp, topk_ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)  # (B, H, k)
    p = top_logp.exp()
    use_stats = stats if stats is not None and cfg.alpha_c > 0 else None
    penal = None
    if seen_tokens is not None and cfg.repetition_penalty != 1.0:
        seen = seen_tokens.gather(1, topk_ids.view(B, -1)).view(B, H, k)
        penal = torch.where(seen, 1.0 / cfg.repetition_penalty, 1.0)  # (B, H, k)
    first_idx = None
    undecided = torch.ones(B, dtype=torch.bool, device=dev)
    if first_tokens is not None:
        match = topk_ids[:, 0, :] == first_tokens[:, None]  # (B, k)
        first_idx = match.float().argmax(-1)
        undecided &= match.any(-1)  # first token outside head 1's top-k: no draft
    dense = cfg.candidates == "dense" or (cfg.candidates == "auto" and cfg.eps_b == 0 and use_stats is None)
    find = dense_candidates if dense else sparse_candidates
    # speculative's cost-sized draft (first token fixed, every cell kept, no Otsu): one small grid per row
    grid = (first_tokens is not None and cfg.candidates == "auto" and cfg.eps_b == 0
            and not cfg.adaptive_threshold)

    tokens = torch.full((B, H), -1, dtype=torch.long, device=dev)
    n_out = torch.ones(B, dtype=torch.long, device=dev)
    draft = torch.zeros(B, H, k, dtype=torch.float32, device=dev) if first_tokens is not None else None
    orders = range(H, 1, -1)
    if _c_path(cfg, dev, use_stats, H):  # the orders H..2 in one C call instead of the loop below
        cpu_policy.run(p, topk_ids, penal, first_idx, undecided, max_tokens, cfg, use_stats, do_sample, generator,
                       tokens, n_out, draft)
        orders = ()
    for n in orders:
        active = undecided if max_tokens is None else undecided & (max_tokens >= n)
        if grid:
            _draft_from_grid(p, topk_ids, n, use_stats, cfg.alpha_c, first_idx, active, penal, do_sample, generator,
                             tokens, n_out, draft)
            undecided &= n_out < n
            if not bool(undecided.any()):
                break
            continue
        tau = cfg.eps_b ** (n - 1)
        if not _may_pass(p, n, tau, active):
            continue
        cand = find(p, topk_ids, n, tau, use_stats, cfg.alpha_c, first_idx, active)
        if cand.rows.numel() == 0:
            continue
        if cfg.adaptive_threshold:
            score = blur_candidates(cand, k, cfg.blur_sigma) if cfg.blur else cand.J
            thr = otsu_threshold(score, cand.rows, B, cfg.otsu_bins)
            cand = cand.select(score >= thr[cand.rows])
        J = cand.J
        if penal is not None:
            factors = _at(penal, cand.rows[:, None], torch.arange(n, device=dev), cand.idx)  # (M, n)
            for h in range(n):
                J = J * factors[:, h]
        score = J.double() / _exp1(J.shape, generator, dev) if do_sample else J
        pos = _segment_argmax(score, cand.rows, B)  # (B,)
        emit = pos >= 0
        rows = emit.nonzero(as_tuple=True)[0]
        chosen = pos[rows]
        tokens[rows, :n] = _ngrams(topk_ids, rows, cand.idx[chosen])
        n_out[rows] = n
        undecided &= ~emit
        if draft is not None:
            _fill_draft(draft, Candidates(cand.rows, cand.idx, J), rows, cand.idx[chosen], k)
        if not bool(undecided.any()):
            break
    single = ~(n_out > 1)
    if first_tokens is not None:
        first = first_tokens
    elif do_sample and (dev.type != "cpu" or bool(single.any())):  # on a CPU, skip it when no row needs it
        first = draw(head_probs(head_logits[:, 0], True, temperature, top_k), generator)
    elif do_sample:
        first = tokens[:, 0]
    else:
        first = head_logits[:, 0].argmax(-1)
    tokens[:, 0] = torch.where(single, first, tokens[:, 0])
    return StepOutput(tokens, n_out, topk_ids, draft)


def _c_path(cfg: DynamoConfig, dev: torch.device, stats, H: int) -> bool:
    """Whether this step runs its orders H..2 in C (``DynamoConfig.impl``)."""
    if cfg.impl == "torch" or H < 2:
        return False
    if cfg.impl == "c":
        if dev.type != "cpu" or not cpu_policy.supports(stats) or H > 16:
            raise ValueError(f"impl='c' needs CPU tensors, at most 16 heads and statistics with tables (or none); "
                             f"got device {dev}, H={H}, statistics {type(stats).__name__}")
        if not cpu_policy.available():
            raise RuntimeError(f"impl='c': the C policy is unavailable: {cpu_policy.build_error()}")
        return True
    return (dev.type == "cpu" and cfg.candidates == "auto" and H <= 16 and cpu_policy.supports(stats)
            and cpu_policy.available())


def _may_pass(p, n: int, tau: float, active) -> bool:
    """Whether any active row's top cell of order ``n`` passes the static threshold: no cell can when
    the product of the heads' top probabilities does not (multiplied in the candidates' order, so
    float rounding keeps it an upper bound). One host sync, so only on a CPU, where syncs are free and
    skipping saves the candidate search; elsewhere the search runs and finds nothing."""
    if tau <= 0 or p.device.type != "cpu":
        return True
    bound = p[:, 0, 0]
    for h in range(1, n):
        bound = bound * p[:, h, 0]
    return bool(((bound > tau) & active).any())


def _draft_from_grid(p, ids, n, stats, alpha_c, first_idx, active, penal, do_sample, generator, tokens, n_out, draft):
    """The speculative draft of order ``n`` on the (B, k**(n-1)) grid of cells that start with each
    row's fixed first token: what the candidate path computes with ``eps_b = 0`` and no adaptive
    threshold (the same J, weights, penalty and the same greedy choice, the lowest cell on ties; a
    sampled draw proportional to J, from other noise), in a fixed number of ops instead of gathers
    over a ragged candidate list. Writes ``tokens``, ``n_out`` and ``draft`` of the rows that emit."""
    B, H, k = p.shape
    C = k ** (n - 1)
    digits = _grid_digits(k, n, p.device).t()[None].expand(B, n - 1, C)  # top-k index of heads 2..n per cell
    J = p[:, 0].gather(1, first_idx[:, None])  # (B, 1)
    for h in range(1, n):
        J = (J[:, :, None] * p[:, h, None, :]).reshape(B, -1)  # row-major cells, as the candidate path
    first_tok = ids[:, 0].gather(1, first_idx[:, None])  # (B, 1)
    tok = torch.cat([first_tok[:, :, None].expand(B, C, 1), ids[:, 1:n].gather(2, digits).transpose(1, 2)], dim=2)
    ok = (J > 0) & active[:, None]
    if stats is not None:
        w = stats.weight(tok.reshape(B * C, n), alpha_c).float().view(B, C)
        J = J * w
        ok &= w > 0
    if penal is not None:  # one factor per head, in the candidate path's order
        factors = penal[:, 1:n].gather(2, digits)  # (B, n-1, C)
        J = J * penal[:, 0].gather(1, first_idx[:, None])
        for h in range(n - 1):
            J = J * factors[:, h]
    score = J.double() / _exp1(J.shape, generator, J.device) if do_sample else J
    best = score.masked_fill(~ok, float("-inf")).argmax(-1)  # (B,) the first maximum: the lowest cell
    emit = ok.any(-1)
    chosen = _grid_digits(k, n, p.device).index_select(0, best)  # (B, n-1): heads 2..n
    tokens[:, :n] = torch.where(emit[:, None], tok.gather(1, best[:, None, None].expand(B, 1, n))[:, 0], tokens[:, :n])
    n_out.copy_(torch.where(emit, n, n_out))
    if draft is None:
        return
    mass = torch.where(ok, J, 0.0)  # (B, cells)
    for j in range(1, n):  # q(x_j | the chosen x_1..x_{j-1}): the mass of the cells under that prefix
        lead = k ** (n - j)  # cells per value of index j-1's prefix block
        start = (chosen[:, :j - 1] * _powers(k, n - 1, J.device)[:j - 1]).sum(-1)  # first cell of the prefix
        block = mass.gather(1, start[:, None] + torch.arange(lead, device=J.device)).view(B, k, -1).sum(-1)
        q = block / block.sum(-1, keepdim=True).clamp(min=1e-30)
        draft[:, j] = torch.where(emit[:, None], q, draft[:, j])


@functools.lru_cache(maxsize=32)
def _grid_digits(k: int, n: int, device: torch.device) -> torch.Tensor:
    """(k**(n-1), n-1) int64: the top-k indices of heads 2..n of each row-major cell (cached)."""
    cells = torch.arange(k ** (n - 1), device=device)
    return torch.stack([cells // k ** (n - 1 - h) % k for h in range(1, n)], dim=-1)


def _fill_draft(draft, cand: Candidates, rows, chosen_idx, k):
    """Conditionals q(x_j | x_1..x_{j-1}), j = 1..n-1, of the distribution proportional to the
    candidates' J, along each row's chosen cell (rows (R,), chosen_idx (R, n)). Writes draft in place."""
    B = draft.shape[0]
    n = chosen_idx.shape[1]
    full = torch.full((B, n), -1, dtype=torch.long, device=draft.device)
    full[rows] = chosen_idx
    for j in range(1, n):
        on_path = (cand.idx[:, :j] == full[cand.rows, :j]).all(-1)  # candidates sharing the prefix
        mass = torch.zeros(B * k, device=draft.device)
        mass.scatter_add_(0, cand.rows[on_path] * k + cand.idx[on_path, j], cand.J[on_path].float())
        mass = mass.view(B, k)[rows]
        draft[rows, j] = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
