"""Python-standard-library source corpus for training a small code model.

The corpus is the ``*.py`` source of the running interpreter's standard
library (present on every machine with Python), minus test suites, vendored
wheels and third-party packages.  Files are assigned to train/val/test splits
by hashing their *relative* posix path, so the split of a file never depends
on the absolute install location, the file-system order or the machine.

Used by :mod:`dynamo_sampling.pretrained` (the bundled model's co-occurrence statistics are
built from the train split, and cached under :func:`split_fingerprint`), by
:mod:`dynamo_sampling.train.tokenizer` (``prepare_data``, which builds the tokenized
train/val/test arrays) and by the evals. Standard library only: inference imports it without
importing ``dynamo_sampling.train``.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

__all__ = [
    "SPLITS",
    "EXCLUDED_PARTS",
    "EXCLUDED_PREFIXES",
    "stdlib_root",
    "is_excluded",
    "list_source_files",
    "split_of",
    "split_files",
    "relative_posix",
    "load_split",
    "corpus_summary",
    "split_fingerprint",
]

SPLITS = ("train", "val", "test")

#: Any relative path containing one of these directory (or file) names is dropped.
EXCLUDED_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
#: Relative posix path prefixes (directories) that are dropped.
#: pydoc_data is one 750 kB string of documentation and encodings/ is codec tables: neither is code
#: a model should learn to write (they were 62% of the test split and 12% of train).
EXCLUDED_PREFIXES = ("lib2to3/tests", "ensurepip/_bundled", "pydoc_data", "encodings")

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _resolve_root(root) -> Path:
    return stdlib_root() if root is None else Path(root)


def is_excluded(rel_path: str) -> bool:
    """Whether a relative posix path is excluded from the corpus.

    Only the *relative* path is inspected, so a root that itself lives under a
    directory called ``test`` (e.g. a pytest tmp dir) is handled correctly.
    """
    parts = rel_path.split("/")
    if any(p in EXCLUDED_PARTS for p in parts):
        return True
    if parts[-1].startswith("test_"):
        return True
    for prefix in EXCLUDED_PREFIXES:
        if rel_path == prefix or rel_path.startswith(prefix + "/"):
            return True
    return False


def list_source_files(root=None) -> list[Path]:
    """All non-test ``*.py`` files under ``root`` (default: the stdlib).

    Sorted by relative posix path.  Symlinked directories are not followed
    (so nothing is reached twice).
    """
    root = _resolve_root(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        # Prune excluded directories early (also keeps the walk fast).
        dirnames[:] = sorted(
            d for d in dirnames if not is_excluded(f"{rel_dir}/{d}" if rel_dir else d)
        )
        for name in filenames:
            if not name.endswith(".py"):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_excluded(rel):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            found.append((rel, path))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def relative_posix(path: Path, root=None) -> str:
    """``path`` relative to ``root`` (default stdlib), as a posix string."""
    return Path(path).relative_to(_resolve_root(root)).as_posix()


def split_of(
    rel_path: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> str:
    """Deterministic split ("train" | "val" | "test") of a relative posix path.

    Uses the first 8 bytes of ``sha256(rel_path)`` as a uniform number in [0, 1):
    ``[0, test)`` -> test, ``[test, test + val)`` -> val, rest -> train.
    """
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError("need 0 <= val_fraction, test_fraction and val + test < 1")
    rel_path = str(rel_path).replace(os.sep, "/")
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_files(
    split: str,
    root=None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> list[tuple[str, Path]]:
    """``(rel_path, path)`` of the files in ``split``, sorted by rel_path."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = _resolve_root(root)
    out = []
    for path in list_source_files(root):
        rel = relative_posix(path, root)
        if split_of(rel, val_fraction, test_fraction) == split:
            out.append((rel, path))
    return out


def _read_utf8(path: Path) -> str | None:
    """File contents decoded as utf-8 exactly (no newline translation), or None."""
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def load_split(
    split: str,
    root=None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    skipped: list | None = None,
) -> list[tuple[str, str]]:
    """``[(rel_path, text), ...]`` for one split, sorted by rel_path.

    Text is the file's bytes decoded as utf-8 verbatim (``\\r\\n`` and BOMs are
    preserved).  Files that are not valid utf-8 (or unreadable) are skipped;
    pass a list as ``skipped`` to collect their relative paths.
    """
    docs = []
    for rel, path in split_files(split, root, val_fraction, test_fraction):
        text = _read_utf8(path)
        if text is None:
            if skipped is not None:
                skipped.append(rel)
            continue
        docs.append((rel, text))
    return docs


def corpus_summary(
    root=None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict:
    """Per-split ``{"files", "bytes", "skipped"}`` plus a ``"total"`` entry.

    ``files``/``bytes`` count only files that decode as utf-8 (those that
    end up in the corpus); ``skipped`` counts the ones that do not.
    """
    summary = {}
    for split in SPLITS:
        skipped: list = []
        docs = load_split(split, root, val_fraction, test_fraction, skipped=skipped)
        summary[split] = {
            "files": len(docs),
            "bytes": sum(len(t.encode("utf-8")) for _, t in docs),
            "skipped": len(skipped),
        }
    summary["total"] = {k: sum(summary[s][k] for s in SPLITS) for k in ("files", "bytes", "skipped")}
    return summary



def split_fingerprint(
    split: str = "train",
    root=None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> str:
    """SHA-256 hex digest of what ``split`` is made of, without reading the files.

    Hashes each file's relative posix path, size and modification time (ns), in
    :func:`split_files` order: a different standard library (another Python, an
    upgrade, an edited file) gives a different digest. Costs one directory walk
    (tens of milliseconds for the stdlib), not a read of the corpus.
    """
    h = hashlib.sha256()
    for rel, path in split_files(split, root, val_fraction, test_fraction):
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()
