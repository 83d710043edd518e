"""The attention and MLP blocks ARM is built from, over `armfast.ops.attention`."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """[B, N, h*d] -> [B, h, N, d] as a strided view (the kernels take strides, no copy)."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, h, N, d] -> [B, N, h*d] (a copy; attention with ``layout="bnhd"`` avoids it)."""
    return t.transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another: ``Wo MHA(x Wq, c Wk, c Wv)``."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int,
                 out_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.q = nn.Linear(query_dim, inner)
        self.k = nn.Linear(context_dim, inner)
        self.v = nn.Linear(context_dim, inner)
        self.out = nn.Linear(inner, out_dim)

    def forward(self, x: Tensor, context: Tensor, backend: str = "auto") -> Tensor:
        h = self.num_heads
        q, k, v = split_heads(self.q(x), h), split_heads(self.k(context), h), split_heads(self.v(context), h)
        return self.out(ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2))


class SelfAttention(nn.Module):
    """``Wo MHA(x Wq, x Wk, x Wv)`` with one fused input projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, h, N, d], strided
        return self.out(ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
