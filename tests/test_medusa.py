"""MedusaMTP: Medusa heads (``medusa_lm_head.safetensors`` + ``config.json``) on tiny random GPT-NeoX and
Llama bases - logits against a minimal reference, greedy exactness against the base, every strategy,
bad files. CPU, fp32, 1 thread."""
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
from safetensors.torch import save_file  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dynamo_sampling import DraftConfig, sample  # noqa: E402
from dynamo_sampling.models.medusa import MedusaMTP, load_medusa  # noqa: E402

V, D = 97, 32
TOL = 1e-5
FAMILIES = ("gpt_neox", "llama")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def make_base(family: str, seed: int = 0, hidden_size: int = D):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=hidden_size, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)).eval()


def medusa_state(num_heads=3, num_layers=1, d=D, vocab=V, seed=0, lm_head=None):
    """A state dict of Medusa's layout: per head i, ResBlocks ``{i}.{j}.linear.weight/bias`` then the
    projection ``{i}.{num_layers}.weight`` (vocab, d). With ``lm_head``, projections start from it (as
    Medusa initialises them) plus noise."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(d, d, generator=g) * 0.3
            state[f"{i}.{j}.linear.bias"] = torch.randn(d, generator=g) * 0.1
        proj = torch.randn(vocab, d, generator=g) * 0.3
        state[f"{i}.{num_layers}.weight"] = proj if lm_head is None else lm_head.clone() + 0.1 * proj
    return state


def write_checkpoint(tmp_path, state, num_heads, num_layers, **extra):
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "medusa_lm_head.safetensors"))
    cfg = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": "tiny",
           **extra}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def reference_medusa(h, state, num_heads, num_layers):
    """Medusa head i: num_layers times x = x + SiLU(W x + b), then logits = P x."""
    out = []
    for i in range(num_heads):
        x = h
        for j in range(num_layers):
            x = x + F.silu(x @ state[f"{i}.{j}.linear.weight"].T + state[f"{i}.{j}.linear.bias"])
        out.append(x @ state[f"{i}.{num_layers}.weight"].T)
    return torch.stack(out, dim=2)  # (B, T, K, V)


def left_padded(seed=3, lens=(9, 5, 12)):
    """Ragged left-padded prompts with repeats (so prompt lookup finds drafts)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for r, n in enumerate(lens):
        phrase = torch.randint(3, V, (4,), generator=g)
        ids[r, S - n:] = phrase.repeat(n // 4 + 1)[:n]
        mask[r, S - n:] = 1
    return ids, mask


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_equal_reference_and_cache_equals_full_forward(family, num_layers, tmp_path):
    base = make_base(family)
    state = medusa_state(num_heads=3, num_layers=num_layers)
    model = load_medusa(base, write_checkpoint(tmp_path, state, 3, num_layers))
    assert (model.n_heads, model.vocab_size, model.max_seq_len) == (4, V, 128)
    ids = torch.randint(0, V, (2, 15))
    pos = torch.arange(15).expand(2, 15)
    full = model(ids, pos)
    assert full.shape == (2, 15, 4, V) and full.dtype == torch.float32
    out = base(ids, output_hidden_states=True)
    h_last = out.hidden_states[-1]  # after the final norm: the LM head's input
    assert torch.allclose(base.get_output_embeddings()(h_last), out.logits, atol=TOL)
    assert torch.allclose(full[:, :, 0], out.logits, atol=TOL)
    assert torch.allclose(full[:, :, 1:], reference_medusa(h_last, state, 3, num_layers), atol=1e-4)
    # the cached path, in pieces, equals the full forward; hidden + head_logits equals logits
    cache = model.new_cache(2, max_len=20)
    pieces = [model.head_logits(model(ids[:, a:b], pos[:, a:b], cache, output_hidden=True)) for a, b in
              [(0, 6), (6, 7), (7, 15)]]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=TOL)
    # heads subset, logits_index, output_stem + extra_heads (the decoder's heads on demand)
    assert torch.allclose(model(ids, pos, heads=2), full[:, :, :2], atol=TOL)
    idx = torch.tensor([[14], [3]])
    picked = model(ids, pos, logits_index=idx)
    assert torch.allclose(picked, full[torch.arange(2)[:, None], idx], atol=TOL)
    head1, stem = model(ids, pos, heads=1, output_stem=True)
    assert stem.shape == (2, 15, D) and torch.allclose(head1, full[:, :, :1], atol=TOL)
    assert torch.allclose(model.extra_heads(stem, pos), full[:, :, 1:], atol=TOL)


def test_config_optional_and_dict_inputs(tmp_path):
    base = make_base("llama")
    state = medusa_state(num_heads=2, num_layers=1)
    a = MedusaMTP(base, state)  # layout inferred from the keys
    assert MedusaMTP(base, {"medusa_head." + k: v for k, v in state.items()}).n_heads == 3  # whole-model names
    b = MedusaMTP(base, state, {"medusa_num_heads": 2, "medusa_num_layers": 1})
    ids, pos = torch.randint(0, V, (1, 5)), torch.arange(5)[None]
    with torch.no_grad():
        assert a.n_heads == b.n_heads == 3 and torch.equal(a(ids, pos), b(ids, pos))
    torch.save(state, tmp_path / "medusa_lm_head.pt")  # Medusa's older file name and format
    c = load_medusa(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(c(ids, pos), a(ids, pos))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["ar", "speculative", "lookup"])
