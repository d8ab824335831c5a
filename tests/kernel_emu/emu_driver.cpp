// CPU test driver: the real csrc/*.cu compiled as C++ on top of cuda_host_emu.h, exported
// through a cuLaunchKernel-like entry point for ctypes (tests/test_kernels.py).
//
// Floating-point mode: on the GPU the kernels are compiled by CuPy with -ftz=true (kernels.py
// compile_options()), so float32 subnormal inputs and results are flushed to (signed) zero. The
// emulation matches that by default with the SSE flush-to-zero and denormals-are-zero bits set
// during a launch; emu_set_ftz(0) gives IEEE subnormals instead. (Difference left: SSE flushes
// float64 subnormals too, which the GPU does not; the kernels' float64 values are sums and
// products of probabilities, far from 1e-308.)
#include "cuda_host_emu.h"

#include <cstring>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define EMU_HAVE_MXCSR 1
#endif

#include "topk_softmax.cu"
#include "dynamo_step.cu"

namespace {

int g_ftz = 1;

int dispatch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {
#define EMU_KERNEL(NAME) \
  if (std::strcmp(name, #NAME) == 0) return emu::launch(NAME, gx, gy, gz, bx, args);
  EMU_KERNEL(topk_softmax_partial_f32)
  EMU_KERNEL(topk_softmax_partial_bf16)
  EMU_KERNEL(topk_softmax_partial_f16)
  EMU_KERNEL(topk_softmax_merge)
  EMU_KERNEL(dynamo_step_kernel)
#undef EMU_KERNEL
  return -2;  // unknown kernel
}

}  // namespace

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {
#ifdef EMU_HAVE_MXCSR
  const unsigned saved = _mm_getcsr();
  if (g_ftz) _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6); fibers inherit it (getcontext)
  const int rc = dispatch(name, gx, gy, gz, bx, args);
  _mm_setcsr(saved);
  return rc;
#else
  return dispatch(name, gx, gy, gz, bx, args);
#endif
}

extern "C" void emu_set_reverse(int reverse) { emu::g_reverse = reverse != 0; }

// 1: flush float32 subnormals like the GPU build (-ftz=true); 0: IEEE. Returns 0 where the host
// cannot flush (no SSE control register), then the emulation is always IEEE.
extern "C" int emu_set_ftz(int on) {
  g_ftz = on != 0;
#ifdef EMU_HAVE_MXCSR
  return 1;
#else
  return 0;
#endif
}

extern "C" void emu_philox(const unsigned* ctr, const unsigned* key, unsigned* out) {
  dyn::U32x4 c;
  for (int i = 0; i < 4; ++i) c.v[i] = ctr[i];
  const dyn::U32x4 r = dyn::philox4x32_10(c, key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = r.v[i];
}

extern "C" double emu_uniform(unsigned long long seed, unsigned long long offset, unsigned a, unsigned b,
                              unsigned tag) {
  return dyn::uniform_open(seed, offset, a, b, tag);
}

extern "C" double emu_uniform_from_bits(unsigned hi, unsigned lo) { return dyn::uniform_from_bits(hi, lo); }

extern "C" double emu_exp1_from_bits(unsigned hi, unsigned lo) {
  return dyn::exp1_from_uniform(dyn::uniform_from_bits(hi, lo));
}
