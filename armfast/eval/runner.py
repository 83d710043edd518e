"""Benchmark loop: a `Segmentor` over a dataset, accumulated into a `MeanIoU`.

Under torchrun each process takes every ``world_size``-th image and the confusion matrices are
summed, so the result is the same as one process over the whole set.
"""
from __future__ import annotations

import sys
import time

import torch
from torch.utils.data import DataLoader

from ..data.base import SegDataset
from .metric import MeanIoU


def evaluate(clip_model, dataset: SegDataset, *, baseline: str, protocol, arm=None,
             text_embeddings=None, class_index=None, classes=None, background=None, vfm=None,
             backend: str = "auto", rank: int = 0, world_size: int = 1, workers: int = 0,
             progress: bool = True, autocast: bool = True, desc: str | None = None,
             templates="openai") -> dict:
    """mIoU of `baseline` (+ `arm`) on `dataset` under `protocol`.

    Text: `text_embeddings` (a `TextEmbeddings`, or a ``[S, E]`` tensor with `class_index`, or
    with ``classes`` = the synonym lists it was built from), else `classes` are encoded, else
    the dataset's class-name file, in `templates` (background words too). ``background`` (an `armfast.background.Background`, e.g. a
    preset's) is the background rule; None keeps the protocol's ``prob_thd`` onto class 0 of
    the class list. Returns MeanIoU.compute()'s dict plus ``images`` and ``seconds``.
    """
    from ..data.classnames import flatten_class_names, load_class_names
    from ..segmentor import Segmentor

    if text_embeddings is None:
        text = classes if classes is not None else load_class_names(dataset.classnames)
        class_index = None
    else:
        text = text_embeddings
        if isinstance(text, torch.Tensor) and class_index is None and classes is not None:
            class_index = torch.tensor(flatten_class_names(classes)[1])
    seg = Segmentor(clip_model, text, class_index=class_index, baseline=baseline, arm=arm, vfm=vfm,
                    protocol=protocol, background=background, backend=backend, amp=autocast,
                    templates=templates)
    if seg.num_classes != dataset.num_classes:
        raise ValueError(f"the class names give {seg.num_classes} classes but {dataset.name} has "
                         f"{dataset.num_classes}")
    metric = MeanIoU(dataset.num_classes)
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(dataset, batch_size=None, sampler=indices, num_workers=workers)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=desc or f"{dataset.name}/{baseline}",
                   dynamic_ncols=True, file=sys.stderr, leave=False)
    start = time.perf_counter()
    for item in loader:
        pred = seg.predict(item["image"])
        metric.update(pred.cpu(), item["mask"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = metric.compute()
    result.update(images=len(dataset), seconds=time.perf_counter() - start,
                  class_names=seg.class_names, logit_scale=seg.effective_logit_scale,
                  config=seg.config())
    return result
