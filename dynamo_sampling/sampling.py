"""``sample()``: the public entry point (validates once, then runs ``decoding.generate``)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from .decoding import STRATEGIES, DraftConfig, GenerationOutput, generate
from .kernels import resolve_backend
from .lookup import LookupConfig
from .policy import DynamoConfig, check_stats
from .samplers import SamplingParams

_CONFIGS = {"dynamo": DynamoConfig, "draft": DraftConfig, "lookup": LookupConfig}


def sample(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
           strategy: str = "dynamo", max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 0.7, top_k: Optional[int] = 50,
           eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None, streamer=None,
           return_dict_in_generate: bool = False, stats=None, dynamo: Optional[DynamoConfig] = None,
           draft: Optional[DraftConfig] = None, lookup: Optional[LookupConfig] = None,
           backend: str = "auto", **overrides) -> Union[torch.Tensor, GenerationOutput]:
    """Generate with an MTP model, several tokens per forward pass.

    Parameters
    ----------
    model : an MTP model (``forward(input_ids, positions, cache, heads)``, ``new_cache``,
        ``vocab_size``, ``n_heads``, ``max_seq_len``), e.g. :class:`TinyMTP`.
    input_ids : LongTensor, shape (B, S); prompts, left-padded when ragged.
    attention_mask : LongTensor or BoolTensor, shape (B, S), or None (all ones); 1 for prompt
        tokens, 0 for left padding.
    strategy : ``"ar"`` (head 1, one token per step), ``"dynamo"`` (DynaMo, lossy),
        ``"speculative"`` (the heads' joint drafts, and prompt-lookup drafts where they promise more,
        verified by head 1: output distributed exactly as ``ar``) or ``"lookup"`` (prompt-lookup
        drafts only, no heads: the baseline for a model without MTP heads; also exact).
    max_new_tokens : int >= 1; every row stops after this many new tokens or an EOS.
    do_sample : greedy (False) or sampling (True).
    temperature : float > 0, used when sampling (default 0.7, as in DynaMo).
    top_k : int >= 1 or None; head 1's sampler keeps the top_k logits (None: all).
    eos_token_id : int, list of int or None.
    pad_token_id : int used after a row stops (default: the first EOS id, else 0).
    generator : torch.Generator on the model's device; the same seed gives the same tokens.
    streamer : object with ``put(tokens)`` and ``end()``; ``put`` receives, after every step, a list
        of B 1-D LongTensors holding each row's new tokens (possibly empty).
    return_dict_in_generate : return a :class:`GenerationOutput` with statistics.
    stats : co-occurrence statistics (``CooccurrenceStats``) or None (no weighting).
    dynamo : DynamoConfig (the step policy); draft : DraftConfig (how speculative and lookup size
        drafts); lookup : LookupConfig (prompt-lookup n-gram sizes and draft length).
        ``**overrides`` (e.g. ``eps_b=0.2``, ``max_draft=6``, ``size_by="thresholds"``) replace the
        fields of whichever of the three has that name.
    backend : ``"auto"`` (fused CUDA kernels for CUDA tensors when CuPy is importable, else the
        torch reference), ``"torch"`` or ``"cuda"``; the step policy's implementation.

    Returns
    -------
    LongTensor (B, S + max_new_tokens) of prompt + new tokens (rows that stop early are padded with
    ``pad_token_id``), or a :class:`GenerationOutput` when ``return_dict_in_generate``.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of shape (batch, seq_len), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one prompt token per row, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    V = model.vocab_size
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    mask = attention_mask.to(input_ids.device).bool()
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError("attention_mask must be left-padded (zeros, then ones, per row); got a 0 after a 1")
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"every prompt needs at least one token; rows {(lengths == 0).nonzero().flatten().tolist()} are empty")
    real = input_ids[mask]
    if bool(((real < 0) | (real >= V)).any()):
        bad = real[(real < 0) | (real >= V)]
        raise ValueError(f"input_ids must be in [0, {V}) (the model's vocabulary), got {bad[0].item()}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    total = int(lengths.max()) + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"the model's context of {model.max_seq_len} tokens")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    eos_token_id = list(eos_token_id) if eos_token_id is not None else []
    for e in eos_token_id:
        if not 0 <= int(e) < V:
            raise ValueError(f"eos_token_id must be in [0, {V}), got {e}")
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if eos_token_id else 0
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise TypeError(f"streamer must have put(tokens) and end() methods, got {type(streamer).__name__}")
    backend = resolve_backend(backend, input_ids)
    given = {"dynamo": dynamo, "draft": draft, "lookup": lookup}
    configs = {}
    for name, cls in _CONFIGS.items():
        cfg = given[name] if given[name] is not None else cls()
        if not isinstance(cfg, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(cfg).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        configs[name] = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in fields})
        configs[name].validate()
    known = {f.name for cls in _CONFIGS.values() for f in dataclasses.fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"sample() got unexpected keyword arguments {sorted(unknown)}; expected sample's "
                        f"arguments or fields of DynamoConfig, DraftConfig or LookupConfig {sorted(known)}")
    dynamo = configs["dynamo"]
    if strategy in ("dynamo", "speculative"):
        check_stats(stats if dynamo.alpha_c > 0 else None, V, model.n_heads)
    sampling = SamplingParams(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, generator=generator)
    out = generate(model, input_ids, mask, strategy=strategy, max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer, dynamo=dynamo,
                   draft=configs["draft"], lookup=configs["lookup"], stats=stats, backend=backend)
    return out if return_dict_in_generate else out.sequences
