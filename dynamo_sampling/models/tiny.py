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
    forward(..., output_hidden=True) -> hidden [B, T, heads, d];  head_logits(hidden [..., d]) -> [..., V]

``positions < 0`` marks padding: those tokens are neither written to the cache nor attended to,
and their logits are garbage. ``heads=1`` runs head 1 only (the autoregressive baseline must not
pay for heads it does not use); a cache filled with ``heads=1`` holds no keys for heads 2..H.
``output_hidden`` + ``head_logits`` let the decoder unembed only the rows it uses (the unembedding
is the largest matmul of a small model).

Two implementations of the forward (README.md, "What a step costs"): the per-layer :class:`Block`
modules (the reference, and what training differentiates through) and, for inference, the
grouped path: per forward one :class:`FeedPlan` (rotary tables, mask, cache slots) shared by every
layer; heads 1..H, which all read the stem output, run as one :func:`grouped_block` on stacked
weights with the LayerNorm affines folded in; no host sync on an accelerator. Tests compare the two.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import FeedPlan, KVCache, TreeFeed, as_dtype, check_positions


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


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """Rotary frequencies (head_dim/2,) float32, made once per shape and device (5 ops per forward saved)."""
    with torch.inference_mode(False):  # a normal tensor, whichever mode first asks for it
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float):
    """cos/sin for rotary embeddings. positions (B, T) int64 -> two (B, 1, T, head_dim/2) float32."""
    inv_freq = _inv_freq(head_dim, float(base), positions.device)
    angles = positions.clamp(min=0).to(torch.float32)[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hd); cos/sin broadcast to (..., T, hd/2); rotate the two halves (GPT-NeoX convention)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_whole(cos: torch.Tensor, sin: torch.Tensor):
    """The tables of :func:`rotary_tables` laid out over the whole head (..., hd), sin signed for
    :func:`apply_rotary_whole`: ``(cat(cos, cos), cat(-sin, sin))``."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rotary_whole(x: torch.Tensor, cos_whole: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` in 6 ops instead of 10 (the fast path rotates q and k of a group in one
    call): the two halves swapped are one ``roll``, and ``x1 cos + x2 (-sin)`` equals ``x1 cos - x2
    sin`` bit for bit in IEEE arithmetic, so the result is identical."""
    xf = x.float()
    return (xf * cos_whole + xf.roll(x.shape[-1] // 2, dims=-1) * sin_signed).to(x.dtype)


class Block(nn.Module):
    """Pre-LN decoder layer: x + attn(ln1(x)); x + mlp(ln2(x)). Its ``forward`` is the per-layer
    reference (and the training path); inference runs :func:`grouped_block` on stacked weights."""

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
            ck, cv = cache.k[layer], cache.v[layer]  # (B, nh, max_len + 1, hd)
            ck[b_idx, :, p_idx] = k[b_idx, :, t_idx].to(ck.dtype)
            cv[b_idx, :, p_idx] = v[b_idx, :, t_idx].to(cv.dtype)
            keys, values = ck[:, :, :n_slots].to(q.dtype), cv[:, :, :n_slots].to(q.dtype)
            key_pos = torch.arange(n_slots, device=x.device).expand(B, n_slots)
        # a real query at position p sees the keys at positions <= p (padding keys never: their key_pos
        # is int64 max without a cache, and with one they are never written). A padding query is
        # given position 0 only so that its mask row is not empty (an all-False row can give NaN,
        # depending on the torch version and backend): with a cache it sees slot 0 alone; its output
        # is garbage and discarded.
        q_pos = torch.where(valid, positions, 0)
        mask = key_pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, T, S)
        if cache is None:
            mask = mask | ~valid[:, None, :, None]  # padding queries: attend anything (output discarded)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, T, hd)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def pack_linear(weight: torch.Tensor):
    """``weight`` (out, in) prepacked for oneDNN, or None where that does not pay or is not there.

    On a CPU, a bf16 ``F.linear`` reorders its weight into oneDNN's blocked layout on every call;
    for the small matrices of a decode step that reorder is a large part of the call. Packing once
    makes the layers' matmuls 1.3-1.5x and the unembedding 2.0-2.2x faster at 1-8 rows (~1.1x at
    128) with bit-identical results (``benchmarks/bench_cpu_ops.py``, 2-core AMD EPYC VM with
    avx512_bf16, torch 2.13). fp32 runs MKL and accelerators their own libraries: both get None."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size=1)
        probe = ((torch.arange(2 * weight.shape[1]) % 7 - 3) / 4).to(weight.dtype).view(2, -1)  # not all zeros
        if not torch.equal(linear(probe, weight, None, packed), F.linear(probe, weight)):
            return None
        return packed
    except (RuntimeError, AttributeError):  # a torch built without these private oneDNN ops
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], packed=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the prepacked weight when there is one (:func:`pack_linear`)."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass
class Packed:
    """A group's weights prepacked for oneDNN (:func:`pack_linear`): qkv of the whole group, and per
    layer the weight (out, in) and bias (out,) of proj, fc1 and fc2 with their packs."""

    qkv: object
    layers: list  # per layer: ((w, b, packed) for proj, fc1, fc2)

    @classmethod
    def of(cls, w: "GroupWeights") -> Optional["Packed"]:
        qkv = pack_linear(w.qkv_w)
        if qkv is None:
            return None
        layers = []
        for i in range(w.proj_w.shape[0]):
            stages = []
            for wt, b in ((w.proj_w, w.proj_b), (w.fc1_w, w.fc1_b), (w.fc2_w, w.fc2_b)):
                weight = wt[i].t().contiguous()  # (out, in)
                stages.append((weight, b[i, 0].contiguous(), pack_linear(weight)))
            layers.append(stages)
        return cls(qkv, layers)


def _stage(x: torch.Tensor, w_io: torch.Tensor, b: torch.Tensor, packed: Optional[Packed], stage: int) -> torch.Tensor:
    """One per-layer linear of a group: x (g, N, in) -> (g, N, out); baddbmm on the stacked (g, in,
    out) weights, or one prepacked matmul per layer."""
    if packed is None:
        return torch.baddbmm(b, x, w_io)
    if len(packed.layers) == 1:  # (1, N, in) as it is: no per-layer select and stack
        return linear(x, *packed.layers[0][stage][:2], packed.layers[0][stage][2])
    return torch.stack([linear(x[i], *layer[stage][:2], layer[stage][2]) for i, layer in enumerate(packed.layers)])


@dataclass
class GroupWeights:
    """Inference weights of g decoder layers that read the same input, stacked on a leading axis.

    The LayerNorm affines are folded into the next linear layer (``W ln(x) * gamma + beta`` =
    ``(W * gamma) ln(x) + (W beta + b)``), so the norms are plain normalisations. All g layers' qkv
    projections are one matmul, since they read the same input.
    """

    qkv_w: torch.Tensor  # (g * 3d, d)
    qkv_b: torch.Tensor  # (g * 3d,)
    proj_w: torch.Tensor  # (g, d, d), laid out (in, out) for bmm
    proj_b: torch.Tensor  # (g, 1, d)
    fc1_w: torch.Tensor  # (g, d, d_ff)
    fc1_b: torch.Tensor  # (g, 1, d_ff)
    fc2_w: torch.Tensor  # (g, d_ff, d)
    fc2_b: torch.Tensor  # (g, 1, d)
    packed: Optional[Packed] = None  # the same weights prepacked (CPU bf16), see :meth:`pack`

    @classmethod
    def stack(cls, blocks) -> "GroupWeights":
        def fold(lin: nn.Linear, ln: nn.LayerNorm):
            w, b = lin.weight.float(), lin.bias.float()
            return w * ln.weight.float()[None, :], b + w @ ln.bias.float()

        dtype = blocks[0].qkv.weight.dtype
        qkv = [fold(b.qkv, b.ln1) for b in blocks]
        fc1 = [fold(b.fc1, b.ln2) for b in blocks]
        cast = lambda ts: torch.stack(ts).to(dtype).contiguous()  # noqa: E731
        return cls(qkv_w=torch.cat([w for w, _ in qkv]).to(dtype).contiguous(),
                   qkv_b=torch.cat([b for _, b in qkv]).to(dtype).contiguous(),
                   proj_w=cast([b.proj.weight.float().t() for b in blocks]),
                   proj_b=cast([b.proj.bias.float()[None] for b in blocks]),
                   fc1_w=cast([w.t() for w, _ in fc1]), fc1_b=cast([b[None] for _, b in fc1]),
                   fc2_w=cast([b.fc2.weight.float().t() for b in blocks]),
                   fc2_b=cast([b.fc2.bias.float()[None] for b in blocks]))

    def layers(self, a: int, b: int) -> "GroupWeights":
        """Layers a..b-1 of the group (views, no copy; not packed)."""
        d3 = self.qkv_w.shape[0] // self.proj_w.shape[0]
        return GroupWeights(self.qkv_w[a * d3:b * d3], self.qkv_b[a * d3:b * d3], self.proj_w[a:b], self.proj_b[a:b],
                            self.fc1_w[a:b], self.fc1_b[a:b], self.fc2_w[a:b], self.fc2_b[a:b])

    def pack(self) -> "GroupWeights":
        """The same weights, prepacked where that pays (:func:`pack_linear`; else unchanged)."""
        self.packed = Packed.of(self)
        return self


def grouped_block(x: torch.Tensor, w: GroupWeights, plan: FeedPlan, cache: Optional[KVCache], first_layer: int,
                  cfg: TinyMTPConfig, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """g decoder layers on one shared input, as one op per stage. x (B, T, d) -> (g, B, T, d).

    Layer i of the group uses cache layer ``first_layer + i``; the g layers are folded into the batch
    for attention (the cache slices of consecutive layers are one contiguous ``(g*B, ...)`` view).

    ``rows`` (B, T') int64 or None: indices into T where the output is read. Where no later layer
    reads a group's output (the heads), every fed token still writes its key and value, but the
    queries, attention, projection and MLP run at those rows only: -> (g, B, T', d). A prefill of
    S tokens then costs the heads S keys and values and one query per row, not S full layers."""
    B, T, d = x.shape
    g = w.proj_w.shape[0]
    nh, hd = cfg.n_attn_heads, cfg.head_dim
    xn = F.layer_norm(x, (d,), eps=cfg.norm_eps)
    qkv = linear(xn, w.qkv_w, w.qkv_b, w.packed and w.packed.qkv)
    qkv = qkv.view(B, T, g, 3, nh, hd).permute(3, 2, 0, 4, 1, 5)  # (3, g, B, nh, T, hd)
    cos, sin = plan.rope  # whole-head tables (B, 1, T, hd) broadcast over (g, B, nh, T, hd)
    dt = qkv.dtype if cache is None else cache.dtype  # attention runs in the cache's dtype (TinyMTP.new_cache)
    v = as_dtype(qkv[2], dt).reshape(g * B, nh, T, hd)
    mask = plan.grouped_mask(g)
    if rows is None:  # q and k in one rotation
        q, k = as_dtype(apply_rotary_whole(qkv[:2], cos, sin), dt)
        k = k.reshape(g * B, nh, T, hd)
    else:  # the queries at the rows read: rotate only those
        k = as_dtype(apply_rotary_whole(qkv[1], cos, sin), dt).reshape(g * B, nh, T, hd)
        T = rows.shape[1]
        pick = rows[None, :, None, :, None]  # (1, B, 1, T', 1)
        at = pick[0].expand(B, 1, T, hd)
        q = as_dtype(apply_rotary_whole(qkv[0].gather(3, pick.expand(g, B, nh, T, hd)), cos.gather(2, at),
                                        sin.gather(2, at)), dt)
        x = x.gather(1, rows[:, :, None].expand(B, T, d))
        mask = plan.rows_mask(rows, g)
    q = q.reshape(g * B, nh, T, hd)
    keys, values = (k, v) if cache is None else plan.write(*cache.group(first_layer, g), k, v)
    attn = as_dtype(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), x.dtype)  # (g*B, nh, T, hd)
    attn = attn.view(g, B, nh, T, hd).permute(0, 1, 3, 2, 4).reshape(g, B * T, d)
    h = x.reshape(1, B * T, d) + _stage(attn, w.proj_w, w.proj_b, w.packed, 0)  # (g, B*T, d)
    ff = F.gelu(_stage(F.layer_norm(h, (d,), eps=cfg.norm_eps), w.fc1_w, w.fc1_b, w.packed, 1))
    return (h + _stage(ff, w.fc2_w, w.fc2_b, w.packed, 2)).view(g, B, T, d)


class TinyMTP(nn.Module):
    """Reference MTP model. See the module docstring for the layout and the protocol."""

    #: the inference forward takes ``tree=`` (:class:`~dynamo_sampling.models.cache.TreeFeed`)
    supports_tree = True
    #: inference forwards have no host sync and, at a fixed feed width, fixed shapes: the decoding
    #: loop may replay them from a CUDA graph (``sample(..., cuda_graph=True)``)
    supports_cuda_graph = True

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
        self._inference = None  # (key, stem GroupWeights list, {(a, b): heads a..b-1 GroupWeights}, head norm w, b)
        self._unembed_packed = None  # (key of the unembedding weight, its pack_linear, its fp32 transpose)
        self._param_list = None  # parameters, listed once (replaced Parameter objects: reset it to None)

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
        """Preallocate a cache for ``batch_size`` rows and ``max_len`` positions (default: the context).

        ``dtype`` (default: the weights', but float32 for a bf16 model on a CPU) is also the dtype the
        fast path computes attention in: on a CPU, bf16 attention at decode shapes measured ~3-3.5x
        slower than float32 (1 query over 140 keys, 8 heads of 32; ``benchmarks/bench_cpu_ops.py``,
        torch 2.13, 2-core AMD EPYC VM), while float32 keys of a model this small cost little memory."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's context {self.config.max_seq_len}")
        p = self.embed.weight
        if dtype is None and p.dtype == torch.bfloat16 and p.device.type == "cpu" and (device is None or
                                                                                  torch.device(device).type == "cpu"):
            dtype = torch.float32
        n_attn_layers = len(self.stem) + len(self.head_layers)
        return KVCache(n_attn_layers, batch_size, self.config.n_attn_heads, max_len, self.config.head_dim,
                       dtype or p.dtype, device or p.device)

    # ------------------------------------------------------------ reference path (training, tests)

    def stem_forward(self, input_ids, positions, cache=None):
        """input_ids, positions (B, T) -> (h_stem (B, T, d), rope). Shared by forward and training."""
        self._check_positions(positions)
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_base)
        x = self.embed(input_ids)
        for i, block in enumerate(self.stem):
            x = block(x, rope, positions, cache, i)
        return x, rope

    def head_hidden(self, h_stem, rope, positions, head: int, cache=None):
        """Head ``head`` (0-based) on the stem output: (B, T, d) -> normed hidden (B, T, d)."""
        x = self.head_layers[head](h_stem, rope, positions, cache, len(self.stem) + head)
        return self.head_norms[head](x)

    def _reference_hidden(self, input_ids, positions, cache, heads):
        h_stem, rope = self.stem_forward(input_ids, positions, cache)
        hidden = torch.stack([self.head_hidden(h_stem, rope, positions, h, cache) for h in range(heads)], dim=2)
        return hidden, h_stem

    # ------------------------------------------------------------ fast path (inference)

    def _check_positions(self, positions):
        check_positions(positions, self.config.max_seq_len, "the model's context")

    def inference_weights(self):
        """Stacked, norm-folded weights for :func:`grouped_block`, rebuilt when any parameter changes
        (in place, by ``load_state_dict``, an optimiser step, or ``.to()``)."""
        if getattr(self, "_param_list", None) is None:  # walking the modules each forward costs ~0.4 ms
            self._param_list = list(self.parameters())
        first = self._param_list[0]  # .to() moves or casts every parameter together
        key = (first.data_ptr(), first.dtype, tuple([p._version for p in self._param_list]))
        if self._inference is None or self._inference[0] != key:
            with torch.no_grad():
                stem = [GroupWeights.stack([b]).pack() for b in self.stem]
                heads = GroupWeights.stack(list(self.head_layers))
                norm_w = torch.stack([n.weight for n in self.head_norms])[:, None, None, :]  # (H, 1, 1, d)
                norm_b = torch.stack([n.bias for n in self.head_norms])[:, None, None, :]
                # the head ranges a forward runs (1..h, and 2..H for extra_heads), packed where that pays
                groups = {(a, b): heads.layers(a, b).pack() for a in (0, 1) for b in range(a + 1, self.n_heads + 1)}
            self._inference = (key, stem, groups, norm_w, norm_b)
        return self._inference[1:]

    def _plan(self, positions, cache, tree=None) -> FeedPlan:
        plan = FeedPlan(positions, cache, tree)
        plan.rope = rotary_whole(*rotary_tables(plan.position_ids, self.config.head_dim, self.config.rope_base))
        return plan

    def _fast_hidden(self, input_ids, positions, cache, heads, rows=None, tree=None):
        self._check_positions(positions)
        cfg = self.config
        weights = self.inference_weights()
        plan = self._plan(positions, cache, tree)
        x = self.embed(input_ids)
        for i, w in enumerate(weights[0]):
            x = grouped_block(x, w, plan, cache, i, cfg)[0]
        return self._fast_heads(x, plan, cache, 0, heads, weights, rows), x

    def _fast_heads(self, h_stem, plan, cache, a: int, b: int, weights=None, rows=None):
        """Heads a+1..b (0-based a..b-1) as one grouped block on the stem output -> (B, T, b-a, d),
        or (B, T', b-a, d) at ``rows`` (B, T') only (:func:`grouped_block`)."""
        cfg = self.config
        stem, groups, norm_w, norm_b = weights or self.inference_weights()
        hs = grouped_block(h_stem, groups[a, b], plan, cache, len(stem) + a, cfg, rows)  # (b-a, B, T, d)
        hs = F.layer_norm(hs, (cfg.d_model,), eps=cfg.norm_eps) * norm_w[a:b] + norm_b[a:b]
        return hs.permute(1, 2, 0, 3)

    def extra_heads(self, h_stem: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                    reference: bool = False, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Heads 2..H on stem outputs saved from earlier ``heads=1`` forwards (``output_stem=True``):
        writes their cache slots at ``positions`` and returns their normed hidden (B, T, H-1, d), or
        (B, T', H-1, d) at ``rows`` (B, T') (indices into T) only, where only those are read.

        This lets a decoder run head 1 alone while heads 2..H are not needed and bring them up to
        date in one call when they are (their keys at the skipped positions are computed then)."""
        H = self.config.n_heads
        if reference or torch.is_grad_enabled():
            rope = rotary_tables(positions, self.config.head_dim, self.config.rope_base)
            out = torch.stack([self.head_hidden(h_stem, rope, positions, h, cache) for h in range(1, H)], dim=2)
            return out if rows is None else out.gather(1, rows[:, :, None, None].expand(-1, -1, *out.shape[2:]))
        self._check_positions(positions)
        return self._fast_heads(h_stem, self._plan(positions, cache), cache, 1, H, rows=rows)

    # ------------------------------------------------------------ checkpoints

    def save_pretrained(self, path, dtype=torch.bfloat16) -> None:
        """Write this model to directory ``path`` (``model.safetensors`` in ``dtype`` + ``config.json``);
        :meth:`from_pretrained` reads it back. See :func:`save_model`."""
        save_model(self, path, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "TinyMTP":
        """The TinyMTP saved in directory ``path`` by :meth:`save_pretrained`, on ``device`` in ``dtype``,
        in eval mode; errors name the file and what was expected. See :func:`load_model`."""
        return load_model(path, device=device, dtype=dtype)

    # ------------------------------------------------------------ the protocol

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared unembedding: normed hidden (..., d) -> float32 logits (..., V)."""
        w = self.unembed.weight
        if torch.is_grad_enabled():
            return F.linear(hidden, w).float()
        key = (w.data_ptr(), w.dtype, w._version)
        if self._unembed_packed is None or self._unembed_packed[0] != key:  # (re)packed when the weight changed
            packed = pack_linear(w)
            # fp32 on a CPU: x @ W^T through a transposed copy, ~3x faster at 1-3 rows and 1.3x at 8 with
            # MKL on the 2-core AMD EPYC VM (benchmarks/bench_cpu_ops.py)
            wt = w.detach().t().contiguous() if packed is None and w.device.type == "cpu" and w.dtype == torch.float32 \
                else None
            self._unembed_packed = (key, packed, wt)
        _, packed, wt = self._unembed_packed
        if wt is not None:
            return torch.matmul(hidden, wt)
        return linear(hidden, w, None, packed).float()

    def forward(self, input_ids, positions, cache: Optional[KVCache] = None, heads: Optional[int] = None,
                logits_index: Optional[torch.Tensor] = None, output_hidden: bool = False, reference: bool = False,
                output_stem: bool = False, tree: Optional[TreeFeed] = None):
        """Run the model.

        Parameters
        ----------
        input_ids : LongTensor, shape (B, T)
        positions : LongTensor, shape (B, T); position of each token in its row, -1 for padding.
        cache : KVCache or None. None runs a full causal forward over these tokens only.
        heads : int, 1..H (default H): compute heads 1..heads.
        logits_index : LongTensor (B, T') or None: compute outputs only at these indices into T
            (e.g. each row's last real token): the fast path runs the heads' layers there only (every
            fed token still writes its keys and values) and skips the unembedding elsewhere.
        output_hidden : return the heads' normed hidden states (B, T or T', heads, d) in the model's
            dtype instead of logits; :meth:`head_logits` unembeds the rows a caller needs.
        reference : run the per-layer reference path (the one training differentiates through);
            by default inference (no autograd) runs the grouped fast path.
        output_stem : also return the stem output (B, T, d) at every fed position, for
            :meth:`extra_heads` later.
        tree : :class:`~dynamo_sampling.models.cache.TreeFeed` or None: the fed tokens branch (several
            drafts verified in one forward); each writes its own slot and reads its ancestors only.
            Fast path only (inference).

        Returns
        -------
        logits : float32 tensor, shape (B, T or T', heads, V) (or the hidden states, see above)
        """
        heads = self.config.n_heads if heads is None else heads
        if not 1 <= heads <= self.config.n_heads:
            raise ValueError(f"heads must be in 1..{self.config.n_heads}, got {heads}")
        if reference or torch.is_grad_enabled():
            if tree is not None:
                raise ValueError("a tree feed runs on the inference fast path only; expected reference=False "
                                 "under torch.no_grad() or torch.inference_mode()")
            hidden, h_stem = self._reference_hidden(input_ids, positions, cache, heads)
            if logits_index is not None:
                hidden = hidden.gather(1, logits_index[:, :, None, None].expand(-1, -1, *hidden.shape[2:]))
        else:  # (B, T or T', heads, d), (B, T, d)
            hidden, h_stem = self._fast_hidden(input_ids, positions, cache, heads, logits_index, tree)
        out = hidden if output_hidden else self.head_logits(hidden)
        return (out, h_stem) if output_stem else out


# ----------------------------------------------------------------------------
# Checkpoint I/O: ``model.safetensors`` + ``config.json`` in one directory (used by
# ``pretrained.load_pretrained``, the evals, and training, which re-exports these as
# ``train.trainer.save_model`` / ``load_model``). Defined here, after the class, and attached
# to it as ``TinyMTP.save_pretrained`` / ``TinyMTP.from_pretrained``.
# ----------------------------------------------------------------------------
def save_model(model: TinyMTP, path, dtype=torch.bfloat16) -> None:
    """model.safetensors + config.json into directory ``path`` (weights cast to ``dtype``).

    With tied embeddings the shared matrix is stored once, as ``embed.weight``.
    """
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "unembed.weight"
             or not model.config.tie_embeddings}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "dynamo_sampling.TinyMTP"})
    Path(path, "config.json").write_text(model.config.to_json())


