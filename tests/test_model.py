"""TinyMTP: the cache, padding and the heads argument."""
import copy

import pytest
import torch

from dynamo_sampling import TinyMTP, TinyMTPConfig

TOL = 1e-5  # fp32; cached and uncached paths run the same ops on different shapes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyMTP(TinyMTPConfig(vocab_size=97, n_layer=3, n_heads=3, d_model=32, n_attn_heads=4, d_ff=64,
                                 max_seq_len=64)).eval()


@torch.no_grad()
def test_incremental_cache_equals_full_forward(model):
    ids = torch.randint(0, 97, (3, 20))
    pos = torch.arange(20).expand(3, 20)
    full = model(ids, pos)  # (3, 20, 3, 97)
    cache = model.new_cache(3)
    pieces = [model(ids[:, a:b], pos[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 11), (11, 20)]]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=TOL)


@torch.no_grad()
def test_ragged_feed_and_rollback(model):
    ids = torch.randint(0, 97, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    full = model(ids, pos)
    cache = model.new_cache(2)
    model(ids[:, :5], pos[:, :5], cache)
    # row 0 feeds 3 tokens, row 1 feeds 1 token plus padding
    feed_pos = torch.tensor([[5, 6, 7], [5, -1, -1]])
    out = model(ids[:, 5:8], feed_pos, cache)
    assert torch.allclose(out[0], full[0, 5:8], atol=TOL)
    assert torch.allclose(out[1, 0], full[1, 5], atol=TOL)
    # roll row 0 back to length 6 by overwriting position 6 with other tokens: stale slot 7 is never read
    other = torch.randint(0, 97, (1, 1))
    out2 = model(torch.cat([other, ids[1:, 6:7]]), torch.tensor([[6], [6]]), cache)
    ref = model(torch.cat([ids[:1, :6], other], 1), torch.arange(7)[None])[0, 6]
    assert torch.allclose(out2[0, 0], ref, atol=TOL)
    assert torch.allclose(out2[1, 0], full[1, 6], atol=TOL)


@torch.no_grad()
def test_heads_argument_computes_leading_heads_only(model):
    ids = torch.randint(0, 97, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    all_heads = model(ids, pos)
    one = model(ids, pos, heads=1)
    assert one.shape == (2, 6, 1, 97)
    assert torch.allclose(one[:, :, 0], all_heads[:, :, 0], atol=TOL)
    with pytest.raises(ValueError, match="heads must be in 1..3, got 4"):
        model(ids, pos, heads=4)


@torch.no_grad()
@pytest.mark.parametrize("reference", [False, True])
def test_heads_are_distinct_modules(model, reference):
    """The heads share no weights: changing head h's extra layer changes head h's logits only."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9).expand(2, 9)
    before = model(ids, pos, reference=reference)  # (2, 9, 3, 97)
    g = torch.Generator().manual_seed(2)
    for h in range(model.n_heads):
        changed = copy.deepcopy(model)
        for param in changed.head_layers[h].parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.5)
        after = changed(ids, pos, reference=reference)
        others = [i for i in range(model.n_heads) if i != h]
        assert torch.allclose(after[:, :, others], before[:, :, others], atol=TOL, rtol=0)
        assert not torch.allclose(after[:, :, h], before[:, :, h], atol=1e-3)


def test_config_round_trip_and_errors():
    cfg = TinyMTPConfig(vocab_size=50, n_heads=4)
    assert TinyMTPConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="n_layer must be >= 2"):
        TinyMTPConfig(n_layer=1)
    with pytest.raises(ValueError, match="unknown TinyMTPConfig fields"):
        TinyMTPConfig.from_dict({"vocab_size": 5, "bogus": 1})


# ---------------------------------------------------------------- grouped fast path vs per-layer reference


def _random_norms(model):
    """Non-trivial LayerNorm affines and biases, so folding them into the linear layers is exercised."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + torch.randn(mod.weight.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def normed_model():
    torch.manual_seed(1)
    return _random_norms(TinyMTP(TinyMTPConfig(vocab_size=97, n_layer=3, n_heads=3, d_model=32, n_attn_heads=4,
                                               d_ff=64, max_seq_len=64)).eval())


def _feeds(model, reference, dtype=torch.float32):
    """Full, incremental, ragged and rolled-back feeds through one cache; every output."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (3, 16), generator=g)
    outs = []
    with torch.no_grad():
        outs.append(model(ids, torch.arange(16).expand(3, 16), reference=reference))
        cache = model.new_cache(3, 32, dtype=dtype)
        prompt_pos = torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [-1, -1, -1, -1, 0, 1]])  # ragged
        outs.append(model(ids[:, :6], prompt_pos, cache, reference=reference))
        outs.append(model(ids[:, 6:9], torch.tensor([[4, 5, 6], [6, -1, -1], [2, 3, -1]]), cache, reference=reference))
        # roll row 0 back to length 5 and row 1 to 6: overwrite those slots with other tokens
        outs.append(model(ids[:, 9:11], torch.tensor([[5, 6], [6, 7], [4, -1]]), cache, heads=2, reference=reference))
        outs.append(model(ids[:, 11:12], torch.tensor([[7], [8], [5]]), cache, heads=1, reference=reference,
                          logits_index=torch.zeros(3, 1, dtype=torch.long)))
    return outs


def test_grouped_fast_path_equals_per_layer_reference(normed_model):
    fast, ref = _feeds(normed_model, False), _feeds(normed_model, True)
    for f, r in zip(fast, ref):
        assert f.shape == r.shape
        assert torch.allclose(f, r, atol=1e-5, rtol=1e-5), (f - r).abs().max()


def _rows_feeds(model, reference):
    """The heads' layers run only at the rows read (logits_index; extra_heads' rows), yet every fed token
    writes its keys and values: the feeds after them read those keys."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    prompt_pos = torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [-1, -1, -1, -1, 0, 1]])  # ragged
    last = torch.full((3, 1), 5)
    outs = []
    with torch.no_grad():
        cache = model.new_cache(3, 32)
        outs.append(model(ids[:, :6], prompt_pos, cache, reference=reference, logits_index=last))
        step = torch.tensor([[4, 5, 6], [6, 7, -1], [2, -1, -1]])
        outs.append(model(ids[:, 6:9], step, cache, reference=reference, logits_index=torch.tensor([[2], [1], [0]])))
        outs.append(model(ids[:, 9:11], torch.tensor([[7, 8], [8, 9], [3, 4]]), cache, reference=reference))
        # heads on demand: head 1 alone with the stem kept, then heads 2..H on it, read at one row each
        cache = model.new_cache(3, 32)
        h1, stem = model(ids[:, :6], prompt_pos, cache, heads=1, output_hidden=True, output_stem=True,
                         reference=reference)
        outs.append(model.extra_heads(stem, prompt_pos, cache, reference=reference, rows=torch.tensor([[5], [3], [5]])))
        outs.append(model(ids[:, 6:8], torch.tensor([[4, 5], [6, 7], [2, 3]]), cache, reference=reference))
    return outs


def test_heads_at_the_rows_read_equal_the_reference(normed_model):
    fast, ref = _rows_feeds(normed_model, False), _rows_feeds(normed_model, True)
    assert [f.shape for f in fast] == [r.shape for r in ref]
    assert fast[0].shape[1] == 1 and fast[3].shape[1] == 1
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, atol=1e-5, rtol=1e-5), (f - r).abs().max()


