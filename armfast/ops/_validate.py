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


_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_strided = torch.strided
Tensor = torch.Tensor


def _plain_attention_inputs(q, k, v) -> bool:
    """The common case, checked in about a microsecond: three dense floating tensors of one
    dtype and device with matching [B, H, N, d] shapes and no empty dimension."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (len(qs) == 4 and len(ks) == 4 and len(vs) == 4
            and qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1] and ks[2] == vs[2]
            and qs[3] == ks[3] == vs[3] and 0 not in qs and 0 not in ks
            and q.dtype in _FLOATS and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device
            and q.layout is _strided and k.layout is _strided and v.layout is _strided)


def attention_args(q, k, v, scale) -> float:
    """Validates `attention` inputs; returns the softmax scale to use."""
    if not _plain_attention_inputs(q, k, v):
        _explain_attention_inputs(q, k, v)
    return softmax_scale(scale, q.shape[-1])


def softmax_scale(scale, d: int) -> float:
    """The softmax scale: `scale` checked, or ``d ** -0.5`` for None."""
    if scale is None:
        return d ** -0.5
    if type(scale) is float and 0 < scale < math.inf:
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def _explain_attention_inputs(q, k, v) -> None:
    """Raises the error that says what is wrong with q, k, v (tensor subclasses that are fine
    get here too, and pass)."""
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


def saved_attention(dout, out, lse, q, v, heads_last: bool) -> None:
    """The backward's own inputs, for direct calls of the backward ops: the kernels read them
    raw, so a wrong dtype or shape must fail here."""
    B, H, Nq, _ = q.shape
    shape = (B, Nq, H, v.shape[-1]) if heads_last else (B, H, Nq, v.shape[-1])
    for name, t in (("dout", dout), ("out", out)):
        check_tensor(name, t, 4, "like the forward's output")
        if tuple(t.shape) != shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} {list(shape)} on {q.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, Nq) or lse.dtype != acc \
            or lse.device != q.device:
        got = f"{lse.dtype} {list(lse.shape)} on {lse.device}" if isinstance(lse, torch.Tensor) \
            else type(lse).__name__
        raise ValueError(f"lse must be {acc} {[B, H, Nq]} on {q.device}, got {got}")


def saved_logits(dout, x, text) -> None:
    """The backward's gradient of the logits, for direct calls of the backward ops."""
    shape = (x.shape[0], x.shape[1], text.shape[0])
    check_tensor("dout", dout, 3, "like the forward's output [B, N, C]")
    if tuple(dout.shape) != shape or dout.dtype != x.dtype or dout.device != x.device:
        raise ValueError(f"dout must be {x.dtype} {list(shape)} on {x.device}, got "
                         f"{dout.dtype} {list(dout.shape)} on {dout.device}")


LAYOUTS = {"bhnd": False, "bnhd": True}  # layout -> heads_last


def heads_last(value) -> bool:
    """The `layout` argument of attention -> whether the heads come after the tokens."""
    heads_last = LAYOUTS.get(value) if isinstance(value, str) else None
    if heads_last is None:
        raise ValueError(f"layout must be 'bhnd' ([B, H, N, d]) or 'bnhd' ([B, N, H, d]), "
                         f"got {value!r}")
    return heads_last


def patch_text_logits_args(x, text, logit_scale) -> torch.Tensor:
    """Validates `patch_text_logits` inputs; returns logit_scale as a 0-d tensor on x's device."""
    if not (type(x) is Tensor and type(text) is Tensor and x.dim() == 3 and text.dim() == 2
            and text.shape[1] == x.shape[2] and 0 not in x.shape and 0 not in text.shape
            and x.dtype in _FLOATS and x.dtype == text.dtype and x.device == text.device
            and x.layout is _strided and text.layout is _strided):
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
    # a fill kernel, not torch.tensor's copy from host memory: no wait, and CUDA-graph capturable
    return torch.full((), float(logit_scale), dtype=torch.float32, device=x.device)


# ---- the baseline attentions -----------------------------------------------------------------

def _plain_same_shape(tensors) -> bool:
    """The common case of the self-correlation ops, in about a microsecond: dense floating 4-D
    tensors of one shape, dtype and device, no empty dimension."""
    first = tensors[0]
    if type(first) is not Tensor or first.dim() != 4 or 0 in first.shape:
        return False
    shape, dtype, device = first.shape, first.dtype, first.device
    return dtype in _FLOATS and all(
        type(t) is Tensor and t.shape == shape and t.dtype == dtype and t.device == device
        and t.layout is _strided for t in tensors)


