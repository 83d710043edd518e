"""Dataset readers on tiny synthetic copies of each real layout; class names; augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from armfast.data import (DATASETS, IGNORE_INDEX, TrainAugment, build_dataset, get_dataset_class,
                          load_class_names, normalize, parse_class_names)
from armfast.data.base import reduce_zero_label_lut
from helpers.synthetic_datasets import write_dataset

ALL = ("coco_stuff164k", "coco_object", "voc21", "voc20", "context60", "context59",
       "cityscapes", "ade20k")
REDUCED = {"voc20", "context59", "ade20k"}


def expected_labels(name, raw):
    return reduce_zero_label_lut()[raw] if name in REDUCED else raw.astype(np.int64)


def test_registry_has_every_benchmark():
    assert set(ALL) <= set(DATASETS)
    assert get_dataset_class("coco_stuff") is DATASETS["coco_stuff164k"]
    assert get_dataset_class("ADE20K") is DATASETS["ade20k"]
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        get_dataset_class("nope")
    with pytest.raises(TypeError):
        get_dataset_class(3)


@pytest.mark.parametrize("name", ALL)
def test_reader_reads_layout(tmp_path, name):
    raw = write_dataset(name, tmp_path, n=2)
    for split in ("train", "val"):
        ds = build_dataset(name, tmp_path, split)
        assert len(ds) == 2
        for i in range(len(ds)):
            item = ds[i]
            image, mask = item["image"], item["mask"]
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
            expected = expected_labels(name, raw[split][item["name"]])
            np.testing.assert_array_equal(mask.numpy(), expected)
            valid = mask[mask != IGNORE_INDEX]
            assert valid.numel() == 0 or int(valid.max()) < ds.num_classes
    assert len(build_dataset(name, tmp_path, "val", limit=1)) == 1


def test_root_may_be_dataset_dir_or_parent(tmp_path):
    write_dataset("voc21", tmp_path, n=1, splits=("val",))
    a = build_dataset("voc21", tmp_path)
    b = build_dataset("voc21", tmp_path / "VOCdevkit")
    c = build_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012")
    assert a.root == b.root == c.root
    write_dataset("ade20k", tmp_path, n=1, splits=("val",))
    assert build_dataset("ade20k", tmp_path).root.name == "ADEChallengeData2016"


def test_voc20_and_context59_drop_background(tmp_path):
    write_dataset("voc21", tmp_path, n=1, splits=("val",))
    write_dataset("context60", tmp_path, n=1, splits=("val",))
    for with_bg, without in (("voc21", "voc20"), ("context60", "context59")):
        m_bg = build_dataset(with_bg, tmp_path)[0]["mask"]
        m = build_dataset(without, tmp_path)[0]["mask"]
        assert torch.equal(m[m_bg == 0], torch.full_like(m[m_bg == 0], 255))
        keep = (m_bg != 0) & (m_bg != 255)
        assert torch.equal(m[keep], m_bg[keep] - 1)


def test_missing_files_are_named(tmp_path):
    write_dataset("voc21", tmp_path, n=2, splits=("val",))
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClass" / "val0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="val0001.png"):
        build_dataset("voc21", tmp_path)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        build_dataset("voc21", tmp_path)
    with pytest.raises(FileNotFoundError, match="cannot find the dataset"):
        build_dataset("cityscapes", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataset("voc21", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("voc21", tmp_path, "test")


def test_missing_coco_mask_is_named(tmp_path):
    write_dataset("coco_stuff164k", tmp_path, n=2, splits=("val",))
    (tmp_path / "annotations" / "val2017" / "val0000_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="val0000_labelTrainIds.png"):
        build_dataset("coco_stuff164k", tmp_path)
    # the COCO-Object maps sit beside the stuff maps; none were written here
    with pytest.raises(FileNotFoundError, match="_instanceTrainIds.png"):
        build_dataset("coco_object", tmp_path)


def test_malformed_files_are_named(tmp_path):
    write_dataset("cityscapes", tmp_path, n=2, splits=("val",))
    ds = build_dataset("cityscapes", tmp_path)
    img0, msk1 = ds.samples[0].image, ds.samples[1].mask
    img0.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=str(img0.name)):
        ds[0]
    Image.fromarray(np.full((5, 5), 30, np.uint8)).save(msk1)  # wrong size
    with pytest.raises(ValueError, match=f"{msk1.name}.*5x5"):
        ds[1]
    h, w = np.asarray(Image.open(ds.samples[1].image)).shape[:2]
    Image.fromarray(np.full((h, w), 30, np.uint8)).save(msk1)  # 30 is not a Cityscapes train id
    with pytest.raises(ValueError, match=f"{msk1.name}.*\\[30\\]"):
        ds[1]
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(msk1)  # RGB label map
    with pytest.raises(ValueError, match="single-channel"):
        ds[1]


@pytest.mark.parametrize("name", ALL)
def test_class_names_match_datasets(name):
    cls = get_dataset_class(name)
    classes = load_class_names(name)
    assert len(classes) == cls.num_classes
    assert all(c and all(s and s == s.strip() for s in c) for c in classes)


def test_class_name_relations():
    voc21, voc20 = load_class_names("voc21"), load_class_names("voc20")
    ctx60, ctx59 = load_class_names("context60"), load_class_names("context59")
    assert voc21[1:] == voc20 and ctx60[1:] == ctx59 and ctx60[0] == ["background"]
    assert load_class_names("coco_object")[1][0] == "person"
    assert load_class_names("coco_stuff164k")[0] == ["person"]


def test_class_name_file_parsing(tmp_path):
    assert parse_class_names("a, b\n\nc\n") == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="empty synonym"):
        parse_class_names("a,,b")
    p = tmp_path / "mine.txt"
    p.write_text("cat, kitty\ndog\n")
    assert load_class_names(p) == [["cat", "kitty"], ["dog"]]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_class_names(tmp_path / "missing.txt")


def test_augment_deterministic_and_consistent():
    # left half red = class 1, right half blue = class 2
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    mask = torch.full((40, 60), 2, dtype=torch.int64)
    image[0, :, :30], image[2, :, 30:], mask[:, :30] = 255, 255, 1
    aug = TrainAugment(crop=32, base_short=40, scale_range=(0.5, 1.5))
    for seed in range(12):
        a = aug(image, mask, np.random.default_rng(seed))
        b = aug(image, mask, np.random.default_rng(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        img, msk = a
        assert img.shape == (3, 32, 32) and msk.shape == (32, 32)
        assert set(msk.unique().tolist()) <= {1, 2, 255}
        assert torch.all(img[:, msk == 255] == 0)  # padding is the mean colour
        for k, (hi, lo) in ((1, (0, 2)), (2, (2, 0))):
            sel = msk == k
            if sel.sum() > 20:
                assert img[hi][sel].mean() > img[lo][sel].mean()


def test_normalize_checks():
    x = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError):
        normalize(torch.zeros(4, 2, 2, dtype=torch.uint8))