def _config_from_json(cfg_path) -> TinyMTPConfig:
    """The :class:`TinyMTPConfig` of a ``config.json`` written by :func:`save_model`, checked field by field."""
    import math

    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"model config {cfg_path} is corrupted: expected JSON written by save_model, {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"model config {cfg_path}: expected a JSON object of TinyMTPConfig fields, "
                         f"found {type(d).__name__}")
    known = TinyMTPConfig.__dataclass_fields__  # absent fields take their defaults
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"model config {cfg_path}: expected a subset of the TinyMTPConfig fields {sorted(known)}, "
                         f"found unknown fields {unknown}")
    for name, value in d.items():
        default = known[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:  # float fields (rope_base, norm_eps)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf
        if not ok:
            expected = {bool: "true or false", int: "an integer >= 1"}.get(type(default), "a finite number > 0")
            raise ValueError(f"model config {cfg_path}: expected {name} to be {expected}, found {value!r}")
    try:
        return TinyMTPConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"model config {cfg_path}: {e}") from None


def load_model(path, device="cpu", dtype=torch.float32) -> TinyMTP:
    """Inverse of :func:`save_model`: the TinyMTP of directory ``path``, in eval mode.

    Raises ``FileNotFoundError`` naming a missing ``config.json`` / ``model.safetensors``, and
    ``ValueError`` naming the file and what was expected for a corrupted or inconsistent one (not
    JSON, unknown or badly typed config fields, not safetensors, missing, unexpected, misshapen or
    non-float tensors).
    """
    from pathlib import Path

    from safetensors.torch import load_file

    cfg_path, w_path = Path(path, "config.json"), Path(path, "model.safetensors")
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise FileNotFoundError(f"model file {f} is missing; expected config.json and model.safetensors in {path}")
    cfg = _config_from_json(cfg_path)
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"model weights {w_path} are corrupted or not safetensors: {e}") from e
    model = TinyMTP(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del expected["unembed.weight"]  # save_model stores the shared matrix once, as embed.weight
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"model weights {w_path}: expected the tensors of the model in {cfg_path}, found "
                         f"{len(missing)} missing {missing[:5]} and {len(unexpected)} unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        t = state[name]
        if t.shape != shape or not t.is_floating_point():
            raise ValueError(f"model weights {w_path}: expected {name} to be a float tensor of shape "
                             f"{tuple(shape)} (from {cfg_path}), found {t.dtype} of shape {tuple(t.shape)}")
    if cfg.tie_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()
