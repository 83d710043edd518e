"""Open-vocabulary segmentation with a CLIP baseline, optionally refined by ARM.

The protocol the baselines publish (SCLIP, NACLIP, ClearCLIP, ProxyCLIP), and where each step
lives:

1. resize so that the short side is ``short_side`` (mmseg's ``Resize(scale=(2048, short_side),
   keep_ratio=True)``: the long side is also capped at 2048) and CLIP-normalise
   (`armfast.inference.preprocess`);
2. slide ``crop`` windows with ``stride``; the windows of an image, and of the next images of
   a stream (`Segmentor.stream`), run in batches as large as the memory budget allows
   (`armfast.inference.windows`, `armfast.inference.crop_budget`), replayed from CUDA graphs on
   a GPU (`armfast.inference.graphs`);
3. per crop: baseline deep features -> ARM (if any) -> cosine logits against the text queries
   (`armfast.inference.crop_model`, `armfast.inference.queries`) -> bilinear upsampling to the
   crop's pixels;
4. average overlapping logits, resize to the input image;
5. multiply by ``logit_scale`` (ARM's learnt tau when ARM is used), softmax over every synonym
   (background words included), max over each class's synonyms, optional ``area_thd`` (SCLIP's
   VOC21 rule), argmax, and pixels whose best probability is under the background's
   ``prob_thd`` go to the background class (`armfast.inference.postprocess`).

Without an explicit protocol the values are the default preset of the baseline on the CLIP's
backbone (`armfast.presets.default_preset`), the ones the benchmark path starts from. The
settings are one `SegmentorConfig` (`armfast.inference.config`).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import precision as precision_lib
from ..arm import load_arm
from ..background import Background
from ..clip import as_vfm, get_baseline
from ..clip.baselines import check_options
from ..clip import model as clip_model_lib
from . import crop_budget, postprocess
from .config import SegmentorConfig, make_config, resolve
from .crop_model import CropModel
from .graphs import GraphedCall
from .preprocess import Prepared, Preparer, to_image_tensor
from .queries import TextQueries, build_queries
from .windows import WindowStream


def _read(part: str, name: str, doc: Optional[str] = None) -> property:
    """A read-only attribute of the segmentor that is ``self.<part>.<name>``."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class Segmentor:
    """Open-vocabulary semantic segmentation with CLIP, a training-free baseline and ARM.

    Args:
        clip_model: an open_clip CLIP (`armfast.clip.load_clip`).
        classes: class names (``["cat", ["person", "people"], ...]``, a list per class for
            synonyms), a `TextEmbeddings`, or a ``[S, E]`` tensor of text embeddings (then
            ``class_index`` maps rows to classes; default one row per class).
        config: a `SegmentorConfig` (None: its defaults).
        arm: None, an `armfast.ARM` or its ``save_pretrained`` directory.
        vfm: proxyclip's vision foundation model (object or checkpoint path).
        **overrides: `SegmentorConfig` fields, replacing the config's
            (``Segmentor(clip, classes, baseline="naclip", crop=0)``).

    ``settings`` is the `SegmentorConfig` it runs with; `config()` the effective values (the
    resolved protocol, ARM's tau, the memory budget) for printouts and result files.
    """

    def __init__(self, clip_model: nn.Module, classes, config: Optional[SegmentorConfig] = None,
                 *, arm=None, vfm=None, class_index: Optional[Tensor] = None, **overrides):
        config = make_config(config, overrides)
        self.clip = clip_model
        self.visual = clip_model_lib.vision_tower(clip_model)
        self.baseline = get_baseline(config.baseline).name
        self.settings = config = config.replace(baseline=self.baseline)  # what config() describes
        self.backbone = clip_model_lib.backbone_of(clip_model)  # None: not a registered one
        if self.backbone is not None and self.baseline not in self.backbone.baselines:
            raise ValueError(f"baseline {self.baseline!r} does not apply to backbone "
                             f"{self.backbone.name} (it takes: {', '.join(self.backbone.baselines)})")
        self.vfm = as_vfm(vfm) if get_baseline(self.baseline).needs_vfm else None
        self.device = self.visual.conv1.weight.device
        self.backend = config.backend
        self.precision = config.precision
        self.autocast_dtype = precision_lib.autocast_dtype(self.precision, self.device)
        self.crop_batch_size = config.crop_batch_size
        self.max_memory = crop_budget.resolve_budget(config.max_memory, self.device)
        self.image_mean, self.image_std = clip_model_lib.image_stats(self.visual)
        self.patch = clip_model_lib.patch_size(self.visual)

        resolved = resolve(config, self.backbone.name if self.backbone is not None else None)
        self.short_side, self.crop, self.stride = resolved.short_side, resolved.crop, resolved.stride
        self.logit_scale, self.area_thd = resolved.logit_scale, resolved.area_thd
        self.background: Background = resolved.background
        self.templates = config.templates
        self.queries: TextQueries = build_queries(
            clip_model, classes, class_index=class_index, background=self.background,
            templates=self.templates, device=self.device)

        arm = load_arm(arm)
        if arm is not None:
            clip_model_lib.check_arm_matches(arm.config, self.clip)
            arm = arm.to(self.device).eval()
        self.crop_model = CropModel(clip_model, baseline=self.baseline, arm=arm, vfm=self.vfm,
                                    backend=self.backend,
                                    baseline_options=check_options(self.baseline,
                                                                   dict(resolved.baseline_options)))
        self.preparer = Preparer(None if self.short_side is None else self.short_side[0],
                                 self.image_mean, self.image_std)
        cuda_graphs = config.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.vfm is None
        self._graphed = GraphedCall(self._batch_logits, enabled=bool(cuda_graphs))
        self._batch_sizes: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ what it runs with
    @property
    def arm(self):
        return self.crop_model.arm

    @property
    def shallow_layers(self) -> tuple[int, ...]:
        return self.crop_model.shallow_layers

    # read from the parts that hold them
    text = _read("queries", "text", "``[S, E]`` float32 text embeddings, one per query")
    class_index = _read("queries", "class_index", "``[S]`` int64: the class of each query")
    num_classes = _read("queries", "num_classes")
    class_names = _read("queries", "class_names")
    background_words = _read("queries", "background_words", "words scored for the background")
    prob_thd = _read("background", "prob_thd", "the background rule's threshold")
    background_index = _read("background", "index", "the label of background pixels")

    @property
    def effective_logit_scale(self) -> float:
        """The softmax temperature applied: ARM's tau when ARM is used, else ``logit_scale``."""
        if self.arm is not None:
            return float(self.arm.logit_scale.detach().exp())
        return self.logit_scale

    def _scale(self) -> Union[float, Tensor]:
        if self.arm is not None:  # tau stays on the device: reading it would wait for the GPU
            return self.arm.logit_scale.detach().exp()
        return self.logit_scale

    # ------------------------------------------------------------------ crops
    def features(self, crops: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Deep features of CLIP-normalised crops ``[B, 3, H, W]`` (H, W multiples of the patch):
        the baseline's, refined by ARM when there is one. Returns ``([B, N, E], (h, w))``.
        Runs under the caller's grad mode."""
        shallow, deep, grid = self.crop_model.features(crops)
        return self.crop_model.head.refine(shallow, deep, self.backend), grid

    def crop_logits(self, crops: Tensor, *, scaled: bool = False) -> Tensor:
        """Patch logits ``[B, S, h, w]`` of CLIP-normalised crops: cosine similarities to the
        text embeddings, times ARM's tau (differentiable) or ``logit_scale`` when ``scaled``.
        Computed in float32 (float64 for a float64 model), also under autocast."""
        scale = 1.0
        if scaled:
            scale = None if self.arm is not None else self.logit_scale
        return self.crop_model(crops, self.text, scale)

    def _batch_logits(self, crops: Tensor) -> Tensor:
        """Inference: the cosine logits of a crop batch under the segmentor's precision (the
        call `GraphedCall` captures)."""
        with precision_lib.autocast(self.device, self.autocast_dtype):
            return self.crop_logits(crops)

    def crops_per_batch(self, crop_shape: Sequence[int]) -> int:
        """Crops per forward pass for crops of ``(h, w)`` pixels: ``crop_batch_size``, else
        what ``max_memory`` holds by `crop_bytes`."""
        if self.crop_batch_size is not None:
            return self.crop_batch_size
        key = tuple(int(s) for s in crop_shape)
        n = self._batch_sizes.get(key)
        if n is None:
            n = crop_budget.crops_per_batch(self.max_memory, self.crop_bytes(key))
            self._batch_sizes[key] = n
        return n

    def crop_bytes(self, crop_shape: Sequence[int]) -> int:
        """Estimated bytes one crop of ``(h, w)`` pixels adds to a batch."""
        elem = 2 if self.autocast_dtype is not None else self.visual.conv1.weight.element_size()
        return self.crop_model.crop_bytes(crop_shape, len(self.text), elem)

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
                result = postprocess.scaled_logits(averaged, p.size, self._scale())
                if output != "logits":
                    result = postprocess.class_probabilities(result, self.queries)
                    if output == "labels":
                        result = self.postprocess(result)
            yield p, result

    def logits(self, image) -> Tensor:
        """Scaled logits ``[S, H0, W0]`` per text embedding (synonym), at the input's size."""
        return next(self.stream([image], "logits"))[1]

    def probabilities(self, image) -> Tensor:
        """Per-class probabilities ``[C, H0, W0]``: softmax over every synonym, max over each
        class's synonyms (before ``area_thd``/``prob_thd``)."""
        return next(self.stream([image], "probs"))[1]

    def postprocess(self, probs: Tensor) -> Tensor:
        """Label map ``[H, W]`` (int64) from per-class probabilities ``[C, H, W]``."""
        return postprocess.label_map(probs, self.background, self.area_thd)

    def predict(self, image) -> Tensor:
        """Label map ``[H0, W0]`` (int64, on the model's device) of an image."""
        return next(self.stream([image], "labels"))[1]

    def predict_many(self, images: Iterable) -> Iterator[Tensor]:
        """Label maps of a stream of images (see `stream`), windows batched across images."""
        for _, labels in self.stream(images, "labels"):
            yield labels

    __call__ = predict

    def segment(self, image):
        """A `armfast.inference.result.SegmentationResult` of one image: labels, per-class
        probabilities, class names, palette and this configuration, with ``save``/``overlay``."""
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
            "baseline_options": dict(self.crop_model.baseline_options),
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
