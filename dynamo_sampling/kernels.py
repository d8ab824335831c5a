"""Fused CUDA kernels for the DynaMo step, compiled at run time with CuPy (NVRTC).

The CUDA C++ lives in ``csrc/*.cu`` (shipped as ``dynamo_sampling/csrc/*.cu``; an editable
install reads the repository's top-level ``csrc/``). Each file is compiled once per process and
device by ``cupy.RawModule`` and its kernels are launched with raw device pointers
(``tensor.data_ptr()``) on torch's current stream. Design, grid layouts and tolerances:
``csrc/NOTES.md``.

Public functions:

* :func:`cuda_available` -- CuPy importable and a CUDA device visible to torch.
* :func:`resolve_backend` -- ``"auto" | "torch" | "cuda"`` to the backend to run.
* :func:`topk_softmax` -- per (row, head) top-k of the logits with their probabilities under the
  full softmax, in one pass over the vocabulary.
* :func:`cuda_dynamo_step` -- :func:`dynamo_sampling.policy.dynamo_step` (same signature, same
  :class:`~dynamo_sampling.policy.StepOutput`) in two to three kernel launches.
* :func:`compile_options` -- the NVRTC options the kernels end up compiled with (CuPy adds
  ``-ftz=true``: float32 subnormals flush to zero on the GPU); the compile tests use them.

Importing this module never imports CuPy; that happens at the first kernel call.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from . import policy
from .weights import CooccurrenceTables, check_stats
from .policy import DynamoConfig, StepOutput

__all__ = [
    "BACKENDS",
    "cuda_available",
    "cupy_available",
    "resolve_backend",
    "topk_softmax",
    "cuda_dynamo_step",
    "kernel_source",
    "compile_options",
    "csrc_dir",
]

#: Backend names accepted by :func:`resolve_backend`.
BACKENDS = ("auto", "torch", "cuda")

#: Limits of the kernels (outside them :func:`cuda_dynamo_step` runs the torch reference).
KMAX = 64  # longest top-k list (csrc/common.cuh kMaxK)
HMAX = 4  # most heads (csrc/dynamo_step.cu kMaxH)
MAX_BINS = 4096  # Otsu histogram bins (csrc/dynamo_step.cu kMaxBins)
MAX_CELLS = 1 << 24  # k ** H

#: Compile options handed to ``cupy.RawModule``. ``--fmad=false``: no multiply-add contraction, so
#: the arithmetic is the one written (as the emulation's ``-ffp-contract=off``).
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false")
#: What CuPy appends to every NVRTC compile after the caller's options (``_compile_with_cache_cuda``).
#: NVRTC keeps the last ``-ftz``, so the kernels always run with float32 subnormals flushed to zero:
#: a bfloat16 logit below 2**-126 in magnitude reads as a signed zero, a probability or joint cell
#: below it becomes 0 (csrc/NOTES.md "Floating point"). The tests compile with the same flags.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)
SOURCES = ("topk_softmax.cu", "dynamo_step.cu")

# Top-k pass (csrc/NOTES.md "topk_softmax"): besides reading the logits, its cost is the insertions
# into each warp's sorted list (after sorting its first 64 elements, about k * ln(n / 64) for n
# elements in random order), one after another, so the block size trades latency for work. A grid
# that leaves SMs idle (B = 1) is latency-bound: 8 warps a block, fewer elements each. A grid with
# more blocks than SMs is throughput-bound: 4 warps a block fill fewer lists (B = 256, H = 3,
# V = 50304: about 60% of the insertions of 8 warps), each warp still with 2 tiles of 16-byte loads
# in flight.
TOPK_THREADS = 256  # a block of the top-k pass when blocks <= SMs
TOPK_THREADS_BUSY = 128  # when there are more blocks than SMs
STEP_THREADS = 256
# fewer rows than half the SMs (B = 1 decoding): a row's block is alone on its SM, so twice the
# threads share its candidates (the kernel's __launch_bounds__(512) keeps its registers in budget)
STEP_THREADS_FEW_ROWS = 512
# smallest vocabulary slice worth a block of its own: one tile of 16-byte loads (256 bf16) for each warp
MIN_CHUNK = 2048
# most vocabulary slices per row: the merge block holds every slice's list in shared memory
# (csrc/topk_softmax.cu kMaxLists; 32 lists of 64 entries and 16 more to merge in pairs: 24 KB)
MAX_SPLITS = 32
# The step kernel's scratch (the candidate list: cells, J and its blurred copy, room for all k**H
# cells) is per block, and blocks stride over the rows, so the grid is capped twice: by what can be
# resident (more blocks only queue: 2048 threads per SM are 8 blocks of 256) and by a byte budget
# (H=3, k=50 with the blur: 1.5 MB a block, 170 blocks; H=4, k=50: 75 MB a block, 3 blocks). The buffer comes from torch's caching allocator, which hands
# the same memory back on the next call.
STEP_BLOCKS_PER_SM = 8
SCRATCH_BUDGET = 256 << 20  # bytes

_TOPK_KERNELS = {
    torch.float32: "topk_softmax_partial_f32",
    torch.bfloat16: "topk_softmax_partial_bf16",
    torch.float16: "topk_softmax_partial_f16",
}
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$')


# ---------------------------------------------------------------- availability, backends


@functools.cache
def _cupy_import():
    """(cupy module or None, why not)."""
    try:
        import cupy  # noqa: PLC0415  (lazy on purpose)
    except Exception as e:  # ImportError, or a broken CUDA install raising something else
        return None, f"{type(e).__name__}: {e}"
    return cupy, None


def cupy_available() -> bool:
    """Whether CuPy can be imported (imports it on the first call)."""
    return _cupy_import()[0] is not None


def cuda_available() -> bool:
    """Whether the fused kernels can run here: CuPy importable and ``torch.cuda.is_available()``."""
    return cupy_available() and torch.cuda.is_available()


def resolve_backend(backend: str, tensor) -> str:
    """The backend that runs the step for ``tensor`` (a tensor, or a ``torch.device``).

    ``"auto"`` picks ``"cuda"`` for CUDA tensors when CuPy is importable, ``"torch"`` otherwise;
    ``"torch"`` is always ``"torch"``; ``"cuda"`` is ``"cuda"`` or a ``ValueError`` saying why it
    cannot run (a CPU tensor, CuPy missing). Unknown names raise ``ValueError`` listing the choices.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(repr(b) for b in BACKENDS)}")
    if backend == "torch":
        return "torch"
    device = tensor if isinstance(tensor, torch.device) else tensor.device
    if backend == "auto":
        return "cuda" if device.type == "cuda" and cupy_available() else "torch"
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' runs fused CUDA kernels and needs CUDA tensors, got a tensor on "
                         f"'{device}'; use backend='torch' or 'auto'")
    cupy, why = _cupy_import()
    if cupy is None:
        raise ValueError(f"backend='cuda' compiles its kernels with CuPy, which cannot be imported ({why}); "
                         f"install the CuPy wheel matching your CUDA (e.g. cupy-cuda13x) or use backend='torch'")
    return "cuda"


