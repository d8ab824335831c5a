"""Meta's multi-token-prediction checkpoints (dynamo_sampling.models.meta_mtp) on a synthetic checkpoint with the
release's key layout at tiny sizes, checked against a reference forward of the released architecture written
here: interleaved (complex) rotary, RMSNorm, SwiGLU, GQA, head 1 = the last trunk layer, heads 2..n = extra_heads
on the penultimate state, all sharing the final norm and output projection."""
import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from dynamo_sampling import sample  # noqa: E402
from dynamo_sampling.models.meta_mtp import ffn_hidden_size, load_meta_mtp  # noqa: E402
import toy_models  # noqa: E402

V, DIM, N_HEADS, N_KV, TRUNK, N_FUTURE = 97, 64, 4, 2, 3, 3
PARAMS = {"dim": DIM, "n_layers": TRUNK + N_FUTURE - 1, "n_heads": N_HEADS, "n_kv_heads": N_KV, "vocab_size": V,
          "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 50000.0,
          "n_future_tokens": N_FUTURE}
BLOCK = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
         "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight",
         "ffn_norm.weight")
TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def random_state(params: dict, seed: int = 0) -> dict:
    """A random state dict in the release's layout. std 0.2: peaky logits, so greedy comparisons do not hinge on
    near-ties."""
    g = torch.Generator().manual_seed(seed)
    dim, nh = params["dim"], params["n_heads"]
    nkv, hd = params.get("n_kv_heads") or nh, dim // nh
    ffn = ffn_hidden_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    vocab = params["vocab_size"] if params["vocab_size"] > 0 else V

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def norm():
        return 1.0 + 0.1 * torch.randn(dim, generator=g)

    shapes = {"attention.wq.weight": (nh * hd, dim), "attention.wk.weight": (nkv * hd, dim),
              "attention.wv.weight": (nkv * hd, dim), "attention.wo.weight": (dim, nh * hd),
              "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
              "feed_forward.w3.weight": (ffn, dim)}
    state = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g), "norm.weight": norm(),
             "output.weight": w(vocab, dim),
             "rope.freqs": torch.randn(hd // 2, generator=g)}  # Llama 2 files carry it; unused
    n_future = params.get("n_future_tokens", 1)
    for prefix, n in (("layers", params["n_layers"] - n_future + 1), ("extra_heads", n_future - 1)):
        for i in range(n):
            for name in BLOCK:
                state[f"{prefix}.{i}.{name}"] = norm() if name.endswith("norm.weight") else w(*shapes[name])
    return state


def write_checkpoint(directory, params: dict = PARAMS, state: dict = None, seed: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    state = random_state(params, seed) if state is None else state
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(state, directory / "consolidated.pth")
    return state


# ---- the released architecture, written out --------------------------------------------------------
def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_interleaved(x, positions, theta):
    """x (B, T, heads, hd): rotate adjacent pairs (x[2i], x[2i+1]) by position * theta^(-2i/hd), as complex numbers."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    angles = positions.double()[..., None] * freqs  # (B, T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # (B, T, 1, hd/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * rot).reshape(x.shape).to(x.dtype)


def block(state, prefix, x, positions, params):
    p = lambda name: state[f"{prefix}.{name}"]  # noqa: E731
    B, T, dim = x.shape
    nh, nkv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    hd, eps, theta = dim // nh, params["norm_eps"], params.get("rope_theta", 10000.0)
    h = rms_norm(x, p("attention_norm.weight"), eps)
    q = (h @ p("attention.wq.weight").T).view(B, T, nh, hd)
    k = (h @ p("attention.wk.weight").T).view(B, T, nkv, hd)
    v = (h @ p("attention.wv.weight").T).view(B, T, nkv, hd)
    q, k = rotary_interleaved(q, positions, theta), rotary_interleaved(k, positions, theta)
    k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)  # GQA: kv head j -> q heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, nh * hd)
    x = x + attn @ p("attention.wo.weight").T
    h = rms_norm(x, p("ffn_norm.weight"), eps)
    ffn = (torch.nn.functional.silu(h @ p("feed_forward.w1.weight").T) * (h @ p("feed_forward.w3.weight").T))
    return x + ffn @ p("feed_forward.w2.weight").T


def reference_forward(state, params, ids):
    """ids (B, T), no padding -> logits (B, T, n_future_tokens, V), float32."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    n_future = params.get("n_future_tokens", 1)
    n_layers = params["n_layers"] - n_future + 1
    x = state["tok_embeddings.weight"][ids]
    for i in range(n_layers - 1):
        x = block(state, f"layers.{i}", x, positions, params)
    heads = [f"layers.{n_layers - 1}"] + [f"extra_heads.{j}" for j in range(n_future - 1)]
    out = [block(state, name, x, positions, params) for name in heads]
    h = rms_norm(torch.stack(out, dim=2), state["norm.weight"], params["norm_eps"])
    return (h @ state["output.weight"].T).float()


def reference_greedy(state, params, prompt, n):
    seq = prompt.clone()
    for _ in range(n):
        nxt = reference_forward(state, params, seq[None])[0, -1, 0].argmax()
        seq = torch.cat([seq, nxt[None]])
    return seq


def left_padded(seed: int, lens=(5, 9, 2, 7)):
    return toy_models.left_padded(seed, V, lens, low=3)  # ids >= 3: clear of the special tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("meta_mtp")
    state = write_checkpoint(directory)
    return directory, state


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """The checkpoint loaded once for the decoding tests (sample() never changes a model), so the step-cost
    table that sample() times for a model on first use is timed once, not per test."""
    return load_meta_mtp(checkpoint[0])


# ---- tests ------------------------------------------------------------------------------------------
def test_logits_equal_the_reference_forward(checkpoint):
    directory, state = checkpoint
    model = load_meta_mtp(directory)
    assert model.n_heads == N_FUTURE and model.vocab_size == V
    assert model.base.config.intermediate_size == 224 and model.base.config.num_key_value_heads == N_KV
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11).expand(2, 11)
    ref = reference_forward(state, PARAMS, ids)
    with torch.no_grad():
        got = model(ids, positions, heads=N_FUTURE)
        assert got.shape == (2, 11, N_FUTURE, V)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=TOL)
        # the base alone is the checkpoint's next-token model (head 1), through transformers' own forward
        torch.testing.assert_close(model.base(ids).logits, ref[:, :, 0], atol=TOL, rtol=TOL)
        # cached, one token at a time, equals the full forward
        cache = model.new_cache(2, max_len=16)
        steps = [model(ids[:, t:t + 1], positions[:, t:t + 1], cache) for t in range(11)]
        torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=TOL, rtol=TOL)
        model.grouped_heads = True  # heads 2..3 as one vmapped call: same logits
        torch.testing.assert_close(model(ids, positions), ref, atol=TOL, rtol=TOL)


