"""Hugging Face ``transformers`` causal LMs as MTP models (the ``hf`` extra; used by ``sample`` through the
model protocol and by ``train.hf_heads``). Importing ``dynamo_sampling`` never imports this module.

:class:`HFMTP` wraps a causal LM and adds DynaMo heads, with the layout of ``models/tiny.py``::

    tokens -> embeddings -> stem (the base's layers 1..L-1) -> h_stem
    head 1      = the base's layer L + its final norm + its LM head   (exactly the base model)
    head h >= 2 = one new decoder layer of the base's own layer class on h_stem -> own final norm -> the LM head

Supported families (``isinstance`` of the public ``transformers`` classes): ``GPTNeoXForCausalLM``
(Pythia, GPT-NeoX) and ``LlamaForCausalLM`` (Llama and checkpoints using its classes). Anything else
raises ``TypeError``. Attention must be ``"eager"`` or ``"sdpa"`` (the 4-D masks built here are additive).
Tested with transformers 5.24; needs a version whose decoder layers take ``position_embeddings`` from
the model-level ``rotary_emb`` module (4.48 or later).

The cache (:class:`~dynamo_sampling.models.cache.KVCache`, the one every model here uses) is this
library's, not a ``transformers`` ``Cache``: rows of a batch have
their own positions (ragged prompts, ragged acceptance), and ``DynamicCache``/``StaticCache`` append
or write at one ``cache_position`` shared by all rows. So every layer is run through its family's own
``forward`` (no forked model code: the family keeps its attention, GQA, partial rotary, parallel
residual) with the :class:`~dynamo_sampling.models.cache.FeedPlan` (shared with ``TinyMTP``) built once
per forward and shared by every layer, stem and heads:

* ``position_embeddings`` from the model's ``rotary_emb`` on per-row ``positions`` (padding -> 0);
* a 4-D additive mask ``(B, 1, T, S)``: query at position ``q`` sees keys at positions ``<= q`` of its
  own row (padding queries see slot 0 only, their output is garbage and discarded); with a cache ``S`` is
  the cache's ``max_len`` on an accelerator, so a step's shapes depend on ``(B, T)`` only (on a CPU the
  highest fed position + 1);
* the cache write indices, used by a duck-typed cache object whose ``update(keys, values, layer_idx, ...)``
  - the only cache method these attention modules call - writes each real token's keys/values to slot
  ``position`` of its row (padding to a spare slot nobody reads) and returns slots ``0..S-1``.

Building the plan needs no host sync on an accelerator (no ``.item()``, ``nonzero`` or data-dependent shape), so a forward
can be queued on a GPU or captured in a CUDA graph; positions beyond the cache or the context are
checked on the device (``torch._assert_async``: a ``RuntimeError`` on CPU).

Heads 2..H run as one grouped call: their parameters are stacked on a head axis and the family's own layer
runs under ``torch.func.vmap`` + ``functional_call`` (:meth:`HFMTP._grouped_hidden`). Head 1 is the base's
own layer and runs on its own. ``forward(..., output_hidden=True)`` returns the heads' normed hidden
states and :meth:`HFMTP.head_logits` unembeds only the rows a caller uses. :meth:`HFMTP._reference_forward`
keeps the plain per-head path (heads one after another, every row unembedded) that the tests and
``benchmarks/bench_hf_step.py`` compare against.

Rolling back is the decoder lowering ``cache.lengths``: stale slots are masked and overwritten. The
layer's ``forward`` receives the cache under the keyword it declares (``cache``, ``layer_past``,
``past_key_values`` or ``past_key_value``, depending on family and version).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call, vmap

from .cache import FeedPlan, KVCache, TreeFeed, check_positions

try:
    import transformers
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("dynamo_sampling.models.hf needs transformers: pip install 'dynamo_sampling[hf]'") from e

SUPPORTED_FAMILIES = ("GPTNeoXForCausalLM", "LlamaForCausalLM")
HEADS_FORMAT = "dynamo_sampling.HFMTP.heads/1"
_CACHE_KWARGS = ("cache", "layer_past", "past_key_values", "past_key_value")  # newest first
# config fields that change when the same weights are saved, loaded or run differently
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
                         "_commit_hash", "architectures", "use_cache", "output_hidden_states", "output_attentions",
                         "return_dict", "bos_token_id", "eos_token_id", "pad_token_id"}
# head_logits on CPU multiplies W (V, d) by hidden^T when it has at most this many rows (see head_logits)
_SMALL_ROWS = 6


@dataclass
class _Parts:
    """The base model's pieces this wrapper runs (all public attributes of the family's classes)."""
    embed: nn.Module
    emb_dropout: Optional[nn.Module]
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module
    kv_heads: int  # key/value heads per attention layer (GQA: fewer than query heads)
    head_dim: int  # per key/value head


def _parts(base: nn.Module) -> _Parts:
    if isinstance(base, GPTNeoXForCausalLM):
        m, c = base.gpt_neox, base.config
        return _Parts(m.embed_in, m.emb_dropout, m.layers, m.final_layer_norm, _rotary(m), base.get_output_embeddings(),
                      c.num_attention_heads, m.layers[-1].attention.head_size)
    if isinstance(base, LlamaForCausalLM):
        m, c = base.model, base.config
        return _Parts(m.embed_tokens, None, m.layers, m.norm, _rotary(m), base.get_output_embeddings(),
                      c.num_key_value_heads, m.layers[-1].self_attn.head_dim)
    raise TypeError(f"HFMTP supports {', '.join(SUPPORTED_FAMILIES)} (and subclasses); got {type(base).__name__}")


def _rotary(decoder: nn.Module) -> nn.Module:
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise TypeError(f"{type(decoder).__name__} has no model-level rotary_emb module; HFMTP needs transformers >= 4.48 "
                        f"(installed: {transformers.__version__})")
    return rotary


def _check_attention(config):
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"HFMTP needs attn_implementation 'eager' or 'sdpa' (additive 4-D masks), got {attn!r}; "
                         f"load the model with attn_implementation='sdpa'")


def config_fingerprint(config) -> str:
    """sha256 of the base model's config (``to_dict()``, keys sorted) without volatile fields
    (name, dtype, attention implementation, transformers version, token ids, ...)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class _SlotWriter:
    """Duck-types ``transformers.Cache.update`` for one forward: a layer's key_states, value_states
    (B, kv_heads, T, head_dim) go to their slots through :meth:`FeedPlan.write`, which returns the slots
    attention reads. Over the whole cache (the layer picked by ``layer_idx``) or over one layer's
    ``keys``/``values`` (B, kv_heads, max_len + 1, head_dim) as given (the vmapped heads)."""

    __slots__ = ("plan", "keys", "values")

    def __init__(self, plan: FeedPlan, keys=None, values=None):
        self.plan, self.keys, self.values = plan, keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys is None:
            keys, values = self.plan.cache.k[layer_idx], self.plan.cache.v[layer_idx]
        else:
            keys, values = self.keys, self.values
        return self.plan.write(keys, values, key_states, value_states)


