"""Training of MTP models (used by ``dynamo-sampling train`` and the HF head trainer).

The DynaMo recipe (Tuli et al. 2024, Sec. 3.1), with every number a field of :class:`TrainConfig`:

* phase 1 (``pretrain_fraction`` of the steps): stem + head 1 as an ordinary LM (``heads=1``);
* phase 2: heads 2..H join (randomly initialised; the paper found copying layer L worse) and all
  train with three learning rates: stem + head 1 at ``lr * stem_lr_scale`` (low), heads 2..H at
  ``lr`` (100x higher), and the gradient that heads 2..H send into the stem scaled by
  ``head_to_stem_grad_scale`` (10x lower than the stem's own).
``recipe="joint"`` trains all heads with one learning rate from the first step instead.

``distill`` (either recipe) mixes self-distillation into heads 2..H: head h at position t predicts
the token that head 1 predicts at position t + h - 1, so its loss becomes
``(1 - distill) * CE(data) + distill * KL(head 1 there, detached || head h)``. Speculative decoding
keeps a head's draft when it is what head 1 would say, so agreement with head 1, not only accuracy
against the data, is what makes drafts pay.

Gloeckle et al.'s memory trick: the stem runs once, its output is detached, each head runs
forward + backward on its own (so only one head's ``(B, T, V)`` logits live at a time), the
gradients accumulate on the detached stem output, and one backward through the stem follows.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..models.tiny import TinyMTP, TinyMTPConfig, load_model, save_model  # noqa: F401  (re-exported)


@dataclass
class TrainConfig:
    data_dir: str = "runs/data"  # train.npy / val.npy (uint16 token streams) from train.tokenizer
    out_dir: str = "runs/tiny"
    recipe: str = "dynamo"  # "dynamo" (two phases, three learning rates) or "joint"
    steps: int = 3000
    pretrain_fraction: float = 0.6  # dynamo recipe: share of steps for stem + head 1 alone
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3  # peak; cosine decay to lr * min_lr_ratio in each phase
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    stem_lr_scale: float = 0.1  # phase 2: stem + head 1 learn this much slower than the new heads (0: frozen)
    head_to_stem_grad_scale: float = 0.1  # phase 2: heads 2..H gradients into the stem
    distill: float = 0.0  # weight of heads 2..H's KL toward head 1's own (detached) prediction, in [0, 1]
    distill_target: str = "soft"  # "soft": head 1's distribution; "argmax": its top token (greedy acceptance)
    distill_temperature: float = 1.0  # "soft" only: head 1's distribution sharpened, softmax(log p / this)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False  # autocast; measured 100x SLOWER than fp32 on this AMD EPYC (no AMX): use on CUDA or AMX CPUs
    seed: int = 0
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 250
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 leaves the default
    time_budget_s: float = 0.0  # when set, the run (phases and LR schedule) ends after this many seconds
    # or `steps`, whichever comes first: the schedule follows the further of the two
    model: dict = field(default_factory=dict)  # TinyMTPConfig fields (vocab_size from the data)
    init_from: str = ""  # a save_model directory to start from (its shape; `model` must be empty or agree)


def head_losses(model: TinyMTP, x: torch.Tensor, heads: int, grad_scales=None, backward: bool = True,
                distill: float = 0.0, freeze_base: bool = False, distill_target: str = "soft",
                distill_temperature: float = 1.0):
    """Per-head cross-entropy on a window batch, with Gloeckle's per-head backward.

    x : LongTensor (B, T + H); inputs are x[:, :T]; head h (1-based) at position t predicts x[t + h].
    grad_scales : per-head factor for the gradient sent into the stem (None: all 1).
    distill : weight of the self-distillation term of heads 2..H (module docstring); it changes
        what is backpropagated, not the returned losses.
    freeze_base : stem + head 1 run without gradients (only heads 2..H learn; ~1.5x cheaper a step).
    distill_target : "soft" (head 1's distribution) or "argmax" (head 1's top token: the event greedy
        speculative decoding accepts, so the cross-entropy toward it is what greedy acceptance needs).
    distill_temperature : with "soft", the target is ``softmax(log p_1 / distill_temperature)``: below 1
        it moves toward the argmax target (its limit at 0) while keeping head 1's ranking of the rest.
    Returns a list of ``heads`` float losses (Python floats): each head's cross-entropy on the data.
    """
    H = model.n_heads
    T = x.shape[1] - H
    inp = x[:, :T]
    pos = torch.arange(T, device=x.device).expand_as(inp)
    with torch.set_grad_enabled(backward and not freeze_base):
        h_stem, rope = model.stem_forward(inp, pos)
    h_detached = h_stem.detach().requires_grad_(backward and not freeze_base)
    stem_grad = None
    losses = []
    teacher = None  # head 1's detached probabilities (B, T, V), for distillation
    for h in range(heads):
        learn = backward and not (freeze_base and h == 0)
        with torch.set_grad_enabled(learn):
            hidden = model.head_hidden(h_detached, rope, pos, h)
            logits = model.unembed(hidden).float()  # (B, T, V)
        target = x[:, h + 1:h + 1 + T]
        if not distill:
            loss = ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        else:
            logp = torch.log_softmax(logits, dim=-1)
            loss = ce = -logp.gather(-1, target[..., None]).mean()
            if h == 0 and heads > 1:
                teacher = (logp.detach().argmax(-1) if distill_target == "argmax" else
                           torch.softmax(logp.detach() / distill_temperature, dim=-1))
            elif 0 < h < T:
                # head h+1 at t and head 1 at t + h predict the same token x[t + h + 1]; the cross-entropy
                # toward head 1's distribution is the KL up to head 1's entropy, a constant here
                if distill_target == "argmax":
                    soft = -logp[:, :T - h].gather(-1, teacher[:, h:, None]).mean()
                else:
                    soft = -(teacher[:, h:] * logp[:, :T - h]).sum(-1).mean()
                loss = (1 - distill) * loss + distill * soft
        losses.append(ce.item())
        if learn:
            (loss / heads).backward()
            if freeze_base:
                continue
            g = h_detached.grad
            scale = 1.0 if grad_scales is None else grad_scales[h]
            stem_grad = g * scale if stem_grad is None else stem_grad + g * scale
            h_detached.grad = None
    if backward and not freeze_base:
        h_stem.backward(stem_grad)
    return losses


def _batch(data: np.ndarray, batch_size: int, width: int, rng: np.random.Generator, device) -> torch.Tensor:
    starts = rng.integers(0, len(data) - width, size=batch_size)
    return torch.from_numpy(np.stack([data[s:s + width].astype(np.int64) for s in starts])).to(device)


def _progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Share of the run done: steps, or wall time when ``time_budget_s`` is set (whichever is further)."""
    p = step / cfg.steps
    if cfg.time_budget_s:
        p = max(p, elapsed / cfg.time_budget_s)
    return min(p, 1.0)


