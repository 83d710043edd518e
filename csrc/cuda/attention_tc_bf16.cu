// Tensor-core flash attention for bf16 (m16n8k16).
#include "attention_tc.cuh"

using armfast::cuda::AttentionShape;
using armfast::cuda::DeviceLimits;
using armfast::cuda::Strided;

ARMFAST_FLASH_INSTANTIATE(__nv_bfloat16);
