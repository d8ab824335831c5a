"""The DynaMo step policy: thresholds, back-off, co-occurrence masking, the sparse lookups."""

import numpy as np
import pytest
import torch

from dynamo_sampling import DynamoConfig, dynamo_step, policy
from dynamo_sampling.cooccurrence import CooccurrenceStats
from dynamo_sampling.policy import (Candidates, blur_candidates, dense_candidates, otsu_threshold,
                                    sparse_candidates)


def test_otsu_splits_two_clusters():
    values = torch.tensor([0.01, 0.02, 0.015, 0.9, 0.95, 0.5, 0.5])
    rows = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    thr = otsu_threshold(values, rows, 2, bins=256)
    assert (values[:5] >= thr[0]).tolist() == [False, False, False, True, True]
    assert thr[1].item() == pytest.approx(0.5)  # one distinct value: everything remains


def test_blur_is_separable_3_tap_gaussian():
    k = 3
    grid = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij"), -1).view(-1, 2)
    J = torch.zeros(9)
    J[4] = 1.0  # centre of a 3x3 grid
    cand = Candidates(torch.zeros(9, dtype=torch.long), grid, J)
    out = blur_candidates(cand, k, sigma=1.0).view(3, 3)
    side = float(np.exp(-0.5))
    taps = torch.tensor([side, 1.0, side], dtype=torch.float32) / (1 + 2 * side)
    assert torch.allclose(out, taps[:, None] * taps[None, :], atol=1e-7)
    # a missing neighbour counts as zero
    part = cand.select(torch.tensor([True, False, True, False, True, False, False, False, False]))
    assert torch.allclose(blur_candidates(part, k, 1.0), out.flatten()[[0, 2, 4]], atol=1e-7)


@pytest.mark.parametrize("n", [2, 3])
def test_blur_grid_and_lookup_methods_agree(n):
    g = torch.Generator().manual_seed(n)
    k, B = 7, 3
    keep = torch.rand(B * k ** n, generator=g) < 0.3
    keys = keep.nonzero().flatten()
    rows, flat = keys // k ** n, keys % k ** n
    idx = torch.stack([(flat // k ** (n - 1 - h)) % k for h in range(n)], -1)
    cand = Candidates(rows, idx, torch.rand(keys.numel(), generator=g))
    assert torch.allclose(blur_candidates(cand, k, 0.8, "grid"), blur_candidates(cand, k, 0.8, "lookup"), atol=1e-6)


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
    return CooccurrenceStats.build([toks], vocab_size=V, max_order=3), a, b


@pytest.mark.parametrize("do_sample", [False, True])
def test_never_emits_unseen_pair_after_a(stats_b_after_a, do_sample):
    stats, a, b = stats_b_after_a
    V = stats.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 3, V, generator=g)
    logits[:, 0, a] = 8.0  # head 1 is sure about a
    # head 2 keeps b in its top 10 but mostly prefers another token: without statistics (a, c != b)
    # wins, with them only (a, b) was ever seen after a
    logits[:, 1, b] = 1.5
    cfg = DynamoConfig(k=10, eps_b=0.0, alpha_c=1.0)
    out = dynamo_step(logits, cfg, stats=stats, do_sample=do_sample, generator=g)
    rows = (out.tokens[:, 0] == a) & (out.n >= 2)
    assert rows.sum() >= 300  # the case under test happens (on most rows)
    assert (out.tokens[rows, 1] == b).all()
    # with statistics off, the heads' favourite (a, c != b) pairs do get emitted
    off = dynamo_step(logits, DynamoConfig(k=10, eps_b=0.0, alpha_c=0.0), do_sample=do_sample, generator=g)
    assert ((off.tokens[:, 0] == a) & (off.tokens[:, 1] != b)).any()


@pytest.mark.parametrize("eps_b", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("use_stats", [False, True])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("join", [None, True, False])
@pytest.mark.parametrize("join_min", [0, None])  # 0: every extension prunes unseen pairs (or joins); None: as shipped
def test_sparse_candidates_equal_dense_reference(stats_b_after_a, eps_b, use_stats, first, join, join_min,
                                                 monkeypatch):
    if join_min is not None:
        monkeypatch.setattr(policy, "_JOIN_MIN", join_min)
    stats, a, b = stats_b_after_a
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, stats.vocab_size, generator=g) * 2.5
    logits[:2, 0, a] = 6.0
    p, ids = torch.softmax(logits, -1).topk(12, dim=-1)
    first_idx = torch.randint(0, 3, (5,), generator=g) if first else None
    active = torch.tensor([True, True, False, True, True])
    for n in (2, 3):
        args = (p, ids, n, eps_b ** (n - 1), stats if use_stats else None, 1.0, first_idx, active)
        fast, ref = sparse_candidates(*args, join=join), dense_candidates(*args)
        assert torch.equal(fast.keys(12), ref.keys(12))
        assert torch.allclose(fast.J, ref.J, rtol=1e-6)
        assert not (fast.rows == 2).any()
    # whole steps agree token for token, greedy and sampled with the same generator
    for do_sample in (False, True):
        outs = [dynamo_step(logits, DynamoConfig(k=12, eps_b=eps_b, candidates=c), stats=stats if use_stats else None,
                            do_sample=do_sample, generator=torch.Generator().manual_seed(3))
                for c in ("sparse", "dense")]
        assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].n, outs[1].n)


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


