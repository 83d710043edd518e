"""`armfast segment`: open-vocabulary segmentation of image files.

For each IMAGE, OUTDIR receives ``<stem>.png`` (the label map, a palette PNG whose pixel values
are class indices) and ``<stem>_overlay.png`` (the photo under the colour map, with a legend);
stems get a ``_2``, ``_3`` suffix where two images would write the same file. Images are read
as a viewer shows them (EXIF orientation, transparency on white, 16-bit).
The defaults are the baseline's preset for the backbone (armfast.presets), the values the
benchmarks run with; the effective configuration is printed first. A background rule
(--background) adds a class "background" as class 0, before the named classes.
Every flag and file is checked before CLIP is loaded. A problem with one image is reported on
one line and the others are still processed; the exit status is 1 if any image failed, 2 if
nothing could start (no classes, missing weights, ...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._clip_args import add_clip_arguments, clip_weights, quick_gelu
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
                   help="vanilla, maskclip, sclip, clearclip, naclip, proxyclip, scclip, sfp or "
                        "resclip (default: sclip)")
    p.add_argument("--arm", metavar="DIR", help="ARM checkpoint directory (ARM.save_pretrained)")
    add_clip_arguments(p)
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
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", help="armfast.ops backend (default: auto)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    add_speed_arguments(p)
    return p


def _error(message: str, write=print) -> None:
    write(f"{PROG}: error: {message}", file=sys.stderr)


def _classes(args):
    from ..clip import parse_class_list, read_class_file

    if args.class_file is not None:
        return read_class_file(args.class_file, "--class-file")
    return parse_class_list(args.classes, "--classes")


def _segmentor(args, classes, out_dir: Path):
    """Checks every flag and file first (nothing loaded yet), then loads CLIP."""
    from .._files import ensure_writable_dir
    from ..clip import load_clip, load_vfm
    from ..clip.vfm import DEFAULT_VFM_ARCH
    from ..arm import load_arm
    from ..inference import Segmentor, SegmentorConfig
    from ..preflight import check_arm_fits, check_backend, clip_geometry, resolve_device
    from ..presets import DEFAULT_BACKBONE, get_preset, warn_preset

    speed = speed_options(args)
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    geometry = clip_geometry(args.model)
    spec = geometry.backbone if geometry is not None else None
    # an unregistered model gets ViT-B/16's preset (the protocols are the same for every backbone)
    preset = get_preset(args.baseline, None, spec.name if spec else DEFAULT_BACKBONE,
                        background=args.background, short_side=args.short_side, crop=args.crop,
                        stride=args.stride, logit_scale=args.logit_scale, prob_thd=args.prob_thd)
    if preset.baseline == "proxyclip" and not args.vfm:
        raise ValueError("--baseline proxyclip needs --vfm FILE (a DINO ViT-B/8 checkpoint)")
    if args.vfm and not Path(args.vfm).is_file():
        raise FileNotFoundError(f"--vfm: no file at {args.vfm}")
    arm = load_arm(args.arm, "--arm")
    if arm is not None:
        check_arm_fits(arm.config, geometry)
    ensure_writable_dir(out_dir, "--output")
    pretrained = clip_weights(args)
    clip = load_clip(args.model, pretrained, device, quick_gelu=quick_gelu(args))
    vfm = load_vfm(args.vfm, args.vfm_arch or DEFAULT_VFM_ARCH) if args.vfm else None
    warn_preset(preset)
    config = SegmentorConfig(baseline=args.baseline, protocol=preset.protocol,
                             background=preset.background, templates=args.templates,
                             backend=args.backend, **speed)
    segmentor = Segmentor(clip, classes, config, arm=arm, vfm=vfm)
    print(f"{PROG}: {preset.describe()}")
    print("  effective: " + ", ".join(f"{k} {v}" for k, v in segmentor.config().items()
                                        if k not in ("arm",)))
    return segmentor


OUTPUTS = ("{}.png", "{}_overlay.png")  # what each image writes, by stem


def output_stems(images: list[str]) -> list[str]:
    """A stem per image such that no two images write the same file: ``a/x.jpg`` and
    ``b/x.jpg`` give ``x`` and ``x_2``; ``photo.jpg`` and ``photo_overlay.jpg`` give
    ``photo`` and ``photo_overlay_2`` (``photo_overlay.png`` is the first one's overlay).
    Names compare case-insensitively (macOS and Windows file systems)."""
    taken: set[str] = set()
    stems = []
    for image in images:
        base = Path(image).stem or "image"
        stem, k = base, 1
        while any(o.format(stem).lower() in taken for o in OUTPUTS):
            k += 1
            stem = f"{base}_{k}"
        taken.update(o.format(stem).lower() for o in OUTPUTS)
        stems.append(stem)
    return stems


def run(args) -> int:
    from tqdm import tqdm

    from ..data.images import open_rgb

    out_dir = Path(args.output)
    segmentor = _segmentor(args, _classes(args), out_dir)
    failed = 0
    for path, stem in zip(tqdm(args.images, desc="segment", unit="img", file=sys.stderr),
                          output_stems(args.images)):
        try:
            image = open_rgb(path)
        except (OSError, ValueError) as exc:
            _error(f"{path}: cannot read image ({exc})", tqdm.write)
            failed += 1
            continue
        try:
            result = segmentor.segment(image)
            labels, overlay = (OUTPUTS[0].format(stem), OUTPUTS[1].format(stem))
            result.save(out_dir / labels)
            result.save(out_dir / overlay, kind="overlay")
        except (OSError, ValueError, RuntimeError) as exc:
            _error(f"{path}: {exc}", tqdm.write)
            failed += 1
    return 1 if failed else 0
