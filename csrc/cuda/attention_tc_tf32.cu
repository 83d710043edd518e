// Tensor-core flash attention for float32 on TF32 (m16n8k8).
#include "attention_tc.cuh"

using armfast::cuda::AttentionShape;
using armfast::cuda::DeviceLimits;
using armfast::cuda::Strided;

ARMFAST_FLASH_INSTANTIATE(float);
