// CPU test driver: the real csrc/*.cu compiled as C++ on top of cuda_host_emu.h, exported
// through a cuLaunchKernel-like entry point for ctypes (tests/test_kernels.py).
#include "cuda_host_emu.h"

#include <cstring>

#include "topk_softmax.cu"
#include "dynamo_step.cu"

#define EMU_KERNEL(NAME) \
  if (std::strcmp(name, #NAME) == 0) return emu::launch(NAME, gx, gy, gz, bx, args);

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {
  EMU_KERNEL(topk_softmax_partial_f32)
  EMU_KERNEL(topk_softmax_partial_bf16)
  EMU_KERNEL(topk_softmax_partial_f16)
  EMU_KERNEL(topk_softmax_merge)
  EMU_KERNEL(dynamo_step_kernel)
  return -2;  // unknown kernel
}

extern "C" void emu_set_reverse(int reverse) { emu::g_reverse = reverse != 0; }

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
