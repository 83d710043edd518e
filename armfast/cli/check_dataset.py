"""`armfast check-dataset`: what is wrong with a segmentation dataset before you train or
evaluate on it.

    armfast check-dataset --images imgs --masks masks --class-file classes.txt
    armfast check-dataset --dataset voc21 --root data --split val

Reports image/mask pairing problems (missing partners, size mismatches, unreadable files), the
label values found and the class histogram, and warns when the labels look like instance ids
rather than class ids. Exit status: 0 when the data can be used (warnings allowed), 1 when it
has problems, 2 when it cannot be opened at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._folder_args import FOLDER, add_folder_arguments

PROG = "armfast check-dataset"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("check-dataset", help="check a dataset's pairing, sizes and label values",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None,
                   help="a built-in dataset (voc21, ade20k, ...) or folder (default: folder when "
                        "--images is given)")
    p.add_argument("--root", metavar="DIR", help="root of a built-in dataset")
    p.add_argument("--split", default="val", choices=("train", "val"),
                   help="split of a built-in dataset (default val)")
    p.add_argument("--limit", type=int, default=None, help="check the first N pairs only")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    add_folder_arguments(p)
    return p


def run(args) -> int:
    from ..data.check import check_dataset, format_report, open_for_check

    name = (args.dataset or (FOLDER if args.images or args.masks else None))
    if name is None:
        print(f"{PROG}: error: give --images/--masks/--class-file (your own data) or --dataset "
              f"NAME --root DIR (a built-in one)", file=sys.stderr)
        return 2
    name = name.lower()
    if args.limit is not None and args.limit < 1:
        print(f"{PROG}: error: --limit must be a positive integer, got {args.limit}", file=sys.stderr)
        return 2
    try:
        if name == FOLDER:
            missing = [o for o, v in (("--images", args.images), ("--masks", args.masks),
                                      ("--class-file", args.class_file)) if v is None]
            if missing:
                raise ValueError(f"--dataset {FOLDER} needs {', '.join(missing)}")
        elif args.root is None:
            raise ValueError(f"--root is required for dataset {name!r}")
        dataset, pairing = open_for_check(name, args.root, args.split, images=args.images,
                                          masks=args.masks, class_file=args.class_file,
                                          reduce_zero_label=args.reduce_zero_label,
                                          has_background=args.has_background, limit=args.limit)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    report = check_dataset(dataset, pairing_problems=pairing, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1