def _require_cuda(tensor: torch.Tensor, what: str):
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
        where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{what} needs a CUDA tensor, got {where}")
    resolve_backend("cuda", tensor)  # raises when CuPy is missing


# ---------------------------------------------------------------- sources


def csrc_dir(sources=SOURCES) -> Path:
    """Folder of the ``sources`` (default: the ``.cu`` files): the installed package data, else the
    repository's ``csrc/`` (also used by :mod:`.cpu_policy` for its C file)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / s).is_file() for s in sources):
            return cand
    raise FileNotFoundError(f"sources {tuple(sources)} not found in {here / 'csrc'} (installed package data) "
                            f"nor in {here.parent / 'csrc'} (repository checkout)")


def _line_directive(line: int, path: Path) -> str:
    name = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'#line {line} "{name}"\n'


def _expand(path: Path, seen: set) -> str:
    out = [_line_directive(1, path)]
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = _INCLUDE.match(line)
        if m is None:
            out.append(line + "\n")
            continue
        inc = (path.parent / m.group(1)).resolve()
        if not inc.is_file():
            raise FileNotFoundError(f"{path}:{lineno}: included file {m.group(1)!r} not found")
        if inc not in seen:  # the headers have include guards; pasting each once is enough
            seen.add(inc)
            out.append(_expand(inc, seen))
        out.append(_line_directive(lineno + 1, path))
    return "".join(out)


def kernel_source(name: str) -> str:
    """Self-contained text of ``csrc/<name>`` for NVRTC: local ``#include "..."`` files pasted in,
    each piece preceded by a ``#line`` directive naming the real file (compiler errors point there)."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; expected one of {SOURCES}")
    path = (csrc_dir() / name).resolve()
    return _expand(path, {path})


