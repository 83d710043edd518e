"""Benchmark loop: a `Segmentor` over a dataset, accumulated into a `MeanIoU`.

DataLoader workers read, decode, resize and normalise the images (`PreparedImages`), pinned for
a fast copy to the GPU; the segmentor batches the sliding windows of consecutive images
(`Segmentor.stream`) and the confusion matrix is counted on the model's device, so the loop
never waits for the GPU between images. Under torchrun each process takes every
``world_size``-th image and the confusion matrices are summed, so the result is the same as one
process over the whole set.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.base import SegDataset
from ..inference.config import SegmentorConfig, make_config
from ..inference.segmentor import Segmentor
from .metric import MeanIoU

PREFETCH_PER_WORKER = 4  # images each worker prepares ahead: a Cityscapes image is ~50 windows


class PreparedImages(Dataset):
    """``dataset[i]`` prepared for a segmentor: `armfast.inference.Prepared` with the mask as
    ``meta``. Runs in the DataLoader's workers."""

    def __init__(self, dataset: SegDataset, preparer):
        self.dataset, self.preparer = dataset, preparer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return self.preparer(item["image"], meta=item["mask"])


def evaluate(clip_model, dataset: SegDataset, config: Optional[SegmentorConfig] = None, *,
             arm=None, vfm=None, text_embeddings=None, class_index=None, classes=None,
             rank: int = 0, world_size: int = 1, workers: int = 0, progress: bool = True,
             desc: str | None = None, **overrides) -> dict:
    """mIoU of a `Segmentor` (`config`, its fields overridden by keyword, e.g.
    ``baseline="sclip", protocol=get_protocol("sclip", "voc21")``; + `arm`) on `dataset`.

    Text: `text_embeddings` (a `TextEmbeddings`, or a ``[S, E]`` tensor with `class_index`, or
    with ``classes`` = the synonym lists it was built from), else `classes` are encoded, else
    the dataset's class-name file, in the config's ``templates`` (background words too). The
    config's ``background`` (an `armfast.background.Background`, e.g. a preset's) is the
    background rule; None keeps the protocol's ``prob_thd`` onto class 0 of the class list.
    Returns MeanIoU.compute()'s dict plus ``images``, ``seconds``, ``images_per_s`` (this
    process) and ``peak_gpu_bytes`` (None off the GPU).
    """
    from ..data.classnames import flatten_class_names, load_class_names

    config = make_config(config, overrides)
    if text_embeddings is None:
        text = classes if classes is not None else load_class_names(dataset.classnames)
        class_index = None
    else:
        text = text_embeddings
        if isinstance(text, torch.Tensor) and class_index is None and classes is not None:
            class_index = torch.tensor(flatten_class_names(classes)[1])
    seg = Segmentor(clip_model, text, config, arm=arm, vfm=vfm, class_index=class_index)
    if seg.num_classes != dataset.num_classes:
        raise ValueError(f"the class names give {seg.num_classes} classes but {dataset.name} has "
                         f"{dataset.num_classes}")
    metric = MeanIoU(dataset.num_classes, device=seg.device)
    indices = list(range(rank, len(dataset), world_size))
    cuda = seg.device.type == "cuda"
    loader = DataLoader(PreparedImages(dataset, seg.preparer), batch_size=None, sampler=indices,
                        num_workers=workers, pin_memory=cuda,
                        prefetch_factor=PREFETCH_PER_WORKER if workers else None)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=desc or f"{dataset.name}/{seg.baseline}",
                   dynamic_ncols=True, file=sys.stderr, leave=False, unit="img")
    if cuda:
        torch.cuda.reset_peak_memory_stats(seg.device)
    start = time.perf_counter()
    for prepared, labels in seg.stream(loader, "labels"):
        metric.add(labels, prepared.meta.to(seg.device, non_blocking=True))
        if bar is not None:
            bar.update(1)
    result = metric.compute()  # waits for the device: the time below is the whole run's
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.update(images=len(dataset), seconds=seconds,
                  images_per_s=len(indices) / seconds if seconds > 0 else float("nan"),
                  peak_gpu_bytes=torch.cuda.max_memory_allocated(seg.device) if cuda else None,
                  class_names=seg.class_names, logit_scale=seg.effective_logit_scale,
                  config=seg.config())
    return result


def throughput_line(result: dict) -> str:
    """``"2 images, 1.3 s, 1.54 images/s, GPU peak 3.21 GiB"`` of an `evaluate` result."""
    parts = [f"{result['images']} images", f"{result['seconds']:.1f} s",
             f"{result['images_per_s']:.2f} images/s"]
    if result.get("peak_gpu_bytes") is not None:
        parts.append(f"GPU peak {result['peak_gpu_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)
