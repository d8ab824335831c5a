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

The cache (:class:`HFKVCache`) is this library's, not a ``transformers`` ``Cache``: rows of a batch have
their own positions (ragged prompts, ragged acceptance), and ``DynamicCache``/``StaticCache`` append
or write at one ``cache_position`` shared by all rows. So every layer is run through its family's own
``forward`` (no forked model code: the family keeps its attention, GQA, partial rotary, parallel
residual) with three things supplied from here:

* ``position_embeddings`` from the model's ``rotary_emb`` on per-row ``positions`` (padding -> 0);
* a 4-D additive mask ``(B, 1, T, S)``: query at position ``q`` sees keys at positions ``<= q`` of its
  own row (padding queries see slot 0 only, their output is garbage and discarded);
* a duck-typed cache object whose ``update(keys, values, layer_idx, ...)`` - the only cache method
  these attention modules call - writes each real token's keys/values to slot ``position`` of its row
  in preallocated ``(B, kv_heads, max_len, head_dim)`` tensors and returns slots ``0..max_pos``.

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
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

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


@dataclass
class _Parts:
    """The base model's pieces this wrapper runs (all public attributes of the family's classes)."""
    embed: nn.Module
    emb_dropout: Optional[nn.Module]
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module


def _parts(base: nn.Module) -> _Parts:
    if isinstance(base, GPTNeoXForCausalLM):
        m = base.gpt_neox
        return _Parts(m.embed_in, m.emb_dropout, m.layers, m.final_layer_norm, _rotary(m), base.get_output_embeddings())
    if isinstance(base, LlamaForCausalLM):
        m = base.model
        return _Parts(m.embed_tokens, None, m.layers, m.norm, _rotary(m), base.get_output_embeddings())
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


