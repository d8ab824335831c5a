#!/usr/bin/env bash
# Nsight Compute on one fused DynaMo step (csrc/NOTES.md "Measurements"): B = 1, V = 50304, H = 3,
# k = 50, bf16 logits, greedy, no statistics; the 7th-9th launches (after warm-up), each kernel's
# duration and its warp-state summary. Needs a CUDA GPU, CuPy and ncu (the lent H100 image has them).
#   bash benchmarks/ncu_step.sh
cd "$(dirname "$0")/.." || exit 1
timeout 90 ncu --kernel-name regex:"topk|dynamo_step" --launch-skip 6 --launch-count 3 \
    --section SpeedOfLight --section WarpStateStats python3 -c "
import torch
from dynamo_sampling import kernels, policy
x = torch.randn(1, 3, 50304, device='cuda').bfloat16() * 3
for _ in range(4):
    kernels.cuda_dynamo_step(x, policy.DynamoConfig(k=50))
torch.cuda.synchronize()
" 2>&1 | grep -E "^  [a-z_]+.*\(|Duration|Throughput|Warp Cycles Per Issued|stalled"