def test_grouped_fast_path_equals_reference_in_bf16(normed_model):
    model = TinyMTP(normed_model.config)
    model.load_state_dict(normed_model.state_dict())
    model = model.to(torch.bfloat16).eval()
    fast, ref = _feeds(model, False, torch.bfloat16), _feeds(model, True, torch.bfloat16)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, atol=0.05 * r.abs().max().item()), (f - r).abs().max()


def _bf16_copy(model):
    copy = TinyMTP(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.to(torch.bfloat16).eval()


def test_bf16_default_cache_is_float32_and_stays_close_to_the_reference(normed_model):
    model = _bf16_copy(normed_model)
    assert model.new_cache(1, 8).dtype == torch.float32  # attention in fp32 on a CPU (new_cache's docstring)
    fast, ref = _feeds(model, False, None), _feeds(model, True, torch.bfloat16)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r, atol=0.05 * r.abs().max().item()), (f - r).abs().max()


def test_prepacked_bf16_matmuls_give_bit_identical_logits(normed_model, monkeypatch):
    from dynamo_sampling.models import tiny
    model = _bf16_copy(normed_model)
    with torch.no_grad():
        stem, groups, _, _ = model.inference_weights()
        model.head_logits(torch.zeros(1, model.config.d_model, dtype=torch.bfloat16))
    if stem[0].packed is None:
        pytest.skip("this torch build or CPU cannot prepack bf16 weights for oneDNN")
    assert all(g.packed is not None for g in groups.values()) and model._unembed_packed[1] is not None
    packed = _feeds(model, False, torch.bfloat16)
    monkeypatch.setattr(tiny, "pack_linear", lambda weight: None)
    model._inference = None  # rebuilt without packs
    plain = _feeds(model, False, torch.bfloat16)
    assert model.inference_weights()[0][0].packed is None
    for a, b in zip(packed, plain):
        assert torch.equal(a, b)
    monkeypatch.undo()
    hidden = torch.randn(2, model.config.d_model).bfloat16()
    with torch.no_grad():
        model.head_logits(hidden)
        model.unembed.weight.mul_(2)  # in place, as an optimiser step would: the pack follows
        assert torch.equal(model.head_logits(hidden), torch.nn.functional.linear(hidden, model.unembed.weight).float())


