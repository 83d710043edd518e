"""The benchmark cases: which op, in which mode, on which shapes, and how much work each is.

A `Case` is a pure description (hashable, no tensors); `armfast.bench.workloads` builds its
inputs. FLOP and byte counts follow the design contract (ARM_DESIGN.md, section 5):

- attention forward: ``4 Nq Nk d`` FLOPs per head (the two matmuls); backward about 2.5x the
  forward (five matmuls, one of them the recomputation of ``q k^T``), so forward+backward is
  3.5x. Memory floor per head: forward reads q, k, v and writes out, ``(2 Nq + 2 Nk) d``
  elements; backward reads q, k, v, out, dout and writes dq, dk, dv, ``(4 Nq + 4 Nk) d`` more.
  The row log-sum-exp (one float per query row) is left out of the floor.
- patch_text_logits forward: ``2 B N C E`` FLOPs (the matmul; normalisation is O(B N E) and
  left out); backward is two matmuls of the same size (to x and to text), so 3x in all.
  Memory floor: read x and text, write the logits; backward reads dout, x, text and writes dx,
  dtext.
- arm: matmul FLOPs of the module (every projection, the two attentions, the MLP); a training
  step adds the logits against C fixed text embeddings and the backward (2x for the linear
  layers, 2.5x for attention, 1x for the logits, whose text side gets no gradient).
  LayerNorm, softmax and element-wise work is not counted.
- clip: matmul FLOPs of the ViT forward (patch embedding, every block, the output projection
  of the patch tokens) with the baseline's last block (SCLIP: the q-q and k-k scores and one
  product of their summed softmaxes with v; ClearCLIP/NACLIP: no MLP; MaskCLIP: the value path
  only), plus the logits, plus the ARM forward in the ``+arm`` variant. No byte floor is given
  for arm and clip.
- the baseline attentions (forward only, as the baselines run frozen), per head: ``4 N^2 d``
  for self_correlation and gaussian_self_correlation (one attention; NACLIP's bias is
  element-wise), ``6 N^2 d`` for self_correlation_sum (two score products, one value product);
  masked_affinity_attention ``n (n + 1) C`` per image for the affinities (one symmetric S for
  all heads: its distinct entries once) plus ``2 n^2 d`` per head (`armfast.ops._specs` holds
  these key functions). Memory floor: read the inputs, write the
  output (x, v, out: ``3 N d`` per head; SCLIP ``4 N d``; ProxyCLIP ``n C`` per image plus
  ``2 n d`` per head). SC-CLIP's ops at their algorithmic minimum, S once per image:
  similarity_aggregation ``2 N^2 (C + D)`` per image (S, then W x), averaged_dual_softmax
  ``2 N^2 C`` per image plus ``4 N^2 d`` per head (k k^T, one product of the averaged map with
  v). Memory floor: read f and the values, write the output (``N (C + 2 D)`` per image;
  ``N C`` per image plus ``3 N d`` per head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..ops._specs import OPS as OP_SPECS

SC_CLIP_OPS = ("similarity_aggregation", "averaged_dual_softmax")
BASELINE_OPS = ("self_correlation", "self_correlation_sum", "gaussian_self_correlation",
                "masked_affinity_attention", *SC_CLIP_OPS)
OPS = ("attention", "patch_text_logits", "arm", "clip", *BASELINE_OPS)
FORWARD_ONLY = ("clip", *BASELINE_OPS)  # inference only: no "train" cases
MODES = ("forward", "train")
# full: the design's shapes; quick: one or two small shapes per op; tiny: toy shapes for tests;
# host: the smallest real calls, where the time is all host overhead (validation, dispatch,
# launch), compared with SDPA's; tune: host + full, what `armfast bench --tune` measures to
# write the auto table
PRESETS = ("full", "quick", "tiny", "host", "tune")
TABLE_OPS = ("attention", "patch_text_logits", *BASELINE_OPS)  # the ops the auto table holds

# ViT-B/16 at the crop sizes of the inference protocol: 224/336/448 -> 196/441/784 patch tokens.
PATCH_SIZE = 16
CROPS = (224, 336, 448)
BATCHES = (1, 16)
HEAD_DIM = 64
ARM_HEADS, CLIP_HEADS = 8, 12
VFM_PATCH, VFM_WIDTH = 8, 768  # ProxyCLIP's DINO ViT-B/8: its grid is twice CLIP's
NUM_CLASSES = 171  # COCO-Stuff-164k, ARM's training set
CLIP_WIDTH, CLIP_LAYERS, CLIP_EMBED = 768, 12, 512  # ViT-B/16
CLIP_MODEL = "ViT-B-16"
CLIP_BASELINE = "sclip"  # baselines differ only in the last block: one stands for all
MLP_RATIO = 4


def tokens(crop: int, patch: int = PATCH_SIZE) -> int:
    """Patch tokens of a square crop: 224 -> 196 for a /16 ViT."""
    return (crop // patch) ** 2


@dataclass(frozen=True)
class Case:
    """One benchmark: op, mode ("forward", or "train" = forward+backward / a training step),
    named sizes (ordered), the dtype of the computation and, for clip, the variant."""

    op: str
    mode: str
    dims: tuple[tuple[str, int], ...]
    dtype: torch.dtype = torch.float32
    variant: str = ""

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}; got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.op in FORWARD_ONLY and self.mode != "forward":
            raise ValueError(f"{self.op} cases are inference only: mode must be 'forward'")

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def label(self) -> str:
        """Human-readable shape: ``B=1 H=8 N=196 d=64`` (Nq/Nk only when they differ)."""
        s = self.shape
        if "Nq" in s and s["Nq"] == s["Nk"]:
            s = {("N" if k == "Nq" else k): v for k, v in s.items() if k != "Nk"}
        return " ".join(f"{k}={v}" for k, v in s.items())

    @property
    def group(self) -> str:
        """What the rows of one comparison share, apart from the shape: op, mode, variant."""
        return " ".join(p for p in (self.op, self.mode, self.variant) if p)

    @property
    def id(self) -> str:
        """A compact identifier for test ids and file names."""
        parts = [self.op, self.mode, self.variant, *(f"{k}{v}" for k, v in self.dims),
                 str(self.dtype).replace("torch.", "")]
        return "-".join(p for p in parts if p)

    @property
    def flops(self) -> int:
        s, train = self.shape, self.mode == "train"
        if self.op == "attention":
            return attention_flops(s["B"], s["H"], s["Nq"], s["Nk"], s["d"], backward=train)
        if self.op == "patch_text_logits":
            return patch_text_logits_flops(s["B"], s["N"], s["C"], s["E"], backward=train)
        if self.op in BASELINE_OPS:
            spec = OP_SPECS[self.op]
            return spec.key(*(s[n] for n in spec.sizes))[1]
        if self.op == "arm":
            return arm_flops(s["B"], s["N"], width=s["W"], embed_dim=s["E"], heads=s["h"],
                             head_dim=s["d"], classes=s["C"], train=train)
        baseline, _, arm = self.variant.partition("+")
        return clip_flops(s["B"], s["crop"], baseline=baseline, classes=s["C"], with_arm=arm == "arm")

    @property
    def min_bytes(self) -> Optional[int]:
        """The memory-traffic floor in bytes, or None where the contract gives none."""
        s, train = self.shape, self.mode == "train"
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.op == "attention":
            return attention_bytes(s["B"], s["H"], s["Nq"], s["Nk"], s["d"], elem, backward=train)
        if self.op == "patch_text_logits":
            return patch_text_logits_bytes(s["B"], s["N"], s["C"], s["E"], elem, backward=train)
        if self.op == "masked_affinity_attention":
            return s["B"] * s["n"] * (s["C"] + 2 * s["H"] * s["d"]) * elem
        if self.op == "similarity_aggregation":
            return s["B"] * s["N"] * (s["C"] + 2 * s["D"]) * elem
        if self.op == "averaged_dual_softmax":
            return s["B"] * s["N"] * (s["C"] + 3 * s["H"] * s["d"]) * elem
        if self.op in BASELINE_OPS:
            tensors = 4 if self.op == "self_correlation_sum" else 3  # inputs, and the output
            return tensors * s["B"] * s["H"] * s["N"] * s["d"] * elem
        return None


def attention_flops(B: int, H: int, Nq: int, Nk: int, d: int, *, backward: bool = False) -> int:
    """``4 Nq Nk d`` per head forward; forward+backward is 3.5x that."""
    forward = 4 * B * H * Nq * Nk * d
    return forward * 7 // 2 if backward else forward


def attention_bytes(B: int, H: int, Nq: int, Nk: int, d: int, elem_size: int, *,
                    backward: bool = False) -> int:
    """``(2 Nq + 2 Nk) d`` elements per head forward, ``(6 Nq + 6 Nk) d`` with the backward."""
    per_head = (6 if backward else 2) * (Nq + Nk) * d
    return B * H * per_head * elem_size


def patch_text_logits_flops(B: int, N: int, C: int, E: int, *, backward: bool = False) -> int:
    """``2 B N C E`` forward; 3x with the backward (dx and dtext are matmuls of the same size)."""
    forward = 2 * B * N * C * E
    return 3 * forward if backward else forward


def patch_text_logits_bytes(B: int, N: int, C: int, E: int, elem_size: int, *,
                            backward: bool = False) -> int:
    x, text, logits = B * N * E, C * E, B * N * C
    elements = x + text + logits
    if backward:  # read dout, x, text; write dx, dtext
        elements += logits + 2 * x + 2 * text
    return elements * elem_size


def arm_flops(B: int, N: int, *, width: int = CLIP_WIDTH, embed_dim: int = CLIP_EMBED,
              heads: int = ARM_HEADS, head_dim: int = HEAD_DIM, mlp_ratio: float = MLP_RATIO,
              classes: int = NUM_CLASSES, train: bool = False) -> int:
    """Matmul FLOPs of the ARM forward (plus logits and backward for a training step)."""
    inner, E, T = heads * head_dim, embed_dim, B * N
    hidden = int(E * mlp_ratio)
    linear = 2 * T * (width * inner      # cross-attention q from the fused shallow tokens
                      + 2 * E * inner    # k, v from the deep features
                      + inner * E        # cross-attention out
                      + E * 3 * inner    # self-attention qkv
                      + inner * E        # self-attention out
                      + 2 * E * hidden)  # MLP
    attn = 2 * attention_flops(B, heads, N, N, head_dim)  # cross- and self-attention
    if not train:
        return linear + attn
    logits = patch_text_logits_flops(B, N, classes, E)  # backward: to x only (text is fixed)
    return 3 * linear + 2 * logits + attn * 7 // 2


def vit_flops(B: int, crop: int, *, width: int = CLIP_WIDTH, layers: int = CLIP_LAYERS,
              embed_dim: int = CLIP_EMBED, patch: int = PATCH_SIZE) -> int:
    """Matmul FLOPs of a standard ViT forward on square crops, CLS included, projection of the
    patch tokens to ``embed_dim`` at the end."""
    N = tokens(crop, patch)
    T = N + 1
    patch_embed = 2 * N * 3 * patch * patch * width
    block = 2 * T * width * (3 * width + width + 2 * MLP_RATIO * width) + 4 * T * T * width
    proj = 2 * N * width * embed_dim
    return B * (patch_embed + layers * block + proj)


def last_block_delta(baseline: str, T: int, width: int = CLIP_WIDTH) -> int:
    """FLOPs a baseline's last block does beyond a standard block, on T tokens."""
    W = width
    if baseline == "sclip":  # (softmax(qq^T) + softmax(kk^T)) v: one more score product
        return 2 * T * T * W
    if baseline in ("clearclip", "naclip"):  # the residual and the MLP are dropped
        return -2 * T * W * 2 * MLP_RATIO * W
    if baseline == "maskclip":  # out_proj(v): no q, k projections, no attention
        return -(2 * T * W * 2 * W + 4 * T * T * W)
    return 0