def test_greedy_equals_the_base_models_greedy(family, strategy, tmp_path):
    base = make_base(family)
    # projections near the base's LM head: the heads' drafts are sometimes accepted
    state = medusa_state(num_heads=3, lm_head=base.get_output_embeddings().weight.detach())
    model = load_medusa(base, write_checkpoint(tmp_path, state, 3, 1))
    calls = []
    extra_heads = model.extra_heads
    model.extra_heads = lambda *a, **k: calls.append(1) or extra_heads(*a, **k)
    ids, mask = left_padded()
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    # a given step cost: whether drafting pays must not hinge on this machine's timing of a tiny model
    out = sample(model, ids, mask, strategy=strategy, max_new_tokens=24, pad_token_id=0, eps_b=0.0,
                 step_cost=(1.0,), return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    if strategy != "ar":
        assert int(out.drafted.sum()) > 0  # drafts were proposed and verified
    # speculative with hybrid lookup drafts runs the Medusa heads on demand (output_stem + extra_heads)
    assert bool(calls) == (strategy == "speculative")


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_without_lookup_equals_greedy(family, tmp_path):
    """Only the Medusa heads draft (no hybrid lookup, so no heads on demand)."""
    base = make_base(family, seed=1)
    model = load_medusa(base, write_checkpoint(tmp_path, medusa_state(3, seed=2), 3, 1))
    ids, mask = left_padded(seed=5)
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = sample(model, ids, mask, strategy="speculative", max_new_tokens=20, pad_token_id=0, eps_b=0.0,
                 draft=DraftConfig(hybrid=False, step_cost=(1.0,)), return_dict_in_generate=True)  # timing-free
    assert torch.equal(out.sequences, ref) and int(out.drafted.sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamo_and_sampled_strategies_run(family, tmp_path):
    base = make_base(family)
    model = load_medusa(base, write_checkpoint(tmp_path, medusa_state(2, num_layers=2), 2, 2))
    ids, mask = left_padded(seed=7)
    S = ids.shape[1]
    for strategy, do_sample in [("dynamo", False), ("dynamo", True), ("speculative", True), ("lookup", True),
                                ("ar", True)]:
        out = sample(model, ids, mask, strategy=strategy, do_sample=do_sample, max_new_tokens=16, pad_token_id=0,
                     generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
        assert out.sequences.shape == (3, S + 16), strategy
        assert torch.equal(out.sequences[:, :S], ids)
        assert int(out.sequences.min()) >= 0 and int(out.sequences.max()) < V
        assert bool((out.new_tokens == 16).all())
        if strategy == "dynamo":
            assert out.histogram.shape[1] == 3  # up to H = 3 tokens per step


# ---- bad files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_heads_of_another_base_hidden_size_are_refused(family, tmp_path):
    base = make_base(family)
    path = write_checkpoint(tmp_path, medusa_state(3, d=48), 3, 1)
    with pytest.raises(ValueError, match=r"hidden size 48.*is 32.*"
                       r"0\.0\.linear\.weight is \(48, 48\), expected \(32, 32\)"):
        load_medusa(base, path)


def test_bad_files_raise_value_errors_naming_the_problem(tmp_path):
    base = make_base("llama")
    good = medusa_state(3)
    missing = {k: v for k, v in good.items() if k != "1.0.linear.bias"}
    with pytest.raises(ValueError, match=r"missing 1\.0\.linear\.bias, unexpected \[\]"):
        MedusaMTP(base, missing, {"medusa_num_heads": 3, "medusa_num_layers": 1})
    with pytest.raises(ValueError, match=r"missing 2\.0\.linear\.bias, 2\.0\.linear\.weight, 2\.1\.weight.*"
                       r"file holds 2 heads of 1 layer"):
        MedusaMTP(base, medusa_state(2), {"medusa_num_heads": 3, "medusa_num_layers": 1})  # config says 3 heads
    with pytest.raises(ValueError, match=r"unexpected 0\.1\.linear\.bias, 0\.1\.linear\.weight.*"
                       r"file holds 3 heads of 2 layers"):
        MedusaMTP(base, medusa_state(3, num_layers=2), {"medusa_num_heads": 3, "medusa_num_layers": 1})
    with pytest.raises(ValueError, match=r"0\.1\.weight is \(50, 32\), expected \(97, 32\)"):
        MedusaMTP(base, medusa_state(3, vocab=50), {"medusa_num_heads": 3, "medusa_num_layers": 1})
    wrong_bias = dict(good, **{"2.0.linear.bias": torch.zeros(33)})
    with pytest.raises(ValueError, match=r"2\.0\.linear\.bias is \(33,\), expected \(32,\)"):
        MedusaMTP(base, wrong_bias)
    with pytest.raises(ValueError, match=r"unexpected key 'heads\.0\.0\.linear\.weight'"):
        MedusaMTP(base, {"heads." + k: v for k, v in good.items()})
    with pytest.raises(ValueError, match=r"hidden_size=64 does not match the base model's hidden_size=32"):
        MedusaMTP(base, good, {"medusa_num_heads": 3, "medusa_num_layers": 1, "hidden_size": 64})
    with pytest.raises(ValueError, match=r"medusa_num_heads must be an int >= 1"):
        MedusaMTP(base, good, {"medusa_num_heads": 0, "medusa_num_layers": 1})
    (tmp_path / "medusa_lm_head.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"corrupted or unreadable"):
        load_medusa(base, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_medusa(base, tmp_path / "nowhere")
