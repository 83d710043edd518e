"""Your own data: FolderDataset, `armfast eval/train --dataset folder`, `armfast check-dataset`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from armfast.cli import build_parser, main
from armfast.data import FolderDataset, pair_folders
from armfast.data.check import check_dataset, open_for_check
from helpers.cli import one_error
from helpers.synthetic_datasets import write_dataset, write_tiny_clip_dir

CLASSES = "background\ncat, kitty\ndog\n"


def write_folder(root, n=3, size=(24, 32), classes=CLASSES, seed=0, values=None, nested=True):
    """images/ (jpg and png) and masks/ (png) paired by stem, one pair in a sub-folder."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    h, w = size
    for i in range(n):
        sub = "sub/" if nested and i == n - 1 else ""
        (images / sub).mkdir(parents=True, exist_ok=True)
        (masks / sub).mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if i % 2 == 0 else ".png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{sub}im{i}{ext}")
        if values is None:
            m = np.zeros((h, w), np.uint8)
            m[:, w // 3:] = 1
            m[:, 2 * w // 3:] = 2
            m[0, :4] = 255
        else:
            m = values(i, rng, h, w)
        Image.fromarray(m).save(masks / f"{sub}im{i}.png")
    (root / "classes.txt").write_text(classes)
    return images, masks, root / "classes.txt"


def test_pairs_by_stem_with_subfolders(tmp_path):
    images, masks, classes = write_folder(tmp_path)
    ds = FolderDataset(images, masks, classes)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.has_background
    assert [s.name for s in ds.samples] == ["im0", "im1", "sub/im2"]
    item = ds[0]
    assert item["image"].shape == (3, 24, 32) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) == {0, 1, 2, 255}
    assert ds.class_names[1] == ["cat", "kitty"] and ds.classnames == str(classes)
    assert len(FolderDataset(images, masks, classes, limit=2)) == 2
    assert not FolderDataset(images, masks, classes, has_background=False).has_background


def test_pairing_problems_are_named(tmp_path):
    images, masks, classes = write_folder(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "lonely.jpg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "orphan.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "im0.png")  # im0.jpg too
    pairing = pair_folders(images, masks)
    assert [p.name for p in pairing.images_without_mask] == ["lonely.jpg"]
    assert [p.name for p in pairing.masks_without_image] == ["orphan.png"]
    assert list(pairing.ambiguous) == ["im0"] and len(pairing.samples) == 2
    with pytest.raises(ValueError, match=r"do not pair up: 1 image\(s\) without a mask: .*lonely.jpg"):
        FolderDataset(images, masks, classes)
    assert len(FolderDataset(images, masks, classes, strict=False)) == 2
    with pytest.raises(FileNotFoundError, match="masks folder not found"):
        FolderDataset(images, tmp_path / "nope", classes)
    with pytest.raises(ValueError, match="must be different folders"):
        FolderDataset(images, images, classes)


def test_label_reading(tmp_path):
    # 16-bit masks, reduce_zero_label, values out of range, colour masks
    images, masks, classes = write_folder(tmp_path, n=1, nested=False)
    m16 = np.full((24, 32), 2, np.uint16)
    Image.fromarray(m16).save(masks / "im0.png")
    assert set(FolderDataset(images, masks, classes)[0]["mask"].unique().tolist()) == {2}
    m = np.array([[0, 1, 2, 3, 255]], np.uint8).repeat(24, 0)
    m = np.pad(m, ((0, 0), (0, 27)), constant_values=1)
    Image.fromarray(m).save(masks / "im0.png")
    reduced = FolderDataset(images, masks, classes, reduce_zero_label=True)[0]["mask"]
    assert reduced[0, :5].tolist() == [255, 0, 1, 2, 255]
    with pytest.raises(ValueError, match=r"values \[3\] that are neither a class id .*instance ids"):
        FolderDataset(images, masks, classes)[0]
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(masks / "im0.png")
    with pytest.raises(ValueError, match="colour-coded mask"):
        FolderDataset(images, masks, classes)[0]
    with pytest.raises(ValueError, match="class_file is required"):
        FolderDataset(images, masks, None)


def test_eval_on_a_folder(tmp_path, capsys):
    images, masks, classes = write_folder(tmp_path)
    model = write_tiny_clip_dir(tmp_path / "clip")
    out = tmp_path / "r.json"
    rc = main(["eval", "--dataset", "folder", "--images", str(images), "--masks", str(masks),
               "--class-file", str(classes), "--model", model, "--baseline", "naclip",
               "--short-side", "32", "--crop", "32", "--stride", "16", "--workers", "0",
               "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "preset naclip/folder/ViT-B-16" in text and "3 classes from" in text
    r = json.loads(out.read_text())["results"][0]
    assert r["dataset"] == "folder" and r["images"] == 3 and len(r["per_class"]) == 3
    assert r["class_names"] == ["background", "cat", "dog"] and r["expected_miou"] is None
    # a background rule on a folder targets its class 0 (the masks fix the classes)
    rc = main(["eval", "--dataset", "folder", "--images", str(images), "--masks", str(masks),
               "--class-file", str(classes), "--model", model, "--background", "words:sky",
               "--short-side", "32", "--crop", "32", "--stride", "16", "--workers", "0",
               "--no-progress"])
    assert rc == 0 and "words [sky] -> class 0" in capsys.readouterr().out
    assert "--dataset folder needs --masks, --class-file" in one_error(
        capsys, ["eval", "--dataset", "folder", "--images", images])
    assert "no root given for dataset 'voc21'" in one_error(capsys, ["eval", "--dataset", "voc21"])


def test_train_on_a_folder(tmp_path, capsys):
    def colour_blocks(i, rng, h, w):
        m = np.zeros((h, w), np.uint8)
        m[:, w // 2:] = 1 + i % 2
        return m

    images, masks, classes = write_folder(tmp_path / "train", n=4, size=(32, 32),
                                          values=colour_blocks, nested=False)
    val_images, val_masks, _ = write_folder(tmp_path / "val", n=2, size=(32, 32),
                                            values=colour_blocks, nested=False)
    model = write_tiny_clip_dir(tmp_path / "clip")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "folder", "--images", str(images), "--masks", str(masks),
               "--class-file", str(classes), "--val-images", str(val_images), "--val-masks",
               str(val_masks), "--model", model, "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--crop", "32", "--base-short", "32", "--workers", "0",
               "--val-every", "2", "--val-samples", "2", "--val-short-side", "32",
               "--val-crop", "32", "--val-stride", "16", "--shallow-layers", "0,1",
               "--baselines", "clearclip", "--no-progress"])
    assert rc == 0 and (out / "arm" / "config.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val_miou" in r for r in log)
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "folder" and config["class_file"] == str(classes)
    assert "--data-root is required for --dataset voc21" in one_error(
        capsys, ["train", "--dataset", "voc21", "--out", out])
    assert "--dataset folder needs --masks, --class-file" in one_error(
        capsys, ["train", "--dataset", "folder", "--images", images, "--out", out])


# ------------------------------------------------------------------ check-dataset


def check(args, capsys):
    rc = main(["check-dataset", "--no-progress", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_check_clean_folder(tmp_path, capsys):
    images, masks, classes = write_folder(tmp_path)
    out = tmp_path / "report.json"
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes), "--json", str(out)], capsys)
    assert rc == 0 and "verdict: OK" in text and "raw label values: 0 (" in text
    assert "  1  cat" in text.replace("   ", "  ")
    report = json.loads(out.read_text())
    assert report["ok"] and report["samples"] == 3
    assert [c["images"] for c in report["classes"]] == [3, 3, 3]
    assert set(report["raw_values"]) == {"0", "1", "2", "255"}


def test_check_reports_pairing_and_sizes(tmp_path, capsys):
    images, masks, classes = write_folder(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "lonely.jpg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "orphan.png")
    Image.fromarray(np.zeros((25, 32), np.uint8)).save(masks / "im0.png")
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes)], capsys)
    assert rc == 1
    assert "problem: 1 image(s) without a mask" in text and "lonely.jpg" in text
    assert "problem: 1 mask(s) without an image" in text and "orphan.png" in text
    assert "size mismatch" in text and "im0.png is 32x25, image" in text
    assert "verdict: 3 problem(s)" in text