def clip_flops(B: int, crop: int, *, baseline: str = CLIP_BASELINE, classes: int = NUM_CLASSES,
               with_arm: bool = False) -> int:
    """FLOPs of CLIP ViT-B/16 with `baseline` per batch of crops, logits included, ARM optional."""
    N = tokens(crop)
    total = vit_flops(B, crop) + B * last_block_delta(baseline, N + 1)
    total += patch_text_logits_flops(B, N, classes, CLIP_EMBED)
    if with_arm:
        total += arm_flops(B, N)
    return total


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs, where the fused kernels are meant to run."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _attention_shapes(preset: str) -> Iterator[dict]:
    if preset in ("host", "tune"):
        yield dict(B=1, H=1, Nq=8, Nk=8, d=32)
        if preset == "host":
            return
        preset = "full"
    if preset == "tiny":
        yield dict(B=1, H=2, Nq=17, Nk=17, d=HEAD_DIM)
        return
    if preset == "quick":
        yield dict(B=1, H=ARM_HEADS, Nq=tokens(224), Nk=tokens(224), d=HEAD_DIM)
        yield dict(B=1, H=CLIP_HEADS, Nq=tokens(448) + 1, Nk=tokens(448) + 1, d=HEAD_DIM)
        return
    for B in BATCHES:
        for crop in CROPS:
            N = tokens(crop)
            yield dict(B=B, H=ARM_HEADS, Nq=N, Nk=N, d=HEAD_DIM)  # ARM: patch tokens only
            yield dict(B=B, H=CLIP_HEADS, Nq=N + 1, Nk=N + 1, d=HEAD_DIM)  # CLIP: with CLS