def _lr_factor(step: int, phase_start: int, progress: float, lo: float, hi: float, cfg: TrainConfig) -> float:
    """Warmup (in steps) from the phase's first step, then cosine over the phase's share [lo, hi)."""
    i = step - phase_start
    if i < cfg.warmup_steps:
        return (i + 1) / cfg.warmup_steps
    frac = (progress - lo) / max(1e-9, hi - lo)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac))))


def _param_groups(model: TinyMTP):
    """(stem + head 1 params, heads 2..H params), each split into decay / no-decay."""
    base, heads = [], []
    for name, p in model.named_parameters():
        new_head = (name.startswith("head_layers.") or name.startswith("head_norms.")) and int(name.split(".")[1]) > 0
        (heads if new_head else base).append((name, p))
    return base, heads


def _make_optimizer(model, cfg: TrainConfig, phase: int):
    base, heads = _param_groups(model)
    groups = []
    for params, scale, tag in ((base, 1.0 if phase == 1 or cfg.recipe == "joint" else cfg.stem_lr_scale, "base"),
                               (heads, 1.0, "heads")):
        decay = [p for n, p in params if p.dim() >= 2]
        no_decay = [p for n, p in params if p.dim() < 2]
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale, "tag": tag})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": scale, "tag": tag})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


def _save_checkpoint(model, opt, step, cfg: TrainConfig, history, phase=1, phase_start=0):
    ck = Path(cfg.out_dir, "checkpoint")
    save_model(model, str(ck), dtype=torch.float32)
    opt_state = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    opt_state[f"{names[id(p)]}::{key}"] = torch.as_tensor(st[key]).float().contiguous()
    save_file(opt_state, str(ck / "optimizer.safetensors"))
    Path(ck, "trainer.json").write_text(json.dumps({"step": step, "phase": phase, "phase_start": phase_start,
                                                            "config": asdict(cfg), "history": history}))