def test_check_warns_about_instance_ids(tmp_path, capsys):
    def too_many(i, rng, h, w):  # more distinct values than classes
        return (np.arange(h * w) % 7).reshape(h, w).astype(np.uint8)

    images, masks, classes = write_folder(tmp_path / "a", values=too_many)
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes)], capsys)
    assert rc == 1  # values 3..6 are no class of a 3-class file
    assert "neither a class id (0..2" in text
    assert "warning: labels look like instance ids, not class ids: 3 mask(s)" in text

    def numbered(i, rng, h, w):  # each mask numbers its objects 1..k
        m = np.zeros((h, w), np.uint8)
        for k in range(1, 4 + i % 3):
            m[2 * k:2 * k + 2] = k
        return m

    many = "\n".join(f"class{i}" for i in range(30))
    images, masks, classes = write_folder(tmp_path / "b", n=8, values=numbered, classes=many,
                                          nested=False)
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes)], capsys)
    assert rc == 0
    assert "warning: labels look like per-image instance ids: 8 of 8 masks" in text

    def one_based(i, rng, h, w):
        return np.where(np.arange(w) < w // 2, 1, 3).astype(np.uint8)[None].repeat(h, 0)

    images, masks, classes = write_folder(tmp_path / "c", values=one_based)
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes)], capsys)
    assert rc == 1 and "pass --reduce-zero-label" in text
    rc, text, _ = check(["--images", str(images), "--masks", str(masks), "--class-file",
                         str(classes), "--reduce-zero-label"], capsys)
    assert rc == 0 and "verdict: OK" in text