def _batch_crops(preset: str) -> Iterator[tuple[int, int]]:
    if preset in ("full", "tune"):
        yield from ((B, crop) for B in BATCHES for crop in CROPS)
    else:
        yield 1, 224


def _baseline_shapes(op: str, preset: str) -> Iterator[dict]:
    """CLIP's last block (12 heads of 64, class token and h x w patches) at the crops; for
    ProxyCLIP the VFM's patches (twice CLIP's grid) with its 768 features; for SC-CLIP CLIP's
    tokens with its 768 features (and 768 values for the aggregation)."""
    def shape(B: int, H: int, side: int, d: int, C: int = VFM_WIDTH) -> dict:
        if op == "masked_affinity_attention":
            return dict(B=B, n=side * side, C=C, H=H, d=d)
        if op == "similarity_aggregation":
            return dict(B=B, N=side * side + 1, C=C, D=C)
        if op == "averaged_dual_softmax":
            return dict(B=B, N=side * side + 1, C=C, H=H, d=d)
        grid = dict(h=side, w=side) if op == "gaussian_self_correlation" else {}
        return dict(B=B, H=H, N=side * side + 1, **grid, d=d)

    vfm_side = PATCH_SIZE // VFM_PATCH if op == "masked_affinity_attention" else 1
    if preset in ("host", "tune"):
        yield shape(1, 1, 2, 32, C=32)
        if preset == "host":
            return
        preset = "full"
    if preset == "tiny":
        yield shape(1, 2, 4, HEAD_DIM, C=32)
    elif preset == "quick":
        for crop in (224, 448):
            yield shape(1, CLIP_HEADS, crop // PATCH_SIZE * vfm_side, HEAD_DIM)
    else:
        for B, crop in _batch_crops(preset):
            yield shape(B, CLIP_HEADS, crop // PATCH_SIZE * vfm_side, HEAD_DIM)


def _shapes(op: str, preset: str) -> Iterator[dict]:
    if op in BASELINE_OPS:
        yield from _baseline_shapes(op, preset)
    elif op == "attention":
        yield from _attention_shapes(preset)
    elif op == "patch_text_logits":
        if preset in ("host", "tune"):
            yield dict(B=1, N=8, C=4, E=32)
            if preset == "host":
                return
            preset = "full"
        if preset == "tiny":
            yield dict(B=1, N=17, C=5, E=32)
        elif preset == "quick":
            yield dict(B=1, N=tokens(448), C=NUM_CLASSES, E=CLIP_EMBED)
        else:
            for B, crop in _batch_crops(preset):
                yield dict(B=B, N=tokens(crop), C=NUM_CLASSES, E=CLIP_EMBED)
    elif op == "arm":
        if preset == "tiny":  # a narrow ARM; head_dim 32 is one every backend must take
            yield dict(B=1, N=17, W=64, E=64, h=2, d=32, C=5)
        else:
            for B, crop in _batch_crops(preset):
                yield dict(B=B, N=tokens(crop), W=CLIP_WIDTH, E=CLIP_EMBED, h=ARM_HEADS,
                           d=HEAD_DIM, C=NUM_CLASSES)
    else:  # clip: ViT-B/16 whatever the preset; tiny only shrinks the crop
        if preset == "tiny":
            yield dict(B=1, crop=64, N=tokens(64), C=5)
        else:
            for B, crop in _batch_crops(preset):
                yield dict(B=B, crop=crop, N=tokens(crop), C=NUM_CLASSES)


def make_cases(ops: Iterable[str] = OPS, preset: str = "full", *, dtype: torch.dtype = torch.float32,
               modes: Sequence[str] = MODES) -> list[Case]:
    """Every case of `ops` in `preset` ("full": the design's shapes; "quick": one or two small
    shapes per op; "tiny": toy shapes for tests), in `modes`."""
    ops = list(ops)
    for name, values, allowed in (("ops", ops, OPS), ("modes", modes, MODES)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise ValueError(f"{name} must be drawn from {', '.join(allowed)}; got {unknown}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    cases = []
    for op in ops:
        for mode in modes:
            if op in FORWARD_ONLY and mode != "forward":
                continue
            for shape in _shapes(op, preset):
                dims = tuple(shape.items())
                if op == "clip":
                    cases += [Case(op, mode, dims, dtype, CLIP_BASELINE),
                              Case(op, mode, dims, dtype, CLIP_BASELINE + "+arm")]
                else:
                    cases.append(Case(op, mode, dims, dtype))
    return cases
