"""The C policy (csrc/dynamo_policy_cpu.c via cpu_policy.py) against the torch reference (policy.py)."""

import numpy as np
import pytest
import torch

from dynamo_sampling import DynamoConfig, dynamo_step
from dynamo_sampling import cpu_policy
from dynamo_sampling.cooccurrence import CooccurrenceStats

pytestmark = pytest.mark.skipif(not cpu_policy.available(), reason=f"no C policy: {cpu_policy.build_error()}")


@pytest.fixture(scope="module")
def stats_by_order():
    rng = np.random.default_rng(0)
    V = 48
    # a skewed corpus, so that some n-grams are frequent and many are never seen
    toks = rng.zipf(1.6, 60000) % V
    return {H: CooccurrenceStats.build([toks], vocab_size=V, max_order=max(H, 2)) for H in (2, 3, 4)}


def _decisions(a, b):
    return int(((a.n != b.n) | (a.tokens != b.tokens).any(-1)).sum())


@pytest.mark.parametrize("H", [2, 3, 4])
@pytest.mark.parametrize("eps_b", [0.0, 0.03, 0.1, 0.3])
@pytest.mark.parametrize("threshold", ["otsu+blur", "otsu", "static"])
@pytest.mark.parametrize("use_stats", [False, True])
def test_c_policy_equals_torch_reference(stats_by_order, H, eps_b, threshold, use_stats):
    """Greedy: the same n-grams and lengths on every row, with penalties, caps, inactive first tokens and
    speculative drafts (conditionals to float rounding). Without blur every float is computed in the
    reference's order; the blur's 27-term sums may round differently, so there a row may rarely differ."""
    V = 48
    stats = stats_by_order[H] if use_stats else None
    k = 6 if H == 4 else 10
    cfg = dict(k=k, eps_b=eps_b, adaptive_threshold=threshold != "static", blur=threshold == "otsu+blur")
    differ = rows = emitted = 0
    for seed in range(3):
        g = torch.Generator().manual_seed(100 * H + seed)
        B = 17
        logits = torch.randn(B, H, V, generator=g) * torch.rand(B, 1, 1, generator=g) * 5
        logits[0, :, 5:] = -float("inf")  # fewer finite logits than k in a row
        pick = torch.randint(0, k + 2, (B,), generator=g)  # some first tokens outside head 1's top-k
        first = logits[:, 0].topk(k + 2, -1).indices[torch.arange(B), pick]
        extra = {"seen_tokens": torch.rand(B, V, generator=g) < 0.2,
                 "max_tokens": torch.randint(1, H + 1, (B,), generator=g)}
        for kw in ({}, extra, {"first_tokens": first}, {"first_tokens": first, **extra}):
            ref, fast = [dynamo_step(logits, DynamoConfig(**cfg, impl=impl), stats=stats, **kw)
                         for impl in ("torch", "c")]
            differ += _decisions(ref, fast)
            rows += B
            emitted += int((ref.n > 1).sum())
            assert torch.equal(ref.topk_ids, fast.topk_ids)
            if "first_tokens" in kw and threshold != "otsu+blur":
                assert torch.allclose(ref.draft_probs, fast.draft_probs, atol=1e-6)
    assert differ <= (rows // 50 if threshold == "otsu+blur" else 0), (differ, rows)
    if eps_b < 0.3:
        assert emitted > rows // 10  # multi-token decisions happen


@pytest.mark.parametrize("adaptive", [False, True])
def test_c_policy_samples_the_reference_distribution(stats_by_order, adaptive):
    """Sampled: one row repeated 30 000 times; the C path's n-grams (its own counter-based noise) come with
    the frequencies of the torch path's (the generator's noise), n-gram by n-gram."""
    V, B = 48, 30000
    stats = stats_by_order[3]
    logits = (torch.randn(1, 3, V, generator=torch.Generator().manual_seed(5)) * 1.2).expand(B, 3, V)
    cfg = dict(k=8, eps_b=0.02, adaptive_threshold=adaptive, blur=False)
    outs = [dynamo_step(logits, DynamoConfig(**cfg, impl=impl), stats=stats, do_sample=True, temperature=0.9,
                        generator=torch.Generator().manual_seed(1)) for impl in ("torch", "c")]
    keys = [(o.tokens[:, 0] * V + o.tokens[:, 1].clamp(min=0)) * V + o.tokens[:, 2].clamp(min=0) + o.n * V ** 3
            for o in outs]
    both = torch.cat(keys).unique()
    freq = [torch.stack([(key == u).float().mean() for u in both]) for key in keys]
    assert len(both) >= (2 if adaptive else 5)  # several outcomes (Otsu keeps few), so distributions can differ
    assert float(freq[0].max()) < 0.9
    assert torch.allclose(freq[0], freq[1], atol=0.015), (freq[0], freq[1])


def test_impl_errors(monkeypatch):
    with pytest.raises(ValueError, match="impl must be 'auto', 'torch' or 'c', got 'fast'"):
        DynamoConfig(impl="fast").validate()

    class WeightsOnly:  # a CooccurrenceWeights without the tables the C path reads
        vocab_size, max_order = 20, 3

        def weight(self, ngrams, alpha_c=1.0):
            return torch.ones(ngrams.shape[:-1])

    logits = torch.randn(2, 3, 20)
    with pytest.raises(ValueError, match="impl='c' needs CPU tensors.*statistics WeightsOnly"):
        dynamo_step(logits, DynamoConfig(k=4, impl="c"), stats=WeightsOnly())
    # impl="auto" falls back to torch for such statistics
    dynamo_step(logits, DynamoConfig(k=4), stats=WeightsOnly())
    monkeypatch.setattr(cpu_policy, "_load", lambda: (None, "no C compiler found"))
    with pytest.raises(RuntimeError, match="impl='c': the C policy is unavailable: no C compiler found"):
        dynamo_step(logits, DynamoConfig(k=4, impl="c"))
    ref = dynamo_step(logits, DynamoConfig(k=4, impl="torch"))
    auto = dynamo_step(logits, DynamoConfig(k=4))  # falls back to torch
    assert torch.equal(ref.tokens, auto.tokens) and torch.equal(ref.n, auto.n)


def test_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    monkeypatch.setenv("DYNAMO_SAMPLING_CACHE", str(tmp_path))
    monkeypatch.delenv("DYNAMO_SAMPLING_NO_C", raising=False)
    so, why = cpu_policy._load.__wrapped__()
    assert so is None and "failed on" in why and "dynamo_policy_cpu.c" in why
    assert not list((tmp_path / "c").glob("*.so"))  # no half-written library left behind


def test_c_source_compiles_without_warnings(tmp_path):
    import subprocess
    cc = cpu_policy._compiler()
    r = subprocess.run([cc, *cpu_policy.FLAGS, "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(tmp_path / "p.so"),
                        str(cpu_policy._source()), "-lm"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
