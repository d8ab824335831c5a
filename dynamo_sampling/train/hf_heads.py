"""Training DynaMo heads on a pretrained base (used with ``models.hf.HFMTP``; needs no ``transformers`` itself).

The base model already is DynaMo's phase 1 (stem + head 1 trained as an ordinary LM), so this is phase 2
of the recipe in ``train.trainer``, built from that module's pieces rather than copies of them:
``head_losses`` (Gloeckle's per-head backward), ``_make_optimizer`` (stem + head 1 at
``lr * stem_lr_scale``, heads 2..H at ``lr``), ``_lr_factor`` / ``_progress`` (warmup + cosine, optional
time budget), ``_batch`` (random windows) and ``evaluate`` (validation loss).

Default ``train_base=False`` freezes the base (stem, head 1, LM head): head 1 stays exactly the base
model, so ``sample(..., strategy="speculative")`` keeps producing the base model's own greedy output,
only faster. ``train_base=True`` is the full DynaMo phase 2: the base learns too, at the low learning
rate, and receives the new heads' gradients scaled by ``head_to_stem_grad_scale``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from .trainer import TrainConfig, _batch, _lr_factor, _make_optimizer, _param_groups, _progress, evaluate, head_losses


def _as_stream(tokens, name: str, vocab_size: int, min_len: int) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer token stream, got shape {tokens.shape} dtype {tokens.dtype}")
    if len(tokens) <= min_len:
        raise ValueError(f"{name} holds {len(tokens)} tokens; need more than seq_len + n_heads = {min_len}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"{name} must be in [0, {vocab_size}) (the model's vocabulary), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    return tokens


def _set_modes(model, train_base: bool):
    """Train mode for what learns; eval mode (no dropout) for a frozen base."""
    model.train(train_base)
    if not train_base:
        for i in range(1, model.n_heads):
            model.head_layers[i].train()
            model.head_norms[i].train()


def train_heads(model, tokens, steps: int = 300, batch_size: int = 8, seq_len: int = 64, lr: float = 1e-3, *,
                train_base: bool = False, stem_lr_scale: float = 0.1, head_to_stem_grad_scale: float = 0.1,
                warmup_steps: int = 20, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, grad_clip: float = 1.0,
                time_budget_s: float = 0.0, seed: int = 0, val_tokens=None, eval_every: int = 0,
                eval_batches: int = 4, callback: Optional[Callable[[dict], None]] = None) -> list:
    """Train heads 2..H of an :class:`~dynamo_sampling.models.hf.HFMTP` on a token stream (DynaMo phase 2).

    Parameters
    ----------
    model : HFMTP (any model with ``stem_forward`` / ``head_hidden`` / ``unembed`` / ``head_layers`` /
        ``head_norms`` / ``n_heads`` whose stem output requires grad when grad is enabled).
    tokens : 1-D integer numpy array or torch tensor, shape (N,); a tokenised corpus (documents joined
        by EOS), values in [0, V).
    steps : optimizer steps (or fewer when ``time_budget_s`` runs out first; the schedule follows
        whichever is further along).
    batch_size, seq_len : random windows of ``seq_len + n_heads`` tokens per step.
    lr : peak learning rate of heads 2..H (warmup, then cosine to ``lr * min_lr_ratio``).
    train_base : False (default) freezes the base: head 1 stays the base model bit for bit.
        True: the base trains at ``lr * stem_lr_scale`` and heads 2..H send it their gradients
        scaled by ``head_to_stem_grad_scale`` (the paper's three learning rates).
    val_tokens, eval_every, eval_batches : every ``eval_every`` steps (and at the end) record the mean
        per-head validation loss over ``eval_batches`` fixed windows of ``val_tokens`` (trainer.evaluate).
    callback : called with each history record (e.g. to print progress).

    Returns
    -------
    history : list of dicts, one per step: ``step``, ``train`` (per-head losses, H floats), ``lr`` (heads'),
        ``time`` (s), ``tok_s``; plus ``val`` (H floats) on evaluation steps.
    The model is left in eval mode; parameters' ``requires_grad`` flags are restored.
    """
    H, V = model.n_heads, model.vocab_size
    if H < 2:
        raise ValueError(f"train_heads needs a model with n_heads >= 2, got {H}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len + H > model.max_seq_len:
        raise ValueError(f"seq_len + n_heads = {seq_len + H} exceeds the model's context {model.max_seq_len}")
    data = _as_stream(tokens, "tokens", V, seq_len + H)
    val = _as_stream(val_tokens, "val_tokens", V, seq_len + H) if val_tokens is not None else None
    device = next(model.parameters()).device
    cfg = TrainConfig(recipe="dynamo", steps=steps, pretrain_fraction=0.0, batch_size=batch_size, seq_len=seq_len,
                      lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, stem_lr_scale=stem_lr_scale,
                      head_to_stem_grad_scale=head_to_stem_grad_scale, weight_decay=weight_decay, grad_clip=grad_clip,
                      seed=seed, eval_batches=eval_batches, device=str(device), time_budget_s=time_budget_s)
    base_params, _ = _param_groups(model)
    saved_flags = [(p, p.requires_grad) for _, p in base_params]
    if not train_base:
        for _, p in base_params:
            p.requires_grad_(False)
    scales = [1.0] + [head_to_stem_grad_scale] * (H - 1)
    rng = np.random.default_rng(seed)
    history = []
    try:
        opt = _make_optimizer(model, cfg, phase=2)
        _set_modes(model, train_base)
        t0 = time.time()
        step = 0
        while _progress(step, time.time() - t0, cfg) < 1.0:
            prog = _progress(step, time.time() - t0, cfg)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * g["lr_scale"] * _lr_factor(step, 0, prog, 0.0, 1.0, cfg)
            x = _batch(data, batch_size, seq_len + H, rng, device)  # (B, seq_len + H)
            losses = head_losses(model, x, H, scales)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.time() - t0
            record = {"step": step, "train": losses, "lr": opt.param_groups[-1]["lr"], "time": elapsed,
                      "tok_s": step * batch_size * seq_len / max(elapsed, 1e-9)}
            last = _progress(step, elapsed, cfg) >= 1.0
            if val is not None and ((eval_every and step % eval_every == 0) or last):
                record["val"] = evaluate(model, val, cfg, H)
                _set_modes(model, train_base)
            history.append(record)
            if callback is not None:
                callback(record)
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return history


@torch.no_grad()
def head_accuracy(model, tokens, seq_len: int = 64, batch_size: int = 8, batches: int = 4, seed: int = 1234) -> list:
    """Top-1 accuracy of each head on fixed random windows of ``tokens`` (1-D, shape (N,)).

    Head h (1-based) at position t is right when its argmax equals ``x[t + h]``. Returns H floats.
    Runs the model's own uncached ``forward``; puts the model in eval mode.
    """
    H = model.n_heads
    data = _as_stream(tokens, "tokens", model.vocab_size, seq_len + H)
    device = next(model.parameters()).device
    model.eval()
    rng = np.random.default_rng(seed)
    hits = torch.zeros(H, dtype=torch.float64)
    for _ in range(batches):
        x = _batch(data, batch_size, seq_len + H, rng, device)  # (B, seq_len + H)
        inp = x[:, :seq_len]
        logits = model(inp, torch.arange(seq_len, device=device).expand_as(inp))  # (B, T, H, V)
        pred = logits.argmax(-1)  # (B, T, H)
        for h in range(H):
            hits[h] += (pred[:, :, h] == x[:, h + 1:h + 1 + seq_len]).double().mean().cpu()
    return (hits / batches).tolist()


__all__ = ["head_accuracy", "train_heads"]
