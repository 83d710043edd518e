"""Command-line options of a folder dataset (`armfast.data.FolderDataset`), shared by
``armfast eval``, ``armfast train`` and ``armfast check-dataset``."""
from __future__ import annotations

import argparse

FOLDER = "folder"  # the --dataset name of your own data


def add_folder_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--images, --masks, --class-file, --reduce-zero-label, --has-background (with `prefix`,
    e.g. ``val-`` for a validation folder, only the two folders)."""
    g = p.add_argument_group(f"your own data (--dataset {FOLDER})" if not prefix else
                             f"{prefix.rstrip('-')} folder (--dataset {FOLDER})")
    g.add_argument(f"--{prefix}images", metavar="DIR",
                   help="folder of images (paired with masks by file name without extension)")
    g.add_argument(f"--{prefix}masks", metavar="DIR",
                   help="folder of single-channel label maps: pixel value = class index, 255 = ignore")
    if prefix:
        return
    g.add_argument("--class-file", metavar="FILE",
                   help="class names, one class per line (comma-separated synonyms); line 1 = class 0")
    g.add_argument("--reduce-zero-label", action="store_true",
                   help="mask value 0 means 'unlabelled' (ignored) and k is class k-1")
    g.add_argument("--has-background", action="store_true", default=None,
                   help="class 0 is a background class (default: when the class file's first "
                        "name is 'background')")


def folder_dataset(args, *, images=None, masks=None, limit=None, strict=True):
    """The FolderDataset the options name; ValueError naming the missing option."""
    from ..data import FolderDataset

    images = images if images is not None else args.images
    masks = masks if masks is not None else args.masks
    missing = [name for name, value in (("--images", images), ("--masks", masks),
                                        ("--class-file", args.class_file)) if value is None]
    if missing:
        raise ValueError(f"--dataset {FOLDER} needs {', '.join(missing)} (a folder of images, a "
                         f"folder of masks and a class-name file)")
    check_folder_paths(images=images, masks=masks, class_file=args.class_file)
    return FolderDataset(images, masks, args.class_file, reduce_zero_label=args.reduce_zero_label,
                         has_background=args.has_background, limit=limit, strict=strict)


def check_folder_paths(**paths) -> None:
    """Each given ``--images``/``--masks``-like folder exists, and ``class_file`` is a file;
    the error names the flag."""
    from pathlib import Path

    for name, value in paths.items():
        if value is None:
            continue
        path, flag = Path(value).expanduser(), "--" + name.replace("_", "-")
        if name == "class_file":
            if not path.is_file():
                raise FileNotFoundError(f"{flag}: no file at {path}")
        elif not path.is_dir():
            raise FileNotFoundError(f"{flag}: {path} is not a folder")
