"""Readers for the OVSS benchmarks in their mmsegmentation-converted layouts, and a registry.

| name            | layout under root                                                       | classes |
| --------------- | ----------------------------------------------------------------------- | ------- |
| coco_stuff164k  | images/{train,val}2017/*.jpg, annotations/.../*_labelTrainIds.png       | 171     |
| coco_object     | images/{train,val}2017/*.jpg, annotations/.../*_instanceTrainIds.png    | 81 (bg) |
| voc21 / voc20   | VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} | 21 / 20 |
| context60 / 59  | VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/...}   | 60 / 59 |
| cityscapes      | leftImg8bit/{split}/{city}/*_leftImg8bit.png, gtFine/.../*_gtFine_labelTrainIds.png | 19 |
| ade20k          | ADEChallengeData2016/{images,annotations}/{training,validation}         | 150     |

VOC20 and Context59 drop the background: 0 -> 255 and the others shift down by one
(mmseg's ``reduce_zero_label``), as does ADE20K (its 0 is "other").
COCO-Object is built from COCO-Stuff by the GroupViT/TCL converter (used by SCLIP, ClearCLIP,
NACLIP): 0 background, 1..80 the thing classes, written next to the stuff maps.
"""
from __future__ import annotations

from pathlib import Path

from .base import (SegDataset, Sample, pair_by_glob, pair_by_ids, read_id_list,
                   reduce_zero_label_lut)

DATASETS: dict[str, type[SegDataset]] = {}
ALIASES = {"coco_stuff": "coco_stuff164k", "cocostuff": "coco_stuff164k", "pascal_voc": "voc21",
           "voc": "voc21", "pascal_context": "context60", "context": "context60",
           "city_scapes": "cityscapes", "ade": "ade20k"}


def register(cls: type[SegDataset]) -> type[SegDataset]:
    DATASETS[cls.name] = cls
    return cls


def get_dataset_class(name: str) -> type[SegDataset]:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    return DATASETS[key]


def build_dataset(name: str, root: str | Path, split: str = "val", **kwargs) -> SegDataset:
    return get_dataset_class(name)(root, split, **kwargs)


class _COCO(SegDataset):
    splits = {"train": "train2017", "val": "val2017"}
    marker = "images"
    search_dirs = ("coco_stuff164k", "coco")
    mask_suffix: str

    @classmethod
    def list_samples(cls, root: Path, split_dir: str) -> list[Sample]:
        return pair_by_glob(root / "images" / split_dir, "*.jpg", ".jpg",
                            root / "annotations" / split_dir, cls.mask_suffix)


@register
class COCOStuff164k(_COCO):
    name = "coco_stuff164k"
    num_classes = 171
    classnames = "coco_stuff164k"
    mask_suffix = "_labelTrainIds.png"


@register
class COCOObject(_COCO):
    name = "coco_object"
    num_classes = 81
    classnames = "coco_object"
    has_background = True
    mask_suffix = "_instanceTrainIds.png"
    search_dirs = ("coco_object", "coco_stuff164k", "coco")


class _VOCLike(SegDataset):
    image_dir = "JPEGImages"
    mask_dir: str
    list_dir: str

    @classmethod
    def list_samples(cls, root: Path, split_dir: str) -> list[Sample]:
        ids = read_id_list(root / "ImageSets" / cls.list_dir / f"{split_dir}.txt")
        return pair_by_ids(ids, root / cls.image_dir, ".jpg", root / cls.mask_dir, ".png")


class _VOC(_VOCLike):
    marker = "SegmentationClass"
    mask_dir = "SegmentationClass"
    list_dir = "Segmentation"
    search_dirs = ("VOC2012", "VOCdevkit/VOC2012")


@register
class VOC21(_VOC):
    name = "voc21"
    num_classes = 21
    classnames = "voc21"
    has_background = True


@register
class VOC20(_VOC):
    name = "voc20"
    num_classes = 20
    classnames = "voc20"
    label_lut = reduce_zero_label_lut()


class _Context(_VOCLike):
    marker = "SegmentationClassContext"
    mask_dir = "SegmentationClassContext"
    list_dir = "SegmentationContext"
    search_dirs = ("VOC2010", "VOCdevkit/VOC2010")


@register
class Context60(_Context):
    name = "context60"
    num_classes = 60
    classnames = "context60"
    has_background = True


@register
class Context59(_Context):
    name = "context59"
    num_classes = 59
    classnames = "context59"
    label_lut = reduce_zero_label_lut()


@register
class Cityscapes(SegDataset):
    name = "cityscapes"
    num_classes = 19
    classnames = "cityscapes"
    marker = "leftImg8bit"
    search_dirs = ("cityscapes",)

    @classmethod
    def list_samples(cls, root: Path, split_dir: str) -> list[Sample]:
        return pair_by_glob(root / "leftImg8bit" / split_dir, "*/*_leftImg8bit.png",
                            "_leftImg8bit.png", root / "gtFine" / split_dir,
                            "_gtFine_labelTrainIds.png")


@register
class ADE20K(SegDataset):
    name = "ade20k"
    num_classes = 150
    classnames = "ade20k"
    splits = {"train": "training", "val": "validation"}
    marker = "images"
    search_dirs = ("ADEChallengeData2016", "ade/ADEChallengeData2016")
    label_lut = reduce_zero_label_lut()

    @classmethod
    def list_samples(cls, root: Path, split_dir: str) -> list[Sample]:
        return pair_by_glob(root / "images" / split_dir, "*.jpg", ".jpg",
                            root / "annotations" / split_dir, ".png")
