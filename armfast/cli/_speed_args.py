"""The speed options of `armfast eval` and `armfast segment`: precision, crop batching, CUDA
graphs and the on-disk text-embedding cache."""
from __future__ import annotations

import argparse
import os


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """Precision, crop batching, CUDA graphs and the text-embedding cache (eval and segment)."""
    from ..precision import PRECISIONS

    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on CUDA, float32 on CPU; fp32: float32 "
                        "everywhere")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="memory a batch of crops may take, e.g. 4GiB (default: half the free "
                        "GPU memory, 2GiB on CPU)")
    g.add_argument("--crop-batch-size", type=int, metavar="N",
                   help="crops per forward pass (default: as many as --max-memory allows, at "
                        "most 64)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the crop forward from CUDA graphs (default: on for CUDA)")
    g.add_argument("--text-cache", metavar="DIR",
                   help="keep text embeddings in DIR, keyed by a hash of the CLIP text tower, "
                        "the templates and the names (default: $ARMFAST_TEXT_CACHE, else memory "
                        "only)")


def speed_options(args) -> dict:
    """The `SegmentorConfig` fields of `add_speed_arguments` (checked); points the text
    cache at ``--text-cache``."""
    from ..inference.crop_budget import parse_bytes

    if args.crop_batch_size is not None and args.crop_batch_size < 1:
        raise ValueError(f"--crop-batch-size must be a positive integer, got {args.crop_batch_size}")
    options = dict(precision=args.precision,
                   max_memory=None if args.max_memory is None else parse_bytes(args.max_memory),
                   crop_batch_size=args.crop_batch_size, cuda_graphs=args.cuda_graphs)
    if args.text_cache:  # every encoding of this run: class names and background words
        from ..clip.text import TEXT_CACHE_ENV

        os.environ[TEXT_CACHE_ENV] = args.text_cache
    return options
