"""Configuration of an ARM training run."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..backbones import ALL_BASELINES as _KNOWN_BASELINES

# fields that fix the data order and schedule: a resumed run must keep them
RESUME_KEYS = ("dataset", "baselines", "seed", "batch_size", "accum", "crop", "base_short",
               "scale_range", "flip_prob", "world_size", "lr", "weight_decay", "warmup",
               "min_lr_ratio", "model", "shallow_layers", "templates")
TEMPLATES = ("openai", "simple")


def flag(field_name: str) -> str:
    """The ``armfast train`` option of a config field (messages name it: ``--batch-size``)."""
    return "--" + field_name.replace("_", "-")


FOLDER = "folder"  # `dataset` value of your own data (images / masks / class_file)


@dataclass
class TrainConfig:
    data_root: str  # a registered dataset's root ("" for dataset="folder")
    out: str
    dataset: str = "coco_stuff164k"
    # dataset="folder": your own data (armfast.data.FolderDataset); val_* optional
    images: str | None = None
    masks: str | None = None
    class_file: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    reduce_zero_label: bool = False
    baselines: tuple[str, ...] = ("sclip", "clearclip", "naclip")
    # CLIP
    model: str = "ViT-B-16"
    pretrained: str | None = None  # open_clip tag or a weights file
    quick_gelu: bool | None = None  # None: what the tag says (a weights file: GELU)
    templates: str = "openai"  # class-name prompts: the 80 OpenAI ImageNet ones, or "simple"
    shallow_layers: tuple[int, ...] | None = None  # None: the backbone's default
    # optimisation
    steps: int = 20000
    batch_size: int = 16  # per process and micro-batch
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup: int = 500
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # augmentation
    crop: int = 224
    base_short: int = 336  # short side before the random scale (the eval short side)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    # bookkeeping
    seed: int = 0
    workers: int = 4
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 1000  # 0 disables periodic validation
    val_samples: int = 50
    val_baseline: str | None = None  # None: the first of `baselines`
    val_protocol: dict | None = None  # overrides of the published protocol (e.g. short_side)
    resume: str | None = None  # None, "latest", or a checkpoint path
    stop_at: int | None = None  # leave after this step (resumable), e.g. for time-sliced jobs
    backend: str = "auto"
    device: str | None = None  # "cuda", "cpu" or None (CUDA when available)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, float32 elsewhere), bf16, fp16, fp32
    progress: bool = True
    check_labels: bool = True  # scan every training mask for out-of-range labels first
    world_size: int = field(default=1, repr=False)  # filled in by the trainer

    def __post_init__(self):
        if isinstance(self.baselines, str):
            self.baselines = tuple(b.strip() for b in self.baselines.split(",") if b.strip())
        self.baselines = tuple(b.lower() for b in self.baselines)
        if not self.baselines:
            raise ValueError("--baselines must name at least one baseline")
        unknown = [b for b in self.baselines if b not in _KNOWN_BASELINES]
        if unknown:
            raise ValueError(f"--baselines: unknown {', '.join(unknown)}; known: "
                             f"{', '.join(b for b in _KNOWN_BASELINES if b != 'proxyclip')}")
        if "proxyclip" in self.baselines:
            raise ValueError("--baselines: proxyclip needs a vision foundation model at every "
                             "step; train with the CLIP-only baselines (ARM trained on them "
                             "transfers to proxyclip)")
        if self.shallow_layers is not None:
            self.shallow_layers = tuple(int(i) for i in self.shallow_layers)
        self.scale_range = tuple(float(s) for s in self.scale_range)
        for name in ("steps", "batch_size", "accum", "crop", "base_short", "log_every", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {v!r}")
        for name in ("seed", "warmup", "val_every", "workers", "keep_checkpoints", "val_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{flag(name)} must be a non-negative integer, got {v!r}")
        for name, least in (("lr", 0.0), ("weight_decay", None), ("grad_clip", None),
                            ("min_lr_ratio", None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (least is not None and v <= least):
                need = "> 0" if least is not None else ">= 0"
                raise ValueError(f"{flag(name)} must be a finite number {need}, got {v!r}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"--stop-at must be a positive step number, got {self.stop_at}")
        from ..precision import check_precision

        self.precision = check_precision(self.precision)
        if self.val_baseline is not None and self.val_baseline not in _KNOWN_BASELINES:
            raise ValueError(f"--val-baseline: unknown {self.val_baseline!r}; known: "
                             f"{', '.join(_KNOWN_BASELINES)}")
        if self.templates not in TEMPLATES:
            raise ValueError(f"--templates must be one of {', '.join(TEMPLATES)}, got "
                             f"{self.templates!r}")
        if self.dataset == FOLDER:
            missing = [flag(n) for n in ("images", "masks", "class_file") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"--dataset folder needs {', '.join(missing)} (a folder of "
                                 f"images, a folder of masks and a class-name file)")
            if (self.val_images is None) != (self.val_masks is None):
                raise ValueError("--val-images and --val-masks go together (a validation folder pair)")
        elif any(getattr(self, n) is not None for n in ("images", "masks", "val_images", "val_masks")):
            raise ValueError(f"--images/--masks/--val-images/--val-masks are for --dataset folder, "
                             f"not {self.dataset!r}")

    @property
    def is_folder(self) -> bool:
        return self.dataset == FOLDER

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