# ---------------------------------------------------------------- launching


def compile_options() -> Tuple[str, ...]:
    """The NVRTC options the kernels are compiled with on the GPU: :data:`NVRTC_OPTIONS` followed by
    what CuPy appends (:data:`CUPY_APPENDED_OPTIONS`). The compile tests use exactly these."""
    return NVRTC_OPTIONS + CUPY_APPENDED_OPTIONS


@functools.cache
def _cupy_module(source: str, device_index: int):
    cupy = _cupy_import()[0]
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=kernel_source(source), options=NVRTC_OPTIONS)


@functools.cache
def _cupy_function(source: str, name: str, device_index: int):
    cupy = _cupy_import()[0]
    with cupy.cuda.Device(device_index):
        return _cupy_module(source, device_index).get_function(name)


@functools.cache
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


_STREAMS = {}


def _external_stream(device_index: int, ptr: int):
    key = (device_index, ptr)
    s = _STREAMS.get(key)
    if s is None:
        cupy = _cupy_import()[0]
        try:
            s = cupy.cuda.ExternalStream(ptr, device_id=device_index)
        except TypeError:  # older CuPy without device_id
            s = cupy.cuda.ExternalStream(ptr)
        _STREAMS[key] = s
    return s


class _CupyLauncher:
    """Launches ``extern "C"`` kernels of a source file on torch's current stream."""

    max_threads = 1024

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.num_sms = _num_sms(self.index)

    def launch(self, source: str, name: str, grid: Tuple[int, int, int], block: Tuple[int, int, int], args):
        cupy = _cupy_import()[0]
        fn = _cupy_function(source, name, self.index)
        with cupy.cuda.Device(self.index):
            with _external_stream(self.index, torch.cuda.current_stream(self.index).cuda_stream):
                fn(grid, block, tuple(args))


