"""Open-vocabulary segmentation with a CLIP baseline, optionally refined by ARM.

The protocol the baselines publish (SCLIP, NACLIP, ClearCLIP, ProxyCLIP):

1. resize so that the short side is ``short_side`` (mmseg's ``Resize(scale=(2048, short_side),
   keep_ratio=True)``: the long side is also capped at 2048);
2. slide ``crop`` windows with ``stride`` (the crops of an image run as one batch);
3. per crop: baseline deep features -> ARM (if any) -> cosine logits against the text
   embeddings (`armfast.ops.patch_text_logits`) -> bilinear upsampling to the crop's pixels;
4. average overlapping logits, resize to the input image;
5. multiply by ``logit_scale`` (ARM's learnt tau when ARM is used), softmax over every synonym,
   max over each class's synonyms, optional ``area_thd`` (SCLIP's VOC21 rule), argmax, and
   pixels whose best probability is under ``prob_thd`` go to ``background_index``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .clip import model as clip_model_lib
from .clip.text import TextEmbeddings, encode_classes

DEFAULTS = dict(short_side=336, crop=224, stride=112, logit_scale=40.0, prob_thd=0.0,
                area_thd=None)  # SCLIP / NACLIP ViT-B/16 defaults
MAX_LONG_SIDE = 2048


def _pair(name: str, v) -> Optional[tuple[int, int]]:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
        return None
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int, a (height, width) pair, or 0/None "
                         f"for off; got {v!r}")
    return t


def slide_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]
                ) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` sliding windows as mmseg places them: every window has the size
    ``min(crop, image)``, the last one in a row/column is pushed back inside the image."""
    ch, cw = min(crop[0], height), min(crop[1], width)
    sh, sw = stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            boxes.append((y2 - ch, y2, x2 - cw, x2))
    return boxes


