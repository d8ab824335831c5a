"""The DynaMo step policy's fast path on a CPU: ``csrc/dynamo_policy_cpu.c`` through ctypes.

:func:`~dynamo_sampling.policy.dynamo_step` computes the heads' top-k lists in torch (two
vectorised ops) and, for CPU tensors, hands everything after them (the cells over the static
threshold, the statistics' weights, blur, Otsu, repetition penalty, the choice and the draft
conditionals) to one C call here instead of ~130 small torch ops of a few microseconds each. The
torch code stays the reference (``DynamoConfig(impl="torch")``); the tests compare the two.

The shared library is compiled once per machine with the system C compiler (``$CC``, else ``cc``
or ``gcc``; ~0.3 s) into ``~/.cache/dynamo_sampling/c/`` (``$DYNAMO_SAMPLING_CACHE`` overrides the
folder), keyed by the source, the flags and the compiler, and loaded once per process. Without a
compiler :func:`available` is False and ``impl="auto"`` stays in torch.

Sampled steps draw from a counter-based hash seeded by one ``torch.randint`` on the caller's
generator per call: the same distribution as the torch path, not the same random stream.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "build_error", "run"]

SOURCE = "dynamo_policy_cpu.c"
# -ffp-contract=off: no fused multiply-add, so float32 products round as torch's do
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off"]


def _source() -> Path:
    from .kernels import csrc_dir  # the CUDA glue's lookup of csrc/ (installed package data or checkout)
    return csrc_dir((SOURCE,)) / SOURCE


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=1)
def _load():
    """(the ctypes library, None) or (None, why not)."""
    if os.environ.get("DYNAMO_SAMPLING_NO_C"):
        return None, "disabled by DYNAMO_SAMPLING_NO_C"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        src = _source()
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        tag = hashlib.sha256(src.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("DYNAMO_SAMPLING_CACHE") or Path.home() / ".cache" / "dynamo_sampling") / "c"
        lib = cache / f"dynamo_policy_{tag}.so"
        if not lib.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(src), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                os.unlink(tmp)
                return None, f"{cc} failed on {src}:\n{done.stderr.strip()}"
            os.replace(tmp, lib)  # atomic: parallel processes never load a half-written file
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building or loading {SOURCE} failed: {e}"
    fn = so.dynamo_policy
    i64, ptr, cint, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    fn.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint, ptr, ptr, ptr, ptr, ptr, ptr, dbl,
                   cint, cint, dbl, cint, cint, ctypes.c_uint64, ptr, ptr, ptr]
    fn.restype = cint
    return so, None


def available() -> bool:
    """Whether the C policy compiled and loaded on this machine."""
    return _load()[0] is not None


def build_error() -> Optional[str]:
    """Why the C policy is unavailable (None when it is available)."""
    return _load()[1]


def supports(stats) -> bool:
    """Whether the C path can read these statistics (None, or tables with ``device_tables`` and ``totals``)."""
    return stats is None or (hasattr(stats, "device_tables") and hasattr(stats, "totals"))


_TABLES: dict = {}  # id(host tables) -> (tables, ctypes arrays): the pointers of one statistics object


def _tables(stats):
    tabs = stats.device_tables(torch.device("cpu"))
    hit = _TABLES.get(id(tabs))
    if hit is not None and hit[0] is tabs:
        return hit[1]
    N, V = stats.max_order + 1, stats.vocab_size
    keys, counts, starts = (ctypes.c_void_p * N)(), (ctypes.c_void_p * N)(), (ctypes.c_void_p * N)()
    nkeys, totals = (ctypes.c_int64 * N)(), (ctypes.c_double * N)()
    index = []  # per order: where the keys of each first token start (V + 1,), so no search over the whole table
    for n, t in tabs["keys"].items():
        keys[n], counts[n], nkeys[n] = t.data_ptr(), tabs["counts"][n].data_ptr(), t.numel()
        first = torch.searchsorted(t, torch.arange(V, dtype=torch.int64) * V ** (n - 1))
        index.append(torch.cat([first, torch.tensor([t.numel()])]).contiguous())
        starts[n] = index[-1].data_ptr()
    for n, T in stats.totals.items():
        totals[n] = float(T)
    arrays = (keys, counts, nkeys, starts, totals, tabs["p1"].data_ptr(), index)
    if len(_TABLES) >= 8:
        _TABLES.clear()
    _TABLES[id(tabs)] = (tabs, arrays)
    return arrays


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def run(p, ids, penal, first_idx, active, max_tokens, cfg, stats, do_sample: bool, generator, tokens, n_out,
        draft) -> None:
    """The orders H..2 of :func:`~dynamo_sampling.policy.dynamo_step` for CPU tensors, in place:
    writes ``tokens`` (B, H), ``n_out`` (B,) and ``draft`` (B, H, k) of the rows that emit an n-gram.
    p (B, H, k) float32, ids (B, H, k) int64, penal (B, H, k) float32 or None, first_idx (B,) or None,
    active (B,) bool, max_tokens (B,) or None; stats: tables (:func:`supports`) or None."""
    so, why = _load()
    if so is None:
        raise RuntimeError(f"the C policy is unavailable: {why}")
    B, H, k = p.shape
    V = stats.vocab_size if stats is not None else 0
    p, ids = p.contiguous(), ids.contiguous()
    penal = None if penal is None else penal.float().contiguous()
    first_idx = None if first_idx is None else first_idx.long().contiguous()
    max_tokens = None if max_tokens is None else max_tokens.long().contiguous()
    act = active.to(torch.uint8).contiguous()
    tau = (ctypes.c_double * (H + 1))(*[cfg.eps_b ** (n - 1) if n else 1.0 for n in range(H + 1)])
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator)) if do_sample else 0
    if stats is not None:
        keys, counts, nkeys, starts, totals, p1, _ = _tables(stats)
    else:
        keys = counts = nkeys = starts = totals = p1 = None
    rc = so.dynamo_policy(B, H, k, V, p.data_ptr(), ids.data_ptr(), _ptr(penal), _ptr(first_idx), _ptr(max_tokens),
                          act.data_ptr(), tau, int(stats is not None), keys, counts, nkeys, starts, p1, totals,
                          float(cfg.alpha_c), int(cfg.adaptive_threshold), int(cfg.blur), float(cfg.blur_sigma),
                          int(cfg.otsu_bins), int(do_sample), seed, tokens.data_ptr(), n_out.data_ptr(),
                          _ptr(draft))
    if rc != 0:
        raise MemoryError(f"the C policy ran out of memory (B={B}, H={H}, k={k})") if rc == -1 else \
            ValueError(f"the C policy supports at most 16 heads, got H={H}")
