"""Meta's multi-token-prediction checkpoints (Gloeckle et al. 2024) as an :class:`~dynamo_sampling.models.hf.HFMTP`.

The release (``facebook/multi-token-prediction``: ``7B_200B_4/``, ``7B_1T_4/``, and the n=1 baselines) is a
Llama-2-format directory: ``params.json``, ``consolidated.pth`` and Meta's ``llama/model.py``. Its architecture::

    tokens -> tok_embeddings -> layers[0 .. N-2] -> h_trunk
    head 1      = layers[N-1](h_trunk)    -> norm -> output
    head k >= 2 = extra_heads[k-2](h_trunk) -> norm -> output       (k = 2 .. n_future_tokens)

which is the DynaMo / :class:`HFMTP` layout: the trunk is HFMTP's stem, ``layers[N-1]`` is the base's last layer,
the extra heads are heads 2..H on the penultimate state, and all heads share the final ``norm`` (copied into each
of HFMTP's ``head_norms``) and ``output`` (the LM head).

Checkpoint layout read here (the Llama reference names; the card says the trunk and the next-token head layer are
numbered contiguously as ``layers.*`` and the further heads are ``extra_heads.*``)::

    tok_embeddings.weight (V, dim)          norm.weight (dim,)          output.weight (V, dim)
    {layers.i | extra_heads.j}.attention.wq.weight (n_heads * hd, dim)    .attention.wk.weight (n_kv_heads * hd, dim)
        .attention.wv.weight (n_kv_heads * hd, dim)                       .attention.wo.weight (dim, n_heads * hd)
        .feed_forward.w1.weight (ffn, dim)  .feed_forward.w2.weight (dim, ffn)  .feed_forward.w3.weight (ffn, dim)
        .attention_norm.weight (dim,)       .ffn_norm.weight (dim,)
    rope.freqs (optional, ignored: recomputed from rope_theta)

``params.json`` fields: ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads`` (default ``n_heads``), ``vocab_size``
(-1 or absent: taken from ``tok_embeddings``), ``multiple_of``, ``ffn_dim_multiplier`` (optional), ``norm_eps``,
``rope_theta`` (default 10000), ``n_future_tokens`` (default 1). ``n_layers`` may count the extra heads (Meta's
``model.py`` builds ``n_layers - n_future_tokens + 1`` trunk+head-1 layers) or not; both are accepted.

Rotary convention: Meta's ``apply_rotary_emb`` rotates adjacent pairs ``(x[2i], x[2i+1])`` of each head (complex
multiplication), ``transformers``' Llama rotates ``(x[i], x[i + hd/2])`` (rotate-half), both by frequency
``theta^(-2i/hd)``. So the rows of ``wq`` and ``wk`` are reordered within each head: HF row ``c * hd/2 + i`` is Meta
row ``2i + c`` (c in {0, 1}). q.k is a sum over pairs, so reordering q and k the same way leaves attention scores
unchanged, and ``wv``/``wo`` need nothing.

The weights are read with ``torch.load(weights_only=True, map_location="cpu")``: tensors only, no pickled code.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("dynamo_sampling.models.meta_mtp needs transformers: pip install 'dynamo_sampling[hf]'") from e

from .hf import HFMTP

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.pth"
_REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps")
# Meta block name -> transformers LlamaDecoderLayer name
_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_IGNORED = {"rope.freqs"}


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU width of Llama's ``FeedForward``: 2/3 of 4*dim, scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * hd, in) from Meta's interleaved rotary pairs to
    transformers' rotate-half pairs: within each head, new row ``c * hd/2 + i`` = old row ``2i + c``."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_params(directory: str) -> dict:
    path = os.path.join(directory, PARAMS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a Meta checkpoint directory: {PARAMS_FILE} is missing")
    try:
        with open(path) as f:
            params = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(params).__name__}")
    missing = [k for k in _REQUIRED_PARAMS if params.get(k) is None]
    if missing:
        raise ValueError(f"{path} lacks required field(s) {missing}")
    return params


def _indices(state: dict, prefix: str) -> list:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pat.match(k)] if m})


def meta_config(params: dict, state: dict, max_seq_len: int = 4096, attn_implementation: str = "sdpa"):
    """(LlamaConfig, n_layers in ``layers``, n_future_tokens) for ``params`` and the checkpoint's keys,
    checking what the two must agree on."""
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(f"params.json: dim={dim} must be a multiple of n_heads={n_heads}, and n_heads of "
                         f"n_kv_heads={n_kv}")
    if (dim // n_heads) % 2:
        raise ValueError(f"params.json: head dim {dim // n_heads} (dim / n_heads) must be even for rotary")
    n_future = int(params.get("n_future_tokens") or 1)
    if n_future < 1:
        raise ValueError(f"params.json: n_future_tokens must be >= 1, got {n_future}")
    layers, extra = _indices(state, "layers"), _indices(state, "extra_heads")
    n_layers = len(layers)
    if layers != list(range(n_layers)):
        raise ValueError(f"consolidated.pth: layers are not numbered 0..{n_layers - 1}: missing "
                         f"{sorted(set(range(max(layers, default=-1) + 1)) - set(layers))}")
    if extra != list(range(len(extra))):
        raise ValueError(f"consolidated.pth: extra_heads are not numbered 0..{len(extra) - 1}: missing "
                         f"{sorted(set(range(max(extra, default=-1) + 1)) - set(extra))}")
    if len(extra) != n_future - 1:
        raise ValueError(f"params.json says n_future_tokens={n_future}, so consolidated.pth should hold "
                         f"{n_future - 1} extra_heads; it holds {len(extra)}")
    if int(params["n_layers"]) not in (n_layers + n_future - 1, n_layers):
        raise ValueError(f"params.json says n_layers={params['n_layers']}, consolidated.pth holds {n_layers} layers "
                         f"and {len(extra)} extra_heads (expected n_layers={n_layers + n_future - 1})")
    if n_layers < 2:
        raise ValueError(f"consolidated.pth holds {n_layers} layers; at least 2 are needed (trunk + head 1)")
    vocab = int(params.get("vocab_size") or -1)
    if vocab <= 0:  # Llama 2's params.json says -1: the tokenizer's size, i.e. the embedding's rows
        emb = state.get("tok_embeddings.weight")
        if emb is None:
            raise ValueError("consolidated.pth lacks tok_embeddings.weight")
        vocab = int(emb.shape[0])
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim,
        intermediate_size=ffn_hidden_size(dim, int(params["multiple_of"]), params.get("ffn_dim_multiplier")),
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        hidden_act="silu", max_position_embeddings=int(max_seq_len), rms_norm_eps=float(params["norm_eps"]),
        rope_theta=float(params.get("rope_theta") or 10000.0), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)
    config._attn_implementation = attn_implementation
    return config, n_layers, n_future


def _expected_shapes(config, n_layers: int, n_extra: int) -> dict:
    d, hd = config.hidden_size, config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    f, V = config.intermediate_size, config.vocab_size
    block = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
             "attention.wo.weight": (d, q), "feed_forward.w1.weight": (f, d), "feed_forward.w2.weight": (d, f),
             "feed_forward.w3.weight": (f, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    shapes = {"tok_embeddings.weight": (V, d), "norm.weight": (d,), "output.weight": (V, d)}
    for prefix, n in (("layers", n_layers), ("extra_heads", n_extra)):
        for i in range(n):
            shapes.update({f"{prefix}.{i}.{k}": s for k, s in block.items()})
    return shapes


def _check_state(state: dict, shapes: dict, path: str):
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) of the Meta layout: {missing[:6]}")
    unexpected = [k for k in state if k not in shapes and k not in _IGNORED]
    if unexpected:
        raise ValueError(f"{path} holds tensor(s) the Meta layout does not have: {unexpected[:6]}")
    for k, s in shapes.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != s:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, params.json implies {s}")
        if not v.is_floating_point():
            raise ValueError(f"{path}: {k} has dtype {v.dtype}, expected a floating-point tensor")


def _block_state(state: dict, prefix: str, config) -> dict:
    """One Meta block's tensors -> a LlamaDecoderLayer state dict (q/k rows reordered for rotate-half)."""
    out = {}
    for meta_name, hf_name in _BLOCK.items():
        w = state[f"{prefix}.{meta_name}"]
        if meta_name == "attention.wq.weight":
            w = interleaved_to_half(w, config.num_attention_heads)
        elif meta_name == "attention.wk.weight":
            w = interleaved_to_half(w, config.num_key_value_heads)
        out[hf_name] = w
    return out