@pytest.mark.parametrize("H", [2, 3, 4])
@pytest.mark.parametrize("use_stats", [False, True])
def test_speculative_grid_draft_equals_candidate_path(H, use_stats):
    """First token fixed, eps_b = 0, no Otsu (speculative's cost-sized draft): the grid path gives the
    candidate path's tokens, lengths and draft conditionals (greedy), with penalties and caps."""
    rng = np.random.default_rng(H)
    V = 40
    stats = None
    if use_stats:
        stats = CooccurrenceStats.build([rng.integers(0, V, 20000)], vocab_size=V, max_order=max(H, 2))
    emitted = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(10 * H + seed)
        B = 9
        logits = torch.randn(B, H, V, generator=g) * 2.5
        pick = torch.randint(0, 7, (B,), generator=g)  # 2 of the 7 are outside the top-5
        first = logits[:, 0].topk(7, -1).indices[torch.arange(B), pick]
        kw = {"seen_tokens": torch.rand(B, V, generator=g) < 0.3,
              "max_tokens": torch.randint(1, H + 1, (B,), generator=g)}
        for extra in ({}, kw):
            grid, ref, c_path = [dynamo_step(logits, DynamoConfig(k=5, eps_b=0.0, adaptive_threshold=False, candidates=c,
                                                                  impl=i), stats=stats, first_tokens=first, **extra)
                                 for c, i in (("auto", "torch"), ("sparse", "torch"), ("auto", "c"))]
            assert torch.equal(c_path.tokens, ref.tokens) and torch.equal(c_path.n, ref.n)
            assert torch.allclose(c_path.draft_probs, ref.draft_probs, atol=1e-6)
            assert torch.equal(grid.tokens, ref.tokens) and torch.equal(grid.n, ref.n)
            assert torch.allclose(grid.draft_probs, ref.draft_probs, atol=1e-6)
            emitted += int((ref.n > 1).sum())
    assert emitted > 20  # the drafts under test happen


def test_speculative_grid_draft_samples_the_joint():
    """Sampled, the grid path draws x2 with the candidate path's draft marginal q(x2 | x1)."""
    rng = np.random.default_rng(7)
    V = 30
    stats = CooccurrenceStats.build([rng.integers(0, V, 5000)], vocab_size=V, max_order=3)
    logits = (torch.randn(1, 3, V, generator=torch.Generator().manual_seed(3)) * 1.5).expand(40000, 3, V)
    first = logits[:, 0].argmax(-1)
    cfg = DynamoConfig(k=6, eps_b=0.0, adaptive_threshold=False, impl="torch")
    out = dynamo_step(logits, cfg, stats=stats, do_sample=True, generator=torch.Generator().manual_seed(0),
                      first_tokens=first)
    ref = dynamo_step(logits[:1], DynamoConfig(**{**cfg.__dict__, "candidates": "sparse"}), stats=stats,
                      first_tokens=first[:1])
    assert bool((out.n == 3).all()) and int(ref.n) == 3
    q = ref.draft_probs[0, 1]  # over ref.topk_ids[0, 1]
    freq = torch.stack([(out.tokens[:, 1] == t).float().mean() for t in ref.topk_ids[0, 1]])
    assert torch.allclose(freq, q, atol=0.012), (freq, q)
    assert torch.allclose(out.draft_probs[:, 1], q.expand(40000, -1), atol=1e-6)


@pytest.mark.parametrize("eps_b", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("do_sample", [False, True])
def test_skipping_orders_no_cell_can_pass_changes_nothing(stats_b_after_a, eps_b, do_sample, monkeypatch):
    stats, a, b = stats_b_after_a
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 3, stats.vocab_size, generator=g) * torch.rand(40, 1, 1, generator=g) * 6
    cfg = DynamoConfig(k=12, eps_b=eps_b, impl="torch")  # the torch path's order skip

    def run():  # row by row (B = 1), where a skipped order is skipped for the whole batch
        outs = [dynamo_step(logits[i:i + 1], cfg, stats=stats, do_sample=do_sample,
                            generator=torch.Generator().manual_seed(i)) for i in range(len(logits))]
        return torch.cat([o.tokens for o in outs]), torch.cat([o.n for o in outs])

    verdicts = []
    may_pass = policy._may_pass
    monkeypatch.setattr(policy, "_may_pass", lambda *args: verdicts.append(may_pass(*args)) or verdicts[-1])
    fast = run()
    monkeypatch.setattr(policy, "_may_pass", lambda *args: True)
    ref = run()
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert False in verdicts and bool((ref[1] > 1).any())  # orders were skipped, and others emitted
