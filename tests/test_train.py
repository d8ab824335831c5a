"""Training recipe and the bundled-model loader."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from safetensors.torch import load_file, save_file

from dynamo_sampling import TinyMTP, TinyMTPConfig
from dynamo_sampling.cooccurrence import CooccurrenceStats, tokenizer_fingerprint
from dynamo_sampling.pretrained import PRETRAINED_DIR, load_pretrained
from dynamo_sampling.train.trainer import TrainConfig, head_losses, train

MODEL = dict(n_layer=2, n_heads=3, d_model=32, n_attn_heads=4, d_ff=64, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A repetitive token stream: learnable in seconds by every head."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    phrases = [rng.integers(1, 60, size=rng.integers(4, 9)) for _ in range(12)]
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 12, 4000)]).astype(np.uint16)
    np.save(d / "train.npy", stream)
    np.save(d / "val.npy", stream[:3000])
    (d / "data.json").write_text(json.dumps({"vocab_size": 64}))
    return d


@pytest.mark.parametrize("recipe", ["dynamo", "joint"])
def test_short_training_lowers_every_head_loss(tiny_data, tmp_path, recipe):
    torch.set_num_threads(1)
    cfg = TrainConfig(data_dir=str(tiny_data), out_dir=str(tmp_path), recipe=recipe, steps=80, pretrain_fraction=0.4,
                      batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=20, checkpoint_every=1000,
                      eval_batches=2, model=MODEL)
    result = train(cfg, progress=False)
    hist = result["history"]
    H = 3
    for h in range(H):
        losses = [r["train"][h] for r in hist if len(r["train"]) > h]
        assert len(losses) >= 20
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, (recipe, h, losses[:5], losses[-5:])
    if recipe == "dynamo":
        assert [r["phase"] for r in hist][:32] == [1] * 32 and hist[-1]["phase"] == 2
    model = TinyMTP.from_pretrained(str(tmp_path / "final"))
    assert model.n_heads == H and (tmp_path / "summary.json").is_file()
    best = json.loads((tmp_path / "summary.json").read_text())["best"]  # lowest mean val loss, all heads
    vals = [np.mean(r["val"]) for r in hist if len(r.get("val", ())) == H]
    assert np.mean(best["val"]) == min(vals) and (tmp_path / "best" / "model.safetensors").is_file()


def test_zero_stem_lr_freezes_stem_and_head_1(tiny_data, tmp_path):
    """stem_lr_scale = 0 in phase 2: stem + head 1 keep their weights exactly (no gradients are even
    computed for them), heads 2..H learn."""
    torch.set_num_threads(1)
    first = TrainConfig(data_dir=str(tiny_data), out_dir=str(tmp_path / "a"), steps=4, pretrain_fraction=1.0,
                        batch_size=4, seq_len=16, warmup_steps=1, eval_every=1000, checkpoint_every=1000,
                        eval_batches=1, model=MODEL)
    train(first, progress=False)
    before = TinyMTP.from_pretrained(str(tmp_path / "a" / "final")).state_dict()
    cfg = TrainConfig(**{**first.__dict__, "out_dir": str(tmp_path / "b"), "pretrain_fraction": 0.0, "steps": 4,
                         "stem_lr_scale": 0.0, "distill": 0.5, "model": {}, "init_from": str(tmp_path / "a" / "final")})
    after = train(cfg, progress=False)["model"].state_dict()
    for name, w in before.items():
        new_head = name.startswith(("head_layers.", "head_norms.")) and int(name.split(".")[1]) > 0
        assert torch.equal(after[name], w) != new_head, name


def test_resume_continues_from_checkpoint(tiny_data, tmp_path):
    torch.set_num_threads(1)
    base = dict(data_dir=str(tiny_data), out_dir=str(tmp_path), steps=12, pretrain_fraction=0.5, batch_size=4,
                seq_len=16, warmup_steps=2, eval_every=1000, checkpoint_every=6, eval_batches=1, model=MODEL)
    train(TrainConfig(**{**base, "steps": 6}), progress=False)
    meta = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 6
    result = train(TrainConfig(**base), resume=True, progress=False)
    assert result["steps"] == 12 and len(result["history"]) == 12


def test_per_head_backward_equals_summed_loss_gradient():
    """Gloeckle's trick (stem output detached, heads backward one by one) gives the same gradient."""
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL))
    x = torch.randint(0, 50, (2, 19))
    head_losses(m, x, 3)
    trick = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    T = 16
    logits = m(x[:, :T], torch.arange(T).expand(2, T))  # (B, T, H, V)
    loss = sum(torch.nn.functional.cross_entropy(logits[:, :, h].reshape(-1, 50), x[:, h + 1:h + 1 + T].reshape(-1))
               for h in range(3)) / 3
    loss.backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, trick[n], atol=1e-6), n


