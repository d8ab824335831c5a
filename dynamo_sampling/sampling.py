"""``sample()``: the public entry point (validates once, then runs ``decoding.generate``)."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .decoding import STRATEGIES, DraftConfig, GenerationOutput, generate
from .graphs import cuda_capture
from .kernels import resolve_backend
from .lookup import LookupConfig
from .policy import DynamoConfig
from .samplers import SamplingParams
from .weights import check_stats

_CONFIGS = {"dynamo": DynamoConfig, "draft": DraftConfig, "lookup": LookupConfig}


def sample(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
           strategy: str = "dynamo", max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 0.7, top_k: Optional[int] = 50,
           eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None, streamer=None,
           return_dict_in_generate: bool = False, stats=None, dynamo: Optional[DynamoConfig] = None,
           draft: Optional[DraftConfig] = None, lookup: Optional[LookupConfig] = None,
           backend: str = "auto", cuda_graph: bool = False, **overrides) -> Union[torch.Tensor, GenerationOutput]:
    """Generate with an MTP model, several tokens per forward pass.

    Parameters
    ----------
    model : an MTP model (``forward(input_ids, positions, cache, heads)``, ``new_cache``,
        ``head_logits``, ``vocab_size``, ``n_heads``, ``max_seq_len``), e.g. :class:`TinyMTP`.
    input_ids : integer tensor, shape (B, S); prompts, left-padded when ragged. Ids at padded
        positions (``attention_mask`` 0) are ignored: any value is accepted there, the model sees
        token 0 in their place, and the returned prompt part is ``input_ids`` as given.
    attention_mask : LongTensor or BoolTensor, shape (B, S), or None (all ones); 1 for prompt
        tokens, 0 for left padding.
    strategy : ``"ar"`` (head 1, one token per step), ``"dynamo"`` (DynaMo, lossy),
        ``"speculative"`` (the heads' joint drafts, and prompt-lookup drafts where they promise more,
        verified by head 1: output distributed exactly as ``ar``) or ``"lookup"`` (prompt-lookup
        drafts only, no heads: the baseline for a model without MTP heads; also exact).
    max_new_tokens : int >= 1; every row stops after this many new tokens or an EOS.
    do_sample : bool; greedy (False) or sampling (True).
    temperature : real number; finite and > 0 when sampling (default 0.7, as in DynaMo); unused
        when greedy.
    top_k : int >= 1 or None; head 1's sampler keeps the top_k logits (None: all).
    eos_token_id : int, sequence of int (list, tuple, 1-D tensor) or None; ids in [0, V).
    pad_token_id : int in [0, V) used after a row stops (default: the first EOS id, else 0).
        Wherever an int is expected (here and in ``**overrides``), numpy integers are accepted and
        bools are not.
    generator : torch.Generator on the model's device; the same seed gives the same tokens.
    streamer : object with ``put(tokens)`` and ``end()``; ``put`` receives, after every step, a list
        of B 1-D LongTensors holding each row's new tokens (possibly empty).
    return_dict_in_generate : return a :class:`GenerationOutput` with statistics.
    stats : co-occurrence statistics (a ``CooccurrenceStats``; a saved file is loaded with
        ``CooccurrenceStats.load(path)``) or None (no weighting).
    dynamo : DynamoConfig (the step policy); draft : DraftConfig (how speculative and lookup size
        drafts); lookup : LookupConfig (prompt-lookup n-gram sizes and draft length).
        ``**overrides`` (e.g. ``eps_b=0.2``, ``max_draft=6``, ``size_by="thresholds"``) replace the
        fields of whichever of the three has that name.
    backend : ``"auto"`` (fused CUDA kernels for CUDA tensors when CuPy is importable, else the
        torch reference), ``"torch"`` or ``"cuda"``; the step policy's implementation.
    cuda_graph : bool; replay each step's model forward from a captured CUDA graph (one capture per
        feed shape; the loop's feed width is fixed on a GPU, so one or two). Needs a model on a CUDA
        device whose forward has no host sync (``model.supports_cuda_graph``, e.g. :class:`TinyMTP`).
        Same tokens as without; a small model's step stops being bound by kernel launches.

    Returns
    -------
    LongTensor (B, S + max_new_tokens) of prompt + new tokens (rows that stop early are padded with
    ``pad_token_id``), or a :class:`GenerationOutput` when ``return_dict_in_generate``.

    Raises
    ------
    TypeError : an argument of the wrong type (the message names it, what was expected and what came).
    ValueError : an argument of the right type with a value out of range (likewise), or NaN logits.
    """
    _check_model(model)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of shape (batch, seq_len), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one prompt token per row, got shape {tuple(input_ids.shape)}")
    given_ids, S = input_ids, input_ids.shape[1]
    input_ids = input_ids.long()
    V = model.vocab_size
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of the shape of input_ids {tuple(input_ids.shape)} "
                        f"or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_complex or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.to(input_ids.device).bool()
    if bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError("attention_mask must be left-padded (zeros, then ones, per row); got a 0 after a 1")
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"every prompt needs at least one token; rows {(lengths == 0).nonzero().flatten().tolist()} are empty")
    real = input_ids[mask]
    if bool(((real < 0) | (real >= V)).any()):
        bad = real[(real < 0) | (real >= V)]
        raise ValueError(f"input_ids must be in [0, {V}) (the model's vocabulary), got {bad[0].item()}")
    input_ids = input_ids.masked_fill(~mask, 0)  # padded positions are never read: the model sees token 0 there
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, one of {STRATEGIES}, got {_show(strategy)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, "an int >= 1", lo=1)
    total = int(lengths.max()) + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"the model's context of {model.max_seq_len} tokens")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise TypeError(f"do_sample must be a bool, got {_show(do_sample)}")
    do_sample = bool(do_sample)
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number (a float > 0), got {_show(temperature)}")
    temperature = float(temperature)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if do_sample and temperature == math.inf:
        raise ValueError(f"temperature must be finite when do_sample=True, got {temperature}")
    if top_k is not None:
        top_k = _check_int("top_k", top_k, "an int >= 1 or None", lo=1)
    eos_token_id = _check_eos(eos_token_id, V)
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if eos_token_id else 0
    pad_token_id = _check_int("pad_token_id", pad_token_id, f"an int in [0, {V}) or None", lo=0, hi=V - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise TypeError(f"streamer must have put(tokens) and end() methods, got {type(streamer).__name__}")
    if not isinstance(return_dict_in_generate, (bool, np.bool_)):
        raise TypeError(f"return_dict_in_generate must be a bool, got {_show(return_dict_in_generate)}")
    if stats is not None and not all(hasattr(stats, a) for a in _STATS_INTERFACE):
        hint = " (a file path? load it with CooccurrenceStats.load(path))" if isinstance(stats, (str, os.PathLike)) \
            else ""
        raise TypeError(f"stats must be co-occurrence statistics (an object with {', '.join(_STATS_INTERFACE)}, "
                        f"e.g. CooccurrenceStats.load(path)) or None, got {_show(stats)}{hint}")
    backend = resolve_backend(backend, input_ids)
    if not isinstance(cuda_graph, (bool, np.bool_)):
        raise TypeError(f"cuda_graph must be a bool, got {_show(cuda_graph)}")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, got {input_ids.device}")
    if cuda_graph and not getattr(model, "supports_cuda_graph", False):
        raise ValueError(f"cuda_graph=True needs a model whose forward can be captured "
                         f"(supports_cuda_graph = True), got {type(model).__name__}")
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
    if configs["lookup"].max_draft > max_new_tokens:  # no draft can be longer: keep the loop's buffers small
        configs["lookup"] = dataclasses.replace(configs["lookup"], max_draft=max_new_tokens)
    dynamo = configs["dynamo"]
    if strategy in ("dynamo", "speculative"):
        check_stats(stats if dynamo.alpha_c > 0 else None, V, model.n_heads)
    if strategy in ("lookup", "speculative") and configs["lookup"].corpus_draft > 0:
        check_stats(stats, V, 1)  # corpus drafts read its n-grams: the model's vocabulary
    sampling = SamplingParams(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, generator=generator)
    out = generate(model, input_ids, mask, strategy=strategy, max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer, dynamo=dynamo,
                   draft=configs["draft"], lookup=configs["lookup"], stats=stats, backend=backend,
                   graph_capture=cuda_capture if cuda_graph else None)
    if not bool(mask.all()):  # the prompt as given, padded positions included
        out = dataclasses.replace(out, sequences=torch.cat([given_ids.long(), out.sequences[:, S:]], dim=1))
    return out if return_dict_in_generate else out.sequences


def _show(value) -> str:
    """``type (repr)`` of a rejected argument, the repr cut to 60 characters."""
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def _check_int(name: str, value, expected: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int: Python and numpy integers pass, bools (and everything else) raise
    ``TypeError``; outside ``[lo, hi]`` raises ``ValueError``. ``expected`` names what is wanted."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {_show(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _check_eos(eos_token_id, V: int) -> list:
    """None, an int or a sequence (list, tuple, 1-D tensor or array) of ints in [0, V) -> list of int."""
    expected = f"an int in [0, {V}), a sequence of them, or None"
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (torch.Tensor, np.ndarray)) and eos_token_id.ndim <= 1:
        eos_token_id = eos_token_id.reshape(-1).tolist()  # floats and bools stay so, and are refused below
    if isinstance(eos_token_id, (str, bytes)) or not isinstance(eos_token_id, (numbers.Integral, Sequence)):
        raise TypeError(f"eos_token_id must be {expected}, got {_show(eos_token_id)}")
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    return [_check_int("eos_token_id", e, expected, lo=0, hi=V - 1) for e in ids]


_STATS_INTERFACE = ("weight", "vocab_size", "max_order")
_MODEL_INTERFACE = ("new_cache", "head_logits", "vocab_size", "n_heads", "max_seq_len")


def _check_model(model):
    missing = [a for a in _MODEL_INTERFACE if not hasattr(model, a)]
    if missing or not callable(model):
        raise TypeError(f"model must be a callable MTP model with {', '.join(_MODEL_INTERFACE)} (e.g. TinyMTP), "
                        f"got {type(model).__name__} missing {missing or ['__call__']}")
