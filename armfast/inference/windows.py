"""Sliding windows over a stream of images, run in batches that cross image boundaries.

mmseg's slide inference, which SCLIP, ClearCLIP, NACLIP and ProxyCLIP use: each window's patch
logits are upsampled to the window's pixels and summed into the image's map, which is then
divided by the number of windows covering each pixel. Their code runs one window at a time.
Here the windows of consecutive images wait in one queue and go through the model in batches
of up to ``max_crops`` crops of one shape, so a batch may hold the last windows of one image
and the first of the next. Each image sums its windows in the order of its boxes, whatever
batch they ran in: its result is the one-window-at-a-time result, up to how the matmuls round
at another batch size. Images come out in the order they went in.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def slide_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[Box]:
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


@dataclass
class _Image:
    """One image in flight: its pixels, its windows and the running sums of their logits."""

    item: Any  # what the caller passed in, handed back with the result
    pixels: Tensor  # [1, 3, H, W]
    boxes: list[Box]
    sums: Optional[Tensor] = None  # [S, H, W], allocated with the first window's logits
    count: Optional[Tensor] = None  # [1, H, W]
    done: int = 0

    @property
    def finished(self) -> bool:
        return self.done == len(self.boxes)

    def add(self, box: Box, logits: Tensor) -> None:
        """Adds one window's logits ``[S, h, w]``, already at the window's pixels."""
        y1, y2, x1, x2 = box
        if self.sums is None:
            H, W = self.pixels.shape[-2:]
            self.sums = logits.new_zeros(logits.shape[0], H, W)
            self.count = logits.new_zeros(1, H, W)
        self.sums[:, y1:y2, x1:x2] += logits
        self.count[:, y1:y2, x1:x2] += 1
        self.done += 1

    def result(self) -> Tensor:
        return self.sums / self.count


@dataclass
class WindowBatch:
    """Crops ``[B, 3, h, w]`` of one shape and, per crop, its image and box."""

    crops: Tensor
    owners: list[_Image] = field(repr=False)
    boxes: list[Box]


class WindowStream:
    """Runs the windows of a stream of images in batches; see the module docstring.

    Args:
        crop, stride: window size and stride (h, w); ``crop=None`` runs each image whole.
        patch: the model's patch size (h, w); crops are zero-padded up to a multiple of it
            (zero is the mean colour in CLIP-normalised pixels) and the logits cut back.
        max_crops: ``fn(crop_shape) -> crops per batch`` or an int.
    """

    def __init__(self, crop: Optional[Sequence[int]], stride: Optional[Sequence[int]],
                 patch: Sequence[int], max_crops: Callable[[tuple[int, int]], int] | int):
        self.crop, self.stride, self.patch = crop, stride, tuple(patch)
        self.max_crops = max_crops if callable(max_crops) else (lambda shape, n=int(max_crops): n)

    def boxes(self, height: int, width: int) -> list[Box]:
        if self.crop is None:
            return [(0, height, 0, width)]
        return slide_boxes(height, width, self.crop, self.stride)

    def run(self, items: Iterable[Any], logits_fn: Callable[[Tensor], Tensor],
            pixels: Callable[[Any], Tensor] = lambda item: item) -> Iterator[tuple[Any, Tensor]]:
        """``(item, averaged logits [S, H, W])`` for each item, in order. ``pixels(item)`` gives
        its CLIP-normalised ``[1, 3, H, W]``; ``logits_fn(crops [B, 3, h, w])`` the crops' patch
        logits ``[B, S, h', w']``, which are upsampled bilinearly to the (padded) crop."""
        source = iter(items)
        images: deque[_Image] = deque()  # in flight, in input order
        queue: deque[tuple[_Image, Box]] = deque()  # windows not yet run, in input order
        exhausted = False
        while True:
            while not exhausted and not self._full(queue):
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                x = pixels(item)
                image = _Image(item, x, self.boxes(*x.shape[-2:]))
                images.append(image)
                queue.extend((image, box) for box in image.boxes)
            if not queue:
                return
            self._run_batch(self._take(queue), logits_fn)
            while images and images[0].finished:
                image = images.popleft()
                yield image.item, image.result()

    def _shape(self, window: tuple[_Image, Box]) -> tuple[int, int]:
        y1, y2, x1, x2 = window[1]
        return (y2 - y1, x2 - x1)

    def _full(self, queue: deque) -> bool:
        """Enough windows for a full batch of the first window's shape; or, when the images
        alternate between shapes, twice that many windows of any shape (a bound on what is in
        flight)."""
        if not queue:
            return False
        shape = self._shape(queue[0])
        limit = self.max_crops(shape)
        return (len(queue) >= 2 * limit
                or sum(self._shape(w) == shape for w in queue) >= limit)

    def _take(self, queue: deque) -> WindowBatch:
        """The next batch: up to max_crops windows of the first window's shape, in queue order;
        windows of other shapes keep their places."""
        shape = self._shape(queue[0])
        limit = self.max_crops(shape)
        taken, skipped = [], []
        while queue and len(taken) < limit:
            window = queue.popleft()
            (taken if self._shape(window) == shape else skipped).append(window)
        queue.extendleft(reversed(skipped))
        crops = torch.cat([image.pixels[..., y1:y2, x1:x2] for image, (y1, y2, x1, x2) in taken])
        return WindowBatch(crops, [w[0] for w in taken], [w[1] for w in taken])

    def _run_batch(self, batch: WindowBatch, logits_fn: Callable[[Tensor], Tensor]) -> None:
        h, w = batch.crops.shape[-2:]
        ph, pw = self.patch
        pad_h, pad_w = -h % ph, -w % pw
        crops = F.pad(batch.crops, (0, pad_w, 0, pad_h)) if pad_h or pad_w else batch.crops
        logits = logits_fn(crops)
        # one crop at a time: the upsampled logits of a whole batch would be B x S x h x w
        for image, box, crop_logits in zip(batch.owners, batch.boxes, logits):
            up = F.interpolate(crop_logits[None], size=(h + pad_h, w + pad_w), mode="bilinear",
                               align_corners=False)[0, :, :h, :w]
            image.add(box, up)
