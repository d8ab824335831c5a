"""The command line and text in / text out: one-line errors, prompt sources, truncation, samples."""
import subprocess
import sys

import pytest
import torch

from dynamo_sampling import __version__, generate_text, load_pretrained
from dynamo_sampling.cli import main
from dynamo_sampling.pretrained import PRETRAINED_DIR

needs_model = pytest.mark.skipif(not (PRETRAINED_DIR / "model.safetensors").is_file(), reason="no bundled model")


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--eps-b", "2", "--no-stats"], r"eps_b must be in \[0, 1\], got 2.0"),
    (["generate", "--prompt", "x", "--corpus-draft", "-1", "--no-stats"], "corpus_draft must be >= 0, got -1"),
    (["generate", "--prompt", "x", "--temperature", "0", "--do-sample", "--no-stats"],
     "temperature must be > 0 when do_sample=True"),
    (["generate", "--prompt", "x", "--model-dir", "/nonexistent/dir"], "pretrained model directory /nonexistent/dir lacks"),
    (["generate", "--prompt-file", "/nonexistent/prompt.py"], "cannot read --prompt-file /nonexistent/prompt.py"),
    (["generate", "--prompt", "x", "--max-new-tokens", "600", "--no-stats"], "leaves no room for a prompt"),
    (["generate", "--prompt", "x", "--cuda-graph", "--no-stats"], "cuda_graph=True needs the model and input_ids on a CUDA"),
    (["generate", "--prompt", "x", "--dynamo", "[1]", "--no-stats"], "--dynamo must be a JSON object of DynamoConfig fields, got list"),
    (["generate", "--prompt", "x", "--dynamo", "{oops", "--no-stats"], "--dynamo must be a JSON object"),
    (["generate", "--prompt", "x", "--dynamo", '{"alpha": 1}', "--no-stats"], r"unknown DynamoConfig field\(s\) \['alpha'\]"),
    (["generate", "--prompt", "x", "--dynamo", '{"repetition_penalty": 0}', "--no-stats"], "repetition_penalty must be"),
    (["cooccur", "--tokenizer", "tok.json", "--out", "/nonexistent/dir/s.npz", "Lib"],
     "--out /nonexistent/dir/s.npz: directory /nonexistent/dir does not exist"),
])
@needs_model
def test_library_errors_are_one_line_and_exit_2(capsys, argv, message):
    import re

    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dynamo-sampling: error: ")
    assert re.search(message, err), err
    assert "Traceback" not in err


@needs_model
def test_debug_shows_the_exception(capsys):
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 1"):
        main(["--debug", "generate", "--prompt", "x", "--max-new-tokens", "0"])


@needs_model
def test_long_prompt_refused_or_cut_left(capsys, tmp_path):
    prompt = tmp_path / "p.py"
    prompt.write_text("x = 1\n" * 400)  # far more tokens than the 512-token context
    rc, _, err = run(capsys, "generate", "--prompt-file", str(prompt), "--max-new-tokens", "8", "--no-stats")
    assert rc == 2 and "at most 504 fit the model's context" in err
    rc, out, err = run(capsys, "generate", "--prompt-file", str(prompt), "--max-new-tokens", "8", "--no-stats",
                       "--truncate", "left", "--strategy", "ar", "--no-eos")
    assert rc == 0 and out.startswith("x = 1\n") and "[ar] 8 tokens in 8 steps" in err


@needs_model
def test_num_samples_and_eos(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "def f(x):", "--max-new-tokens", "6", "--num-samples", "3",
                       "--do-sample", "--no-stats", "--strategy", "lookup", "--no-eos")
    assert rc == 0 and out.count("----- sample") == 3 and err.count("[lookup] 6 tokens") == 3


@needs_model
def test_dynamo_fields_from_the_command_line_reach_the_policy(capsys):
    """--dynamo sets DynamoConfig fields: the variety setting of the README gives the tokens that
    sample() gives with the same fields (greedy, fp32), and they differ from the defaults' here."""
    from dynamo_sampling import sample

    variety = {"adaptive_threshold": False, "repetition_penalty": 20.0, "alpha_c": 1.1}
    argv = ["generate", "--prompt", "def f(x):", "--max-new-tokens", "24", "--no-eos", "--dtype", "float32",
            "--eps-b", "0.03"]
    rc, out, _ = run(capsys, *argv, "--dynamo", '{"adaptive_threshold": false, "repetition_penalty": 20, "alpha_c": 1.1}')
    rc0, out0, _ = run(capsys, *argv)
    assert rc == rc0 == 0 and out != out0
    model, tok, stats = load_pretrained(dtype="float32")
    ids = torch.tensor([tok.encode("def f(x):").ids])
    ref = sample(model, ids, strategy="dynamo", max_new_tokens=24, stats=stats, eps_b=0.03, **variety)
    assert out == "def f(x):" + tok.decode(ref[0, ids.shape[1]:].tolist()) + "\n"


@needs_model
def test_generate_text_matches_sample():
    from dynamo_sampling import sample

    model, tok, _ = load_pretrained(with_stats=False, dtype="float32")
    prompts = ["def add(a, b):", "import os\n\n\nclass Walker:"]
    texts, out = generate_text(model, tok, prompts, strategy="ar", max_new_tokens=12, return_dict_in_generate=True)
    for p, text, row in zip(prompts, texts, range(2)):
        ids = torch.tensor([tok.encode(p).ids])
        ref = sample(model, ids, strategy="ar", max_new_tokens=12, eos_token_id=0)[0, ids.shape[1]:].tolist()
        ref = ref[:ref.index(0)] if 0 in ref else ref
        assert text == tok.decode(ref, skip_special_tokens=False)
    assert generate_text(model, tok, prompts, strategy="lookup", max_new_tokens=12) == texts  # exact
    with pytest.raises(TypeError, match="prompts must be a non-empty list of strings, got str"):
        generate_text(model, tok, "def f():")
    with pytest.raises(ValueError, match="at most 504 fit"):
        generate_text(model, tok, ["x = 1\n" * 400], max_new_tokens=8)
    assert len(generate_text(model, tok, ["x = 1\n" * 400], max_new_tokens=8, truncate="left", eos_token_id=None,
                             strategy="ar")[0]) > 0


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "dynamo_sampling", "generate", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--prompt-file" in out and "(default: dynamo)" in out and "with --do-sample only" in out
    assert __version__.count(".") == 2
