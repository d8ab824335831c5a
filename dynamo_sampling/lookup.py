"""Per-row n-gram index for prompt-lookup drafting (no heads, no training).

Prompt lookup drafts the tokens that followed the most recent earlier occurrence of the row's
current suffix n-gram in its own tokens so far (prompt + emitted output); one forward of head 1
then verifies the draft. Used by the ``lookup`` strategy of ``dynamo_sampling/decoding.py`` and by
the speculative hybrid drafter, where the lookup draft competes with (or is merged into) the
heads' joint draft.

Semantics, per row with tokens ``t[0..L-1]``: for ``n`` from ``max_ngram`` down to ``min_ngram``,
take the suffix ``t[L-n:L]``; if it occurs at an earlier start ``p < L-n``, the draft is
``t[p+n : p+n+max_draft]`` for the largest such ``p`` (it stops at the end of the row and may
overlap the suffix). The first ``n`` with a match wins; no match gives an empty draft.

:class:`NgramIndex` keeps, per row, a dict from every n-gram (a tuple of ``n`` ints,
``min_ngram <= n <= max_ngram``) to the start of its latest occurrence that has at least one
token after it. That is exactly the set of occurrences other than the suffix itself, so a lookup
is ``max_ngram - min_ngram + 1`` dict probes, and :meth:`NgramIndex.extend` costs
``O(appended tokens * n-gram sizes)``, independent of the row's length. Everything lives on the
host: the loop brings the committed tokens back once per step anyway. :func:`brute_force_drafts`
is the plain scan with the same semantics, kept beside it for the tests.

Use in a step (the first token is drawn exactly from head 1 and always kept, so it is committed
before drafting)::

    index = NgramIndex(input_ids, attention_mask, LookupConfig())
    ...
    index.extend(first[:, None], active.long())        # finished rows append nothing
    draft, draft_len = index.propose(max_len=remaining - 1)
    ... verify [first, draft] ...; keep (B,) tokens kept, first included
    index.extend(tokens[:, 1:], (keep - 1).clamp(min=0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["LookupConfig", "NgramIndex", "brute_force_drafts", "CorpusDrafts", "brute_force_corpus_draft"]


@dataclass
class LookupConfig:
    """Prompt-lookup drafting settings."""

    max_ngram: int = 3  # the longest suffix tried first: longer matches are more often right
    min_ngram: int = 1  # back off down to this size; 1 drafts after any repeated token
    max_draft: int = 8  # draft tokens per row and step (D); the verify forward feeds 1 + D
    # where co-occurrence statistics are given and drafts are sized by cost (DraftConfig.size_by): a second
    # lookup draft, from the corpus (CorpusDrafts), of at most this many tokens (and max_draft), competing
    # with the row's own; 0: none (prompt lookup alone, as transformers has it)
    corpus_draft: int = 4
    # lookup trees: with corpus drafts, on a CPU, with a model that takes tree feeds (TinyMTP), the losing
    # draft of the two is verified beside the winner in the same forward, as a second branch, where that is
    # worth its cost. None: the lookup strategy with one row (B = 1), where it was measured to pay (README,
    # "Lookup trees"; level in speculative; in a batch every row pays for the widest row's tokens). True: in
    # lookup and speculative at any batch size; False: never
    tree: Optional[bool] = None

    def validate(self):
        """Check every field's type and range (``TypeError`` / ``ValueError`` naming it); numpy
        integers become ints, bools are refused."""
        import numbers
        for name in ("max_ngram", "min_ngram", "max_draft", "corpus_draft"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
            setattr(self, name, int(value))
        if self.tree is not None:
            if not isinstance(self.tree, bool) and type(self.tree).__name__ != "bool_":
                raise TypeError(f"tree must be a bool or None, got {type(self.tree).__name__} ({self.tree!r})")
            self.tree = bool(self.tree)
        if self.min_ngram < 1:
            raise ValueError(f"min_ngram must be >= 1, got {self.min_ngram}")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"max_ngram must be >= min_ngram ({self.min_ngram}), got {self.max_ngram}")
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.corpus_draft < 0:
            raise ValueError(f"corpus_draft must be >= 0, got {self.corpus_draft}")


# Appends up to this many tokens take the per-token loop (cheapest for one step's few tokens);
# longer ones (prompts) the dict.update path (~3x faster per token there). Same index either way.
_FEW = 16

RowTokens = Union[torch.Tensor, Sequence[int]]


class NgramIndex:
    """The rows' tokens so far and, per row, the latest earlier start of every n-gram.

    Parameters
    ----------
    input_ids : LongTensor (B, S)
        Prompts, left-padded.
    attention_mask : Tensor (B, S)
        1 on prompt tokens, 0 on padding; a row's tokens are its ``input_ids`` where the mask is 1,
        in order. Any device; read once.
    cfg : LookupConfig
        Validated here.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: LookupConfig):
        cfg.validate()
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (B, S), got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        self.cfg = cfg
        self.batch_size = input_ids.shape[0]
        self._sizes = range(cfg.min_ngram, cfg.max_ngram + 1)
        self._tokens: List[List[int]] = [[] for _ in range(self.batch_size)]
        self._last: List[Dict[Tuple[int, ...], int]] = [{} for _ in range(self.batch_size)]
        ids, mask = input_ids.tolist(), attention_mask.bool().tolist()
        for b in range(self.batch_size):
            self._append(b, [t for t, m in zip(ids[b], mask[b]) if m])

    def _append(self, b: int, new: List[int]):
        tokens, last = self._tokens[b], self._last[b]
        if len(new) <= _FEW:
            for tok in new:
                i = len(tokens)  # the n-grams ending at i-1 get a follower: they become lookup targets
                for n in self._sizes:
                    if n > i:
                        break
                    last[tuple(tokens[i - n:i])] = i - n
                tokens.append(tok)
            return
        old_len = len(tokens)  # bulk path (prompts): the same inserts, done by dict.update
        tokens.extend(new)
        for n in self._sizes:
            # starts s whose n-gram just got its first follower: s + n in [old_len, len - 1]
            lo, hi = max(old_len - n, 0), len(tokens) - n
            if hi > lo:  # in increasing s, so the latest start of a repeated n-gram wins
                last.update(zip(zip(*[tokens[lo + j:hi + j] for j in range(n)]), range(lo, hi)))

    def extend(self, tokens: Union[torch.Tensor, Sequence[RowTokens]], counts: Optional[torch.Tensor] = None):
        """Append each row's newly committed tokens and index them.

        Parameters
        ----------
        tokens : sequence of B rows, or LongTensor (B, T)
            Either one 1-D LongTensor or list of ints per row (possibly empty), or a 2-D tensor
            of which row ``b`` contributes ``tokens[b, :counts[b]]`` (one host copy for the batch).
        counts : LongTensor (B,), optional
            Required with a 2-D ``tokens`` tensor, each in ``0..T``; not allowed otherwise.
        """
        B = self.batch_size
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.shape[0] != B:
                raise ValueError(f"extend: a tensor of tokens must be (B={B}, T), got shape {tuple(tokens.shape)}")
            if counts is None or counts.shape != (B,):
                got = None if counts is None else tuple(counts.shape)
                raise ValueError(f"extend: counts must be (B={B},) with a tensor of tokens, got {got}")
            T = tokens.shape[1]
            counts_list = counts.tolist()
            if any(c < 0 or c > T for c in counts_list):
                raise ValueError(f"extend: counts must be in [0, {T}], got {counts_list}")
            rows = [row[:c] for row, c in zip(tokens.tolist(), counts_list)]
        else:
            if counts is not None:
                raise ValueError("extend: counts is only for a 2-D tensor of tokens, got per-row sequences")
            if len(tokens) != B:
                raise ValueError(f"extend: expected one token sequence per row (B={B}), got {len(tokens)}")
            rows = [row.tolist() if isinstance(row, torch.Tensor) else list(row) for row in tokens]
        for b, new in enumerate(rows):
            if new:
                self._append(b, new)

    def select(self, rows: Sequence[int]):
        """Keep only the rows ``rows`` (in the new order), e.g. when finished rows leave a batch."""
        self._tokens = [self._tokens[b] for b in rows]
        self._last = [self._last[b] for b in rows]
        self.batch_size = len(rows)

    def propose(self, max_len: Optional[torch.Tensor] = None,
                device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's lookup draft.

        Parameters
        ----------
        max_len : LongTensor (B,), optional
            Per-row cap on the draft length (e.g. the tokens the row may still emit after the one
            being committed); values <= 0 give an empty draft. ``None``: ``cfg.max_draft``.
        device : torch.device, optional
            Where the results go (one copy each); default CPU.

        Returns
        -------
        draft : LongTensor (B, D), ``D = cfg.max_draft``
            Row ``b``'s draft left-aligned, -1 after ``draft_len[b]``.
        draft_len : LongTensor (B,)
            In ``0..D``; 0 where the row has no earlier occurrence of any suffix n-gram.
        """
        B, D = self.batch_size, self.cfg.max_draft
        if max_len is None:
            caps = [D] * B
        else:
            if max_len.shape != (B,):
                raise ValueError(f"propose: max_len must be (B={B},), got shape {tuple(max_len.shape)}")
            caps = max_len.tolist()
        drafts = self.drafts(caps)
        return (torch.tensor([d + [-1] * (D - len(d)) for d in drafts], dtype=torch.long, device=device).view(B, D),
                torch.tensor([len(d) for d in drafts], dtype=torch.long, device=device))

    def drafts(self, caps: Sequence[int]) -> List[List[int]]:
        """:meth:`propose` as host lists: row ``b``'s draft, at most ``min(caps[b], max_draft)``
        tokens (none where ``caps[b] <= 0``), unpadded."""
        D = self.cfg.max_draft
        return [self.continuation(b, (), min(cap, D)) for b, cap in enumerate(caps)]

    def continuation(self, b: int, extra: Sequence[int], cap: int) -> List[int]:
        """Row ``b``'s draft as if ``extra`` followed its tokens (another drafter's draft, to be
        continued), without appending it: the follower of the latest earlier occurrence, within the
        row's tokens so far, of the longest suffix n-gram of ``tokens + extra``; at most ``cap`` tokens."""
        tokens, last = self._tokens[b], self._last[b]
        if cap <= 0:
            return []
        tail = tokens[max(len(tokens) - self.cfg.max_ngram, 0):] + list(extra)
        L = len(tokens) + len(extra)
        for n in reversed(self._sizes):
            if n >= L:  # the suffix needs an earlier start p >= 0 with p < L - n
                continue
            p = last.get(tuple(tail[len(tail) - n:]))
            if p is not None:
                return tokens[p + n:p + n + cap]
        return []

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor (B,): tokens per row so far (prompt + appended)."""
        return torch.tensor([len(t) for t in self._tokens], dtype=torch.long)

    def tokens(self, b: int) -> List[int]:
        """Row ``b``'s tokens so far, as a new list."""
        return list(self._tokens[b])

    def tail(self, b: int, n: int) -> Tuple[int, ...]:
        """Row ``b``'s last ``n`` tokens (fewer if it has fewer)."""
        return tuple(self._tokens[b][-n:]) if n > 0 else ()