def _load_checkpoint(model, opt, cfg: TrainConfig):
    ck = Path(cfg.out_dir, "checkpoint")
    meta = json.loads(Path(ck, "trainer.json").read_text())
    state = load_file(str(ck / "model.safetensors"))
    if model.config.tie_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    ostate = load_file(str(ck / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in ostate:
            opt.state[p] = {"exp_avg": ostate[f"{name}::exp_avg"], "exp_avg_sq": ostate[f"{name}::exp_avg_sq"],
                            "step": ostate[f"{name}::step"].reshape(())}
    return meta["step"], meta["history"]


@torch.no_grad()
def evaluate(model: TinyMTP, data: np.ndarray, cfg: TrainConfig, heads: int) -> list:
    """Mean per-head loss over ``eval_batches`` fixed windows of ``data``."""
    model.eval()
    rng = np.random.default_rng(1234)
    totals = np.zeros(heads)
    for _ in range(cfg.eval_batches):
        x = _batch(data, cfg.batch_size, cfg.seq_len + model.n_heads, rng, cfg.device)
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            totals += np.array(head_losses(model, x, heads, backward=False))
    model.train()
    return (totals / cfg.eval_batches).tolist()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a TinyMTP on ``cfg.data_dir``; saves the final model to ``cfg.out_dir/final``."""
    from tqdm import tqdm

    if cfg.recipe not in ("dynamo", "joint"):
        raise ValueError(f"recipe must be 'dynamo' or 'joint', got {cfg.recipe!r}")
    if not 0.0 <= cfg.distill <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {cfg.distill}")
    if cfg.distill_target not in ("soft", "argmax"):
        raise ValueError(f"distill_target must be 'soft' or 'argmax', got {cfg.distill_target!r}")
    if not 0.0 < cfg.distill_temperature < float("inf"):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {cfg.distill_temperature}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    meta = json.loads(Path(cfg.data_dir, "data.json").read_text())
    train_data = np.load(Path(cfg.data_dir, "train.npy"), mmap_mode="r")
    val_data = np.load(Path(cfg.data_dir, "val.npy"), mmap_mode="r")
    mcfg = TinyMTPConfig.from_dict({**cfg.model, "vocab_size": meta["vocab_size"]})
    init = None
    if cfg.init_from:
        init = load_model(cfg.init_from)
        clash = {k: v for k, v in {**cfg.model, "vocab_size": meta["vocab_size"]}.items()
                 if getattr(init.config, k) != v}
        if clash:
            raise ValueError(f"init_from {cfg.init_from} has {init.config}, which disagrees with {clash}")
        mcfg = init.config
    model = TinyMTP(mcfg).to(cfg.device).train()
    if init is not None:
        model.load_state_dict(init.state_dict())
    H = mcfg.n_heads
    split = cfg.pretrain_fraction if cfg.recipe == "dynamo" else 0.0  # share of the run in phase 1
    step, history, phase_start, elapsed0 = 0, [], 0, 0.0
    ck_meta = Path(cfg.out_dir, "checkpoint", "trainer.json")
    if resume and ck_meta.is_file():
        meta_ck = json.loads(ck_meta.read_text())
        phase = meta_ck.get("phase", 1)
        opt = _make_optimizer(model, cfg, phase)
        step, history = _load_checkpoint(model, opt, cfg)
        phase_start, elapsed0 = meta_ck.get("phase_start", 0), history[-1]["time"] if history else 0.0
    else:
        phase = 1 if split > 0 else 2
        opt = _make_optimizer(model, cfg, phase)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rng = np.random.default_rng(cfg.seed + step)
    width = cfg.seq_len + H
    t0, tokens_seen = time.time() - elapsed0, 0
    t_rate = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, dynamic_ncols=True)
    while _progress(step, time.time() - t0, cfg) < 1.0:
        prog = _progress(step, time.time() - t0, cfg)
        if phase == 1 and prog >= split:
            phase, phase_start = 2, step
            opt = _make_optimizer(model, cfg, phase)
        heads = 1 if phase == 1 else H
        lo, hi = (0.0, split) if phase == 1 else (split, 1.0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_scale"] * _lr_factor(step, phase_start, prog, lo, hi, cfg)
        scales = None
        if phase == 2 and cfg.recipe == "dynamo":
            scales = [1.0] + [cfg.head_to_stem_grad_scale] * (H - 1)
        x = _batch(train_data, cfg.batch_size, width, rng, cfg.device)
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            losses = head_losses(model, x, heads, scales, distill=cfg.distill, distill_target=cfg.distill_target,
                                 distill_temperature=cfg.distill_temperature,
                                 freeze_base=phase == 2 and cfg.recipe == "dynamo" and cfg.stem_lr_scale == 0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        tps = tokens_seen / max(1e-9, time.time() - t_rate)
        bar.set_postfix_str(" ".join(f"h{i + 1}={l:.3f}" for i, l in enumerate(losses)) + f" tok/s={tps:,.0f}")
        bar.update(1)
        record = {"step": step, "phase": phase, "train": losses, "tok_s": tps, "time": time.time() - t0,
                  "lr": opt.param_groups[0]["lr"]}
        last = _progress(step, time.time() - t0, cfg) >= 1.0
        if step % cfg.eval_every == 0 or last:
            record["val"] = evaluate(model, val_data, cfg, heads)
            bar.write(f"step {step} phase {phase} val " + " ".join(f"h{i + 1}={l:.3f}" for i, l in enumerate(record["val"])))
            # the best model so far by the mean val loss of all heads: OUT_DIR/best (a long run may overfit)
            earlier = [float(np.mean(r["val"])) for r in history if len(r.get("val", ())) == H]
            if heads == H and float(np.mean(record["val"])) < min(earlier, default=float("inf")):
                save_model(model, str(Path(cfg.out_dir, "best")))
                record["best"] = True
        history.append(record)
        if step % cfg.checkpoint_every == 0 or last:
            _save_checkpoint(model, opt, step, cfg, history, phase, phase_start)
    bar.close()
    save_model(model, str(Path(cfg.out_dir, "final")))
    summary = {"steps": step, "tokens": step * cfg.batch_size * cfg.seq_len, "seconds": time.time() - t0,
               "final_val": history[-1].get("val") if history else None,
               "best": next(({"step": r["step"], "val": r["val"]} for r in reversed(history) if r.get("best")), None),
               "config": asdict(cfg)}
    Path(cfg.out_dir, "summary.json").write_text(json.dumps(summary, indent=2))
    return {"model": model, "history": history, **summary}
