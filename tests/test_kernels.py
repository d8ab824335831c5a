"""Fused CUDA kernels (csrc/*.cu, dynamo_sampling/kernels.py).

Three layers of checks:

* always (no GPU needed): every ``csrc/*.cu`` compiles with ``nvcc -arch=sm_90`` without warnings,
  the loader's self-contained NVRTC text compiles too, backend resolution, importing without
  CuPy, the package-data build step;
* CPU emulation (needs g++): the real ``.cu`` files compiled as C++ on top of
  ``tests/kernel_emu/cuda_host_emu.h`` (each CUDA thread a fiber, barriers and warp shuffles
  emulated) and driven through the same Python glue as on the GPU, against the torch reference;
* GPU (skipped unless :func:`dynamo_sampling.kernels.cuda_available`): the same comparisons at
  realistic sizes through CuPy/NVRTC.

Every compile here uses the GPU's flags (``kernels.compile_options()``: CuPy appends ``-ftz=true``),
and the emulation flushes float32 subnormals the same way (``EmuLauncher(ftz=True)``).

Tolerances (csrc/NOTES.md): top-k values and ids are exact (ties: lower index first);
probabilities within rtol 2e-5; greedy decisions equal to the reference's run with the same tie
order (:func:`_reference_step`) except rows whose reference decision itself flips under a 1e-5
perturbation of the logits (a rounding boundary); sampled outcomes pass a chi-square test at
p > 1e-6 against the exact target or the reference's draws.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamo_sampling import kernels, policy
from dynamo_sampling.cooccurrence import CooccurrenceStats
from dynamo_sampling.policy import DynamoConfig
from toy_models import ragged_prompts

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
EMU_DIR = Path(__file__).resolve().parent / "kernel_emu"


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


# ====================================================================== compile (no GPU)


def test_csrc_has_the_kernels():
    assert {p.name for p in CU_FILES} >= set(kernels.SOURCES)


def test_compile_options_are_cupys():
    """What the GPU compiles with: ours, then CuPy's forced -ftz=true (NVRTC keeps the last -ftz)."""
    opts = kernels.compile_options()
    assert opts[:len(kernels.NVRTC_OPTIONS)] == kernels.NVRTC_OPTIONS
    assert [o for o in opts if o.startswith("-ftz")][-1] == "-ftz=true"
    assert "--fmad=false" in opts  # the emulation compiles with -ffp-contract=off


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90_without_warnings(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH nor /usr/local/cuda/bin/nvcc)")
    cmd = [nvcc, *kernels.compile_options(), "-arch=sm_90", "-c", "-o", str(tmp_path / (cu.stem + ".o")), str(cu),
           "--Werror", "all-warnings"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


@pytest.mark.parametrize("name", kernels.SOURCES)
def test_loader_text_is_self_contained_and_compiles(name, tmp_path):
    """What NVRTC gets: no #include left, #line directives naming the real files, compiles alone."""
    src = kernels.kernel_source(name)
    real = (CSRC / name).resolve()
    assert src.startswith(f'#line 1 "{real}"\n')
    assert not [line for line in src.splitlines() if line.lstrip().startswith("#") and "include" in line]
    assert f'#line 1 "{(CSRC / "common.cuh").resolve()}"' in src
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    f = tmp_path / "nvrtc_text.cu"
    f.write_text(src)
    r = subprocess.run([nvcc, *kernels.compile_options(), "-arch=sm_90", "-ptx", "-o", str(tmp_path / "x.ptx"),
                        str(f), "--Werror", "all-warnings"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # the #line directives point compiler messages at the real file
    bad = src.replace("return r;\n}\n\nstruct OpSum", "return r;\n}\n\nstruct OpSum syntax error here", 1)
    assert bad != src
    f.write_text(bad)
    r = subprocess.run([nvcc, *kernels.compile_options(), "-arch=sm_90", "-ptx", "-o", str(tmp_path / "y.ptx"),
                        str(f)], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "common.cuh" in r.stderr, r.stderr


def _nvrtc_library():
    """Path of libnvrtc for compile-only checks (no GPU needed), or None: ``$NVRTC_LIBRARY``, the
    nvidia-cuda-nvrtc wheel that torch and CuPy use (``site-packages/nvidia/cu13/lib``), the loader's path."""
    cands = [Path(os.environ["NVRTC_LIBRARY"])] if os.environ.get("NVRTC_LIBRARY") else []
    for base in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            cands += sorted((Path(base or ".") / sub).glob("libnvrtc.so.*"))
    files = [str(c) for c in cands if c.is_file()]
    return files[0] if files else ctypes.util.find_library("nvrtc")  # a soname the loader resolves


# Runs in a child process: the builtins library is loaded globally (libnvrtc opens it by name, which
# fails when its folder is not on the loader's path), and that must not leak into the test process,
# where CuPy may load another NVRTC.
_NVRTC_CHILD = r"""
import ctypes, json, sys
from pathlib import Path
path, options = sys.argv[1], json.loads(sys.argv[2])
for b in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
    if ".alt." not in b.name:
        ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(path)
src = sys.stdin.read().encode()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
rc = lib.nvrtcCompileProgram(prog, len(options), opts)
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
ptx = b""
if rc == 0:
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, buf)
    ptx = buf.value
lib.nvrtcDestroyProgram(ctypes.byref(prog))
print(json.dumps({"rc": rc, "log": log.value.decode(errors="replace"), "ptx": ptx.decode(errors="replace")}))
"""


def _nvrtc_compile(lib_path: str, src: str, options) -> dict:
    """{"rc", "log", "ptx"} of NVRTC on ``src`` (in a child process)."""
    r = subprocess.run([sys.executable, "-c", _NVRTC_CHILD, lib_path, json.dumps(list(options))], input=src,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", kernels.SOURCES)
def test_nvrtc_compiles_the_loader_text_with_the_gpu_options(name):
    """The compiler CuPy calls, with the options it ends up with: no warning, and the float32
    arithmetic really flushes subnormals (the documented difference from torch)."""
    lib = _nvrtc_library()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set NVRTC_LIBRARY)")
    r = _nvrtc_compile(lib, kernels.kernel_source(name), [*kernels.compile_options(), "-arch=compute_90"])
    assert r["rc"] == 0, r["log"]
    assert "warning" not in r["log"].lower(), r["log"]
    f32 = [ln.split()[0] for ln in r["ptx"].splitlines()
           if re.match(r"\s*(mul|add|sub|div|max|min|setp)\.[\w.]*f32\s", ln)]
    assert f32 and all(".ftz." in op for op in f32), sorted(set(f32))


def test_line_directive_escapes_the_path():
    assert kernels._line_directive(7, Path('/a b/c"d\\e.cu')) == '#line 7 "/a b/c\\"d\\\\e.cu"\n'


def test_kernel_source_rejects_unknown_names():
    with pytest.raises(ValueError, match="topk_softmax.cu"):
        kernels.kernel_source("nope.cu")


def test_csrc_dir_prefers_installed_package_data(tmp_path, monkeypatch):
    assert kernels.csrc_dir() == CSRC  # repository checkout / editable install
    pkg = tmp_path / "site" / "dynamo_sampling"
    (pkg / "csrc").mkdir(parents=True)
    for f in CSRC.glob("*.cu*"):
        shutil.copy(f, pkg / "csrc" / f.name)
    monkeypatch.setattr(kernels, "__file__", str(pkg / "kernels.py"))
    assert kernels.csrc_dir() == (pkg / "csrc").resolve()
    src = kernels.kernel_source("dynamo_step.cu")
    assert src.startswith(f'#line 1 "{(pkg / "csrc" / "dynamo_step.cu").resolve()}"')
    monkeypatch.setattr(kernels, "__file__", str(tmp_path / "empty" / "dynamo_sampling" / "kernels.py"))
    with pytest.raises(FileNotFoundError, match="sources .* not found"):
        kernels.csrc_dir()


def test_build_py_ships_the_cuda_and_c_sources(tmp_path):
    out = tmp_path / "build"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    shipped = out / "dynamo_sampling" / "csrc"
    sources = list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cuh")) + list(CSRC.glob("*.c"))
    assert "dynamo_policy_cpu.c" in [f.name for f in sources]
    for f in sources:
        assert (shipped / f.name).read_bytes() == f.read_bytes()


# ====================================================================== backends, import


def test_resolve_backend_names_and_messages(monkeypatch):
    cpu = torch.zeros(1)
    assert kernels.resolve_backend("torch", cpu) == "torch"
    assert kernels.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match=r"unknown backend 'triton'; choose one of 'auto', 'torch', 'cuda'"):
        kernels.resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="choose one of"):
        kernels.resolve_backend(None, cpu)
    with pytest.raises(ValueError, match=r"backend='cuda' .*needs CUDA tensors, got a tensor on 'cpu'"):
        kernels.resolve_backend("cuda", cpu)
    cuda = torch.device("cuda")  # a device object needs no GPU
    monkeypatch.setattr(kernels, "_cupy_import", lambda: (None, "ModuleNotFoundError: No module named 'cupy'"))
    assert kernels.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(ValueError, match=r"CuPy, which cannot be imported \(ModuleNotFoundError: No module named"):
        kernels.resolve_backend("cuda", cuda)
    assert not kernels.cuda_available()
    monkeypatch.setattr(kernels, "_cupy_import", lambda: (object(), None))
    assert kernels.resolve_backend("auto", cuda) == "cuda"
    assert kernels.resolve_backend("cuda", cuda) == "cuda"
    assert kernels.resolve_backend("auto", cpu) == "torch"


def test_out_buffers_are_checked():
    dev = torch.device("cpu")
    kernels._check_out((torch.empty(2, 3, 4), torch.empty(2, 3, 4, dtype=torch.int64)), (2, 3, 4),
                       (torch.float32, torch.int64), dev)
    for bad in [(torch.empty(2, 3, 5), torch.empty(2, 3, 4, dtype=torch.int64)),
                (torch.empty(2, 3, 4), torch.empty(2, 3, 4)),
                (torch.empty(2, 4, 3).transpose(1, 2), torch.empty(2, 3, 4, dtype=torch.int64)),
                (torch.empty(2, 3, 4),)]:
        with pytest.raises(ValueError, match="out"):
            kernels._check_out(bad, (2, 3, 4), (torch.float32, torch.int64), dev)
    with pytest.raises(ValueError, match="k must be an int"):
        kernels._check_topk_args(torch.zeros(1, 1, 10), 11)
    with pytest.raises(ValueError, match="k must be an int"):
        kernels._check_topk_args(torch.zeros(1, 1, 100), 65)
    with pytest.raises(ValueError, match="dtype"):
        kernels._check_topk_args(torch.zeros(1, 1, 10, dtype=torch.float64), 2)


def test_public_entry_points_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        kernels.topk_softmax(torch.zeros(1, 1, 4), 2)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        kernels.cuda_dynamo_step(torch.zeros(1, 2, 4), DynamoConfig(k=2))


def test_import_without_cupy_and_lazily():
    """One fresh interpreter (one launch, not two: each pays for importing torch) in which ``import cupy``
    fails, as without CuPy, and every attempt to import it is recorded: importing the kernels module works
    and does not even try CuPy (lazy, so also where CuPy is installed); the first availability check
    tries it, finds it missing, and ``auto`` resolves to torch."""
    code = textwrap.dedent("""
        import sys

        class NoCupy:  # first on sys.meta_path: `import cupy` raises ImportError, as without CuPy
            tried = []

            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "cupy":
                    NoCupy.tried.append(name)
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoCupy())
        import dynamo_sampling.kernels as k
        assert NoCupy.tried == [] and "cupy" not in sys.modules, NoCupy.tried  # the import never tried CuPy
        assert not k.cupy_available() and not k.cuda_available()
        assert "cupy" in NoCupy.tried, NoCupy.tried  # the availability check did
        assert k.resolve_backend("auto", k.torch.zeros(1)) == "torch"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_seeds_from_a_cpu_generator_need_no_device():
    g = torch.Generator().manual_seed(5)
    t, seed, offset = kernels._draw_seeds(g, torch.device("cuda"))  # values read on the host
    assert t is None and 0 <= seed < 2 ** 62 and 0 <= offset < 2 ** 62
    assert kernels._draw_seeds(torch.Generator().manual_seed(5), torch.device("cuda"))[1:] == (seed, offset)
    t, _, _ = kernels._draw_seeds(torch.Generator().manual_seed(5), torch.device("cpu"))
    assert t is not None and t.tolist() == [seed, offset]  # same device: passed by pointer


def test_vocab_splits():
    for rows, V, sms in [(1, 151936, 132), (3, 50304, 132), (768, 151936, 132), (2, 111, 132), (1, 2048, 4)]:
        S, chunk = kernels._num_splits(rows, V, sms)
        assert 1 <= S <= kernels.MAX_SPLITS and (S - 1) * chunk < V <= S * chunk
        if S > 1:
            assert chunk >= kernels.MIN_CHUNK
    assert kernels._num_splits(768, 151936, 132)[0] == 1
    assert kernels._num_splits(3, 151936, 132)[0] > 1


# ====================================================================== test data


def _markov_corpus(V: int, n_tokens: int, seed: int, fanout: int = 4):
    """Tokens of a sparse Markov chain (each token has `fanout` successors, 10% random jumps)."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, V, (V, fanout))
    choice = rng.integers(0, fanout, n_tokens)
    jump = rng.random(n_tokens) < 0.1
    rand = rng.integers(0, V, n_tokens)
    toks = np.empty(n_tokens, dtype=np.int64)
    toks[0] = rand[0]
    t = int(rand[0])
    for i in range(1, n_tokens):
        t = int(rand[i]) if jump[i] else int(succ[t, choice[i]])
        toks[i] = t
    return toks, succ


_STATS = {}


def _stats(V: int, max_order: int):
    key = (V, max_order)
    if key not in _STATS:
        toks, succ = _markov_corpus(V, 60000, seed=V)
        _STATS[key] = (CooccurrenceStats.build([toks], vocab_size=V, max_order=max_order), toks, succ)
    return _STATS[key]


def _step_logits(B: int, H: int, V: int, seed: int, corpus=None) -> torch.Tensor:
    """Row-varied logits: noise of scale 0.5..4, plus a boosted path through the corpus' chain so
    that the heads agree with seen n-grams to a varying degree (a mix of emitted lengths)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.5, 3.0, 4.0])[torch.randint(0, 4, (B,), generator=g)]
    x = torch.randn(B, H, V, generator=g) * scale[:, None, None]
    boost = torch.rand(B, generator=g) * 14.0
    if corpus is not None:
        toks, succ = corpus
        t = torch.from_numpy(toks[torch.randint(0, len(toks), (B,), generator=g).numpy()])
        succ = torch.from_numpy(succ)
    else:
        t = torch.randint(0, V, (B,), generator=g)
    for h in range(H):
        x[torch.arange(B), h, t] += boost * (0.6 + 0.8 * torch.rand(B, generator=g))
        if corpus is not None:
            t = succ[t, torch.randint(0, succ.shape[1], (B,), generator=g)]
        else:
            t = torch.randint(0, V, (B,), generator=g)
    return x


def _sampling_row(V: int, H: int, toks, succ) -> torch.Tensor:
    """(1, H, V) logits with a few likely tokens per head along seen chains: a step whose sampled
    outcome is genuinely random over several n-grams of different lengths."""
    vals, cnt = np.unique(toks, return_counts=True)
    prev = [int(t) for t in vals[np.argsort(-cnt)[:3]]]
    row = torch.full((1, H, V), -1.0 - float(np.log(V / 30)))
    row[0, 0, prev] = torch.tensor([2.0, 1.7, 1.4])
    for h in range(1, H):
        nxt = []
        for j, t in enumerate(prev):
            for s_, v in zip(succ[t, :2].tolist(), (1.8 - 0.2 * j, 1.3 - 0.2 * j)):
                row[0, h, s_] = max(row[0, h, s_].item(), v)
                nxt.append(s_)
        prev = list(dict.fromkeys(nxt))[:3]
    return row


def _assert_topk_matches(probs, ids, logits, k, temperature, rtol=2e-5):
    x = logits.float() / temperature
    B, H, V = x.shape
    assert probs.shape == (B, H, k) and ids.shape == (B, H, k)
    assert probs.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < V)).all())
    got = x.gather(-1, ids)
    ref_vals = x.topk(k, dim=-1).values
    assert torch.equal(got, ref_vals), "top-k values differ"
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all()), "repeated ids"
    # ties: equal values in ascending id order, and the lowest ids of a tie at the boundary
    same = got[..., 1:] == got[..., :-1]
    assert bool((ids[..., 1:] > ids[..., :-1])[same].all()), "ties not in ascending id order"
    kth = got[..., -1:]
    boundary_tied = (x == kth)  # (B, H, V)
    n_in = (got == kth).sum(-1)
    expect = torch.cumsum(boundary_tied.int(), -1) <= n_in[..., None]
    expect &= boundary_tied
    member = torch.zeros_like(boundary_tied).scatter_(-1, ids, True)
    assert torch.equal(member & boundary_tied, expect), "a tie at the boundary was not broken by lower index"
    ref_p = torch.log_softmax(x, -1).gather(-1, ids).exp()
    finite = torch.isfinite(ref_p)  # rows entirely -inf: torch NaN, the kernel 0
    torch.testing.assert_close(probs[finite], ref_p[finite], rtol=rtol, atol=1e-9)
    assert bool((probs[~finite] == 0).all())


_TORCH_TOPK = (torch.topk, torch.Tensor.topk)


def _topk_lower_index_first(input, k, dim=-1, largest=True, sorted=True):
    """``torch.topk`` with its tie order made explicit, the kernels' rule: larger value first, then the
    lower index (a stable descending sort). ``torch.topk`` promises no order among ties, and bf16
    logits are full of them."""
    if not largest:
        return _TORCH_TOPK[0](input, k, dim=dim, largest=largest, sorted=sorted)
    values, indices = torch.sort(input, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k).contiguous(), indices.narrow(dim, 0, k).contiguous()))


@contextlib.contextmanager
def _explicit_tie_order():
    torch.topk, torch.Tensor.topk = _topk_lower_index_first, _topk_lower_index_first
    try:
        yield
    finally:
        torch.topk, torch.Tensor.topk = _TORCH_TOPK


def _reference_step(logits, cfg, **kwargs):
    """``policy.dynamo_step`` with the kernels' tie order in its top-k lists: on tied logits (bf16) the
    lists, hence the cells, their order and the drafts, are then the kernels' and not an accident of
    ``torch.topk``'s implementation."""
    with _explicit_tie_order():
        return policy.dynamo_step(logits, cfg, **kwargs)


def test_reference_tie_order_is_explicit():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 1.0]]).repeat(2, 1)
    x[1] = 0.5  # all tied
    with _explicit_tie_order():
        top = x.topk(5, dim=-1)
        assert torch.topk(x, 5).indices.tolist() == top.indices.tolist()
    assert top.indices.tolist() == [[0, 2, 4, 3, 1], [0, 1, 2, 3, 4]]
    assert top.values.tolist() == [[3.0, 3.0, 3.0, 2.0, 1.0], [0.5] * 5]
    assert torch.Tensor.topk is _TORCH_TOPK[1] and torch.topk is _TORCH_TOPK[0]  # restored