def test_fp32_unembedding_through_its_transpose_follows_the_weight(normed_model):
    model = TinyMTP(normed_model.config)
    model.load_state_dict(normed_model.state_dict())
    model.eval()
    hidden = torch.randn(2, 3, model.config.d_model)
    with torch.no_grad():
        for _ in range(2):
            plain = torch.nn.functional.linear(hidden, model.unembed.weight)
            assert torch.allclose(model.head_logits(hidden), plain, atol=1e-5, rtol=1e-5)
            assert model._unembed_packed[2] is not None  # the transposed copy is what ran
            model.unembed.weight.mul_(-2)  # in place, as an optimiser step would: the copy follows


def test_hidden_and_head_logits_give_the_logits(normed_model):
    ids = torch.randint(0, 97, (2, 5))
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        hidden = normed_model(ids, pos, output_hidden=True)
        assert hidden.shape == (2, 5, 3, 32)
        assert torch.equal(normed_model.head_logits(hidden), normed_model(ids, pos))


def test_fast_path_follows_weight_updates(normed_model):
    model = TinyMTP(normed_model.config)
    model.load_state_dict(normed_model.state_dict())
    model.eval()
    ids, pos = torch.randint(0, 97, (1, 4)), torch.arange(4)[None]
    with torch.no_grad():
        before = model(ids, pos)
        model.head_layers[1].fc2.bias.add_(1.0)  # in place, as an optimiser step would
        after, ref = model(ids, pos), model(ids, pos, reference=True)
    assert not torch.allclose(before[:, :, 1], after[:, :, 1])
    assert torch.allclose(after, ref, atol=1e-5)


@pytest.mark.parametrize("reference", [False, True])
def test_extra_heads_catch_up_equals_running_all_heads(normed_model, reference):
    """Head 1 alone for a while (saving the stem output), then heads 2..H brought up to date in one
    call: the heads' outputs and caches are those of running every head all along."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(9))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        full = normed_model(ids, pos, reference=reference)  # (2, 12, 3, V)
        cache = normed_model.new_cache(2, 16)
        normed_model(ids[:, :5], pos[:, :5], cache, reference=reference)
        _, stem = normed_model(ids[:, 5:9], pos[:, 5:9], cache, heads=1, output_stem=True, reference=reference)
        assert stem.shape == (2, 4, 32)
        late = normed_model.extra_heads(stem, pos[:, 5:9], cache, reference=reference)  # (2, 4, 2, d)
        assert torch.allclose(normed_model.head_logits(late), full[:, 5:9, 1:], atol=1e-5)
        after = normed_model(ids[:, 9:12], pos[:, 9:12], cache, reference=reference)
    assert torch.allclose(after, full[:, 9:12], atol=1e-5)


@torch.no_grad()
def test_static_cache_same_logits_and_no_host_sync(normed_model):
    """A static cache (the accelerator's mode: every feed attends over all max_len slots) gives the
    logits of the CPU's highest-position width, and the fast path then reads nothing on the host."""
    from toy_models import SyncRecorder

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    feeds = [(ids[:, :6], torch.arange(6).expand(2, 6)), (ids[:, 6:9], torch.tensor([[6, 7, 8], [6, -1, -1]]))]
    out = {}
    for static in (False, True):
        cache = normed_model.new_cache(2, 16)
        cache.static = static
        with SyncRecorder() as rec:
            out[static] = [normed_model(i, p, cache) for i, p in feeds]
            hidden, stem = normed_model(ids[:, :1], torch.tensor([[9], [7]]), cache, heads=1, output_stem=True)
            normed_model.extra_heads(stem, torch.tensor([[9], [7]]), cache)
        if static:
            assert rec.syncs == []
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :1], b[1, :1], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_head_rotary_equals_the_half_split_reference_bit_for_bit(dtype):
    """The fast path's rotary (one roll, the sin table signed; q and k in one call) gives exactly the
    reference's values, so its logits are the reference layout's."""
    from dynamo_sampling.models.tiny import apply_rotary, apply_rotary_whole, rotary_tables, rotary_whole
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 4, 5, 32, generator=g).to(dtype)  # (q/k, g, B, nh, T, hd) as grouped_block has it
    cos, sin = rotary_tables(torch.tensor([[7, 8, 9, 10, 11], [0, 1, 2, -1, -1]]), 32, 10000.0)  # (B, 1, T, 16)
    assert torch.equal(apply_rotary_whole(x, *rotary_whole(cos, sin)), apply_rotary(x, cos, sin))