def to_image_tensor(image) -> Tensor:
    """A PIL image, an ``HxW[x3]`` array, a ``[3, H, W]`` tensor (uint8, or floats in [0, 1])
    or a path -> float32 ``[3, H, W]`` in [0, 1]."""
    import numpy as np

    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None].repeat(3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array must be HxW or HxWx3, got shape {image.shape}")
        image = torch.from_numpy(np.array(image[..., :3], copy=True)).permute(2, 0, 1)
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


def load_arm(arm):
    """An `armfast.ARM` from an instance or a local directory written by ``save_pretrained``."""
    from .arm import ARM

    if arm is None or isinstance(arm, ARM):
        return arm
    if isinstance(arm, (str, os.PathLike)):
        path = Path(arm)
        if not path.is_dir():
            raise FileNotFoundError(f"arm: no ARM checkpoint directory at {str(path)!r}")
        return ARM.from_pretrained(str(path))
    raise TypeError(f"arm must be an ARM, a checkpoint directory or None, got {type(arm).__name__}")


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
        protocol: any object with ``short_side``, ``crop``, ``stride``, ``logit_scale``,
            ``prob_thd`` (and optionally ``area_thd``) attributes, e.g.
            `armfast.eval.protocols.Protocol`; the keyword arguments below override it.
        short_side, crop, stride: resizing and sliding window (ints or (h, w));
            ``short_side=0`` keeps the image size, ``crop=0`` runs the whole image at once.
        logit_scale: softmax temperature on cosine logits without ARM (ARM brings its own tau).
        prob_thd, area_thd, background_index: post-processing (module docstring).
        templates: prompt templates for class names ('openai' = the 80 ImageNet ones).
        backend: `armfast.ops` backend; crop_batch_size: crops per forward pass;
        amp: bf16 autocast on CUDA.
    """

    def __init__(self, clip_model: nn.Module, classes, *, baseline: str = "sclip", arm=None,
                 vfm=None, class_index: Optional[Tensor] = None, protocol=None,
                 short_side: Union[int, Sequence[int], None] = None,
                 crop: Union[int, Sequence[int], None] = None,
                 stride: Union[int, Sequence[int], None] = None,
                 logit_scale: Optional[float] = None, prob_thd: Optional[float] = None,
                 area_thd: Optional[float] = None, background_index: int = 0,
                 templates="openai", backend: str = "auto", crop_batch_size: int = 16,
                 amp: bool = True):
        from .clip import as_vfm, get_baseline

        self.clip = clip_model
        self.visual = clip_model_lib.vision_tower(clip_model)
        self.baseline = get_baseline(baseline).name
        self.vfm = as_vfm(vfm) if get_baseline(baseline).needs_vfm else None
        self.device = self.visual.conv1.weight.device
        self.backend = backend
        self.amp = bool(amp)
        if isinstance(crop_batch_size, bool) or not isinstance(crop_batch_size, int) or crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be a positive int, got {crop_batch_size!r}")
        self.crop_batch_size = crop_batch_size
        self.image_mean, self.image_std = clip_model_lib.image_stats(self.visual)
        self.patch = clip_model_lib.patch_size(self.visual)

        self._set_protocol(protocol, short_side=short_side, crop=crop, stride=stride,
                           logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd)
        self._set_text(classes, class_index, templates)
        if isinstance(background_index, bool) or not isinstance(background_index, int) or \
                not 0 <= background_index < self.num_classes:
            raise ValueError(f"background_index must be a class index in [0, {self.num_classes - 1}], "
                             f"got {background_index!r}")
        self.background_index = background_index

        self.arm = load_arm(arm)
        if self.arm is not None:
            c = self.arm.config
            width, embed_dim = self.visual.conv1.out_channels, self.text.shape[-1]
            if c.width != width or c.embed_dim != embed_dim:
                raise ValueError(f"arm was built for width {c.width} / embed dim {c.embed_dim}, "
                                 f"this CLIP has {width} / {embed_dim}")
            self.arm = self.arm.to(self.device).eval()
        self.shallow_layers = tuple(self.arm.config.shallow_layers) if self.arm is not None else ()

    # ------------------------------------------------------------------ configuration
    def _set_protocol(self, protocol, **overrides) -> None:
        values = dict(DEFAULTS)
        if protocol is not None:
            for key in values:
                if hasattr(protocol, key):
                    values[key] = getattr(protocol, key)
        values.update({k: v for k, v in overrides.items() if v is not None})
        self.short_side = _pair("short_side", values["short_side"])
        if self.short_side is not None and self.short_side[0] != self.short_side[1]:
            raise ValueError(f"short_side must be one int, got {values['short_side']!r}")
        self.crop = _pair("crop", values["crop"])
        self.stride = _pair("stride", values["stride"]) if self.crop is not None else None
        if self.crop is not None and self.stride is None:
            raise ValueError("stride must be set when crop is")
        self.logit_scale = float(values["logit_scale"])
        self.prob_thd = float(values["prob_thd"])
        self.area_thd = None if values["area_thd"] is None else float(values["area_thd"])
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if not 0.0 <= self.prob_thd <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {self.prob_thd}")
        if self.area_thd is not None and not 0.0 <= self.area_thd < 1.0:
            raise ValueError(f"area_thd must be in [0, 1) or None, got {self.area_thd}")

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
            emb = encode_classes(self.clip, classes, templates)
            text, index, names = emb.embeddings, emb.class_index, list(emb.names)
        index = index.to(device=self.device, dtype=torch.int64)
        C = int(index.max()) + 1
        if int(index.min()) < 0 or set(index.tolist()) != set(range(C)):
            raise ValueError(f"class_index must cover every class 0..{C - 1}, got {index.tolist()}")
        embed_dim = self.visual.output_dim if hasattr(self.visual, "output_dim") else text.shape[-1]
        if text.shape[-1] != embed_dim:
            raise ValueError(f"text embeddings must have CLIP's embed dim {embed_dim}, got "
                             f"{text.shape[-1]}")
        self.text = text.detach().to(device=self.device, dtype=torch.float32)
        self.class_index = index
        self.num_classes = C
        if names is None:
            self.class_names = [f"class_{i}" for i in range(C)]
        else:  # the first synonym names the class
            first = {}
            for n, i in zip(names, index.tolist()):
                first.setdefault(i, n)
            self.class_names = [first[i] for i in range(C)]

    @property
    def effective_logit_scale(self) -> float:
        """The softmax temperature applied: ARM's tau when ARM is used, else ``logit_scale``."""
        if self.arm is not None:
            return float(self.arm.logit_scale.detach().exp())
        return self.logit_scale

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.amp and self.device.type == "cuda")

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
        text embeddings, times ARM's tau (differentiable) or ``logit_scale`` when ``scaled``."""
        x, (h, w) = self.features(crops)
        x = x.float()
        if scaled and self.arm is not None:
            logits = self.arm.logits(x, self.text, backend=self.backend)
        else:
            logits = ops.patch_text_logits(x, self.text, logit_scale=self.logit_scale if scaled else 1.0,
                                           backend=self.backend)
        return logits.transpose(1, 2).unflatten(-1, (h, w))

    # ------------------------------------------------------------------ images
    def preprocess(self, image) -> Tensor:
        """An image (see `to_image_tensor`) -> CLIP-normalised ``[1, 3, H, W]`` on the model's
        device, resized to the protocol's short side."""
        x = to_image_tensor(image).to(self.device)[None]
        if self.short_side is not None:
            H, W = x.shape[-2:]
            scale = min(self.short_side[0] / min(H, W), MAX_LONG_SIDE / max(H, W))
            size = (max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5)))
            if size != (H, W):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                  antialias=scale < 1)
        mean = x.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _padded_logits(self, crops: Tensor) -> Tensor:
        """Cosine logits ``[B, S, H, W]`` at the crops' pixels (crops padded to the patch)."""
        H, W = crops.shape[-2:]
        ph, pw = self.patch
        pad_h, pad_w = -H % ph, -W % pw
        if pad_h or pad_w:  # zero in normalised space: the dataset mean colour
            crops = F.pad(crops, (0, pad_w, 0, pad_h))
        logits = self.crop_logits(crops).float()
        logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W]

    def slide_logits(self, x: Tensor) -> Tensor:
        """Averaged cosine logits ``[S, H, W]`` of one preprocessed image ``[1, 3, H, W]``."""
        H, W = x.shape[-2:]
        if self.crop is None:
            return self._padded_logits(x)[0]
        boxes = slide_boxes(H, W, self.crop, self.stride)
        crops = torch.cat([x[..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
        out = x.new_zeros(len(self.text), H, W, dtype=torch.float32)
        count = x.new_zeros(1, H, W, dtype=torch.float32)
        for start in range(0, len(boxes), self.crop_batch_size):
            logits = self._padded_logits(crops[start:start + self.crop_batch_size])
            for (y1, y2, x1, x2), crop_logits in zip(boxes[start:], logits):
                out[:, y1:y2, x1:x2] += crop_logits
                count[:, y1:y2, x1:x2] += 1
        return out / count

    def logits(self, image) -> Tensor:
        """Scaled logits ``[S, H0, W0]`` per text embedding (synonym), at the input's size."""
        image = to_image_tensor(image)
        with torch.inference_mode(), self._autocast():
            x = self.preprocess(image)
            logits = self.slide_logits(x)
            logits = F.interpolate(logits[None], size=tuple(image.shape[-2:]), mode="bilinear",
                                   align_corners=False)[0]
            return logits * self.effective_logit_scale

    def probabilities(self, image) -> Tensor:
        """Per-class probabilities ``[C, H0, W0]``: softmax over every synonym, max over each
        class's synonyms (before ``area_thd``/``prob_thd``)."""
        probs = self.logits(image).softmax(0)
        if len(self.class_index) == self.num_classes and bool(
                (self.class_index == torch.arange(self.num_classes, device=self.device)).all()):
            return probs
        out = probs.new_zeros(self.num_classes, *probs.shape[1:])
        index = self.class_index.view(-1, 1, 1).expand_as(probs)
        return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=False)

    def postprocess(self, probs: Tensor) -> Tensor:
        """Label map ``[H, W]`` (int64) from per-class probabilities ``[C, H, W]``."""
        if self.area_thd is not None:  # SCLIP: drop non-background classes with a small area
            pred = probs.argmax(0)
            area = torch.bincount(pred.flatten(), minlength=self.num_classes).to(probs.dtype)
            area[self.background_index] = 0
            keep = area > self.area_thd * area.sum()
            keep[self.background_index] = True
            probs = probs * keep.to(probs.dtype).view(-1, 1, 1)
        best, pred = probs.max(0)
        return pred.masked_fill(best < self.prob_thd, self.background_index)

    def predict(self, image) -> Tensor:
        """Label map ``[H0, W0]`` (int64, on the model's device) of an image."""
        return self.postprocess(self.probabilities(image))

    __call__ = predict