def _decisions_differ(a, b):
    return (a.n != b.n) | (a.tokens != b.tokens).any(-1)


def _assert_step_matches(out, logits, ref_kwargs, cfg, max_fragile=0.05, draft_atol=2e-5):
    """Greedy decisions equal to the reference's (same tie order), except rows where the reference
    itself flips under a 1e-5 perturbation of the logits (decisions on a rounding boundary)."""
    ref = _reference_step(logits, cfg, **ref_kwargs)
    B, H, _ = logits.shape
    assert out.tokens.shape == (B, H) and out.n.shape == (B,)
    k = ref.topk_ids.shape[-1]
    assert torch.equal(logits.float().gather(-1, out.topk_ids), logits.float().gather(-1, ref.topk_ids))
    bad = _decisions_differ(out, ref)
    if bool(bad.any()):
        g = torch.Generator(device=logits.device).manual_seed(1234)
        fragile = torch.zeros_like(bad)
        for _ in range(3):
            noisy = logits.float() + 1e-5 * torch.randn(logits.shape, generator=g, device=logits.device)
            fragile |= _decisions_differ(_reference_step(noisy, cfg, **ref_kwargs), ref)
        unexplained = bad & ~fragile
        rows = unexplained.nonzero().flatten().tolist()
        assert not rows, (f"rows {rows}: kernel n={out.n[rows].tolist()} tokens={out.tokens[rows].tolist()}; "
                          f"reference n={ref.n[rows].tolist()} tokens={ref.tokens[rows].tolist()}")
        assert bad.float().mean().item() <= max_fragile, f"{int(bad.sum())} rows on rounding boundaries"
    # tokens after n are -1, n in 1..H
    pos = torch.arange(H, device=out.n.device)
    assert bool(((out.tokens >= 0) == (pos[None, :] < out.n[:, None])).all())
    if ref.draft_probs is None:
        assert out.draft_probs is None
    else:
        assert out.draft_probs.shape == (B, H, k)
        ok = ~bad
        torch.testing.assert_close(out.draft_probs[ok], ref.draft_probs[ok], rtol=1e-4, atol=draft_atol)
    return ref


