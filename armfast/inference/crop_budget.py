"""How many crops go through CLIP at once: a memory budget and a per-crop estimate.

Sliding-window inference runs the windows of one or several images as one batch; a batch
takes memory in proportion to its crops, so the batch is cut to what a budget allows. The
budget is the caller's (``max_memory``: bytes or ``"4GiB"``), else half the free memory of a
GPU, else a fixed 2 GiB on CPU. The estimate is the working set of one crop in the largest
block (the residual stream, LayerNorm output, q/k/v, the MLP's hidden layer and GELU output),
the shallow tokens ARM keeps, explicit softmax matrices where the backend writes them out,
ARM's own block and the crop's logits; a test checks it against measured peaks.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Union

import torch

CPU_BUDGET = 2 << 30  # bytes: a fixed budget on CPU, where batches past ~8 crops gain nothing
GPU_FREE_FRACTION = 0.5  # of the free memory when the segmentor is built
MAX_CROPS = 64  # past this a batch only costs memory: the matmuls are already large

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12,
          "tb": 10**12}


def parse_bytes(value: Union[int, float, str]) -> int:
    """A size in bytes from ``4096``, ``"512MiB"``, ``"4GiB"``, ``"2.5GB"`` (case-insensitive)."""
    if isinstance(value, bool):
        raise TypeError(f"a memory size must be a number of bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"a memory size must look like 4096, '512MiB' or '4GiB', got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise TypeError(f"a memory size must be a number of bytes or a string like '4GiB', got "
                        f"{type(value).__name__}")
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"a memory size must be at least one byte, got {value!r}")
    return int(size)


def default_budget(device: torch.device | str) -> int:
    """Bytes a crop batch may take on `device`: half the free GPU memory, 2 GiB on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * GPU_FREE_FRACTION))
    return CPU_BUDGET


def resolve_budget(max_memory, device: torch.device | str) -> int:
    """`max_memory` (None, bytes or a string) as bytes on `device`."""
    return default_budget(device) if max_memory is None else parse_bytes(max_memory)


def crop_bytes(*, tokens: int, width: int, heads: int, queries: int, patches: int,
               embed_dim: int, shallow_layers: int = 0, explicit_softmax: bool = False,
               arm_heads: Optional[int] = None, elem_size: int = 4, held_blocks: int = 0,
               held_maps: int = 0) -> int:
    """Estimated peak bytes one crop adds to a batch (see the module docstring).

    tokens: CLIP tokens of the crop (patches + class token); width: ViT width; heads: CLIP
    heads; queries: text embeddings scored; patches: tokens of the deep features (the VFM's
    for proxyclip); shallow_layers: how many layers ARM keeps (0 without ARM);
    explicit_softmax: a ``[heads, T, T]`` score matrix is written out (the reference backend);
    arm_heads: ARM's heads when ARM runs; elem_size: bytes per activation; held_blocks,
    held_maps: earlier blocks' outputs and float32 ``[heads, T, T]`` attention maps the baseline
    reads in its last block (SC-CLIP, SFP, ResCLIP), which also build a few float32 ``[T, T]``
    similarity or distance matrices.
    """
    f32 = 4
    # x, LN(x) in float32; q, k, v, up to three attention outputs, out_proj, MLP 4W + GELU 4W
    block = tokens * width * (2 * f32 + 16 * elem_size)
    kept = shallow_layers * patches * width * f32
    scores = 3 * heads * tokens * tokens * f32 if explicit_softmax else 0
    arm = 0
    if arm_heads:
        arm = patches * embed_dim * (4 * f32 + 12 * elem_size)
        arm += 3 * arm_heads * patches * patches * f32 if explicit_softmax else 0
    logits = 2 * patches * queries * f32
    held = held_blocks * tokens * width * elem_size + held_maps * heads * tokens * tokens * f32
    if held_blocks or held_maps:
        held += 4 * tokens * tokens * f32
    return block + kept + scores + arm + logits + held


def crops_per_batch(budget: int, per_crop: int, cap: int = MAX_CROPS) -> int:
    """Crops that fit in `budget` at `per_crop` bytes each, between 1 and `cap`."""
    return max(1, min(cap, budget // max(per_crop, 1)))
