"""The DynaMo step policy in plain torch (used by ``decoding``; the CPU path and the CUDA reference).

From the head logits at a row's last position, ``(B, H, V)``, decide how many tokens the row
emits this step and which ones. The algorithm (Tuli et al. 2024, DESIGN.md) per row:

1. temperature (sampling only), then per head the top-``k`` tokens and their probabilities
   under the full softmax;
2. for order ``n = H .. 2``:

   * ``J[i1..in] = prod_h p_h(x_h)`` over the top-k lists (``k**n`` cells);
   * co-occurrence weighting ``J *= w(x1..xn)`` with ``w = (p^(x1..xn) / prod p^(x_h)) ** alpha_c``;
     an n-gram the statistics never saw gets ``w = 0``. Only n-grams whose two (n-1)-gram
     windows were both seen can have been seen, so lookups are made for those cells only;
   * *choice:* the weighted ``J`` is rescaled to the total mass of the unweighted ``J``
     (``renormalize_weighted``), so it stays a probability-like quantity ``<= 1`` and the
     thresholds below mean the same with and without statistics;
   * static threshold (*choice:* one order-dependent threshold ``tau_n = eps_b ** (n-1)``,
     which makes DESIGN's "zero cells below eps_b" and "back off when all cells are below
     eps_b ** (n-1)" a single rule): cells ``J <= tau_n`` are zeroed. ``eps_b = 1`` therefore
     always backs off to one token and ``eps_b = 0`` keeps every cell the statistics allow;
   * adaptive threshold (*choice:* after the static one): ``J`` is optionally blurred with a
     3-tap Gaussian along every top-k axis (sorted by probability, zero padded), the Otsu
     threshold of the blurred values of the surviving cells is computed, and cells whose
     blurred value is below it are zeroed (the cell with the largest blurred value always
     survives);
   * repetition penalty: a cell is divided by ``penalty`` once for each of its tokens that
     already occurs in the row;
   * back-off: if no cell survived, try ``n - 1``; otherwise emit the n-gram: the argmax of
     ``J`` when greedy, a draw proportional to ``J`` when sampling.
3. ``n = 1``: head 1 alone, with the ordinary temperature / top-k sampler (:func:`head_probs`).

Speculative decoding passes ``first_tokens``: the first token is already fixed (drawn exactly
from head 1), and the policy restricts ``J`` to the cells that start with it, returning the
conditional draft distributions ``q(x_j | x_1..x_{j-1})`` that rejection sampling needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


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
    renormalize_weighted: bool = True  # rescale weighted J to the mass of unweighted J (see module doc)

    def validate(self, n_heads: int = None):
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


# ---------------------------------------------------------------- single-head sampling


def head_probs(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """Target distribution of the ordinary sampler. logits (B, V) -> probs (B, V) float32.

    Greedy returns a one-hot at the argmax (first index on ties). Sampling applies temperature,
    then keeps the ``top_k`` largest logits (ties at the boundary kept), then softmax.
    """
    logits = logits.float()
    if not do_sample:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row, proportional to ``probs`` (..., N) -> (...) int64. No host sync:
    argmax of ``probs / E`` with ``E ~ Exp(1)`` (zero-probability entries are never drawn)."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float64)
    e = -torch.log1p(-u)  # Exp(1), never 0
    score = probs.double() / e
    score = score.masked_fill(probs <= 0, -1.0)
    return score.argmax(-1)


# ---------------------------------------------------------------- joint helpers


def _outer(p: torch.Tensor) -> torch.Tensor:
    """p (B, n, k) -> J (B, k**n): product over heads of each head's probability, row-major cells."""
    B, n, k = p.shape
    J = p[:, 0]
    for h in range(1, n):
        J = (J[:, :, None] * p[:, h, None, :]).reshape(B, -1)
    return J


