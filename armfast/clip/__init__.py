"""CLIP hooks for ARM: loading, shallow/deep feature extraction, the training-free baselines
and class-name text embeddings. open_clip is imported only by the functions that need it."""
from .baselines import BASELINES, Baseline, LastBlockInput, get_baseline, register_baseline
from . import calibrated  # noqa: F401,E402  (registers scclip, sfp and resclip after the others)
from .model import (DEFAULT_SHALLOW_LAYERS, OPENAI_MEAN, OPENAI_STD, backbone_of,
                    check_arm_matches, default_shallow_layers, embed, extract, feature_grid,
                    image_stats, interpolate_pos_embed, load_clip, native_grid, output_dim,
                    patch_size, vision_tower)
from .text import (SIMPLE_TEMPLATES, TextEmbeddings, encode_classes, encode_names,
                   flatten_classes, normalize_classes, openai_templates, parse_class_list,
                   read_class_file, resolve_templates)
from .vfm import VisionFoundationModel, as_vfm, load_vfm

__all__ = [
    "load_clip", "extract", "embed", "feature_grid", "interpolate_pos_embed", "vision_tower",
    "patch_size", "native_grid", "image_stats", "OPENAI_MEAN", "OPENAI_STD",
    "DEFAULT_SHALLOW_LAYERS", "backbone_of", "default_shallow_layers", "check_arm_matches",
    "output_dim", "BASELINES", "Baseline", "LastBlockInput", "get_baseline",
    "register_baseline", "TextEmbeddings", "encode_classes", "encode_names", "flatten_classes",
    "normalize_classes", "parse_class_list", "read_class_file", "resolve_templates",
    "openai_templates", "SIMPLE_TEMPLATES", "VisionFoundationModel", "as_vfm", "load_vfm",
]
