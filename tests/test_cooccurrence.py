"""Tests of dynamo_sampling.cooccurrence (n-gram co-occurrence statistics)."""
from __future__ import annotations

import argparse
import io
import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_sampling.cli import add_cooccur, run_cooccur
from dynamo_sampling.cooccurrence import (
    FORMAT_VERSION,
    CooccurrenceStats,
    split_stream,
    tokenizer_fingerprint,
)
from dynamo_sampling.weights import CooccurrenceTables, CooccurrenceWeights

# ---------------------------------------------------------------------------
# hand-written corpus
#   doc A: 0 1 2 0 1        doc B: 2 0 1 3        (V = 5, token 4 never occurs)
# unigrams: 0:3 1:3 2:2 3:1 4:0                      T1 = 9
# bigrams : (0,1):3 (1,2):1 (2,0):2 (1,3):1          T2 = 4 + 3 = 7
# trigrams: (0,1,2):1 (1,2,0):1 (2,0,1):2 (0,1,3):1  T3 = 3 + 2 = 5
# The boundary A|B would add (1,2), (0,1,2), (1,2,0) if n-grams crossed it.
# ---------------------------------------------------------------------------
DOC_A = [0, 1, 2, 0, 1]
DOC_B = [2, 0, 1, 3]
V_HAND = 5


@pytest.fixture(scope="module")
def hand():
    return CooccurrenceStats.build([DOC_A, DOC_B], vocab_size=V_HAND, max_order=3)


def _q(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_hand_counts(hand):
    assert hand.vocab_size == 5
    assert hand.max_order == 3
    assert hand.num_tokens == 9
    assert hand.totals == {1: 9, 2: 7, 3: 5}
    assert hand.num_ngrams == {1: 4, 2: 4, 3: 4}
    assert hand.unigram_counts.tolist() == [3, 3, 2, 1, 0]
    assert hand.count(_q([[0], [1], [2], [3], [4]])).tolist() == [3, 3, 2, 1, 0]
    bigrams = [[0, 1], [1, 2], [2, 0], [1, 3], [0, 0], [3, 2], [4, 4], [2, 1]]
    assert hand.count(_q(bigrams)).tolist() == [3, 1, 2, 1, 0, 0, 0, 0]
    trigrams = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 3], [1, 3, 2], [0, 1, 0], [4, 0, 1]]
    assert hand.count(_q(trigrams)).tolist() == [1, 1, 2, 1, 0, 0, 0]
    keys, counts = hand.table(2)
    # packed keys x1 * 5 + x2, sorted: (0,1)=1 (1,2)=7 (1,3)=8 (2,0)=10
    assert keys.tolist() == [1, 7, 8, 10]
    assert counts.tolist() == [3, 1, 1, 2]
    keys, counts = hand.table(3)
    # (0,1,2)=7 (0,1,3)=8 (1,2,0)=35 (2,0,1)=51
    assert keys.tolist() == [7, 8, 35, 51]
    assert counts.tolist() == [1, 1, 1, 2]
    assert hand.nbytes == 5 * 8 + 4 * 16 + 4 * 16


