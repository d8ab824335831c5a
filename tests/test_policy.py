"""The DynaMo step policy: thresholds, back-off, co-occurrence masking, the sparse lookups."""
import itertools

import numpy as np
import pytest
import torch

from dynamo_sampling import DynamoConfig, dynamo_step
from dynamo_sampling.cooccurrence import CooccurrenceStats
from dynamo_sampling.policy import _blur, _WindowWeights, otsu_threshold


def test_otsu_splits_two_clusters():
    values = torch.tensor([[0.01, 0.02, 0.015, 0.9, 0.95, 0.0]])
    valid = values > 0
    thr = otsu_threshold(values, valid, bins=256)
    kept = (values >= thr[:, None]) & valid
    assert kept.tolist() == [[False, False, False, True, True, False]]


def test_otsu_degenerate_row_keeps_everything():
    values = torch.tensor([[0.3, 0.3, 0.0]])
    thr = otsu_threshold(values, values > 0, bins=16)
    assert thr.item() == pytest.approx(0.3)


def test_blur_is_separable_3_tap_gaussian():
    k, n = 3, 2
    J = torch.zeros(1, k ** n)
    J[0, 4] = 1.0  # centre of a 3x3 grid
    out = _blur(J, n, k, sigma=1.0).view(3, 3)
    side = float(np.exp(-0.5))
    taps = torch.tensor([side, 1.0, side], dtype=torch.float32) / (1 + 2 * side)
    assert torch.allclose(out, taps[:, None] * taps[None, :], atol=1e-7)


def _logits_from_probs(p):
    return torch.log(torch.as_tensor(p, dtype=torch.float32))


def test_static_threshold_and_back_off_orders():
    # two heads, confident (0.9 each): J max = 0.81
    V = 4
    probs = torch.full((1, 2, V), 0.1 / 3)
    probs[0, :, 1] = 0.9
    logits = _logits_from_probs(probs)
    cfg = DynamoConfig(k=4, adaptive_threshold=False, repetition_penalty=1.0)
    for eps_b, n in [(0.0, 2), (0.8, 2), (0.82, 1), (1.0, 1)]:
        out = dynamo_step(logits, DynamoConfig(**{**cfg.__dict__, "eps_b": eps_b}))
        assert out.n.item() == n, eps_b
        assert out.tokens[0, 0].item() == 1


def test_repetition_penalty_changes_choice():
    V = 4
    probs = torch.tensor([[[0.5, 0.45, 0.03, 0.02], [0.5, 0.45, 0.03, 0.02]]])
    logits = _logits_from_probs(probs)
    cfg = DynamoConfig(k=4, eps_b=0.0, adaptive_threshold=False, repetition_penalty=2.0)
    seen = torch.zeros(1, V, dtype=torch.bool)
    assert dynamo_step(logits, cfg, seen_tokens=seen).tokens[0].tolist() == [0, 0]
    seen[0, 0] = True
    assert dynamo_step(logits, cfg, seen_tokens=seen).tokens[0].tolist() == [1, 1]


@pytest.fixture(scope="module")
def stats_b_after_a():
    rng = np.random.default_rng(0)
    V, a, b = 40, 7, 11
    toks = rng.integers(0, V, 20000)
    toks[toks == a] = 0
    pos = rng.choice(len(toks) - 1, 500, replace=False)
    toks[pos] = a
    toks[pos + 1] = b  # b always follows a
    toks[-1] = 3
    return CooccurrenceStats.build(toks, vocab_size=V, max_order=3), a, b


@pytest.mark.parametrize("do_sample", [False, True])
def test_never_emits_unseen_pair_after_a(stats_b_after_a, do_sample):
    stats, a, b = stats_b_after_a
    V = stats.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 3, V, generator=g)
    logits[:, 0, a] = 8.0  # head 1 is sure about a
    logits[:, 1, b] = -8.0  # head 2 dislikes b: without statistics (a, c != b) would win
    cfg = DynamoConfig(k=10, eps_b=0.0, alpha_c=1.0)
    out = dynamo_step(logits, cfg, stats=stats, do_sample=do_sample, generator=g)
    rows = (out.tokens[:, 0] == a) & (out.n >= 2)
    assert rows.sum() == 0 or (out.tokens[rows, 1] == b).all()
    # with statistics off, the heads' favourite (a, c != b) pairs do get emitted
    off = dynamo_step(logits, DynamoConfig(k=10, eps_b=0.0, alpha_c=0.0), do_sample=do_sample, generator=g)
    assert ((off.tokens[:, 0] == a) & (off.tokens[:, 1] != b)).any()


@pytest.mark.parametrize("alpha_c", [0.5, 1.0])
def test_sparse_window_lookup_equals_dense_lookup(stats_b_after_a, alpha_c):
    """Reference: look every k**n cell up directly."""
    stats, _, _ = stats_b_after_a
    g = torch.Generator().manual_seed(1)
    B, H, k = 3, 3, 12
    ids = torch.stack([torch.randperm(stats.vocab_size, generator=g)[:k] for _ in range(B * H)]).view(B, H, k)
    fast = _WindowWeights(stats, ids, alpha_c).weights(0, 3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(k)] * 3, indexing="ij"), -1).view(-1, 3)
    dense = torch.stack([stats.weight(torch.stack([ids[b, h, grid[:, h]] for h in range(3)], -1), alpha_c)
                         for b in range(B)])
    assert (fast > 0).sum() > 0
    assert torch.allclose(fast, dense.float())


def test_speculative_first_token_and_draft_distributions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, 30, generator=g) * 2
    first = logits[:, 0].argmax(-1)
    cfg = DynamoConfig(k=8, eps_b=0.0)
    out = dynamo_step(logits, cfg, do_sample=True, generator=g, first_tokens=first)
    assert torch.equal(out.tokens[:, 0], first)
    for b in range(6):
        n = out.n[b].item()
        for j in range(1, n):
            q = out.draft_probs[b, j]
            assert q.sum().item() == pytest.approx(1.0, abs=1e-5)
            d = out.tokens[b, j]
            assert q[(out.topk_ids[b, j] == d).nonzero()[0, 0]] > 0  # the drafted token had mass


def test_config_errors():
    for kw, msg in [({"eps_b": 2.0}, r"eps_b must be in \[0, 1\], got 2.0"), ({"k": 0}, "k .* must be >= 1, got 0"),
                    ({"alpha_c": -1}, "alpha_c must be >= 0"), ({"repetition_penalty": 0}, "repetition_penalty must be > 0")]:
        with pytest.raises(ValueError, match=msg):
            DynamoConfig(**kw).validate()