def _cell_ngrams(ids: torch.Tensor, cells: torch.Tensor, rows: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Token n-grams of flat cells. ids (B, n, k) top-k ids; cells, rows (M,) -> (M, n) int64."""
    out = []
    rem = cells
    for h in reversed(range(n)):
        out.append(ids[rows, h, rem % k])
        rem = rem // k
    return torch.stack(out[::-1], dim=-1)


class _WindowWeights:
    """Co-occurrence weights of contiguous head windows, looked up only where they can be non-zero.

    ``weights(start, n)`` -> (B, k**n) float32: the weight of every cell of heads
    ``start..start+n-1``; computed for the cells whose two (n-1)-windows were both seen.
    """

    def __init__(self, stats, ids: torch.Tensor, alpha_c: float):
        self.stats, self.ids, self.alpha_c = stats, ids, alpha_c  # ids (B, H, k)
        self.memo = {}

    def weights(self, start: int, n: int) -> torch.Tensor:
        key = (start, n)
        if key in self.memo:
            return self.memo[key]
        B, _, k = self.ids.shape
        ids = self.ids[:, start:start + n]
        if n == 2:
            cand = torch.ones(B, k * k, dtype=torch.bool, device=ids.device)
        else:
            cand = _combine(self.weights(start, n - 1) > 0, self.weights(start + 1, n - 1) > 0, B, k, n)
        w = torch.zeros(B, k ** n, dtype=torch.float32, device=ids.device)
        rows, cells = cand.nonzero(as_tuple=True)
        if rows.numel():
            ngrams = _cell_ngrams(ids, cells, rows, k, n)
            w[rows, cells] = self.stats.weight(ngrams, self.alpha_c).float()
        self.memo[key] = w
        return w


def _combine(left: torch.Tensor, right: torch.Tensor, B: int, k: int, n: int) -> torch.Tensor:
    """Cells (i1..in) whose prefix window (i1..i_{n-1}) and suffix window (i2..in) were both seen.
    left, right (B, k**(n-1)) bool -> (B, k**n) bool."""
    mid = k ** (n - 2)
    return (left.view(B, k, mid, 1) & right.view(B, 1, mid, k)).reshape(B, -1)


def _blur(J: torch.Tensor, n: int, k: int, sigma: float) -> torch.Tensor:
    """Separable 3-tap Gaussian along each top-k axis, zero padded. J (B, k**n) -> (B, k**n)."""
    side = math.exp(-1.0 / (2 * sigma * sigma))
    c0, c1 = 1.0 / (1 + 2 * side), side / (1 + 2 * side)
    B = J.shape[0]
    x = J.view(B, *([k] * n))
    for axis in range(1, n + 1):
        prev = torch.zeros_like(x)
        nxt = torch.zeros_like(x)
        sl = [slice(None)] * (n + 1)
        sl_src = list(sl)
        sl[axis], sl_src[axis] = slice(1, None), slice(None, -1)
        prev[tuple(sl)] = x[tuple(sl_src)]
        nxt[tuple(sl_src)] = x[tuple(sl)]
        x = c0 * x + c1 * (prev + nxt)
    return x.reshape(B, -1)


def otsu_threshold(values: torch.Tensor, valid: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row Otsu threshold of ``values`` over the ``valid`` cells. (B, N) -> (B,) float32.

    Histogram with ``bins`` equal bins between the row's smallest and largest valid value; the
    threshold is the lower edge of the first bin of the upper class that maximises the
    between-class variance. Rows with fewer than two distinct valid values get their minimum
    (everything survives).
    """
    inf = torch.tensor(float("inf"), device=values.device)
    lo = torch.where(valid, values, inf).amin(-1)  # (B,)
    hi = torch.where(valid, values, -inf).amax(-1)
    width = (hi - lo).clamp(min=1e-30)
    idx = ((values - lo[:, None]) / width[:, None] * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(values.shape[0], bins, device=values.device, dtype=torch.float64)
    hist.scatter_add_(1, idx, valid.double())
    centers = (torch.arange(bins, device=values.device, dtype=torch.float64) + 0.5)
    w0 = hist.cumsum(-1)  # weight of classes [0..t]
    m0 = (hist * centers).cumsum(-1)
    total, mtotal = w0[:, -1:], m0[:, -1:]
    w1 = total - w0
    between = w0 * w1 * (m0 / w0.clamp(min=1e-30) - (mtotal - m0) / w1.clamp(min=1e-30)) ** 2
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.full_like(between, -1.0))
    t = between.argmax(-1)  # last bin of the lower class
    thr = lo + (t + 1).to(values.dtype) * width / bins
    degenerate = (between.amax(-1) <= 0) | (hi <= lo)
    return torch.where(degenerate, lo, thr).float()


# ---------------------------------------------------------------- the step


def check_stats(stats, vocab_size: int, n_heads: int):
    """Boundary check shared by ``sample`` and :func:`dynamo_step`."""
    if stats is None:
        return
    if getattr(stats, "vocab_size", None) != vocab_size:
        raise ValueError(f"co-occurrence statistics have vocabulary size {getattr(stats, 'vocab_size', None)}, "
                         f"expected the model's {vocab_size}")
    if n_heads >= 2 and getattr(stats, "max_order", 0) < n_heads:
        raise ValueError(f"co-occurrence statistics of max_order {stats.max_order} cannot weight the "
                         f"{n_heads}-grams of a {n_heads}-head model; build them with max_order >= {n_heads}")


def dynamo_step(head_logits: torch.Tensor, cfg: DynamoConfig, *, stats=None, do_sample: bool = False,
                temperature: float = 1.0, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                seen_tokens: Optional[torch.Tensor] = None, first_tokens: Optional[torch.Tensor] = None,
                max_tokens: Optional[torch.Tensor] = None) -> StepOutput:
    """One DynaMo step for a batch (see the module docstring).

    Parameters
    ----------
    head_logits : float tensor, shape (B, H, V); logits of heads 1..H at each row's last position.
    cfg : DynamoConfig.
    stats : co-occurrence weight provider or None (weight 1 everywhere): ``stats.weight(ngrams
        (M, n) int64, alpha_c) -> (M,)`` with exact zeros for unseen n-grams.
    do_sample, temperature, top_k : the sampler; ``temperature`` also scales the joint when
        sampling (greedy uses the raw softmax). ``top_k`` is head 1's sampler at ``n = 1``.
    generator : torch.Generator for every random draw.
    seen_tokens : bool tensor (B, V) or None; tokens already in each row (repetition penalty).
    first_tokens : LongTensor (B,) or None; speculative mode (first token fixed, see module doc).
    max_tokens : LongTensor (B,) or None; cap on the n-gram length per row (e.g. tokens left).

    Returns
    -------
    StepOutput
    """
    B, H, V = head_logits.shape
    k = min(cfg.k, V)
    dev = head_logits.device
    logits = head_logits.float()
    if do_sample:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    top_logp, topk_ids = logp.topk(k, dim=-1)  # (B, H, k)
    p = top_logp.exp()
    use_stats = stats is not None and cfg.alpha_c > 0
    windows = _WindowWeights(stats, topk_ids, cfg.alpha_c) if use_stats else None
    penal = None
    if seen_tokens is not None and cfg.repetition_penalty != 1.0:
        seen = seen_tokens.gather(1, topk_ids.view(B, -1)).view(B, H, k)
        penal = torch.where(seen, 1.0 / cfg.repetition_penalty, 1.0)  # (B, H, k)
    first_idx = None
    if first_tokens is not None:
        match = topk_ids[:, 0, :] == first_tokens[:, None]  # (B, k)
        first_idx = torch.where(match.any(-1), match.float().argmax(-1), -1)  # (B,)

    tokens = torch.full((B, H), -1, dtype=torch.long, device=dev)
    n_out = torch.ones(B, dtype=torch.long, device=dev)
    draft = torch.zeros(B, H, k, dtype=torch.float32, device=dev) if first_tokens is not None else None
    decided = torch.zeros(B, dtype=torch.bool, device=dev)
    if first_idx is not None:
        decided |= first_idx < 0  # first token outside head 1's top-k: no draft
    for n in range(H, 1, -1):
        active = ~decided
        if max_tokens is not None:
            active &= max_tokens >= n
        if not bool(active.any()):
            continue
        J = _outer(p[:, :n])  # (B, k**n)
        if use_stats:
            raw_mass = J.sum(-1, keepdim=True)
            J = J * windows.weights(0, n)
            if cfg.renormalize_weighted:
                J = J * (raw_mass / J.sum(-1, keepdim=True).clamp(min=1e-30))
        if first_idx is not None:
            J = J.view(B, k, -1) * (torch.arange(k, device=dev) == first_idx[:, None])[:, :, None]
            J = J.reshape(B, -1)
        J = torch.where(J > cfg.eps_b ** (n - 1), J, torch.zeros_like(J))
        alive = J > 0
        if cfg.adaptive_threshold:
            score = _blur(J, n, k, cfg.blur_sigma) if cfg.blur else J
            thr = otsu_threshold(score, alive, cfg.otsu_bins)
            alive = alive & (score >= thr[:, None])
            J = torch.where(alive, J, torch.zeros_like(J))
        if penal is not None:
            J = J * _outer(penal[:, :n])
        emit = active & alive.any(-1)  # (B,)
        if not bool(emit.any()):
            continue
        cell = draw(J, generator) if do_sample else J.argmax(-1)  # (B,)
        rows = emit.nonzero(as_tuple=True)[0]
        ngram = _cell_ngrams(topk_ids, cell[rows], rows, k, n)  # (M, n)
        tokens[rows, :n] = ngram
        n_out[rows] = n
        decided |= emit
        if draft is not None:
            _fill_draft(draft, J, cell, rows, k, n)
    rest = ~decided | (n_out == 1)
    if first_tokens is not None:
        tokens[:, 0] = torch.where(rest, first_tokens, tokens[:, 0])
    else:
        single = draw(head_probs(head_logits[:, 0], True, temperature, top_k), generator) if do_sample \
            else head_logits[:, 0].argmax(-1)
        tokens[:, 0] = torch.where(rest, single, tokens[:, 0])
    tokens[:, 1:] = torch.where(rest[:, None], -1, tokens[:, 1:])
    n_out = torch.where(rest, 1, n_out)
    return StepOutput(tokens, n_out, topk_ids, draft)


def _fill_draft(draft, J, cell, rows, k, n):
    """Conditionals q(x_j | x_1..x_{j-1}), j = 1..n-1 (0-based heads), of the distribution
    proportional to J, along the chosen cell. Writes draft[rows, j] (k,) in place."""
    G = J[rows]  # (M, k**n)
    c = cell[rows]
    M = rows.numel()
    ar = torch.arange(M, device=J.device)
    for j in range(n):
        G = G.view(M, k, -1)
        digit = (c // (k ** (n - 1 - j))) % k
        if j > 0:
            marg = G.sum(-1)  # (M, k)
            draft[rows, j] = marg / marg.sum(-1, keepdim=True).clamp(min=1e-30)
        G = G[ar, digit]
