"""Tests for the stdlib corpus splits and the byte-level BPE tokenizer / data prep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dynamo_sampling import corpus
from dynamo_sampling.tokenizer import EOS_ID, EOS_TOKEN, decode, encode, encode_documents, file_sha256, load_tokenizer
from dynamo_sampling.train.tokenizer import pack_documents, prepare_data, train_tokenizer

SMALL_VOCAB = 500


@pytest.fixture(scope="module")
def stdlib_files():
    root = corpus.stdlib_root()
    files = corpus.list_source_files(root)
    rels = [corpus.relative_posix(p, root) for p in files]
    return root, files, rels


@pytest.fixture(scope="module")
def small_tokenizer():
    train = corpus.load_split("train")
    # Deterministic subset of the train split keeps training well under a second.
    texts = [t for _, t in train[::15]]
    return train_tokenizer(texts, vocab_size=SMALL_VOCAB)


# ----------------------------------------------------------------- corpus


def test_stdlib_has_sources(stdlib_files):
    root, files, rels = stdlib_files
    assert root.is_dir()
    assert len(files) > 300
    assert rels == sorted(rels), "files must be sorted by relative posix path"
    assert len(set(rels)) == len(rels)
    for must in ("os.py", "json/decoder.py", "asyncio/events.py"):
        assert must in rels


def test_no_test_files_in_stdlib_listing(stdlib_files):
    _, _, rels = stdlib_files
    for rel in rels:
        parts = rel.split("/")
        assert not ({"test", "tests", "idle_test", "__pycache__"} & set(parts)), rel
        assert "site-packages" not in parts and "dist-packages" not in parts, rel
        assert not parts[-1].startswith("test_"), rel
        assert not rel.startswith(("lib2to3/tests/", "ensurepip/_bundled/")), rel
        assert rel.endswith(".py")


def test_exclusion_rules_on_synthetic_tree(tmp_path):
    # tmp_path itself contains "test_..." components: only the relative path counts.
    root = tmp_path / "test" / "lib"
    keep = ["a.py", "pkg/__init__.py", "pkg/mod.py", "pkg/testing.py", "unittest/case.py",
            "lib2to3/fixer.py", "ensurepip/__init__.py", "pkg/contest.py"]
    drop = ["test/a.py", "pkg/tests/b.py", "idlelib/idle_test/c.py", "test_x.py",
            "pkg/test_y.py", "site-packages/z.py", "dist-packages/z.py",
            "pkg/__pycache__/m.py", "lib2to3/tests/data/f.py", "ensurepip/_bundled/w.py",
            "pkg/notpython.txt", "pkg/mod.pyc"]
    for rel in keep + drop:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x = 1\n")
    got = [corpus.relative_posix(p, root) for p in corpus.list_source_files(root)]
    assert got == sorted(keep)


def test_split_is_deterministic_and_location_independent(tmp_path, stdlib_files):
    root, files, rels = stdlib_files
    assert [corpus.split_of(r) for r in rels] == [corpus.split_of(r) for r in rels]
    # Copy 20 files spread over all splits into two different roots.
    chosen = [(rel, p) for rel, p in zip(rels, files)][:: max(1, len(rels) // 20)][:20]
    results = []
    for name in ("one/place", "another/deeper/place"):
        new_root = tmp_path / name
        for rel, p in chosen:
            dst = new_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        listed = [corpus.relative_posix(p, new_root) for p in corpus.list_source_files(new_root)]
        results.append([(r, corpus.split_of(r)) for r in listed])
    assert results[0] == results[1]
    assert [r for r, _ in results[0]] == sorted(rel for rel, _ in chosen)
    # Same split as in the real stdlib location.
    assert all(s == corpus.split_of(r) for r, s in results[0])


def test_splits_disjoint_cover_and_fractions(stdlib_files):
    root, _, rels = stdlib_files
    per_split = {s: [r for r, _ in corpus.split_files(s, root)] for s in corpus.SPLITS}
    seen: dict[str, str] = {}
    for split, paths in per_split.items():
        for r in paths:
            assert r not in seen, f"{r} in both {seen[r]} and {split}"
            seen[r] = split
    assert sorted(seen) == sorted(rels)
    n = len(rels)
    test_frac = len(per_split["test"]) / n
    val_frac = len(per_split["val"]) / n
    assert 0.03 <= test_frac <= 0.08, test_frac
    assert 0.03 <= val_frac <= 0.08, val_frac


def test_split_of_thresholds():
    assert corpus.split_of("os.py", 0.0, 0.0) == "train"
    assert {corpus.split_of(f"f{i}.py", 0.0, 0.999) for i in range(50)} <= {"test", "train"}
    with pytest.raises(ValueError):
        corpus.split_of("os.py", 0.6, 0.6)


def test_load_split_skips_undecodable(tmp_path):
    (tmp_path / "good.py").write_text("print('hi')\r\n", newline="")
    (tmp_path / "bad.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    skipped: list = []
    docs = []
    for split in corpus.SPLITS:
        docs += corpus.load_split(split, tmp_path, skipped=skipped)
    assert docs == [("good.py", "print('hi')\r\n")]  # verbatim, \r\n kept
    assert skipped == ["bad.py"]
    summary = corpus.corpus_summary(tmp_path)
    assert summary["total"] == {"files": 1, "bytes": 13, "skipped": 1}


# -------------------------------------------------------------- tokenizer


def test_tokenizer_special_token_and_vocab(small_tokenizer):
    assert small_tokenizer.token_to_id(EOS_TOKEN) == EOS_ID == 0
    assert small_tokenizer.get_vocab_size() <= SMALL_VOCAB


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n",
        "def f(x):\n    return x  \n\n\n",
        "\tif a:\r\n\t\tpass\r\n",
        "   leading spaces and trailing   ",
        "s = '\u00e9\u4e2d\U0001F600'\n",
        "\ufeffimport os\n",
        "\x00\x01\x7f\x0b\x0c",
        f"x = '{EOS_TOKEN}'\n",  # literal special-token text is plain text
    ],
)
def test_roundtrip_edge_cases(small_tokenizer, text):
    assert decode(small_tokenizer, encode(small_tokenizer, text)) == text


def test_roundtrip_every_test_split_file(small_tokenizer):
    docs = corpus.load_split("test")
    assert len(docs) >= 20
    texts = [t for _, t in docs]
    arrays = encode_documents(small_tokenizer, texts)
    bad = [rel for (rel, text), a in zip(docs, arrays) if decode(small_tokenizer, a) != text]
    assert not bad, f"round-trip failed for {bad}"
    for a in arrays:
        assert a.dtype == np.uint16
        assert not (a == EOS_ID).any()  # no EOS inside documents


def test_tokenizer_save_load(tmp_path, small_tokenizer):
    path = tmp_path / "tok.json"
    small_tokenizer.save(str(path))
    tok = load_tokenizer(path)
    text = "class A:\n    x: int = 3  # comment\n"
    assert encode(tok, text) == encode(small_tokenizer, text)
    assert decode(tok, encode(tok, text)) == text


def test_pack_puts_eos_between_documents(small_tokenizer):
    texts = ["a = 1\n", "", "def g():\n    pass\n"]
    arrays = encode_documents(small_tokenizer, texts)
    assert [a.dtype for a in arrays] == [np.uint16] * 3
    packed = pack_documents(arrays)
    assert packed.dtype == np.uint16
    expected = np.concatenate([arrays[0], [EOS_ID], arrays[1], [EOS_ID], arrays[2]])
    np.testing.assert_array_equal(packed, expected.astype(np.uint16))
    assert len(pack_documents([])) == 0
    np.testing.assert_array_equal(pack_documents([arrays[0]]), arrays[0])
    # splitting on EOS recovers the documents
    pieces = np.split(packed, np.flatnonzero(packed == EOS_ID))
    got = [decode(small_tokenizer, p[p != EOS_ID]) for p in pieces]
    assert got == texts


# ----------------------------------------------------------- prepare_data


def _tiny_root(root: Path) -> Path:
    srcs = {
        "alpha.py": "import os\n\n\ndef alpha(x):\n    return os.path.join(x, 'a')\n",
        "beta.py": "class Beta:\n    def __init__(self):\n        self.value = 42\n",
        "gamma.py": "for i in range(10):\n    print(i * i)\n",
        "pkg/__init__.py": "",
        "pkg/delta.py": "def delta(a, b):\n    '''Return a - b.'''\n    return a - b\n",
        "pkg/epsilon.py": "EPS = 1e-9\nNAMES = ['x', 'y', 'z']\n",
        "pkg/zeta.py": "try:\n    import json\nexcept ImportError:\n    json = None\n",
        "eta.py": "while True:\n    break\n",
        "theta.py": "lambda_ = lambda q: q ** 2\r\n",
        "iota.py": "s = 'caf\u00e9'\nassert len(s) == 4\n",
        "kappa.py": "async def k():\n    await something()\n",
        "lam.py": "x = [i for i in range(3) if i]\n",
        "tests/test_skip.py": "assert False\n",
    }
    for rel, text in srcs.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
    return root


def test_prepare_data_tiny_root_writes_files_and_is_deterministic(tmp_path):
    root = _tiny_root(tmp_path / "src")
    # Make sure every split gets at least one file with the tiny root.
    infos, outs = [], []
    for name in ("run1", "run2"):
        out = tmp_path / name
        infos.append(prepare_data(out, vocab_size=300, root=root, progress=False,
                                  val_fraction=0.25, test_fraction=0.25))
        outs.append(out)
    names = ["tokenizer.json", "train.npy", "val.npy", "test.npy", "data.json"]
    for out in outs:
        assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    info = infos[0]
    assert info == json.loads((outs[0] / "data.json").read_text())
    assert sum(info["splits"][s]["files"] for s in corpus.SPLITS) == 12  # tests/ excluded
    tok = load_tokenizer(outs[0] / "tokenizer.json")
    assert info["vocab_size"] == tok.get_vocab_size()
    for split in corpus.SPLITS:
        arr = np.load(outs[0] / f"{split}.npy")
        assert arr.dtype == np.uint16
        s = info["splits"][split]
        assert len(arr) == s["tokens"]
        docs = [(r, t) for r, t in corpus.load_split(split, root, 0.25, 0.25) if t]
        assert s["nonempty_files"] == len(docs)
        if docs:
            assert int((arr == EOS_ID).sum()) == len(docs) - 1
            pieces = np.split(arr, np.flatnonzero(arr == EOS_ID))
            assert [decode(tok, p[p != EOS_ID]) for p in pieces] == [t for _, t in docs]


def test_train_modules_reexport_the_shared_tokenizer_loading():
    """Training code keeps its old import paths; inference and training share one implementation."""
    import dynamo_sampling.cooccurrence as cooccurrence
    import dynamo_sampling.train.tokenizer as train_tokenizer_module

    assert train_tokenizer_module.load_tokenizer is load_tokenizer and train_tokenizer_module.EOS_ID == EOS_ID
    assert train_tokenizer_module.file_sha256 is file_sha256 is cooccurrence.tokenizer_fingerprint


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # several 1 MiB blocks and a tail
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(tmp_path / "f.bin")) == hashlib.sha256(data).hexdigest()


def _train_file(root: Path, stem: str, split: str = "train") -> Path:
    """A new file of ``split`` under ``root`` (names are tried until one hashes into ``split``)."""
    for i in range(1000):
        name = f"{stem}{i}.py"
        if corpus.split_of(name) == split and not (root / name).exists():
            path = root / name
            path.write_text("x = 1\n")
            return path
    raise AssertionError(f"no name hashed into {split}")


def test_split_fingerprint_follows_the_split_files(tmp_path):
    """Same files: same digest; a file added, resized or touched in the split: another; other splits: no change."""
    import os

    for stem in ("a", "b", "c"):
        _train_file(tmp_path, stem)
    fp = corpus.split_fingerprint("train", tmp_path)
    assert len(fp) == 64 and corpus.split_fingerprint("train", tmp_path) == fp
    _train_file(tmp_path, "other", split="test")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("excluded\n")
    assert corpus.split_fingerprint("train", tmp_path) == fp  # a test-split file, an excluded file
    digests = {fp}
    added = _train_file(tmp_path, "d")
    digests.add(corpus.split_fingerprint("train", tmp_path))
    added.write_text("x = 22\n")  # one byte longer
    digests.add(corpus.split_fingerprint("train", tmp_path))
    st = added.stat()
    os.utime(added, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, new mtime
    digests.add(corpus.split_fingerprint("train", tmp_path))
    assert len(digests) == 4
