"""sample(): the three strategies, ragged batches, exactness of speculative decoding, errors."""

import numpy as np
import pytest
import torch

from dynamo_sampling import TinyMTP, TinyMTPConfig, sample
from toy_models import NaNModel, count_branches, oracle_model, ragged_prompts, random_table_model

V = 101
FLAT = (1.0,)  # step_cost: feeding more tokens costs nothing, so every useful draft is fed (deterministic)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=V, n_layer=3, n_heads=3, d_model=48, n_attn_heads=4, d_ff=96,
                              max_seq_len=128)).eval()
    with torch.no_grad():  # peaky logits: greedy comparisons must not hinge on 1e-7 near-ties
        m.embed.weight.mul_(25.0)
    return m


def ragged_batch(n_rows, seed, min_len=2, max_len=12):
    return ragged_prompts(n_rows, V, seed, min_len, max_len)


def new_tokens(out, S):
    return out[:, S:]


@pytest.mark.parametrize("seed", range(20))
def test_speculative_greedy_equals_ar_batch1(model, seed):
    ids, _ = ragged_batch(1, seed)
    ar = sample(model, ids, strategy="ar", max_new_tokens=16)
    spec = sample(model, ids, strategy="speculative", max_new_tokens=16, eps_b=0.0)
    assert torch.equal(spec, ar)


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative"])
def test_ragged_batch_rows_equal_rows_alone(model, strategy):
    ids, mask = ragged_batch(8, seed=123)
    S = ids.shape[1]
    batch = sample(model, ids, mask, strategy=strategy, max_new_tokens=12, eps_b=0.05)
    for i in range(8):
        alone = sample(model, ids[i:i + 1, mask[i].bool()], strategy=strategy, max_new_tokens=12, eps_b=0.05)
        assert torch.equal(batch[i, S:], alone[0, -12:]), f"row {i}"
    if strategy == "speculative":
        ar = sample(model, ids, mask, strategy="ar", max_new_tokens=12)
        assert torch.equal(batch, ar)


def test_dynamo_eps_b_one_equals_ar_and_zero_emits_all_heads(model):
    ids, mask = ragged_batch(4, seed=7)
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=10)
    assert torch.equal(sample(model, ids, mask, strategy="dynamo", max_new_tokens=10, eps_b=1.0), ar)
    out = sample(model, ids, mask, strategy="dynamo", max_new_tokens=12, eps_b=0.0, return_dict_in_generate=True)
    assert out.histogram[:, :2].sum() == 0  # every step emitted H = 3 tokens
    assert torch.equal(out.steps, torch.full((4,), 4))
    assert torch.equal(out.tokens_per_step, torch.full((4,), 3.0))


