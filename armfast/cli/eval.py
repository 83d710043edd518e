"""`armfast eval`: mIoU of baselines (with and without ARM) on the OVSS benchmarks.

    armfast eval --dataset voc21,context60 --root data --baseline sclip,naclip \\
        --pretrained openai --arm runs/arm/arm --json results.json

One call gives a table over every (baseline, dataset) pair, each under its preset
(armfast.presets: the protocol its baseline published, the background rule, the class
file), printed in full before the run, with the paper's mIoU beside the measured one; with
--arm each baseline runs with and without it. ``--dataset folder --images DIR --masks DIR
--class-file F`` evaluates your own data. Runs under torchrun too: images are sharded and the
confusion matrices summed.

Datasets, baselines, backend, ARM, protocol values and the --json folder are checked before
CLIP is loaded. The --json file is rewritten after every result (``"complete": false`` until
the end), so a run that fails part-way keeps the rows it finished, with the error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from ._clip_args import DEFAULT_TAG, add_clip_arguments, clip_weights, quick_gelu
from ._folder_args import FOLDER, add_folder_arguments, folder_dataset
from ._speed_args import add_speed_arguments, speed_options


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a non-empty comma-separated list")
    return items


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate baselines (+ ARM) on segmentation benchmarks",
                       description="Evaluate CLIP baselines, with and without ARM, on the OVSS "
                                   "benchmarks (mmseg layouts) and print an mIoU table.")
    p.add_argument("--dataset", type=_csv, required=True,
                   help="comma list: voc21, context60, coco_object, voc20, context59, "
                        "coco_stuff164k, cityscapes, ade20k, or folder (your own data: "
                        "--images, --masks, --class-file)")
    p.add_argument("--root", action="append", default=[], metavar="[NAME=]DIR",
                   help="dataset root; DIR for all datasets (each is looked for in DIR and its "
                        "usual sub-folders) or NAME=DIR for one; repeatable")
    p.add_argument("--baseline", type=_csv, default=["sclip"], help="comma list (default sclip)")
    p.add_argument("--arm", metavar="DIR", help="ARM save_pretrained directory: also evaluate with it")
    add_clip_arguments(p)
    p.add_argument("--vfm", metavar="PATH", help="ProxyCLIP's vision foundation model checkpoint")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--limit", type=int, default=None, help="first N images of each dataset")
    p.add_argument("--json", metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--backend", default="auto", help="armfast.ops backend (default auto)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--workers", type=int, default=2,
                   help="data-loading processes: read, decode, resize (default %(default)s)")
    add_speed_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--per-class", choices=("auto", "yes", "no"), default="auto",
                   help="print per-class IoU tables (auto: when there is one result)")
    o = p.add_argument_group("protocol overrides (default: each baseline's published values)")
    o.add_argument("--short-side", type=int)
    o.add_argument("--crop", type=int)
    o.add_argument("--stride", type=int)
    o.add_argument("--logit-scale", type=float)
    o.add_argument("--prob-thd", type=float)
    o.add_argument("--background", metavar="RULE",
                   help="background rule instead of the preset's: none, thd:P, words, "
                        "words:W1,W2, words:W1,W2+thd:P")
    add_folder_arguments(p)
    return p


def resolve_roots(entries: list[str], datasets: list[str]) -> dict[str, str]:
    from ..data import get_dataset_class

    common, named = None, {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and not Path(entry).exists():
            try:
                named[get_dataset_class(name).name] = path
            except ValueError as exc:
                raise ValueError(f"--root {entry}: {exc}") from exc
        else:
            common = entry
    roots = {}
    for d in datasets:
        if d == FOLDER:
            continue
        key = get_dataset_class(d).name
        if key in named:
            roots[key] = named[key]
        elif common is not None:
            roots[key] = common
        else:
            raise ValueError(f"--root: no root given for dataset {key!r} (use --root DIR or "
                             f"--root {key}=DIR)")
    return roots


def _fmt(v: float) -> str:
    return "  n/a" if v is None or math.isnan(v) else f"{v:5.1f}"


def print_per_class(result: dict) -> None:
    print(f"\n{result['dataset']} / {result['method']}: per-class IoU")
    names = result["class_names"]
    width = max(len(n) for n in names)
    for n, v in zip(names, result["per_class"]):
        print(f"  {n:<{width}}  {_fmt(v)}")


def print_table(results: list[dict], datasets: list[str]) -> None:
    methods = []
    by = {}
    for r in results:  # each baseline's measured rows, then the paper's numbers
        methods.append(r["method"])
        by[(r["method"], r["dataset"])] = r["miou"]
        if not r["arm"] and r.get("expected_miou") is not None:
            paper = f"{r['baseline']} (paper)"
            by[(paper, r["dataset"])] = r["expected_miou"]
    methods = list(dict.fromkeys(methods))
    papers = list(dict.fromkeys(m for m, _ in by if m.endswith(" (paper)")))
    for paper in papers:  # after the last row of its baseline
        base = paper[: -len(" (paper)")]
        last = max(i for i, m in enumerate(methods) if m == base or m.startswith(base + "+"))
        methods.insert(last + 1, paper)
    width = max(len("method"), *(len(m) for m in methods))
    cols = [max(7, len(d)) for d in datasets]
    print("\nmIoU (%)")
    print(f"{'method':<{width}}  " + "  ".join(f"{d:>{c}}" for d, c in zip(datasets, cols))
          + ("      avg" if len(datasets) > 1 else ""))
    for m in methods:
        vals = [by.get((m, d)) for d in datasets]
        row = "  ".join(f"{_fmt(v):>{c}}" for v, c in zip(vals, cols))
        good = [v for v in vals if v is not None and not math.isnan(v)]
        avg = f"  {_fmt(sum(good) / len(good)):>7}" if len(datasets) > 1 and len(good) == len(vals) else ""
        print(f"{m:<{width}}  {row}{avg}")


def _dataset_names(names: list[str]) -> list[str]:
    from ..data import get_dataset_class

    out = []
    for d in names:
        try:
            out.append(FOLDER if d.lower() == FOLDER else get_dataset_class(d).name)
        except ValueError as exc:
            raise ValueError(f"--dataset: {exc}") from exc
    return out


def _baseline_names(names: list[str]) -> list[str]:
    from ..protocols import base_protocol

    for b in names:
        try:
            base_protocol(b)
        except ValueError as exc:
            raise ValueError(f"--baseline: {exc}") from exc
    return [b.lower() for b in names]


def _presets(args, datasets, baselines, backbone, folder, tag):
    """(dataset, baseline) -> the preset it runs under, the overrides applied."""
    from ..presets import get_preset

    overrides = dict(short_side=args.short_side, crop=args.crop, stride=args.stride,
                     logit_scale=args.logit_scale, prob_thd=args.prob_thd)

    def preset_for(b: str, d: str):
        if d != FOLDER:
            return get_preset(b, d, backbone, pretrained=tag, background=args.background,
                              **overrides)
        preset = get_preset(b, None, backbone, pretrained=tag, background=args.background,
                            **overrides)
        rule = preset.background  # the masks fix the classes: the rule targets class 0
        if rule.adds_class:
            rule = rule.at(rule.index, None)
        return replace(preset, name=f"{b}/{FOLDER}/{backbone}", background=rule,
                       classnames=folder.classnames)

    return {(d, b): preset_for(b, d) for d in datasets for b in baselines}


def _print_configuration(args, info, presets, datasets, baselines, roots, folder, arm, speed):
    from ..clip.text import resolve_templates
    from ..precision import autocast_dtype, describe

    print("armfast eval configuration:")
    weights = (args.clip_weights or args.pretrained or
               ("the model folder's" if ":" in args.model else DEFAULT_TAG))
    print(f"  model {args.model}, weights {weights}, device "
          f"{info.device}, processes {info.world_size}, backend {args.backend}, "
          f"{describe(autocast_dtype(speed['precision'], info.device))}, data workers "
          f"{args.workers}")
    backbone = next(iter(presets.values())).backbone
    print(f"  backbone presets {backbone}; text: each name in {len(resolve_templates(args.templates))} "
          f"template(s) ({args.templates}), averaged")
    if arm is not None:
        print(f"  ARM {args.arm}: tau {float(arm.logit_scale.detach().exp()):.2f}, "
              f"{arm.config.to_dict()}")
    for d in datasets:
        where = (f"images {folder.root}, masks {folder.mask_root}, {folder.num_classes} "
                 f"classes from {folder.classnames}" if d == FOLDER
                 else f"root {roots[d]}, split {args.split}")
        print(f"  {d}: {where}" + (f", first {args.limit} images" if args.limit else ""))
        for b in baselines:
            pr = presets[(d, b)]
            p = pr.protocol
            crops = f"crop {p.crop}, stride {p.stride}" if p.crop else "whole image"
            print(f"    {b:<10} preset {pr.name}: short {p.short_side or 'unchanged'}, "
                  f"{crops}, logit_scale {p.logit_scale:g}"
                  f"{' (ARM: its tau)' if arm else ''}, prob_thd {p.prob_thd:g}"
                  + (f", area_thd {p.area_thd:g}" if p.area_thd is not None else ""))
            paper = (f"{pr.expected_miou:.1f}" if pr.expected_miou is not None
                     else "n/a (no published number for this setting)")
            print(f"    {'':<10} background {pr.background.describe()}; classes "
                  f"{pr.classnames}; paper mIoU {paper}")
            print(f"    {'':<10} source: {pr.protocol.source}")


def run(args) -> int:
    from .._files import atomic_write_text, ensure_writable_file
    from ..clip import encode_classes, load_clip
    from ..data import build_dataset
    from ..arm import load_arm
    from ..eval.runner import evaluate, throughput_line
    from ..inference import SegmentorConfig
    from ..preflight import check_arm_fits, check_backend, clip_geometry, resolve_device
    from ..presets import DEFAULT_BACKBONE, warn_preset
    from ..train.distributed import cleanup, init_distributed
    from ._errors import error_message

    # everything that can be checked without CLIP: a mistake fails here, in seconds
    datasets = _dataset_names(args.dataset)
    baselines = _baseline_names(args.baseline)
    roots = resolve_roots(args.root, datasets)
    folder = folder_dataset(args, limit=args.limit) if FOLDER in datasets else None
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    check_backend(args.backend, resolve_device(args.device))
    geometry = clip_geometry(args.model)
    arm = load_arm(args.arm, "--arm") if args.arm else None
    if arm is not None:
        check_arm_fits(arm.config, geometry)
    out = ensure_writable_file(args.json, "--json") if args.json else None
    tag = None if args.clip_weights else (args.pretrained or (None if ":" in args.model else DEFAULT_TAG))
    spec = geometry.backbone if geometry is not None else None
    backbone = spec.name if spec else DEFAULT_BACKBONE  # unregistered CLIPs run as ViT-B/16
    presets = _presets(args, datasets, baselines, backbone, folder, tag)
    built = {}
    for d in datasets:
        try:
            built[d] = folder if d == FOLDER else build_dataset(d, roots[d], args.split,
                                                                limit=args.limit)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"--root {roots[d]}: {exc}") from exc
    pretrained = clip_weights(args)

    speed = speed_options(args)  # also sets ARMFAST_TEXT_CACHE for every encoding of the run
    info = init_distributed(args.device)
    main = info.is_main
    variants = [None, arm] if arm is not None else [None]
    results: list[dict] = []

    def write_json(*, complete: bool = False, error: str | None = None) -> None:
        if not (main and out):
            return
        payload = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "world_size": info.world_size, "complete": complete, "results": results}
        if error is not None:
            payload["error"] = error
        atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n")

    try:
        model = load_clip(args.model, pretrained, device=info.device, quick_gelu=quick_gelu(args))
        if main:
            _print_configuration(args, info, presets, datasets, baselines, roots, folder, arm, speed)
            for (d, b), pr in presets.items():
                warn_preset(pr, has_background=folder.has_background if d == FOLDER else None)
        for d in datasets:
            texts = {}  # foreground classes are the same for every baseline's preset
            for b in baselines:
                preset = presets[(d, b)]
                classes = preset.classes()
                key = json.dumps(classes)
                if key not in texts:
                    texts[key] = encode_classes(model, classes, args.templates,
                                                progress=main and not args.no_progress)
                for a in variants:
                    method = b + ("+arm" if a is not None else "")
                    config = SegmentorConfig(
                        baseline=b, protocol=preset.protocol, background=preset.background,
                        backend=args.backend, templates=args.templates, **speed)
                    r = evaluate(model, built[d], config, arm=a, vfm=args.vfm,
                                 text_embeddings=texts[key], rank=info.rank,
                                 world_size=info.world_size, workers=args.workers,
                                 progress=not args.no_progress, desc=f"{d}/{method}")
                    r.update(dataset=d, baseline=b, arm=a is not None, method=method,
                             protocol=preset.protocol.to_dict(), preset=preset.to_dict(),
                             expected_miou=preset.expected_miou)
                    results.append(r)
                    write_json()  # a later failure keeps the rows finished so far
                    if main:
                        paper = ("" if preset.expected_miou is None else
                                 f"  paper{' (no ARM)' if a is not None else ''} "
                                 f"{preset.expected_miou:.1f}")
                        print(f"{d:<15} {method:<16} mIoU {_fmt(r['miou'])}{paper}  "
                              f"({throughput_line(r)})")
    except Exception as exc:
        write_json(error=error_message(exc))
        if main and results:
            print_table(results, datasets)
            print(f"\n{len(results)} result(s) finished before the error"
                  + (f", written to {out}" if out else ""))
        raise
    finally:
        sys.stdout.flush()
        cleanup(info)
    if main:
        show = args.per_class == "yes" or (args.per_class == "auto" and len(results) == 1)
        if show:
            for r in results:
                print_per_class(r)
        print_table(results, datasets)
        if out:
            write_json(complete=True)
            print(f"\nresults written to {out}")
    return 0
