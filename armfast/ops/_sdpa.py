"""`sdpa` backend: PyTorch's own fused attention, the strongest off-the-shelf peer.

`scaled_dot_product_attention` is an aten op with its own autograd and fake kernels, so it is
called as is. For `patch_text_logits` there is no fused PyTorch op; this backend is the plain
autograd composition (`F.normalize` and a matmul), i.e. what a user would write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._reference import NORM_EPS
from ._library import plain
from ._registry import ANY_DTYPE, Backend


@plain
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, heads_last: bool = False) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # a view; on CUDA the flash and cuDNN kernels already store [B, N, H, d], so it is contiguous
    return out.transpose(1, 2) if heads_last else out


@plain
def patch_text_logits(x: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    xn = F.normalize(x, dim=-1, eps=NORM_EPS)
    tn = F.normalize(text, dim=-1, eps=NORM_EPS)
    return logit_scale.to(x.dtype) * torch.matmul(xn, tn.t())


BACKEND = Backend(
    name="sdpa",
    ops={"attention": attention, "patch_text_logits": patch_text_logits},
    dtypes={device: ANY_DTYPE for device in ("cpu", "cuda", "mps", "xpu")},
)
