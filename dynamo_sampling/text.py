"""Text in, text out: ``generate_text`` wraps tokenising, left padding, ``sample()`` and decoding
(used by the README's first example, the CLI and users who hold strings, not token ids)."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .decoding import GenerationOutput
from .sampling import sample


def encode_batch(tokenizer, prompts: Sequence[str], device="cpu", max_prompt_tokens=None, truncate: str = "none"):
    """Tokenise and left-pad. Returns (input_ids (B, S) int64, attention_mask (B, S) int64).

    ``max_prompt_tokens`` with ``truncate="left"`` keeps each prompt's last tokens; with
    ``truncate="none"`` a longer prompt is a ``ValueError`` naming the maximum."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings; got "
                        f"{sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})}")
    if truncate not in ("none", "left"):
        raise ValueError(f"truncate must be 'none' or 'left', got {truncate!r}")
    enc = [tokenizer.encode(p).ids for p in prompts]
    for i, ids in enumerate(enc):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens; every prompt needs at least one")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            if truncate == "none":
                raise ValueError(f"prompt {i} has {len(ids)} tokens; at most {max_prompt_tokens} fit the model's "
                                 f"context with max_new_tokens (truncate='left' keeps the last {max_prompt_tokens})")
            enc[i] = ids[-max_prompt_tokens:]
    S = max(map(len, enc))
    input_ids = torch.tensor([[0] * (S - len(e)) + e for e in enc], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * (S - len(e)) + [1] * len(e) for e in enc], dtype=torch.long, device=device)
    return input_ids, attention_mask


def generate_text(model, tokenizer, prompts: Sequence[str], *, strategy: str = "speculative",
                  max_new_tokens: int = 64, eos_token_id=0, truncate: str = "none",
                  return_dict_in_generate: bool = False,
                  **sample_kwargs) -> Union[List[str], Tuple[List[str], GenerationOutput]]:
    """Complete each prompt; returns the new text of each (cut after its first EOS, which is dropped).

    Parameters
    ----------
    model, tokenizer : an MTP model and its ``tokenizers.Tokenizer`` (as ``load_pretrained`` returns).
    prompts : list of str.
    strategy, max_new_tokens, eos_token_id, **sample_kwargs : as :func:`dynamo_sampling.sample`
        (``eos_token_id`` default 0, the bundled tokenizer's end-of-text; None never stops early).
    truncate : "none" (a prompt that leaves no room for ``max_new_tokens`` in the context is a
        ``ValueError``) or "left" (keep its last tokens).
    return_dict_in_generate : also return the :class:`GenerationOutput` (statistics).

    Returns
    -------
    list of str, or (list of str, GenerationOutput).
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    room = model.max_seq_len - max_new_tokens if isinstance(max_new_tokens, int) else None
    input_ids, attention_mask = encode_batch(tokenizer, prompts, device, room if room and room > 0 else None,
                                             truncate)
    out = sample(model, input_ids, attention_mask, strategy=strategy, max_new_tokens=max_new_tokens,
                 eos_token_id=eos_token_id, return_dict_in_generate=True, **sample_kwargs)
    S = input_ids.shape[1]
    eos = set([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    texts = []
    for b in range(len(prompts)):
        new = out.sequences[b, S:S + int(out.new_tokens[b])].tolist()
        if new and new[-1] in eos:
            new = new[:-1]
        texts.append(tokenizer.decode(new, skip_special_tokens=False))
    return (texts, out) if return_dict_in_generate else texts
