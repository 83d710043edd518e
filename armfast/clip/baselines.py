"""Training-free OVSS baselines: each one rewrites CLIP's last vision block.

Notation (per head): X is the input of the last block, ``h = ln_1(X)``, ``Q, K, V`` its
projections by ``attn.in_proj_weight``/``in_proj_bias``, ``s = head_dim ** -0.5``, and
``branch(o) = ls_1(out_proj(concat_heads(o)))`` (``ls_1`` is the identity for CLIP).

=========  ==============================================================  ==============
baseline   attention output o of the last block                            residual + FFN
=========  ==============================================================  ==============
vanilla    ``softmax(s Q K^T) V`` (the unchanged block)                     kept
maskclip   ``V`` (the value path)                                           kept
sclip      ``(softmax(s Q Q^T) + softmax(s K K^T)) V``                      kept
clearclip  ``softmax(s Q Q^T) V``                                           dropped
naclip     ``softmax(s K K^T + G) V``, G Gaussian of grid distance, sigma 5  dropped
proxyclip  ``softmax(A) V'``, A from a VFM's patch affinities, V' resampled  dropped
=========  ==============================================================  ==============

"kept": ``Y = X + branch(o)``, then ``Y = Y + ls_2(mlp(ln_2 Y))``, as in SCLIP's released code
(NACLIP's ``arch='vanilla'`` reproduction of it) and MaskCLIP's ViT. "dropped": the block returns
``branch(o)`` alone -- no residual, no FFN -- as in ClearCLIP and NACLIP's ``arch='reduced'``
and ProxyCLIP. Every function returns the block's patch tokens ``[B, N', W]`` (class token
dropped) and their grid; `armfast.clip.extract` applies ``ln_post`` and ``proj``.

The class token takes part as a key and value in every attention here but proxyclip's, which
lives on the VFM's patch grid only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (attend, attention_branch, block_forward, merge_heads, mlp_residual, qkv,
                     require_standard_block, value)
from .vfm import VisionFoundationModel

NACLIP_SIGMA = 5.0  # std of NACLIP's Gaussian, in patches
PROXYCLIP_BETA = 1.2  # ProxyCLIP: A = gamma * (S - beta * mean(S)), negatives masked
PROXYCLIP_GAMMA = 3.0


@dataclass(frozen=True)
class LastBlockInput:
    """What a baseline sees: the last block's input tokens and where they came from."""

    x: Tensor  # [B, 1 + h*w, W], class token first, batch-first
    grid: tuple[int, int]  # (h, w) CLIP patch grid of x
    images: Tensor  # the CLIP-normalised crops [B, 3, H, W] (proxyclip's VFM reads them)
    image_mean: Sequence[float]  # CLIP normalisation of `images`
    image_std: Sequence[float]
    backend: str = "auto"  # armfast.ops backend for the attention products
    vfm: Optional[VisionFoundationModel] = None
    batch_first: bool = True  # layout the block's own forward expects (vanilla fallback)


BaselineFn = Callable[[nn.Module, LastBlockInput], "tuple[Tensor, tuple[int, int]]"]


@dataclass(frozen=True)
class Baseline:
    name: str
    fn: BaselineFn
    needs_vfm: bool = False
    any_block: bool = False  # True: runs on blocks that are not open_clip's standard one


BASELINES: dict[str, Baseline] = {}


def register_baseline(name: str, *, needs_vfm: bool = False, any_block: bool = False):
    """Decorator adding ``fn(block, inp) -> (patch tokens [B, N', W], (h', w'))`` to BASELINES."""
    def wrap(fn: BaselineFn) -> BaselineFn:
        BASELINES[name] = Baseline(name, fn, needs_vfm, any_block)
        return fn
    return wrap


