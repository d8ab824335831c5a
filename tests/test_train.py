"""Training recipe and the bundled-model loader."""
import json
import shutil

import numpy as np
import pytest
import torch

from dynamo_sampling import TinyMTP, TinyMTPConfig
from dynamo_sampling.pretrained import PRETRAINED_DIR, load_pretrained
from dynamo_sampling.train.trainer import TrainConfig, head_losses, load_model, save_model, train

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
                      batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=1000, checkpoint_every=1000,
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
    model = load_model(str(tmp_path / "final"))
    assert model.n_heads == H and (tmp_path / "summary.json").is_file()


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


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = TinyMTP(TinyMTPConfig(vocab_size=50, **MODEL)).eval()
    save_model(m, str(tmp_path), dtype=torch.float32)
    m2 = load_model(str(tmp_path))
    ids = torch.randint(0, 50, (1, 7))
    pos = torch.arange(7)[None]
    assert torch.equal(m(ids, pos), m2(ids, pos))


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