def _ptr(t: Optional[torch.Tensor]) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _carve(device, parts):
    """One byte buffer cut into typed views; parts: [(numel, dtype)] -> (buffer, [tensors])."""
    offs, total = [], 0
    for numel, dtype in parts:
        offs.append(total)
        total += -(-numel * dtype.itemsize // 256) * 256
    buf = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
    views = [buf[o:o + numel * dt.itemsize].view(dt) for o, (numel, dt) in zip(offs, parts)]
    return buf, views


def _num_splits(rows: int, V: int, num_sms: int) -> Tuple[int, int]:
    """(splits, chunk) of the vocabulary: enough blocks to fill the GPU about twice."""
    target = 2 * num_sms
    S = 1
    if rows < target:
        S = min(-(-target // rows), max(1, V // MIN_CHUNK), MAX_SPLITS)
    chunk = -(-V // S)
    S = -(-V // chunk)  # no empty slice
    return S, chunk


def _draw_seeds(generator: Optional[torch.Generator], device: torch.device):
    """(seed tensor on ``device`` or None, seed, offset): one ``torch.randint`` call on the caller's
    generator, no host sync (a CPU generator's values are read on the host)."""
    gdev = generator.device if generator is not None else device
    s = torch.randint(0, 2 ** 62, (2,), generator=generator, device=gdev, dtype=torch.int64)
    if s.device == device:
        return s, 0, 0
    if s.device.type == "cpu":
        seed, offset = s.tolist()
        return None, int(seed), int(offset)
    return s.to(device), 0, 0


def _topk_lists(logits: torch.Tensor, k: int, temperature: float, launcher, *, want_vals: bool = False,
                gumbel: bool = False, seeds=(None, 0, 0), out=None):
    """(probs (B,H,k) f32, ids (B,H,k) i64, vals (B,H,k) f32 or None, sample (B,) i64 or None)."""
    B, H, V = logits.shape
    dev = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is not None:
        probs, ids = out[0], out[1]
        vals = out[2] if want_vals else None
        sample = out[3] if gumbel else None
    else:
        probs = torch.empty((B, H, k), dtype=torch.float32, device=dev)
        ids = torch.empty((B, H, k), dtype=torch.int64, device=dev)
        vals = torch.empty((B, H, k), dtype=torch.float32, device=dev) if want_vals else None
        sample = torch.empty((B,), dtype=torch.int64, device=dev) if gumbel else None
    R = B * H
    if R == 0:
        return probs, ids, vals, sample
    S, chunk = _num_splits(R, V, launcher.num_sms)
    threads = min(TOPK_THREADS if R * S <= launcher.num_sms else TOPK_THREADS_BUSY, launcher.max_threads)
    seed_t, seed_arg, offset_arg = seeds
    parts = [None] * 6
    if S > 1:
        _buf, parts = _carve(dev, [(R * S, torch.float64), (R * S, torch.float64), (R * S * k, torch.float32),
                                   (R * S, torch.float32), (R * S * k, torch.int32), (R * S, torch.int32)])
    part_sum, part_gscore, part_val, part_max, part_idx, part_gidx = parts
    finals = [_ptr(probs), _ptr(ids), _ptr(vals), _ptr(sample)]
    launcher.launch("topk_softmax.cu", _TOPK_KERNELS[logits.dtype], (R, S, 1), (threads, 1, 1), [
        _ptr(logits), np.int64(logits.stride(0)), np.int64(logits.stride(1)), np.int32(H), np.int32(V),
        np.int32(k), np.int32(chunk), np.float32(temperature), np.int32(int(gumbel)), _ptr(seed_t),
        np.int64(seed_arg), np.int64(offset_arg),
        _ptr(part_val), _ptr(part_idx), _ptr(part_max), _ptr(part_sum), _ptr(part_gscore), _ptr(part_gidx),
        *finals])
    if S > 1:
        mthreads = min(32 * S, launcher.max_threads)  # >= S (one thread per slice); <= 2 entries a thread
        launcher.launch("topk_softmax.cu", "topk_softmax_merge", (R, 1, 1), (mthreads, 1, 1), [
            np.int32(H), np.int32(S), np.int32(k), np.int32(int(gumbel)),
            _ptr(part_val), _ptr(part_idx), _ptr(part_max), _ptr(part_sum), _ptr(part_gscore), _ptr(part_gidx),
            *finals])
    return probs, ids, vals, sample


def _check_topk_args(logits, k):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a (B, H, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _TOPK_KERNELS:
        raise ValueError(f"logits dtype must be one of {list(_TOPK_KERNELS)}, got {logits.dtype}")
    V = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(KMAX, V):
        raise ValueError(f"k must be an int in 1..min({KMAX}, V={V}), got {k!r}")


def _check_out(out, shape, dtypes, device):
    if not isinstance(out, (tuple, list)) or len(out) != len(dtypes):
        raise ValueError(f"out must be a tuple of {len(dtypes)} tensors, got {type(out).__name__}")
    for t, dt in zip(out, dtypes):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt or t.device != device \
                or not t.is_contiguous():
            raise ValueError(f"out tensors must be contiguous {dtypes} of shape {shape} on {device}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))} on "
                             f"{getattr(t, 'device', None)}")


def topk_softmax(logits: torch.Tensor, k: int, temperature: float = 1.0, *, out=None):
    """Top-``k`` of ``logits / temperature`` per (row, head), with probabilities under the full softmax.

    Parameters
    ----------
    logits : CUDA tensor (B, H, V), float32 / bfloat16 / float16; the last dim contiguous (else copied).
    k : int, 1 <= k <= min(64, V).
    temperature : float; the logits are divided by it (IEEE division) before everything else.
    out : optional (probs, ids) to write into, shapes (B, H, k), float32 / int64, on the same device.

    Returns
    -------
    probs : float32 (B, H, k), ``softmax(logits / temperature)`` at the top-k, descending.
    ids : int64 (B, H, k). Ties are broken by the lower index (``torch.topk`` leaves them unspecified).
        A row that is entirely ``-inf`` gives probabilities 0 (torch: NaN). NaN logits count as
        ``-inf`` (torch's softmax would make the whole row NaN), so every id is a real token.
        Float32 subnormals are flushed to zero (:data:`CUPY_APPENDED_OPTIONS`).
    """
    _require_cuda(logits, "topk_softmax")
    _check_topk_args(logits, k)
    k = int(k)
    if out is not None:
        _check_out(out, (*logits.shape[:2], k), (torch.float32, torch.int64), logits.device)
        out = (out[0], out[1], None, None)
    probs, ids, _, _ = _topk_lists(logits, k, float(temperature), _CupyLauncher(logits.device), out=out)
    return probs, ids


# ---------------------------------------------------------------- co-occurrence tables on the device

def _stats_tables(stats: CooccurrenceTables, device: torch.device) -> dict:
    """The kernels' view of the statistics' own device cache (:meth:`CooccurrenceTables.device_tables`):
    ``V``, ``uni`` int64 (V,), ``total`` {n: float T_n} for ``n = 1..HMAX`` (0 past max_order) and the
    sorted ``keys`` / ``counts`` int64 (K_n,) for ``n = 2..min(max_order, HMAX)``, and ``starts`` int64
    (V + 1,): the keys of n-grams that start with token x are ``keys[starts[x]:starts[x + 1]]`` (built
    once per statistics object and device, kept in the device tables' dict)."""
    tabs = stats.device_tables(device)
    totals = stats.totals
    V = int(stats.vocab_size)
    orders = range(2, min(int(stats.max_order), HMAX) + 1)
    starts = tabs.setdefault("kernel_starts", {})
    for n in orders:
        if n not in starts:
            firsts = torch.arange(V + 1, device=tabs["keys"][n].device, dtype=torch.int64) * V ** (n - 1)
            starts[n] = torch.searchsorted(tabs["keys"][n], firsts)
    return {"V": V, "uni": tabs["uni"], "total": {n: float(totals.get(n, 0)) for n in range(1, HMAX + 1)},
            "keys": {n: tabs["keys"][n] for n in orders}, "counts": {n: tabs["counts"][n] for n in orders},
            "starts": {n: starts[n] for n in orders}}


# ---------------------------------------------------------------- the step


def _unsupported(head_logits, cfg, stats, do_sample, top_k, first_tokens) -> Optional[str]:
    """Why the kernels cannot run this call (then the torch reference does), or None."""
    if not isinstance(head_logits, torch.Tensor) or head_logits.dim() != 3:
        return "head_logits is not a (B, H, V) tensor"
    B, H, V = head_logits.shape
    if head_logits.dtype not in _TOPK_KERNELS:
        return f"logits dtype {head_logits.dtype}"
    if B == 0 or H == 0 or V == 0:
        return "empty input"
    if V >= 2 ** 31 - 1:
        return f"vocabulary of {V} tokens"
    if H > HMAX:
        return f"{H} heads (the kernels handle up to {HMAX})"
    k = min(cfg.k, V)
    if not 1 <= k <= KMAX:
        return f"k={cfg.k} (the kernels handle 1..{KMAX})"
    if H >= 2 and k ** H > MAX_CELLS:
        return f"k**H = {k ** H} joint cells"
    if cfg.adaptive_threshold and not 1 <= cfg.otsu_bins <= MAX_BINS:
        return f"otsu_bins={cfg.otsu_bins} (the kernels handle up to {MAX_BINS})"
    if cfg.adaptive_threshold and cfg.blur and not cfg.blur_sigma > 0:
        return f"blur_sigma={cfg.blur_sigma}"
    if stats is not None and cfg.alpha_c > 0 and not isinstance(stats, CooccurrenceTables):
        return f"statistics of type {type(stats).__name__} without sorted key tables"
    if do_sample and first_tokens is None and top_k is not None and top_k < V and not 1 <= top_k <= KMAX:
        return f"top_k={top_k} (the kernels sample n = 1 from lists of at most {KMAX})"
    return None


def _step_blocks(B: int, scratch_floats_per_block: int, num_sms: int) -> int:
    """Blocks of the step kernel (each strides over rows ``b, b + blocks, ...``): at most one per row,
    :data:`STEP_BLOCKS_PER_SM` per SM and :data:`SCRATCH_BUDGET` bytes of float32 scratch in all."""
    by_budget = SCRATCH_BUDGET // (4 * scratch_floats_per_block)
    return max(1, min(B, STEP_BLOCKS_PER_SM * max(1, num_sms), by_budget, 65535))


_WARNED = set()


def _dynamo_step_impl(head_logits: torch.Tensor, cfg: DynamoConfig, launcher, *, stats=None, do_sample=False,
                      temperature=1.0, top_k=None, generator=None, seen_tokens=None, first_tokens=None,
                      max_tokens=None, validate=True, _out=None) -> StepOutput:
    """:func:`cuda_dynamo_step` with an explicit launcher (tests run it on a CPU emulation)."""
    reason = _unsupported(head_logits, cfg, stats, do_sample, top_k, first_tokens)
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"cuda_dynamo_step: {reason}; running the torch reference instead", RuntimeWarning,
                          stacklevel=3)
        return policy.dynamo_step(head_logits, cfg, stats=stats, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, generator=generator, seen_tokens=seen_tokens,
                                  first_tokens=first_tokens, max_tokens=max_tokens, validate=validate)
    B, H, V = head_logits.shape
    dev = head_logits.device
    k = min(cfg.k, V)
    use_stats = stats is not None and cfg.alpha_c > 0
    if use_stats and validate:
        check_stats(stats, V, H)
    list_sampler = do_sample and first_tokens is None and top_k is not None and top_k < V
    gumbel = do_sample and first_tokens is None and not list_sampler
    KL = max(k, int(top_k)) if list_sampler else k
    seeds = _draw_seeds(generator, dev) if do_sample else (None, 0, 0)

    o = _out or {}
    lists_out = None
    if "probs" in o:
        lists_out = (o["probs"], o["ids"], o.get("vals"), o.get("sample"))
    probs, ids, vals, sample_full = _topk_lists(head_logits, KL, float(temperature) if do_sample else 1.0,
                                                launcher, want_vals=list_sampler, gumbel=gumbel, seeds=seeds,
                                                out=lists_out)

    tokens = o.get("tokens")
    if tokens is None:
        tokens = torch.empty((B, H), dtype=torch.int64, device=dev)
    n_out = o.get("n")
    if n_out is None:
        n_out = torch.empty((B,), dtype=torch.int64, device=dev)
    draft = None
    if first_tokens is not None:
        draft = o.get("draft")
        if draft is None:
            draft = torch.empty((B, H, k), dtype=torch.float32, device=dev)

    # statistics
    st = {"V": 0, "uni": None, "total": {n: 0.0 for n in range(1, HMAX + 1)}, "keys": {}, "counts": {}, "starts": {}}
    if use_stats:
        st = _stats_tables(stats, dev)
    table_args = []
    for n in range(2, HMAX + 1):
        keys, counts, starts = st["keys"].get(n), st["counts"].get(n), st["starts"].get(n)
        table_args += [_ptr(keys), _ptr(counts), _ptr(starts), np.int64(0 if keys is None else keys.numel())]

    # repetition penalty, speculative mode, caps
    use_penalty = seen_tokens is not None and cfg.repetition_penalty != 1.0
    seen = None
    if use_penalty:
        seen = seen_tokens.to(device=dev, dtype=torch.bool)
        if seen.stride(-1) != 1:
            seen = seen.contiguous()
    first = first_tokens.to(device=dev, dtype=torch.int64).contiguous() if first_tokens is not None else None
    caps = max_tokens.to(device=dev, dtype=torch.int64).contiguous() if max_tokens is not None else None

    # thresholds: the reference's float64 constants, rounded to float32 where torch rounds them
    taus = [np.float32(cfg.eps_b ** (n - 1)) for n in range(2, HMAX + 1)]
    blur = bool(cfg.adaptive_threshold and cfg.blur)
    side = math.exp(-1.0 / (2 * cfg.blur_sigma * cfg.blur_sigma)) if blur else 0.0
    tap_side, tap_center = side / (1 + 2 * side), 1.0 / (1 + 2 * side)

    # scratch: the candidate list (cells, J, + the blurred J) per block; blocks loop over rows beyond the cap
    per_block = (3 if blur else 2) * k ** H
    blocks = _step_blocks(B, per_block, launcher.num_sms)
    scratch = torch.empty((blocks * per_block,), dtype=torch.float32, device=dev)

    seed_t, seed_arg, offset_arg = seeds
    threads = STEP_THREADS_FEW_ROWS if blocks * 2 <= launcher.num_sms else STEP_THREADS
    launcher.launch("dynamo_step.cu", "dynamo_step_kernel", (blocks, 1, 1),
                    (min(threads, launcher.max_threads), 1, 1), [
        np.int32(B), np.int32(H), np.int32(k), np.int32(KL), _ptr(probs), _ptr(ids), _ptr(vals), _ptr(sample_full),
        np.int32(int(use_stats)), np.float64(cfg.alpha_c), np.int64(st["V"]), *table_args,
        *[np.float64(st["total"][n]) for n in range(1, HMAX + 1)], _ptr(st["uni"]),
        *taus, np.int32(int(bool(cfg.adaptive_threshold))), np.int32(int(blur)), np.float64(tap_side),
        np.float64(tap_center), np.int32(cfg.otsu_bins),
        _ptr(seen), np.int64(seen.stride(0) if seen is not None else 0), np.int32(int(use_penalty)),
        np.float32(1.0 / cfg.repetition_penalty if use_penalty else 1.0),
        _ptr(first), _ptr(caps),
        np.int32(int(bool(do_sample))), np.int32(int(top_k) if list_sampler else 0), _ptr(seed_t),
        np.int64(seed_arg), np.int64(offset_arg),
        _ptr(scratch), np.int64(per_block), _ptr(tokens), _ptr(n_out), _ptr(draft)])
    topk_ids = ids if KL == k else ids[..., :k].contiguous()
    return StepOutput(tokens, n_out, topk_ids, draft)


def cuda_dynamo_step(head_logits: torch.Tensor, cfg: DynamoConfig, *, stats=None, do_sample: bool = False,
                     temperature: float = 1.0, top_k: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, seen_tokens: Optional[torch.Tensor] = None,
                     first_tokens: Optional[torch.Tensor] = None,
                     max_tokens: Optional[torch.Tensor] = None, validate: bool = True) -> StepOutput:
    """:func:`dynamo_sampling.policy.dynamo_step` with the fused CUDA kernels.

    Same arguments, same :class:`~dynamo_sampling.policy.StepOutput`; ``head_logits`` must be a
    CUDA tensor (float32, bfloat16 or float16). One ``torch.randint`` call on ``generator`` seeds
    every draw of the step (Philox4x32-10 on the device), so results are reproducible for a seeded
    generator but not draw-for-draw equal to the torch reference's. Differences from the reference
    (csrc/NOTES.md): ties in the top-k lists go to the lower token id; NaN logits count as ``-inf``
    (the reference gives NaN probabilities, and ``sample`` rejects NaN logits before any step);
    float32 subnormals are flushed to zero; statistics must satisfy
    :func:`~dynamo_sampling.weights.check_stats` (same vocabulary, ``max_order >= H``; checked unless
    ``validate=False``, as the decoding loop passes after ``sample`` checked them once).
    Configurations outside the kernels' limits (k > 64, H > 4, top_k > 64 for the n = 1 sampler, more
    than 4096 Otsu bins, statistics that are not a ``CooccurrenceTables``, other dtypes) run the torch reference, with a
    one-time ``RuntimeWarning``.
    """
    _require_cuda(head_logits, "cuda_dynamo_step")
    return _dynamo_step_impl(head_logits, cfg, _CupyLauncher(head_logits.device), stats=stats,
                             do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator,
                             seen_tokens=seen_tokens, first_tokens=first_tokens, max_tokens=max_tokens,
                             validate=validate)