def test_eager_attention_and_bfloat16(checkpoint):
    directory, state = checkpoint
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6)[None]
    ref = reference_forward(state, PARAMS, ids)
    with torch.no_grad():
        eager = load_meta_mtp(directory, attn_implementation="eager")
        torch.testing.assert_close(eager(ids, positions), ref, atol=TOL, rtol=TOL)
        bf16 = load_meta_mtp(directory, dtype=torch.bfloat16)
        assert next(bf16.parameters()).dtype == torch.bfloat16
        assert (bf16(ids, positions) - ref).abs().max() < 0.5 * ref.abs().max()


@pytest.mark.parametrize("strategy", ["ar", "speculative", "lookup"])
def test_greedy_equals_reference_greedy(checkpoint, loaded, strategy):
    _, state = checkpoint
    model = loaded
    ids, mask = left_padded(seed=3)
    n = 16
    # eps_b=0: always draft H tokens, so verification (not the back-off) decides what is emitted
    extra = {"eps_b": 0.0} if strategy == "speculative" else {}
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=n, pad_token_id=0, **extra)
    assert out.shape == (4, ids.shape[1] + n)
    for b in range(4):
        prompt = ids[b][mask[b].bool()]
        assert torch.equal(out[b, ids.shape[1]:], reference_greedy(state, PARAMS, prompt, n)[len(prompt):]), b


def test_accepted_drafts_stay_exact(tmp_path):
    """A checkpoint whose heads agree (small residual updates, output = 2 * embeddings: every head predicts the
    last token again), so speculative and dynamo accept whole drafts; greedy still equals the reference's."""
    state = random_state(PARAMS, seed=11)
    for k in state:
        if k.endswith(("wo.weight", "w2.weight")):
            state[k] = state[k] * 0.05
    state["output.weight"] = state["tok_embeddings.weight"] * 2
    write_checkpoint(tmp_path, state=state)
    model = load_meta_mtp(tmp_path)
    ids, mask = left_padded(seed=3)
    expected = []  # the reference's greedy continuation of each row: one for both strategies
    for b in range(4):
        prompt = ids[b][mask[b].bool()]
        expected.append(reference_greedy(state, PARAMS, prompt, 16)[len(prompt):])
    for strategy in ("speculative", "dynamo"):
        out = sample(model, ids, mask, strategy=strategy, max_new_tokens=16, pad_token_id=0, eps_b=0.0,
                     step_cost=(1.0,), return_dict_in_generate=True)  # a given cost: no timing in the assertion
        assert (out.tokens_per_step > 2).all(), strategy
        for b in range(4):
            assert torch.equal(out.sequences[b, ids.shape[1]:], expected[b]), (strategy, b)


def test_greedy_equals_transformers_generate(loaded):
    model = loaded
    ids, mask = left_padded(seed=4)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    out = sample(model, ids, mask, strategy="speculative", max_new_tokens=12, pad_token_id=0, eps_b=0.0)
    assert torch.equal(out, ref)