def test_check_builtin_reader(tmp_path, capsys):
    write_dataset("voc21", tmp_path, n=2, splits=("val",))
    rc, text, _ = check(["--dataset", "voc21", "--root", str(tmp_path)], capsys)
    assert rc == 0 and "voc21: 2 pair(s) listed, 2 read, 21 classes" in text
    assert "     0  background" in text
    (tmp_path / "VOCdevkit/VOC2012/JPEGImages/val0000.jpg").unlink()
    rc, text, _ = check(["--dataset", "voc21", "--root", str(tmp_path)], capsys)
    assert rc == 1 and "problem: 1 file(s) missing" in text and "val0000.jpg" in text
    # the readers themselves still refuse missing files outside check-dataset
    from armfast.data import build_dataset

    with pytest.raises(FileNotFoundError, match="val0000.jpg"):
        build_dataset("voc21", tmp_path)
    write_dataset("ade20k", tmp_path, n=1, splits=("val",))
    ds, problems = open_for_check("ade20k", tmp_path)
    report = check_dataset(ds, pairing_problems=problems)
    assert report.ok and report.class_pixels.sum() > 0  # after the reader's reduce_zero_label


def test_check_setup_errors(tmp_path, capsys):
    rc, _, err = check([], capsys)
    assert rc == 2 and "give --images/--masks/--class-file" in err
    rc, _, err = check(["--dataset", "voc21"], capsys)
    assert rc == 2 and "--root is required" in err
    rc, _, err = check(["--images", str(tmp_path)], capsys)
    assert rc == 2 and "needs --masks, --class-file" in err
    rc, _, err = check(["--dataset", "voc21", "--root", str(tmp_path / "none")], capsys)
    assert rc == 2 and "is not a directory" in err
    assert "check-dataset" in build_parser().format_help()