def test_hand_weights(hand):
    bigrams = _q([[0, 1], [1, 2], [2, 0], [1, 3], [0, 0]])
    trigrams = _q([[2, 0, 1], [0, 1, 2], [1, 2, 0], [0, 1, 3], [3, 3, 3]])
    w = hand.weight(bigrams, alpha_c=1.0)
    assert w.dtype == torch.float32
    # (3/7)/((3/9)(3/9)) = 27/7 ; (1/7)/((3/9)(2/9)) = 27/14 ; (2/7)/((2/9)(3/9)) = 27/7 ; (1/7)/((3/9)(1/9)) = 27/7
    np.testing.assert_allclose(w.numpy(), [3.857142857, 1.928571429, 3.857142857, 3.857142857, 0.0], rtol=1e-6)
    # (2/5)/((2/9)(3/9)(3/9)) = 16.2 ; (1/5)/((3/9)(3/9)(2/9)) = 8.1 ; 8.1 ; (1/5)/((3/9)(3/9)(1/9)) = 16.2
    np.testing.assert_allclose(hand.weight(trigrams).numpy(), [16.2, 8.1, 8.1, 16.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(
        hand.weight(bigrams, alpha_c=0.5).numpy(),
        [1.963961012, 1.388730150, 1.963961012, 1.963961012, 0.0],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        hand.weight(trigrams, alpha_c=0.5).numpy(), [4.024922359, 2.846049894, 2.846049894, 4.024922359, 0.0], rtol=1e-6
    )
    assert hand.weight(bigrams, alpha_c=0.0).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert hand.weight(trigrams, alpha_c=0.0).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert hand.weight(_q([[0], [3], [4]])).tolist() == [1.0, 1.0, 0.0]
    # unseen weight is exactly 0 (not tiny)
    assert hand.weight(_q([[4, 4, 4]]), alpha_c=2.0).item() == 0.0


def test_boundaries_matter():
    one = CooccurrenceStats.build([np.array(DOC_A + DOC_B)], vocab_size=V_HAND, max_order=3)
    assert one.totals == {1: 9, 2: 8, 3: 7}
    assert one.count(_q([[1, 2]])).tolist() == [2]
    assert one.count(_q([[0, 1, 2], [1, 2, 0]])).tolist() == [2, 2]


def test_lookup_shapes(hand):
    q = _q([[[0, 1, 2], [2, 0, 1]], [[4, 4, 4], [0, 1, 3]]])  # [2, 2, 3]
    c = hand.count(q)
    assert c.shape == (2, 2) and c.dtype == torch.int64
    assert c.tolist() == [[1, 2], [0, 1]]
    assert hand.weight(q).shape == (2, 2)
    assert hand.count(torch.zeros(0, 2, dtype=torch.long)).shape == (0,)
    assert hand.weight(torch.zeros(3, 0, 2, dtype=torch.long)).shape == (3, 0)
    # int32 queries and non-contiguous views are accepted
    assert hand.count(q.to(torch.int32)).tolist() == [[1, 2], [0, 1]]
    assert hand.count(q.transpose(0, 1)).tolist() == [[1, 0], [2, 1]]


@pytest.mark.parametrize(
    "make",
    [
        lambda: [np.array(DOC_A, dtype=np.uint8), np.array(DOC_B, dtype=np.int16)],
        lambda: [torch.tensor(DOC_A), torch.tensor(DOC_B, dtype=torch.int32)],
        lambda: (np.array(d, dtype=np.uint64) for d in [DOC_A, [], DOC_B]),
        lambda: [DOC_A, DOC_B],
        lambda: split_stream(np.array([9, *DOC_A, 9, 9, *DOC_B]), separator=9),
    ],
)
def test_input_kinds(hand, make):
    other = CooccurrenceStats.build(make(), vocab_size=V_HAND, max_order=3)
    assert other == hand


def test_single_stream_kinds():
    ref = CooccurrenceStats.build([np.array(DOC_A)], vocab_size=V_HAND)
    for x in ([torch.tensor(DOC_A)], [DOC_A], [np.array(DOC_A, dtype=np.uint64)], np.array([DOC_A]),  # 2-D: rows
              split_stream(torch.tensor(DOC_A), separator=9)):
        assert CooccurrenceStats.build(x, vocab_size=V_HAND) == ref


def test_split_stream():
    docs = split_stream(np.array([7, 0, 1, 7, 7, 2, 7]), separator=7)
    assert [d.tolist() for d in docs] == [[], [0, 1], [], [2], []]
    assert [d.tolist() for d in split_stream([3, 4], separator=7)] == [[3, 4]]
    with pytest.raises(ValueError, match=r"1-D array of token ids, got shape \(1, 2\)"):
        split_stream([[3, 4]], separator=7)


def test_protocols(hand):
    assert isinstance(hand, CooccurrenceTables) and isinstance(hand, CooccurrenceWeights)

    class WeightsOnly:  # what the policy needs, not what the kernels need
        vocab_size, max_order = 5, 3

        def weight(self, ngrams, alpha_c=1.0):
            return torch.ones(ngrams.shape[:-1])

    assert isinstance(WeightsOnly(), CooccurrenceWeights) and not isinstance(WeightsOnly(), CooccurrenceTables)
    tabs = hand.device_tables(torch.device("cpu"))
    assert hand.device_tables("cpu") is tabs  # one cache per device
    assert tabs["keys"][2].tolist() == hand.table(2)[0].tolist()
    assert tabs["counts"][3].tolist() == hand.table(3)[1].tolist()
    assert tabs["uni"].tolist() == [3, 3, 2, 1, 0]


# ---------------------------------------------------------------------------
# property test against a brute-force Counter
# ---------------------------------------------------------------------------
@st.composite
def corpora(draw):
    V = draw(st.integers(1, 6))
    docs = draw(st.lists(st.lists(st.integers(0, V - 1), max_size=25), min_size=1, max_size=6))
    if sum(map(len, docs)) == 0:
        docs.append([draw(st.integers(0, V - 1))])
    max_order = draw(st.integers(2, 4))
    bucket = draw(st.integers(1, 40))
    min_count = draw(st.integers(1, 3))
    single = draw(st.booleans())
    return V, docs, max_order, bucket, min_count, single


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_matches_counter(case):
    V, docs, max_order, bucket, min_count, single = case
    if single:  # one stream: n-grams run across the (now absent) boundaries
        docs = [sum(docs, [])]
        inp = [np.array(docs[0], dtype=np.int64)]
    else:
        inp = [np.array(d, dtype=np.int32) for d in docs]
    s = CooccurrenceStats.build(inp, V, max_order=max_order, min_count=min_count, bucket_tokens=bucket)
    uni = Counter(t for d in docs for t in d)
    T1 = sum(uni.values())
    assert s.num_tokens == T1
    for n in range(1, max_order + 1):
        C = Counter(tuple(d[i : i + n]) for d in docs for i in range(len(d) - n + 1))
        Tn = sum(C.values())
        assert s.totals[n] == Tn
        allgrams = list(itertools.product(range(V), repeat=n))
        expect = [C.get(g, 0) if (n == 1 or C.get(g, 0) >= min_count) else 0 for g in allgrams]
        q = torch.tensor(allgrams, dtype=torch.long).reshape(len(allgrams), n)
        assert s.count(q).tolist() == expect
        if n > 1:
            assert s.num_ngrams[n] == sum(1 for v in C.values() if v >= min_count)
        for alpha in (0.0, 0.5, 1.0):
            w = s.weight(q, alpha_c=alpha).numpy()
            ref = [
                ((c / Tn) / math.prod(uni[x] / T1 for x in g)) ** alpha if c > 0 else 0.0
                for g, c in zip(allgrams, expect)
            ]
            np.testing.assert_allclose(w, ref, rtol=1e-5, atol=0)
            assert ((w == 0) == (np.array(expect) == 0)).all()


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, hand):
    s = CooccurrenceStats.build([DOC_A, DOC_B], V_HAND, max_order=4, tokenizer_fingerprint="abc123")
    path = tmp_path / "stats.bin"  # no .npz suffix: written exactly here
    s.save(path)
    assert path.exists()
    t = CooccurrenceStats.load(path, vocab_size=V_HAND, tokenizer_fingerprint="abc123")
    assert t == s
    assert t.tokenizer_fingerprint == "abc123" and t.max_order == 4 and t.totals == s.totals
    q = _q([[2, 0, 1, 3], [0, 1, 2, 0]])
    assert t.count(q).tolist() == s.count(q).tolist() == [1, 1]
    assert torch.equal(t.weight(q), s.weight(q))
    # compressed, no fingerprint
    hand.save(tmp_path / "h.npz", compress=True)
    h2 = CooccurrenceStats.load(tmp_path / "h.npz")
    assert h2 == hand and h2.tokenizer_fingerprint == ""


def test_load_refuses_mismatch(tmp_path, hand):
    path = tmp_path / "h.npz"
    hand.save(path)
    with pytest.raises(ValueError, match=r"expected vocab_size 8, found vocab_size 5"):
        CooccurrenceStats.load(path, vocab_size=8)
    with pytest.raises(ValueError, match=r"expected tokenizer fingerprint 'ff', found ''"):
        CooccurrenceStats.load(path, tokenizer_fingerprint="ff")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["format_version"] = np.int64(FORMAT_VERSION + 98)
    bad = tmp_path / "bad.npz"
    with open(bad, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=rf"expected format version {FORMAT_VERSION}, found format version {FORMAT_VERSION + 98}"):
        CooccurrenceStats.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ValueError, match="format_version"):
        CooccurrenceStats.load(other)


