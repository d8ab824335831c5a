"""Latency benchmarks (pytest-benchmark), kept apart from the tests.

Run::

    python -m pytest benchmarks/test_latency.py --benchmark-only \\
        --benchmark-json=benchmarks/results/latency_cpu.json

* ``test_generate_latency``: ``sample()`` for each strategy (greedy, eps_b 0.1, the other DynamoConfig
  defaults) at batch size 1 / 8 / 32, ``PROMPT_LEN``-token prompts (test-split tokens when
  ``runs/data/test.npy`` fits the vocabulary), exactly ``NEW_TOKENS`` new tokens per row (no EOS stop).
  ``extra_info`` has the time per generated token: ``ms_per_token`` (per step of the slowest row,
  i.e. call time / NEW_TOKENS: latency) and ``ms_per_token_all_rows`` (call time / (B * NEW_TOKENS):
  throughput), tokens per step, and ``model``: the trained model when one exists
  (``load_pretrained()`` or ``runs/tiny/final``), else a random TinyMTP of the bundled shape, which
  emits ~1 token per step at eps_b 0.1 because its heads are near uniform.
* ``test_step_policy``: ``dynamo_step`` alone on random logits (N(0, 4^2) entries), B = 1 and 8, H=3,
  k=50, V=8192, with and without co-occurrence statistics (built from ``runs/data/train.npy`` when it
  exists, else from a synthetic Zipf(1.2) stream of 1M tokens; ``extra_info["stats"]`` says which).

Each benchmark runs a fixed number of rounds (``benchmark.pedantic``) so the whole file takes about
a minute or two on a 2-core CPU; one torch thread.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling import DynamoConfig, dynamo_step, sample  # noqa: E402
from dynamo_sampling.cooccurrence import CooccurrenceStats  # noqa: E402
from benchmarks.bench_core import prefix_tokens  # noqa: E402
from evals.assets import assets_or_random, machine_line, machine_info  # noqa: E402

PROMPT_LEN = 64
NEW_TOKENS = 32
BATCH_SIZES = (1, 8, 32)
POLICY_V, POLICY_H, POLICY_K = 8192, 3, 50


@pytest.fixture(scope="module")
def assets():
    torch.set_num_threads(1)
    return assets_or_random(None, need_stats=True, threads=1, log=lambda *a: None)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("strategy", ["ar", "dynamo", "speculative", "lookup", "lookup_alone"])
def test_generate_latency(benchmark, assets, strategy, batch_size):
    """``lookup`` drafts from the row and the corpus (statistics given); ``lookup_alone`` is prompt
    lookup alone (``corpus_draft=0``), the peer without heads."""
    model, stats = assets.model, assets.stats
    ids = prefix_tokens(PROMPT_LEN, batch_size, model.vocab_size)
    last = {}
    kw = dict(strategy="lookup", corpus_draft=0) if strategy == "lookup_alone" else dict(strategy=strategy)

    def run():
        last["out"] = sample(model, ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, return_dict_in_generate=True,
                             stats=stats if strategy != "ar" else None, **kw)

    benchmark.group = f"generate B={batch_size}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    out = last["out"]
    assert int(out.new_tokens.min()) == NEW_TOKENS  # every row did the same work
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "model": assets.info["model"], "stats": assets.info.get("stats"), "machine": machine_line(machine_info()),
        "strategy": strategy, "batch_size": batch_size, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "tokens_per_step": float(out.tokens_per_step.mean()),
        "ms_per_token": 1e3 * mean_s / NEW_TOKENS,
        "ms_per_token_all_rows": 1e3 * mean_s / (NEW_TOKENS * batch_size),
    })


@pytest.fixture(scope="module")
def policy_stats():
    path = ROOT / "runs/data/train.npy"
    if path.is_file():
        tokens = np.load(path)
        if int(tokens.max()) < POLICY_V:
            return CooccurrenceStats.build([tokens], POLICY_V, max_order=POLICY_H), f"built from {path}"
    rng = np.random.default_rng(0)
    tokens = (rng.zipf(1.2, 1_000_000) - 1) % POLICY_V
    return CooccurrenceStats.build([tokens], POLICY_V, max_order=POLICY_H), "synthetic Zipf(1.2), 1M tokens"


@pytest.mark.parametrize("with_stats", [False, True], ids=["no_stats", "stats"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_step_policy(benchmark, policy_stats, batch_size, with_stats):
    torch.set_num_threads(1)
    logits = 4.0 * torch.randn(batch_size, POLICY_H, POLICY_V, generator=torch.Generator().manual_seed(0))
    stats, where = policy_stats
    cfg = DynamoConfig(k=POLICY_K)
    out = {}

    def run():
        out["step"] = dynamo_step(logits, cfg, stats=stats if with_stats else None)

    benchmark.group = "dynamo_step"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    assert out["step"].tokens.shape == (batch_size, POLICY_H)
    benchmark.extra_info.update({"batch_size": batch_size, "H": POLICY_H, "k": POLICY_K, "V": POLICY_V,
                                 "stats": where if with_stats else None, "logits": "N(0, 4^2) per entry",
                                 "mean_tokens_chosen": float(out["step"].n.float().mean()),
                                 "machine": machine_line(machine_info())})