def test_distillation_gradient_is_that_of_the_kl_to_head_1():
    """distill=a: heads 2..H learn (1-a) CE + a KL(head 1 at t+h-1, detached || head h at t); the
    trainer's soft cross-entropy differs from that KL by head 1's entropy only, so the gradients match."""
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL))
    x = torch.randint(0, 50, (2, 19))
    a, T, F = 0.3, 16, torch.nn.functional
    losses = head_losses(m, x, 3, distill=a)
    trick = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logp = torch.log_softmax(m(x[:, :T], torch.arange(T).expand(2, T)), dim=-1)  # (B, T, H, V)
    teacher = logp[:, :, 0].detach()
    ce = [F.nll_loss(logp[:, :, h].reshape(-1, 50), x[:, h + 1:h + 1 + T].reshape(-1)) for h in range(3)]
    kl = [F.kl_div(logp[:, :T - h, h], teacher[:, h:], log_target=True, reduction="none").sum(-1).mean()
          for h in range(3)]
    loss = (ce[0] + sum((1 - a) * ce[h] + a * kl[h] for h in (1, 2))) / 3
    loss.backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, trick[n], atol=1e-6), n
    assert losses == pytest.approx([c.item() for c in ce], rel=1e-5)  # reported: the data loss
    with pytest.raises(ValueError, match="distill must be in"):
        train(TrainConfig(distill=1.5), progress=False)


def test_argmax_distillation_gradient_is_that_of_the_ce_to_head_1s_top_token():
    """distill_target="argmax": heads 2..H learn (1-a) CE(data) + a CE(head 1's argmax at t+h-1)."""
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL))
    x = torch.randint(0, 50, (2, 19))
    a, T, F = 0.6, 16, torch.nn.functional
    head_losses(m, x, 3, distill=a, distill_target="argmax")
    trick = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    logp = torch.log_softmax(m(x[:, :T], torch.arange(T).expand(2, T)), dim=-1)  # (B, T, H, V)
    top = logp[:, :, 0].detach().argmax(-1)  # (B, T)
    ce = [F.nll_loss(logp[:, :, h].reshape(-1, 50), x[:, h + 1:h + 1 + T].reshape(-1)) for h in range(3)]
    hard = [F.nll_loss(logp[:, :T - h, h].reshape(-1, 50), top[:, h:].reshape(-1)) for h in range(3)]
    ((ce[0] + sum((1 - a) * ce[h] + a * hard[h] for h in (1, 2))) / 3).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, trick[n], atol=1e-6), n
    with pytest.raises(ValueError, match="distill_target must be 'soft' or 'argmax', got 'hard'"):
        train(TrainConfig(distill_target="hard"), progress=False)


def test_sharpened_distillation_interpolates_between_soft_and_argmax():
    """distill_temperature: 1 is the soft target; near 0 its gradient is the argmax target's."""
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL))
    x = torch.randint(0, 50, (2, 19))

    def grads(**kw):
        m.zero_grad()
        head_losses(m, x, 3, distill=0.6, **kw)
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    soft, argmax = grads(), grads(distill_target="argmax")
    assert torch.equal(grads(distill_temperature=1.0), soft)
    assert torch.allclose(grads(distill_temperature=1e-4), argmax, atol=1e-6)
    half = grads(distill_temperature=0.5)
    assert not torch.allclose(half, soft, atol=1e-6) and not torch.allclose(half, argmax, atol=1e-6)
    with pytest.raises(ValueError, match="distill_temperature must be a finite number > 0, got 0.0"):
        train(TrainConfig(distill_temperature=0.0), progress=False)


def test_init_from_starts_from_a_saved_model(tiny_data, tmp_path):
    torch.manual_seed(0)
    start = TinyMTP(TinyMTPConfig(vocab_size=64, **MODEL))
    start.save_pretrained(str(tmp_path / "start"), dtype=torch.float32)
    base = dict(data_dir=str(tiny_data), out_dir=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=16,
                eval_every=1000, checkpoint_every=1000, eval_batches=1, init_from=str(tmp_path / "start"))
    train(TrainConfig(**base, lr=0.0), progress=False)  # lr 0: the weights stay the starting ones
    after = TinyMTP.from_pretrained(str(tmp_path / "run" / "final"))  # "final" is saved in bf16
    for (n, p), q in zip(start.named_parameters(), after.parameters()):
        assert torch.equal(p.bfloat16().float(), q), n
    with pytest.raises(ValueError, match="disagrees with {'d_model': 64}"):
        train(TrainConfig(**base, model={"d_model": 64}), progress=False)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL)).eval()
    m.save_pretrained(str(tmp_path), dtype=torch.float32)
    m2 = TinyMTP.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 50, (1, 7))
    pos = torch.arange(7)[None]
    assert torch.equal(m(ids, pos), m2(ids, pos))