def _saved_arrays(tmp_path, stats) -> dict:
    """The arrays ``stats.save`` writes, to be damaged one by one."""
    stats.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _with(**changes):
    """An edit of the saved arrays: ``name=array`` replaces an entry, ``name=None`` drops it."""
    def edit(arrays):
        for k, v in changes.items():
            if v is None:
                arrays.pop(k)
            else:
                arrays[k] = v
        return arrays
    return edit


def _write_npz(arrays):
    def write(path, good):
        with open(path, "wb") as f:
            np.savez(f, **arrays(dict(good)))
    return write


def _write_npy(array):
    def write(path, good):
        with open(path, "wb") as f:  # np.save(path) would append .npy to the name
            np.save(f, array)
    return write


def _write_bytes(make):
    def write(path, good):
        path.write_bytes(make(good))
    return write


def _good_bytes(good) -> bytes:
    """The bytes of a valid file, for damaging."""
    buf = io.BytesIO()
    np.savez(buf, **good)
    return buf.getvalue()


def _flip_member_bytes(good) -> bytes:
    """A valid zip directory whose ``unigram_counts`` data fails its CRC check."""
    b = bytearray(_good_bytes(good))
    at = bytes(b).index(b"unigram_counts.npy") + 200  # inside the member's data, past its .npy header
    b[at] ^= 0xFF
    return bytes(b)


