"""Datasets of the OVSS benchmarks (mmsegmentation layouts), class names and transforms."""
from .base import IGNORE_INDEX, Sample, SegDataset
from .classnames import flatten_class_names, load_class_names, parse_class_names
from .datasets import (ADE20K, COCOObject, COCOStuff164k, Context59, Context60, Cityscapes,
                       DATASETS, VOC20, VOC21, build_dataset, get_dataset_class)
from .folder import FolderDataset, pair_folders
from .transforms import CLIP_MEAN, CLIP_STD, TrainAugment, normalize

__all__ = [
    "IGNORE_INDEX", "Sample", "SegDataset", "DATASETS", "build_dataset", "get_dataset_class",
    "COCOStuff164k", "COCOObject", "VOC21", "VOC20", "Context60", "Context59", "Cityscapes",
    "ADE20K", "load_class_names", "parse_class_names", "flatten_class_names",
    "TrainAugment", "normalize", "CLIP_MEAN", "CLIP_STD", "FolderDataset", "pair_folders",
]