def _writer(plan: FeedPlan, keys=None, values=None) -> Optional[_SlotWriter]:
    """The cache object a layer receives (None without a cache)."""
    return None if plan.cache is None else _SlotWriter(plan, keys, values)


class HFMTP(nn.Module):
    """A ``transformers`` causal LM with DynaMo heads 2..H, behind the library's MTP protocol.

    Parameters
    ----------
    base_model : ``GPTNeoXForCausalLM`` or ``LlamaForCausalLM`` (any size; eager or sdpa attention).
        Not copied: head 1 is the base itself, and training the base (``train_heads(train_base=True)``)
        changes it.
    n_heads : int >= 1; H, the number of prediction heads (head 1 included).
    generator : torch.Generator (CPU) for the new heads' random initialisation (None: torch's global RNG).

    Layout: ``head_layers[0]``/``head_norms[0]`` ARE the base's last layer and final norm (the same
    modules, registered twice, so ``state_dict()`` lists them under both names; parameters are
    deduplicated and keep their ``base.`` names). ``head_layers[h-1]`` (h >= 2) is a new layer of the
    base's layer class (``layer_idx = L + h - 2``), initialised like the family's own
    (``normal(0, initializer_range)``, zero biases, unit norms) - DynaMo found random initialisation
    better than copying layer L; ``head_norms[h-1]`` starts as a copy of the base's final norm.
    The heads live on the base's device and dtype.

    ``grouped_heads`` (default False): True runs heads 2..H (when there are 2 or more of them) as one vmapped
    call in :meth:`forward` without grad; their parameters then become views of one stacked tensor per name
    (see :meth:`_stacked_heads`). False runs them one after another. Training (``stem_forward`` /
    ``head_hidden``) always runs heads one by one.
    """

    #: :meth:`forward` takes ``tree=`` (:class:`~dynamo_sampling.models.cache.TreeFeed`): the family's attention
    #: reads the plan's mask and positions, and its keys and values go to the plan's slots
    supports_tree = True

    def __init__(self, base_model: nn.Module, n_heads: int = 3, generator: Optional[torch.Generator] = None):
        super().__init__()
        parts = _parts(base_model)
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")
        L = len(parts.layers)
        if L < 2:
            raise ValueError(f"the base model needs >= 2 layers (stem + head 1), got {L}")
        _check_attention(base_model.config)
        self.base = base_model
        config = base_model.config
        std = getattr(config, "initializer_range", 0.02)
        ref = next(parts.layers[-1].parameters())
        layer_cls = type(parts.layers[-1])
        new_layers, new_norms = [], []
        for h in range(2, n_heads + 1):
            layer = layer_cls(config, layer_idx=L + h - 2)
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=std, generator=generator)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            new_layers.append(layer.to(device=ref.device, dtype=ref.dtype))
            new_norms.append(copy.deepcopy(parts.norm))
        self.head_layers = nn.ModuleList([parts.layers[-1], *new_layers])
        self.head_norms = nn.ModuleList([parts.norm, *new_norms])
        sig = inspect.signature(layer_cls.forward).parameters
        names = [k for k in _CACHE_KWARGS if k in sig]
        if not names:
            raise TypeError(f"{layer_cls.__name__}.forward takes none of {_CACHE_KWARGS}; unsupported transformers "
                            f"version {transformers.__version__}")
        self._cache_kwarg = names[0]
        self._n_stem = L - 1
        # Off by default, by measurement (benchmarks/bench_hf_step.py, Pythia-160m shape, B=1, 3 heads): each
        # head has its own weights, so grouping saves launches, not weight traffic, and vmap's dispatch costs
        # more than that saves. H100, eager: a whole 3-head step took 6.8 vs 6.1 ms (T=1) and 7.1 vs 6.5 ms
        # (T=3) grouped vs one by one in fp32, 7.4 vs 6.7 / 8.0 vs 7.3 ms in bf16. 2-core EPYC, 1 thread: heads
        # 2..3 alone 6.3 vs 5.4 ms (T=1), the whole step within noise (~52 and ~100 ms either way).
        self.grouped_heads = False
        # vmap needs every head's layer to hold the same parameters and no buffers (a buffer would be shared
        # by all heads); both supported families' layers qualify, a subclass adding buffers runs heads one by one
        self._groupable = not any(True for m in (*new_layers, *new_norms) for _ in m.buffers())
        self._stack = None  # (layer params, norm params, check) of _stacked_heads, built on first use

    # ---- protocol properties ---------------------------------------------------------------------
    @property
    def config(self):
        """The base model's ``transformers`` config."""
        return self.base.config

    @property
    def vocab_size(self) -> int:
        return _parts(self.base).lm_head.weight.shape[0]

    @property
    def n_heads(self) -> int:
        return len(self.head_layers)

    @property
    def max_seq_len(self) -> int:
        return int(self.base.config.max_position_embeddings)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        """Preallocate a cache for ``batch_size`` rows and ``max_len`` positions (default: the context).
        Every step attends over all ``max_len`` slots (masked), so size it to what the decoding needs."""
        max_len = self.max_seq_len if max_len is None else max_len
        if max_len > self.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's context {self.max_seq_len}")
        parts = _parts(self.base)
        p = next(self.head_layers[0].parameters())
        return KVCache(self._n_stem + self.n_heads, batch_size, parts.kv_heads, max_len, parts.head_dim,
                       dtype or p.dtype, device or p.device)

    # ---- the pieces head_losses and forward share -----------------------------------------------
    def _layer_kwargs(self, plan: FeedPlan, cache_obj) -> dict:
        return {"attention_mask": plan.additive_mask(plan.rope[0].dtype), "position_ids": plan.position_ids,
                "position_embeddings": plan.rope, self._cache_kwarg: cache_obj}

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, plan: FeedPlan, cache_obj) -> torch.Tensor:
        out = layer(x, **self._layer_kwargs(plan, cache_obj))
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returned tuples

    def feed_plan(self, x: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache],
                  tree: Optional[TreeFeed] = None) -> FeedPlan:
        """The once-per-forward :class:`FeedPlan` for embeddings x (B, T, d) at positions (B, T) (fed as a
        ``tree`` of draft branches, if given), with the base's rotary ``(cos, sin)`` (in x's dtype) as its
        ``rope``. No host sync on an accelerator."""
        check_positions(positions, self.max_seq_len, "the model's context")
        plan = FeedPlan(positions, cache, tree)
        plan.rope = _parts(self.base).rotary(x, position_ids=plan.position_ids)
        return plan

    def stem_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                     tree: Optional[TreeFeed] = None):
        """input_ids, positions (B, T) -> (h_stem (B, T, d), the :class:`FeedPlan` for :meth:`head_hidden`).

        With grad enabled and a frozen stem, ``h_stem`` is made a leaf that requires grad, so the
        trainer's ``h_stem.backward(...)`` is a no-op instead of an error.
        """
        _check_attention(self.base.config)  # it may have been switched after wrapping
        parts = _parts(self.base)
        x = parts.embed(input_ids)  # (B, T, d)
        if parts.emb_dropout is not None:
            x = parts.emb_dropout(x)
        plan = self.feed_plan(x, positions, cache, tree)
        cache_obj = _writer(plan)
        for layer in parts.layers[:-1]:
            x = self._run_layer(layer, x, plan, cache_obj)
        if torch.is_grad_enabled() and not x.requires_grad:
            x.requires_grad_()
        return x, plan

    def head_hidden(self, h_stem: torch.Tensor, plan: FeedPlan, positions: torch.Tensor, head: int,
                    cache: Optional[KVCache] = None) -> torch.Tensor:
        """Head ``head`` (0-based) on the stem output: (B, T, d) -> normed hidden (B, T, d).
        ``positions`` and ``cache`` are ignored: the plan of :meth:`stem_forward` already carries them."""
        x = self._run_layer(self.head_layers[head], h_stem, plan, _writer(plan))
        return self.head_norms[head](x)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's LM head module, shared by every head: (..., d) -> (..., V) in the model's dtype (training)."""
        return _parts(self.base).lm_head(hidden)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared unembedding (the base's LM head) on hidden rows from ``forward(..., output_hidden=True)``.

        Parameters
        ----------
        hidden : tensor, shape (..., d), the model's dtype; e.g. (B, T', heads, d) or any rows of it.

        Returns
        -------
        logits : float32 tensor, shape (..., V), contiguous.

        On CPU in float32 up to 6 rows are computed as ``W @ hidden^T``: measured on a 2-core AMD EPYC (MKL,
        1 thread, V = 50304, d = 768, the matrix not in cache) ``F.linear`` takes ~12 ms for 1 row, ~26 ms for
        2 and ~37 ms for 3 (MKL makes one pass over the 154 MB matrix per row below 4 rows), ``W @ hidden^T``
        ~8 ms for 2 rows, ~11 ms for 3, ~22 ms for 6 (``F.linear`` 28 ms) and is slower from 8 rows on; a single
        row is padded to two, as 1 row takes the slower matrix-vector path (~12 ms).
        """
        lm_head = _parts(self.base).lm_head
        rows = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        n = rows.shape[0]
        if (rows.device.type == "cpu" and rows.dtype == torch.float32 and 0 < n <= _SMALL_ROWS
                and type(lm_head) is nn.Linear):
            cols = rows if n > 1 else torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # (max(N, 2), d)
            logits = torch.mm(lm_head.weight, cols.T).T[:n]  # (N, V), a transposed view
            if lm_head.bias is not None:
                logits = logits + lm_head.bias
            logits = logits.contiguous()
        else:
            logits = lm_head(rows)
        return logits.float().reshape(*hidden.shape[:-1], logits.shape[-1])

    # ---- heads 2..H as one call ------------------------------------------------------------------
    def _stacked_heads(self):
        """(layer params, norm params, check): heads 2..H's parameters stacked on a head axis, two dicts
        name -> (H - 1, ...), and the (module, name, data pointer) list that says whether they are current.

        The stack holds the only copy: each head's parameter is made a view of its row (``p.data = stack[g]``),
        so in-place updates (optimizer steps, ``load_heads``, ``load_state_dict``) reach the grouped call and no
        weight is held twice. It is rebuilt when a parameter no longer is such a view (after ``.to()`` or
        ``.cuda()``, or a parameter replaced); the check compares data pointers on the host (~10 us).
        """
        if self._stack is not None and all(owner._parameters[name].data_ptr() == ptr
                                           for owner, name, ptr in self._stack[2]):
            return self._stack
        stacks, check = [], []
        # not inference tensors even when the decoding loop runs under inference_mode: the parameters must
        # stay usable by autograd (training) afterwards
        with torch.inference_mode(False), torch.no_grad():
            for modules in (self.head_layers[1:], self.head_norms[1:]):
                # per head, the same order (same class and config): (full name, owning module, local name)
                per_head = [[(f"{prefix}.{name}" if prefix else name, owner, name)
                             for prefix, owner in m.named_modules()
                             for name, p in owner._parameters.items() if p is not None] for m in modules]
                stacked = {}
                for i, (full, _, _) in enumerate(per_head[0]):
                    owners = [entries[i][1:] for entries in per_head]  # (module, local name) of each head
                    stacked[full] = torch.stack([owner._parameters[name].detach() for owner, name in owners])
                    for g, (owner, name) in enumerate(owners):
                        owner._parameters[name].data = stacked[full][g]
                        check.append((owner, name, stacked[full][g].data_ptr()))
                stacks.append(stacked)
        self._stack = (*stacks, check)
        return self._stack

    def _grouped_hidden(self, h_stem: torch.Tensor, plan: FeedPlan, n: int, pick) -> torch.Tensor:
        """Heads 2..n+1 on the stem output in one vmapped call of the family's layer and norm:
        h_stem (B, T, d) -> normed hidden (n, B, T', d), ``pick`` choosing the T' rows (before the norm)."""
        layer_params, norm_params, _ = self._stacked_heads()
        if n < self.n_heads - 1:
            layer_params = {k: v[:n] for k, v in layer_params.items()}
            norm_params = {k: v[:n] for k, v in norm_params.items()}
        layer, norm = self.head_layers[1], self.head_norms[1]  # templates: their own parameters are swapped out
        first = self._n_stem + 1  # cache index of head 2's layer

        def one_head(layer_p, norm_p, mask, keys, values):
            kwargs = {**self._layer_kwargs(plan, _writer(plan, keys, values)), "attention_mask": mask}
            out = functional_call(layer, layer_p, (h_stem,), kwargs)
            out = out[0] if isinstance(out, tuple) else out
            return functional_call(norm, norm_p, (pick(out),))

        cache = plan.cache
        kv = (None, None) if cache is None else (cache.k[first:first + n], cache.v[first:first + n])
        # the mask goes in batched (a stride-0 view): torch 2.11's CUDA sdpa batching rule folds the head axis
        # into the batch of q/k/v but not of an unbatched mask ("attn_bias: wrong shape (batch dimension)")
        mask = plan.additive_mask(plan.rope[0].dtype)
        mask = mask.expand(n, *mask.shape)  # (n, B, 1, T, S)
        in_dims = (0, 0, 0, None, None) if cache is None else (0, 0, 0, 0, 0)
        with warnings.catch_warnings():
            # sdpa's CPU kernel has no vmap batching rule: vmap runs it once per head and says so; the rest batches
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return vmap(one_head, in_dims=in_dims, randomness="different")(layer_params, norm_params, mask, *kv)

    # ---- the protocol ----------------------------------------------------------------------------
    def _check_call(self, input_ids: torch.Tensor, positions: torch.Tensor, heads: Optional[int]) -> int:
        heads = self.n_heads if heads is None else heads
        if not 1 <= heads <= self.n_heads:
            raise ValueError(f"heads must be in 1..{self.n_heads}, got {heads}")
        if input_ids.dim() != 2 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be (B, T), got {tuple(input_ids.shape)} and "
                             f"{tuple(positions.shape)}")
        return heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                heads: Optional[int] = None, logits_index: Optional[torch.Tensor] = None,
                output_hidden: bool = False, tree: Optional[TreeFeed] = None) -> torch.Tensor:
        """Run the model (protocol of ``models/tiny.py``).

        Parameters
        ----------
        input_ids : LongTensor, shape (B, T)
        positions : LongTensor, shape (B, T); position of each token in its row, -1 for padding.
        cache : KVCache from :meth:`new_cache`, or None (a full causal forward over these tokens only).
        heads : int, 1..H (default H): compute heads 1..heads.
        logits_index : LongTensor (B, T') or None: compute outputs only at these indices into T.
        output_hidden : bool. True returns the heads' normed hidden states instead of logits, for
            :meth:`head_logits` to unembed only the rows the caller uses.
        tree : :class:`~dynamo_sampling.models.cache.TreeFeed` or None: the fed tokens branch (several
            drafts verified in one forward); each writes its own slot and reads its ancestors only.

        Returns
        -------
        logits : float32 tensor, shape (B, T or T', heads, V); or with ``output_hidden``
        hidden : tensor in the model's dtype, shape (B, T or T', heads, d).
        ``forward(...)`` equals ``head_logits(forward(..., output_hidden=True))``.
        """
        heads = self._check_call(input_ids, positions, heads)
        h_stem, plan = self.stem_forward(input_ids, positions, cache, tree)
        if logits_index is None:
            def pick(x):
                return x
        else:
            def pick(x):  # (B, T, d) -> (B, T', d)
                return x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        head1 = self.head_norms[0](pick(self._run_layer(self.head_layers[0], h_stem, plan, _writer(plan))))
        hiddens = [head1[:, :, None]]  # (B, T', 1, d)
        if heads > 1:
            if self.grouped_heads and heads > 2 and self._groupable and not (
                    torch.is_grad_enabled() and any(p.requires_grad for p in self.head_layers[1:].parameters())):
                grouped = self._grouped_hidden(h_stem, plan, heads - 1, pick)  # (heads - 1, B, T', d)
                hiddens.append(grouped.permute(1, 2, 0, 3))
            else:  # one by one: the default, a single extra head, or autograd through the heads' parameters
                for h in range(1, heads):
                    x = self._run_layer(self.head_layers[h], h_stem, plan, _writer(plan))
                    hiddens.append(self.head_norms[h](pick(x))[:, :, None])
        hidden = torch.cat(hiddens, dim=2)  # (B, T', heads, d)
        return hidden if output_hidden else self.head_logits(hidden)

    def _reference_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                           heads: Optional[int] = None, logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The plain path :meth:`forward` is tested and benchmarked against: heads one after another, each
        unembedded by the LM head module on every row of ``logits_index``. Same arguments; returns logits."""
        heads = self._check_call(input_ids, positions, heads)
        h_stem, plan = self.stem_forward(input_ids, positions, cache)
        out = []
        for h in range(heads):
            hidden = self.head_hidden(h_stem, plan, positions, h)  # (B, T, d)
            if logits_index is not None:
                hidden = hidden.gather(1, logits_index[..., None].expand(-1, -1, hidden.shape[-1]))
            out.append(self.unembed(hidden).float())
        return torch.stack(out, dim=2)  # (B, T, heads, V)


# ---- heads files ---------------------------------------------------------------------------------
def _identity(model: HFMTP) -> dict:
    cfg = model.base.config
    return {"base_model": str(getattr(cfg, "_name_or_path", "") or ""), "config_sha256": config_fingerprint(cfg)}


def heads_state_dict(model: HFMTP) -> dict:
    """Heads 2..H and their norms: ``{"head_layers.{h-1}.*", "head_norms.{h-1}.*"}`` -> tensors."""
    state = {}
    for i in range(1, model.n_heads):
        for prefix, module in (("head_layers", model.head_layers[i]), ("head_norms", model.head_norms[i])):
            for k, v in module.state_dict().items():
                state[f"{prefix}.{i}.{k}"] = v.detach().contiguous()
    return state


def save_heads(model: HFMTP, path: str):
    """Write heads 2..H and their norms to the safetensors file ``path``; the metadata names the base model
    (``_name_or_path``), its config fingerprint (:func:`config_fingerprint`) and ``n_heads``."""
    from safetensors.torch import save_file

    if not isinstance(model, HFMTP):
        raise TypeError(f"save_heads expects an HFMTP, got {type(model).__name__}")
    meta = {"format": HEADS_FORMAT, "n_heads": str(model.n_heads), "family": type(model.base).__name__,
            "transformers_version": transformers.__version__, **_identity(model)}
    # clone: after a grouped forward heads 2..H's parameters are views of one stacked tensor per name, and
    # some safetensors versions refuse tensors that share a storage (0.8 accepts disjoint views)
    save_file({k: v.clone() for k, v in heads_state_dict(model).items()}, str(path), metadata=meta)


def load_heads(model: HFMTP, path: str, strict: bool = True) -> HFMTP:
    """Load heads written by :func:`save_heads` into ``model`` (in place; returns it).

    Raises ``ValueError`` when the file is not a heads file, has another number of heads, or - with
    ``strict`` - was trained on another base model (name or config fingerprint differ). ``strict=False``
    skips the base-model check only (e.g. after renaming a checkpoint directory); shapes are always checked.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not isinstance(model, HFMTP):
        raise TypeError(f"load_heads expects an HFMTP, got {type(model).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"heads file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types for truncated / foreign files
        raise ValueError(f"heads file {path} is corrupted or not safetensors: {e}") from e
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path} is not a heads file: metadata format {meta.get('format')!r}, expected {HEADS_FORMAT!r}")
    if int(meta.get("n_heads", -1)) != model.n_heads:
        raise ValueError(f"heads file {path} holds n_heads={meta.get('n_heads')}, the model has n_heads={model.n_heads}")
    expected = _identity(model)
    found = {k: meta.get(k) for k in expected}
    if strict and found != expected:
        raise ValueError(f"heads file {path} was trained for another base model: expected base_model="
                         f"{expected['base_model']!r} config_sha256={expected['config_sha256'][:16]}, found base_model="
                         f"{found['base_model']!r} config_sha256={(found['config_sha256'] or '')[:16]}")
    state = load_file(str(path))
    want = heads_state_dict(model)
    if set(state) != set(want):
        raise ValueError(f"heads file {path} does not match the model's heads: missing {sorted(set(want) - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - set(want))[:4]}")
    for k, v in state.items():
        if v.shape != want[k].shape:
            raise ValueError(f"heads file {path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(want[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            want[k].copy_(v)  # state_dict tensors share storage with the parameters / buffers
    return model


__all__ = ["HFMTP", "SUPPORTED_FAMILIES", "config_fingerprint", "heads_state_dict", "load_heads",
           "save_heads"]
