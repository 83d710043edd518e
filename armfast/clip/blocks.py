"""One open_clip transformer block, run from its parameters.

open_clip's ``ResidualAttentionBlock`` holds an ``nn.MultiheadAttention`` (``attn.in_proj_weight``,
``attn.in_proj_bias``, ``attn.out_proj``) between ``ln_1`` and the ``ln_2`` -> ``mlp`` branch, with
optional LayerScale ``ls_1``/``ls_2``. Running it from those names instead of its ``forward``
lets every attention product go through `armfast.ops.attention` (the fused backends) and lets the
baselines swap the last block's attention. Tokens are always batch-first ``[B, T, W]`` here; the
only place the transformer's own layout matters is `run_block_module`, the fallback for blocks
of another kind.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..arm import merge_heads


def is_standard_block(block: nn.Module) -> bool:
    """True for open_clip's ``ResidualAttentionBlock`` (packed-qkv ``nn.MultiheadAttention``)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
            and not hasattr(block, "ln_1_kv") and all(hasattr(block, n) for n in ("ln_1", "ln_2", "mlp")))


def require_standard_block(block: nn.Module, what: str) -> None:
    if not is_standard_block(block):
        raise TypeError(
            f"{what} needs an open_clip ResidualAttentionBlock (ln_1, attn = nn.MultiheadAttention "
            f"with a packed in_proj_weight, ln_2, mlp); got {type(block).__name__}")


def layer_scale(block: nn.Module, i: int, t: Tensor) -> Tensor:
    """The block's LayerScale ``ls_i`` applied to t (the identity when it has none)."""
    ls = getattr(block, f"ls_{i}", None)
    return t if ls is None else ls(t)


def qkv(attn: nn.MultiheadAttention, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, heads, T, d]`` (strided views of one projection) of normalised tokens h."""
    proj = nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    return proj.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def value(attn: nn.MultiheadAttention, h: Tensor) -> Tensor:
    """Only the value projection ``[B, heads, T, d]`` (the qkv rows W_v, b_v)."""
    W = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * W:]
    v = nn.functional.linear(h, attn.in_proj_weight[2 * W:], bias)
    return v.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """``softmax(s q k^T) v`` with the heads merged, ``[B, T, heads * d]``: the attention
    writes ``[B, T, heads, d]``, so the merge is a view."""
    return ops.attention(q, k, v, backend=backend, layout="bnhd").flatten(2)


def attention_branch(block: nn.Module, o: Tensor) -> Tensor:
    """``ls_1(out_proj(o))`` of the merged heads ``o [B, T, W]``: what the block adds to its
    residual stream."""
    return layer_scale(block, 1, block.attn.out_proj(o))


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """``softmax(s q k^T)`` ``[B, heads, T, T]`` in float32 or wider, autocast or not (the maps
    some baselines read from earlier blocks; decisions made on them must not depend on the
    model's dtype)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(dtype) * q.shape[-1] ** -0.5) @ k.to(dtype).transpose(-1, -2)
        return scores.softmax(dim=-1)


def forward_with_attention(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A standard block's output and its attention probabilities ``[B, heads, T, T]``
    (`attention_probs`), the output computed from those very maps (no fused kernel)."""
    q, k, v = qkv(block.attn, block.ln_1(x))
    probs = attention_probs(q, k)
    o = (probs.to(v.dtype) @ v).transpose(1, 2).flatten(2)
    return mlp_residual(block, x + attention_branch(block, o)), probs


def mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    """``x + ls_2(mlp(ln_2(x)))``, the block's second half."""
    return x + layer_scale(block, 2, block.mlp(block.ln_2(x)))


def standard_forward(block: nn.Module, x: Tensor, backend: str = "auto") -> Tensor:
    """The unchanged block: ``x + ls_1(attn(ln_1 x))``, then ``+ ls_2(mlp(ln_2 x))``."""
    q, k, v = qkv(block.attn, block.ln_1(x))
    x = x + attention_branch(block, attend(q, k, v, backend))
    return mlp_residual(block, x)


def run_block_module(block: nn.Module, x: Tensor, batch_first: bool) -> Tensor:
    """Calls the block's own ``forward`` on batch-first tokens, in the layout it expects."""
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def block_forward(block: nn.Module, x: Tensor, *, batch_first: bool = True,
                  backend: str = "auto") -> Tensor:
    """One block on batch-first tokens ``[B, T, W]``: from its parameters when it is a standard
    open_clip block (attention through `armfast.ops`), else through its own ``forward``."""
    if is_standard_block(block):
        return standard_forward(block, x, backend)
    return run_block_module(block, x, batch_first)


def transformer_batch_first(transformer: nn.Module) -> bool:
    """open_clip >= 2.24 runs batch-first and says so; older releases were sequence-first."""
    return bool(getattr(transformer, "batch_first", False))


__all__ = ["is_standard_block", "require_standard_block", "qkv", "value", "merge_heads", "attend",
           "attention_branch", "mlp_residual", "attention_probs", "forward_with_attention",
           "standard_forward", "block_forward", "run_block_module", "transformer_batch_first",
           "layer_scale"]
