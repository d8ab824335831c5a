"""HFMTP: transformers causal LMs (GPT-NeoX, Llama) as MTP models - cache, exactness against
``transformers.generate``, head training, heads files. Tiny random configs; CPU, fp32, 1 thread."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

from dynamo_sampling import sample  # noqa: E402
from dynamo_sampling.models.hf import HFMTP, load_heads, save_heads  # noqa: E402
from dynamo_sampling.train.hf_heads import head_accuracy, train_heads  # noqa: E402
import toy_models  # noqa: E402

V = 97
TOL = 1e-5  # fp32; cached and uncached paths run the same ops on different shapes
FAMILIES = ("gpt_neox", "llama")


def make_base(family: str, seed: int = 0, **overrides):
    """A tiny random base model. initializer_range 0.2: peaky logits, so greedy comparisons with
    transformers do not hinge on 1e-7 near-ties."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, initializer_range=0.2)
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**{**common, **overrides})).eval()
    return LlamaForCausalLM(LlamaConfig(**{**common, "num_key_value_heads": 2, **overrides})).eval()  # GQA


def set_attn(base, attn: str):
    if hasattr(base, "set_attn_implementation"):  # transformers >= 5
        base.set_attn_implementation(attn)
    else:
        base.config._attn_implementation = attn


