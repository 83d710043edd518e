"""ARM training: frozen CLIP and baselines, per-pixel cross-entropy on the ARM's logits.

One optimizer step = ``accum`` micro-batches of ``batch_size`` crops per process. The baseline
is drawn per step from ``baselines`` (same on every rank); CLIP features are extracted under
``torch.no_grad``; only the ARM (wrapped with its logits head in DDP) receives gradients.
The crop forward is inference's (`armfast.inference.crop_model`: CLIP features, ARM, float32
cosine logits times tau) and each class takes its best synonym's logit as in inference
(`armfast.inference.queries.TextQueries`). Data order, augmentation and baseline choice are functions of (seed, step), so a run resumed
from a checkpoint continues exactly as if it had never stopped (its log is cut back to the
checkpoint's step, and temporaries of a killed write are removed).

Before CLIP is loaded, everything that can be wrong is checked (`Trainer._preflight`): the
output folder, the checkpoint to resume and the settings it fixes, the crop against the patch
size, class names, datasets, the validation protocol, and every training mask's labels
(`armfast.train.labels`).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .._files import ensure_writable_dir, remove_stale_temporaries
from ..arm import ARM, ARMConfig
from ..arm.folder import save_folder
from ..data import IGNORE_INDEX, TrainAugment, build_dataset, flatten_class_names, load_class_names
from ..inference.crop_model import CropModel
from ..inference.queries import TextQueries
from ..precision import autocast_dtype, describe
from .checkpoint import (checkpoint_name, latest_checkpoint, prune_checkpoints, restore_rng_state,
                         save_checkpoint)
from .config import TrainConfig
from .data import AugmentedDataset, ResumableBatchSampler, baseline_for_step
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from .labels import check_labels
from .resume import LOG, read_resume, truncate_log
from .schedule import build_scheduler, load_scheduler_state, scheduler_state


ARM_FOLDER = "arm"  # OUT/arm: the trained ARM, what --arm takes


def segmentation_loss(logits: Tensor, grid: tuple[int, int], masks: Tensor) -> Tensor:
    """Cross-entropy of [B, N, C] patch logits, upsampled bilinearly to the masks' [B, H, W],
    averaged over the labelled pixels (0 when a batch has none)."""
    maps = logits.transpose(1, 2).unflatten(-1, grid).float()
    maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(maps, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp(min=1)


def throughput_line(images: int, seconds: float, data_wait: float, device: torch.device) -> str:
    """``"480 images in 12.0 s: 40.0 images/s, waiting for data 3% of the time, GPU peak 9.1 GiB"``
    (images of all processes; the time of this one's training steps, validation excluded)."""
    line = (f"{images} images in {seconds:.1f} s: {images / max(seconds, 1e-9):.1f} images/s, "
            f"waiting for data {100 * data_wait / max(seconds, 1e-9):.0f}% of the time")
    if device.type == "cuda":
        line += f", GPU peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return line


def arm_config_for(model: nn.Module, cfg: TrainConfig, overrides: dict | None = None) -> ARMConfig:
    """ARM hyper-parameters matching the CLIP tower: width, output dim, shallow layers."""
    from ..clip.model import backbone_of, default_shallow_layers, output_dim, vision_tower

    visual = vision_tower(model)
    layers = cfg.shallow_layers or default_shallow_layers(model)
    spec = backbone_of(model)  # the registered name, so a mismatched CLIP is caught at inference
    values = dict(shallow_layers=layers, width=visual.transformer.width,
                  embed_dim=output_dim(model), backbone=spec.name if spec else cfg.model)
    values.update(overrides or {})
    return ARMConfig.from_dict(values)


def param_groups(arm: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, the fusion weights and the logit scale (1-D params)."""
    decay, no_decay = [], []
    for p in arm.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    step: int
    arm: ARM
    losses: list[float] = field(default_factory=list)  # this process's loss per step of this run
    val: dict | None = None  # last validation result
    checkpoint: Path | None = None
    arm_dir: Path | None = None  # save_pretrained folder (when training finished)


def train(cfg: TrainConfig, *, model: nn.Module | None = None, arm_config: dict | None = None,
          text_embeddings: Tensor | None = None) -> TrainResult:
    """Train an ARM. Under torchrun (WORLD_SIZE > 1) every process calls this.

    Args:
        cfg: the run's configuration.
        model: a CLIP model to use instead of ``load_clip(cfg.model, cfg.pretrained)``.
        arm_config: ARMConfig field overrides (e.g. smaller heads for a small CLIP).
        text_embeddings: precomputed ``[Q, E]`` embeddings of the dataset's synonyms, in the
            order of its class-name file (computed from CLIP's text tower otherwise).
    """
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = init_distributed(cfg.device)
    try:
        return Trainer(cfg, info, model=model, arm_config=arm_config,
                       text_embeddings=text_embeddings).run()
    finally:
        if owns_group:
            cleanup(info)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, *, model=None, arm_config=None,
                 text_embeddings=None):
        from ..clip import load_clip
        from ..clip.model import image_stats, patch_size

        self.cfg, self.info = cfg, info
        cfg.world_size = info.world_size
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = info.device
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.data_wait = 0.0  # seconds spent waiting for the loader since the last log line

        # what can be wrong with the settings, the files and the labels is found here, before
        # CLIP is loaded and before step 1
        resume = self._preflight(model)

        if model is None:
            model = load_clip(cfg.model, cfg.pretrained, device=self.device,
                              quick_gelu=cfg.quick_gelu)
        self.clip = model.to(self.device).eval().requires_grad_(False)
        self.patch = patch_size(self.clip)
        mean, std = image_stats(self.clip)
        if cfg.crop % self.patch[0] or cfg.crop % self.patch[1]:
            raise ValueError(f"--crop must be a multiple of the patch size {self.patch}, got {cfg.crop}")
        self.augment = TrainAugment(cfg.crop, cfg.base_short, cfg.scale_range, cfg.flip_prob,
                                    mean=mean, std=std)

        names, query_class = flatten_class_names(self.classes)
        self.queries = TextQueries(
            self._text_embeddings(names, text_embeddings),
            torch.tensor(query_class, dtype=torch.long, device=self.device), len(self.classes),
            [synonyms[0] for synonyms in self.classes])

        torch.manual_seed(cfg.seed)  # same ARM initialisation on every rank
        self.arm = ARM(arm_config_for(self.clip, cfg, arm_config)).to(self.device)
        self.crops = CropModel(self.clip, baseline=cfg.baselines[0], arm=self.arm,
                               backend=cfg.backend)
        self.head = self.crops.head  # ARM and its logits: what learns, what DDP wraps
        self.optimizer = torch.optim.AdamW(param_groups(self.arm, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = build_scheduler(self.optimizer, total=cfg.steps, warmup=cfg.warmup,
                                         min_ratio=cfg.min_lr_ratio)
        self.step = 0
        self.last_checkpoint: Path | None = None
        if resume is not None:
            self._restore(*resume)
        self.model = (DistributedDataParallel(self.head, device_ids=[info.local_rank]
                                              if self.device.type == "cuda" else None)
                      if info.distributed else self.head)

    # ---- setup helpers -------------------------------------------------------------------
    def _preflight(self, model) -> tuple[Path, dict] | None:
        """Output folder, checkpoint to resume (read and verified), crop, class names,
        datasets and labels; returns (path, checkpoint) when resuming."""
        from ..preflight import check_crop, clip_geometry

        cfg, info = self.cfg, self.info
        if info.is_main:
            ensure_writable_dir(self.out, "--out")
            for folder in (self.out, self.ckpt_dir, self.out / ARM_FOLDER):
                remove_stale_temporaries(folder)  # left by a kill during an atomic write
            if cfg.warmup > cfg.steps:
                warnings.warn(f"--warmup {cfg.warmup} is longer than --steps {cfg.steps}: the "
                              f"learning rate stops at {cfg.steps / cfg.warmup:.2g} x --lr and "
                              f"never decays", stacklevel=3)
            if model is None and cfg.pretrained is None and ":" not in cfg.model:
                warnings.warn("no CLIP weights (--pretrained none): CLIP is randomly "
                              "initialised, which only makes sense for tests", stacklevel=3)
        resume = read_resume(cfg, self.ckpt_dir, info.is_main) if cfg.resume else None
        if not cfg.resume and (found := latest_checkpoint(self.ckpt_dir)) is not None:
            raise ValueError(f"--out {self.out} already holds checkpoints of a run (the latest is "
                             f"{found.name}): continue it with --resume, or train into a new --out")
        check_crop(cfg.crop, None if model is not None else clip_geometry(cfg.model))
        self.classes = load_class_names(cfg.class_file if cfg.is_folder else cfg.dataset)
        self.trainset = self._dataset("train")
        per_step = cfg.batch_size * info.world_size
        if len(self.trainset) < per_step:
            raise ValueError(f"--batch-size {cfg.batch_size} x {info.world_size} process(es) needs "
                             f"at least {per_step} training images; the training set has "
                             f"{len(self.trainset)}")
        self.valset = self._val_dataset()
        if self.valset is not None:
            self._val_protocol()  # a protocol that makes no sense fails now, not at the first check
        if cfg.check_labels:
            check_labels(self.trainset, self.out, workers=cfg.workers, progress=cfg.progress,
                         info=info)
        return resume

    def _text_embeddings(self, names: list[str], given: Tensor | None) -> Tensor:
        if given is None:
            from ..clip import encode_names
            from ..clip.text import resolve_templates

            cfg, main = self.cfg, self.info.is_main
            n_templates = len(resolve_templates(cfg.templates))
            if main:
                print(f"armfast train: encoding {len(names)} class names x {n_templates} "
                      f"templates ({len(names) * n_templates} prompts)", flush=True)
            given = encode_names(self.clip, names, cfg.templates, progress=cfg.progress and main)
        if not isinstance(given, Tensor) or given.dim() != 2 or given.shape[0] != len(names):
            got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(f"text_embeddings must be [{len(names)}, E] (one row per synonym of "
                             f"{self.cfg.dataset}), got {got}")
        return given.detach().to(self.device, torch.float32)

    def _dataset(self, split: str, limit: int | None = None):
        cfg = self.cfg
        if not cfg.is_folder:
            return build_dataset(cfg.dataset, cfg.data_root, split, limit=limit)
        from ..data import FolderDataset

        images, masks = (cfg.images, cfg.masks) if split == "train" else (cfg.val_images, cfg.val_masks)
        if images is None:
            raise ValueError("no validation folders (--val-images / --val-masks) for --dataset folder")
        return FolderDataset(images, masks, cfg.class_file, reduce_zero_label=cfg.reduce_zero_label,
                             limit=limit)

    def _val_dataset(self):
        cfg = self.cfg
        if cfg.val_every == 0 or cfg.val_samples == 0:
            return None
        try:
            return self._dataset("val", limit=cfg.val_samples)
        except (FileNotFoundError, ValueError) as exc:
            if self.info.is_main:
                warnings.warn(f"periodic validation disabled: {exc}", stacklevel=2)
            return None

    def _restore(self, path: Path, ckpt: dict) -> None:
        missing, unexpected = self.arm.load_state_dict(ckpt["arm"], strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit this ARM: missing {missing}, "
                             f"unexpected {unexpected}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        load_scheduler_state(self.scheduler, ckpt["scheduler"])
        if ckpt["rng"] is not None:
            restore_rng_state(*ckpt["rng"])
        self.step = int(ckpt["step"])
        self.last_checkpoint = path
        if self.info.is_main:
            truncate_log(self.out / LOG, self.step)
            print(f"armfast train: resumed from {path} at step {self.step}")

    # ---- the loop ------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        cfg, info = self.cfg, self.info
        sampler = ResumableBatchSampler(self.trainset, cfg.batch_size, seed=cfg.seed,
                                        rank=info.rank, world_size=info.world_size,
                                        start=self.step * cfg.accum)
        return DataLoader(AugmentedDataset(self.trainset, self.augment), batch_sampler=sampler,
                          num_workers=cfg.workers, pin_memory=self.device.type == "cuda")

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def text(self) -> Tensor:
        return self.queries.text

    def features(self, images: Tensor, baseline: str):
        """``(shallow, deep, grid)`` of a batch: the frozen CLIP and `baseline`, no gradients."""
        with torch.no_grad(), self.autocast():
            return self.crops.features(images, baseline)

    def train_step(self, batches, baseline: str) -> float:
        cfg = self.cfg
        self.arm.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(cfg.accum):
            t0 = time.perf_counter()
            images, masks = next(batches)
            self.data_wait += time.perf_counter() - t0
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            shallow, deep, grid = self.features(images, baseline)
            last = k == cfg.accum - 1
            sync = contextlib.nullcontext() if last or not self.info.distributed else self.model.no_sync()
            with sync:
                with self.autocast():  # logit_scale None: ARM's tau
                    logits = self.model(shallow, deep, self.text, backend=cfg.backend)
                logits = self.queries.per_class_max(logits, dim=-1)
                loss = segmentation_loss(logits, grid, masks) / cfg.accum
                loss.backward()
            total += loss.detach()  # read once per step: each read waits for the GPU
        total = float(total)
        if not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total} at step {self.step}; lower "
                                     f"--lr or check the data")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.arm.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return total

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            self._print_setup()
        result = TrainResult(step=self.step, arm=self.arm, checkpoint=self.last_checkpoint)
        bar = None
        if info.is_main and cfg.progress and self.step < end:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                       file=sys.stderr)
        batches = iter(self.loader()) if self.step < end else None
        images_per_step = cfg.batch_size * cfg.accum * info.world_size
        window, busy = [], 0.0  # losses and training seconds since the last log line
        total_images, total_busy, total_wait = 0, 0.0, 0.0
        while self.step < end:
            t0 = time.perf_counter()
            baseline = baseline_for_step(cfg.baselines, cfg.seed, self.step)
            loss = self.train_step(batches, baseline)
            self.step += 1
            busy += time.perf_counter() - t0
            result.losses.append(loss)
            window.append(loss)
            if self.step % cfg.log_every == 0 or self.step == end:
                mean_loss = all_reduce_mean(sum(window) / len(window), info)
                ips = len(window) * images_per_step / max(busy, 1e-9)
                record = {"step": self.step, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                          "images_per_s": ips, "data_wait": self.data_wait / max(busy, 1e-9),
                          "baseline": baseline}
                if self.device.type == "cuda":
                    record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self._log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}", base=baseline)
                total_images += len(window) * images_per_step
                total_busy += busy
                total_wait += self.data_wait
                window, busy, self.data_wait = [], 0.0, 0.0
            if bar is not None:
                bar.update(1)
            if self.valset is not None and self.step % cfg.val_every == 0:
                result.val = self.validate()
            if self.step % cfg.ckpt_every == 0 or self.step == end:
                result.checkpoint = self.save_checkpoint()
        if bar is not None:
            bar.close()
        if info.is_main and total_images:
            print("armfast train: " + throughput_line(total_images, total_busy, total_wait,
                                                      self.device))
        result.step = self.step
        if self.step >= cfg.steps:  # the loop's last step wrote a checkpoint (or resume found one)
            if info.is_main:
                result.arm_dir = save_folder(self.arm, self.out / ARM_FOLDER, training={
                    "dataset": cfg.dataset, "steps": self.step, "baselines": ", ".join(cfg.baselines),
                    "CLIP": f"{cfg.model}, weights {cfg.pretrained or 'random'}",
                    "templates": cfg.templates, "run folder": str(self.out)})
                print(f"armfast train: done at step {self.step}; ARM saved to {result.arm_dir}")
        elif info.is_main:
            print(f"armfast train: stopped at step {self.step} of {cfg.steps}; continue with --resume")
        barrier(info)
        return result

    # ---- validation / checkpoints / logs -------------------------------------------------
    def _val_protocol(self):
        """(baseline, protocol) of the periodic validation."""
        from dataclasses import replace

        from ..protocols import base_protocol, get_protocol

        cfg = self.cfg
        baseline = cfg.val_baseline or cfg.baselines[0]
        if cfg.is_folder:  # no published protocol: the baseline's own defaults
            return baseline, replace(base_protocol(baseline), **(cfg.val_protocol or {}))
        return baseline, get_protocol(baseline, cfg.dataset, **(cfg.val_protocol or {}))

    def validate(self) -> dict:
        from ..eval.runner import evaluate
        from ..inference.config import SegmentorConfig

        cfg, info = self.cfg, self.info
        baseline, protocol = self._val_protocol()
        self.arm.eval()
        config = SegmentorConfig(baseline=baseline, protocol=protocol, backend=cfg.backend,
                                 precision=cfg.precision, templates=cfg.templates)
        result = evaluate(self.clip, self.valset, config, arm=self.arm, text_embeddings=self.text,
                          classes=self.classes, rank=info.rank, world_size=info.world_size,
                          progress=False)
        self.arm.train()
        self._log({"step": self.step, "val_miou": result["miou"], "val_baseline": baseline,
                   "val_images": len(self.valset)})
        return result

    def save_checkpoint(self) -> Path:
        path = self.ckpt_dir / checkpoint_name(self.step)
        if self.info.is_main:
            extra = {"config": self.cfg.to_dict(), "arm_config": self.arm.config.to_dict()}
            save_checkpoint(path, step=self.step, arm=self.arm.state_dict(),
                            optimizer=self.optimizer.state_dict(),
                            scheduler=scheduler_state(self.scheduler), extra=extra)
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        barrier(self.info)
        self.last_checkpoint = path
        return path

    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.cfg.progress:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()))

    def _print_setup(self) -> None:
        cfg, info = self.cfg, self.info
        n_params = sum(p.numel() for p in self.arm.parameters())
        print(f"armfast train: {len(self.trainset)} {cfg.dataset} images, {len(self.classes)} classes "
              f"({self.text.shape[0]} names), baselines {', '.join(cfg.baselines)}")
        print(f"  ARM {n_params / 1e6:.2f} M params {self.arm.config.to_dict()}")
        print(f"  {info.world_size} process(es) on {self.device.type}, batch {cfg.batch_size} x "
              f"accum {cfg.accum} x world {info.world_size}, {cfg.steps} steps, lr {cfg.lr}, "
              f"{describe(self.autocast_dtype)}, backend {cfg.backend}, templates {cfg.templates}, "
              f"data workers {cfg.workers}")