def load_meta_mtp(directory: str, dtype: torch.dtype = torch.float32, max_seq_len: int = 4096,
                  attn_implementation: str = "sdpa") -> HFMTP:
    """Load a Meta multi-token-prediction checkpoint directory as an :class:`HFMTP` with ``n_future_tokens`` heads.

    Parameters
    ----------
    directory : a folder with ``params.json`` and ``consolidated.pth`` (one shard: the 7B models have one).
    dtype : the model's parameter dtype (the checkpoint's tensors are cast to it).
    max_seq_len : the context (``max_position_embeddings``; ``params.json`` does not record it; Llama 2: 4096).
    attn_implementation : ``"sdpa"`` or ``"eager"``.

    Returns an ``HFMTP`` in eval mode whose ``base`` is a ``LlamaForCausalLM`` equal to the checkpoint's
    next-token model (head 1) and whose heads 2..n are its ``extra_heads``.

    Raises ``ValueError`` for a missing file, a missing / unexpected / misshapen tensor (named), a
    ``params.json`` that disagrees with the tensors, or ``n_future_tokens`` that disagrees with the number
    of ``extra_heads``.
    """
    directory = os.fspath(directory)
    params = read_params(directory)
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        shards = sorted(f for f in os.listdir(directory) if f.startswith("consolidated.") and f.endswith(".pth"))
        extra = f" (found {shards}: model-parallel shards are not supported; merge them first)" if shards else ""
        raise ValueError(f"{directory} is not a Meta checkpoint directory: {WEIGHTS_FILE} is missing{extra}")
    try:
        try:  # mmap: a 7B file is not read twice into memory; a legacy (non-zip) file cannot be mapped
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # pickle / zip errors, or a pickle weights_only refuses
        raise ValueError(f"{path} could not be read as a tensor state dict (weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    config, n_layers, n_future = meta_config(params, state, max_seq_len, attn_implementation)
    _check_state(state, _expected_shapes(config, n_layers, n_future - 1), path)

    # The base: built without allocating or initialising weights (meta device), then filled from the file.
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(n_layers):
        hf.update({f"model.layers.{i}.{k}": v for k, v in _block_state(state, f"layers.{i}", config).items()})
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to(dtype=dtype)
    base.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=True, assign=True)
    base.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its inv_freq buffer was on the meta device
    left = [n for n, t in [*base.named_parameters(), *base.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a transformers version with other buffers
        raise RuntimeError(f"load_meta_mtp: tensors left unset after loading: {left[:4]}")
    base.eval()

    model = HFMTP(base, n_heads=n_future)
    with torch.no_grad():
        for j in range(n_future - 1):
            layer_state = _block_state(state, f"extra_heads.{j}", config)
            model.head_layers[j + 1].load_state_dict({k: v.to(dtype) for k, v in layer_state.items()}, strict=True)
            model.head_norms[j + 1].weight.copy_(state["norm.weight"].to(dtype))  # the shared final norm
    return model.eval()


__all__ = ["ffn_hidden_size", "interleaved_to_half", "load_meta_mtp", "meta_config", "read_params"]
