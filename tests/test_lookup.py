"""Tests of dynamo_sampling.lookup (per-row n-gram index for prompt-lookup drafting)."""
from __future__ import annotations

import random

import pytest
import torch

from dynamo_sampling.lookup import LookupConfig, NgramIndex, brute_force_drafts

PAD = 0


def left_padded(rows):
    """(input_ids, attention_mask), both (B, S), rows left-padded with PAD."""
    S = max([len(r) for r in rows] + [1])
    ids = torch.tensor([[PAD] * (S - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def drafts_of(index, max_len=None):
    """The index's drafts as python lists, checking the -1 padding on the way, and that the host
    lists the decoder reads (``NgramIndex.drafts``) are the same drafts."""
    draft, draft_len = index.propose(max_len)
    assert draft.shape == (index.batch_size, index.cfg.max_draft) and draft.dtype == torch.long
    assert draft_len.shape == (index.batch_size,) and draft_len.dtype == torch.long
    out = []
    for row, n in zip(draft.tolist(), draft_len.tolist()):
        assert all(t == -1 for t in row[n:])
        out.append(row[:n])
    caps = [index.cfg.max_draft] * index.batch_size if max_len is None else max_len.tolist()
    assert index.drafts(caps) == out
    return out


def single(tokens, cfg=None, max_len=None):
    index = NgramIndex(*left_padded([tokens]), cfg or LookupConfig())
    return drafts_of(index, None if max_len is None else torch.tensor([max_len]))[0]


@pytest.mark.parametrize("max_ngram,min_ngram,max_draft", [(3, 1, 8), (2, 2, 4), (4, 1, 3), (1, 1, 1), (5, 3, 6)])
@pytest.mark.parametrize("vocab", [2, 3, 6])
def test_index_matches_brute_force_incrementally(max_ngram, min_ngram, max_draft, vocab):
    cfg = LookupConfig(max_ngram=max_ngram, min_ngram=min_ngram, max_draft=max_draft)
    rng = random.Random(1000 * vocab + 10 * max_ngram + min_ngram)
    B = 7
    prompt_lens = [0, 1, 2, 40] + [rng.randint(1, 20) for _ in range(B - 4)]  # 40 > _FEW: bulk path
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    index = NgramIndex(*left_padded(seqs), cfg)
    assert index.lengths.tolist() == prompt_lens
    assert drafts_of(index) == brute_force_drafts(seqs, cfg)
    for step in range(40):
        new = [[rng.randrange(vocab) for _ in range(rng.choice([0, 0, 1, 1, 2, 5, 25]))] for _ in range(B)]
        form = step % 3
        if form == 0:
            index.extend(new)
        elif form == 1:
            index.extend([torch.tensor(r, dtype=torch.long) for r in new])
        else:  # (B, T) with junk after each row's count, as the loop's tokens and keep
            T = max(len(r) for r in new) + 1
            tokens = torch.tensor([r + [rng.randrange(vocab)] * (T - len(r)) for r in new], dtype=torch.long)
            index.extend(tokens, torch.tensor([len(r) for r in new]))
        for s, r in zip(seqs, new):
            s.extend(r)
        assert [index.tokens(b) for b in range(B)] == seqs
        expected = brute_force_drafts(seqs, cfg)
        assert drafts_of(index) == expected
        caps = [rng.randint(-1, max_draft + 2) for _ in range(B)]
        assert drafts_of(index, torch.tensor(caps)) == [d[:max(c, 0)] for d, c in zip(expected, caps)]


def _brute_continuation(tokens, extra, cap, cfg):
    """The follower of the latest occurrence, with its follower inside ``tokens``, of the longest suffix
    n-gram of ``tokens + extra`` (n from max_ngram down to min_ngram), by a scan."""
    seq = list(tokens) + list(extra)
    for n in range(cfg.max_ngram, cfg.min_ngram - 1, -1):
        if n >= len(seq):
            continue
        for p in range(len(tokens) - n - 1, -1, -1):
            if seq[p:p + n] == seq[len(seq) - n:]:
                return list(tokens[p + n:p + n + cap]) if cap > 0 else []
    return []


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (2, 2), (1, 1), (4, 2)])
def test_continuation_of_another_draft_matches_a_scan(max_ngram, min_ngram):
    """NgramIndex.continuation (the hybrid's merged drafts): the draft as if another drafter's tokens
    followed the row, from occurrences inside the row, without changing the index."""
    cfg = LookupConfig(max_ngram=max_ngram, min_ngram=min_ngram, max_draft=6)
    rng = random.Random(7 * max_ngram + min_ngram)
    seqs = [[rng.randrange(3) for _ in range(n)] for n in (0, 1, 2, 5, 30, 60)]
    index = NgramIndex(*left_padded(seqs), cfg)
    before = drafts_of(index)
    found = 0
    for b, row in enumerate(seqs):
        for _ in range(30):
            extra = [rng.randrange(3) for _ in range(rng.randint(0, 4))]
            cap = rng.randint(-1, 7)
            got = index.continuation(b, extra, cap)
            assert got == _brute_continuation(row, extra, cap, cfg), (row, extra, cap)
            found += bool(got)
    assert found > 0
    assert drafts_of(index) == before  # nothing was appended


def test_draft_follows_the_most_recent_earlier_occurrence():
    # suffix (1,) occurs at 0 and 2; the latest earlier one (2) is followed by 8, 1
    assert single([1, 7, 1, 8, 1]) == [8, 1]
    assert brute_force_drafts([[1, 7, 1, 8, 1]], LookupConfig()) == [[8, 1]]


def test_longest_ngram_wins_over_more_recent_shorter_one():
    seq = [1, 2, 9, 3, 2, 8, 1, 2]
    assert single(seq, LookupConfig(max_ngram=2)) == [9, 3, 2, 8, 1, 2]  # (1, 2) at 0
    assert single(seq, LookupConfig(max_ngram=1)) == [8, 1, 2]  # (2,) at 4
    assert single(seq, LookupConfig(max_ngram=3, min_ngram=3)) == []  # (8, 1, 2) is new, no back-off


def test_continuation_runs_up_to_the_end_and_may_overlap_the_suffix():
    assert single([5, 1, 2, 3, 9, 1, 2, 3]) == [9, 1, 2, 3]
    assert single([4, 4, 4, 4]) == [4]  # (4, 4, 4) at 0, followed by the suffix's last token
    assert single([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], LookupConfig(max_draft=4)) == [2, 3, 4, 5]


def test_no_earlier_occurrence_and_tiny_prompts():
    assert single([1, 2, 3, 4]) == []
    assert single([3]) == []
    assert single([]) == []
    index = NgramIndex(*left_padded([[3], []]), LookupConfig())
    index.extend([[3], [5]])
    assert drafts_of(index) == [[3], []]
    index.extend([[], [5]])
    assert drafts_of(index) == [[3], [5]]


def test_max_len_caps_the_draft():
    seq = [1, 2, 3, 4, 5, 1, 2]
    assert single(seq) == [3, 4, 5, 1, 2]
    assert single(seq, max_len=0) == []
    assert single(seq, max_len=-3) == []
    assert single(seq, max_len=1) == [3]
    assert single(seq, LookupConfig(max_draft=2), max_len=100) == [3, 4]


def test_left_padding_is_not_part_of_the_row():
    # the pads are 7s too; counting them would make (7,) a repeat
    ids = torch.tensor([[7, 7, 1, 7]])
    mask = torch.tensor([[0, 0, 1, 1]])
    index = NgramIndex(ids, mask, LookupConfig())
    assert index.tokens(0) == [1, 7]
    assert drafts_of(index) == [[]]


def test_propose_device_argument():
    index = NgramIndex(*left_padded([[1, 2, 1]]), LookupConfig())
    draft, draft_len = index.propose(device="cpu")
    assert draft.tolist() == [[2, 1] + [-1] * 6] and draft_len.tolist() == [2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(min_ngram=0), "min_ngram must be >= 1, got 0"),
    (dict(max_ngram=1, min_ngram=2), "max_ngram must be >= min_ngram (2), got 1"),
    (dict(max_draft=0), "max_draft must be >= 1, got 0"),
    (dict(corpus_draft=-1), "corpus_draft must be >= 0, got -1"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        LookupConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="must be"):
        NgramIndex(*left_padded([[1, 2]]), LookupConfig(**kwargs))
    with pytest.raises(ValueError, match="must be"):
        brute_force_drafts([[1, 2]], LookupConfig(**kwargs))


def test_tree_must_be_a_bool_or_none():
    for ok in (None, True, False):
        LookupConfig(tree=ok).validate()
    with pytest.raises(TypeError, match=r"^tree must be a bool or None, got int \(1\)$"):
        LookupConfig(tree=1).validate()


def test_input_validation_messages():
    cfg = LookupConfig()
    ids, mask = left_padded([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"^input_ids must be 2-D \(B, S\), got shape \(2,\)$"):
        NgramIndex(ids[0], mask[0], cfg)
    with pytest.raises(ValueError, match=r"^attention_mask must have the shape of input_ids \(2, 2\), got \(2, 1\)$"):
        NgramIndex(ids, mask[:, :1], cfg)
    index = NgramIndex(ids, mask, cfg)
    with pytest.raises(ValueError, match=r"^extend: expected one token sequence per row \(B=2\), got 1$"):
        index.extend([[1]])
    with pytest.raises(ValueError, match=r"^extend: a tensor of tokens must be \(B=2, T\), got shape \(3, 1\)$"):
        index.extend(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^extend: counts must be \(B=2,\) with a tensor of tokens, got None$"):
        index.extend(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^extend: counts must be in \[0, 1\], got \[2, 0\]$"):
        index.extend(torch.zeros(2, 1, dtype=torch.long), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"^extend: counts is only for a 2-D tensor of tokens"):
        index.extend([[1], [2]], torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"^propose: max_len must be \(B=2,\), got shape \(1,\)$"):
        index.propose(torch.tensor([1]))
    assert index.tokens(0) == [1, 2] and index.tokens(1) == [3]  # failed calls appended nothing


# ---------------------------------------------------------------- corpus drafts


def _corpus(vocab, seed, docs=3, length=60):
    g = random.Random(seed)
    return [[g.randrange(vocab) for _ in range(g.randint(1, length))] for _ in range(docs)]


@pytest.mark.parametrize("vocab,max_order", [(3, 2), (3, 3), (5, 3), (9, 4), (4, 4)])
def test_corpus_drafts_match_a_direct_count_of_the_corpus(vocab, max_order):
    from dynamo_sampling.cooccurrence import CooccurrenceStats
    from dynamo_sampling.lookup import CorpusDrafts, brute_force_corpus_draft
    docs = _corpus(vocab, seed=vocab * 10 + max_order)
    stats = CooccurrenceStats.build(docs, vocab, max_order=max_order)
    for min_count in (1, 2, 4):
        drafter = CorpusDrafts(stats, min_count=min_count)
        g = random.Random(min_count)
        for _ in range(60):
            tail = [g.randrange(vocab) for _ in range(g.randint(1, 5))]
            cap = g.randint(0, 6)
            want = brute_force_corpus_draft(docs, tail, cap, max_order, min_count)
            assert drafter.draft(tail, cap) == want, (tail, cap, min_count)
            assert drafter.draft(tail, cap) == want  # memoised: the same again


def test_corpus_draft_takes_the_most_frequent_follower_and_backs_off():
    from dynamo_sampling.cooccurrence import CooccurrenceStats
    from dynamo_sampling.lookup import CorpusDrafts
    # after (1, 2): 3 twice, 4 once -> 3; after 3: 0 (seen twice); after (9, 2): never seen, so the
    # last token alone: after 2 came 3, 3, 4, 5 -> 3; 7 followed nothing twice: no draft
    docs = [[1, 2, 3, 0], [1, 2, 3, 0], [1, 2, 4], [2, 5], [7, 6]]
    drafter = CorpusDrafts(CooccurrenceStats.build(docs, 10, max_order=3))
    assert drafter.draft([1, 2], 3) == [3, 0]  # (3, 0) then nothing follows 0
    assert drafter.draft([9, 2], 1) == [3]
    assert drafter.draft([7], 2) == []  # seen once: below the minimum count of 2
    assert CorpusDrafts(CooccurrenceStats.build(docs, 10, max_order=3), min_count=1).draft([7], 2) == [6]


def test_corpus_drafts_at_the_largest_vocabulary_the_statistics_allow():
    """V ** 3 == 2 ** 63 (order-3 keys fill int64): the last context's key range ends at 2 ** 63."""
    from dynamo_sampling.cooccurrence import CooccurrenceStats
    from dynamo_sampling.lookup import CorpusDrafts, brute_force_corpus_draft
    V = 1 << 21
    docs = [[V - 1, V - 1, V - 2, V - 1, V - 1, V - 2], [5, 6, 7, 5, 6, 7]]
    drafter = CorpusDrafts(CooccurrenceStats.build(docs, V, max_order=3), min_count=1)
    for tail in ([V - 1, V - 1], [V - 2, V - 1], [5, 6]):
        assert drafter.draft(tail, 4) == brute_force_corpus_draft(docs, tail, 4, 3, 1)
    assert drafter.draft([V - 1, V - 1], 1) == [V - 2]
