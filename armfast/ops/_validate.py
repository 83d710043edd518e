"""Argument checks shared by every backend: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if 0 in t.shape:
        raise ValueError(f"{name} must have no empty dimension {layout}, got shape {tuple(t.shape)}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first, ref = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {first} ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {first} ({ref.device}), got {t.device}")


def attention_args(q, k, v, scale) -> float:
    """Validates `attention` inputs; returns the softmax scale to use."""
    layout = "[B, H, N, d]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, layout)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k and v must share batch and head dims [B, H]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[2]}), got {v.shape[2]}")
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(
            f"k and v must have q's head dim d={q.shape[3]}, got k {k.shape[3]}, v {v.shape[3]}")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def patch_text_logits_args(x, text, logit_scale) -> torch.Tensor:
    """Validates `patch_text_logits` inputs; returns logit_scale as a 0-d tensor on x's device."""
    check_tensor("x", x, 3, "[B, N, E]")
    check_tensor("text", text, 2, "[C, E]")
    check_same(("x", "text"), (x, text))
    if text.shape[1] != x.shape[2]:
        raise ValueError(f"text must have x's embedding dim E={x.shape[2]}, got {text.shape[1]}")
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a number or a one-element tensor, got shape "
                             f"{tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}")
        if logit_scale.device != x.device:
            raise ValueError(f"logit_scale must be on x's device ({x.device}), got {logit_scale.device}")
        return logit_scale.reshape(())
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(f"logit_scale must be a real number or a tensor, got {type(logit_scale).__name__}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    return torch.tensor(float(logit_scale), dtype=torch.float32, device=x.device)
