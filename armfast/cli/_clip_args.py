"""CLIP options shared by ``armfast segment``, ``train`` and ``eval``: the model, its weights
(one meaning of ``--pretrained none`` everywhere: random weights), QuickGELU, text templates."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

DEFAULT_TAG = "openai"
TEMPLATES = ("openai", "simple")


def add_clip_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP")
    g.add_argument("--model", "--clip-model", dest="model", default="ViT-B-16", metavar="NAME",
                   help="open_clip model: ViT-B-16 (default), ViT-B-32, ViT-L-14, ViT-L-14-336, "
                        "or local-dir:FOLDER")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--pretrained", metavar="TAG", default=None,
                   help=f"open_clip weights tag (default: {DEFAULT_TAG}, downloaded once into the "
                        f"Hugging Face cache); 'none' = random weights (tests only)")
    w.add_argument("--clip-weights", metavar="FILE",
                   help="local CLIP weights file (safetensors preferred): how to run offline")
    g.add_argument("--quick-gelu", action="store_true",
                   help="build with QuickGELU: needed for OpenAI weights given by --clip-weights "
                        "(a tag sets it by itself)")
    g.add_argument("--templates", choices=TEMPLATES, default="openai",
                   help="prompt templates: the 80 OpenAI ImageNet ones (default), or "
                        "'a photo of a {}.' (faster on a CPU)")


def clip_weights(args, *, warn: bool = True) -> str | None:
    """What `load_clip` gets as ``pretrained``: a file, a tag, or None (random weights, or a
    ``local-dir:``/``hf-hub:`` model that brings its own). A tag's weights are looked up here
    (cache or download), so that a machine without network fails now, saying how to run
    offline, not after a scan of the data."""
    import open_clip

    from ..backbones import ALIASES
    from ..clip.model import _is_known_tag
    from ..clip.weights import pretrained_file

    if args.clip_weights is not None:
        path = Path(args.clip_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--clip-weights: no file at {path}")
        return str(path)
    tag = args.pretrained
    if tag is None:
        tag = None if ":" in args.model else DEFAULT_TAG
    elif tag.strip().lower() == "none":
        tag = None
    if tag is None:
        if warn and ":" not in args.model:
            warnings.warn("--pretrained none: CLIP has random weights, so the results mean "
                          "nothing (for tests)", stacklevel=2)
        return None
    name = ALIASES.get(args.model, args.model)
    if Path(tag).expanduser().is_file():  # a weights file given as --pretrained works too
        return str(Path(tag).expanduser())
    if not _is_known_tag(name, tag):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"--pretrained {tag!r} is not an open_clip weights tag of {args.model} "
                         f"(tags: {known}; a weights file goes to --clip-weights)")
    pretrained_file(name, tag.lower())
    return tag


def quick_gelu(args) -> bool | None:
    """``load_clip``'s ``quick_gelu``: forced by the flag, else what the tag says."""
    return True if args.quick_gelu else None
