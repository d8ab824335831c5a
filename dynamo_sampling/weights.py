"""What the other layers need from co-occurrence statistics, and the one boundary check of them.

:class:`CooccurrenceWeights` is what the step policy (``policy.py``) calls; :class:`CooccurrenceTables`
adds what the CUDA kernels' glue (``kernels.py``) reads: the totals and the sorted tables on a device,
from the statistics' own per-device cache. :class:`~dynamo_sampling.cooccurrence.CooccurrenceStats`
is both. :func:`check_stats` is called by ``sample`` and at the boundary of ``dynamo_step`` /
``cuda_dynamo_step``.
"""
from __future__ import annotations

from typing import Dict, Protocol, runtime_checkable

import torch

__all__ = ["CooccurrenceWeights", "CooccurrenceTables", "check_stats"]


@runtime_checkable
class CooccurrenceWeights(Protocol):
    """What the step policy (``policy.py``) needs from statistics."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_order(self) -> int: ...

    def weight(self, ngrams: torch.Tensor, alpha_c: float = 1.0) -> torch.Tensor:
        """``(M..., n)`` int64 n-grams -> ``(M...)`` float32 weights, exactly 0 for unseen n-grams."""
        ...


@runtime_checkable
class CooccurrenceTables(CooccurrenceWeights, Protocol):
    """What the CUDA kernels' glue (``kernels.py``) needs besides the weights: the raw tables."""

    @property
    def totals(self) -> Dict[int, int]:
        """``T_n``, n-gram positions of each order ``1..max_order``."""
        ...

    def device_tables(self, device: torch.device) -> dict:
        """The tables on ``device``, cached: ``{"uni": int64 (V,), "p1": float64 (V,), "keys": {n:
        int64 (K_n,) sorted}, "counts": {n: int64 (K_n,)}}`` for ``n = 2..max_order``."""
        ...


def check_stats(stats, vocab_size: int, n_heads: int) -> None:
    """The boundary check of statistics against a model (``sample``, ``dynamo_step``, the kernels).

    ``stats`` may be None (no weighting); otherwise its vocabulary must be the model's and, for a
    model of ``n_heads >= 2``, it must weigh ``n_heads``-grams (``max_order >= n_heads``).
    """
    if stats is None:
        return
    if getattr(stats, "vocab_size", None) != vocab_size:
        raise ValueError(f"co-occurrence statistics have vocabulary size {getattr(stats, 'vocab_size', None)}, "
                         f"expected the model's {vocab_size}")
    if n_heads >= 2 and getattr(stats, "max_order", 0) < n_heads:
        raise ValueError(f"co-occurrence statistics of max_order {stats.max_order} cannot weight the "
                         f"{n_heads}-grams of a {n_heads}-head model; build them with max_order >= {n_heads}")