def make_wrapper(base, seed: int = 1):
    return HFMTP(base, n_heads=3, generator=torch.Generator().manual_seed(seed)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus():
    """A repetitive token stream (12 phrases of 4..8 tokens in random order): heads 2..H can learn it."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(3, 60, size=rng.integers(4, 9)) for _ in range(12)]
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 12, 5000)])
    return stream[:-3000], stream[-3000:]  # train, held out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_head1_is_the_base_model_and_cache_equals_full_forward(family, attn):
    base = make_base(family)
    set_attn(base, attn)
    model = make_wrapper(base)
    ids = torch.randint(0, V, (3, 20))
    pos = torch.arange(20).expand(3, 20)
    full = model(ids, pos)  # (3, 20, 3, V)
    assert full.shape == (3, 20, 3, V) and full.dtype == torch.float32
    assert torch.allclose(full[:, :, 0], base(ids).logits, atol=TOL)
    cache = model.new_cache(3, max_len=32)
    pieces = [model(ids[:, a:b], pos[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 11), (11, 20)]]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=TOL)
    one = model(ids, pos, heads=1)
    assert one.shape == (3, 20, 1, V) and torch.allclose(one[:, :, 0], full[:, :, 0], atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_ragged_feed_and_rollback(family):
    model = make_wrapper(make_base(family))
    ids = torch.randint(0, V, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    full = model(ids, pos)
    cache = model.new_cache(2, max_len=16)
    model(ids[:, :5], pos[:, :5], cache)
    # row 0 feeds 3 tokens, row 1 feeds 1 token plus padding: rows write different slots
    out = model(ids[:, 5:8], torch.tensor([[5, 6, 7], [5, -1, -1]]), cache)
    assert torch.allclose(out[0], full[0, 5:8], atol=TOL)
    assert torch.allclose(out[1, 0], full[1, 5], atol=TOL)
    # roll row 0 back to length 6 by overwriting position 6: its stale slot 7 is never read
    other = torch.randint(0, V, (1, 1))
    out2 = model(torch.cat([other, ids[1:, 6:7]]), torch.tensor([[6], [6]]), cache)
    ref = model(torch.cat([ids[:1, :6], other], 1), torch.arange(7)[None])[0, 6]
    assert torch.allclose(out2[0, 0], ref, atol=TOL)
    assert torch.allclose(out2[1, 0], full[1, 6], atol=TOL)


def feeds(model, ids, pos, forward):
    """The feeds a decoder makes, through ``forward`` (a bound method) with its own cache; one logits tensor each:
    full (no cache), a prefill then incremental pieces, a ragged feed (row 1 padded), a rolled-back feed (row 0
    overwrites position 6 after having fed 7), and the same with heads=2 and with logits_index."""
    out = [forward(ids, pos)]
    cache = model.new_cache(2, max_len=16)
    for a, b in [(0, 5), (5, 6)]:
        out.append(forward(ids[:, a:b], pos[:, a:b], cache))
    out.append(forward(ids[:, 6:9], torch.tensor([[6, 7, 8], [6, -1, -1]]), cache))  # ragged
    out.append(forward(ids[:, 9:11], torch.tensor([[6, 7], [7, 8]]), cache))  # row 0 rolled back to length 6
    out.append(forward(ids[:, 11:12], torch.tensor([[8], [9]]), cache, heads=2))
    out.append(forward(ids[:, 12:15], torch.tensor([[9, 10, 11], [10, 11, -1]]), cache,
                       logits_index=torch.tensor([[2], [1]])))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fast_path_equals_reference_path(family):
    """forward (one feed plan, head_logits, heads 2..H grouped or not) gives the per-head reference path's
    logits for every kind of feed, also after training steps and after a dtype change."""
    model = make_wrapper(make_base(family))
    ids = torch.randint(0, V, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    reference = feeds(model, ids, pos, model._reference_forward)
    assert [tuple(r.shape) for r in reference] == [(2, 16, 3, V), (2, 5, 3, V), (2, 1, 3, V), (2, 3, 3, V),
                                                   (2, 2, 3, V), (2, 1, 2, V), (2, 1, 3, V)]
    for grouped in (True, False):
        model.grouped_heads = grouped
        for fast, ref in zip(feeds(model, ids, pos, model), reference):
            assert fast.dtype == torch.float32 and torch.allclose(fast, ref, atol=TOL, rtol=0)
    model = make_wrapper(make_base(family))
    model.grouped_heads = True
    with torch.inference_mode():  # as the decoding loop runs it
        model(ids, pos)  # first grouped call: heads 2..H's parameters become views of the stacked copy
    with torch.enable_grad():  # they still train (no inference tensors), and the updates reach the stack
        train_heads(model, torch.randint(0, V, (200,)), steps=2, batch_size=2, seq_len=8, lr=1e-2, warmup_steps=1)
    for fast, ref in zip(feeds(model, ids, pos, model), feeds(model, ids, pos, model._reference_forward)):
        assert torch.allclose(fast, ref, atol=TOL, rtol=0)
    model.to(torch.float64)  # new storage: the stacked copy is rebuilt (stale float32 weights would not run)
    for fast, ref in zip(feeds(model, ids, pos, model), feeds(model, ids, pos, model._reference_forward)):
        assert torch.allclose(fast, ref, atol=TOL, rtol=0)  # float32 logits of float64 hidden states


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_output_hidden_and_head_logits(family):
    """The decoding loop unembeds only what it uses: head 1 at every fed row, heads 2..H at one row."""
    model = make_wrapper(make_base(family))
    ids = torch.randint(0, V, (2, 9))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [-1, -1, 0, 1, 2, 3, 4, 5, 6]])
    cache = model.new_cache(2, max_len=12)
    logits = model(ids, pos, cache)
    hidden = model(ids, pos, cache, output_hidden=True)  # the same slots re-written with the same values
    assert hidden.shape == (2, 9, 3, 32) and hidden.dtype == torch.float32
    assert torch.equal(model.head_logits(hidden), logits)
    verify = model.head_logits(hidden[:, -3:, 0])  # (2, 3, V)
    draft = model.head_logits(hidden[torch.arange(2), torch.tensor([7, 8]), 1:])  # (2, 2, V): heads 2..3, one row
    assert verify.shape == (2, 3, V) and draft.shape == (2, 2, V) and draft.dtype == torch.float32
    assert torch.allclose(verify, logits[:, -3:, 0], atol=TOL, rtol=0)
    assert torch.allclose(draft, logits[torch.arange(2), torch.tensor([7, 8]), 1:], atol=TOL, rtol=0)
    last = model(ids, pos, logits_index=torch.tensor([[8], [8]]), heads=2, output_hidden=True)
    assert last.shape == (2, 1, 2, 32)
    assert torch.allclose(model.head_logits(last), model(ids, pos)[:, 8:, :2], atol=TOL, rtol=0)
    model.to(torch.bfloat16)
    hidden = model(ids, pos, output_hidden=True)
    assert hidden.dtype == torch.bfloat16 and model.head_logits(hidden).dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_forward_makes_no_host_sync(family):
    model = make_wrapper(make_base(family))
    cache = model.new_cache(2, max_len=16)
    cache.static = True  # the accelerator's mode: on a CPU a feed may read its highest position
    model(torch.randint(0, V, (2, 6)), torch.arange(6).expand(2, 6), cache)
    for grouped in (False, True):
        model.grouped_heads = grouped
        with toy_models.SyncRecorder() as rec:
            model(torch.randint(0, V, (2, 3)), torch.tensor([[6, 7, 8], [6, -1, -1]]), cache)
            model(torch.randint(0, V, (2, 3)), torch.tensor([[9, 10, 11], [7, 8, 9]]), cache, output_hidden=True)
            model(torch.randint(0, V, (2, 1)), torch.tensor([[12], [10]]), cache, heads=1)
        assert rec.syncs == []
    with pytest.raises(RuntimeError, match="a position is beyond the cache's max_len \\(16 positions\\)"):
        model(torch.zeros(2, 1, dtype=torch.long), torch.tensor([[16], [3]]), cache)


def left_padded(seed: int, lens=(5, 9, 2, 7)):
    return toy_models.left_padded(seed, V, lens, low=3)  # ids >= 3: clear of the special tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["ar", "speculative", "lookup+corpus"])
def test_greedy_equals_transformers_generate(family, strategy):
    base = make_base(family)
    model = make_wrapper(base)
    ids, mask = left_padded(seed=3)
    eos = base.generation_config.eos_token_id  # GPT-NeoX's default config stops on token 2: exercised too
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    kw = {}
    if strategy == "lookup+corpus":  # lookup drafts from a corpus's n-grams (statistics of this vocabulary)
        from dynamo_sampling.cooccurrence import CooccurrenceStats
        corpus = np.random.default_rng(0).integers(3, V, 3000)
        strategy, kw = "lookup", dict(stats=CooccurrenceStats.build([corpus], V, max_order=3), step_cost=(1.0,))
    # eps_b=0: always draft H tokens, so verification (not the back-off) decides what is emitted
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=24, eos_token_id=eos, pad_token_id=0, eps_b=0.0,
                 **kw)
    assert ref.shape[1] <= out.shape[1]
    expected = torch.nn.functional.pad(ref, (0, out.shape[1] - ref.shape[1]), value=0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_lookup_trees_equal_transformers_generate(family, monkeypatch):
    """Lookup trees forced in a ragged batch (TreeFeed through the family's own attention, kept branches'
    keys and values moved): second branches are fed and some kept, and the output is transformers'
    greedy generate's. The statistics are of the base's own greedy continuations, so the corpus's
    drafts are right often enough to win and to lose."""
    from dynamo_sampling.cooccurrence import CooccurrenceStats
    count = toy_models.count_branches(monkeypatch)
    base = make_base(family)
    seeds = torch.randint(3, V, (48, 2), generator=torch.Generator().manual_seed(5))
    corpus = base.generate(seeds, attention_mask=torch.ones_like(seeds), max_new_tokens=30, do_sample=False,
                           pad_token_id=0)
    stats = CooccurrenceStats.build([row.numpy() for row in corpus], V, max_order=3)
    ids, mask = left_padded(seed=3)
    eos = base.generation_config.eos_token_id
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    out = sample(make_wrapper(base), ids, mask, strategy="lookup", max_new_tokens=24, eos_token_id=eos, pad_token_id=0,
                 stats=stats, step_cost=(1.0,), tree=True)
    assert torch.equal(out, torch.nn.functional.pad(ref, (0, out.shape[1] - ref.shape[1]), value=0))
    assert count["fed"] > 0 and count["taken"] > 0


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, corpus):
    """Heads trained for ~10 s per family (frozen base), with accuracies and logits before/after."""
    torch.set_num_threads(1)
    family = request.param
    train, held_out = corpus
    base = make_base(family, initializer_range=0.02)
    model = make_wrapper(base)
    probe = torch.as_tensor(held_out[:40])[None]
    probe_pos = torch.arange(40)[None]
    with torch.no_grad():
        before = model(probe, probe_pos)
    acc_before = head_accuracy(model, held_out, seq_len=32)
    history = train_heads(model, train, steps=400, batch_size=8, seq_len=32, lr=1e-2, val_tokens=held_out,
                          eval_every=200, eval_batches=2)
    acc_after = head_accuracy(model, held_out, seq_len=32)
    with torch.no_grad():
        after = model(probe, probe_pos)
    return dict(family=family, base=base, model=model, history=history, acc_before=acc_before,
                acc_after=acc_after, before=before, after=after, probe=probe)


def test_training_raises_heads_accuracy_and_keeps_head1(trained):
    acc_b, acc_a = trained["acc_before"], trained["acc_after"]
    for h in (1, 2):  # heads 2 and 3
        assert acc_a[h] > acc_b[h] + 0.3, (trained["family"], acc_b, acc_a)
    assert acc_a[0] == acc_b[0]
    assert torch.equal(trained["after"][:, :, 0], trained["before"][:, :, 0])  # frozen base: head 1 bit for bit
    val = [r["val"] for r in trained["history"] if "val" in r]
    assert len(val) == 2 and val[-1][1] < val[0][1] and val[-1][2] < val[0][2]
    assert all(p.requires_grad for p in trained["base"].parameters())  # flags restored


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_distilled_from_the_base_get_drafts_accepted(family):
    """The workflow for a frozen base: train the heads on the base's own greedy continuations, then
    speculative decoding still equals ``generate`` token for token and accepts drafts. (Default init:
    a random base with initializer_range 0.2 is too chaotic for heads to predict from 32-token windows.)"""
    base = make_base(family, initializer_range=0.02)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(3, V, (48, 4), generator=g)
    own = base.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=60, do_sample=False,
                        pad_token_id=0, eos_token_id=None)  # (48, 64)
    model = make_wrapper(base)
    train_heads(model, own[:40].flatten(), steps=150, batch_size=8, seq_len=32, lr=1e-2)
    ids, mask = own[40:, :4].clone(), torch.ones(8, 4, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 0, 0  # one ragged row
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = sample(model, ids, mask, strategy="speculative", max_new_tokens=30, pad_token_id=0, eps_b=0.0,
                 step_cost=(1.0,), return_dict_in_generate=True)  # a given cost: no timing in the assertion
    assert torch.equal(out.sequences, ref)
    assert out.accepted.sum() > 0.2 * out.drafted.sum(), (out.accepted, out.drafted)
    assert float(out.tokens_per_step.mean()) > 1.3


@pytest.mark.parametrize("grouped", [False, True])
def test_saved_heads_load_into_fresh_wrapper(trained, tmp_path, grouped):
    """grouped: heads 2..H's parameters are views of one stacked tensor (after a grouped forward); saving
    and loading in place still work."""
    model = trained["model"]
    path = tmp_path / "heads.safetensors"
    default, model.grouped_heads = model.grouped_heads, grouped
    try:
        with torch.no_grad():
            assert torch.allclose(model(trained["probe"], torch.arange(40)[None]), trained["after"], atol=TOL)
        save_heads(model, path)
    finally:
        model.grouped_heads = default
    fresh = make_wrapper(trained["base"], seed=7)
    fresh.grouped_heads = grouped
    with torch.no_grad():
        assert not torch.allclose(fresh(trained["probe"], torch.arange(40)[None]), trained["after"], atol=TOL)
        load_heads(fresh, path)
        assert torch.allclose(fresh(trained["probe"], torch.arange(40)[None]), trained["after"], atol=TOL)


def test_heads_file_for_another_base_model_is_refused(tmp_path):
    neox = make_wrapper(make_base("gpt_neox"))
    path = tmp_path / "heads.safetensors"
    save_heads(neox, path)
    llama = make_wrapper(make_base("llama"))
    with pytest.raises(ValueError, match="trained for another base model: expected base_model='' config_sha256="):
        load_heads(llama, path)
    renamed = make_base("gpt_neox")
    renamed.config._name_or_path = "EleutherAI/pythia-70m"
    with pytest.raises(ValueError, match="expected base_model='EleutherAI/pythia-70m' .* found base_model=''"):
        load_heads(make_wrapper(renamed), path)
    load_heads(make_wrapper(renamed), path, strict=False)  # the override still loads matching shapes
    with pytest.raises(ValueError, match="holds n_heads=3, the model has n_heads=2"):
        load_heads(HFMTP(make_base("gpt_neox"), n_heads=2), path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="is not a heads file: metadata format None"):
        load_heads(neox, other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_heads(neox, tmp_path / "missing.safetensors")


def test_train_base_true_trains_the_base_at_low_lr(corpus):
    """One AdamW step moves each weight by about its group's lr (m / sqrt(v) = +-1 at step 1), so the
    largest change of a base weight is the heads' lr times ``stem_lr_scale`` (default 0.1)."""
    base = make_base("llama", initializer_range=0.02)
    model = make_wrapper(base)
    head_params = [p for i in range(1, model.n_heads) for m in (model.head_layers[i], model.head_norms[i])
                   for p in m.parameters()]
    base_params = list(base.parameters())
    before = [p.detach().clone() for p in base_params + head_params]
    lr = 1e-2
    train_heads(model, corpus[0], steps=1, batch_size=2, seq_len=16, lr=lr, train_base=True, warmup_steps=1)
    moved = [(p.detach() - p0).abs().max().item() for p, p0 in zip(base_params + head_params, before)]
    base_moved, heads_moved = max(moved[:len(base_params)]), max(moved[len(base_params):])
    assert heads_moved == pytest.approx(lr, rel=0.05)
    assert base_moved == pytest.approx(0.1 * lr, rel=0.05)  # trained, at a tenth of the heads' lr


def test_errors_at_the_boundary():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(TypeError, match="HFMTP supports GPTNeoXForCausalLM, LlamaForCausalLM .*got GPT2LMHeadModel"):
        HFMTP(gpt2)
    base = make_base("gpt_neox")
    model = make_wrapper(base)
    set_attn(base, "flex_attention")
    with pytest.raises(ValueError, match="HFMTP needs attn_implementation 'eager' or 'sdpa'.*got 'flex_attention'"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None])
    set_attn(base, "sdpa")
    with pytest.raises(ValueError, match="heads must be in 1..3, got 4"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], heads=4)
    with pytest.raises(ValueError, match="cache max_len 129 exceeds the model's context 128"):
        model.new_cache(1, max_len=129)
    with pytest.raises(ValueError, match="tokens must be in \\[0, 97\\)"):
        train_heads(model, np.full(200, 500), steps=1, seq_len=8)
    with pytest.raises(ValueError, match="exceeds the model's context of 128 tokens"):
        sample(model, torch.zeros(1, 100, dtype=torch.long), max_new_tokens=40)


def test_importing_the_package_does_not_import_transformers():
    code = "import sys, dynamo_sampling, dynamo_sampling.train.hf_heads; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])
