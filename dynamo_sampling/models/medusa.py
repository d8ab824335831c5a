"""Medusa heads (Cai et al. 2024) on a Hugging Face base model, as an MTP model (the ``hf`` extra).

A Medusa checkpoint is a ``medusa_lm_head.safetensors`` plus a small ``config.json``
(``medusa_num_heads`` K, ``medusa_num_layers`` L, ``base_model_name_or_path``). Head ``i`` (0-based) is
``L`` residual blocks ``x + SiLU(linear(x))`` (keys ``{i}.{j}.linear.weight`` (d, d) and
``{i}.{j}.linear.bias`` (d,), j < L) followed by its own output projection ``{i}.{L}.weight`` (V, d), no
bias, all on the base model's LAST hidden state (after its final norm). Medusa head ``i`` predicts the
token ``i + 1`` positions beyond the base's next token, so here::

    head 1          = the base model itself (its last layer, final norm and LM head)  - exactly the base
    head i + 2      = Medusa head i on the base's final normed hidden state, i = 0..K-1

The base runs through :class:`~dynamo_sampling.models.hf.HFMTP` with ``n_heads=1`` (its per-row,
position-addressed cache and feed plan; GPT-NeoX and Llama families). The Medusa heads hold no cache.

``forward(..., output_hidden=True)`` returns the heads' float32 LOGITS (B, T, heads, V) and
:meth:`MedusaMTP.head_logits` is ``float()`` (as ``tests/toy_models.py``'s ``TableMTP``): each Medusa
head has its own projection, so a hidden row alone would not say which projection to apply. The cost:
every fed row gets all heads' projections, where the decoder reads heads 2..H at one row per step, i.e.
(T - 1) x K extra (V x d) matrix-vector products per step (T = tokens fed per row). The weight traffic,
what dominates a small batch, is the same (each projection matrix is read once per step either way).
Heads on demand (the decoder's lazy path with hybrid lookup drafts) are supported: ``output_stem=True``
also returns the base's final normed hidden state at every fed position, and :meth:`extra_heads` runs
the Medusa heads on saved ones; steps whose drafts come from the prompt-lookup index skip the Medusa heads.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hf import HFMTP, _parts

HEADS_FILE = "medusa_lm_head.safetensors"
CONFIG_FILE = "config.json"


class MedusaResBlock(nn.Module):
    """``x + SiLU(linear(x))``, the block of a Medusa head (state dict keys ``linear.weight``, ``linear.bias``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _medusa_head(hidden_size: int, vocab_size: int, num_layers: int) -> nn.Sequential:
    return nn.Sequential(*[MedusaResBlock(hidden_size) for _ in range(num_layers)],
                         nn.Linear(hidden_size, vocab_size, bias=False))


def _read_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.path.join(config, CONFIG_FILE) if os.path.isdir(config) else str(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Medusa config {path} does not exist")
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Medusa config {path} is not valid JSON: {e}") from e
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict, a path or a PretrainedConfig, got {type(config).__name__}")


def _read_heads(heads_file) -> dict:
    if isinstance(heads_file, Mapping):
        return dict(heads_file)
    path = str(heads_file)
    if os.path.isdir(path):
        path = os.path.join(path, HEADS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Medusa heads file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)  # Medusa's older medusa_lm_head.pt
    except Exception as e:
        raise ValueError(f"Medusa heads file {path} is corrupted or unreadable: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"Medusa heads file {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _strip_prefix(state: dict) -> dict:
    """Keys saved from a whole Medusa model (``medusa_head.{i}...``) -> the heads' own keys."""
    prefix = "medusa_head."
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _infer_layout(state: Mapping) -> tuple:
    """(num_heads, num_layers) from keys ``{i}.{j}...``; ValueError when the keys are not of that layout."""
    idx = []
    for k in state:
        m = re.fullmatch(r"(\d+)\.(\d+)\.(?:linear\.)?(?:weight|bias)", k)
        if m is None:
            raise ValueError(f"unexpected key {k!r}: not a Medusa head key '{{head}}.{{layer}}.linear.weight/bias' "
                             f"or '{{head}}.{{num_layers}}.weight'")
        idx.append((int(m.group(1)), int(m.group(2))))
    if not idx:
        raise ValueError("the Medusa heads file holds no tensors")
    return max(i for i, _ in idx) + 1, max(j for _, j in idx)


def _int_field(cfg: dict, name: str, default):
    v = cfg.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "medusa_num_heads" else 0):
        raise ValueError(f"Medusa config: {name} must be an int >= {1 if name == 'medusa_num_heads' else 0}, got {v!r}")
    return v


class MedusaMTP(nn.Module):
    """A ``transformers`` GPT-NeoX or Llama causal LM with Medusa heads, behind the library's MTP protocol.

    Parameters
    ----------
    base_model : ``GPTNeoXForCausalLM`` or ``LlamaForCausalLM`` (eager or sdpa attention); not copied.
    heads_file : path of ``medusa_lm_head.safetensors`` (or Medusa's older ``.pt``, read with
        ``weights_only=True``), a directory holding it, or a state dict ``{"{i}.{j}.linear.weight": ...}``.
    config : Medusa's ``config.json`` (a path, its directory, a dict or a ``PretrainedConfig``) with
        ``medusa_num_heads`` and ``medusa_num_layers``; None infers both from the file's keys.
        ``hidden_size`` / ``vocab_size``, when present, must be the base's.

    ``n_heads`` = 1 + ``medusa_num_heads``. The Medusa heads are put on the base's device and dtype.
    Raises ``ValueError`` naming the missing or unexpected keys, the tensors of wrong shape (another
    base's hidden size or vocabulary included) and config fields that disagree with the file or the base.
    """

    def __init__(self, base_model: nn.Module, heads_file, config=None):
        super().__init__()
        self.trunk = HFMTP(base_model, n_heads=1)  # TypeError for unsupported families
        cfg = _read_config(config)
        state = _strip_prefix(_read_heads(heads_file))
        parts = _parts(base_model)
        d = int(parts.lm_head.weight.shape[1])
        V = int(parts.lm_head.weight.shape[0])
        base_d = int(getattr(base_model.config, "hidden_size", d))
        if "medusa_num_heads" in cfg or "medusa_num_layers" in cfg:
            K = _int_field(cfg, "medusa_num_heads", None)
            L = _int_field(cfg, "medusa_num_layers", 1)
        else:
            K, L = _infer_layout(state)
        for field, want in (("hidden_size", base_d), ("vocab_size", V)):
            if field in cfg and cfg[field] is not None and int(cfg[field]) != want:
                raise ValueError(f"Medusa config {field}={cfg[field]} does not match the base model's {field}={want}")
        heads = nn.ModuleList([_medusa_head(d, V, L) for _ in range(K)])
        want = heads.state_dict()
        missing = sorted(set(want) - set(state), key=_natural)
        unexpected = sorted(set(state) - set(want), key=_natural)
        if missing or unexpected:
            raise ValueError(f"the Medusa heads file does not match medusa_num_heads={K}, medusa_num_layers={L}: "
                             f"missing {_few(missing)}, unexpected {_few(unexpected)}{_layout_hint(state)}")
        bad = [(k, tuple(state[k].shape), tuple(want[k].shape)) for k in sorted(want, key=_natural)
               if tuple(state[k].shape) != tuple(want[k].shape)]
        if bad:
            found_d = _found_hidden(state, L)
            hint = (f" (the heads have hidden size {found_d}, the base model's is {d}: heads of another base?)"
                    if found_d is not None and found_d != d else "")
            raise ValueError("Medusa heads have the wrong shape for this base model" + hint + ": " +
                             "; ".join(f"{k} is {s}, expected {w}" for k, s, w in bad[:4]) +
                             (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""))
        heads.load_state_dict({k: v for k, v in state.items()})
        ref = parts.lm_head.weight
        self.medusa_heads = heads.to(device=ref.device, dtype=ref.dtype)
        self.medusa_config = {"medusa_num_heads": K, "medusa_num_layers": L,
                              "base_model_name_or_path": cfg.get("base_model_name_or_path")}

    # ---- protocol properties ---------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.trunk.base

    @property
    def config(self):
        return self.trunk.config

    @property
    def n_heads(self) -> int:
        return 1 + len(self.medusa_heads)

    @property
    def vocab_size(self) -> int:
        return self.trunk.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.trunk.max_seq_len

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None, device=None):
        return self.trunk.new_cache(batch_size, max_len=max_len, dtype=dtype, device=device)

    # ---- the protocol ----------------------------------------------------------------------------
    def medusa_logits(self, h_last: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
        """Medusa heads 0..n-1 (default all) on the base's final normed hidden state h_last (..., d)
        -> float32 logits (..., n, V)."""
        n = len(self.medusa_heads) if n is None else n
        if n == 0:
            return h_last.new_zeros(*h_last.shape[:-1], 0, self.vocab_size, dtype=torch.float32)
        return torch.stack([self.medusa_heads[i](h_last).float() for i in range(n)], dim=-2)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache=None, heads: Optional[int] = None,
                logits_index: Optional[torch.Tensor] = None, output_hidden: bool = False, output_stem: bool = False):
        """Protocol of ``models/tiny.py``: logits float32 (B, T or T', heads, V). With ``output_hidden`` the
        "hidden" returned is these same logits (:meth:`head_logits` is ``float()``). ``output_stem`` also
        returns the base's final normed hidden state (B, T, d) at every fed position, for :meth:`extra_heads`."""
        heads = self.n_heads if heads is None else heads
        if not 1 <= heads <= self.n_heads:
            raise ValueError(f"heads must be in 1..{self.n_heads}, got {heads}")
        h = self.trunk(input_ids, positions, cache, heads=1,
                       logits_index=None if output_stem else logits_index, output_hidden=True)[:, :, 0]  # (B, T, d)
        stem = h
        if output_stem and logits_index is not None:
            h = h.gather(1, logits_index[..., None].expand(-1, -1, h.shape[-1]))
        out = self.trunk.head_logits(h)[:, :, None]  # (B, T', 1, V)
        if heads > 1:
            out = torch.cat([out, self.medusa_logits(h, heads - 1)], dim=2)
        return (out, stem) if output_stem else out

    def extra_heads(self, h_stem: torch.Tensor, positions: torch.Tensor, cache=None,
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Heads 2..H (the Medusa heads) on saved final hidden states (B, T, d) -> logits (B, T, H-1, V),
        or (B, T', H-1, V) at ``rows`` (B, T') only. ``positions`` and ``cache`` are unused: the Medusa
        heads keep no state."""
        if rows is not None:
            h_stem = h_stem.gather(1, rows[..., None].expand(-1, -1, h_stem.shape[-1]))
        return self.medusa_logits(h_stem)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The "hidden" of :meth:`forward` already is logits: float32, contiguous."""
        return hidden.float().contiguous()


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _few(keys: list, n: int = 6) -> str:
    return "[]" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _layout_hint(state: Mapping) -> str:
    try:
        k, n = _infer_layout(state)
    except ValueError:
        return ""
    return f" (the file holds {k} head{'s' * (k != 1)} of {n} layer{'s' * (n != 1)})"


def _found_hidden(state: Mapping, num_layers: int) -> Optional[int]:
    """The hidden size the file's heads were made for (from a block's weight or a projection's columns)."""
    for k, v in state.items():
        if k.endswith(".linear.weight") and v.dim() == 2:
            return int(v.shape[1])
        if re.fullmatch(rf"\d+\.{num_layers}\.weight", k) and v.dim() == 2:
            return int(v.shape[1])
    return None


def load_medusa(base_model: nn.Module, directory: Union[str, os.PathLike]) -> MedusaMTP:
    """``MedusaMTP`` from a Medusa checkpoint directory: ``medusa_lm_head.safetensors`` (or ``.pt``) and
    ``config.json`` (optional: without it the layout is read from the file's keys)."""
    directory = str(directory)
    heads = os.path.join(directory, HEADS_FILE)
    if not os.path.isfile(heads) and os.path.isfile(os.path.join(directory, "medusa_lm_head.pt")):
        heads = os.path.join(directory, "medusa_lm_head.pt")
    cfg = os.path.join(directory, CONFIG_FILE)
    return MedusaMTP(base_model, heads, cfg if os.path.isfile(cfg) else None)


__all__ = ["MedusaMTP", "MedusaResBlock", "load_medusa"]
