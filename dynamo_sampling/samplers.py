"""Sampling primitives shared by every strategy (decoding), the DynaMo policy and the kernels' glue.

* :class:`SamplingParams`: the sampler settings that travel together through the loop.
* :func:`head_probs`: the ordinary tempered / top-k target distribution of one head.
* :func:`draw`: one draw per row with no host sync (argmax of ``p / E``, ``E ~ Exp(1)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def head_probs(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """Target distribution of the ordinary sampler. logits (..., V) -> probs (..., V) float32.

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


def exp1(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Exp(1) noise in float64, never 0."""
    return -torch.log1p(-torch.rand(shape, generator=generator, device=device, dtype=torch.float64))


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row, proportional to ``probs`` (..., N) -> (...) int64. No host sync:
    argmax of ``probs / E`` with ``E ~ Exp(1)`` (zero-probability entries are never drawn)."""
    score = probs.double() / exp1(probs.shape, generator, probs.device)
    return score.masked_fill(probs <= 0, -1.0).argmax(-1)


@dataclass
class SamplingParams:
    """How head 1's tokens are chosen: greedy (``do_sample=False``) or a tempered top-k draw.

    temperature and top_k matter only when sampling; generator drives every random number.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    generator: Optional[torch.Generator] = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> the target distribution (..., V) float32 (one-hot when greedy)."""
        return head_probs(logits, self.do_sample, self.temperature, self.top_k)

    def pick(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (B, V) -> (B,) int64: a draw when sampling, the argmax when greedy."""
        return draw(probs, self.generator) if self.do_sample else probs.argmax(-1)

    def uniform(self, shape, device) -> torch.Tensor:
        """U[0, 1) float64 from the generator (acceptance tests)."""
        return torch.rand(shape, generator=self.generator, device=device, dtype=torch.float64)