class HFKVCache:
    """Preallocated, position-addressed keys and values for every attention layer of an :class:`HFMTP`.

    ``k[i]``/``v[i]`` are ``(B, kv_heads, max_len, head_dim)`` in the model's dtype, allocated at the first
    write of layer ``i`` (so kv heads and head_dim come from the family itself). Slot ``p`` of row ``b``
    holds the token at position ``p``. ``lengths`` (B,) int64 is the decoder's bookkeeping.

    Duck-types the one method of ``transformers.Cache`` the supported attention modules call, ``update``.
    """

    def __init__(self, n_attn_layers: int, batch_size: int, max_len: int, dtype, device):
        self.k: list = [None] * n_attn_layers
        self.v: list = [None] * n_attn_layers
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self._feed = None  # (b_idx, t_idx, p_idx, n_slots) of the forward in progress, set by HFMTP

    def begin_feed(self, positions: torch.Tensor):
        """Remember where this forward's tokens go. positions (B, T) int64, -1 for padding."""
        valid = positions >= 0
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        n_slots = int(positions.max()) + 1 if b_idx.numel() else 1
        self._feed = (b_idx, t_idx, positions[b_idx, t_idx], n_slots)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states (B, kv_heads, T, head_dim) of this forward -> keys, values (B, kv_heads, S, head_dim)
        for slots 0..S-1, S = the largest position fed + 1."""
        b_idx, t_idx, p_idx, n_slots = self._feed
        if self.k[layer_idx] is None:
            B, nkv, _, hd = key_states.shape
            shape = (self.batch_size, nkv, self.max_len, hd)
            self.k[layer_idx] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v[layer_idx] = torch.zeros((*shape[:3], value_states.shape[-1]), dtype=self.dtype, device=self.device)
        ck, cv = self.k[layer_idx], self.v[layer_idx]
        ck[b_idx, :, p_idx] = key_states[b_idx, :, t_idx].to(ck.dtype)
        cv[b_idx, :, p_idx] = value_states[b_idx, :, t_idx].to(cv.dtype)
        return ck[:, :, :n_slots].to(key_states.dtype), cv[:, :, :n_slots].to(value_states.dtype)


@dataclass
class _Context:
    """What every layer of one forward shares: rotary (cos, sin), the additive mask and the cache."""
    position_embeddings: tuple
    mask: torch.Tensor  # (B, 1, T, S) additive, the hidden dtype
    cache: Optional[HFKVCache]


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
    """

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

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None) -> HFKVCache:
        """Preallocate a cache for ``batch_size`` rows and ``max_len`` positions (default: the context)."""
        max_len = self.max_seq_len if max_len is None else max_len
        if max_len > self.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's context {self.max_seq_len}")
        p = next(self.head_layers[0].parameters())
        return HFKVCache(self._n_stem + self.n_heads, batch_size, max_len, dtype or p.dtype, device or p.device)

    # ---- the pieces head_losses and forward share -----------------------------------------------
    def _run_layer(self, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor, ctx: _Context) -> torch.Tensor:
        out = layer(x, attention_mask=ctx.mask, position_ids=positions.clamp(min=0),
                    position_embeddings=ctx.position_embeddings, **{self._cache_kwarg: ctx.cache})
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returned tuples

    def stem_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Optional[HFKVCache] = None):
        """input_ids, positions (B, T) -> (h_stem (B, T, d), context for :meth:`head_hidden`).

        With grad enabled and a frozen stem, ``h_stem`` is made a leaf that requires grad, so the
        trainer's ``h_stem.backward(...)`` is a no-op instead of an error.
        """
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context {self.max_seq_len}")
        _check_attention(self.base.config)  # it may have been switched after wrapping
        parts = _parts(self.base)
        x = parts.embed(input_ids)  # (B, T, d)
        if parts.emb_dropout is not None:
            x = parts.emb_dropout(x)
        valid = positions >= 0
        q_pos = torch.where(valid, positions, 0)
        if cache is None:
            key_pos = torch.where(valid, positions, torch.iinfo(torch.long).max)  # (B, T)
        else:
            if positions.numel() and int(positions.max()) >= cache.max_len:
                raise ValueError(f"position {int(positions.max())} is beyond the cache's max_len {cache.max_len}")
            cache.begin_feed(positions)
            key_pos = torch.arange(cache._feed[3], device=x.device).expand(x.shape[0], -1)  # slots (B, S)
        allowed = key_pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, T, S)
        if cache is None:
            allowed = allowed | ~valid[:, None, :, None]  # padding queries: anything (output discarded)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, torch.finfo(x.dtype).min)
        ctx = _Context(parts.rotary(x, position_ids=q_pos), mask, cache)
        for layer in parts.layers[:-1]:
            x = self._run_layer(layer, x, positions, ctx)
        if torch.is_grad_enabled() and not x.requires_grad:
            x.requires_grad_()
        return x, ctx

    def head_hidden(self, h_stem: torch.Tensor, ctx: _Context, positions: torch.Tensor, head: int,
                    cache: Optional[HFKVCache] = None) -> torch.Tensor:
        """Head ``head`` (0-based) on the stem output: (B, T, d) -> normed hidden (B, T, d).
        ``cache`` is ignored: the context of :meth:`stem_forward` already carries it."""
        x = self._run_layer(self.head_layers[head], h_stem, positions, ctx)
        return self.head_norms[head](x)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's LM head, shared by every head: (..., d) -> (..., V)."""
        return _parts(self.base).lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Optional[HFKVCache] = None,
                heads: Optional[int] = None, logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the model (protocol of ``models/tiny.py``).

        Parameters
        ----------
        input_ids : LongTensor, shape (B, T)
        positions : LongTensor, shape (B, T); position of each token in its row, -1 for padding.
        cache : HFKVCache from :meth:`new_cache`, or None (a full causal forward over these tokens only).
        heads : int, 1..H (default H): compute heads 1..heads.
        logits_index : LongTensor (B, T') or None: compute logits only at these indices into T.

        Returns
        -------
        logits : float32 tensor, shape (B, T or T', heads, V)
        """
        heads = self.n_heads if heads is None else heads
        if not 1 <= heads <= self.n_heads:
            raise ValueError(f"heads must be in 1..{self.n_heads}, got {heads}")
        if input_ids.dim() != 2 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be (B, T), got {tuple(input_ids.shape)} and "
                             f"{tuple(positions.shape)}")
        h_stem, ctx = self.stem_forward(input_ids, positions, cache)
        out = []
        for h in range(heads):
            hidden = self.head_hidden(h_stem, ctx, positions, h)  # (B, T, d)
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
    save_file(heads_state_dict(model), str(path), metadata=meta)


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


__all__ = ["HFKVCache", "HFMTP", "SUPPORTED_FAMILIES", "config_fingerprint", "heads_state_dict", "load_heads",
           "save_heads"]