MALFORMED_STATS = {
    "truncated": (_write_bytes(lambda g: _good_bytes(g)[:300]), r"found a truncated or damaged zip archive"),
    "random bytes": (_write_bytes(lambda g: np.random.default_rng(0).bytes(300)),
                     r"found data that is not an \.npz archive \(pickled objects are never loaded\)"),
    "empty": (_write_bytes(lambda g: b""), r"found an empty file"),
    "npy": (_write_npy(np.arange(3)),
            r"found a single \.npy array \(shape \(3,\), dtype int64\)"),
    "pickled npy": (_write_npy(np.array([{}], dtype=object)),
                    r"found data that is not an \.npz archive"),
    "damaged member": (_write_bytes(_flip_member_bytes),
                       r"expected entry 'unigram_counts' to hold a plain array, found a damaged array"),
    "object entry": (_write_npz(_with(vocab_size=np.array([{}], dtype=object))),
                     r"expected entry 'vocab_size' to hold a plain array, found pickled objects"),
    "missing unigrams": (_write_npz(_with(unigram_counts=None)), r"expected entry 'unigram_counts' .*, not found"),
    "missing table": (_write_npz(_with(keys_3=None)), r"expected entry 'keys_3' .*, not found"),
    "float unigrams": (_write_npz(_with(unigram_counts=np.ones(V_HAND))),
                       r"expected entry 'unigram_counts' to be an integer 1-D array, found dtype float64"),
    "short unigrams": (_write_npz(_with(unigram_counts=np.ones(V_HAND - 1, dtype=np.int64))),
                       rf"expected unigram_counts of shape \({V_HAND},\)"),
    "array vocab_size": (_write_npz(_with(vocab_size=np.array([5, 5]))),
                         r"expected entry 'vocab_size' to be an integer scalar, found dtype int64 with shape \(2,\)"),
    "numeric fingerprint": (_write_npz(_with(tokenizer_fingerprint=np.int64(3))),
                            r"expected entry 'tokenizer_fingerprint' to be a string scalar"),
    "max_order 7": (_write_npz(_with(max_order=np.int64(7))), r"expected max_order in 2\.\.4"),
    "totals shape": (_write_npz(_with(totals=np.zeros(5, dtype=np.int64))), r"expected totals of shape \(3,\)"),
    "counts shape": (_write_npz(_with(counts_2=np.ones(2, dtype=np.int64))),
                     r"expected keys_2 and counts_2 of equal length"),
    "unsorted keys": (_write_npz(_with(keys_2=np.array([24, 5, 11, 8]))),
                      r"expected keys_2 strictly increasing in \[0, vocab_size\*\*2\)"),
    "key out of range": (_write_npz(_with(keys_2=np.array([5, 8, 11, 25]))), r"expected keys_2 strictly increasing"),
}