@pytest.mark.parametrize("strategy", ["dynamo", "speculative"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_oracle_heads_emit_h_tokens_per_step(strategy, do_sample):
    model = oracle_model(V=16, H=3)
    start = torch.tensor([[3], [5]])
    out = sample(model, start, strategy=strategy, max_new_tokens=12, do_sample=do_sample, eps_b=0.5,
                 step_cost=FLAT, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    assert torch.equal(out.histogram[:, :3], torch.tensor([[0, 0, 4], [0, 0, 4]]))
    assert out.histogram[:, 3:].sum() == 0
    # and the tokens are the sequence the model knows
    expect = [start[:, 0]]
    for _ in range(12):
        expect.append(model.successor[expect[-1]])
    assert torch.equal(out.sequences, torch.stack(expect, 1))


def _pair_frequencies(model, strategy, n_draws, prompt_token, seed):
    counts = torch.zeros(model.vocab_size, model.vocab_size)
    ids = torch.full((n_draws, 1), prompt_token)
    out = sample(model, ids, strategy=strategy, max_new_tokens=2, do_sample=True, temperature=1.0, top_k=None,
                 eps_b=0.0, step_cost=FLAT, generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True)
    seq = out.sequences
    counts.index_put_((seq[:, 1], seq[:, 2]), torch.ones(n_draws), accumulate=True)
    return counts, out


def _triple_counts(seq: torch.Tensor, V: int) -> torch.Tensor:
    """(n, 3) sampled tokens -> (V, V, V) float64 counts of each triple."""
    ones = torch.ones(len(seq), dtype=torch.float64)
    return torch.zeros(V, V, V, dtype=torch.float64).index_put_((seq[:, 0], seq[:, 1], seq[:, 2]), ones, accumulate=True)


def _assert_distributed_as(counts: torch.Tensor, exact: torch.Tensor, n: int, tv: float):
    """Every cell's frequency within 5 binomial standard deviations of ``exact``, total variation
    below ``tv``, and no draw where the exact probability is 0."""
    freq = counts.double() / n
    sd = (exact * (1 - exact) / n).sqrt()
    assert ((freq - exact).abs() <= 5 * sd + 1e-9).all(), (freq - exact).abs().max()
    assert 0.5 * (freq - exact).abs().sum() < tv
    assert counts[exact == 0].sum() == 0


def test_sampled_speculative_matches_ar_distribution():
    """Pairs (x1, x2) after a fixed prompt: the exact ar distribution is P1[x0, x1] * P1[x1, x2].
    Speculative drafts x2 from head 2 (a different table), so acceptance and residual draws matter.
    Bound: every cell within 5 standard deviations of a binomial, and total variation < 0.02."""
    model = random_table_model(V=6, H=2, seed=3)
    P = torch.softmax(model.table[0], -1).double()  # (V, V) head-1 transition
    x0 = 2
    exact = P[x0][:, None] * P  # (V, V)
    n = 60000
    counts, out = _pair_frequencies(model, "speculative", n, x0, seed=1)
    assert out.accepted.sum() > 0 and out.accepted.sum() < out.drafted.sum()  # drafts were both kept and rejected
    _assert_distributed_as(counts, exact, n, tv=0.02)
    ar_counts, _ = _pair_frequencies(model, "ar", n, x0, seed=2)
    assert 0.5 * (ar_counts.double() / n - exact).abs().sum() < 0.02


@pytest.mark.parametrize("strategy,options", [
    ("speculative", dict(hybrid=False)),  # the heads' joint drafts only
    ("speculative", dict()),  # hybrid: lookup drafts compete with the joint per row
    ("lookup", dict()),
    ("speculative", dict(step_cost=(1.0, 1.3, 1.6))),  # drafts cut short by the stopping rule
])
def test_sampled_drafting_strategies_match_ar_distribution_3_heads(strategy, options):
    """Triples (x1, x2, x3) after a prompt that repeats its last token (so lookup drafts fire):
    exact probability P[x0, x1] P[x1, x2] P[x2, x3] under head 1's bigram table. Three heads, so
    the second draft token's conditional q(x3 | x2) matters. Every cell within 5 sd, TV < 0.03."""
    model = random_table_model(V=5, H=3, seed=8)
    P = torch.softmax(model.table[0], -1).double()
    x0, n = 1, 80000
    exact = P[x0][:, None, None] * P[:, :, None] * P[None]  # (V, V, V)
    ids = torch.tensor([[x0, 3, x0, 2, 4, x0]]).expand(n, 6)
    out = sample(model, ids, strategy=strategy, max_new_tokens=3, do_sample=True, temperature=1.0, top_k=None,
                 eps_b=0.0, max_draft=2, generator=torch.Generator().manual_seed(4), return_dict_in_generate=True,
                 **{"step_cost": FLAT, **options})
    assert 0 < out.accepted.sum() < out.drafted.sum()
    _assert_distributed_as(_triple_counts(out.sequences[:, 6:], 5), exact, n, tv=0.03)


def test_sampled_merged_drafts_match_ar_distribution(monkeypatch):
    """The hybrid's merged drafts, sampled: a joint token drawn from head 2, then lookup's point-mass
    continuation of it (two heads, so every joint draft is one token and the third token of a step
    can only come from the continuation). Triples after a repetitive prompt; exact as above."""
    merged = _count_merged_drafts(monkeypatch)
    model = random_table_model(V=5, H=2, seed=9)
    P = torch.softmax(model.table[0], -1).double()
    x0, n = 1, 80000
    exact = P[x0][:, None, None] * P[:, :, None] * P[None]
    ids = torch.tensor([[x0, 3, x0, 2, 4, 0, 3, x0]]).expand(n, 8)
    out = sample(model, ids, strategy="speculative", max_new_tokens=3, do_sample=True, temperature=1.0, top_k=None,
                 max_draft=2, step_cost=FLAT, generator=torch.Generator().manual_seed(5), return_dict_in_generate=True)
    assert merged[0] > 1000 and 0 < out.accepted.sum() < out.drafted.sum()
    assert (out.histogram[:, 2] > 0).any()  # some steps kept a merged draft whole
    _assert_distributed_as(_triple_counts(out.sequences[:, 8:], 5), exact, n, tv=0.03)


def _count_merged_drafts(monkeypatch) -> list:
    """[rows whose joint draft the hybrid continued with lookup's tokens], counted as the loop runs."""
    from dynamo_sampling import decoding
    count, merge = [0], decoding._Decoder._merge_drafts

    def counted(self, prop, joint_value, need):
        out = merge(self, prop, joint_value, need)
        count[0] += sum(d >= 0 for d in prop.joint_len)
        return out
    monkeypatch.setattr(decoding._Decoder, "_merge_drafts", counted)
    return count


def _count_corpus_drafts(monkeypatch) -> list:
    """[rows whose lookup draft was the corpus's (lookup.CorpusDrafts)], counted as the loop runs."""
    from dynamo_sampling import decoding
    count, draft = [0], decoding._Decoder._lookup_draft

    def counted(self, first, active_h):
        out = draft(self, first, active_h)
        count[0] += sum(out.corpus or [])
        return out
    monkeypatch.setattr(decoding._Decoder, "_lookup_draft", counted)
    return count


def _random_corpus_stats(V, seed, tokens=600, max_order=3):
    from dynamo_sampling.cooccurrence import CooccurrenceStats
    return CooccurrenceStats.build([np.random.default_rng(seed).integers(0, V, tokens)], V, max_order=max_order)


@pytest.mark.parametrize("strategy", ["lookup", "speculative"])
def test_corpus_drafts_keep_greedy_equal_to_ar_on_ragged_batch(model, monkeypatch, strategy):
    """Lookup drafts from a corpus's n-grams (statistics given) compete with the row's own: fed in
    some rows and steps, and every greedy output still equals ar's."""
    fed = _count_corpus_drafts(monkeypatch)
    ids, mask = ragged_batch(5, seed=23, min_len=3, max_len=20)
    stats = _random_corpus_stats(model.vocab_size, seed=4, tokens=3000)
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=16)
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=16, stats=stats, step_cost=FLAT,
                 return_dict_in_generate=True)
    assert fed[0] > 0 and out.drafted.sum() > 0
    assert torch.equal(out.sequences, ar)
    with pytest.raises(ValueError, match="vocabulary size 7, expected the model's"):
        sample(model, ids, mask, strategy=strategy, max_new_tokens=4, stats=_random_corpus_stats(7, seed=1))


@pytest.mark.parametrize("strategy", ["lookup", "speculative"])
def test_sampled_corpus_drafts_match_ar_distribution(monkeypatch, strategy):
    """Triples after a one-token prompt (no earlier copy for prompt lookup to draft from, unless the
    first token repeats it), statistics of a random corpus given: the corpus's drafts are fed
    (point masses, like lookup's), some kept, some refused; every cell within 5 sd, TV < 0.03. (This
    caught a refused point mass at token id 0 losing its residual where a joint's top-k columns
    padded the mass with id 0: speculative at x1 = 3, x2 = 0 drawn 1.9x too often.)"""
    fed = _count_corpus_drafts(monkeypatch)
    model = random_table_model(V=5, H=3, seed=8)
    P = torch.softmax(model.table[0], -1).double()
    x0, n = 1, 80000
    exact = P[x0][:, None, None] * P[:, :, None] * P[None]
    ids = torch.full((n, 1), x0)
    out = sample(model, ids, strategy=strategy, max_new_tokens=3, do_sample=True, temperature=1.0, top_k=None,
                 eps_b=0.0, max_draft=2, stats=_random_corpus_stats(5, seed=6), step_cost=FLAT,
                 generator=torch.Generator().manual_seed(7), return_dict_in_generate=True)
    assert fed[0] > 1000 and 0 < out.accepted.sum() < out.drafted.sum()
    _assert_distributed_as(_triple_counts(out.sequences[:, 1:], 5), exact, n, tv=0.03)


@pytest.mark.parametrize("strategy", ["lookup", "speculative"])
def test_lookup_and_hybrid_greedy_equal_ar_on_ragged_batch(model, monkeypatch, strategy):
    merged = _count_merged_drafts(monkeypatch)
    ids, mask = ragged_batch(6, seed=21, min_len=8, max_len=30)
    ids[:, -4:] = ids[:, -12:-8]  # repeated spans: lookup drafts fire
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=20)
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=20, return_dict_in_generate=True,
                 step_cost=FLAT)
    assert torch.equal(out.sequences, ar)
    assert out.drafted.sum() > 0
    if strategy == "speculative":
        assert merged[0] > 0  # drafts were merged (joint tokens continued by lookup's)
        no_merge = sample(model, ids, mask, strategy=strategy, max_new_tokens=20, step_cost=FLAT, merge=False)
        assert torch.equal(no_merge, ar)


