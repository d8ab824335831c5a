"""One decoding loop for every strategy (used by ``sampling.sample``).

State per row: the KV cache holds the row's tokens at positions ``0..len-1`` and ``last_logits``
are the heads' logits at position ``len-1``. A step picks tokens from ``last_logits``, feeds them
in one forward (ragged: each row feeds its own count, padding has position -1), and takes the new
``last_logits`` at the row's last kept position.

* ``ar``: head 1 only (``heads=1``), one token per step.
* ``dynamo``: the step policy's n-gram is emitted directly (lossy).
* ``speculative``: the first token is drawn exactly from head 1 (the ``ar`` sampler); the step
  policy drafts the rest conditioned on it; the forward that feeds ``[t1, d2..dn]`` gives head 1
  at every fed position, which verifies ``d2..dn`` left to right (greedy: exact match; sampling:
  accept ``d`` with probability ``min(1, p(d) / q(d))``). The cache keeps the accepted prefix
  (rolling back is lowering ``len``). On a rejection the replacement token must come from the
  residual ``(p - q)+``; its ``p`` is head 1 at the last kept position, i.e. the next step's
  ``last_logits``, so the next step draws its first token from that residual instead of ``p``.
  Every emitted token is thus distributed exactly as under ``ar``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from .policy import DynamoConfig, StepOutput, draw, dynamo_step, head_probs

STRATEGIES = ("ar", "dynamo", "speculative")


@dataclass
class GenerationOutput:
    """Result of ``sample(..., return_dict_in_generate=True)``.

    sequences : LongTensor (B, S + max_new_tokens); prompt then new tokens, ``pad_token_id`` after
        a row stops.
    steps : LongTensor (B,); forward passes after prefill in which the row emitted tokens.
    new_tokens : LongTensor (B,); tokens emitted per row (EOS included).
    tokens_per_step : FloatTensor (B,); ``new_tokens / steps``.
    histogram : LongTensor (B, H); ``histogram[b, n-1]`` = steps in which row b emitted n tokens.
    drafted, accepted : LongTensor (B,); speculative only: draft tokens proposed beyond the first /
        accepted by verification (zero for other strategies).
    wall_time : float; seconds for the whole batch (prefill included).
    """

    sequences: torch.Tensor
    steps: torch.Tensor
    new_tokens: torch.Tensor
    tokens_per_step: torch.Tensor
    histogram: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    wall_time: float


def _check_logits(logits: torch.Tensor, step: int):
    if torch.isnan(logits).any():
        raise ValueError(f"the model returned NaN logits (step {step}); expected finite values")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, strategy: str, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: Optional[int], eos_token_id: Optional[list],
             pad_token_id: int, generator: Optional[torch.Generator], streamer, dynamo: DynamoConfig,
             stats, backend: str = "torch") -> GenerationOutput:
    """The loop. Inputs are already validated by ``sample``; shapes as there."""
    t0 = time.perf_counter()
    if backend == "cuda":
        from .kernels import cuda_dynamo_step as step_policy
    else:
        step_policy = dynamo_step
    B, S = input_ids.shape
    dev = input_ids.device
    H = model.n_heads
    heads = 1 if strategy == "ar" else H
    V = model.vocab_size
    mask = attention_mask.bool()
    prompt_len = mask.sum(1)  # (B,)
    cache = model.new_cache(B, max_len=int(prompt_len.max()) + max_new_tokens)
    positions = torch.where(mask, mask.long().cumsum(1) - 1, -1)  # (B, S)
    last_index = torch.full((B, 1), S - 1, dtype=torch.long, device=dev)
    last_logits = model(input_ids, positions, cache, heads=heads, logits_index=last_index)[:, 0]  # (B, heads, V)
    _check_logits(last_logits, 0)
    cache.lengths = prompt_len.clone()

    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    n_gen = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    hist = torch.zeros(B, H, dtype=torch.long, device=dev)
    drafted = torch.zeros(B, dtype=torch.long, device=dev)
    accepted = torch.zeros(B, dtype=torch.long, device=dev)
    eos = torch.tensor(eos_token_id or [], dtype=torch.long, device=dev)
    seen = None
    if strategy != "ar" and dynamo.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        seen[torch.arange(B, device=dev)[:, None].expand(B, S)[mask], input_ids[mask]] = True
    residual = None  # speculative sampling: (B, V) draft mass to subtract from the next first token
    ar_ = torch.arange(H, device=dev)
    step = 0
    while not bool(done.all()):
        step += 1
        active = ~done
        remaining = max_new_tokens - n_gen
        if strategy == "ar":
            p1 = head_probs(last_logits[:, 0], do_sample, temperature, top_k)
            tok = draw(p1, generator) if do_sample else p1.argmax(-1)
            tokens = torch.full((B, H), -1, dtype=torch.long, device=dev)
            tokens[:, 0] = tok
            n = torch.ones(B, dtype=torch.long, device=dev)
            pol = None
        elif strategy == "dynamo":
            pol = step_policy(last_logits, dynamo, stats=stats, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, generator=generator, seen_tokens=seen, max_tokens=remaining)
            tokens, n = pol.tokens, pol.n
        else:
            p1 = head_probs(last_logits[:, 0], do_sample, temperature, top_k)
            if residual is not None:
                res = (p1 - residual).clamp(min=0)
                mass = res.sum(-1, keepdim=True)
                p1 = torch.where(mass > 0, res / mass.clamp(min=1e-30), p1)
            first = draw(p1, generator) if do_sample else p1.argmax(-1)
            pol = step_policy(last_logits, dynamo, stats=stats, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, generator=generator, seen_tokens=seen, first_tokens=first,
                              max_tokens=remaining)
            tokens, n = pol.tokens, pol.n
        n = torch.where(active, n, 0)
        T = int(n.max())
        fed_valid = ar_[None, :T] < n[:, None]  # (B, T)
        feed_ids = torch.where(fed_valid, tokens[:, :T], 0)
        feed_pos = torch.where(fed_valid, cache.lengths[:, None] + ar_[None, :T], -1)
        if strategy == "dynamo":  # only each row's last fed position is needed
            logits = model(feed_ids, feed_pos, cache, heads=heads, logits_index=(n - 1).clamp(min=0)[:, None])
            _check_logits(logits[active], step)  # (B, 1, heads, V)
        else:
            logits = model(feed_ids, feed_pos, cache, heads=heads)  # (B, T, heads, V)
            _check_logits(logits[fed_valid], step)

        if strategy == "speculative":
            keep, residual = _verify(tokens, n, pol, logits, do_sample, temperature, top_k, generator, V)
            drafted += (n - 1).clamp(min=0)
            accepted += (keep - 1).clamp(min=0)
        else:
            keep = n
        # stop at the first EOS among the kept tokens
        kept_valid = ar_[None, :T] < keep[:, None]
        if eos.numel():
            is_eos = torch.isin(tokens[:, :T], eos) & kept_valid
            has_eos = is_eos.any(-1)
            keep = torch.where(has_eos, is_eos.float().argmax(-1) + 1, keep)
            kept_valid = ar_[None, :T] < keep[:, None]
            done |= has_eos
        rows, cols = kept_valid.nonzero(as_tuple=True)
        out[rows, n_gen[rows] + cols] = tokens[rows, cols]
        if seen is not None:
            seen[rows, tokens[rows, cols]] = True
        if streamer is not None:
            streamer.put([tokens[b, :int(keep[b])].clone() for b in range(B)])
        last_index = torch.zeros_like(keep) if strategy == "dynamo" else (keep - 1).clamp(min=0)
        last_logits = torch.where(active[:, None, None], logits[torch.arange(B, device=dev), last_index], last_logits)
        cache.lengths = cache.lengths + keep
        n_gen = n_gen + keep
        steps += active.long()
        hist[active, (keep - 1).clamp(min=0)[active]] += 1
        done |= n_gen >= max_new_tokens
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, out], dim=1)
    return GenerationOutput(sequences=sequences, steps=steps, new_tokens=n_gen,
                            tokens_per_step=n_gen.float() / steps.clamp(min=1).float(), histogram=hist,
                            drafted=drafted, accepted=accepted, wall_time=time.perf_counter() - t0)


def _verify(tokens, n, pol: StepOutput, logits, do_sample, temperature, top_k, generator, V):
    """Speculative verification. tokens (B, H) = [t1, d2..dn]; logits (B, T, H, V) of the forward
    that fed them. Returns (keep (B,) tokens kept >= 1 for active rows, residual (B, V) or None).

    Draft j (0-based, j >= 1) is checked against head 1 at fed index j-1. Greedy: exact match.
    Sampling: accept with probability min(1, p(d)/q(d)); on the first rejection the draft
    distribution q_j is returned as the residual to subtract from the next step's first token.
    """
    B, T = logits.shape[:2]
    dev = logits.device
    keep = n.clamp(max=1).clone()  # the first token is exact; inactive rows keep 0
    alive = n >= 1  # still accepting
    residual = torch.zeros(B, V, device=dev) if do_sample else None
    for j in range(1, T):
        check = alive & (n > j)
        if not bool(check.any()):
            break
        p = head_probs(logits[:, j - 1, 0], do_sample, temperature, top_k)  # (B, V)
        d = tokens[:, j].clamp(min=0)
        if do_sample:
            q = torch.zeros(B, V, device=dev).scatter_(1, pol.topk_ids[:, j], pol.draft_probs[:, j])
            p_d, q_d = p.gather(1, d[:, None])[:, 0], q.gather(1, d[:, None])[:, 0]
            u = torch.rand(B, generator=generator, device=dev, dtype=torch.float64)
            ok = u * q_d.double() < p_d.double()
            rejected = check & ~ok
            residual = torch.where(rejected[:, None], q, residual)
        else:
            ok = p.argmax(-1) == d
        ok = check & ok
        keep += ok.long()
        alive &= ok
    if residual is not None and not bool(residual.any()):
        residual = None
    return keep, residual
