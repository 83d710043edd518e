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

scclip (SC-CLIP), sfp (SFP) and resclip (ResCLIP's RCS) also read earlier blocks' outputs or
attention maps (`LastBlockInput.hidden` / ``.attention``, filled by `armfast.clip.extract` for
the blocks their `Baseline` names); they live in `armfast.clip.calibrated`. A baseline's keyword
options (naclip's ``sigma``, resclip's ``rcs_lambda``, ...) come through ``options``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._specs import gaussian_bias  # noqa: F401  (NACLIP's G as a tensor, for inspection)
from .blocks import (attention_branch, block_forward, merge_heads, mlp_residual, qkv,
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
    # what some baselines read from earlier blocks (0-based block -> tensor), only the blocks
    # their `Baseline` names: outputs [B, 1 + h*w, W] and attention probabilities
    # [B, heads, 1 + h*w, 1 + h*w] (float32 or wider)
    hidden: Mapping[int, Tensor] = field(default_factory=dict)
    attention: Mapping[int, Tensor] = field(default_factory=dict)
    depth: int = 0  # blocks in the tower (the last block is depth - 1); 0: not given


BaselineFn = Callable[[nn.Module, LastBlockInput], "tuple[Tensor, tuple[int, int]]"]


@dataclass(frozen=True)
class Baseline:
    name: str
    fn: BaselineFn
    needs_vfm: bool = False
    any_block: bool = False  # True: runs on blocks that are not open_clip's standard one
    # earlier blocks whose outputs / attention maps the baseline reads (`LastBlockInput.hidden`
    # and `.attention`); 0-based, negative ones count from the end (-2: the last block's input)
    hidden_blocks: tuple[int, ...] = ()
    attention_blocks: tuple[int, ...] = ()

    def blocks(self, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(hidden, attention) block indices on a tower of `depth` blocks; ValueError when one
        is not a block before the last."""
        out = []
        for wanted in (self.hidden_blocks, self.attention_blocks):
            resolved = tuple(i % depth if -depth <= i < depth else i for i in wanted)
            if any(not 0 <= i < depth - 1 for i in resolved):
                raise ValueError(f"baseline {self.name!r} reads blocks {wanted} (0-based, negative "
                                 f"from the end) and needs them before the last block; this "
                                 f"tower has {depth} blocks")
            out.append(resolved)
        return out[0], out[1]

    def options(self) -> tuple[str, ...]:
        """The keyword options ``fn`` takes after (block, inp), e.g. naclip's ``sigma``."""
        return tuple(inspect.signature(self.fn).parameters)[2:]


BASELINES: dict[str, Baseline] = {}


def register_baseline(name: str, *, needs_vfm: bool = False, any_block: bool = False,
                      hidden_blocks: Sequence[int] = (), attention_blocks: Sequence[int] = ()):
    """Decorator adding ``fn(block, inp, **options) -> (patch tokens [B, N', W], (h', w'))``
    to BASELINES."""
    def wrap(fn: BaselineFn) -> BaselineFn:
        BASELINES[name] = Baseline(name, fn, needs_vfm, any_block, tuple(hidden_blocks),
                                   tuple(attention_blocks))
        return fn
    return wrap


def get_baseline(name: str) -> Baseline:
    if not isinstance(name, str):
        raise TypeError(f"baseline must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {name!r}")
    return BASELINES[key]


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
    the summed map add up to 2), one fused op; residual and FFN kept."""
    q, k, v = qkv(block.attn, block.ln_1(inp.x))
    o = ops.self_correlation_sum(q, k, v, backend=inp.backend, layout="bnhd").flatten(2)
    return mlp_residual(block, inp.x + attention_branch(block, o))[:, 1:], inp.grid


@register_baseline("clearclip")
def clearclip(block: nn.Module, inp: LastBlockInput):
    """ClearCLIP: query-query attention ``softmax(s QQ^T) V``; residual and FFN dropped."""
    q, _, v = qkv(block.attn, block.ln_1(inp.x))
    o = ops.self_correlation(q, v, backend=inp.backend, layout="bnhd").flatten(2)
    return attention_branch(block, o)[:, 1:], inp.grid


@register_baseline("naclip")
def naclip(block: nn.Module, inp: LastBlockInput, sigma: float = NACLIP_SIGMA):
    """NACLIP: key-key attention plus a Gaussian neighbourhood bias, ``softmax(s KK^T + G) V``
    (G from the grid, 0 on the class token; `armfast.ops.gaussian_self_correlation`); residual
    and FFN dropped (its 'reduced' architecture)."""
    _, k, v = qkv(block.attn, block.ln_1(inp.x))
    o = ops.gaussian_self_correlation(k, v, grid=inp.grid, sigma=float(sigma), backend=inp.backend,
                                      layout="bnhd").flatten(2)
    return attention_branch(block, o)[:, 1:], inp.grid


@register_baseline("proxyclip", needs_vfm=True)
def proxyclip(block: nn.Module, inp: LastBlockInput, beta: float = PROXYCLIP_BETA,
              gamma: float = PROXYCLIP_GAMMA):
    """ProxyCLIP: the VFM's masked patch affinities (`armfast.ops.masked_affinity_attention`:
    ``softmax(gamma (S - beta mean(S)))``, S the cosines of the VFM's patch features, negatives
    masked but the diagonal kept, mean(S) per image as ProxyCLIP runs one crop at a time) applied
    to CLIP's values resampled bilinearly from CLIP's grid to the VFM's; residual and FFN dropped.
    The output lives on the VFM grid."""
    if inp.vfm is None:
        raise ValueError("baseline 'proxyclip' needs vfm= (a DINO-style ViT, a "
                         "VisionFoundationModel, or a checkpoint path)")
    feats = inp.vfm(inp.images, clip_mean=inp.image_mean, clip_std=inp.image_std)
    grid = tuple(feats.shape[-2:])
    dtype = inp.x.dtype
    v = value(block.attn, block.ln_1(inp.x))[:, :, 1:]  # [B, heads, h*w, d], no class token
    B, H, _, d = v.shape
    v = v.reshape(B * H, *inp.grid, d).permute(0, 3, 1, 2)
    v = F.interpolate(v.to(torch.promote_types(dtype, torch.float32)), size=grid, mode="bilinear",
                      align_corners=False)
    v = v.flatten(2).transpose(1, 2).reshape(B, H, -1, d).to(dtype)
    f = feats.flatten(2).transpose(1, 2).to(dtype)  # [B, n, C], a view for float32 features
    o = ops.masked_affinity_attention(f, v, beta=beta, gamma=gamma, backend=inp.backend,
                                      layout="bnhd").flatten(2)
    return attention_branch(block, o), grid


def check_options(name: str, options: Optional[Mapping[str, object]]) -> dict:
    """``options`` as a dict, checked against the keyword options baseline ``name`` takes."""
    baseline = get_baseline(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(baseline.options()))
    if unknown:
        known = ", ".join(baseline.options()) or "none"
        raise ValueError(f"baseline_options: baseline {baseline.name!r} has no option "
                         f"{', '.join(unknown)} (it takes: {known})")
    return options


def run_baseline(name: str, block: nn.Module, inp: LastBlockInput,
                 options: Optional[Mapping[str, object]] = None):
    """Runs baseline ``name`` on the last block with its keyword ``options``; returns (patch
    tokens, grid)."""
    baseline = get_baseline(name)
    options = check_options(baseline.name, options)
    if not baseline.any_block:
        require_standard_block(block, f"baseline {baseline.name!r}")
    return baseline.fn(block, inp, **options)