@pytest.mark.parametrize("case", list(MALFORMED_STATS))
def test_load_refuses_malformed_file_naming_it(tmp_path, hand, case):
    """Every malformed file: a ValueError naming the file and what was expected, no hint at allow_pickle."""
    write, found = MALFORMED_STATS[case]
    good = _saved_arrays(tmp_path, hand)
    path = tmp_path / "stats.npz"
    write(path, good)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + found) as info:
        CooccurrenceStats.load(path)
    chain, e = [], info.value  # the messages a traceback shows
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    assert not any("allow_pickle" in m or "unsafe" in m for m in chain), chain


def test_load_reports_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        CooccurrenceStats.load(tmp_path / "nope.npz")


# ---------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------
def test_prune(hand):
    p = hand.prune(2)
    assert p is not hand and hand.num_ngrams == {1: 4, 2: 4, 3: 4}  # original untouched
    assert p.num_ngrams == {1: 4, 2: 2, 3: 1}
    assert p.count(_q([[0, 1], [2, 0], [1, 2]])).tolist() == [3, 2, 0]
    assert p.count(_q([[2, 0, 1], [0, 1, 2]])).tolist() == [2, 0]
    # kept weights do not move, pruned ones become 0
    np.testing.assert_allclose(p.weight(_q([[0, 1], [1, 2]])).numpy(), [27 / 7, 0.0], rtol=1e-6)
    rep = p.last_prune_report
    assert rep["min_count"] == 2
    assert rep["ngrams_before"] == {1: 4, 2: 4, 3: 4} and rep["ngrams_after"] == {1: 4, 2: 2, 3: 1}
    assert rep["bytes_before"] == hand.nbytes == 168 and rep["bytes_after"] == p.nbytes == 40 + 32 + 16
    assert p.min_count == 2
    # same as building with min_count
    assert CooccurrenceStats.build([DOC_A, DOC_B], V_HAND, min_count=2) == p


# ---------------------------------------------------------------------------
# errors at the boundary
# ---------------------------------------------------------------------------
def test_build_errors():
    with pytest.raises(ValueError, match=r"must be < vocab_size=5, found 5"):
        CooccurrenceStats.build([DOC_A, [1, 5]], V_HAND)
    with pytest.raises(ValueError, match=r"must be >= 0, found -1"):
        CooccurrenceStats.build([np.array([0, -1, 2])], V_HAND)
    with pytest.raises(TypeError, match=r"integer dtype.*float64"):
        CooccurrenceStats.build([np.array([0.0, 1.0])], V_HAND)
    with pytest.raises(TypeError, match=r"integer tensor.*torch.float32"):
        CooccurrenceStats.build([torch.tensor([0.0, 1.0])], V_HAND)
    for empty in ([], [[], []], [np.zeros(0, dtype=np.int64)], np.zeros(0, dtype=np.int64),
                  [torch.zeros(0, dtype=torch.long)]):
        with pytest.raises(ValueError, match=r"non-empty corpus, got 0 tokens"):
            CooccurrenceStats.build(empty, V_HAND)
    for order in (0, 1, 5):
        with pytest.raises(ValueError, match=rf"max_order must be in 2..4, got {order}"):
            CooccurrenceStats.build([DOC_A], V_HAND, max_order=order)
    with pytest.raises(ValueError, match=r"2\*\*63"):
        CooccurrenceStats.build([DOC_A], 2**32, max_order=2)
    with pytest.raises(ValueError, match=r"min_count must be >= 1, got 0"):
        CooccurrenceStats.build([DOC_A], V_HAND, min_count=0)
    with pytest.raises(ValueError, match=r"document 0: expected a 1-D array.*got shape \(2, 2\)"):
        CooccurrenceStats.build(np.zeros((2, 2, 2), dtype=np.int64), V_HAND)
    # one stream passed bare is refused, with the way to pass it
    for bare in (DOC_A, np.array(DOC_A), torch.tensor(DOC_A)):
        with pytest.raises(ValueError, match=r"document 0: .*got shape \(\).*pass one stream as \[tokens\]"):
            CooccurrenceStats.build(bare, V_HAND)
    with pytest.raises(TypeError, match=r"iterable of 1-D integer arrays, got int"):
        CooccurrenceStats.build(3, V_HAND)