def test_draft_sizing_stops_where_a_token_is_not_worth_its_cost():
    from dynamo_sampling.drafting import size_drafts
    accept = torch.tensor([[0.9, 0.9, 0.9], [0.9, 0.05, 0.9], [0.0, 0.0, 0.0], [0.9, 0.9, 0.9]])
    cost = torch.tensor([1.0, 1.1, 1.2, 1.3], dtype=torch.float64)
    length, value = size_drafts(accept, torch.tensor([3, 3, 3, 1]), cost)
    # row 1: token 2 adds 0.045 expected tokens for 9 % more cost: stop after token 1 even though token 3
    # looks good (the rule never looks ahead: exactness when sampling); row 3 is capped at 1
    assert length.tolist() == [3, 1, 0, 1]
    assert torch.allclose(value[0], torch.tensor(1 + 0.9 + 0.81 + 0.729, dtype=torch.float64) / 1.3)
    assert torch.allclose(value[2], torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("hybrid", [False, True])
def test_speculative_stops_evaluating_a_joint_whose_drafts_always_fail(monkeypatch, hybrid):
    """Heads 2..H that are always wrong: after a few refused drafts the joint (policy call, heads'
    catch-up) is evaluated only every PROBE_EVERY steps and the steps run head 1 alone; heads that
    are right keep it evaluated every step. Greedy output is ar's either way."""
    from dynamo_sampling import decoding, drafters
    calls = []
    policy = decoding.dynamo_step
    monkeypatch.setattr(decoding, "dynamo_step", lambda *a, **k: calls.append(1) or policy(*a, **k))
    good = oracle_model(V=128, H=3)  # a cycle longer than the output: lookup finds no repeat
    bad = oracle_model(V=128, H=3)
    bad.table[1:] = bad.table[1:].roll(1, dims=-1)  # heads 2, 3: a token next to the right one
    ids = torch.tensor([[3, 9, 4]])  # no repeats: lookup has nothing to draft
    for model, most in ((bad, 4 + 64 // drafters.PROBE_EVERY + 1), (good, None)):
        calls.clear()
        out = sample(model, ids, strategy="speculative", max_new_tokens=64, hybrid=hybrid,
                     step_cost=(1.0, 1.3, 1.4), return_dict_in_generate=True)
        assert torch.equal(out.sequences, sample(model, ids, strategy="ar", max_new_tokens=64))
        steps = int(out.steps)
        if most is not None:
            assert len(calls) <= most and out.accepted.sum() == 0
        else:
            assert len(calls) >= steps - 1 and out.tokens_per_step > 2.5  # the last step has 1 token left


def test_heads_on_demand_price_a_step_without_a_joint_draft_at_head_1_alone(monkeypatch):
    """With heads on demand a step that feeds no joint draft runs head 1 alone, so a joint draft must
    be worth more than that step, not more than a forward of every head on one token. Heads 2..3 split
    their mass over four tokens (the drawn one always wrong, q ~ 0.26): against a 3-head step a draft
    of one token looks worth it (1.26 / 1.4 > 1 / 1.3), against head 1 alone it is not (1.26 / 1.4 < 1)."""
    from dynamo_sampling import decoding
    model = oracle_model(V=64, H=3)
    right = model.table[1:].argmax(-1)  # (2, V)
    for j, bump in ((1, 20.1), (2, 20.05), (3, 20.0)):  # three wrong tokens, the first the most likely
        model.table[1:].scatter_(-1, ((right + j) % 64)[..., None], bump)
    ids = torch.tensor([[3, 9, 4]])
    drafted = {}
    for name, head1 in (("head 1 alone", (1.0, 1.1, 1.2)), ("every head", (1.3, 1.4, 1.5))):
        table = {1: torch.tensor(head1, dtype=torch.float64), 3: torch.tensor((1.3, 1.4, 1.5), dtype=torch.float64),
                 "seconds": None}
        monkeypatch.setattr(decoding, "step_cost_tables", lambda *a, table=table, **k: table)
        out = sample(model, ids, strategy="speculative", hybrid=False, max_new_tokens=32, return_dict_in_generate=True)
        assert torch.equal(out.sequences, sample(model, ids, strategy="ar", max_new_tokens=32))
        drafted[name] = int(out.drafted.sum())
    assert drafted["head 1 alone"] == 0 and drafted["every head"] > 0


def test_a_joint_that_keeps_losing_waits_longer_before_it_is_evaluated_again(monkeypatch):
    """Where the bound on the joint's value says it could win but the row's last m evaluations fed no
    joint draft, the row waits BACKOFF_BASE**m - 1 steps (4**m - 1, at most PROBE_EVERY) before the next
    evaluation; a probe
    after PROBE_EVERY steps comes regardless, and a bound that cannot win never evaluates."""
    from dynamo_sampling import drafters

    class Row(drafters.Drafters):
        def __init__(self, bound):
            self.since_joint_h, self.joint_miss_h, self.bound = [0], [0], bound

        def _joint_bound(self, b, against_lookup):
            return self.bound

    P = drafters.PROBE_EVERY
    row = Row(bound=2.0)
    assert drafters.BACKOFF_BASE == 4
    for m, first in ((0, 0), (1, 3), (2, 15), (3, min(63, P)), (9, P)):
        row.joint_miss_h = [m]
        wants = []
        for since in range(P + 4):
            row.since_joint_h = [since]
            wants.append(row._wants_joint(0, 1.0, against_lookup=False))
        assert wants == [s >= first for s in range(P + 4)], m
    monkeypatch.setattr(drafters, "MISS_BACKOFF", False)
    row.joint_miss_h, row.since_joint_h = [5], [0]
    assert row._wants_joint(0, 1.0, against_lookup=True)
    row = Row(bound=0.5)  # cannot beat the alternative: only the probe
    wants = []
    for since in range(P + 4):
        row.since_joint_h = [since]
        wants.append(row._wants_joint(0, 1.0, against_lookup=False))
    assert wants == [s >= P for s in range(P + 4)]


def test_host_draft_sizing_matches_the_tensor_rule_exactly():
    """size_draft (one row, Python floats: the lookup drafter's sizing) is size_drafts' fast path:
    the same lengths and bit-identical values, ties and caps included."""
    from dynamo_sampling.drafting import Evidence, size_draft, size_drafts
    g = torch.Generator().manual_seed(3)
    for D in (1, 2, 5, 8):
        accept = torch.rand(400, D, generator=g, dtype=torch.float64)
        accept[::7] = 1.0  # certain drafts: long lengths
        accept[1::9, 0] = 0.0
        accept[2::11] = -0.5  # clamped to 0
        cap = torch.randint(-1, D + 2, (400,), generator=g)
        cost = torch.cat([torch.ones(1, dtype=torch.float64),
                          1 + torch.rand(D, generator=g, dtype=torch.float64).cumsum(0) * 0.2])
        length, value = size_drafts(accept, cap, cost)
        host = [size_draft(a, c, cost.tolist()) for a, c in zip(accept.tolist(), cap.tolist())]
        assert [h[0] for h in host] == length.tolist()
        assert [h[1] for h in host] == value.tolist()
    # the evidence's device-side rates (the joint's sizing) use the same float64 arithmetic as its host rates
    ev = Evidence(3, prior_first=0.5, prior_cont=0.8)
    ev.add_first(0, 1.0), ev.add_first(1, 0.25), ev.add_fed(0, 4, 2), ev.add_fed(2, 3, 3)
    prior = torch.rand(3, 4, generator=g, dtype=torch.float64)
    expect = [[ev.first_rate(b, p[0])] + [ev.cont_rate(b, x) for x in p[1:]] for b, p in enumerate(prior.tolist())]
    assert ev.rates(prior).tolist() == expect
    assert (ev.cont_checked, ev.cont_hits) == ([2.0, 0.0, 2.0], [1.0, 0.0, 2.0])  # after a rejection: unjudged


def test_measured_step_cost_covers_every_width_and_never_decreases():
    from dynamo_sampling.drafting import _interpolate, measure_step_cost
    xs = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    assert _interpolate(xs, torch.tensor([1.0, 1.2, 1.4, 2.4], dtype=torch.float64), 9) == pytest.approx(
        [1.0, 1.2, 1.3, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4])
    model = TinyMTP(TinyMTPConfig(vocab_size=50, n_layer=2, n_heads=3, d_model=32, n_attn_heads=4, d_ff=64,
                                  max_seq_len=128)).eval()
    for width in (1, 3, 9):
        table = measure_step_cost(model, 2, width, rounds=2)
        assert table["seconds"] > 0
        for heads in (1, 3):
            assert len(table[heads]) == width and min(table[heads]) >= 1.0
            assert all(a <= b for a, b in zip(table[heads], table[heads][1:]))
        assert table[1][0] == 1.0


def test_step_cost_tables_are_measured_once_per_context_bucket(monkeypatch):
    """The cost table is timed behind a prefix as long as the decode's context, rounded up to a power
    of two from 64 (attention's share of a step grows with it), and reused within a bucket."""
    from dynamo_sampling import drafting
    model = TinyMTP(TinyMTPConfig(vocab_size=50, n_layer=2, n_heads=3, d_model=32, n_attn_heads=4, d_ff=64,
                                  max_seq_len=300)).eval()
    prefixes = []
    monkeypatch.setattr(drafting, "STEP_COST", {})  # this test's tables only, gone after it
    monkeypatch.setattr(drafting, "measure_step_cost", lambda m, B, w, sampled=False, prefix=64: prefixes.append(prefix)
                        or {1: [1.0] * w, 3: [1.2] * w, "seconds": 1e-3})
    for context in (10, 64, 65, 128, 200, 256, 257):
        drafting.step_cost_tables(model, 2, 4, drafting.DraftConfig(), torch.device("cpu"), False, context=context)
    assert prefixes == [64, 128, 256, 512]  # 10 and 64 share a table, 65 and 128, 200 and 256


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
def test_zero_probability_tokens_never_drawn(strategy):
    """Token 0 has probability 0 under every head; each token's successor +1 has probability 0
    under head 1, which binds ar and speculative (exact) but not the lossy dynamo n-grams."""
    model = random_table_model(V=6, H=3, seed=5)
    model.table[:, :, 0] = float("-inf")
    ids = torch.randint(1, 6, (500, 1), generator=torch.Generator().manual_seed(0))
    seq = sample(model, ids, strategy=strategy, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=None,
                 eps_b=0.0, generator=torch.Generator().manual_seed(1))
    assert not (seq == 0).any()
    if strategy != "dynamo":
        forbidden = (seq[:, :-1] + 1) % 6
        assert not (seq[:, 1:] == forbidden).any()


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
def test_same_seed_same_tokens(strategy):
    torch.manual_seed(1)  # default init: near-uniform heads, so different seeds must differ
    model = TinyMTP(TinyMTPConfig(vocab_size=V, n_layer=2, n_heads=3, d_model=32, n_attn_heads=4, d_ff=64,
                                  max_seq_len=64)).eval()
    ids, mask = ragged_batch(3, seed=11)
    run = lambda s: sample(model, ids, mask, strategy=strategy, max_new_tokens=10, do_sample=True,
                           generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_eos_stops_rows_and_pads():
    model = oracle_model(V=16, H=3)
    start = torch.tensor([[3], [5]])
    eos = int(model.successor[model.successor[3]])  # row 0 reaches it at its 2nd new token
    out = sample(model, start, strategy="dynamo", max_new_tokens=9, eos_token_id=eos, pad_token_id=15,
                 eps_b=0.0, return_dict_in_generate=True)
    assert out.sequences[0, 2].item() == eos and (out.sequences[0, 3:] == 15).all()
    assert out.new_tokens[0].item() == 2
    seq1 = out.sequences[1].tolist()
    if eos in seq1[1:]:
        j = seq1.index(eos, 1)
        assert all(t == 15 for t in seq1[j + 1:])
    else:
        assert out.new_tokens[1].item() == 9


def test_streamer_receives_every_token(model):
    class Collect:
        def __init__(self):
            self.rows, self.ended = None, False

        def put(self, tokens):
            self.rows = [[] for _ in tokens] if self.rows is None else self.rows
            for r, t in zip(self.rows, tokens):
                r.extend(t.tolist())

        def end(self):
            self.ended = True

    ids, mask = ragged_batch(3, seed=1)
    s = Collect()
    out = sample(model, ids, mask, strategy="dynamo", max_new_tokens=9, streamer=s, eps_b=0.0)
    assert s.ended and s.rows == out[:, ids.shape[1]:].tolist()


def test_statistics_fields(model):
    ids, mask = ragged_batch(2, seed=4)
    out = sample(model, ids, mask, strategy="speculative", max_new_tokens=15, eps_b=0.0, return_dict_in_generate=True)
    assert torch.equal(out.new_tokens, torch.tensor([15, 15]))
    assert torch.equal(out.histogram.sum(1), out.steps)
    assert torch.equal((out.histogram * torch.arange(1, out.histogram.shape[1] + 1)).sum(1), out.new_tokens)
    assert torch.equal(out.new_tokens - out.steps, out.accepted)  # every token beyond a step's first was a draft
    assert torch.allclose(out.tokens_per_step, out.new_tokens / out.steps)
    assert out.wall_time > 0


# ---------------------------------------------------------------- errors


def test_errors(model):
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(input_ids=torch.tensor([1, 2])), ValueError, r"input_ids must be 2-D \(batch, seq_len\), got shape \(2,\)"),
        (dict(input_ids=ids.float()), TypeError, "input_ids must be an integer tensor, got dtype torch.float32"),
        (dict(input_ids=torch.tensor([[1, V]])), ValueError, rf"input_ids must be in \[0, {V}\).*got {V}"),
        (dict(input_ids=torch.tensor([[-1, 2]])), ValueError, r"input_ids must be in \[0, 101\).*got -1"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "at least one prompt token"),
        (dict(attention_mask=torch.ones(1, 4)), ValueError, r"attention_mask must have the shape of input_ids \(1, 3\), got \(1, 4\)"),
        (dict(attention_mask=torch.tensor([[1, 0, 1]])), ValueError, "attention_mask must be left-padded"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, r"every prompt needs at least one token; rows \[0\]"),
        (dict(max_new_tokens=126), ValueError, "prompt length 3 \\+ max_new_tokens 126 = 129 exceeds the model's context of 128"),
        (dict(strategy="beam"), ValueError, "unknown strategy 'beam'; expected one of"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0 when do_sample=True, got 0.0"),
        (dict(do_sample=True, temperature=float("inf")), ValueError, "temperature must be finite when do_sample=True, got inf"),
        (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature must be > 0 when do_sample=True, got nan"),
        (dict(temperature="0.7"), TypeError, r"temperature must be a real number \(a float > 0\), got str \('0.7'\)"),
        (dict(temperature=None), TypeError, r"temperature must be a real number \(a float > 0\), got NoneType \(None\)"),
        (dict(do_sample=1), TypeError, r"do_sample must be a bool, got int \(1\)"),
        (dict(do_sample="yes"), TypeError, r"do_sample must be a bool, got str \('yes'\)"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1, got 0"),
        (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an int >= 1, got bool \(True\)"),
        (dict(max_new_tokens=4.0), TypeError, r"max_new_tokens must be an int >= 1, got float \(4.0\)"),
        (dict(max_new_tokens=None), TypeError, r"max_new_tokens must be an int >= 1, got NoneType \(None\)"),
        (dict(top_k=True), TypeError, r"top_k must be an int >= 1 or None, got bool \(True\)"),
        (dict(top_k=5.0), TypeError, r"top_k must be an int >= 1 or None, got float \(5.0\)"),
        (dict(pad_token_id=-1), ValueError, r"pad_token_id must be an int in \[0, 101\) or None, got -1"),
        (dict(pad_token_id=V + 5), ValueError, r"pad_token_id must be an int in \[0, 101\) or None, got 106"),
        (dict(pad_token_id=1.5), TypeError, r"pad_token_id must be an int in \[0, 101\) or None, got float \(1.5\)"),
        (dict(pad_token_id=False), TypeError, r"pad_token_id must be an int in \[0, 101\) or None, got bool \(False\)"),
        (dict(eos_token_id=1.7), TypeError, r"eos_token_id must be an int in \[0, 101\), a sequence of them, or None, got float \(1.7\)"),
        (dict(eos_token_id="0"), TypeError, r"eos_token_id must be an int in \[0, 101\), a sequence of them, or None, got str \('0'\)"),
        (dict(eos_token_id=[1, 2.5]), TypeError, r"eos_token_id must be .*, got float \(2.5\)"),
        (dict(eos_token_id=[True]), TypeError, r"eos_token_id must be .*, got bool \(True\)"),
        (dict(eos_token_id=torch.tensor([1.0])), TypeError, r"eos_token_id must be .*, got float \(1.0\)"),
        (dict(eos_token_id={1: 2}), TypeError, r"eos_token_id must be .*, got dict \(\{1: 2\}\)"),
        (dict(eos_token_id=V), ValueError, r"eos_token_id must be an int in \[0, 101\), a sequence of them, or None, got 101"),
        (dict(eos_token_id=[3, -2]), ValueError, r"eos_token_id must be .*, got -2"),
        (dict(stats="stats.npz"), TypeError, r"stats must be co-occurrence statistics \(an object with weight, vocab_size, "
                                             r"max_order, e.g. CooccurrenceStats.load\(path\)\) or None, got str "
                                             r"\('stats.npz'\) \(a file path\? load it with CooccurrenceStats.load\(path\)\)"),
        (dict(stats={}), TypeError, r"stats must be co-occurrence statistics .* or None, got dict \(\{\}\)$"),
        (dict(strategy=3), TypeError, r"strategy must be a str, one of \('ar', 'dynamo', 'speculative', 'lookup'\), got int \(3\)"),
        (dict(attention_mask=[[1, 1, 1]]), TypeError, r"attention_mask must be a torch.Tensor of the shape of input_ids \(1, 3\) or None, got list"),
        (dict(attention_mask=torch.tensor([[0.5, 1, 1]])), ValueError, "attention_mask must hold only 0 and 1"),
        (dict(return_dict_in_generate="yes"), TypeError, r"return_dict_in_generate must be a bool, got str \('yes'\)"),
        (dict(k=2.5), TypeError, r"k must be an int, got float \(2.5\)"),
        (dict(k=True), TypeError, r"k must be an int, got bool \(True\)"),
        (dict(otsu_bins="256"), TypeError, r"otsu_bins must be an int, got str \('256'\)"),
        (dict(eps_b="0.1"), TypeError, r"eps_b must be a real number, got str \('0.1'\)"),
        (dict(eps_b=float("nan")), ValueError, "eps_b must be finite, got nan"),
        (dict(alpha_c=True), TypeError, r"alpha_c must be a real number, got bool \(True\)"),
        (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty must be finite, got inf"),
        (dict(blur="no"), TypeError, r"blur must be a bool, got str \('no'\)"),
        (dict(adaptive_threshold=0), TypeError, r"adaptive_threshold must be a bool, got int \(0\)"),
        (dict(candidates=None), TypeError, r"candidates must be a str \('auto', 'sparse' or 'dense'\), got NoneType \(None\)"),
        (dict(max_draft=2.0), TypeError, r"max_draft must be an int, got float \(2.0\)"),
        (dict(min_ngram=np.int64(0)), ValueError, "min_ngram must be >= 1, got 0"),
        (dict(max_ngram=None), TypeError, r"max_ngram must be an int, got NoneType \(None\)"),
        (dict(joint_k="3"), TypeError, r"joint_k must be an int, got str \('3'\)"),
        (dict(hybrid=1), TypeError, r"hybrid must be a bool, got int \(1\)"),
        (dict(merge="yes"), TypeError, r"merge must be a bool, got str \('yes'\)"),
        (dict(size_by=None), ValueError, "size_by must be 'cost' or 'thresholds', got None"),
        (dict(step_cost="fast"), TypeError, r"step_cost must be a sequence of real numbers or None, got str \('fast'\)"),
        (dict(step_cost=3.0), TypeError, r"step_cost must be a sequence of real numbers or None, got float \(3.0\)"),
        (dict(step_cost=(1.0, float("inf"))), ValueError, "step_cost must be a non-empty sequence of positive costs"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1 or None, got 0"),
        (dict(eps_b=1.5), ValueError, r"eps_b must be in \[0, 1\], got 1.5"),
        (dict(eps_b=-0.1), ValueError, r"eps_b must be in \[0, 1\], got -0.1"),
        (dict(generator=3), TypeError, "generator must be a torch.Generator"),
        (dict(streamer=object()), TypeError, "streamer must have put"),
        (dict(eps=0.1), TypeError, r"sample\(\) got unexpected keyword arguments \['eps'\]"),
        (dict(size_by="always"), ValueError, "size_by must be 'cost' or 'thresholds', got 'always'"),
        (dict(step_cost=(1.0, 0.0)), ValueError, "step_cost must be a non-empty sequence of positive costs"),
        (dict(max_draft=0), ValueError, "max_draft must be >= 1, got 0"),
        (dict(draft=3), TypeError, "draft must be a DraftConfig, got int"),
        (dict(backend="metal"), ValueError, "unknown backend 'metal'; choose one of 'auto', 'torch', 'cuda'"),
        (dict(backend="cuda"), ValueError, "backend='cuda' runs fused CUDA kernels and needs CUDA tensors, got a tensor on 'cpu'"),
    ]
    for kwargs, exc, msg in cases:
        kw = {"input_ids": ids, **kwargs}
        with pytest.raises(exc, match=msg):
            sample(model, **kw)
    with pytest.raises(TypeError, match=r"model must be a callable MTP model with new_cache, head_logits, vocab_size, "
                                        r"n_heads, max_seq_len \(e.g. TinyMTP\), got object missing \['new_cache'"):
        sample(object(), ids)


def test_numpy_integers_are_ints_and_eos_sequences(model):
    ids, mask = ragged_batch(3, seed=2)
    py = sample(model, ids, mask, strategy="speculative", max_new_tokens=6, top_k=5, eos_token_id=[7, 9],
                pad_token_id=0, k=5, max_draft=2, joint_k=3, do_sample=False, temperature=0.0)
    for eos in (np.array([7, 9]), torch.tensor([7, 9]), (np.int64(7), 9)):
        out = sample(model, ids, mask, strategy="speculative", max_new_tokens=np.int64(6), top_k=np.int32(5),
                     eos_token_id=eos, pad_token_id=np.int16(0), k=np.int64(5), max_draft=np.int8(2),
                     joint_k=np.uint8(3), do_sample=np.bool_(False), temperature=np.float32(0.0))
        assert torch.equal(out, py)


def test_ids_at_padded_positions_are_ignored(model):
    """Whatever sits under attention_mask 0 (even ids outside the vocabulary) is never read: the new
    tokens are those of zeros there, and the prompt comes back as given."""
    ids, mask = ragged_batch(4, seed=9)
    S = ids.shape[1]
    assert (mask == 0).any()
    clean = sample(model, ids.masked_fill(mask == 0, 0), mask, strategy="dynamo", max_new_tokens=8, eps_b=0.0)
    for filler in (-1, V + 5, 7):
        dirty = ids.masked_fill(mask == 0, filler)
        out = sample(model, dirty, mask, strategy="dynamo", max_new_tokens=8, eps_b=0.0)
        assert torch.equal(out[:, :S], dirty)
        assert torch.equal(out[:, S:], clean[:, S:])


def test_stats_of_other_vocabulary_rejected(model):
    class Stats:
        vocab_size, max_order = 50, 3

        def weight(self, ngrams, alpha_c):
            return torch.ones(ngrams.shape[0])

    with pytest.raises(ValueError, match=f"statistics have vocabulary size 50, expected the model's {V}"):
        sample(model, torch.tensor([[1, 2]]), stats=Stats())
    Stats.vocab_size, Stats.max_order = V, 2
    with pytest.raises(ValueError, match="max_order 2 cannot weight the 3-grams"):
        sample(model, torch.tensor([[1, 2]]), stats=Stats())


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
def test_nan_logits_raise(strategy):
    model = NaNModel(torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="the model returned NaN logits"):
        sample(model, torch.tensor([[1]]), strategy=strategy)


def test_one_head_model_every_strategy_is_ar():
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, n_layer=2, n_heads=1, d_model=32, n_attn_heads=4, d_ff=64,
                              max_seq_len=64)).eval()
    ids = torch.randint(0, 50, (2, 10))
    ar = sample(m, ids, strategy="ar", max_new_tokens=12)
    for strategy in ("dynamo", "speculative", "lookup"):
        assert torch.equal(sample(m, ids, strategy=strategy, max_new_tokens=12), ar), strategy


# ---------------------------------------------------------------- the step's forward from a CUDA graph


def _generate(model, ids, mask, strategy, do_sample, capture):
    from dynamo_sampling.decoding import generate
    from dynamo_sampling.lookup import LookupConfig
    from dynamo_sampling.policy import DynamoConfig
    from dynamo_sampling.samplers import SamplingParams
    sp = SamplingParams(do_sample=do_sample, temperature=0.9, top_k=None,
                        generator=torch.Generator().manual_seed(3) if do_sample else None)
    return generate(model, ids, mask, strategy=strategy, max_new_tokens=12, sampling=sp, eos_token_id=None,
                    pad_token_id=0, streamer=None, dynamo=DynamoConfig(eps_b=0.05), stats=None,
                    lookup=LookupConfig(), graph_capture=capture)


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_graphed_forward_gives_the_same_tokens(model, strategy, do_sample):
    """The loop through GraphedForward (static input buffers refreshed each call, outputs rewritten in
    place by every replay; eager_capture keeps exactly that contract without a GPU) decodes the same
    tokens with the same statistics as the plain loop, on a ragged batch."""
    from dynamo_sampling.graphs import eager_capture
    ids, mask = ragged_batch(5, seed=4)
    a = _generate(model, ids, mask.bool(), strategy, do_sample, None)
    b = _generate(model, ids, mask.bool(), strategy, do_sample, eager_capture)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.steps, b.steps) and torch.equal(a.accepted, b.accepted)


def test_graphed_forward_captures_once_per_shape(model):
    from dynamo_sampling.graphs import GraphedForward
    calls = []

    def counting_capture(fn, device):
        calls.append(device)
        from dynamo_sampling.graphs import eager_capture
        return eager_capture(fn, device)

    cache = model.new_cache(2, max_len=20)
    fwd = GraphedForward(model, cache, counting_capture)
    ids = torch.randint(0, V, (2, 3))
    pos = torch.arange(3).expand(2, 3)
    with torch.inference_mode():
        out1 = fwd(ids, pos, heads=3, output_hidden=True).clone()
        ref = model(ids, pos, model.new_cache(2, max_len=20), heads=3, output_hidden=True)
        out2 = fwd(ids.flip(0), pos + 3, heads=3, output_hidden=True)
        fwd(ids[:, :1], pos[:, :1] + 6, heads=1, output_hidden=True)
    assert len(calls) == 2  # (2, 3) with heads=3 once; (2, 1) with heads=1 once
    assert torch.allclose(out1, ref, atol=1e-6)
    assert not torch.allclose(out2, out1)  # the second call's inputs reached the replay


def test_cuda_graph_argument_errors(model):
    ids = torch.randint(0, V, (1, 4))
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        sample(model, ids, cuda_graph="yes")
    with pytest.raises(ValueError, match="needs the model and input_ids on a CUDA device"):
        sample(model, ids, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
def test_cuda_graph_decoding_equals_eager_on_gpu(strategy):
    """On a GPU the captured forwards decode exactly what the eager ones decode (greedy, ragged batch)."""
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=V, n_layer=3, n_heads=3, d_model=48, n_attn_heads=4, d_ff=96,
                              max_seq_len=128)).eval().cuda()
    with torch.no_grad():
        m.embed.weight.mul_(25.0)
    ids, mask = ragged_batch(6, seed=8)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(strategy=strategy, max_new_tokens=16, backend="torch", return_dict_in_generate=True)
    a = sample(m, ids, mask, **kw)
    b = sample(m, ids, mask, cuda_graph=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.steps, b.steps)


def test_batch_drafts_are_capped_at_the_width_that_pays_for_the_batch():
    """A batch feeds its longest draft's width to every row: _cap_to_batch keeps the width with the
    most expected kept tokens per unit of cost, summed over the active rows. With heads on demand,
    width 1 (no draft fed) is priced as head 1 alone, which is what that step then runs."""
    from types import SimpleNamespace
    from dynamo_sampling.decoding import Proposal, _Decoder

    def cap(cost, accept, n, head1_cost=None):
        table = torch.tensor(cost, dtype=torch.float64)
        lazy = head1_cost is not None  # the step runs every head unless no row feeds a draft
        me = SimpleNamespace(B=3, W=5, dev=torch.device("cpu"), step_heads=3 if lazy else 1, cost=table,
                             cost_lookup=torch.tensor(head1_cost, dtype=torch.float64) if lazy else table,
                             lazy=lazy, ar_w=torch.arange(5))
        prop = Proposal(torch.zeros(3, 5, dtype=torch.long), torch.tensor(n),
                        accept=None if not lazy else torch.tensor(accept, dtype=torch.float64))
        rows = torch.tensor([True, True, False])
        # without heads on demand every row's draft is lookup's here; with them, the joint's (no lookup)
        _Decoder._cap_to_batch(me, prop, torch.tensor(accept, dtype=torch.float64), None if lazy else rows, rows)
        return prop.n.tolist()

    unlikely = [[0.2] * 4, [0.0] * 4, [0.9] * 4]
    assert cap([1.0, 1.5, 2.0, 2.5, 3.0], unlikely, [5, 1, 5]) == [1, 1, 1]  # the draft does not pay for 2 rows
    likely = [[0.95] * 4, [0.0] * 4, [0.0] * 4]
    assert cap([1.0, 1.05, 1.1, 1.15, 1.2], likely, [5, 1, 0]) == [5, 1, 0]  # it does
    assert cap([1.0, 1.05, 1.1, 1.5, 3.0], likely, [5, 1, 3]) == [3, 1, 3]  # up to where the cost jumps
    some = [[0.4] * 4, [0.0] * 4, [0.0] * 4]
    every_head = [1.3, 1.5, 1.8, 2.1, 2.4]
    assert cap(every_head, some, [5, 1, 5]) == [2, 1, 2]  # against width 1 with every head: 2.4 / 1.5 > 2 / 1.3
    assert cap(every_head, some, [5, 1, 5], head1_cost=[1.0, 1.1, 1.2, 1.3, 1.4]) == [1, 1, 1]  # 2 / 1.0 wins


def test_a_batch_drops_joint_drafts_whose_heads_cost_the_other_rows_more_than_they_bring(monkeypatch):
    """With heads on demand, a row's joint draft makes the whole batch's forward run every head: where
    the batch keeps more tokens per unit of cost without them (here two rows' likely lookup drafts
    against one unlikely joint draft), the joint rows feed their first token alone and the step runs
    head 1 alone (drafters.BATCH_GATE); with likely joint drafts they stay."""
    from types import SimpleNamespace
    from dynamo_sampling import drafters
    from dynamo_sampling.decoding import Proposal, _Decoder

    def cap(joint_accept):
        head1 = torch.tensor([1.0, 1.05, 1.1, 1.15, 1.2], dtype=torch.float64)
        me = SimpleNamespace(B=3, W=5, dev=torch.device("cpu"), step_heads=3, lazy=True, ar_w=torch.arange(5),
                             cost=torch.tensor([1.2, 1.25, 1.3, 1.35, 1.4], dtype=torch.float64), cost_lookup=head1)
        prop = Proposal(torch.zeros(3, 5, dtype=torch.long), torch.tensor([5, 5, 5]),
                        accept=torch.tensor([[joint_accept] * 4] * 3, dtype=torch.float64))
        use = torch.tensor([False, True, True])  # row 0 feeds the joint's draft, rows 1-2 lookup's
        _Decoder._cap_to_batch(me, prop, torch.full((3, 4), 0.9, dtype=torch.float64), use, torch.ones(3, dtype=torch.bool))
        return prop.n.tolist(), me.step_heads

    assert cap(0.4) == ([1, 5, 5], 1)
    assert cap(0.99) == ([5, 5, 5], 3)
    monkeypatch.setattr(drafters, "BATCH_GATE", False)
    assert cap(0.4) == ([5, 5, 5], 3)


# ---------------------------------------------------------------- finished rows leave the batch


@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup"])
def test_finished_rows_leave_the_batch_with_the_same_results(model, monkeypatch, strategy):
    """On a CPU finished rows leave the batch (decoding._Decoder._retire): greedy tokens, statistics
    and the streamed tokens are those of the loop that keeps every row to the end, on a ragged batch
    whose rows stop at different steps (an EOS that only some rows reach early)."""
    from dynamo_sampling import decoding

    class Collect:
        def __init__(self):
            self.rows = None

        def put(self, tokens):
            self.rows = [[] for _ in tokens] if self.rows is None else self.rows
            assert len(tokens) == len(self.rows)
            for r, t in zip(self.rows, tokens):
                r.extend(t.tolist())

        def end(self):
            pass

    ids, mask = ragged_batch(6, seed=11)
    S = ids.shape[1]
    eos = int(sample(model, ids, mask, strategy="ar", max_new_tokens=4)[0, S + 3])  # row 0 ends at token 4
    retired = []
    retire = decoding._Decoder._retire
    monkeypatch.setattr(decoding._Decoder, "_retire", lambda self: retired.append(self.B) or retire(self))
    runs = []
    for keep_all in (False, True):
        monkeypatch.setattr(decoding, "RETIRE_FINISHED", not keep_all)
        s = Collect()
        out = sample(model, ids, mask, strategy=strategy, max_new_tokens=14, eps_b=0.05, step_cost=FLAT,
                     eos_token_id=eos, pad_token_id=0, streamer=s, return_dict_in_generate=True)
        runs.append((out, s.rows))
        if not keep_all:
            assert retired, "no row left the batch early"
            n_retire = len(retired)
    assert len(retired) == n_retire  # the reference loop never retires
    (a, streamed_a), (b, streamed_b) = runs
    for field in ("sequences", "steps", "new_tokens", "histogram", "drafted", "accepted"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert streamed_a == streamed_b
    assert streamed_a == [row[:n] for row, n in zip(a.sequences[:, S:].tolist(), a.new_tokens.tolist())]




@pytest.mark.parametrize("strategy", ["lookup", "speculative"])
def test_lookup_trees_keep_greedy_equal_to_ar(model, monkeypatch, strategy):
    """Second branches (the losing lookup drafter's draft beside the fed one, LookupConfig.tree) are
    fed and some kept, by default in lookup one row at a time (not in speculative) and, forced, in a
    ragged batch; every greedy output equals ar's, and tree=False feeds none."""
    branches = count_branches(monkeypatch)
    ids, mask = ragged_batch(5, seed=23, min_len=3, max_len=20)
    ids[:, -4:] = ids[:, -12:-8]  # repeated spans: prompt lookup drafts too
    stats = _random_corpus_stats(model.vocab_size, seed=4, tokens=3000)
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=16)
    for b in range(5):
        row = ids[b:b + 1, mask[b].bool()]
        assert torch.equal(sample(model, row, strategy=strategy, max_new_tokens=16, stats=stats, step_cost=FLAT),
                           ar[b:b + 1, -row.shape[1] - 16:])
    alone = dict(branches)
    assert (alone["fed"] > 0) == (strategy == "lookup")
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=16, stats=stats, step_cost=FLAT, tree=True,
                 return_dict_in_generate=True)
    assert torch.equal(out.sequences, ar)
    assert branches["fed"] > alone["fed"] and (branches["taken"] > 0 or strategy == "speculative")
    fed = branches["fed"]
    assert torch.equal(sample(model, ids[:1], strategy=strategy, max_new_tokens=16, stats=stats, step_cost=FLAT,
                              tree=False), ar[:1])
    assert branches["fed"] == fed
    with pytest.raises(TypeError, match="tree must be a bool or None"):
        sample(model, ids, mask, strategy=strategy, max_new_tokens=4, stats=stats, tree=1)


@pytest.mark.parametrize("strategy", ["lookup", "speculative"])
def test_sampled_lookup_trees_match_ar_distribution(monkeypatch, strategy):
    """Triples after a prompt with copies in it, statistics of a random corpus given, trees forced in
    the batch: second branches are fed, some kept (the branch's first token kept with probability
    p(b) / (1 - p(a)) after the fed draft's a was refused, both left out of the next draw if not);
    every cell within 5 sd, TV < 0.03."""
    branches = count_branches(monkeypatch)
    model = random_table_model(V=5, H=3, seed=8)
    P = torch.softmax(model.table[0], -1).double()
    prompt, n = [1, 3, 1, 2, 4, 1], 30000
    exact = P[prompt[-1]][:, None, None] * P[:, :, None] * P[None]
    out = sample(model, torch.tensor([prompt] * n), strategy=strategy, max_new_tokens=3, do_sample=True,
                 temperature=1.0, top_k=None, eps_b=0.0, max_draft=2, stats=_random_corpus_stats(5, seed=6),
                 step_cost=FLAT, tree=True, generator=torch.Generator().manual_seed(7), return_dict_in_generate=True)
    assert branches["fed"] > 1000 and 0 < branches["taken"] < branches["fed"]
    _assert_distributed_as(_triple_counts(out.sequences[:, len(prompt):], 5), exact, n, tv=0.03)


def test_lookup_trees_leave_the_cache_and_saved_stem_as_a_chain_would(model, monkeypatch):
    """Outputs cannot show a kept branch's keys, values or saved stem outputs left at the wrong slots
    (drafts would only be worse), so this reads them: speculative with trees forced and heads on
    demand, both lookup drafters drafting, the joint
    evaluated every fourth step only (else it is fed every step here and no branch is); after
    every step each row's cache at its committed positions (heads 2..H: at the positions they hold,
    caught up after kept branches) and its saved stem outputs (at the positions heads 2..H have yet
    to catch up on) equal a fresh forward's over the row's tokens."""
    from dynamo_sampling import decoding
    branches = count_branches(monkeypatch)
    calls = [0]

    def every_fourth(self, b, alt, against_lookup):  # every row together (branches need no joint in the step)
        calls[0] += 1
        return self.since_joint_h[b] >= 3
    monkeypatch.setattr(decoding._Decoder, "_wants_joint", every_fourth)
    ids, mask = ragged_batch(3, seed=31, min_len=12, max_len=20)
    ids[:, -4:] = ids[:, -12:-8]  # repeated spans: prompt lookup drafts beside the corpus's
    stats = _random_corpus_stats(model.vocab_size, seed=4, tokens=3000)
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=16)
    checked, step = [0], decoding._Decoder.step
    n_stem = len(model.stem) + 1  # the stem's layers and head 1's

    def checked_step(self, streamer):
        out = step(self, streamer)
        for b in range(self.B):
            L, Lh = int(self.cache.lengths[b]), int(self.heads_len[b])
            row = mask[self.rows_h[b]].bool()
            seq = torch.cat([ids[self.rows_h[b], row], self.out[b, :int(self.n_gen[b])]])[:L]
            ref = model.new_cache(1, max_len=L + 1)
            with torch.inference_mode():
                _, stem = model(seq[None], torch.arange(L)[None], ref, heads=model.n_heads, output_stem=True)
            for t, r in ((self.cache.k, ref.k), (self.cache.v, ref.v)):
                torch.testing.assert_close(t[:n_stem, b, :, :L], r[:n_stem, 0, :, :L], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(t[n_stem:, b, :, :Lh], r[n_stem:, 0, :, :Lh], rtol=1e-4, atol=1e-4)
            if self.stem_buf is not None:
                torch.testing.assert_close(self.stem_buf[b, Lh:L], stem[0, Lh:], rtol=1e-4, atol=1e-4)
            checked[0] += 1
        return out
    monkeypatch.setattr(decoding._Decoder, "step", checked_step)
    out = sample(model, ids, mask, strategy="speculative", max_new_tokens=16, stats=stats, step_cost=FLAT, tree=True)
    assert torch.equal(out, ar)
    assert checked[0] > 0 and branches["taken"] > 0 and calls[0] > 0