def test_dynamo_and_sampling_run(loaded):
    model = loaded
    ids, mask = left_padded(seed=5)
    out = sample(model, ids, mask, strategy="dynamo", max_new_tokens=12, pad_token_id=0,
                 return_dict_in_generate=True)
    assert out.sequences.shape == (4, ids.shape[1] + 12)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    assert ((out.sequences >= 0) & (out.sequences < V)).all()
    g = torch.Generator().manual_seed(0)
    sampled = sample(model, ids, mask, strategy="speculative", max_new_tokens=8, do_sample=True, pad_token_id=0,
                     generator=g)
    assert sampled.shape == (4, ids.shape[1] + 8)


def test_params_variants(tmp_path):
    """vocab_size -1 (Llama 2's params.json), n_layers counting only `layers`, no n_kv_heads / rope_theta /
    ffn_dim_multiplier, and the n=1 baselines (no extra heads)."""
    params = {k: v for k, v in PARAMS.items() if k not in ("n_kv_heads", "rope_theta", "ffn_dim_multiplier")}
    params["vocab_size"] = -1
    state = random_state(params, seed=7)
    write_checkpoint(tmp_path / "a", {**params, "n_layers": TRUNK}, state)  # n_layers without the extra heads
    model = load_meta_mtp(tmp_path / "a")
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.arange(7)[None]), reference_forward(state, params, ids),
                                   atol=TOL, rtol=TOL)
    base_params = {**PARAMS, "n_future_tokens": 1, "n_layers": TRUNK}
    base_state = write_checkpoint(tmp_path / "b", base_params, seed=9)
    model = load_meta_mtp(tmp_path / "b")
    assert model.n_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.arange(7)[None]), reference_forward(base_state, base_params, ids),
                                   atol=TOL, rtol=TOL)


def _broken(tmp_path, params=PARAMS, edit=None):
    state = random_state(PARAMS, seed=0)
    if edit is not None:
        edit(state)
    write_checkpoint(tmp_path, params, state)
    return tmp_path


def test_bad_files_raise_value_errors_naming_the_problem(tmp_path):
    with pytest.raises(ValueError, match="params.json is missing"):
        load_meta_mtp(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(ValueError, match="consolidated.pth is missing"):
        load_meta_mtp(tmp_path)

    def drop(key):
        return lambda s: s.pop(key)

    def reshape(key, shape):
        return lambda s: s.__setitem__(key, torch.zeros(shape))

    cases = [
        (PARAMS, drop("layers.1.feed_forward.w3.weight"), r"lacks .*'layers\.1\.feed_forward\.w3\.weight'"),
        (PARAMS, drop("norm.weight"), r"lacks .*'norm\.weight'"),
        (PARAMS, reshape("extra_heads.0.attention.wk.weight", (64, 64)),
         r"extra_heads\.0\.attention\.wk\.weight has shape \(64, 64\), params.json implies \(32, 64\)"),
        (PARAMS, reshape("output.weight", (100, 64)), r"output\.weight has shape \(100, 64\)"),
        (PARAMS, lambda s: s.__setitem__("bias.extra", torch.zeros(3)), r"does not have: \['bias\.extra'\]"),
        ({**PARAMS, "n_future_tokens": 4}, None, r"n_future_tokens=4.*3 extra_heads; it holds 2"),
        ({**PARAMS, "n_future_tokens": 2}, None, r"n_future_tokens=2.*1 extra_heads; it holds 2"),
        ({**PARAMS, "n_layers": 7}, None, r"n_layers=7.*3 layers and 2 extra_heads"),
        # another model's hidden size: every tensor disagrees; the first one checked is named
        ({**PARAMS, "dim": 128}, None, r"tok_embeddings\.weight has shape \(97, 64\), params.json implies \(97, 128\)"),
        ({**PARAMS, "multiple_of": 256}, None, r"feed_forward\.w1\.weight has shape \(224, 64\).*\(256, 64\)"),
        ({k: v for k, v in PARAMS.items() if k != "norm_eps"}, None, r"lacks required field\(s\) \['norm_eps'\]"),
        (PARAMS, drop("extra_heads.0.ffn_norm.weight"), r"lacks .*'extra_heads\.0\.ffn_norm\.weight'"),
    ]
    for i, (params, edit, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            load_meta_mtp(_broken(tmp_path / f"case{i}", params, edit))

    # a pickle that weights_only=True refuses (an arbitrary object), and a file that is not a pickle at all
    bad = tmp_path / "pickle"
    bad.mkdir()
    (bad / "params.json").write_text(json.dumps(PARAMS))
    torch.save({"tok_embeddings.weight": argparse.Namespace(a=1)}, bad / "consolidated.pth")
    with pytest.raises(ValueError, match="could not be read as a tensor state dict"):
        load_meta_mtp(bad)
    (bad / "consolidated.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a tensor state dict"):
        load_meta_mtp(bad)
    (bad / "params.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_meta_mtp(bad)