def test_lookup_errors(hand):
    with pytest.raises(ValueError, match=r"last dimension n in 1..3 \(max_order\), got n=4"):
        hand.count(_q([[0, 1, 2, 0]]))
    with pytest.raises(ValueError, match=r"got n=0"):
        hand.weight(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids in \[0, 5\), found 7"):
        hand.count(_q([[0, 7]]))
    with pytest.raises(ValueError, match=r"token ids in \[0, 5\), found -1"):
        hand.weight(_q([[-1, 0]]))
    with pytest.raises(TypeError, match=r"integer tensor"):
        hand.count(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"0-d"):
        hand.count(torch.tensor(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_lookup(hand):
    q = _q([[0, 1, 2], [2, 0, 1], [4, 4, 4]])
    c = hand.count(q.cuda())
    w = hand.weight(q.cuda(), alpha_c=0.5)
    assert c.is_cuda and w.is_cuda
    assert c.cpu().tolist() == hand.count(q).tolist()
    torch.testing.assert_close(w.cpu(), hand.weight(q, alpha_c=0.5))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _train_tokenizer(path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def test_cli(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / ".hidden").mkdir()
    a = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
    b = "import os\n\nfor name in os.listdir('.'):\n    print(name.upper())\n"
    (src / "a.py").write_text(a)
    (src / "pkg" / "b.py").write_text(b)
    (src / "notes.txt").write_text("not python")
    (src / ".hidden" / "c.py").write_text("skipped = True\n")
    tok_path = tmp_path / "tokenizer.json"
    tok = _train_tokenizer(tok_path, [a, b] * 20)
    assert 256 <= tok.get_vocab_size() <= 300

    parser = argparse.ArgumentParser(prog="dynamo-sampling")
    add_cooccur(parser.add_subparsers(dest="command"))
    out = tmp_path / "stats.npz"
    args = parser.parse_args(
        ["cooccur", "--tokenizer", str(tok_path), "--max-order", "3", "--min-count", "1", "--out", str(out), str(src)]
    )
    assert args.func is run_cooccur
    assert run_cooccur(args) == 0
    printed = capsys.readouterr().out
    assert "tokens:" in printed and "distinct 3-grams" in printed and "seconds" in printed

    fp = tokenizer_fingerprint(tok_path)
    assert len(fp) == 64
    loaded = CooccurrenceStats.load(out, vocab_size=tok.get_vocab_size(), tokenizer_fingerprint=fp)
    docs = [np.array(tok.encode(t, add_special_tokens=False).ids) for t in (a, b)]  # walk order: a.py, pkg/b.py
    direct = CooccurrenceStats.build(docs, tok.get_vocab_size(), max_order=3, tokenizer_fingerprint=fp)
    assert loaded == direct
    assert loaded.num_tokens == sum(map(len, docs))
    q = torch.from_numpy(np.stack([docs[0][:3], docs[1][:3]]))
    assert loaded.count(q).tolist() == direct.count(q).tolist()
    assert (loaded.count(q) > 0).all()

    # a missing input is a clean error, not a traceback
    bad = parser.parse_args(["cooccur", "--tokenizer", str(tok_path), "--out", str(out), str(tmp_path / "nope")])
    assert run_cooccur(bad) == 2
    assert "nope" in capsys.readouterr().err