def brute_force_drafts(sequences: Sequence[Sequence[int]], cfg: LookupConfig) -> List[List[int]]:
    """The reference: a backwards scan of each row for its suffix n-gram, same semantics.

    Parameters
    ----------
    sequences : B lists of ints
        Each row's tokens so far.
    cfg : LookupConfig

    Returns
    -------
    list of B lists of ints
        Each row's draft, at most ``cfg.max_draft`` tokens, empty where nothing matches.
    """
    cfg.validate()
    drafts = []
    for seq in sequences:
        seq, L, draft = list(seq), len(seq), []
        for n in range(cfg.max_ngram, cfg.min_ngram - 1, -1):
            if n >= L:  # no room for an earlier occurrence
                continue
            suffix = seq[L - n:]
            match = next((p for p in range(L - n - 1, -1, -1) if seq[p:p + n] == suffix), None)
            if match is not None:
                draft = seq[match + n:match + n + cfg.max_draft]
                break
        drafts.append(draft)
    return drafts


# ---------------------------------------------------------------- drafts from the corpus

# a context seen fewer times than this in the corpus drafts nothing (backs off to a shorter one)
CORPUS_MIN_COUNT = 2
_INT64_MAX = (1 << 63) - 1


class CorpusDrafts:
    """Drafts from the training corpus's n-gram counts: the co-occurrence statistics the joint
    already reads (a ``CooccurrenceStats``: sorted packed keys of every n-gram, n = 2..max_order).

    After a row's tokens, the next draft token is the one that most often followed its last
    ``max_order - 1`` tokens in the corpus (ties: the smallest id); where that context was seen
    fewer than :data:`CORPUS_MIN_COUNT` times (summed over the stored n-grams that start with it),
    the last ``max_order - 2`` tokens, ..., down to the last token alone; nothing where even that
    fails. A draft chains this, each drafted token becoming part of the next context. A small model
    trained on the corpus writes much of what the corpus says next, where its own prompt holds no
    earlier copy (prompt lookup's source) and where its heads are unsure.

    One lookup is a binary search of each order's keys for the range of n-grams that start with the
    context (``x1 * V ** (n-1) + ... + x_{n-1} * V`` up to ``+ V``), memoised per context.
    :func:`brute_force_corpus_draft` counts the corpus directly, same semantics, for the tests."""

    def __init__(self, stats, min_count: Optional[int] = None):
        self.V = int(stats.vocab_size)
        self.context = int(stats.max_order) - 1  # tokens of context at the longest
        self.tables = {n: stats.table(n) for n in range(2, int(stats.max_order) + 1)}
        self.min_count = CORPUS_MIN_COUNT if min_count is None else min_count
        self._next: Dict[Tuple[int, ...], Optional[int]] = {}

    def next_token(self, context: Tuple[int, ...]) -> Optional[int]:
        """The corpus's most frequent follower of ``context`` (its last ``max_order - 1`` tokens
        are read), backing off to shorter contexts; None where no context qualifies."""
        context = tuple(context[len(context) - self.context:]) if len(context) > self.context else tuple(context)
        hit = self._next.get(context, -1)
        if hit != -1:
            return hit
        V, out = self.V, None
        for m in range(len(context), 0, -1):  # m context tokens: the order m + 1 table
            keys, counts = self.tables[m + 1]
            base = 0
            for t in context[len(context) - m:]:
                base = base * V + t
            base *= V
            lo, hi = keys.searchsorted((base, min(base + V, _INT64_MAX)))  # V ** max_order may be 2 ** 63
            if hi > lo:
                c = counts[lo:hi]
                if int(c.sum()) >= self.min_count:
                    out = int(keys[lo + int(c.argmax())] - base)
                    break
        self._next[context] = out
        return out

    def draft(self, tail: Sequence[int], cap: int) -> List[int]:
        """At most ``cap`` tokens after ``tail`` (a row's last tokens; ``max_order - 1`` are read)."""
        context, out = tuple(tail), []
        while len(out) < cap:
            t = self.next_token(context)
            if t is None:
                break
            out.append(t)
            context = (context + (t,))[-self.context:]
        return out


def brute_force_corpus_draft(documents: Sequence[Sequence[int]], tail: Sequence[int], cap: int, max_order: int,
                             min_count: int = CORPUS_MIN_COUNT) -> List[int]:
    """The reference for :class:`CorpusDrafts`: count every n-gram of ``documents`` (lists of ints;
    n-grams do not cross documents) and chain the same backed-off argmax, ties to the smallest id."""
    from collections import Counter
    counts = Counter()
    for doc in documents:
        doc = list(doc)
        for n in range(2, max_order + 1):
            for i in range(len(doc) - n + 1):
                counts[tuple(doc[i:i + n])] += 1
    context, out = list(tail)[max(len(tail) - (max_order - 1), 0):], []
    while len(out) < cap:
        pick = None
        for m in range(len(context), 0, -1):
            ctx = tuple(context[len(context) - m:])
            follow = {g[-1]: c for g, c in counts.items() if len(g) == m + 1 and g[:-1] == ctx}
            if sum(follow.values()) >= min_count:
                pick = min(follow, key=lambda t: (-follow[t], t))
                break
        if pick is None:
            break
        out.append(pick)
        context = (context + [pick])[-(max_order - 1):]
    return out
