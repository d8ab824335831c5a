"""Draft sizing for ``speculative`` and ``lookup`` (used by ``decoding``): what a forward costs,
how much a draft is worth, and the per-row acceptance evidence of each drafter.

* :func:`measure_step_cost`: cost of feeding T = 1..W tokens with head 1 alone and with every head,
  relative to an ``ar`` forward, measured once per process (robust to load: fastest of interleaved
  rounds);
* :func:`size_drafts`: the stopping rule that sizes a draft by expected kept tokens per unit of
  cost, reading only estimates made before each token is drawn (so sampled verification stays
  exact);
* :class:`Evidence`: each drafter's observed first-token and continuation acceptance per row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class DraftConfig:
    """How ``speculative`` and ``lookup`` size their drafts.

    size_by : "cost" (default): each row drafts the length that maximises expected kept tokens per
        unit of step cost, the acceptance of a joint draft estimated by the policy's own draft
        probabilities and that of a lookup draft by the row's running acceptance rate; the joint is
        then the argmax of the heads' top-``joint_k`` joint (DynaMo's thresholds, designed for the
        lossy mode, are off). "thresholds": DynaMo's eps_b / Otsu rules (``DynamoConfig``) size the
        joint's drafts, lookup drafts are used whole.
    joint_k : top-k per head of the speculative joint under "cost" (the full k = 50 grid of the
        lossy mode costs milliseconds per step; a draft's first few candidates carry its mass).
    hybrid : speculative also proposes a lookup draft per row; the better of the two is fed.
    merge : hybrid, sized by cost: a joint draft may go on with the lookup index's continuation of
        it (the tokens that followed the draft's last n-gram earlier in the row), where that is worth
        more than the joint draft alone; the merged draft then competes with the lookup draft.
    step_cost : cost of one forward feeding T = 1, 2, ... tokens, relative to T = 1; None measures
        it once per (model, device, dtype, batch size, heads) in this process.
    """

    size_by: str = "cost"
    joint_k: int = 10
    hybrid: bool = True
    merge: bool = True
    step_cost: Optional[Sequence[float]] = None

    def validate(self):
        """Check every field's type and range (``TypeError`` / ``ValueError`` naming it); numpy
        integers become ints, bools are refused where numbers are expected."""
        import math
        import numbers
        if not isinstance(self.size_by, str) or self.size_by not in ("cost", "thresholds"):
            raise ValueError(f"size_by must be 'cost' or 'thresholds', got {self.size_by!r}")
        if isinstance(self.joint_k, bool) or not isinstance(self.joint_k, numbers.Integral):
            raise TypeError(f"joint_k must be an int, got {type(self.joint_k).__name__} ({self.joint_k!r})")
        self.joint_k = int(self.joint_k)
        if self.joint_k < 1:
            raise ValueError(f"joint_k must be >= 1, got {self.joint_k}")
        if not isinstance(self.hybrid, bool) and type(self.hybrid).__name__ != "bool_":  # numpy bool passes
            raise TypeError(f"hybrid must be a bool, got {type(self.hybrid).__name__} ({self.hybrid!r})")
        self.hybrid = bool(self.hybrid)
        if not isinstance(self.merge, bool) and type(self.merge).__name__ != "bool_":
            raise TypeError(f"merge must be a bool, got {type(self.merge).__name__} ({self.merge!r})")
        self.merge = bool(self.merge)
        if self.step_cost is not None:
            if isinstance(self.step_cost, (str, bytes)) or not hasattr(self.step_cost, "__iter__") or any(
                    isinstance(c, bool) or not isinstance(c, numbers.Real) for c in self.step_cost):
                raise TypeError(f"step_cost must be a sequence of real numbers or None, got "
                                f"{type(self.step_cost).__name__} ({self.step_cost!r})")
            cost = list(self.step_cost)
            if not cost or any(not 0 < c < math.inf for c in cost):
                raise ValueError(f"step_cost must be a non-empty sequence of positive costs, got {self.step_cost!r}")


# ---------------------------------------------------------------- step cost


STEP_COST = {}  # (model, device, dtype, B, width, sampled, prefix) -> measured tables; also the joint's overhead


def measure_step_cost(model, batch_size: int, width: int, rounds: int = 5, sampled: bool = False,
                      prefix: int = 64) -> dict:
    """Cost of one forward feeding T = 1..width tokens per row, with head 1 only and with every
    head, relative to head 1 on one token: ``{1: (1.0, c2, ...), H: (c1, c2, ...)}``.

    Timed on a scratch cache holding a ``prefix``-token prefix (at most the model's context less
    ``width``; attention's share of a step grows with it, most at larger batches), head 1
    unembedded at every fed row and heads 2..H at one, as the loop does, and the verification of
    T - 1 draft tokens (greedy: an argmax per row; ``sampled``: head 1's softmax per row, what rejection sampling reads). Widths
    T = 1, 2, 3, 4, 8, ... (powers of two) and ``width`` are timed and the others interpolated
    linearly (a forward's cost grows about linearly in the tokens fed; this halves the time the
    first ``sample()`` call spends measuring). Every variant is timed once per round, ``rounds``
    rounds after a warm-up, and each keeps its fastest: load from other processes only ever adds
    time, so the minimum is the robust estimate. Each table is made non-decreasing by suffix minima
    (a width's cost is at most any wider one's)."""
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    H = model.n_heads
    prefix = min(prefix, model.max_seq_len - width)
    cache = model.new_cache(batch_size, max_len=prefix + width)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timed = sorted({T for T in (1, 2, 3) if T <= width} | {1 << i for i in range(width.bit_length())} | {width})
    variants = [(h, T) for h in sorted({1, H}) for T in timed]
    best = {v: float("inf") for v in variants}
    with torch.inference_mode():
        model(torch.zeros(batch_size, prefix, dtype=torch.long, device=dev),
              torch.arange(prefix, device=dev).expand(batch_size, prefix), cache, heads=H, output_hidden=True)
        for r in range(rounds + 1):
            for heads, T in variants:
                ids = torch.zeros(batch_size, T, dtype=torch.long, device=dev)
                pos = (prefix + torch.arange(T, device=dev)).expand(batch_size, T)
                sync()
                t0 = time.perf_counter()
                hidden = model(ids, pos, cache, heads=heads, output_hidden=True)
                head1 = model.head_logits(hidden[:, :, 0])
                if heads > 1:
                    model.head_logits(hidden[:, -1, 1:])
                if T > 1:
                    torch.softmax(head1[:, :-1], dim=-1) if sampled else head1[:, :-1].argmax(-1)
                sync()
                if r:  # round 0 warms up
                    best[(heads, T)] = min(best[(heads, T)], time.perf_counter() - t0)
    out = {"seconds": best[(1, 1)]}  # the unit: head 1 on one token
    for heads in sorted({1, H}):
        at = torch.tensor([best[(heads, T)] / best[(1, 1)] for T in timed], dtype=torch.float64)
        rel = _interpolate(torch.tensor(timed, dtype=torch.float64), at, width)
        for i in range(width - 2, -1, -1):
            rel[i] = min(rel[i], rel[i + 1])
        out[heads] = tuple(max(1.0, c) for c in rel)
    return out


def _interpolate(xs: torch.Tensor, ys: torch.Tensor, width: int) -> list:
    """Piecewise-linear ``ys`` over sorted ``xs`` evaluated at T = 1..width (xs holds 1 and width)."""
    if len(xs) == 1:
        return ys.tolist()
    T = torch.arange(1, width + 1, dtype=torch.float64)
    hi = torch.searchsorted(xs, T).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
    return (y0 + (y1 - y0) * (T - x0) / (x1 - x0)).tolist()


def step_cost_tables(model, batch_size, width, draft: DraftConfig, device, sampled: bool, context: int = 64) -> dict:
    """{1: (width,), H: (width,)} float64 tensors: the measured (or given) cost of a forward, timed
    behind a prefix of ``context`` tokens rounded up to a power of two (from 64; the decode's
    typical length, e.g. the prompt and half the new tokens)."""
    H = model.n_heads
    if draft.step_cost is not None:
        cost = list(draft.step_cost)
        cost = cost + [cost[-1]] * (width - len(cost))  # beyond the table: as its last entry
        table = {1: cost, H: cost, "seconds": None}
    else:
        p = next(iter(model.parameters()), None)
        prefix = 64
        while prefix < context:
            prefix *= 2
        key = (id(model), str(device), p.dtype if p is not None else None, batch_size, width, sampled, prefix)
        if key not in STEP_COST:
            STEP_COST[key] = measure_step_cost(model, batch_size, width, sampled=sampled, prefix=prefix)
        table = STEP_COST[key]
    out = {h: torch.tensor(table[h][:width], dtype=torch.float64, device=device) for h in (1, H)}
    out["seconds"] = table["seconds"]
    return out


def size_drafts(accept: torch.Tensor, cap: torch.Tensor, cost: torch.Tensor):
    """Draft length per row by a stopping rule on expected kept tokens per unit of cost.

    accept : (B, D) float; estimated probability that draft token j is accepted given that tokens
        1..j-1 were, j = 1..D. Token j may be drafted while ``(1 + sum_{i<=j} s_i) / cost[j] >
        (1 + sum_{i<j} s_i) / cost[j-1]`` with ``s_j = prod_{i<=j} accept_i``; the first token that
        fails ends the draft. The rule reads only ``accept_1..j`` to decide on token j, so when
        ``accept_j`` is computed before token j is drawn (from its draft distribution, not from
        the drawn token), the draft stays a valid speculative proposal and sampling stays exact.
    cap : (B,) int64; the most draft tokens a row may feed.
    cost : (>= D + 1,) float64; cost of one forward feeding 1 + d tokens, d = 0..D.

    Returns (length (B,) int64 in 0..min(D, cap), value (B,) float64: expected kept tokens per
    unit of cost at that length).
    """
    B, D = accept.shape
    kept = expected_kept(accept)
    c = cost[:D + 1]
    worth = kept[:, 1:] * c[None, :D] > kept[:, :-1] * c[None, 1:]  # (B, D)
    worth &= torch.arange(1, D + 1, device=accept.device)[None] <= cap[:, None]
    length = worth.long().cumprod(1).sum(1)
    return length, kept.gather(1, length[:, None])[:, 0] / c[length]


def expected_kept(accept: torch.Tensor) -> torch.Tensor:
    """(B, D) acceptance estimates of draft tokens 1..D -> (B, D + 1) float64: expected tokens kept
    when a row feeds its first token and d = 0..D draft tokens, ``1 + sum_{j<=d} prod_{i<=j} accept_i``."""
    surv = accept.double().clamp(0, 1).cumprod(1)
    return 1.0 + torch.cat([surv.new_zeros(accept.shape[0], 1), surv.cumsum(1)], dim=1)


def size_draft(accept: Sequence[float], cap: int, cost: Sequence[float]):
    """:func:`size_drafts` for one row on the host, in Python floats (the lookup drafter's sizing,
    whose inputs live on the host): the same rule and the same float64 operations in the same
    order, so the same (length, value); ``tests/test_sample.py`` compares the two.

    accept : the row's estimates for draft tokens 1..D; cap : int; cost : >= D + 1 floats."""
    length, surv, total, cap = 0, 1.0, 0.0, min(cap, len(accept))
    kept = 1.0 + total  # expected kept tokens at the current length, as expected_kept sums them
    while length < cap:
        surv *= min(max(accept[length], 0.0), 1.0)
        longer = 1.0 + (total + surv)
        if not longer * cost[length] > kept * cost[length + 1]:
            break
        kept, total, length = longer, total + surv, length + 1
    return length, kept / cost[length]


class Evidence:
    """Per-row acceptance evidence of one drafter, for sizing and choosing drafts.

    first : its first draft token, judged every step it proposes one (fed or not: head 1 at the
        first fed position, which predicts that token, is computed either way);
    cont : the tokens after the first, judged only when its draft is fed.
    Rates are Beta-smoothed: ``(hits + prior) / (checked + 1)``. Kept on the host as Python floats:
    the loop updates it from the one summary it brings back per step, the lookup drafter's sizing
    reads it there, and the joint's sizing on the device reads :meth:`rates`."""

    def __init__(self, B, prior_first: float, prior_cont: float):
        self.first_hits, self.first_checked = [0.0] * B, [0.0] * B
        self.cont_hits, self.cont_checked = [0.0] * B, [0.0] * B
        self.prior_first, self.prior_cont = prior_first, prior_cont

    def first_rate(self, b: int, prior: Optional[float] = None) -> float:
        return (self.first_hits[b] + (self.prior_first if prior is None else prior)) / (self.first_checked[b] + 1.0)

    def cont_rate(self, b: int, prior: Optional[float] = None) -> float:
        return (self.cont_hits[b] + (self.prior_cont if prior is None else prior)) / (self.cont_checked[b] + 1.0)

    def rates(self, prior: torch.Tensor) -> torch.Tensor:
        """(B, D) per-token priors (e.g. the heads' own estimates, on their device) -> (B, D) rates:
        the first-token rate for column 0, the continuation rate for the others."""
        ev = torch.tensor([self.first_hits, self.first_checked, self.cont_hits, self.cont_checked],
                          dtype=torch.float64, device=prior.device).T  # (B, 4)
        first = (ev[:, 0:1] + prior[:, :1]) / (ev[:, 1:2] + 1.0)
        return torch.cat([first, (ev[:, 2:3] + prior[:, 1:]) / (ev[:, 3:4] + 1.0)], dim=1)

    def select(self, rows: List[int]):
        """Keep only the rows ``rows`` (in the new order)."""
        for name in ("first_hits", "first_checked", "cont_hits", "cont_checked"):
            setattr(self, name, [getattr(self, name)[b] for b in rows])

    def add_first(self, b: int, accept_prob: float):
        self.first_checked[b] += 1.0
        self.first_hits[b] += accept_prob

    def add_fed(self, b: int, drafted: int, accepted: int):
        """drafted / accepted draft tokens fed / kept; tokens after the first rejection are unjudged."""
        checked = accepted + (accepted < drafted)
        self.cont_checked[b] += max(checked - 1, 0)
        self.cont_hits[b] += max(accepted - 1, 0)