def test_trainer_checkpoint_functions_still_round_trip(tmp_path):
    """``train.trainer.save_model`` / ``load_model`` (the old names) write and read the model's format."""
    from dynamo_sampling.train.trainer import load_model, save_model

    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL)).eval()
    save_model(m, str(tmp_path / "old"), dtype=torch.float32)
    m.save_pretrained(str(tmp_path / "new"), dtype=torch.float32)
    ids, pos = torch.randint(0, 50, (1, 7)), torch.arange(7)[None]
    assert torch.equal(TinyMTP.from_pretrained(str(tmp_path / "old"))(ids, pos), m(ids, pos))
    assert torch.equal(load_model(str(tmp_path / "new"))(ids, pos), m(ids, pos))
    bf16 = TinyMTP.from_pretrained(str(tmp_path / "new"), device="cpu", dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16 and not bf16.training


def test_load_pretrained_missing_and_corrupted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks \['config.json', 'model.safetensors', 'tokenizer.json'\]"):
        load_pretrained(str(tmp_path), with_stats=False)
    if not (PRETRAINED_DIR / "model.safetensors").is_file():
        pytest.skip("no bundled model in this checkout")
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(PRETRAINED_DIR / f, tmp_path / f)
    (tmp_path / "model.safetensors").write_bytes((PRETRAINED_DIR / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted or not safetensors"):
        load_pretrained(str(tmp_path), with_stats=False)
    shutil.copy(PRETRAINED_DIR / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config .* is corrupted"):
        load_pretrained(str(tmp_path), with_stats=False)


def _save_tiny(path):
    torch.manual_seed(0)
    TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL)).save_pretrained(str(path), dtype=torch.float32)


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(edit_state):
    def edit(d):
        state = load_file(str(d / "model.safetensors"))
        edit_state(state)
        save_file(state, str(d / "model.safetensors"))
    return edit


def _write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


MALFORMED_MODEL = {
    "config not json": ("config.json", _write("config.json", b"{not json"), r"is corrupted: expected JSON written by save_model"),
    "config not utf-8": ("config.json", _write("config.json", b"\xff\xfe{}"), r"is corrupted: expected JSON"),
    "config empty": ("config.json", _write("config.json", b""), r"is corrupted: expected JSON"),
    "config a list": ("config.json", _write("config.json", b"[1, 2]"),
                      r"expected a JSON object of TinyMTPConfig fields, found list"),
    "config unknown field": ("config.json", _edit_config(n_embd=32), r"found unknown fields \['n_embd'\]"),
    "config string field": ("config.json", _edit_config(n_layer="2"), r"expected n_layer to be an integer >= 1, found '2'"),
    "config float field": ("config.json", _edit_config(vocab_size=50.5), r"expected vocab_size to be an integer >= 1"),
    "config zero field": ("config.json", _edit_config(d_ff=0), r"expected d_ff to be an integer >= 1, found 0"),
    "config bad eps": ("config.json", _edit_config(norm_eps=-1), r"expected norm_eps to be a finite number > 0"),
    "config bool field": ("config.json", _edit_config(tie_embeddings=1), r"expected tie_embeddings to be true or false"),
    "config inconsistent": ("config.json", _edit_config(n_layer=1), r"n_layer must be >= 2"),
    "weights truncated": ("model.safetensors", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), r"are corrupted or not safetensors"),
    "weights empty": ("model.safetensors", _write("model.safetensors", b""), r"are corrupted or not safetensors"),
    "weights missing tensor": ("model.safetensors", _edit_weights(lambda s: s.pop("embed.weight")),
                               r"expected the tensors of the model in .*config.json, found 1 missing \['embed.weight'\]"),
    "weights extra tensor": ("model.safetensors", _edit_weights(lambda s: s.update(extra=torch.zeros(2))),
                             r"found 0 missing \[\] and 1 unexpected \['extra'\]"),
    "weights wrong shape": ("model.safetensors", _edit_config(vocab_size=51),
                            r"expected embed.weight to be a float tensor of shape \(51, 32\) \(from .*config.json\), "
                            r"found torch.float32 of shape \(50, 32\)"),
    "weights int dtype": ("model.safetensors", _edit_weights(lambda s: s.update({"embed.weight": s["embed.weight"].long()})),
                          r"expected embed.weight to be a float tensor of shape \(50, 32\).*found torch.int64"),
}


@pytest.mark.parametrize("case", list(MALFORMED_MODEL))
def test_load_model_refuses_malformed_files_naming_them(tmp_path, case):
    """Every corrupt or inconsistent model file: a ValueError naming the file and what was expected."""
    blamed, damage, found = MALFORMED_MODEL[case]
    _save_tiny(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / blamed)) + ".*" + found):
        TinyMTP.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_load_model_names_a_missing_file(tmp_path, name):
    _save_tiny(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"model file {tmp_path / name} is missing")):
        TinyMTP.from_pretrained(str(tmp_path))


