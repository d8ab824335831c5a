"""TinyMTP: the reference multi-token-prediction model (used by decoding, training and tests).

A Pythia/GPT-NeoX-like decoder (rotary positions, pre-LN, parallel-free residual blocks) with
the DynaMo head layout:

    tokens -> embed -> stem (layers 1..L-1) -> h_stem
    head 1      = layer L          on h_stem -> norm_1 -> shared unembedding
    head h >= 2 = one extra layer  on h_stem -> norm_h -> shared unembedding

Every attention layer (stem, head 1, heads 2..H) owns a slice of one preallocated KV cache that
is addressed by position (gpt-fast style): a row's tokens at positions p are written to slot p,
and a query at position q attends to slots 0..q of its row. Rolling back rejected tokens is free:
the decoder lowers the row's length, stale slots are overwritten by the next feed and are never
read before that because slots > q are masked.

Protocol shared by every model in ``dynamo_sampling.models``::

    forward(input_ids [B, T], positions [B, T], cache, heads=H) -> logits [B, T, heads, V]

``positions < 0`` marks padding: those tokens are neither written to the cache nor attended to,
and their logits are garbage. ``heads=1`` runs head 1 only (the autoregressive baseline must not
pay for heads it does not use); a cache filled with ``heads=1`` holds no keys for heads 2..H.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyMTPConfig:
    vocab_size: int = 8192
    n_layer: int = 6  # L: the stem is layers 1..L-1, head 1 is layer L
    n_heads: int = 3  # H: number of prediction heads (DynaMo's "T3")
    d_model: int = 256
    n_attn_heads: int = 8
    d_ff: int = 1024
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the shared unembedding is the embedding matrix: saves V*d params

    def __post_init__(self):
        if self.n_layer < 2:
            raise ValueError(f"n_layer must be >= 2 (stem + head 1), got {self.n_layer}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.d_model % self.n_attn_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_attn_heads ({self.n_attn_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_attn_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyMTPConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TinyMTPConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


class KVCache:
    """Preallocated, position-addressed keys and values for ``n_attn_layers`` attention layers.

    Shapes: ``k``/``v`` are ``(n_attn_layers, B, n_attn_heads, max_len, head_dim)``. Slot ``p`` of
    row ``b`` holds the token at position ``p``. ``lengths`` (B,) int64 is bookkeeping for the
    decoder (how many positions of each row are valid); the model itself only reads positions.
    """

    def __init__(self, n_attn_layers, batch_size, n_attn_heads, max_len, head_dim, dtype, device):
        shape = (n_attn_layers, batch_size, n_attn_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos/sin for rotary embeddings. positions (B, T) int64 -> two (B, 1, T, head_dim/2) float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.clamp(min=0).to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); rotate the two halves (GPT-NeoX convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    """Pre-LN decoder layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: TinyMTPConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x, rope, positions, cache: Optional[KVCache], layer: int):
        # x (B, T, d); positions (B, T) with -1 for padding
        B, T, _ = x.shape
        nh, hd = self.cfg.n_attn_heads, self.cfg.head_dim
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        valid = positions >= 0  # (B, T)
        if cache is None:
            keys, values, key_pos = k, v, torch.where(valid, positions, torch.iinfo(torch.long).max)  # (B, T)
        else:
            # write real tokens to their slot; padding goes nowhere
            n_slots = int(positions.max().item()) + 1 if valid.any() else 1
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            p_idx = positions[b_idx, t_idx]
            ck, cv = cache.k[layer], cache.v[layer]  # (B, nh, max_len, hd)
            ck[b_idx, :, p_idx] = k[b_idx, :, t_idx].to(ck.dtype)
            cv[b_idx, :, p_idx] = v[b_idx, :, t_idx].to(cv.dtype)
            keys, values = ck[:, :, :n_slots].to(q.dtype), cv[:, :, :n_slots].to(q.dtype)
            key_pos = torch.arange(n_slots, device=x.device).expand(B, n_slots)
        # query at position p sees keys at positions <= p; a padding query sees only itself-free slot 0
        q_pos = torch.where(valid, positions, 0)
        mask = key_pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, T, S)
        if cache is None:
            mask = mask | ~valid[:, None, :, None]  # padding queries: attend anything (output discarded)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, T, hd)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyMTP(nn.Module):
    """Reference MTP model. See the module docstring for the layout and the protocol."""

    def __init__(self, cfg: TinyMTPConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stem = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer - 1)])
        # head_layers[0] is layer L (head 1); head_layers[h-1] is head h's extra layer
        self.head_layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_heads)])
        self.head_norms = nn.ModuleList([nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_heads)])
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        """Preallocate a cache for ``batch_size`` rows and ``max_len`` positions (default: the context)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's context {self.config.max_seq_len}")
        p = self.embed.weight
        n_attn_layers = len(self.stem) + len(self.head_layers)
        return KVCache(n_attn_layers, batch_size, self.config.n_attn_heads, max_len, self.config.head_dim,
                       dtype or p.dtype, device or p.device)

    def stem_forward(self, input_ids, positions, cache=None):
        """input_ids, positions (B, T) -> (h_stem (B, T, d), rope). Shared by forward and training."""
        if positions.numel() and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context {self.config.max_seq_len}")
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_base)
        x = self.embed(input_ids)
        for i, block in enumerate(self.stem):
            x = block(x, rope, positions, cache, i)
        return x, rope

    def head_hidden(self, h_stem, rope, positions, head: int, cache=None):
        """Head ``head`` (0-based) on the stem output: (B, T, d) -> normed hidden (B, T, d)."""
        x = self.head_layers[head](h_stem, rope, positions, cache, len(self.stem) + head)
        return self.head_norms[head](x)

    def forward(self, input_ids, positions, cache: Optional[KVCache] = None, heads: Optional[int] = None,
                logits_index: Optional[torch.Tensor] = None):
        """Run the model.

        Parameters
        ----------
        input_ids : LongTensor, shape (B, T)
        positions : LongTensor, shape (B, T); position of each token in its row, -1 for padding.
        cache : KVCache or None. None runs a full causal forward over these tokens only.
        heads : int, 1..H (default H): compute heads 1..heads.
        logits_index : LongTensor (B, T') or None: compute logits only at these indices into T
            (e.g. each row's last real token), to skip the unembedding elsewhere.

        Returns
        -------
        logits : float32 tensor, shape (B, T or T', heads, V)
        """
        heads = self.config.n_heads if heads is None else heads
        if not 1 <= heads <= self.config.n_heads:
            raise ValueError(f"heads must be in 1..{self.config.n_heads}, got {heads}")
        h_stem, rope = self.stem_forward(input_ids, positions, cache)
        hiddens = []
        for h in range(heads):
            hidden = self.head_hidden(h_stem, rope, positions, h, cache)  # (B, T, d)
            if logits_index is not None:
                hidden = hidden.gather(1, logits_index[..., None].expand(-1, -1, hidden.shape[-1]))
            hiddens.append(hidden)
        # one matmul for all heads: the (V, d) unembedding is read once, not once per head
        return self.unembed(torch.stack(hiddens, dim=2)).float()  # (B, T, heads, V)
