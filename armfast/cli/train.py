"""`armfast train`: train an ARM on COCO-Stuff-164k (or another registered dataset).

Runs under torchrun for several GPUs/processes:
    torchrun --nproc_per_node=8 --no-python armfast train --data-root data/coco_stuff164k \\
        --out runs/arm --pretrained openai

Your own data, no config file:
    armfast train --dataset folder --images imgs --masks masks --class-file classes.txt --out runs/x
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._clip_args import add_clip_arguments, clip_weights, quick_gelu
from ._folder_args import FOLDER, add_folder_arguments, check_folder_paths


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from exc


def add_parser(sub) -> argparse.ArgumentParser:
    from ..train.config import TrainConfig

    d = TrainConfig(data_root="", out="")
    p = sub.add_parser("train", help="train an ARM (frozen CLIP and baselines)",
                       description="Train an Attention Refinement Module on a segmentation dataset "
                                   "with CLIP and the training-free baselines frozen.")
    p.add_argument("--data-root", help="dataset root (mmseg layout); not for --dataset folder")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, final ARM")
    p.add_argument("--dataset", default=d.dataset,
                   help=f"training dataset (default {d.dataset}), or folder: your own data "
                        f"(--images, --masks, --class-file; --val-images, --val-masks to validate)")
    p.add_argument("--baselines", default=",".join(d.baselines),
                   help="comma list; one is drawn per batch (default %(default)s)")
    add_clip_arguments(p)
    p.add_argument("--shallow-layers", type=_layers, default=None,
                   help="comma list of 0-based blocks fused by ARM (default: depth/3, depth/2, 2*depth/3)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-batch")
    p.add_argument("--accum", type=int, default=d.accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables")
    p.add_argument("--crop", type=int, default=d.crop)
    p.add_argument("--base-short", type=int, default=d.base_short,
                   help="short side before the random scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers,
                   help="data-loading processes: read, decode, augment (default %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="0 keeps all")
    p.add_argument("--val-every", type=int, default=d.val_every, help="0 disables validation")
    p.add_argument("--val-samples", type=int, default=d.val_samples)
    p.add_argument("--val-baseline", default=None, help="default: the first of --baselines")
    p.add_argument("--val-short-side", type=int, default=None,
                   help="validation protocol overrides (default: the baseline's published one)")
    p.add_argument("--val-crop", type=int, default=None)
    p.add_argument("--val-stride", type=int, default=None)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in OUT/checkpoints (or the one given)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="leave after this step with a checkpoint (continue later with --resume)")
    p.add_argument("--backend", default=d.backend, help="armfast.ops backend (default auto)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    from ..precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto (default): bf16 autocast on CUDA, float32 on CPU; fp32: float32 everywhere")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")
    p.add_argument("--no-label-check", action="store_true",
                   help="skip reading every training mask for out-of-range labels before step 1")
    add_folder_arguments(p)
    add_folder_arguments(p, prefix="val-")
    return p


def config_from_args(args):
    """The TrainConfig of the command line, after the checks that need nothing loaded: the
    data paths exist, the backend runs on the device, the CLIP weights can be had."""
    from ..preflight import check_backend, resolve_device
    from ..train.config import TrainConfig

    dataset = args.dataset.lower()
    if dataset != FOLDER:
        if args.data_root is None:
            raise ValueError(f"--data-root is required for --dataset {args.dataset} (or use "
                             f"--dataset {FOLDER} with --images, --masks and --class-file)")
        if not Path(args.data_root).expanduser().is_dir():
            raise FileNotFoundError(f"--data-root: {args.data_root} is not a folder")
    if dataset == FOLDER and args.has_background:
        raise ValueError("--has-background is for evaluation; training uses every class of the "
                         "class file as it is")
    check_folder_paths(images=args.images, masks=args.masks, val_images=args.val_images,
                       val_masks=args.val_masks, class_file=args.class_file)
    if args.resume not in (None, "latest") and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint file at {args.resume} (without a "
                                f"value, --resume takes the newest in OUT/checkpoints)")
    check_backend(args.backend, resolve_device(args.device))
    cfg = TrainConfig(
        data_root=args.data_root or "", out=args.out, dataset=dataset, baselines=args.baselines,
        images=args.images, masks=args.masks, class_file=args.class_file,
        val_images=args.val_images, val_masks=args.val_masks,
        reduce_zero_label=args.reduce_zero_label,
        model=args.model, quick_gelu=quick_gelu(args), templates=args.templates,
        shallow_layers=args.shallow_layers, steps=args.steps, batch_size=args.batch_size,
        accum=args.accum, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip, crop=args.crop,
        base_short=args.base_short, seed=args.seed, workers=args.workers,
        log_every=args.log_every, ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints, val_every=args.val_every,
        val_samples=args.val_samples, val_baseline=args.val_baseline,
        val_protocol={k: v for k, v in (("short_side", args.val_short_side),
                                         ("crop", args.val_crop), ("stride", args.val_stride))
                      if v is not None} or None,
        resume=args.resume,
        stop_at=args.stop_at, backend=args.backend, device=args.device,
        precision=args.precision, progress=not args.no_progress,
        check_labels=not args.no_label_check)
    cfg.pretrained = clip_weights(args, warn=False)  # the trainer warns about random weights
    return cfg


def run(args) -> int:
    from ..train import train

    cfg = config_from_args(args)
    result = train(cfg)
    if result.val is not None:
        print(f"armfast train: last validation mIoU {result.val['miou']:.2f}")
    return 0
