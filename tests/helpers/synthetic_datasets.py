"""Tiny datasets in the real mmsegmentation layouts, written by the tests themselves.

`write_dataset(name, root, ...)` lays out a few small JPEG/PNG images and label PNGs exactly
where the armfast readers expect them and returns {split: {stem: raw label array}} so tests
can check what the readers make of the raw values.

`write_learnable_coco(root, ...)` writes a COCO-Stuff-layout set whose labels follow the image
colours (a learnable task for the training tests).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# raw PNG values each layout may hold (before the reader's label mapping)
RAW_VALUES = {
    "coco_stuff164k": list(range(171)) + [255],
    "coco_object": list(range(81)),
    "voc21": list(range(21)) + [255],
    "voc20": list(range(21)) + [255],
    "context60": list(range(60)),
    "context59": list(range(60)),
    "cityscapes": list(range(19)) + [255],
    "ade20k": list(range(151)),
}


def _image(rng, h, w) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(rng, h, w, values, palette=False) -> tuple[Image.Image, np.ndarray]:
    arr = np.asarray(values, dtype=np.uint8)[rng.integers(0, len(values), (h, w))]
    im = Image.fromarray(arr)  # mode "L"
    if palette:  # VOC ships palette PNGs; the reader must return indices, not colours
        im.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    return im, arr


def write_dataset(name: str, root: Path, *, n: int = 2, size=(40, 56), seed: int = 0,
                  splits=("train", "val")) -> dict:
    rng = np.random.default_rng(seed)
    h, w = size
    root = Path(root)
    raw = {}
    for split in splits:
        raw[split] = {}
        for i in range(n):
            stem = f"{split}{i:04d}"
            hh, ww = h + 8 * i, w - 4 * i  # images differ in size
            mask, arr = _mask(rng, hh, ww, RAW_VALUES[name], palette=name.startswith("voc"))
            image = _image(rng, hh, ww)
            if name in ("coco_stuff164k", "coco_object"):
                sub = f"{split}2017"
                suffix = "_labelTrainIds.png" if name == "coco_stuff164k" else "_instanceTrainIds.png"
                img_path = root / "images" / sub / f"{stem}.jpg"
                msk_path = root / "annotations" / sub / f"{stem}{suffix}"
            elif name.startswith("voc") or name.startswith("context"):
                voc = root / "VOCdevkit" / ("VOC2012" if name.startswith("voc") else "VOC2010")
                mdir, ldir = (("SegmentationClass", "Segmentation") if name.startswith("voc")
                              else ("SegmentationClassContext", "SegmentationContext"))
                img_path = voc / "JPEGImages" / f"{stem}.jpg"
                msk_path = voc / mdir / f"{stem}.png"
                lst = voc / "ImageSets" / ldir / f"{split}.txt"
                lst.parent.mkdir(parents=True, exist_ok=True)
                with open(lst, "a") as f:
                    f.write(stem + "\n")
            elif name == "cityscapes":
                city = "aachen" if i % 2 == 0 else "bremen"
                stem = f"{city}_{i:06d}_000019"
                img_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                msk_path = root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
            elif name == "ade20k":
                sub = {"train": "training", "val": "validation"}[split]
                stem = f"ADE_{sub}_{i:08d}"
                base = root / "ADEChallengeData2016"
                img_path = base / "images" / sub / f"{stem}.jpg"
                msk_path = base / "annotations" / sub / f"{stem}.png"
            else:
                raise ValueError(name)
            img_path.parent.mkdir(parents=True, exist_ok=True)
            msk_path.parent.mkdir(parents=True, exist_ok=True)
            image.save(img_path)
            mask.save(msk_path)
            raw[split][stem] = arr
    return raw


# a few well-separated colours; class k of the learnable task is colour k
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 220, 40]], dtype=np.uint8)


def write_learnable_coco(root: Path, *, n_train: int = 8, n_val: int = 2, size=(48, 48),
                         seed: int = 0, num_colours: int = 3) -> None:
    """COCO-Stuff layout; each image is split into colour blocks, the label is the colour id."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            labels = np.zeros((h, w), dtype=np.uint8)
            cut_y, cut_x = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
            ids = rng.permutation(num_colours)[:3] if num_colours >= 3 else rng.integers(0, num_colours, 3)
            labels[:cut_y] = ids[0]
            labels[cut_y:, :cut_x] = ids[1]
            labels[cut_y:, cut_x:] = ids[2 % len(ids)]
            noise = rng.integers(-12, 13, (h, w, 3))
            image = np.clip(COLOURS[labels].astype(np.int64) + noise, 0, 255).astype(np.uint8)
            labels[0, :3] = 255  # some ignored pixels
            img = root / "images" / f"{split}2017" / f"{split}{i:04d}.jpg"
            msk = root / "annotations" / f"{split}2017" / f"{split}{i:04d}_labelTrainIds.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            msk.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img, quality=95)
            Image.fromarray(labels).save(msk)


# ---- a tiny random CLIP (open_clip's own classes, so armfast.clip treats it like ViT-B/16) ----
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 4, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_ARM = {"num_heads": 2, "head_dim": 32}  # ARM overrides that fit the tiny CLIP
TINY_SHALLOW = (0, 1, 2)


def tiny_clip(seed: int = 0):
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP_CFG).eval().requires_grad_(False)


def write_tiny_clip_dir(path: Path, seed: int = 0) -> str:
    """An open_clip 'local-dir:' model folder (config + safetensors weights); returns the
    model name to pass to `load_clip` / `--model`."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in tiny_clip(seed).state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


def write_eval_setup(root: Path, n_cityscapes: int = 2) -> str:
    """Cityscapes and VOC21 val sets under ``root/data``, a tiny CLIP folder ``root/clip`` and
    an untrained ARM for it in ``root/arm`` (it returns the baseline's features exactly);
    returns the CLIP's model name."""
    import torch

    from armfast import ARM, ARMConfig

    write_dataset("cityscapes", root / "data", n=n_cityscapes, size=(40, 48), splits=("val",))
    write_dataset("voc21", root / "data", n=2, size=(40, 48), splits=("val",))
    model = write_tiny_clip_dir(root / "clip")
    torch.manual_seed(0)
    ARM(ARMConfig(shallow_layers=TINY_SHALLOW, width=64, embed_dim=32, **TINY_ARM)).save_pretrained(
        root / "arm")
    return model
