"""Mean intersection-over-union from a confusion matrix, mergeable across processes."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    return x


class MeanIoU:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: ground truth,
    columns: prediction) over pixels whose target is not ``ignore_index``.

    ``compute()`` gives percentages; a class absent from both predictions and ground truth has
    IoU NaN and does not enter the mean (mmseg's convention). Under ``torch.distributed`` the
    matrices of all processes are summed (``compute(sync=True)``, the default).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a valid class id (num_classes="
                             f"{num_classes}); pick a value outside 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred, target) -> None:
        """Add a batch: integer tensors (or arrays) of the same shape, any number of dims."""
        pred, target = _as_tensor(pred, "pred"), _as_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        C = self.num_classes
        target = target.reshape(-1).to(device=self.confusion.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(device=self.confusion.device, dtype=torch.int64)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        if target.numel() == 0:
            return
        if int(target.min()) < 0 or int(target.max()) >= C:
            raise ValueError(f"target holds ids outside 0..{C - 1} that are not ignore_index "
                             f"({self.ignore_index}): min {int(target.min())}, max {int(target.max())}")
        if int(pred.min()) < 0 or int(pred.max()) >= C:
            raise ValueError(f"pred holds ids outside 0..{C - 1} on labelled pixels: "
                             f"min {int(pred.min())}, max {int(pred.max())}")
        self.confusion += torch.bincount(target * C + pred, minlength=C * C).view(C, C)

    @torch.no_grad()
    def add(self, pred: Tensor, target: Tensor) -> None:
        """`update` for ids already known to be valid (a dataset's checked masks, a segmentor's
        labels), without its checks: they read values back to the host, which on a GPU waits
        for all queued work. Here the counting is queued like the rest."""
        C = self.num_classes
        target = target.reshape(-1).to(device=self.confusion.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(device=self.confusion.device, dtype=torch.int64)
        index = torch.where(target == self.ignore_index, C * C, target * C + pred)  # extra bin
        counts = torch.zeros(C * C + 1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, torch.ones_like(index))
        self.confusion += counts[:-1].view(C, C)

    def merge(self, other: "MeanIoU") -> "MeanIoU":
        """Add another metric's counts (same num_classes) into this one."""
        if not isinstance(other, MeanIoU) or other.num_classes != self.num_classes:
            raise ValueError("can only merge a MeanIoU with the same num_classes")
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def synced_confusion(self) -> Tensor:
        """The confusion matrix summed over all processes (a copy; this one is unchanged)."""
        conf = self.confusion.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and conf.device.type != "cuda":
                conf = conf.cuda()
            dist.all_reduce(conf, op=dist.ReduceOp.SUM)
        return conf.cpu()

    def compute(self, sync: bool = True) -> dict:
        conf = (self.synced_confusion() if sync else self.confusion.cpu()).double()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        present = ~torch.isnan(iou)
        total = conf.sum()
        return {
            "miou": float(iou[present].mean() * 100) if present.any() else math.nan,
            "per_class": [float(v) * 100 for v in iou.tolist()],
            "aacc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "pixels": int(total),
        }
