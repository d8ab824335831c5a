"""Property-based tests (hypothesis) of the public boundary: ``sample()`` over its arguments and
``dynamo_step`` over awkward logits either return a valid output or raise ``ValueError`` /
``TypeError`` naming the argument at fault; nothing else, ever.

Small ``max_examples`` keep the file to a few seconds on one CPU core; ``deadline=None`` because
a first call pays for lazy initialisation.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_sampling import DynamoConfig, TinyMTP, TinyMTPConfig, dynamo_step, sample
from dynamo_sampling.cooccurrence import CooccurrenceStats
from dynamo_sampling.decoding import STRATEGIES
from toy_models import oracle_model, random_table_model

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FLAT = (1.0,)  # step_cost: no timing run, deterministic draft sizes


def _tiny():
    torch.manual_seed(0)
    return TinyMTP(TinyMTPConfig(vocab_size=23, n_layer=2, n_heads=3, d_model=16, n_attn_heads=2, d_ff=32,
                                 max_seq_len=24)).eval()


MODELS = {"tiny": _tiny(), "oracle": oracle_model(V=16, H=3), "table2": random_table_model(V=7, H=2, seed=1),
          "table3": random_table_model(V=6, H=3, seed=2), "table1": random_table_model(V=5, H=1, seed=3)}
TABLES = {"oracle", "table2", "table3", "table1"}  # exact logits: greedy speculative / lookup must equal ar


def _stats(model, seed):
    """Statistics from a short random corpus: most n-grams unseen, so candidate sets often empty."""
    g = np.random.default_rng(seed)
    return CooccurrenceStats.build([g.integers(0, model.vocab_size, 40)], model.vocab_size,
                                   max_order=max(2, model.n_heads))


STATS = {name: _stats(m, i) for i, (name, m) in enumerate(MODELS.items())}

# wrong types, wrong ranges and a few values that happen to be valid somewhere
GARBAGE = st.sampled_from(["7", "", b"x", 2.5, -1.0, float("nan"), float("inf"), True, False, None, [], [1.5], {},
                           {1: 2}, (), object(), -1, 0, 10 ** 6, np.float64(1.5), np.bool_(True), np.int64(-3),
                           torch.tensor(1), torch.zeros(2, 2), "stats.npz"])
GARBAGE_TARGETS = ["max_new_tokens", "top_k", "temperature", "do_sample", "eos_token_id", "pad_token_id", "stats",
                   "strategy", "attention_mask", "return_dict_in_generate", "generator", "streamer", "k", "eps_b",
                   "alpha_c", "max_draft", "min_ngram", "joint_k", "hybrid", "step_cost", "size_by", "candidates",
                   "blur", "otsu_bins", "repetition_penalty"]


@st.composite
def sample_calls(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    model = MODELS[name]
    V = model.vocab_size
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    lengths = [draw(st.integers(1, S)) for _ in range(B)]
    mask = torch.tensor([[0] * (S - n) + [1] * n for n in lengths])
    real = torch.tensor(draw(st.lists(st.integers(0, V - 1), min_size=B * S, max_size=B * S))).view(B, S)
    filler = draw(st.integers(-3, V + 3))  # anything at padded positions: never read
    ids = torch.where(mask.bool(), real, filler)
    eos = draw(st.one_of(st.none(), st.integers(0, V - 1), st.lists(st.integers(0, V - 1), max_size=3)))
    kwargs = dict(
        attention_mask=mask.bool() if draw(st.booleans()) else mask,
        strategy=draw(st.sampled_from(STRATEGIES)),
        max_new_tokens=draw(st.integers(1, 6)),
        do_sample=draw(st.booleans()),
        temperature=draw(st.floats(0.2, 3.0)),
        top_k=draw(st.one_of(st.none(), st.integers(1, V + 2))),
        eos_token_id=eos,
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, V - 1))),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 99))),
        return_dict_in_generate=draw(st.booleans()),
        stats=STATS[name] if draw(st.booleans()) else None,
        eps_b=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        k=draw(st.integers(1, 8)),
        max_draft=draw(st.integers(1, 4)),
        step_cost=FLAT,
    )
    target = draw(st.one_of(st.none(), st.sampled_from(GARBAGE_TARGETS)))
    if target is not None:
        kwargs[target] = draw(GARBAGE)
    return name, ids, kwargs, target


def _check_output(model, ids, kw, out):
    B, S = ids.shape
    V, max_new = model.vocab_size, int(kw["max_new_tokens"])
    seq = out.sequences if kw["return_dict_in_generate"] else out
    assert isinstance(seq, torch.Tensor) and seq.dtype == torch.long
    assert seq.shape == (B, S + max_new)
    assert torch.equal(seq[:, :S], ids)  # the prompt as given, padded positions included
    new = seq[:, S:]
    assert bool(((new >= 0) & (new < V)).all()), new
    eos = kw["eos_token_id"]
    eos = [] if eos is None else [int(eos)] if isinstance(eos, (int, np.integer)) else [int(e) for e in eos]
    pad = kw["pad_token_id"] if kw["pad_token_id"] is not None else (eos[0] if eos else 0)
    counts = []
    for row in new.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        if stop is not None:
            assert all(t == pad for t in row[stop + 1:]), (row, pad)  # padded after its EOS
        counts.append(max_new if stop is None else stop + 1)
    if kw["return_dict_in_generate"]:
        assert out.new_tokens.tolist() == counts
        W = out.histogram.shape[1]
        assert torch.equal((out.histogram * torch.arange(1, W + 1)).sum(1), out.new_tokens)
        assert torch.equal(out.histogram.sum(1), out.steps)
        assert bool((out.accepted <= out.drafted).all())
    return seq


@settings(max_examples=300, **SETTINGS)
@given(sample_calls())
def test_sample_returns_valid_output_or_names_the_bad_argument(call):
    name, ids, kw, target = call
    model = MODELS[name]
    try:
        out = sample(model, ids, **kw)
    except (ValueError, TypeError) as e:
        assert target is not None, f"valid arguments refused: {e}"
        assert target in str(e), f"{target}={kw[target]!r} raised {type(e).__name__} not naming it: {e}"
        return
    seq = _check_output(model, ids, kw, out)
    if name in TABLES and not kw["do_sample"] and kw["strategy"] in ("speculative", "lookup") and target is None:
        ar = sample(model, ids, **{**kw, "strategy": "ar", "return_dict_in_generate": False})
        assert torch.equal(seq, ar)  # exact strategies: greedy tokens are ar's


# ---------------------------------------------------------------- the step policy


class _MaskStats:
    """Weight 1 on n-grams whose adjacent pairs ``(a, b)`` all have ``a + 2 b`` divisible by ``mod``,
    0 elsewhere (mod 1: nothing removed; a large mod: nearly every candidate removed). Like counted
    statistics, an n-gram is unseen when one of its pairs is, which the sparse path relies on."""

    def __init__(self, V, H, mod):
        self.vocab_size, self.max_order, self.mod = V, max(2, H), mod

    def weight(self, ngrams, alpha_c=1.0):
        pairs = ngrams[:, :-1] + 2 * ngrams[:, 1:]
        return (pairs % self.mod == 0).all(-1).float()


SPECIAL = st.sampled_from([float("-inf"), float("nan"), 0.0, 1.0, -1.0, 3.0])


@st.composite
def step_calls(draw):
    B, H, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    shape = draw(st.sampled_from(["random", "ties", "one_finite", "all_neg_inf_row"]))
    values = draw(st.lists(st.one_of(st.floats(-20, 20, width=32), SPECIAL), min_size=B * H * V,
                           max_size=B * H * V))
    logits = torch.tensor(values, dtype=torch.float32).view(B, H, V)
    if shape == "ties":
        logits = torch.full((B, H, V), draw(st.sampled_from([0.0, 2.0])))
    elif shape == "one_finite":  # every (row, head) all -inf but one entry
        keep = torch.tensor(draw(st.lists(st.integers(0, V - 1), min_size=B * H, max_size=B * H))).view(B, H, 1)
        logits = torch.full((B, H, V), float("-inf")).scatter(2, keep, 1.0)
    elif shape == "all_neg_inf_row":
        logits[draw(st.integers(0, B - 1))] = float("-inf")
    cfg = DynamoConfig(k=draw(st.integers(1, 10)), eps_b=draw(st.sampled_from([0.0, 0.01, 0.2, 1.0])),
                       adaptive_threshold=draw(st.booleans()), blur=draw(st.booleans()),
                       repetition_penalty=draw(st.sampled_from([1.0, 1.5])),
                       candidates=draw(st.sampled_from(["auto", "sparse", "dense"])))
    kw = dict(do_sample=draw(st.booleans()), temperature=draw(st.floats(0.2, 3.0)),
              top_k=draw(st.one_of(st.none(), st.integers(1, V + 1))),
              generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    mod = draw(st.one_of(st.none(), st.sampled_from([1, 2, 3, 1000])))
    kw["stats"] = None if mod is None else _MaskStats(V, H, mod)
    if draw(st.booleans()):
        kw["seen_tokens"] = torch.tensor(draw(st.lists(st.booleans(), min_size=B * V, max_size=B * V))).view(B, V)
    if draw(st.booleans()):
        kw["first_tokens"] = torch.tensor(draw(st.lists(st.integers(-1, V), min_size=B, max_size=B)))
    if draw(st.booleans()):
        kw["max_tokens"] = torch.tensor(draw(st.lists(st.integers(0, H + 1), min_size=B, max_size=B)))
    return logits, cfg, kw


@settings(max_examples=400, **SETTINGS)
@given(step_calls())
def test_dynamo_step_returns_valid_step_or_value_error(call):
    logits, cfg, kw = call
    B, H, V = logits.shape
    first = kw.get("first_tokens")
    try:
        out = dynamo_step(logits, cfg, **kw)
    except ValueError as e:
        # the only refusals these inputs may draw: a first token outside the vocabulary
        assert first is not None and bool(((first < 0) | (first >= V)).any()), e
        assert "first_tokens must be in" in str(e)
        return
    assert first is None or bool(((first >= 0) & (first < V)).all())
    assert out.tokens.shape == (B, H) and out.n.shape == (B,)
    n = out.n
    assert bool(((n >= 1) & (n <= H)).all()), n
    if "max_tokens" in kw:
        assert bool((n <= kw["max_tokens"].clamp(min=1)).all())
    as_inf = logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN counts as -inf
    for b in range(B):
        row = out.tokens[b].tolist()
        nb = int(n[b])
        assert all(0 <= t < V for t in row[:nb]) and all(t == -1 for t in row[nb:]), (row, nb)
        if first is not None:
            assert row[0] == int(first[b])
        for j in range(0 if first is None else 1, nb):  # never a zero-probability token where a head has others
            if bool((as_inf[b, j] > -math.inf).any()):
                assert as_inf[b, j, row[j]] > -math.inf, (b, j, row)
    if not kw["do_sample"] and cfg.candidates != "auto":  # the sparse fast path and the dense reference agree
        other = DynamoConfig(**{**cfg.__dict__, "candidates": "dense" if cfg.candidates == "sparse" else "sparse"})
        ref = dynamo_step(logits, other, **kw)
        assert torch.equal(ref.tokens, out.tokens) and torch.equal(ref.n, out.n)


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.zeros(2, 3), ValueError, r"head_logits must have shape \(B, H, V\) with B, H, V >= 1, got \(2, 3\)"),
    (torch.zeros(0, 2, 5), ValueError, r"head_logits must have shape \(B, H, V\) with B, H, V >= 1, got \(0, 2, 5\)"),
    (torch.zeros(1, 2, 5, dtype=torch.long), TypeError, "head_logits must be a floating-point tensor"),
    (torch.tensor([[[0.0, float("inf")]]]), ValueError, "head_logits must be finite or -inf .*got \\+inf at row 0, head 0"),
])
def test_dynamo_step_boundary_errors(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        dynamo_step(bad, DynamoConfig())


def test_dynamo_step_argument_errors():
    x = torch.zeros(2, 3, 5)
    with pytest.raises(TypeError, match="cfg must be a DynamoConfig, got dict"):
        dynamo_step(x, {})
    with pytest.raises(TypeError, match=r"k must be an int, got float \(2.5\)"):
        dynamo_step(x, DynamoConfig(k=2.5))
    with pytest.raises(ValueError, match=r"first_tokens must have shape \(2,\) \(head_logits is \(2, 3, 5\)\), got \(3,\)"):
        dynamo_step(x, DynamoConfig(), first_tokens=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"seen_tokens must be a bool tensor of shape \(2, 5\) or None, got dtype torch.int64"):
        dynamo_step(x, DynamoConfig(), seen_tokens=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="first_tokens must be in \\[0, 5\\), got 5"):
        dynamo_step(x, DynamoConfig(), first_tokens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0 when do_sample=True, got 0"):
        dynamo_step(x, DynamoConfig(), do_sample=True, temperature=0)
