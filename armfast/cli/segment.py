"""`armfast segment`: open-vocabulary segmentation of image files.

For each IMAGE, OUTDIR receives ``<stem>.png`` (the label map, a palette PNG whose pixel values
are class indices) and ``<stem>_overlay.png`` (the photo under the colour map, with a legend).
The defaults are the baseline's preset for the backbone (armfast.eval.presets), the values the
benchmarks run with; the effective configuration is printed first. A background rule
(--background) adds a class "background" as class 0, before the named classes.
A problem with one image is reported on one line and the others are still processed; the exit
status is 1 if any image failed, 2 if nothing could start (no classes, missing weights, ...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._speed_args import add_speed_arguments, speed_options

PROG = "armfast segment"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("segment", help="segment images with CLIP, a training-free baseline and ARM",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help='class names separated by ",", synonyms of one class '
                                           'joined by "|", e.g. "cat,person|people,grass,sky"')
    classes.add_argument("--class-file", metavar="FILE",
                         help="class-name file: one class per line, comma-separated synonyms "
                              "(or a dataset name such as voc21)")
    p.add_argument("--baseline", default="sclip",
                   help="vanilla, maskclip, sclip, clearclip, naclip or proxyclip (default: sclip)")
    p.add_argument("--arm", metavar="DIR", help="ARM checkpoint directory (ARM.save_pretrained)")
    p.add_argument("--clip-model", default="ViT-B-16",
                   help="open_clip model: ViT-B-16 (default), ViT-B-32, ViT-L-14, ViT-L-14-336, ...")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--clip-weights", metavar="PATH", help="local CLIP checkpoint (safetensors)")
    weights.add_argument("--pretrained", default="openai", metavar="TAG",
                         help="open_clip weights tag (default: openai); 'none' = random weights")
    p.add_argument("--quick-gelu", action="store_true",
                   help="build with QuickGELU (needed for OpenAI weights given by --clip-weights)")
    p.add_argument("--vfm", metavar="PATH", help="proxyclip: VFM checkpoint (e.g. DINO ViT-B/8)")
    p.add_argument("--vfm-arch", default=None, metavar="NAME",
                   help="proxyclip: timm architecture of --vfm (default: vit_base_patch8_224.dino)")
    p.add_argument("--short-side", type=int,
                   help="resize short side to this (default: the preset's, 336 for sclip; 0 = off)")
    p.add_argument("--crop", type=int, help="sliding-window crop (default: the preset's; 0 = whole image)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the preset's)")
    p.add_argument("--logit-scale", type=float,
                   help="softmax temperature without ARM (default: the preset's)")
    p.add_argument("--background", metavar="RULE",
                   help="none (default); thd:P (pixels under probability P are background); "
                        "words (SCLIP's background words: sky, wall, tree, ...) or words:W1,W2 "
                        "(pixels these words win are background); both: words:sky,wall+thd:0.2")
    p.add_argument("--prob-thd", type=float,
                   help="short for --background thd:P (with a words rule: its threshold)")
    p.add_argument("--templates", choices=("openai", "simple"), default="openai",
                   help="prompt templates: the 80 OpenAI ImageNet ones, or 'a photo of a {}.'")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", help="armfast.ops backend (default: auto)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    add_speed_arguments(p)
    return p


def _error(message: str, write=None) -> None:
    line = f"{PROG}: error: {message}"
    if write is None:
        print(line, file=sys.stderr)
    else:
        write(line, file=sys.stderr)


def _classes(args):
    from ..clip import parse_class_list, read_class_file

    if args.class_file is not None:
        return read_class_file(args.class_file)
    return parse_class_list(args.classes)


def _segmentor(args, classes):
    import torch

    from ..backbones import canonical_name
    from ..clip import load_clip, load_vfm
    from ..clip.vfm import DEFAULT_VFM_ARCH
    from ..eval.presets import DEFAULT_BACKBONE, get_preset, warn_preset
    from ..segmentor import Segmentor, load_arm

    speed = speed_options(args)
    # before the CLIP build, so that a wrong flag or path fails fast; an unregistered model
    # gets ViT-B/16's preset (the protocols are the same for every backbone)
    preset = get_preset(args.baseline, None, canonical_name(args.clip_model) or DEFAULT_BACKBONE,
                        background=args.background, short_side=args.short_side, crop=args.crop,
                        stride=args.stride, logit_scale=args.logit_scale, prob_thd=args.prob_thd)
    arm = load_arm(args.arm)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.clip_weights is not None:
        pretrained = args.clip_weights
    else:
        pretrained = None if args.pretrained.lower() == "none" else args.pretrained
        if ":" in args.clip_model and pretrained == "openai":  # the default; the folder has weights
            pretrained = None
    clip = load_clip(args.clip_model, pretrained, device, quick_gelu=True if args.quick_gelu else None)
    vfm = load_vfm(args.vfm, args.vfm_arch or DEFAULT_VFM_ARCH) if args.vfm else None
    warn_preset(preset)
    segmentor = Segmentor(clip, classes, baseline=args.baseline, arm=arm, vfm=vfm,
                          protocol=preset.protocol, background=preset.background,
                          templates=args.templates, backend=args.backend, **speed)
    print(f"{PROG}: {preset.describe()}")
    print("  effective: " + ", ".join(f"{k} {v}" for k, v in segmentor.config().items()
                                        if k not in ("arm",)))
    return segmentor


def _output_stems(images: list[str]) -> list[str]:
    """File stems, made unique (``a/x.jpg`` and ``b/x.jpg`` -> ``x``, ``x_2``)."""
    seen: dict[str, int] = {}
    stems = []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def run(args) -> int:
    from tqdm import tqdm

    try:
        classes = _classes(args)
        segmentor = _segmentor(args, classes)
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as exc:
        _error(str(exc))
        return 2

    from PIL import Image, UnidentifiedImageError

    failed = 0
    for path, stem in zip(tqdm(args.images, desc="segment", unit="img", file=sys.stderr),
                          _output_stems(args.images)):
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            _error(f"{path}: cannot read image ({exc})", tqdm.write)
            failed += 1
            continue
        try:
            result = segmentor.segment(image)
            result.save(out_dir / f"{stem}.png")
            result.save(out_dir / f"{stem}_overlay.png", kind="overlay")
        except (OSError, ValueError, RuntimeError) as exc:
            _error(f"{path}: {exc}", tqdm.write)
            failed += 1
    return 1 if failed else 0