needs_bundled = pytest.mark.skipif(not (PRETRAINED_DIR / "model.safetensors").is_file(),
                                   reason="no bundled model in this checkout")


def _stats_cache_path(cache):
    """Where load_pretrained caches the bundled model's statistics (order 3: its three heads)."""
    from dynamo_sampling.pretrained import stats_cache_path

    fp = tokenizer_fingerprint(PRETRAINED_DIR / "tokenizer.json")
    path = stats_cache_path(fp, 3)
    assert path.parent == cache and path.name.startswith(f"stdlib-stats-{fp[:16]}-o3-py"), path
    return path


def _tiny_stats_saver(vocab_size=8192, fingerprint=None):
    def write(path):
        fp = tokenizer_fingerprint(PRETRAINED_DIR / "tokenizer.json") if fingerprint is None else fingerprint
        CooccurrenceStats.build([np.arange(20) % 7], vocab_size, 3, tokenizer_fingerprint=fp).save(path)
    return write


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


DAMAGED_CACHE = {
    "truncated": lambda p: (_tiny_stats_saver()(p), p.write_bytes(p.read_bytes()[:200])),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(500)),
    "empty": lambda p: p.write_bytes(b""),
    "npy": lambda p: p.write_bytes(_npy_bytes(np.arange(3))),
    "other vocabulary": _tiny_stats_saver(vocab_size=100),
    "other tokenizer": _tiny_stats_saver(fingerprint="0" * 64),
}


@needs_bundled
@pytest.mark.parametrize("case", list(DAMAGED_CACHE))
def test_load_pretrained_rebuilds_a_damaged_stats_cache(tmp_path, monkeypatch, capsys, case):
    """Every kind of damage: rebuilt (a tiny stand-in for the stdlib build here), one line on stderr each."""
    import dynamo_sampling.pretrained as pretrained

    monkeypatch.setenv("DYNAMO_SAMPLING_CACHE", str(tmp_path))
    built = []

    def tiny_build(tokenizer_path, vocab_size, max_order, root=None, progress=False):
        built.append(max_order)
        return CooccurrenceStats.build([np.arange(30) % 11], vocab_size, max_order,
                                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path))

    monkeypatch.setattr(pretrained, "build_stdlib_stats", tiny_build)
    cached = _stats_cache_path(tmp_path)
    DAMAGED_CACHE[case](cached)
    _, _, stats = load_pretrained(dtype="float32")
    assert built == [3] and stats.num_tokens == 30
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"dynamo_sampling: cached co-occurrence statistics unusable, rebuilding them: {cached}: ")
    assert "allow_pickle" not in err[0]
    assert re.fullmatch(r"dynamo_sampling: built co-occurrence statistics of the standard library in \d+\.\d s "
                        rf"\(cached at {re.escape(str(cached))}\)", err[1]), err[1]
    assert CooccurrenceStats.load(cached) == stats  # the rebuilt file replaced the damaged one


@needs_bundled
def test_load_pretrained_builds_stdlib_stats_once_and_says_so(tmp_path, monkeypatch, capsys):
    """The real build (~5-8 s): over a truncated cache file, with its time on stderr; the next load is silent."""
    torch.set_num_threads(1)
    monkeypatch.setenv("DYNAMO_SAMPLING_CACHE", str(tmp_path))
    cached = _stats_cache_path(tmp_path)
    _tiny_stats_saver()(cached)
    cached.write_bytes(cached.read_bytes()[:100])
    _, _, stats = load_pretrained(dtype="float32")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"dynamo_sampling: cached co-occurrence statistics unusable, rebuilding them: {cached}: "
                             "expected a co-occurrence statistics .npz written by CooccurrenceStats.save, "
                             "found a truncated or damaged zip archive")
    assert re.fullmatch(r"dynamo_sampling: built co-occurrence statistics of the standard library in \d+\.\d s "
                        rf"\(cached at {re.escape(str(cached))}\)", err[1]), err[1]
    assert stats.vocab_size == 8192 and stats.max_order == 3 and stats.num_tokens > 100_000
    _, _, again = load_pretrained(dtype="float32")
    assert again == stats and capsys.readouterr().err == ""


