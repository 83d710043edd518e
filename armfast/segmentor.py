"""Open-vocabulary segmentation with a CLIP baseline, optionally refined by ARM.

The protocol the baselines publish (SCLIP, NACLIP, ClearCLIP, ProxyCLIP):

1. resize so that the short side is ``short_side`` (mmseg's ``Resize(scale=(2048, short_side),
   keep_ratio=True)``: the long side is also capped at 2048);
2. slide ``crop`` windows with ``stride``; the windows of an image, and of the next images of
   a stream (`Segmentor.stream`), run in batches as large as the memory budget allows
   (`armfast.windows`, `armfast.crop_budget`), replayed from CUDA graphs on a GPU
   (`armfast.graphs`);
3. per crop: baseline deep features -> ARM (if any) -> cosine logits against the text
   embeddings (`armfast.ops.patch_text_logits`) -> bilinear upsampling to the crop's pixels;
4. average overlapping logits, resize to the input image;
5. multiply by ``logit_scale`` (ARM's learnt tau when ARM is used), softmax over every synonym
   (background words included), max over each class's synonyms, optional ``area_thd`` (SCLIP's
   VOC21 rule), argmax, and pixels whose best probability is under the background's
   ``prob_thd`` go to the background class (`armfast.background`).

Without an explicit protocol the values are the default preset of the baseline on the CLIP's
backbone (`armfast.eval.presets.default_preset`), the ones the benchmark path starts from.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import crop_budget, ops
from . import precision as precision_lib
from .background import Background, parse_background
from .clip import model as clip_model_lib
from .clip.text import TextEmbeddings, encode_classes, encode_names, normalize_classes
from .data.classnames import describe_duplicates, duplicate_names
from .graphs import GraphedCall
from .windows import WindowStream, slide_boxes

PROTOCOL_FIELDS = ("short_side", "crop", "stride", "logit_scale", "prob_thd", "area_thd")
MAX_LONG_SIDE = 2048


def _pair(name: str, v) -> Optional[tuple[int, int]]:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
        return None
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int, a (height, width) pair, or 0/None "
                         f"for off; got {v!r}")
    return t


def to_image_tensor(image) -> Tensor:
    """A PIL image, an ``HxW[x3|x4]`` array, a ``[3, H, W]`` tensor (uint8, or floats in
    [0, 1]) or a path -> float32 ``[3, H, W]`` in [0, 1]. Files and PIL images reach the model
    as a viewer shows them (`armfast.data.images.to_rgb`)."""
    import numpy as np

    from PIL import Image

    from .data.images import open_rgb, to_rgb

    if isinstance(image, (str, os.PathLike)):
        image = open_rgb(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image: as a viewer shows it
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None].repeat(3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        if image.shape[-1] == 4:  # RGBA: composited as for an RGBA file or PIL image
            if image.dtype != np.uint8:
                raise TypeError(f"an RGBA image array must be uint8, got {image.dtype}")
            image = np.asarray(to_rgb(Image.fromarray(image, mode="RGBA")))
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a PIL image, a numpy array, a tensor or a path, got "
                        f"{type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or 0 in image.shape:
        raise ValueError(f"image tensor must be [3, H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(f"image tensor must be uint8 or floating point, got {image.dtype}")
    return image.float()


@dataclass
class Prepared:
    """An image ready for the windows: CLIP-normalised pixels at the protocol's size, the size
    to return results at, and whatever the caller attaches (``meta``: a mask, a file name)."""

    pixels: Tensor  # [1, 3, h, w] float32
    size: tuple[int, int]  # (H, W) of the input image
    meta: Any = field(default=None, compare=False)

    def pin_memory(self) -> "Prepared":  # DataLoader(pin_memory=True) calls this in its thread
        meta = self.meta.pin_memory() if isinstance(self.meta, Tensor) else self.meta
        return Prepared(self.pixels.pin_memory(), self.size, meta)


def resize_scale(height: int, width: int, short_side: Optional[int]) -> float:
    """mmseg's ``Resize(scale=(2048, short_side), keep_ratio=True)``: the factor that takes the
    short side to ``short_side`` with the long side at most 2048 (None: 1)."""
    if short_side is None:
        return 1.0
    return min(short_side / min(height, width), MAX_LONG_SIDE / max(height, width))


def resized_size(height: int, width: int, short_side: Optional[int]) -> tuple[int, int]:
    """The image size after `resize_scale`."""
    scale = resize_scale(height, width, short_side)
    if scale == 1.0:
        return height, width
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class Preparer:
    """``preparer(image) -> Prepared``: an image (see `to_image_tensor`) resized to the short
    side (bilinear, antialiased when shrinking) and CLIP-normalised. A plain picklable object,
    so that DataLoader workers decode and resize off the main process."""

    short_side: Optional[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image, device=None, meta=None) -> Prepared:
        if device is not None and isinstance(image, Tensor) and image.dtype == torch.uint8:
            image = image.to(device)  # copy the bytes, convert there (4x less to move)
        x = to_image_tensor(image)
        H, W = x.shape[-2:]
        x = x.to(device)[None] if device is not None else x[None]
        size = resized_size(H, W, self.short_side)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=resize_scale(H, W, self.short_side) < 1)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return Prepared((x - mean) / std, (int(H), int(W)), meta)


def load_arm(arm, what: str = "arm"):
    """An `armfast.ARM` from an instance or a local folder written by ``save_pretrained`` (every
    file checked, see `armfast.arm_folder`); errors name `what` (e.g. ``--arm``)."""
    from .arm import ARM

    if arm is None or isinstance(arm, ARM):
        return arm
    if isinstance(arm, (str, os.PathLike)):
        path = Path(arm)
        if path.is_file():
            kind = ("a training checkpoint; the trained ARM is the folder OUT/arm"
                    if path.parent.name == "checkpoints" else "a file")
            raise ValueError(f"{what}: {path} is {kind}; give the ARM folder (model.safetensors "
                             f"and config.json, written by ARM.save_pretrained or armfast train)")
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: no ARM folder at {str(path)!r}")
        try:
            return ARM.from_pretrained(str(path))
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(f"{what}: {exc}") from exc
    raise TypeError(f"{what} must be an ARM, a checkpoint directory or None, got "
                    f"{type(arm).__name__}")


class Segmentor:
    """Open-vocabulary semantic segmentation with CLIP, a training-free baseline and ARM.

    Args:
        clip_model: an open_clip CLIP (`armfast.clip.load_clip`).
        classes: class names (``["cat", ["person", "people"], ...]``, a list per class for
            synonyms), a `TextEmbeddings`, or a ``[S, E]`` tensor of text embeddings (then
            ``class_index`` maps rows to classes; default one row per class).
        baseline: the last-block rewrite, see `armfast.clip.BASELINES`.
        arm: None, an `armfast.ARM` or its ``save_pretrained`` directory.
        vfm: proxyclip's vision foundation model (object or checkpoint path).
        protocol: any object with ``short_side``, ``crop``, ``stride``, ``logit_scale``
            (and optionally ``prob_thd``, ``area_thd``) attributes, e.g.
            `armfast.eval.protocols.Protocol`; the keyword arguments below override it. None:
            the baseline's default preset for this CLIP's backbone.
        short_side, crop, stride: resizing and sliding window (ints or (h, w));
            ``short_side=0`` keeps the image size, ``crop=0`` runs the whole image at once.
        logit_scale: softmax temperature on cosine logits without ARM (ARM brings its own tau).
        background: the background rule, a `Background` or a spec parsed by
            `armfast.background.parse_background` (``"none"``, ``"thd:0.3"``,
            ``"words:sky,wall"``, ``"words+thd:0.1"``). By default it adds a class
            "background" at index 0 to ``classes``. When given it is the whole rule: the
            protocol's ``prob_thd`` is not used.
        prob_thd, background_index: the low-level rule for class lists that already hold their
            background class (the benchmark class files): pixels under ``prob_thd`` get class
            ``background_index`` (default 0). Used when ``background`` is None.
        area_thd: SCLIP's VOC21 rule, see `postprocess`.
        templates: prompt templates for class names ('openai' = the 80 ImageNet ones).
        backend: `armfast.ops` backend.
        crop_batch_size: crops per forward pass; None: as many as ``max_memory`` allows (at
            most `armfast.crop_budget.MAX_CROPS`).
        max_memory: the memory a crop batch may take, bytes or a string such as ``"4GiB"``;
            None: half the GPU's free memory, 2 GiB on CPU (`armfast.crop_budget`).
        precision: ``"auto"`` (bf16 autocast on CUDA, float32 elsewhere), ``"bf16"``,
            ``"fp16"`` or ``"fp32"``; softmax statistics and logits stay float32
            (`armfast.precision`). ``amp=False`` is the older spelling of ``"fp32"``.
        cuda_graphs: replay the crop forward (CLIP, the baseline's last block, ARM, logits)
            from CUDA graphs, one per crop-batch shape (`armfast.graphs`); None: on for CUDA
            models unless the baseline runs a VFM (arbitrary code). Each graph is checked
            against the eager call once, and a mismatch turns graphs off with a warning.
    """

    def __init__(self, clip_model: nn.Module, classes, *, baseline: str = "sclip", arm=None,
                 vfm=None, class_index: Optional[Tensor] = None, protocol=None,
                 short_side: Union[int, Sequence[int], None] = None,
                 crop: Union[int, Sequence[int], None] = None,
                 stride: Union[int, Sequence[int], None] = None,
                 logit_scale: Optional[float] = None, prob_thd: Optional[float] = None,
                 area_thd: Optional[float] = None, background=None,
                 background_index: Optional[int] = None, templates="openai",
                 backend: str = "auto", crop_batch_size: Optional[int] = None,
                 max_memory: Union[int, str, None] = None, precision: str = "auto",
                 amp: Optional[bool] = None, cuda_graphs: Optional[bool] = None):
        from .clip import as_vfm, get_baseline

        self.clip = clip_model
        self.visual = clip_model_lib.vision_tower(clip_model)
        self.baseline = get_baseline(baseline).name
        self.backbone = clip_model_lib.backbone_of(clip_model)  # None: not a registered one
        if self.backbone is not None and self.baseline not in self.backbone.baselines:
            raise ValueError(f"baseline {self.baseline!r} does not apply to backbone "
                             f"{self.backbone.name} (it takes: {', '.join(self.backbone.baselines)})")
        self.vfm = as_vfm(vfm) if get_baseline(baseline).needs_vfm else None
        self.device = self.visual.conv1.weight.device
        self.backend = backend
        self.precision = precision_lib.from_amp(amp, precision)
        self.autocast_dtype = precision_lib.autocast_dtype(self.precision, self.device)
        if crop_batch_size is not None and (isinstance(crop_batch_size, bool) or not isinstance(
                crop_batch_size, int) or crop_batch_size < 1):
            raise ValueError(f"crop_batch_size must be a positive int or None, got {crop_batch_size!r}")
        self.crop_batch_size = crop_batch_size
        self.max_memory = crop_budget.resolve_budget(max_memory, self.device)
        self.image_mean, self.image_std = clip_model_lib.image_stats(self.visual)
        self.patch = clip_model_lib.patch_size(self.visual)

        self._set_protocol(protocol, short_side=short_side, crop=crop, stride=stride,
                           logit_scale=logit_scale, area_thd=area_thd)
        self.background = self._resolve_background(background, prob_thd, background_index)
        self.templates = "openai" if templates is None else templates
        self._set_text(classes, class_index, templates)

        self.arm = load_arm(arm)
        if self.arm is not None:
            clip_model_lib.check_arm_matches(self.arm.config, self.clip)
            self.arm = self.arm.to(self.device).eval()
        self.shallow_layers = tuple(self.arm.config.shallow_layers) if self.arm is not None else ()
        self.preparer = Preparer(None if self.short_side is None else self.short_side[0],
                                 self.image_mean, self.image_std)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.vfm is None
        self._graphed = GraphedCall(self._batch_logits, enabled=bool(cuda_graphs))
        self._batch_sizes: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ configuration
    def _set_protocol(self, protocol, **overrides) -> None:
        from .eval.presets import default_preset

        if protocol is None:
            backbone = self.backbone.name if self.backbone is not None else None
            protocol = default_preset(self.baseline, backbone).protocol
        missing = [k for k in ("short_side", "crop", "stride", "logit_scale")
                   if not hasattr(protocol, k)]
        if missing:
            raise TypeError(f"protocol must have short_side, crop, stride and logit_scale "
                            f"attributes; {type(protocol).__name__} has no {', '.join(missing)}")
        values = {k: getattr(protocol, k, None) for k in PROTOCOL_FIELDS}
        values["prob_thd"] = values["prob_thd"] or 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        self.short_side = _pair("short_side", values["short_side"])
        if self.short_side is not None and self.short_side[0] != self.short_side[1]:
            raise ValueError(f"short_side must be one int, got {values['short_side']!r}")
        self.crop = _pair("crop", values["crop"])
        self.stride = _pair("stride", values["stride"]) if self.crop is not None else None
        if self.crop is not None and self.stride is None:
            raise ValueError("stride must be set when crop is")
        if self.crop is not None and any(s > c for s, c in zip(self.stride, self.crop)):
            raise ValueError(f"stride {values['stride']!r} is larger than crop {values['crop']!r}: "
                             f"the pixels between the sliding windows would never be covered "
                             f"(stride <= crop)")
        self.logit_scale = float(values["logit_scale"])
        self._protocol_prob_thd = float(values["prob_thd"])
        self.area_thd = None if values["area_thd"] is None else float(values["area_thd"])
        if not math.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be a finite number > 0, got {self.logit_scale}")
        if self.area_thd is not None and not 0.0 <= self.area_thd < 1.0:
            raise ValueError(f"area_thd must be in [0, 1) or None, got {self.area_thd}")

    def _resolve_background(self, background, prob_thd, background_index) -> Background:
        if background is not None:
            if prob_thd is not None or background_index is not None:
                raise ValueError("give either background= or prob_thd=/background_index=, not "
                                 "both (the threshold and index belong to the Background)")
            return parse_background(background)
        index = 0 if background_index is None else background_index
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"background_index must be a non-negative class index, got {index!r}")
        thd = self._protocol_prob_thd if prob_thd is None else float(prob_thd)
        if not 0.0 <= thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {thd}")
        if thd > 0:  # onto a class the caller's list already has
            return Background.threshold(thd, index=index, name=None)
        return Background(index=index, name=None)

    @property
    def prob_thd(self) -> float:
        return self.background.prob_thd

    @property
    def background_index(self) -> int:
        return self.background.index

    def _set_text(self, classes, class_index, templates) -> None:
        if isinstance(classes, TextEmbeddings):
            text, index, names = classes.embeddings, classes.class_index, list(classes.names)
        elif isinstance(classes, Tensor):
            if classes.dim() != 2 or not classes.is_floating_point():
                raise ValueError(f"classes as text embeddings must be a float [S, E] tensor, got "
                                 f"{tuple(classes.shape)} {classes.dtype}")
            text = classes
            index = torch.arange(len(text)) if class_index is None else torch.as_tensor(class_index)
            if index.shape != (len(text),) or index.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"class_index must be an int tensor of shape ({len(text)},), "
                                 f"got {tuple(index.shape)} {index.dtype}")
            names = None
        else:
            found = duplicate_names(normalize_classes(classes))
            if found:  # the later class would lose every pixel to the first
                warnings.warn(f"classes: {describe_duplicates(normalize_classes(classes), found)}",
                              stacklevel=3)
            emb = encode_classes(self.clip, classes, templates)
            text, index, names = emb.embeddings, emb.class_index, list(emb.names)
        index = index.to(device=self.device, dtype=torch.int64)
        C = int(index.max()) + 1
        if int(index.min()) < 0 or set(index.tolist()) != set(range(C)):
            raise ValueError(f"class_index must cover every class 0..{C - 1}, got {index.tolist()}")
        embed_dim = clip_model_lib.output_dim(self.visual)
        if text.shape[-1] != embed_dim:
            raise ValueError(f"text embeddings must have CLIP's embed dim {embed_dim}, got "
                             f"{text.shape[-1]}")
        if names is None:
            class_names = [f"class_{i}" for i in range(C)]
        else:  # the first synonym names the class
            first = {}
            for n, i in zip(names, index.tolist()):
                first.setdefault(i, n)
            class_names = [first[i] for i in range(C)]
        text = text.detach().to(device=self.device, dtype=torch.float32)

        bg = self.background
        if bg.adds_class:
            if bg.index > C:
                raise ValueError(f"background index {bg.index} is past the end of the {C} classes "
                                 f"(an added background class goes at 0..{C})")
            index = index + (index >= bg.index).long()
            class_names.insert(bg.index, bg.name)
            C += 1
        elif bg.index >= C:
            raise ValueError(f"background_index must be a class index in [0, {C - 1}], got {bg.index}")
        # a background word that is also a class's name would take that class's pixels
        named = {n.strip().lower() for n in names or ()}
        self.background_words = tuple(w for w in bg.words if w.lower() not in named)
        if self.background_words:  # scored with the classes; a pixel they win is background
            words = encode_names(self.clip, self.background_words, templates)
            text = torch.cat([text, words.to(self.device, torch.float32)])
            index = torch.cat([index, index.new_full((len(words),), bg.index)])
        self.text, self.class_index, self.num_classes = text, index, C
        self.class_names = class_names
        # checked once here: the same test per image would wait for the GPU
        self._one_query_per_class = len(index) == C and bool(
            (index == torch.arange(C, device=index.device)).all())

    @property
    def effective_logit_scale(self) -> float:
        """The softmax temperature applied: ARM's tau when ARM is used, else ``logit_scale``."""
        if self.arm is not None:
            return float(self.arm.logit_scale.detach().exp())
        return self.logit_scale

    @property
    def amp(self) -> bool:
        """Whether crops run under autocast (`precision`)."""
        return self.autocast_dtype is not None

    def _autocast(self):
        return precision_lib.autocast(self.device, self.autocast_dtype)

    # ------------------------------------------------------------------ crops (training reuse)
    def features(self, crops: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Deep features of CLIP-normalised crops ``[B, 3, H, W]`` (H, W multiples of the patch):
        the baseline's, refined by ARM when there is one. Returns ``([B, N, E], (h, w))``.
        Runs under the caller's grad mode, so ARM's parameters get gradients in training."""
        shallow, deep = clip_model_lib.extract(self.clip, crops, baseline=self.baseline,
                                               shallow_layers=self.shallow_layers,
                                               backend=self.backend, vfm=self.vfm)
        grid = clip_model_lib.feature_grid(self.visual, crops.shape[-2:], self.baseline, self.vfm)
        if self.arm is not None:
            deep = self.arm(shallow, deep, backend=self.backend)
        return deep, grid

    def crop_logits(self, crops: Tensor, *, scaled: bool = False) -> Tensor:
        """Patch logits ``[B, S, h, w]`` of CLIP-normalised crops: cosine similarities to the
        text embeddings, times ARM's tau (differentiable) or ``logit_scale`` when ``scaled``.
        Computed in float32 (float64 for a float64 model), also under autocast."""
        x, (h, w) = self.features(crops)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        text = self.text.to(x.dtype)
        # autocast off: a backend made of torch ops (sdpa) would run the product in bf16
        with torch.autocast(x.device.type, enabled=False):
            if scaled and self.arm is not None:
                logits = self.arm.logits(x, text, backend=self.backend)
            else:
                logits = ops.patch_text_logits(
                    x, text, logit_scale=self.logit_scale if scaled else 1.0, backend=self.backend)
        return logits.transpose(1, 2).unflatten(-1, (h, w))

    def _batch_logits(self, crops: Tensor) -> Tensor:
        """Inference: the cosine logits of a crop batch under the segmentor's precision (the
        call `GraphedCall` captures)."""
        with self._autocast():
            return self.crop_logits(crops)

    def crops_per_batch(self, crop_shape: Sequence[int]) -> int:
        """Crops per forward pass for crops of ``(h, w)`` pixels: ``crop_batch_size``, else
        what ``max_memory`` holds by `armfast.crop_budget.crop_bytes`."""
        if self.crop_batch_size is not None:
            return self.crop_batch_size
        key = tuple(int(s) for s in crop_shape)
        n = self._batch_sizes.get(key)
        if n is None:
            n = crop_budget.crops_per_batch(self.max_memory, self._crop_bytes(key))
            self._batch_sizes[key] = n
        return n

    def _crop_bytes(self, crop_shape: tuple[int, int]) -> int:
        ph, pw = self.patch
        padded = (-(-crop_shape[0] // ph) * ph, -(-crop_shape[1] // pw) * pw)
        grid = (padded[0] // ph, padded[1] // pw)
        deep = clip_model_lib.feature_grid(self.visual, padded, self.baseline, self.vfm)
        last = self.visual.transformer.resblocks[-1]
        heads = getattr(getattr(last, "attn", None), "num_heads", 1)
        weight = self.visual.conv1.weight
        return crop_budget.crop_bytes(
            tokens=grid[0] * grid[1] + 1, width=weight.shape[0], heads=heads,
            queries=len(self.text), patches=deep[0] * deep[1],
            embed_dim=clip_model_lib.output_dim(self.visual),
            shallow_layers=len(self.shallow_layers),
            explicit_softmax=self.backend == "reference",  # the fused ops keep no T x T map
            arm_heads=self.arm.config.num_heads if self.arm is not None else None,
            elem_size=2 if self.autocast_dtype is not None else weight.element_size())

    # ------------------------------------------------------------------ images
    def prepare(self, image, meta=None) -> Prepared:
        """An image (see `to_image_tensor`) resized to the protocol's short side and
        CLIP-normalised, on the model's device; `Preparer` does the same in other processes."""
        return self.preparer(image, device=self.device, meta=meta)

    def preprocess(self, image) -> Tensor:
        """An image -> CLIP-normalised ``[1, 3, H, W]`` on the model's device, resized to the
        protocol's short side."""
        return self.prepare(image).pixels

    def windows(self) -> WindowStream:
        return WindowStream(self.crop, self.stride, self.patch, self.crops_per_batch)

    def _averaged(self, prepared: Iterable[Prepared]) -> Iterator[tuple[Prepared, Tensor]]:
        """``(prepared, averaged cosine logits [S, h, w])`` per image, the windows of
        consecutive images batched together; step it under inference mode."""
        def pixels(p: Prepared) -> Tensor:
            return p.pixels.to(self.device, non_blocking=True)
        return self.windows().run(prepared, self._graphed, pixels)

    def slide_logits(self, x: Tensor) -> Tensor:
        """Averaged cosine logits ``[S, H, W]`` of one preprocessed image ``[1, 3, H, W]``."""
        return next(_each_in_inference_mode(self._averaged([Prepared(x, tuple(x.shape[-2:]))])))[1]

    def stream(self, images: Iterable, output: str = "labels") -> Iterator[tuple[Prepared, Tensor]]:
        """Segments a stream of images, batching the windows of consecutive images.

        ``images`` holds images (anything `to_image_tensor` takes) or `Prepared` ones (e.g.
        from `Preparer` in DataLoader workers, with a ``meta`` to carry along). Yields
        ``(prepared, result)`` in input order; ``output``: ``"logits"`` (scaled ``[S, H, W]``
        per synonym), ``"probs"`` (``[C, H, W]``) or ``"labels"`` (``[H, W]`` int64), at the
        input image's size, on the model's device.
        """
        if output not in ("logits", "probs", "labels"):
            raise ValueError(f"output must be 'logits', 'probs' or 'labels', got {output!r}")
        prepared = (p if isinstance(p, Prepared) else self.prepare(p) for p in images)
        for p, averaged in _each_in_inference_mode(self._averaged(prepared)):
            with torch.inference_mode():
                result = self._scaled_logits(averaged, p.size)
                if output != "logits":
                    result = self._class_probabilities(result)
                    if output == "labels":
                        result = self.postprocess(result)
            yield p, result

    def _scaled_logits(self, averaged: Tensor, size: tuple[int, int]) -> Tensor:
        logits = F.interpolate(averaged[None], size=tuple(size), mode="bilinear",
                               align_corners=False)[0]
        if self.arm is not None:  # tau stays on the device: reading it would wait for the GPU
            return logits * self.arm.logit_scale.detach().exp().to(logits.dtype)
        return logits * self.logit_scale

    def _class_probabilities(self, logits: Tensor) -> Tensor:
        probs = logits.softmax(0)
        if self._one_query_per_class:
            return probs
        out = probs.new_zeros(self.num_classes, *probs.shape[1:])
        index = self.class_index.view(-1, 1, 1).expand_as(probs)
        return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=False)

    def logits(self, image) -> Tensor:
        """Scaled logits ``[S, H0, W0]`` per text embedding (synonym), at the input's size."""
        return next(self.stream([image], "logits"))[1]

    def probabilities(self, image) -> Tensor:
        """Per-class probabilities ``[C, H0, W0]``: softmax over every synonym, max over each
        class's synonyms (before ``area_thd``/``prob_thd``)."""
        return next(self.stream([image], "probs"))[1]

    def postprocess(self, probs: Tensor) -> Tensor:
        """Label map ``[H, W]`` (int64) from per-class probabilities ``[C, H, W]``."""
        if self.area_thd is not None:  # SCLIP: drop non-background classes with a small area
            pred = probs.argmax(0).flatten()
            # scatter_add, not bincount: bincount reads the maximum back to the host on a GPU
            area = probs.new_zeros(self.num_classes).scatter_add_(0, pred, probs.new_ones(pred.shape))
            area[self.background_index] = 0
            keep = area > self.area_thd * area.sum()
            keep[self.background_index] = True
            probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
        best, pred = probs.max(0)
        return pred.masked_fill(best < self.prob_thd, self.background_index)

    def predict(self, image) -> Tensor:
        """Label map ``[H0, W0]`` (int64, on the model's device) of an image."""
        return next(self.stream([image], "labels"))[1]

    def predict_many(self, images: Iterable) -> Iterator[Tensor]:
        """Label maps of a stream of images (see `stream`), windows batched across images."""
        for _, labels in self.stream(images, "labels"):
            yield labels

    __call__ = predict

    def segment(self, image):
        """A `armfast.result.SegmentationResult` of one image: labels, per-class probabilities,
        class names, palette and this configuration, with ``save``/``overlay``."""
        from .result import SegmentationResult
        from .visualize import palette

        pixels = to_image_tensor(image)
        probs = self.probabilities(pixels)
        labels = self.postprocess(probs)
        return SegmentationResult(
            labels=labels.cpu(), probs=probs.float().cpu(), class_names=list(self.class_names),
            palette=palette(self.num_classes, self.background.index if self.background.enabled
                            else None), background=self.background,
            image=(pixels * 255).round().clamp(0, 255).to(torch.uint8).cpu(), config=self.config())

    def config(self) -> dict:
        """The effective configuration, for printouts and result files."""
        pair = lambda v: None if v is None else (v[0] if v[0] == v[1] else list(v))  # noqa: E731
        return {
            "baseline": self.baseline,
            "backbone": clip_model_lib.backbone_label(self.clip),
            "arm": None if self.arm is None else self.arm.config.to_dict(),
            "short_side": pair(self.short_side), "crop": pair(self.crop),
            "stride": pair(self.stride), "logit_scale": self.effective_logit_scale,
            "logit_scale_source": "ARM tau" if self.arm is not None else "protocol",
            "area_thd": self.area_thd, "background": self.background.describe(),
            "background_words_dropped": [w for w in self.background.words
                                         if w not in self.background_words],
            "classes": len(self.class_names), "text_queries": len(self.text),
            "templates": self.templates if isinstance(self.templates, str) else len(self.templates),
            "backend": self.backend, "precision": precision_lib.describe(self.autocast_dtype),
            "crop_batch_size": self.crop_batch_size or "auto",
            "max_memory": self.max_memory, "cuda_graphs": self._graphed.disabled is None,
        }


def _each_in_inference_mode(steps: Iterator):
    """Runs each step of a generator under inference mode, but not the consumer's code between
    steps (a ``with`` around a ``yield`` would leak the mode to the caller)."""
    while True:
        with torch.inference_mode():
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item
