"""Tests of evals/ (metrics, quality_vs_speed --quick end to end, perplexity) on tiny models."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dynamo_sampling.models.tiny import TinyMTP, TinyMTPConfig  # noqa: E402
from dynamo_sampling.corpus import stdlib_root  # noqa: E402
from dynamo_sampling.train.tokenizer import encode, train_tokenizer  # noqa: E402
from dynamo_sampling.train.trainer import save_model  # noqa: E402
from evals import metrics  # noqa: E402
from evals import perplexity as ppl_script  # noqa: E402
from evals import quality_vs_speed as qvs  # noqa: E402

STDLIB_FILES = ["textwrap.py", "shlex.py", "colorsys.py"]


# ---------------------------------------------------------------- metrics on hand-made inputs


def test_win_rate_excludes_ties():
    scores = [2.0, 1.0, 3.0, 0.0, 5.0]
    base = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert metrics.win_loss_tie(scores, base) == (3, 1, 1)
    assert metrics.win_rate(scores, base) == pytest.approx(3 / 4)  # not 3/5: the tie is excluded
    assert metrics.normalized_win_rate(metrics.win_rate(scores, base)) == pytest.approx(1.5)


def test_win_rate_all_ties_is_parity_and_nan_pairs_are_skipped():
    assert metrics.win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert metrics.win_loss_tie([1.0, float("nan"), 0.0], [0.5, 1.0, 1.0]) == (1, 1, 0)
    with pytest.raises(ValueError, match="same length"):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_same_quality_speedup_known_crossing():
    sq = metrics.same_quality_speedup([1.0, 2.0, 3.0], [1.2, 1.0, 0.8], max_speedup=3)
    assert sq.slope == pytest.approx(-0.2) and sq.intercept == pytest.approx(1.4)
    assert sq.crossing == pytest.approx(2.0)
    assert sq.speedup == pytest.approx(2.0)


def test_same_quality_speedup_caps_and_floor():
    # line 1.6 - 0.1 s crosses 1.0 at s = 6: capped at the largest measured speed-up, then at H
    assert metrics.same_quality_speedup([1.0, 2.0], [1.5, 1.4]).speedup == pytest.approx(2.0)
    assert metrics.same_quality_speedup([1.0, 2.0], [1.5, 1.4], max_speedup=1.5).speedup == pytest.approx(1.5)
    # line 1.1 - 0.2 s is below parity on all of [1, 2.5]: only ar itself (speed-up 1) has parity quality
    sq = metrics.same_quality_speedup([1.5, 2.5], [0.8, 0.6])
    assert sq.crossing == pytest.approx(0.5) and sq.speedup == 1.0
    # the line may be extrapolated down to speed-up 1 (here it crosses at 1.25, below the first point)
    assert metrics.same_quality_speedup([1.5, 2.5], [0.9, 0.5]).speedup == pytest.approx(1.25)
    # everything slower than ar
    assert metrics.same_quality_speedup([0.5, 0.8], [1.0, 1.0]).speedup == 1.0
    # flat at parity (a lossless method): the largest measured speed-up
    assert metrics.same_quality_speedup([1.2, 1.8], [1.0, 1.0]).speedup == pytest.approx(1.8)


HEADER = 'def f(x):\n    """Add one."""\n'


@pytest.mark.parametrize("completion, valid", [
    ("    return x + 1\n", True),
    ("    return x +* 1\n", False),                       # a real syntax error
    ("    y = x\n    return y\n  z = 1\n", False),        # bad dedent
    ("    return x\n    y = (x +", True),               # trailing partial line is dropped
    ("    if x:\n", True),                                # open block at the end: incomplete, not wrong
    ("    y = foo(x,\n            2,\n", True),           # open bracket at the end
    ("", True),                                           # nothing added
    ("\n\nclass A:\n    pass\n", True),
])
def test_is_valid_completion(completion, valid):
    assert metrics.is_valid_completion(HEADER, completion) is valid


def test_is_valid_completion_context_ending_mid_block_and_broken_context():
    assert metrics.is_valid_completion("class A:\n    def f(self):\n", "        return 1\n")
    assert not metrics.is_valid_completion("class A:\n    def f(self):\n", "        return )\n")
    # the context has its own error on line 1: the completion is judged by not adding a new one
    assert metrics.is_valid_completion("def f(:\n", "    return 1\n")
    assert metrics.syntax_status("def f(:\n")[0] == "error"
    assert metrics.syntax_status("if x:\n")[0] == "incomplete"
    pairs = [(HEADER, "    return x\n"), (HEADER, "    return )\n"), (HEADER, "    return 1\n"), (HEADER, "  x\n")]
    assert metrics.valid_python_share(pairs) == pytest.approx(0.5)


def test_distinct_n_known_list():
    toks = [1, 2, 1, 2]
    assert metrics.distinct_n(toks, 1) == pytest.approx(2 / 4)
    assert metrics.distinct_n(toks, 2) == pytest.approx(2 / 3)   # (1,2) (2,1) (1,2)
    assert metrics.distinct_n(toks, 3) == pytest.approx(1.0)     # (1,2,1) (2,1,2)
    assert math.isnan(metrics.distinct_n(toks, 5))
    assert metrics.distinct_n([7, 7, 7], 1) == pytest.approx(1 / 3)


def test_line_exact_match_and_char_similarity():
    # complete lines "a", "b" ("c" is unfinished); reference line 0 matches, line 1 does not
    assert metrics.line_exact_match("a\nb  \nc", "a\nx\n") == pytest.approx(0.5)
    assert metrics.line_exact_match("a\r\nx\n", "a\nx\n") == pytest.approx(1.0)
    assert metrics.line_exact_match("no newline", "no newline\n") == 0.0
    assert metrics.line_exact_match("a\n\nx\n", "a\nx\n") == pytest.approx(1.0)   # blank lines skipped
    assert metrics.line_exact_match("\n\n\n", "\n\n\n") == 0.0                 # and never matches
    assert metrics.char_similarity("return x\n", "return x\n    more text") == pytest.approx(1.0)
    assert metrics.char_similarity("", "abc") == 0.0
    assert metrics.char_similarity("abcd", "abxy") == pytest.approx(0.5)  # 2 matches * 2 / 8


def test_cut_points_are_complete_python():
    text = ('import os\n\n\nclass A:\n    """Doc of A."""\n\n    x = 1\n\n    def f(self):\n'
            '        """Doc of f."""\n        a = 1\n        b = 2\n        return a + b\n')
    points = qvs.cut_points(text)
    assert (6, "header") in points     # after A's docstring
    assert (11, "header") in points    # after f's docstring
    assert (12, "mid") in points and (13, "mid") in points
    lines = text.splitlines(keepends=True)
    for line, _ in points:
        assert metrics.syntax_status("".join(lines[:line - 1]))[0] != "error"


# ---------------------------------------------------------------- tiny model end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tokenizer (vocab ~300, trained on a few stdlib files), a tiny random TinyMTP saved with
    save_model, a source dir of .py files and a train-token .npy for the statistics."""
    tmp = tmp_path_factory.mktemp("tiny_evals")
    src = tmp / "src"
    src.mkdir()
    texts = []
    for name in STDLIB_FILES:
        shutil.copy(stdlib_root() / name, src / name)
        texts.append((src / name).read_text())
    tok = train_tokenizer(texts, vocab_size=300)
    tok_path = tmp / "tokenizer.json"
    tok.save(str(tok_path))
    torch.manual_seed(0)
    cfg = TinyMTPConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_heads=3, d_model=32, n_attn_heads=2,
                        d_ff=64, max_seq_len=128)
    model = TinyMTP(cfg).eval()
    save_model(model, str(tmp / "model"), dtype=torch.float32)
    train = np.concatenate([np.asarray(encode(tok, t), dtype=np.uint16) for t in texts])
    np.save(tmp / "train.npy", train)
    return {"tmp": tmp, "src": src, "tok": tok_path, "model_dir": tmp / "model", "train": tmp / "train.npy",
            "model": model}