@pytest.mark.skipif(not (PRETRAINED_DIR / "recorded.json").is_file(), reason="no bundled model in this checkout")
def test_bundled_model_loads_offline_and_reproduces_recorded_completion():
    from dynamo_sampling import sample

    record = json.loads((PRETRAINED_DIR / "recorded.json").read_text())
    model, tok, _ = load_pretrained(with_stats=False, dtype="float32")  # recorded in fp32
    ids = torch.tensor([tok.encode(record["prompt"]).ids])
    for strategy in ("ar", "speculative"):
        out = sample(model, ids, strategy=strategy, max_new_tokens=record["max_new_tokens"])
        assert out[0, ids.shape[1]:].tolist() == record["new_token_ids"], strategy
    assert sum(f.stat().st_size for f in PRETRAINED_DIR.iterdir()) < 25 * 2 ** 20


@needs_bundled
def test_stats_cache_is_keyed_by_python_version_and_corpus(tmp_path, monkeypatch, capsys):
    """Statistics built under another Python or from other stdlib files go to another cache file."""
    import dynamo_sampling.pretrained as pretrained

    monkeypatch.setenv("DYNAMO_SAMPLING_CACHE", str(tmp_path))
    built = []

    def tiny_build(tokenizer_path, vocab_size, max_order, root=None, progress=False):
        built.append(len(built))
        return CooccurrenceStats.build([np.arange(30 + len(built)) % 11], vocab_size, max_order,
                                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path))

    monkeypatch.setattr(pretrained, "build_stdlib_stats", tiny_build)
    tokens = []

    def load():
        stats = load_pretrained(dtype="float32")[2]
        tokens.append(stats.num_tokens)
        return sorted(p.name for p in tmp_path.iterdir())

    first = load()
    assert load() == first and built == [0] and tokens == [31, 31]  # same interpreter, same files: cached
    monkeypatch.setattr(pretrained.corpus, "split_fingerprint", lambda split="train", root=None: "e" * 64)
    other_files = load()
    assert built == [0, 1] and tokens[-1] == 32 and len(other_files) == 2
    monkeypatch.setattr(pretrained.platform, "python_version", lambda: "3.99.0")
    other_python = load()
    assert built == [0, 1, 2] and tokens[-1] == 33 and len(other_python) == 3
    assert any("-py3.99.0-eeeeeeeeeeeeeeee.npz" in name for name in other_python), other_python
    monkeypatch.undo()
    monkeypatch.setenv("DYNAMO_SAMPLING_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "build_stdlib_stats", tiny_build)
    assert load() == other_python and built == [0, 1, 2] and tokens[-1] == 31  # the first file, reused
    capsys.readouterr()


@needs_bundled
def test_inference_never_imports_the_training_package(tmp_path):
    """load_pretrained (building and loading statistics), sample and generate_text run without
    ``dynamo_sampling.train`` (in a fresh interpreter: other tests import it here)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "mod.py").write_text("def f(x):\n    return x + 1\n" * 50)
    code = textwrap.dedent(f"""
        import sys, torch
        import dynamo_sampling
        from dynamo_sampling import generate_text, load_pretrained, sample
        from dynamo_sampling.cooccurrence import tokenizer_fingerprint
        from dynamo_sampling.pretrained import PRETRAINED_DIR, build_stdlib_stats, stats_cache_path
        tok_path = PRETRAINED_DIR / "tokenizer.json"
        stats = build_stdlib_stats(tok_path, 8192, 3, root={str(src)!r})
        cached = stats_cache_path(tokenizer_fingerprint(tok_path), 3)
        cached.parent.mkdir(parents=True)
        stats.save(str(cached))
        model, tok, stats = load_pretrained(dtype="float32")
        assert stats.num_tokens > 100, stats.num_tokens
        ids = torch.tensor([tok.encode("def f(x):").ids])
        sample(model, ids, strategy="dynamo", max_new_tokens=4, stats=stats)
        generate_text(model, tok, ["import os"], max_new_tokens=4)
        loaded = sorted(m for m in sys.modules if m.startswith("dynamo_sampling.train"))
        assert not loaded, loaded
        print("ok")
    """)
    env = {**os.environ, "DYNAMO_SAMPLING_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