def _chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (torch only: the GPU image may lack scipy)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_chi2_sf():
    assert _chi2_sf(6.0, 5) == pytest.approx(0.30621891841327875, rel=1e-12)  # scipy.stats.chi2.sf(6, 5)
    assert _chi2_sf(0.0, 3) == 1.0 and _chi2_sf(200.0, 3) < 1e-40


def _chi2_pvalue_gof(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of observed counts to probabilities (categories with expected < 5 pooled)."""
    N = counts.sum()
    exp = probs * N
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    stat = ((obs - ex) ** 2 / ex).sum()
    return _chi2_sf(float(stat), max(len(ex) - 1, 1))


def _chi2_pvalue_two_sample(a: dict, b: dict) -> float:
    """Two-sample chi-square on outcome counts (outcomes with fewer than 10 hits in total pooled)."""
    Na, Nb = sum(a.values()), sum(b.values())
    keys = set(a) | set(b)
    rows, pool = [], [0, 0]
    for key in keys:
        x, y = a.get(key, 0), b.get(key, 0)
        if x + y < 10:
            pool[0] += x
            pool[1] += y
        else:
            rows.append((x, y))
    if sum(pool):
        rows.append(tuple(pool))
    if len(rows) < 2:
        return 1.0
    ka, kb = np.sqrt(Nb / Na), np.sqrt(Na / Nb)
    stat = sum((ka * x - kb * y) ** 2 / (x + y) for x, y in rows)
    return _chi2_sf(float(stat), len(rows) - 1)


def _outcomes(out) -> dict:
    res = {}
    for n, toks in zip(out.n.tolist(), out.tokens.tolist()):
        key = (n, *toks[:n])
        res[key] = res.get(key, 0) + 1
    return res


def _poison_outputs(B, H, k, KL, dev, *, vals=False, sample=False, draft=False):
    o = {"probs": torch.full((B, H, KL), float("nan"), device=dev),
         "ids": torch.full((B, H, KL), -77, dtype=torch.int64, device=dev),
         "tokens": torch.full((B, H), -77, dtype=torch.int64, device=dev),
         "n": torch.full((B,), -77, dtype=torch.int64, device=dev)}
    if vals:
        o["vals"] = torch.full((B, H, KL), float("nan"), device=dev)
    if sample:
        o["sample"] = torch.full((B,), -77, dtype=torch.int64, device=dev)
    if draft:
        o["draft"] = torch.full((B, H, k), float("nan"), device=dev)
    return o


def _assert_no_poison(o):
    for name, t in o.items():
        if t.is_floating_point():
            assert not bool(t.isnan().any()), f"{name} not fully written"
        else:
            assert not bool((t == -77).any()), f"{name} not fully written"


# ====================================================================== CPU emulation


_CT = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
       np.float32: ctypes.c_float, np.float64: ctypes.c_double}


class EmuLauncher:
    """kernels.py's launcher interface over the host emulation (CPU tensors, raw host pointers).
    ``ftz``: float32 subnormals flushed to zero during the launch, as the GPU build does."""

    def __init__(self, lib, threads=32, num_sms=1, reverse=False, ftz=True):
        self.lib, self.max_threads, self.num_sms, self.reverse = lib, threads, num_sms, reverse
        self.ftz = ftz
        self.calls = []

    def launch(self, source, name, grid, block, args):
        assert all(type(a) in _CT for a in args), [type(a) for a in args]
        vals = [_CT[type(a)](a.item()) for a in args]
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        self.calls.append((name, tuple(grid), tuple(block)))
        self.lib.emu_set_reverse(int(self.reverse))
        self.lib.emu_set_ftz(int(self.ftz))  # a host without SSE control bits stays IEEE (tests skip)
        rc = self.lib.emu_launch(name.encode(), grid[0], grid[1], grid[2], block[0], argv)
        assert rc == 0, f"emulated launch of {name} failed with {rc}"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host emulation of the kernels")
    so = tmp_path_factory.mktemp("emu") / "kernel_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-Wno-unknown-pragmas",  # nvcc's #pragma unroll
           f"-I{CSRC}", "-o", str(so), str(EMU_DIR / "emu_driver.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    for fn in (lib.emu_uniform, lib.emu_uniform_from_bits, lib.emu_exp1_from_bits):
        fn.restype = ctypes.c_double
    return lib


def test_emu_philox_known_answers(emu):
    """Random123's kat_vectors for philox4x32-10 (counter, key -> output)."""
    cases = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for ctr, key, want in cases:
        out = (ctypes.c_uint * 4)()
        emu.emu_philox((ctypes.c_uint * 4)(*ctr), (ctypes.c_uint * 2)(*key), out)
        assert list(out) == want
    u = np.array([emu.emu_uniform(ctypes.c_uint64(7), ctypes.c_uint64(9), i, 3, 16) for i in range(20000)])
    assert ((u > 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01 and len(set(u.tolist())) == u.size


EMU_TOPK = [  # B, H, V, k, dtype, temperature, num_sms (forces vocabulary splits), threads, reverse
    (2, 3, 1000, 8, torch.float32, 1.0, 1, 32, False),
    (1, 2, 9000, 50, torch.float32, 0.7, 8, 64, False),
    (1, 2, 9000, 50, torch.float32, 0.7, 8, 64, True),
    (3, 2, 5000, 5, torch.bfloat16, 1.3, 4, 32, True),
    (2, 1, 3000, 64, torch.float16, 1.0, 1, 64, False),
    (1, 3, 111, 1, torch.float32, 1.0, 1, 32, False),
]


@pytest.mark.parametrize("B,H,V,k,dtype,temperature,sms,threads,reverse", EMU_TOPK)
def test_emu_topk_softmax_matches_torch(emu, B, H, V, k, dtype, temperature, sms, threads, reverse):
    g = torch.Generator().manual_seed(V + k)
    x = (torch.randn(B, H, V, generator=g) * 3).to(dtype)
    x[0, 0, 17] = float("-inf")
    L = EmuLauncher(emu, threads=threads, num_sms=sms, reverse=reverse)
    out = _poison_outputs(B, H, k, k, "cpu", vals=True, sample=True)
    probs, ids, vals, sample = kernels._topk_lists(x, k, temperature, L, want_vals=True, gumbel=True,
                                                   seeds=(None, 1, 2), out=(out["probs"], out["ids"], out["vals"],
                                                                            out["sample"]))
    del out["tokens"], out["n"]
    _assert_no_poison(out)
    _assert_topk_matches(probs, ids, x, k, temperature)
    assert torch.equal(vals, x.float().gather(-1, ids) / temperature)
    assert bool(((sample >= 0) & (sample < V)).all())
    splits = [c for c in L.calls if c[0] == "topk_softmax_merge"]
    assert bool(splits) == (kernels._num_splits(B * H, V, sms)[0] > 1)


def test_emu_topk_ties_and_neg_inf(emu):
    V, k = 300, 8
    x = torch.randn(6, 1, V)
    x[0] = 0.25  # all tied
    x[1] = float("-inf")
    x[1, 0, [250, 7, 99]] = torch.tensor([1.0, 2.0, 1.0])  # three finite logits, k = 8
    x[2] = float("-inf")  # entirely -inf
    x[3, 0, [5, 200, 201, 40]] = 9.0  # a tie across the top
    x[4, 0, :] = torch.arange(V) % 4  # many ties at the boundary
    x[5, 0, 123] = float("-inf")
    for sms in (1, 8):  # without and with vocabulary splits
        L = EmuLauncher(emu, num_sms=sms)
        probs, ids, _, _ = kernels._topk_lists(x, k, 1.0, L)
        _assert_topk_matches(probs, ids, x, k, 1.0)
        assert ids[0, 0].tolist() == list(range(k))
        torch.testing.assert_close(probs[0, 0], torch.full((k,), 1.0 / V))
        assert ids[1, 0, :3].tolist() == [7, 99, 250] and ids[1, 0, 3:].tolist() == [0, 1, 2, 3, 4]
        assert probs[1, 0, 3:].eq(0).all() and abs(probs[1, 0, :3].sum().item() - 1) < 1e-6
        assert ids[2, 0].tolist() == list(range(k)) and probs[2, 0].eq(0).all()  # documented: torch gives NaN
        assert ids[3, 0, :4].tolist() == [5, 40, 200, 201]
        assert ids[4, 0].tolist() == [3, 7, 11, 15, 19, 23, 27, 31]


def _assert_topk_exact(probs, ids, vals, x, k, temperature):
    """The kernels' answer exactly: a stable descending sort of x / temperature (NaN read as -inf), so
    ties in ascending index, then the softmax tolerances of _assert_topk_matches."""
    xs = (x.float() / temperature).nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    ref = xs.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(ids, ref.indices[..., :k])
    assert torch.equal(vals, ref.values[..., :k])
    _assert_topk_matches(probs, ids, xs, k, 1.0)


def _adversarial_rows(V: int, seed: int) -> torch.Tensor:
    """(6, V) rows against the per-warp lists: ascending (every element beats the list's k-th and is
    inserted), descending (nothing after the first 64 of a warp), 7 distinct values (ties at the
    threshold everywhere, broken by index), all equal, random, and NaN / -inf with 5 finite values
    (fewer than k: the lowest-index -inf tokens fill the list)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(6, V)
    rows[0] = torch.arange(V, dtype=torch.float32) / 8
    rows[1] = -torch.arange(V, dtype=torch.float32) / 8
    rows[2] = (torch.arange(V) % 7).float()
    rows[3] = 0.5
    rows[4] = torch.randn(V, generator=g) * 3
    rows[5] = float("-inf")
    rows[5, 1::3] = float("nan")
    rows[5, torch.randperm(V, generator=g)[:5]] = torch.randn(5, generator=g)
    return rows


_F32, _BF16, _F16 = (torch.float32, 1500, None), (torch.bfloat16, 2000, 150), (torch.float16, 700, 40)
EMU_TOPK_BLOCKS = [  # threads, fiber order reversed, k, (dtype, V, MIN_CHUNK or None: no splits)
    (32, False, 1, _F32), (32, True, 64, _BF16), (64, True, 64, _F32), (96, True, 33, _F32),
    (96, False, 64, _F16), (256, False, 64, _F32), (256, True, 1, _BF16), (256, False, 33, _F16),
    (1024, True, 64, _BF16), (1024, False, 33, _F32), (1024, True, 1, _F16),
]


@pytest.mark.parametrize("threads,reverse,k,data", EMU_TOPK_BLOCKS)
def test_emu_topk_adversarial_orders_and_block_sizes(emu, monkeypatch, threads, reverse, k, data):
    """Blocks of 1..32 warps (an odd count: a list without a partner in the merge), rows whose order makes
    every element an insertion or puts ties at the threshold, k from 1 to 64, with and without
    vocabulary splits (slices of 154 and 42 tokens: warps that see fewer than k elements, or none, and
    partial lists shorter than k), rows that start off 16-byte alignment, both fiber orders."""
    dtype, V, min_chunk = data
    monkeypatch.setattr(kernels, "TOPK_THREADS", 1024)
    monkeypatch.setattr(kernels, "TOPK_THREADS_BUSY", 1024)
    sms = 1
    if min_chunk is not None:
        monkeypatch.setattr(kernels, "MIN_CHUNK", min_chunk)
        sms = 64
    base = torch.empty(2, 3, V + 5, dtype=dtype)  # row stride V + 5: a different alignment per row
    x = base[..., 3:3 + V]
    x.copy_(_adversarial_rows(V, seed=k).view(2, 3, V))
    L = EmuLauncher(emu, threads=threads, num_sms=sms, reverse=reverse)
    out = _poison_outputs(2, 3, k, k, "cpu", vals=True, sample=True)
    probs, ids, vals, sample = kernels._topk_lists(x, k, 0.75, L, want_vals=True, gumbel=True, seeds=(None, 3, 4),
                                                   out=(out["probs"], out["ids"], out["vals"], out["sample"]))
    del out["tokens"], out["n"]
    _assert_no_poison(out)
    _assert_topk_exact(probs, ids, vals, x, k, 0.75)
    assert bool(((sample >= 0) & (sample < V)).all())
    S = kernels._num_splits(6, V, sms)[0]
    assert L.calls[0][1:] == ((6, S, 1), (threads, 1, 1))
    if min_chunk is not None:
        assert S > 1 and L.calls[1][2] == (min(32 * S, threads), 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emu_topk_stride_zero_and_every_alignment(emu, dtype):
    """The same row at every element offset from a 16-byte boundary (the 16-byte loads start at the
    first aligned element; the elements before and after are read one by one), broadcast over B and H
    with stride 0."""
    V, k = 1000, 20
    row = torch.randn(V + 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    for off in range(16 // dtype.itemsize):
        x = row[off:off + V].expand(2, 3, V)
        assert x.stride()[:2] == (0, 0)
        for sms in (1, 3):  # without and with splits (3 rows, 3 SMs: 2 slices)
            probs, ids, vals, _ = kernels._topk_lists(x, k, 1.0, EmuLauncher(emu, threads=64, num_sms=sms),
                                                      want_vals=True)
            _assert_topk_exact(probs, ids, vals, x, k, 1.0)


class _RecordingLauncher:
    """Records the launches without running them (an H100's SM count)."""

    max_threads = 1024

    def __init__(self, num_sms=132):
        self.num_sms, self.calls = num_sms, []

    def launch(self, source, name, grid, block, args):
        self.calls.append((name, tuple(grid), tuple(block)))


def test_topk_launch_shapes():
    """csrc/NOTES.md "topk_softmax": 8 warps a block while the grid leaves SMs idle, 4 warps once there
    are more blocks than SMs; at most MAX_SPLITS slices of at least MIN_CHUNK tokens; a merge block of
    one warp per slice."""
    cases = [  # B, H, V -> partial grid, partial threads, merge threads
        (1, 3, 50304, (3, 24, 1), 256, 768),
        (1, 3, 151936, (3, 32, 1), 256, 1024),
        (8, 3, 50304, (24, 11, 1), 128, 352),
        (256, 3, 50304, (768, 1, 1), 128, None),
        (1, 1, 1000, (1, 1, 1), 256, None),
    ]
    for B, H, V, grid, threads, mthreads in cases:
        L = _RecordingLauncher()
        kernels._topk_lists(torch.empty(B, H, V, dtype=torch.bfloat16), 50, 1.0, L)
        assert L.calls[0][1:] == (grid, (threads, 1, 1)), (B, H, V)
        assert [c[2][0] for c in L.calls[1:]] == ([mthreads] if mthreads else [])


def _require_ftz(emu, ftz: bool):
    if ftz and emu.emu_set_ftz(1) != 1:
        pytest.skip("this host cannot flush subnormals (no SSE control register)")


def _flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """float32 values as the GPU build reads them (-ftz=true): subnormals become a zero of their sign."""
    x = x.float()
    return torch.where(x.abs() < torch.finfo(torch.float32).tiny, x * 0.0, x)


@pytest.mark.parametrize("ftz", [True, False], ids=["ftz", "ieee"])
def test_emu_topk_half_precision_conversion(emu, ftz):
    """bf16 / fp16 bit patterns (normal, subnormal, zero, inf) read exactly as torch converts them, except
    that the GPU build (ftz) reads a bf16 value below 2**-126 in magnitude as a zero of its sign."""
    _require_ftz(emu, ftz)
    for dtype in (torch.float16, torch.bfloat16):
        bits = torch.randint(0, 1 << 16, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
        x = bits.to(torch.int16).view(dtype).float()
        x = x[torch.isfinite(x) | torch.isinf(x)]
        finfo = torch.finfo(dtype)
        special = torch.tensor([0.0, -0.0, finfo.tiny, finfo.tiny / 4, -finfo.tiny / 8, finfo.max, -finfo.max,
                                float("inf"), float("-inf")])
        x = torch.cat([special, x[~torch.isnan(x)]])[: 64 * 16].view(16, 1, 64).to(dtype)
        L = EmuLauncher(emu, ftz=ftz)
        _, ids, vals, _ = kernels._topk_lists(x, 64, 1.0, L, want_vals=True)
        seen = _flush_subnormals(x) if ftz else x.float()
        ref = seen.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(vals, ref.values)
        assert torch.equal(ids, ref.indices)  # ties (and flushed values) in ascending id order
        assert torch.equal(torch.signbit(vals), torch.signbit(ref.values))
    flushed = bool((_flush_subnormals(x) != x.float()).any())
    assert flushed  # bf16 subnormals are present, so the two modes differ


@pytest.mark.parametrize("ftz", [True, False], ids=["ftz", "ieee"])
def test_emu_subnormal_bf16_logits_order(emu, ftz):
    """The documented difference from torch in one row (the GPU test below asserts the ftz answer)."""
    _require_ftz(emu, ftz)
    tiny = torch.finfo(torch.float32).tiny
    x = torch.full((1, 1, 64), -1.0)
    x[0, 0, :4] = torch.tensor([tiny / 4, -tiny / 8, 0.0, tiny])
    probs, ids, _, _ = kernels._topk_lists(x.to(torch.bfloat16), 4, 1.0, EmuLauncher(emu, ftz=ftz))
    assert ids[0, 0].tolist() == ([3, 0, 1, 2] if ftz else [3, 0, 2, 1])


def test_emu_uniform_is_open_at_both_ends(emu):
    """u = (m + 1/2) 2**-52 from the top 52 bits: the extreme bit patterns give 2**-53 and 1 - 2**-53
    (53 bits gave exactly 1.0, so E = -log1p(-u) = inf and J / E = 0)."""
    lo, hi = emu.emu_uniform_from_bits(0, 0), emu.emu_uniform_from_bits(0xFFFFFFFF, 0xFFFFFFFF)
    assert lo == 2.0 ** -53 and hi == 1.0 - 2.0 ** -53
    assert emu.emu_uniform_from_bits(0x3F, 0x3F) == lo  # the low 6 bits of each word are unused
    assert emu.emu_uniform_from_bits(0, 0x40) == 3 * 2.0 ** -53  # the lowest used bit moves u by 2**-52
    e_hi, e_lo = emu.emu_exp1_from_bits(0xFFFFFFFF, 0xFFFFFFFF), emu.emu_exp1_from_bits(0, 0)
    assert math.isfinite(e_hi) and e_hi == pytest.approx(53 * math.log(2)) and 0 < e_lo < 1e-15


def test_emu_nan_logits_count_as_neg_inf(emu):
    """A row with fewer than k non-NaN logits used to keep the empty-slot index 2**31-1 in its list,
    which the step then used to index ``seen`` (an illegal address on the GPU)."""
    B, H, V, k = 5, 3, 5000, 8
    stats, toks, succ = _stats(V, H)
    x = _step_logits(B, H, V, seed=21, corpus=(toks, succ))
    nan = float("nan")
    x[0] = nan
    x[0, :, [5, 17, 2500]] = torch.tensor([1.0, 2.0, 3.0])  # three real logits per head, k = 8
    x[1] = nan  # nothing but NaN
    x[2, 1, ::2] = nan  # scattered
    x[3, 0, int(x[3, 0].argmax())] = nan  # the best token of head 1
    as_inf = x.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    g = torch.Generator().manual_seed(2)
    seen = torch.rand(B, V, generator=g) < 0.3
    for sms in (1, 8):  # without and with vocabulary splits
        L = EmuLauncher(emu, num_sms=sms)
        probs, ids, _, _ = kernels._topk_lists(x, k, 1.0, L)
        assert bool(((ids >= 0) & (ids < V)).all()), ids.max()
        _assert_topk_matches(probs, ids, as_inf, k, 1.0)
        for cfg in (DynamoConfig(k=k), DynamoConfig(k=k, eps_b=0.0, adaptive_threshold=False)):
            kw = {"stats": stats, "seen_tokens": seen, "max_tokens": torch.full((B,), H)}
            out = kernels._dynamo_step_impl(x, cfg, L, **kw)
            _assert_step_matches(out, as_inf, kw, cfg)
        out = kernels._dynamo_step_impl(x, DynamoConfig(k=k), L, stats=stats, seen_tokens=seen, do_sample=True,
                                        generator=torch.Generator().manual_seed(3))
        first = out.tokens[:, 0]
        assert bool(((first >= 0) & (first < V)).all())
        assert bool(torch.isfinite(as_inf[torch.arange(B), 0, first])[[0, 2, 3, 4]].all())  # never a NaN token
        out = kernels._dynamo_step_impl(x, DynamoConfig(k=k, eps_b=1.0), L, do_sample=True, top_k=5,
                                        generator=torch.Generator().manual_seed(4))
        assert bool(((out.tokens[:, 0] >= 0) & (out.tokens[:, 0] < V)).all())


@pytest.mark.parametrize("B,H,V,k,dtype,sms,threads", [(1, 1, 65536, 50, torch.bfloat16, 37, 256),
                                                       (1, 3, 65536, 8, torch.float32, 66, 1024)])
def test_emu_topk_merges_the_most_splits(emu, B, H, V, k, dtype, sms, threads):
    """An H100 (132 SMs) splits a B = 1 row of V >= 32 * MIN_CHUNK tokens (151936 for Qwen) into
    MAX_SPLITS = 32 slices; the merge block then has one warp per slice (capped by the launcher: 8
    and 32 warps here) and merges 32 lists."""
    S, _ = kernels._num_splits(B * H, V, sms)
    assert S == kernels.MAX_SPLITS == 32
    g = torch.Generator().manual_seed(S)
    x = (torch.randn(B, H, V, generator=g) * 3).to(dtype)
    x[0, 0, -40:] = 20.0  # the best tokens in the last slices, ties among them
    L = EmuLauncher(emu, num_sms=sms, threads=threads)
    out = _poison_outputs(B, H, k, k, "cpu", vals=True, sample=True)
    probs, ids, vals, sample = kernels._topk_lists(x, k, 1.0, L, want_vals=True, gumbel=True, seeds=(None, 5, 6),
                                                   out=(out["probs"], out["ids"], out["vals"], out["sample"]))
    merges = [c for c in L.calls if c[0] == "topk_softmax_merge"]
    assert merges and merges[0][2][0] == min(32 * S, threads) > 32
    del out["tokens"], out["n"]
    _assert_no_poison(out)
    _assert_topk_matches(probs, ids, x, k, 1.0)
    assert ids[0, 0, :min(k, 40)].tolist() == list(range(V - 40, V))[:min(k, 40)]
    assert torch.equal(vals, x.float().gather(-1, ids))
    assert V - 40 <= int(sample[0]) < V  # the 40 tokens at logit 20 hold ~99.9% of head 1's mass
    if H > 1:
        cfg = DynamoConfig(k=k, eps_b=0.001)
        step = kernels._dynamo_step_impl(x, cfg, L)
        _assert_step_matches(step, x, {}, cfg)


@pytest.mark.parametrize("limit", ["budget", "sms"])
@pytest.mark.parametrize("reverse", [False, True])
def test_emu_step_blocks_loop_over_several_rows(emu, monkeypatch, limit, reverse):
    """Fewer blocks than rows (large B on a real GPU): each block strides over rows and must reset
    its per-row state (shared lists, first-token slot, caps) between them."""
    B, H, V, k = 11, 3, 400, 6
    stats, toks, succ = _stats(V, H)
    x = _step_logits(B, H, V, seed=33, corpus=(toks, succ))
    cfg = DynamoConfig(k=k, eps_b=0.02)
    per_block = 3 * k ** H  # cells, J and the blurred J
    if limit == "budget":
        monkeypatch.setattr(kernels, "SCRATCH_BUDGET", 4 * per_block * 3)  # 3 blocks: 4, 4 and 3 rows
        L, want = EmuLauncher(emu, num_sms=132, reverse=reverse), 3
    else:
        L, want = EmuLauncher(emu, num_sms=1, reverse=reverse), kernels.STEP_BLOCKS_PER_SM  # 8 blocks, 11 rows
    g = torch.Generator().manual_seed(5)
    top = x.topk(k + 1, dim=-1).indices[:, 0]
    kw = {"stats": stats, "seen_tokens": torch.rand(B, V, generator=g) < 0.3,
          "first_tokens": top[torch.arange(B), torch.randint(0, k + 1, (B,), generator=g)],
          "max_tokens": torch.randint(1, H + 1, (B,), generator=g)}
    bufs = _poison_outputs(B, H, k, k, "cpu", draft=True)
    out = kernels._dynamo_step_impl(x, cfg, L, _out=bufs, **kw)
    _assert_no_poison(bufs)
    grids = [c[1] for c in L.calls if c[0] == "dynamo_step_kernel"]
    assert grids == [(want, 1, 1)] and want < B
    _assert_step_matches(out, x, kw, cfg)
    del kw["first_tokens"]
    out = kernels._dynamo_step_impl(x, cfg, L, **kw)
    _assert_step_matches(out, x, kw, cfg)


def test_step_grid_bounds_the_scratch():
    """The step kernel's scratch is per block: at most one block per row, STEP_BLOCKS_PER_SM per SM and
    SCRATCH_BUDGET bytes (1 GiB at B >= 1074 for H = 3, k = 50 before)."""
    assert kernels.SCRATCH_BUDGET <= 256 << 20
    for H, k, blur in [(3, 50, True), (3, 50, False), (4, 50, True), (4, 64, True), (3, 8, True), (2, 64, False)]:
        per_block = (3 if blur else 2) * k ** H
        for B in (1, 7, 256, 1074, 4096, 10 ** 6):
            for sms in (1, 4, 132):
                blocks = kernels._step_blocks(B, per_block, sms)
                assert 1 <= blocks <= min(B, 65535)
                assert blocks <= kernels.STEP_BLOCKS_PER_SM * sms
                assert blocks * per_block * 4 <= kernels.SCRATCH_BUDGET
    assert kernels._step_blocks(256, 3 * 50 ** 3, 132) == 178  # H = 3, k = 50: 1.5 MB a block
    assert kernels._step_blocks(64, 3 * 50 ** 3, 132) == 64  # a block per row up to 178
    assert kernels._step_blocks(10 ** 6, 2 * 8 ** 3, 132) == 8 * 132  # small scratch: the residency cap


@pytest.mark.parametrize("B,first", [(1, False), (7, False), (7, True)])
def test_emu_step_on_tied_bf16_logits_matches_exactly(emu, B, first):
    """bf16 logits on a coarse grid: every top-k list is full of ties. With the tie order explicit in the
    reference (lower id first, as the kernels) not a single row may differ, drafts included."""
    H, V, k = 3, 500, 8
    stats, toks, succ = _stats(V, H)
    g = torch.Generator().manual_seed(B)
    x = torch.randint(0, 4, (B, H, V), generator=g).float() * 0.5
    t = torch.from_numpy(toks[torch.randint(0, len(toks) - H, (B,), generator=g).numpy()])
    for h in range(H):  # a seen n-gram a little above the crowd
        x[torch.arange(B), h, t] = 3.0
        t = torch.from_numpy(succ)[t, 0]
    x = x.to(torch.bfloat16)
    vals = x.float().topk(k, dim=-1).values
    assert bool((vals[..., 1:] == vals[..., :-1]).any(-1).all())  # ties inside every list
    cfg = DynamoConfig(k=k, eps_b=1e-4)  # rows emit 2 and 3 tokens
    kw = {"stats": stats}
    if first:
        kw["first_tokens"] = x.float()[:, 0].argmax(-1)
    out = kernels._dynamo_step_impl(x, cfg, EmuLauncher(emu), **kw)
    ref = _assert_step_matches(out, x, kw, cfg, max_fragile=0.0, draft_atol=1e-6)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.n, ref.n)
    assert bool((ref.n > 1).any())


EMU_STEP = [  # B, H, V, k, cfg kwargs, stats, seen, first, max_tokens, threads, reverse
    (6, 2, 300, 8, {}, False, False, False, False, 32, False),
    (6, 3, 300, 8, {}, True, True, False, False, 64, False),
    (6, 3, 300, 8, {}, True, True, False, True, 64, True),
    (5, 3, 400, 6, {"eps_b": 0.02, "blur": False}, True, False, True, False, 32, False),
    (5, 3, 400, 6, {"eps_b": 0.0, "adaptive_threshold": False}, True, True, True, False, 32, True),
    (4, 4, 200, 4, {"eps_b": 0.05, "alpha_c": 0.5}, True, True, False, True, 32, False),
    (4, 4, 200, 5, {"eps_b": 0.01, "otsu_bins": 16, "repetition_penalty": 2.0}, False, True, True, False, 64, False),
    (4, 2, 150, 50, {"eps_b": 0.001}, True, False, True, False, 64, False),
    (3, 1, 100, 8, {}, False, False, False, False, 32, False),
    (3, 3, 100, 1, {"eps_b": 0.5}, True, False, True, False, 32, False),
    # every cell a candidate (the blur reads positions directly), and H = 4 with many candidates
    (4, 3, 300, 8, {"eps_b": 0.0}, True, True, False, False, 64, True),
    (4, 4, 200, 6, {"eps_b": 0.002}, True, False, True, True, 32, True),
]


@pytest.mark.parametrize("B,H,V,k,cfgkw,use_stats,seen,first,caps,threads,reverse", EMU_STEP)
def test_emu_greedy_step_matches_reference(emu, B, H, V, k, cfgkw, use_stats, seen, first, caps, threads, reverse):
    stats, toks, succ = _stats(V, max(H, 2))
    x = _step_logits(B, H, V, seed=B * 100 + H * 10 + k, corpus=(toks, succ))
    cfg = DynamoConfig(k=k, **cfgkw)
    g = torch.Generator().manual_seed(9)
    kw = {"stats": stats if use_stats else None}
    if seen:
        kw["seen_tokens"] = torch.rand(B, V, generator=g) < 0.3
        kw["seen_tokens"][:, torch.from_numpy(toks[:50])] = True
    if first:
        top = x.float().topk(k + 2, dim=-1).indices[:, 0]
        pick = torch.randint(0, k + 2, (B,), generator=g)
        pick[0] = 0
        kw["first_tokens"] = top[torch.arange(B), pick]
    if caps:
        kw["max_tokens"] = torch.randint(0, H + 1, (B,), generator=g)
    L = EmuLauncher(emu, threads=threads, reverse=reverse)
    out_bufs = _poison_outputs(B, H, k, k, "cpu", draft=first)
    out = kernels._dynamo_step_impl(x, cfg, L, _out=out_bufs, **kw)
    _assert_no_poison(out_bufs)
    assert out.tokens is out_bufs["tokens"] and out.n is out_bufs["n"]
    _assert_step_matches(out, x, kw, cfg)
    if caps:
        assert bool((out.n <= kw["max_tokens"].clamp(min=1)).all())


def test_emu_step_covers_every_emitted_length(emu):
    """The fixtures above are only meaningful if rows back off to different lengths."""
    stats, toks, succ = _stats(300, 3)
    x = _step_logits(24, 3, 300, seed=7, corpus=(toks, succ))
    ref = policy.dynamo_step(x, DynamoConfig(k=8), stats=stats)
    assert set(ref.n.tolist()) == {1, 2, 3}
    out = kernels._dynamo_step_impl(x, DynamoConfig(k=8), EmuLauncher(emu), stats=stats)
    _assert_step_matches(out, x, {"stats": stats}, DynamoConfig(k=8))


def test_emu_step_half_precision_logits_and_splits(emu):
    stats, toks, succ = _stats(5000, 3)
    x = _step_logits(3, 3, 5000, seed=11, corpus=(toks, succ)).to(torch.bfloat16)
    cfg = DynamoConfig(k=8, eps_b=0.05)
    L = EmuLauncher(emu, num_sms=6)
    out = kernels._dynamo_step_impl(x, cfg, L, stats=stats)
    assert any(c[0] == "topk_softmax_merge" for c in L.calls)
    _assert_step_matches(out, x, {"stats": stats}, cfg)


def test_emu_unsupported_configs_run_the_reference(emu):
    x = _step_logits(2, 2, 100, seed=1)
    cfg = DynamoConfig(k=65)
    L = EmuLauncher(emu)
    kernels._WARNED.discard("k=65 (the kernels handle 1..64)")
    with pytest.warns(RuntimeWarning, match="k=65"):
        out = kernels._dynamo_step_impl(x, cfg, L)
    assert not L.calls
    ref = policy.dynamo_step(x, cfg)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.n, ref.n)


def test_emu_n1_sampler_is_head_one_distribution(emu):
    """eps_b = 1 always backs off to n = 1: tokens follow head_probs (full vocabulary, or top_k)."""
    B, V = 500, 24
    g = torch.Generator().manual_seed(4)
    row = torch.randn(1, 2, V, generator=g) * 1.5
    x = row.expand(B, 2, V).contiguous()
    for top_k, temperature in [(None, 0.8), (5, 1.0)]:
        out = kernels._dynamo_step_impl(x, DynamoConfig(k=3, eps_b=1.0), EmuLauncher(emu), do_sample=True,
                                        temperature=temperature, top_k=top_k,
                                        generator=torch.Generator().manual_seed(11))
        assert bool((out.n == 1).all())
        target = policy.head_probs(row[:, 0], True, temperature, top_k)[0].double().numpy()
        counts = np.bincount(out.tokens[:, 0].numpy(), minlength=V)
        assert counts[target == 0].sum() == 0
        assert _chi2_pvalue_gof(counts, target) > 1e-6


def test_emu_joint_draws_are_distributed_like_the_reference(emu):
    B, V, H = 500, 30, 2
    stats, toks, succ = _stats(V, 2)
    x = _sampling_row(V, H, toks, succ).expand(B, H, V).contiguous()
    cfg = DynamoConfig(k=4, eps_b=0.02)
    out = kernels._dynamo_step_impl(x, cfg, EmuLauncher(emu), stats=stats, do_sample=True,
                                    generator=torch.Generator().manual_seed(1))
    ref = _reference_step(x, cfg, stats=stats, do_sample=True, generator=torch.Generator().manual_seed(2))
    a, b = _outcomes(out), _outcomes(ref)
    assert len(b) >= 3, b  # the case must be random
    assert _chi2_pvalue_two_sample(a, b) > 1e-6, (a, b)


def test_emu_sampling_is_reproducible_for_a_seeded_generator(emu):
    x = _step_logits(8, 3, 200, seed=5)
    cfg = DynamoConfig(k=5, eps_b=0.02)
    run = lambda seed: kernels._dynamo_step_impl(x, cfg, EmuLauncher(emu), do_sample=True,  # noqa: E731
                                                 generator=torch.Generator().manual_seed(seed))
    first = run(3)
    again = run(3)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.n, again.n)
    assert not torch.equal(run(4).tokens, first.tokens)  # the draws do depend on the generator


# ====================================================================== GPU

gpu = pytest.mark.skipif(not kernels.cuda_available(),
                         reason="needs CuPy and a CUDA device (kernels.cuda_available() is False)")

GPU_TOPK = [  # B, H, V, k, dtype, temperature
    (1, 3, 111, 1, torch.float32, 1.0),
    (7, 3, 8192, 8, torch.bfloat16, 0.7),
    (64, 3, 50304, 50, torch.float32, 1.0),
    (256, 3, 151936, 8, torch.float16, 1.3),
    (1, 3, 151936, 50, torch.bfloat16, 1.0),
    (1, 2, 50304, 64, torch.float32, 0.5),
    (256, 2, 111, 50, torch.float16, 1.0),
    (7, 4, 151936, 1, torch.float32, 2.0),
]


@gpu
@pytest.mark.parametrize("B,H,V,k,dtype,temperature", GPU_TOPK)
def test_gpu_topk_softmax_matches_torch(B, H, V, k, dtype, temperature):
    g = torch.Generator(device="cuda").manual_seed(B + V + k)
    x = (torch.randn(B, H, V, generator=g, device="cuda") * 3).to(dtype)
    x[0, 0, :V // 3] = float("-inf")
    out = (torch.full((B, H, k), float("nan"), device="cuda"), torch.full((B, H, k), -77, device="cuda"))
    probs, ids = kernels.topk_softmax(x, k, temperature, out=out)
    assert probs is out[0] and ids is out[1]
    assert not bool(probs.isnan().any()) and not bool((ids == -77).any())
    _assert_topk_matches(probs, ids, x, k, temperature)


@gpu
def test_gpu_topk_ties_and_non_contiguous_input():
    V = 50304
    x = torch.randn(8, 3, 2, V, device="cuda")[:, :, 1]  # strided rows
    x[0] = 1.0
    x[1, :, 1000:] = float("-inf")
    x[2] = float("-inf")
    probs, ids = kernels.topk_softmax(x, 50)
    _assert_topk_matches(probs, ids, x, 50, 1.0)
    assert ids[0, 0].tolist() == list(range(50))


GPU_STEP = [  # B, H, V, k, dtype, temperature (sampling only), cfg kwargs, stats
    (1, 2, 111, 1, torch.float32, {}, True),
    (7, 3, 8192, 8, torch.bfloat16, {}, True),
    (64, 3, 50304, 50, torch.float32, {}, True),
    (256, 3, 151936, 8, torch.float16, {"eps_b": 0.05}, True),
    (256, 2, 50304, 50, torch.bfloat16, {"blur": False}, True),
    (7, 4, 50304, 8, torch.float32, {"eps_b": 0.02}, True),
    (64, 4, 151936, 8, torch.float32, {}, False),
    (1, 4, 8192, 50, torch.bfloat16, {"eps_b": 0.2}, False),
    (64, 3, 8192, 50, torch.float32, {"eps_b": 0.0, "adaptive_threshold": False}, True),
    (8, 3, 8192, 20, torch.bfloat16, {"eps_b": 0.0}, True),  # every cell listed, with the blur
    (2, 4, 8192, 50, torch.float32, {"eps_b": 0.01}, True),  # H = 4, k = 50: the sparse list
]


@gpu
@pytest.mark.parametrize("B,H,V,k,dtype,cfgkw,use_stats", GPU_STEP)
@pytest.mark.parametrize("extras", ["plain", "seen+caps", "speculative"])
def test_gpu_greedy_step_matches_reference(B, H, V, k, dtype, cfgkw, use_stats, extras):
    dev = torch.device("cuda")
    stats, toks, succ = _stats(V, H) if use_stats else (None, *_markov_corpus(V, 20000, seed=V))
    x = _step_logits(B, H, V, seed=B + H + k, corpus=(toks, succ)).to(dev, dtype)
    cfg = DynamoConfig(k=k, **cfgkw)
    g = torch.Generator(device=dev).manual_seed(9)
    kw = {"stats": stats}
    if extras == "seen+caps":
        kw["seen_tokens"] = torch.rand(B, V, generator=g, device=dev) < 0.01
        kw["max_tokens"] = torch.randint(0, H + 1, (B,), generator=g, device=dev)
    if extras == "speculative":
        top = x.float().topk(k + 1, dim=-1).indices[:, 0]
        kw["first_tokens"] = top[torch.arange(B, device=dev), torch.randint(0, k + 1, (B,), generator=g, device=dev)]
    bufs = _poison_outputs(B, H, k, k, dev, draft=extras == "speculative")
    out = kernels._dynamo_step_impl(x, cfg, kernels._CupyLauncher(dev), _out=bufs, **kw)
    _assert_no_poison(bufs)
    _assert_step_matches(out, x, kw, cfg)
    # the public entry point keeps the reference's promise too (every argument reaches the kernels)
    _assert_step_matches(kernels.cuda_dynamo_step(x, cfg, **kw), x, kw, cfg)


@gpu
@pytest.mark.parametrize("top_k,temperature", [(None, 1.0), (None, 0.7), (20, 1.0)])
def test_gpu_n1_sampler_is_head_one_distribution(top_k, temperature):
    B, V = 20000, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    row = torch.randn(1, 2, V, generator=g, device="cuda") * 2
    row[0, 0, :30] += 6.0  # a head of 30 likely tokens, the rest in the tail
    x = row.expand(B, 2, V)  # stride 0 over the batch: read in place
    out = kernels.cuda_dynamo_step(x, DynamoConfig(k=8, eps_b=1.0), do_sample=True, temperature=temperature,
                                   top_k=top_k, generator=torch.Generator(device="cuda").manual_seed(1))
    assert bool((out.n == 1).all())
    target = policy.head_probs(row[:, 0], True, temperature, top_k)[0].double().cpu().numpy()
    counts = np.bincount(out.tokens[:, 0].cpu().numpy(), minlength=V)
    assert counts[target == 0].sum() == 0
    assert _chi2_pvalue_gof(counts, target) > 1e-6


@gpu
@pytest.mark.parametrize("H,k,V,speculative,adaptive", [(2, 4, 30, False, True), (2, 8, 8192, False, False),
                                                      (3, 8, 8192, False, False), (3, 50, 4096, True, False)])
def test_gpu_sampled_steps_are_distributed_like_the_reference(H, k, V, speculative, adaptive):
    B = 8000
    dev = torch.device("cuda")
    stats, toks, succ = _stats(V, H)
    x = _sampling_row(V, H, toks, succ).to(dev).expand(B, H, V).contiguous()
    cfg = DynamoConfig(k=k, eps_b=0.02, adaptive_threshold=True) if adaptive else \
        DynamoConfig(k=k, eps_b=0.01, adaptive_threshold=False)
    kw = {"stats": stats, "do_sample": True, "temperature": 0.9}
    if speculative:
        kw["first_tokens"] = torch.full((B,), int(x[0, 0].argmax()), device=dev)
    out = kernels.cuda_dynamo_step(x, cfg, generator=torch.Generator(device=dev).manual_seed(1), **kw)
    ref = _reference_step(x, cfg, generator=torch.Generator(device=dev).manual_seed(2), **kw)
    a, b = _outcomes(out), _outcomes(ref)
    assert len(b) >= 3, b
    assert _chi2_pvalue_two_sample(a, b) > 1e-6
    if speculative:  # the draft distributions are deterministic given the emitted prefix
        same = (out.n == ref.n) & (out.tokens == ref.tokens).all(-1)
        torch.testing.assert_close(out.draft_probs[same], ref.draft_probs[same], rtol=1e-4, atol=2e-5)


@gpu
def test_gpu_seeded_generator_is_reproducible_and_runs_on_the_current_stream():
    x = _step_logits(64, 3, 8192, seed=2).cuda()
    cfg = DynamoConfig(k=8, eps_b=0.02)
    run = lambda generator: kernels.cuda_dynamo_step(x, cfg, do_sample=True, generator=generator)  # noqa: E731
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        a = run(torch.Generator(device="cuda").manual_seed(4))
    s.synchronize()
    assert torch.equal(run(torch.Generator(device="cuda").manual_seed(4)).tokens, a.tokens)
    assert not torch.equal(run(torch.Generator(device="cuda").manual_seed(5)).tokens, a.tokens)
    # a CPU generator: its seeds are read on the host and passed as kernel arguments, same rules
    c = run(torch.Generator().manual_seed(4))
    assert torch.equal(run(torch.Generator().manual_seed(4)).tokens, c.tokens)
    assert not torch.equal(run(torch.Generator().manual_seed(5)).tokens, c.tokens)


@gpu
def test_gpu_flushes_float32_subnormals_as_documented():
    """CuPy compiles with -ftz=true: bf16 logits below 2**-126 read as zeros of their sign (the
    emulation's ftz mode gives the same order; torch would give [3, 0, 2, 1])."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.full((1, 1, 64), -1.0)
    x[0, 0, :4] = torch.tensor([tiny / 4, -tiny / 8, 0.0, tiny])
    probs, ids = kernels.topk_softmax(x.to(device="cuda", dtype=torch.bfloat16), 4)
    assert ids[0, 0].tolist() == [3, 0, 1, 2]


@gpu
def test_gpu_nan_logits_keep_ids_in_range_and_the_context_usable():
    B, H, V, k = 8, 3, 50304, 50
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, H, V, generator=g, device="cuda") * 3
    x[0] = float("nan")
    x[1, :, 20:] = float("nan")  # 20 real logits per head, k = 50
    x[2, 0, ::3] = float("nan")
    seen = torch.rand(B, V, generator=g, device="cuda") < 0.3  # the penalty reads seen[b, id]
    for do_sample in (False, True):
        out = kernels.cuda_dynamo_step(x, DynamoConfig(k=k, eps_b=0.01), seen_tokens=seen, do_sample=do_sample,
                                       generator=torch.Generator(device="cuda").manual_seed(1))
        torch.cuda.synchronize()
        assert bool(((out.topk_ids >= 0) & (out.topk_ids < V)).all())
        first = out.tokens[:, 0]
        assert bool(((first >= 0) & (first < V)).all())
        assert bool((first[1] < 20).all())
    assert float(torch.ones(3, device="cuda").sum()) == 3.0  # the context still works


# ---------------------------------------------------------------- sample(backend="cuda") end to end


@pytest.fixture(params=["emu", "cuda"])
def fused_device(request, monkeypatch):
    """Where ``sample(backend="cuda")`` runs its fused step. ``"cuda"``: the real kernels (skipped
    without a GPU). ``"emu"``: CPU tensors through the emulated kernels (``resolve_backend`` accepts
    "cuda" for them and ``cuda_dynamo_step`` launches on the emulation), so the same end-to-end
    checks run on every machine."""
    if request.param == "cuda":
        if not kernels.cuda_available():
            pytest.skip("needs CuPy and a CUDA device (kernels.cuda_available() is False)")
        return torch.device("cuda")
    emu = request.getfixturevalue("emu")
    from dynamo_sampling import sampling

    def resolve(backend, tensor):
        return "cuda" if backend == "cuda" else kernels.resolve_backend(backend, tensor)

    def step(head_logits, cfg, **kwargs):
        return kernels._dynamo_step_impl(head_logits, cfg, EmuLauncher(emu, num_sms=4), **kwargs)

    monkeypatch.setattr(sampling, "resolve_backend", resolve)
    monkeypatch.setattr(kernels, "cuda_dynamo_step", step)
    return torch.device("cpu")


_MODELS = {}


def _tiny_model(device, V: int = 101):
    """tests/test_sample.py's model (peaky logits: greedy comparisons must not hinge on near-ties). One per
    device and V, shared by the tests below like test_sample.py's module fixture (sample() never changes
    a model), so the step-cost table that sample() times for a model on first use is timed once."""
    from dynamo_sampling import TinyMTP, TinyMTPConfig

    key = (str(device), V)
    if key not in _MODELS:
        torch.manual_seed(0)
        m = TinyMTP(TinyMTPConfig(vocab_size=V, n_layer=3, n_heads=3, d_model=48, n_attn_heads=4, d_ff=96,
                                  max_seq_len=128)).eval()
        with torch.no_grad():
            m.embed.weight.mul_(25.0)
        _MODELS[key] = m.to(device)
    return _MODELS[key]


def _ragged_prompts(n_rows: int, V: int, seed: int, device, min_len: int = 2, max_len: int = 12):
    """(input_ids, attention_mask), left-padded, on ``device``."""
    ids, mask = ragged_prompts(n_rows, V, seed, min_len, max_len)
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("eps_b,use_stats", [(0.0, False), (0.05, False), (0.05, True)])
def test_fused_sample_speculative_greedy_equals_ar(fused_device, eps_b, use_stats):
    from dynamo_sampling import sample

    model = _tiny_model(fused_device)
    V = model.vocab_size
    stats = _stats(V, 3)[0] if use_stats else None
    ids, mask = _ragged_prompts(8, V, 123, fused_device)
    ar = sample(model, ids, mask, strategy="ar", max_new_tokens=16, backend="cuda")
    spec = sample(model, ids, mask, strategy="speculative", max_new_tokens=16, backend="cuda", eps_b=eps_b,
                  stats=stats, return_dict_in_generate=True)
    assert torch.equal(spec.sequences, ar)
    if eps_b == 0.0:
        assert int(spec.accepted.sum()) > 0  # the kernel's drafts were verified and kept


@pytest.mark.parametrize("use_stats", [False, True])
def test_fused_sample_equals_torch_backend_greedy_dynamo(fused_device, use_stats):
    from dynamo_sampling import sample

    model = _tiny_model(fused_device)
    V = model.vocab_size
    stats = _stats(V, 3)[0] if use_stats else None
    ids, mask = _ragged_prompts(8, V, 7, fused_device)
    runs = {b: sample(model, ids, mask, strategy="dynamo", max_new_tokens=12, eps_b=0.05, stats=stats, backend=b,
                      return_dict_in_generate=True) for b in ("cuda", "torch")}
    assert torch.equal(runs["cuda"].sequences, runs["torch"].sequences)
    assert torch.equal(runs["cuda"].histogram, runs["torch"].histogram)
    assert int(runs["cuda"].histogram[:, 1:].sum()) > 0  # multi-token steps happened


def test_fused_sampled_speculative_is_exact(fused_device):
    """tests/test_sample.py's frequency test with the fused step: pairs (x1, x2) after a fixed prompt
    follow the ar distribution P1[x0, x1] * P1[x1, x2] although the kernel drafts x2 from head 2."""
    from dynamo_sampling import sample
    from toy_models import random_table_model

    model = random_table_model(V=6, H=2, seed=3)
    model.table = model.table.to(fused_device)
    P = torch.softmax(model.table[0], -1).double().cpu()
    x0 = 2
    n = 60000 if fused_device.type == "cuda" else 1000  # the emulation runs one block at a time
    exact = P[x0][:, None] * P  # (V, V)
    freqs = {}
    for strategy in ("speculative", "ar"):
        ids = torch.full((n, 1), x0, device=fused_device)
        out = sample(model, ids, strategy=strategy, max_new_tokens=2, do_sample=True, temperature=1.0, top_k=None,
                     eps_b=0.0, step_cost=(1.0,), generator=torch.Generator(device=fused_device).manual_seed(1),
                     backend="cuda", return_dict_in_generate=True)  # flat step cost: every useful draft is fed
        seq = out.sequences.cpu()
        counts = torch.zeros(6, 6, dtype=torch.float64)
        counts.index_put_((seq[:, 1], seq[:, 2]), torch.ones(n, dtype=torch.float64), accumulate=True)
        assert counts[exact == 0].sum() == 0  # zero-probability pairs never drawn
        freqs[strategy] = counts / n
        if strategy == "speculative":
            assert 0 < int(out.accepted.sum()) < int(out.drafted.sum())  # drafts both kept and rejected
    for strategy, freq in freqs.items():
        assert _chi2_pvalue_gof((freq * n).round().numpy().ravel(), exact.numpy().ravel()) > 1e-6, strategy
    if fused_device.type == "cuda":  # enough draws for tight bounds
        sd = (exact * (1 - exact) / n).sqrt()
        spec = freqs["speculative"]
        assert bool(((spec - exact).abs() <= 5 * sd + 1e-9).all()), (spec - exact).abs().max()
        assert 0.5 * float((spec - exact).abs().sum()) < 0.02
        assert 0.5 * float((freqs["ar"] - exact).abs().sum()) < 0.02