def test_quality_vs_speed_quick_end_to_end(tiny, tmp_path):
    out = tmp_path / "results"
    stats_path = tmp_path / "stats.npz"
    argv = ["--model-dir", str(tiny["model_dir"]), "--tokenizer", str(tiny["tok"]), "--stats", str(stats_path),
            "--train-tokens", str(tiny["train"]), "--source-dir", str(tiny["src"]), "--quick",
            "--n-prompts", "2", "--max-new-tokens", "8", "--prompt-tokens", "32", "--out", str(out), "--no-progress",
            "--dynamo-variant", 'rep2={"repetition_penalty": 2.0}']
    assert qvs.main(argv) == 0
    for name in ("results.csv", "results.json", "results.md", "samples.csv", "timings.csv", "completions.jsonl",
                 "speedup_vs_eps.png", "quality_vs_speedup.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert stats_path.is_file()  # built from --train-tokens and saved where --stats pointed

    res = json.loads((out / "results.json").read_text())
    quick = qvs.QUICK
    expected = set()
    for mode in ("greedy", "sampled"):
        expected.add(f"ar/{mode}")
        expected |= {f"dynamo/{mode}/eps_b={e:g}" for e in quick["eps_b"]}
        expected |= {f"speculative/thresholds/{mode}/eps_b={e:g}" for e in quick["eps_b"]}
        expected |= {f"speculative/{mode}", f"speculative/no_lookup/{mode}", f"speculative/no_merge/{mode}",
                     f"speculative/no_corpus/{mode}", f"speculative/tree/{mode}", f"lookup/{mode}",
                     f"lookup/corpus/{mode}", f"lookup/corpus_no_tree/{mode}"}
        for abl in ("no_cooc", "no_adaptive", "no_blur", "rep2"):
            expected |= {f"dynamo/{abl}/{mode}/eps_b={e:g}" for e in quick["ablation_eps_b"]}
    rows = {r["setting"]: r for r in res["settings"]}
    assert set(rows) == expected
    assert res["config"]["quick"] is True and res["n_heads"] == 3
    assert len(res["prompts"]) == 2 and all(p["context_parses"] != "error" for p in res["prompts"])
    assert all(r["n"] == 2 for r in rows.values())  # 2 prompts x 1 seed
    with open(out / "results.csv") as f:
        assert {r["setting"] for r in csv.DictReader(f)} == expected
    # ar against itself ties everywhere; dynamo at eps_b = 1 is ar (head 1 argmax, one token a step)
    assert rows["ar/greedy"]["ties"] == 2 and rows["ar/greedy"]["win_rate"] == 0.5
    assert rows["dynamo/greedy/eps_b=1"]["tokens_per_step"] == 1.0
    assert rows["dynamo/greedy/eps_b=1"]["ties"] == 2
    # eps_b = 0 without the co-occurrence mask emits H tokens a step (3 + 3 + 2 for 8 tokens)
    assert rows["dynamo/no_cooc/greedy/eps_b=0"]["tokens_per_step"] == pytest.approx(8 / 3)
    # the exact strategies write what ar writes, greedy
    for name in ("speculative/greedy", "speculative/no_lookup/greedy", "speculative/no_merge/greedy", "lookup/greedy",
                 "speculative/no_corpus/greedy", "speculative/tree/greedy", "lookup/corpus/greedy",
                 "lookup/corpus_no_tree/greedy", "speculative/thresholds/greedy/eps_b=0"):
        assert rows[name]["ties"] == 2, name
    groups = {s["group"] for s in res["same_quality"]}
    assert "dynamo/greedy" in groups and "speculative/sampled" in groups and "dynamo/no_blur/sampled" in groups
    for s in res["same_quality"]:
        assert 1.0 <= s["speedup"] <= 3.0
    assert "| setting |" in (out / "results.md").read_text()
    assert (out / "speedup_vs_eps.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("variant,message", [
    ('x={"k": 0}', r"DynamoConfig fields, got .*k \(top-k per head for the joint\) must be >= 1, got 0"),
    ('x={"nope": 1}', r"DynamoConfig fields, got .*unexpected keyword argument 'nope'"),
    ('x=[1]', "not a JSON object"),
    ('no_cooc={"k": 5}', "name 'no_cooc' is empty, has a '/' or is taken"),
])
def test_dynamo_variant_errors(capsys, variant, message):
    with pytest.raises(SystemExit):
        qvs.parse_args(["--dynamo-variant", variant])
    assert re.search(message, capsys.readouterr().err)