def get_baseline(name: str) -> Baseline:
    if not isinstance(name, str):
        raise TypeError(f"baseline must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {name!r}")
    return BASELINES[key]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float32 for half inputs, float64 stays float64: explicit softmaxes are computed there."""
    return torch.promote_types(t.dtype, torch.float32)


@register_baseline("vanilla", any_block=True)
def vanilla(block: nn.Module, inp: LastBlockInput):
    """The unchanged block."""
    y = block_forward(block, inp.x, batch_first=inp.batch_first, backend=inp.backend)
    return y[:, 1:], inp.grid


@register_baseline("maskclip")
def maskclip(block: nn.Module, inp: LastBlockInput):
    """MaskCLIP: attention replaced by the value path, ``Y = X + out_proj(V)``; FFN kept."""
    y = inp.x + attention_branch(block, merge_heads(value(block.attn, block.ln_1(inp.x))))
    return mlp_residual(block, y)[:, 1:], inp.grid


@register_baseline("sclip")
def sclip(block: nn.Module, inp: LastBlockInput):
    """SCLIP's correlative self-attention: ``softmax(s QQ^T) V + softmax(s KK^T) V`` (rows of
    the summed map add up to 2); residual and FFN kept."""
    q, k, v = qkv(block.attn, block.ln_1(inp.x))
    o = attend(q, q, v, inp.backend) + attend(k, k, v, inp.backend)
    return mlp_residual(block, inp.x + attention_branch(block, o))[:, 1:], inp.grid


@register_baseline("clearclip")
def clearclip(block: nn.Module, inp: LastBlockInput):
    """ClearCLIP: query-query attention ``softmax(s QQ^T) V``; residual and FFN dropped."""
    q, _, v = qkv(block.attn, block.ln_1(inp.x))
    return attention_branch(block, attend(q, q, v, inp.backend))[:, 1:], inp.grid


@lru_cache(maxsize=32)
def gaussian_bias(h: int, w: int, sigma: float = NACLIP_SIGMA, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """NACLIP's neighbourhood term G ``[1 + h*w, 1 + h*w]``: ``exp(-d^2 / (2 sigma^2))`` with d
    the distance between two patches on the grid (in patches), 0 on the class row and column."""
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    pos = torch.stack((r.flatten(), c.flatten()), dim=1)
    d2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)
    g = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    g[1:, 1:] = torch.exp(-d2 / (2 * sigma ** 2))
    return g.to(device=device, dtype=dtype)


@register_baseline("naclip")
def naclip(block: nn.Module, inp: LastBlockInput, sigma: float = NACLIP_SIGMA):
    """NACLIP: key-key attention plus a Gaussian neighbourhood bias, ``softmax(s KK^T + G) V``;
    residual and FFN dropped (its 'reduced' architecture)."""
    q, k, v = qkv(block.attn, block.ln_1(inp.x))
    # ops.attention takes no additive bias, and G (a Gaussian of grid distance) has no exact
    # low-rank q.k form, so this one softmax is written out. It is one block of one crop batch
    # (N <= ~800 at 448 px), small next to the 11 fused blocks before it.
    acc = _acc_dtype(k)
    ka = k.to(acc)
    bias = gaussian_bias(*inp.grid, float(sigma), str(k.device), acc)
    scores = ka @ ka.transpose(-2, -1) * k.shape[-1] ** -0.5 + bias
    o = (scores.softmax(-1) @ v.to(acc)).to(v.dtype)
    return attention_branch(block, merge_heads(o))[:, 1:], inp.grid


def proxy_attention(features: Tensor, beta: float = PROXYCLIP_BETA,
                    gamma: float = PROXYCLIP_GAMMA) -> Tensor:
    """ProxyCLIP's attention map ``[B, n, n]`` from VFM patch features ``[B, C, h, w]``:
    ``S = cos(f_i, f_j)``, ``A = gamma (S - beta mean(S))``, entries below 0 masked, softmax.

    mean(S) is taken per image (ProxyCLIP runs one crop at a time, where its whole-tensor
    mean is the same). The diagonal is never masked: ``S_ii = 1`` keeps it positive unless
    mean(S) >= 1/beta, where ProxyCLIP's rows would be all -inf and give NaN.
    """
    f = F.normalize(features.flatten(2).to(_acc_dtype(features)), dim=1)  # [B, C, n]
    s = f.transpose(1, 2) @ f
    a = gamma * (s - beta * s.mean(dim=(1, 2), keepdim=True))
    eye = torch.eye(a.shape[-1], dtype=torch.bool, device=a.device)
    return a.masked_fill((a < 0) & ~eye, float("-inf")).softmax(-1)


@register_baseline("proxyclip", needs_vfm=True)
def proxyclip(block: nn.Module, inp: LastBlockInput, beta: float = PROXYCLIP_BETA,
              gamma: float = PROXYCLIP_GAMMA):
    """ProxyCLIP: the VFM's patch affinities (`proxy_attention`) applied to CLIP's values,
    resampled bilinearly from CLIP's grid to the VFM's; residual and FFN dropped. The output
    lives on the VFM grid."""
    if inp.vfm is None:
        raise ValueError("baseline 'proxyclip' needs vfm= (a DINO-style ViT, a "
                         "VisionFoundationModel, or a checkpoint path)")
    feats = inp.vfm(inp.images, clip_mean=inp.image_mean, clip_std=inp.image_std)
    grid = tuple(feats.shape[-2:])
    # The map is a masked softmax of VFM affinities, not softmax(q k^T) of any q, k with V's
    # head dim, so ops.attention cannot take it; it is one [n, n] map shared by every head.
    attn = proxy_attention(feats, beta, gamma)
    v = value(block.attn, block.ln_1(inp.x))[:, :, 1:]  # [B, heads, h*w, d], no class token
    B, H, _, d = v.shape
    v = v.reshape(B * H, *inp.grid, d).permute(0, 3, 1, 2)
    v = F.interpolate(v.to(attn.dtype), size=grid, mode="bilinear", align_corners=False)
    v = v.flatten(2).transpose(1, 2).reshape(B, H, -1, d)
    o = (attn.unsqueeze(1) @ v).to(inp.x.dtype)
    return attention_branch(block, merge_heads(o)), grid


def run_baseline(name: str, block: nn.Module, inp: LastBlockInput):
    """Runs baseline ``name`` on the last block; returns (patch tokens, grid)."""
    baseline = get_baseline(name)
    if not baseline.any_block:
        require_standard_block(block, f"baseline {baseline.name!r}")
    return baseline.fn(block, inp)

