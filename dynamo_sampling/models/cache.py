"""The position-addressed KV cache and the once-per-forward feed plan, shared by every model here
(:class:`~dynamo_sampling.models.tiny.TinyMTP` and :class:`~dynamo_sampling.models.hf.HFMTP`, and so the
Meta and Medusa loaders built on them).

Decoding feeds each row a few tokens per step at known positions, some rows padded, and may roll a
row back (a rejected draft): the cache is addressed by position, never appended to. Slot ``p`` of row
``b`` holds the token at position ``p``; a padding token (position -1) writes to one spare slot that
no query ever reads, so a feed never needs to find its real tokens with a host sync, and rolling back
is only the decoder's bookkeeping (``lengths``): later feeds overwrite the slots.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_positions(positions: torch.Tensor, limit: int, what: str):
    """positions < limit, checked on the positions' device without a host sync (a RuntimeError naming
    ``what`` and ``limit``; on a CPU at once, on an accelerator when the stream reaches it)."""
    if positions.numel():
        torch._assert_async(positions.max() < limit, f"a position is beyond {what} ({limit} positions)")


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no op is dispatched where it already is (a few microseconds each on a CPU)."""
    return t if t.dtype == dtype else t.to(dtype)


class KVCache:
    """Preallocated keys and values of ``n_layers`` attention layers, addressed by position.

    ``k``/``v`` : (n_layers, B, kv_heads, max_len + 1, head_dim); slot ``max_len`` is the spare slot
    padding writes to. ``lengths`` (B,) int64 is the decoder's bookkeeping (valid positions per row);
    the models only read positions. Layers are ordered as the model runs them (stem, head 1, heads
    2..H), so consecutive layers that run as one group are one contiguous slice.

    ``static`` (default: on an accelerator): every feed attends over all ``max_len`` slots, so a step's
    shapes never depend on data and no feed reads a value on the host; off (the CPU default), a feed
    reads only slots up to its highest position, which is cheaper and needs no device sync there.
    """

    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (n_layers, batch_size, kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.static = self.k.device.type != "cpu"
        self._groups = {}  # (first, g) -> (k, v, their views): group() is called per layer group per forward

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def select_rows(self, rows: torch.Tensor):
        """Keep only the batch rows ``rows`` (LongTensor, in the new order), e.g. when finished rows leave
        a batch; the keys and values are copied once."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self._groups = {}

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy every layer's keys and values at slots ``src`` (B, K) to slots ``dst`` (B, K) of the same
        row (a kept draft branch to its positions' slots, :class:`TreeFeed`; src == dst: nothing moves)."""
        n, B, h, _, hd = self.k.shape
        K = src.shape[1]
        at = lambda i: i[None, :, None, :, None].expand(n, B, h, K, hd)  # noqa: E731
        for t in (self.k, self.v):
            t.scatter_(3, at(dst), t.gather(3, at(src)))

    def group(self, first: int, g: int):
        """Layers ``first..first+g-1`` as one batch: keys and values views (g*B, kv_heads, max_len + 1, head_dim)
        (made once per group while ``k`` and ``v`` are the same tensors)."""
        hit = self._groups.get((first, g))
        if hit is None or hit[0] is not self.k or hit[1] is not self.v:
            _, B, h, S1, hd = self.k.shape
            hit = (self.k, self.v, (self.k[first:first + g].view(g * B, h, S1, hd),
                                    self.v[first:first + g].view(g * B, h, S1, hd)))
            self._groups[first, g] = hit
        return hit[2]


class TreeFeed:
    """Draft tokens of one forward that branch: several continuations of a row's committed tokens fed
    at once (a tree of drafts), each told apart by the cache slot it writes (``decoding`` moves the kept
    branch's keys and values to their positions' slots afterwards, :meth:`KVCache.move`).

    slots : (B, T) int64; the slot each fed token writes (its position where there is no branch).
    attend : (B, T, T) bool; fed token t may read fed token u (its ancestors in the tree and itself).
    A fed token also reads every slot below its row's lowest fed position (the committed tokens)."""

    def __init__(self, slots: torch.Tensor, attend: torch.Tensor):
        self.slots, self.attend = slots, attend

    def mask(self, valid: torch.Tensor, slots: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, S) bool over the slots ``slot_ids`` (S,): the committed slots, then each fed
        token's ancestors at their slots (``slots``: padding at the spare slot, beyond S)."""
        B, T = slots.shape
        S = slot_ids.shape[0]
        if B == 1 and T and S == int(slots[0, -1]) + 1 == int(slots[0, 0]) + T and bool(valid.all()):
            # one row feeding slots S - T..S - 1 (what decoding's lookup trees feed): two ops, not ten
            return torch.cat([self.attend.new_ones(1, 1, T, S - T), self.attend[:, None]], dim=3)
        base = torch.where(valid, slots, torch.iinfo(torch.long).max).min(1).values  # the root's slot
        mask = torch.zeros(B, 1, T, S + 1, dtype=torch.bool, device=slots.device)
        mask[..., :S] = (slot_ids[None, :] < base[:, None])[:, None, None, :]
        keys = torch.where(valid, slots, S)  # padding keys -> the extra column, dropped below
        mask.scatter_(3, keys[:, None, None, :].expand(B, 1, T, T), (self.attend & valid[:, None, :])[:, None])
        mask = mask[..., :S]
        return mask | ~valid[:, None, :, None] & (slot_ids == 0)  # a padding query reads slot 0 (never empty)


class FeedPlan:
    """What every attention layer of one forward shares, computed once per forward, with no host sync
    on an accelerator.

    positions : (B, T) int64 as fed, -1 for padding.
    position_ids : (B, T) int64, padding -> 0 (a padding query reads slot 0 alone, so its mask row is
        never empty, which can give NaN; its output is discarded).
    mask : (B, 1, T, S) bool, query t may read key s. With a cache the keys are slots ``0..S-1`` (a
        query at position q reads slots ``<= q``; unwritten and spare slots never); without one they
        are the fed tokens themselves, causally by position, padding keys never.
    n_slots : S. With a ``static`` cache (the accelerator default) the cache's whole ``max_len``, so a
        step's shapes never depend on data (what a CUDA graph needs); else ``max(positions) + 1``
        (on a CPU reading it is no device sync).
    slots : (B, T) int64 or None; the cache slot each fed token writes (padding -> the spare slot).
    rope : the model's rotary tables at ``position_ids`` in the layout its layers read, set by the
        model that builds the plan (TinyMTP: whole-head, sin signed; Hugging Face: the family's).
    """

    def __init__(self, positions: torch.Tensor, cache: Optional[KVCache] = None, tree: Optional["TreeFeed"] = None):
        B, T = positions.shape
        self.positions, self.cache, self.rope = positions, cache, None
        valid = positions >= 0
        self.position_ids = torch.where(valid, positions, 0)
        q_pos = self.position_ids[:, None, :, None]
        if tree is not None and cache is None:
            raise ValueError("a tree feed (TreeFeed) needs a cache: its branches are told apart by their slots")
        if cache is None:
            self.slots, self.n_slots = None, T
            key_pos = torch.where(valid, positions, torch.iinfo(torch.long).max)  # padding keys: never read
            self.mask = (key_pos[:, None, None, :] <= q_pos) | ~valid[:, None, :, None]
        else:
            if cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} rows, the input {B}")
            at = positions if tree is None else torch.where(valid, tree.slots, -1)
            check_positions(at, cache.max_len, "the cache's max_len")
            self.n_slots = cache.max_len if cache.static else max(int(at.max()) + 1, 1)
            self.slots = torch.where(valid, at, cache.max_len)
            slot_ids = torch.arange(self.n_slots, device=positions.device)
            if tree is None:
                self.mask = slot_ids[None, None, None, :] <= q_pos
            else:
                self.mask = tree.mask(valid, self.slots, slot_ids)
        self._memo = {}

    def _cached(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias (0 where allowed, the dtype's minimum elsewhere), (B, 1, T, S)."""
        def make():
            m = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            return m.masked_fill_(~self.mask, torch.finfo(dtype).min)
        return self._cached(("additive", dtype), make)

    def grouped_mask(self, g: int) -> torch.Tensor:
        """The bool mask for g layers folded into the batch: (g*B, 1, T, S)."""
        return self.mask if g == 1 else self._cached(("mask", g), lambda: self.mask.repeat(g, 1, 1, 1))

    def rows_mask(self, rows: torch.Tensor, g: int) -> torch.Tensor:
        """The mask of the queries at ``rows`` (B, T') (indices into T) only, for g layers: (g*B, 1, T', S)."""
        B, _, _, S = self.mask.shape
        m = self.mask.gather(2, rows[:, None, :, None].expand(B, 1, rows.shape[1], S))
        return m if g == 1 else m.repeat(g, 1, 1, 1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store one forward's k, v (g*B, kv_heads, T, head_dim) at their slots of the cache views
        ``keys``/``values`` (g*B, kv_heads, max_len + 1, head_dim) (g layers folded into the batch, as
        :meth:`KVCache.group` gives them); returns what attention reads: slots ``0..n_slots-1`` in
        k's dtype. ``index_put_`` (not ``scatter_``) because it has a ``vmap`` batching rule."""
        N, h = k.shape[0], k.shape[1]

        def make():
            g = N // self.slots.shape[0]
            dev = self.slots.device
            return (torch.arange(N, device=dev)[:, None, None], torch.arange(h, device=dev)[None, :, None],
                    self.slots.repeat(g, 1)[:, None, :])
        index = self._cached(("index", N, h), make)
        keys.index_put_(index, as_dtype(k, keys.dtype))
        values.index_put_(index, as_dtype(v, values.dtype))
        return as_dtype(keys[:, :, :self.n_slots], k.dtype), as_dtype(values[:, :, :self.n_slots], v.dtype)