def test_prompt_selection_is_deterministic(tiny):
    from dynamo_sampling.train.tokenizer import load_tokenizer

    docs = qvs.load_sources(str(tiny["src"]), "test")
    tok = load_tokenizer(tiny["tok"])
    a = qvs.select_prompts(docs, tok, 6, 32, seed=3)
    b = qvs.select_prompts(docs, tok, 6, 32, seed=3)
    assert [(p.path, p.line, p.kind) for p in a] == [(p.path, p.line, p.kind) for p in b]
    assert [p.kind for p in a].count("header") == 3 and [p.kind for p in a].count("mid") == 3
    assert all(1 <= len(p.ids) <= 32 for p in a)


def test_perplexity_matches_hand_computed_nll(tiny):
    model = tiny["model"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=50).astype(np.uint16)
    res = ppl_script.perplexities(model, tokens, seq_len=8, batch_size=2)
    H = model.n_heads
    n_windows = (50 - H) // 8
    assert res["n_windows"] == n_windows and res["n_positions"] == n_windows * 8
    for key in ("ppl", "ppl_joint", "top1_acc", "nll"):
        assert len(res[key]) == H and all(math.isfinite(v) for v in res[key])
    # by hand: head 1, every window, plain cross-entropy
    t = torch.from_numpy(tokens.astype(np.int64))
    nll1, nll2 = [], []
    with torch.no_grad():
        for w in range(n_windows):
            s = w * 8
            logits = model(t[s:s + 8][None], torch.arange(8)[None], None, heads=H)  # (1, 8, H, V)
            nll1.append(F.cross_entropy(logits[0, :, 0], t[s + 1:s + 9], reduction="none"))
            nll2.append(F.cross_entropy(logits[0, :, 1], t[s + 2:s + 10], reduction="none"))  # head 2: x[t+2]
    mean1 = torch.cat(nll1).double().mean().item()
    mean2 = torch.cat(nll2).double().mean().item()
    assert res["ppl"][0] == pytest.approx(math.exp(mean1), rel=1e-5)
    assert res["ppl"][1] == pytest.approx(math.exp(mean2), rel=1e-5)
    assert res["ppl_joint"][0] == pytest.approx(res["ppl"][0])
    assert res["ppl_joint"][1] == pytest.approx(math.exp((mean1 + mean2) / 2), rel=1e-5)


def test_perplexity_script_writes_json(tiny, tmp_path):
    tokens = np.arange(200, dtype=np.uint16) % tiny["model"].vocab_size
    np.save(tmp_path / "toks.npy", tokens)
    out = tmp_path / "ppl.json"
    assert ppl_script.main(["--model-dir", str(tiny["model_dir"]), "--tokens", str(tmp_path / "toks.npy"),
                            "--seq-len", "16", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["n_heads"] == 3 and res["seq_len"] == 16 and res["n_windows"] == (200 - 3) // 16
    assert all(math.isfinite(v) and v > 1 for v in res["ppl"])