def same_shape_heads(names: tuple[str, ...], tensors: tuple) -> None:
    """Checks tensors that must all be ``[B, H, N, d]`` of one shape (q, k, v of SCLIP...)."""
    if _plain_same_shape(tensors):
        return
    for name, t in zip(names, tensors):
        check_tensor(name, t, 4, "[B, H, N, d]")
    check_same(names, tensors)
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != tensors[0].shape:
            raise ValueError(f"{name} must have the shape of {names[0]} [B, H, N, d] = "
                             f"{tuple(tensors[0].shape)}, got {tuple(t.shape)}")


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def grid_args(grid, sigma, class_token, tokens: int) -> tuple[int, int, float, bool]:
    """NACLIP's grid arguments for `tokens` tokens: (h, w, sigma, class_token), checked."""
    if not isinstance(class_token, bool):
        raise TypeError(f"class_token must be a bool, got {type(class_token).__name__}")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in grid)):
        raise TypeError(f"grid must be a pair of ints (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive (h, w), got {(h, w)}")
    if h * w + class_token != tokens:
        cls = " plus the class token" if class_token else ""
        raise ValueError(f"grid {(h, w)} has {h * w} patches{cls}, {h * w + class_token} tokens, "
                         f"but x has N={tokens} tokens")
    return h, w, _positive("sigma", sigma), class_token


def affinity_args(f, v, beta, gamma) -> tuple[float, float]:
    """Validates `masked_affinity_attention` inputs; returns (beta, gamma)."""
    if not (type(f) is Tensor and type(v) is Tensor and f.dim() == 3 and v.dim() == 4
            and f.shape[0] == v.shape[0] and f.shape[1] == v.shape[2]
            and 0 not in f.shape and 0 not in v.shape and f.dtype in _FLOATS
            and f.dtype == v.dtype and f.device == v.device
            and f.layout is _strided and v.layout is _strided):
        check_tensor("f", f, 3, "[B, n, C]")
        check_tensor("v", v, 4, "[B, H, n, d]")
        check_same(("f", "v"), (f, v))
        if v.shape[0] != f.shape[0] or v.shape[2] != f.shape[1]:
            raise ValueError(f"v must be [B, H, n, d] with f's B={f.shape[0]} and n={f.shape[1]}, "
                             f"got {tuple(v.shape)}")
    return _finite("beta", beta), _positive("gamma", gamma)


def _features_and(f, names: tuple[str, ...], tensors: tuple, layout: str) -> None:
    """f ``[B, N, C]`` and tensors of `layout` whose batch is f's B and tokens f's N (size 2 of a
    4-D, size 1 of a 3-D layout), all of f's dtype and device."""
    check_tensor("f", f, 3, "[B, N, C]")
    ndim = layout.count(",") + 1
    for name, t in zip(names, tensors):
        check_tensor(name, t, ndim, layout)
    check_same(("f", *names), (f, *tensors))
    for name, t in zip(names, tensors):
        if t.shape[0] != f.shape[0] or t.shape[ndim - 2] != f.shape[1]:
            raise ValueError(f"{name} must be {layout} with f's B={f.shape[0]} and N={f.shape[1]}, "
                             f"got {tuple(t.shape)}")


def similarity_args(f, x, threshold) -> float:
    """Validates `similarity_aggregation` inputs; returns the threshold."""
    if not (type(f) is Tensor and type(x) is Tensor and f.dim() == 3 and x.dim() == 3
            and f.shape[:2] == x.shape[:2] and 0 not in f.shape and 0 not in x.shape
            and f.dtype in _FLOATS and f.dtype == x.dtype and f.device == x.device
            and f.layout is _strided and x.layout is _strided):
        _features_and(f, ("x",), (x,), "[B, N, D]")
    threshold = _finite("threshold", threshold)
    if threshold < 0:  # kept entries >= 0, so W's row sums cannot cancel to 0
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return threshold


def dual_softmax_args(f, k, v, scale, beta, gamma) -> tuple[float, float, float]:
    """Validates `averaged_dual_softmax` inputs; returns (scale, beta, gamma)."""
    if not (type(f) is Tensor and f.dim() == 3 and 0 not in f.shape and _plain_same_shape((k, v))
            and f.dtype == k.dtype and f.device == k.device and f.layout is _strided
            and f.shape[0] == k.shape[0] and f.shape[1] == k.shape[2]):
        same_shape_heads(("k", "v"), (k, v))
        _features_and(f, ("k", "v"), (k, v), "[B, H, N, d]")
    return softmax_scale(scale, k.shape[-1]), _finite("beta", beta), _positive("gamma", gamma)
